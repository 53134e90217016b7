"""Adapter control on a loaded model: switch, load, delete, fuse, and per-row adapters in one batch.

``sparsepack.load`` gives the returned transformers model these methods by swapping its class for a subclass
that mixes in :class:`AdapterControl` (one cached subclass per model class); everything else is the original
model. Switching only changes which names each adapted layer reads: no tensor moves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from sparsepack.formats.adapter_layout import read_adapter, validate_adapter_name
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.layers.inject import adapter_layers, attach_adapter, set_active_adapters
from sparsepack.layers.inject import delete_adapter as _delete


class AdapterControl:
    """Methods added to a loaded model (``self`` is the transformers model)."""

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters."""
        names = set()
        for layer in adapter_layers(self).values():
            names |= set(layer.adapter_names)
        return sorted(names)

    @property
    def active_adapters(self) -> list[str]:
        return list(self.sparsepack.active)

    def set_adapter(self, names: str | list[str] | None) -> None:
        """Activate one adapter, several (their corrections add up), or None for the bare base."""
        self.unfuse()
        set_active_adapters(self, names)
        self.sparsepack.active = [] if names is None else [names] if isinstance(names, str) else list(names)

    def load_adapter(self, source: str | Path, name: str | None = None, adapter: str | None = None) -> str:
        """Load an adapter from an adapter directory, or adapter ``adapter`` of another pack, under ``name``.

        Returns the name it was loaded under (not activated).
        """
        source = Path(source)
        if (source / "sparsepack.json").is_file():
            from sparsepack.formats.pack import read_pack

            pack = read_pack(source, check_config=False)
            if adapter is None:
                if len(pack.adapters) != 1:
                    raise ValueError(f"{source}: holds adapters {sorted(pack.adapters)}; say which with adapter=")
                adapter = next(iter(pack.adapters))
            if adapter not in pack.adapters:
                raise KeyError(f"{source}: no adapter {adapter!r}; it has {sorted(pack.adapters)}")
            loaded = pack.adapters[adapter]
        else:
            from sparsepack.formats.model_config import linear_shapes

            loaded = read_adapter(source, {n: s for n, s in _base_shapes(self).items()} or linear_shapes(self))
            adapter = source.name
        name = validate_adapter_name(name or adapter)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; delete_adapter it first")
        attach_adapter(self, name, loaded)
        set_active_adapters(self, self.sparsepack.active)
        return name

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and free its tensors."""
        if name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; loaded: {self.adapters}")
        if any(layer.fused == name for layer in adapter_layers(self).values()):
            self.unfuse()
        _delete(self, name)
        self.sparsepack.active = [a for a in self.sparsepack.active if a != name]

    def fuse(self, name: str) -> None:
        """Fold adapter ``name`` into the (dense) base weights in place; :meth:`unfuse` restores them exactly."""
        if name not in self.adapters:
            raise KeyError(f"unknown adapter {name!r}; loaded: {self.adapters}")
        self.unfuse()
        set_active_adapters(self, None)
        with torch.no_grad():
            for layer in adapter_layers(self).values():
                if name in layer.adapter_names:
                    layer.fuse(name)
        self.sparsepack.active = []

    def unfuse(self, free: bool = False) -> None:
        """Restore the base weights bit for bit. The fused weights' memory is kept for the next :meth:`fuse`
        (fusing into touched memory is several times faster); ``free=True`` returns it."""
        with torch.no_grad():
            for layer in adapter_layers(self).values():
                layer.unfuse(free)

    @contextlib.contextmanager
    def _routing(self, adapter_names: list[str | None] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        unknown = {n for n in adapter_names if n is not None} - set(self.adapters)
        if unknown:
            raise KeyError(f"unknown adapter(s) {sorted(unknown)}; loaded: {self.adapters}")
        layers = list(adapter_layers(self).values())
        for layer in layers:
            layer.row_adapters = list(adapter_names)
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = None

    def forward(self, *args, adapter_names: list[str | None] | None = None, **kwargs):
        """The model's forward; ``adapter_names[i]`` picks the adapter of batch row ``i`` (None: base)."""
        with self._routing(adapter_names):
            return super().forward(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str | None] | None = None, **kwargs):
        """``transformers`` generate; ``adapter_names`` as in :meth:`forward`, one per prompt row."""
        with self._routing(adapter_names):
            return super().generate(*args, **kwargs)


def _base_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear that an adapter may target, wrapped or not."""
    from sparsepack.layers.inject import LINEAR_TYPES

    shapes = {}
    for n, m in model.named_modules():
        if isinstance(m, SparseLowRankLinear):
            shapes[n] = (m.out_features, m.in_features)
        elif isinstance(m, LINEAR_TYPES) and not n.endswith(".base"):
            shapes[n] = (m.out_features, m.in_features)
    return shapes


_SUBCLASSES: dict[type, type] = {}


def install(model: nn.Module) -> nn.Module:
    """Give ``model`` the :class:`AdapterControl` methods (in place) and return it."""
    cls = type(model)
    if issubclass(cls, AdapterControl):
        return model
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Packed{cls.__name__}", (AdapterControl, cls), {"__module__": cls.__module__})
    model.__class__ = _SUBCLASSES[cls]
    return model
