"""Build an HF causal LM with no weights (meta device) and materialize what a checkpoint does not hold.

Used by the loader (build, swap modules, then load tensors with ``assign=True``) and by the pack reader to
know every tensor's expected shape without allocating the model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig


def empty_model(config: PretrainedConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """An ``AutoModelForCausalLM`` for ``config`` with every parameter and buffer on the meta device."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Fully qualified name -> (out_features, in_features) of every ``nn.Linear``."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def materialize_buffers(model: nn.Module, device: torch.device | str = "cpu", check: bool = True) -> None:
    """Give real values to non-persistent buffers (e.g. rotary ``inv_freq``) left on meta.

    They are never in a checkpoint; the model's own ``_init_weights`` knows how to compute them. Only
    parameter-free modules are re-initialized, so loaded weights are never touched. With ``check``, any
    tensor still on meta afterwards is an error (off for compress, whose blocks arrive one at a time).
    """
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise RuntimeError(
                f"{type(module).__name__} has meta buffers {meta} and parameters; cannot re-init"
            )
        for n in meta:
            buf = getattr(module, n)
            persistent = n not in module._non_persistent_buffers_set
            module.register_buffer(n, torch.empty_like(buf, device=device), persistent=persistent)
        init = getattr(model, "_init_weights", None)
        if init is None:
            raise RuntimeError(f"cannot compute buffers {meta} of {type(module).__name__}")
        init(module)
    if not check:
        return
    left = [n for n, b in model.named_buffers() if b.is_meta] + [
        n for n, p in model.named_parameters() if p.is_meta
    ]
    if left:
        raise RuntimeError(
            f"tensors left without values after loading: {left[:5]}{'...' if len(left) > 5 else ''}"
        )
