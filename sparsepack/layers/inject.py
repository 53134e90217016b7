"""Choose target modules and swap layers in and out of an HF model by fully qualified name."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable

from torch import nn

from sparsepack.formats.adapter_layout import Adapter
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.layers.quantized_linear import QuantizedLinear

LINEAR_TYPES = (nn.Linear, QuantizedLinear)
# Bumped on every module swap made here: `adapter_layers` caches its walk of the module tree (a walk of a 30-block
# model costs ~10 ms, far more than switching adapters itself) and re-walks only after a swap.
_swaps = itertools.count()
_swap_version = next(_swaps)
_CACHE_ATTR = "_sparsepack_adapter_layers"


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``name`` (swap layers through here, or :func:`adapter_layers` may miss the change)."""
    global _swap_version
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    _swap_version = next(_swaps)


def find_targets(model: nn.Module, target: str = "all-linear") -> list[str]:
    """Names of the linear layers to adapt.

    Args:
        target: ``"all-linear"`` (every linear inside the decoder blocks, never ``lm_head``) or a regular
            expression matched (``re.search``) against fully qualified module names.
    """
    out_emb = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        out_emb = get_out()
    names = []
    for name, module in model.named_modules():
        if isinstance(module, SparseLowRankLinear):
            module = module.base
        if not isinstance(module, LINEAR_TYPES) or module is out_emb or name.endswith(".base"):
            continue
        if target == "all-linear" or re.search(target, name):
            names.append(name)
    if not names:
        raise ValueError(f"target {target!r} matches no linear layer of the model")
    return names


def wrap(model: nn.Module, name: str) -> SparseLowRankLinear:
    """Replace the linear at ``name`` by a SparseLowRankLinear around it (idempotent)."""
    module = model.get_submodule(name)
    if isinstance(module, SparseLowRankLinear):
        return module
    if not isinstance(module, LINEAR_TYPES):
        raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer")
    wrapper = SparseLowRankLinear(module, module.in_features, module.out_features)
    set_submodule(model, name, wrapper)
    return wrapper


def adapter_layers(model: nn.Module) -> dict[str, SparseLowRankLinear]:
    """Every adapted layer of ``model`` by name (cached until the next :func:`set_submodule`)."""
    cached = model.__dict__.get(_CACHE_ATTR)
    if cached is not None and cached[0] == _swap_version:
        return cached[1]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear)}
    model.__dict__[_CACHE_ATTR] = (_swap_version, layers)
    return layers


def attach_adapter(model: nn.Module, name: str, adapter: Adapter, dropout: float = 0.0,
                   trainable: bool = False) -> None:  # fmt: skip
    """Add ``adapter`` to the model under ``name`` (inactive until :func:`set_active_adapters`)."""
    for module_name, part in adapter.modules.items():
        layer = wrap(model, module_name)
        if (layer.out_features, layer.in_features) != part.shape:
            raise ValueError(f"adapter {name!r}: {module_name} has shape {part.shape}, layer has "
                             f"{(layer.out_features, layer.in_features)}")  # fmt: skip
        layer.add_adapter(name, part, dropout=dropout, trainable=trainable)


def set_active_adapters(model: nn.Module, names: str | Iterable[str] | None) -> None:
    """Activate ``names`` (one name, a list, or None for the bare base) on every adapted layer."""
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    layers = adapter_layers(model).values()
    unknown = [n for n in names if not any(layer.has_adapter(n) for layer in layers)]
    if unknown:
        known = sorted({a for layer in layers for a in layer.adapter_names})
        raise KeyError(f"unknown adapter(s) {unknown}; loaded: {known}")
    for layer in layers:
        layer.set_active([n for n in names if layer.has_adapter(n)])


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer, unwrapping layers left with no adapter."""
    for layer_name, layer in adapter_layers(model).items():
        layer.delete_adapter(name)
        if not layer.adapter_names:
            set_submodule(model, layer_name, layer.base)
