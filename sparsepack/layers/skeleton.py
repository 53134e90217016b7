"""Materialize what a checkpoint does not hold in a model built on the meta device.

The meta model itself comes from ``formats.model_config.meta_model`` (the pack reader builds it to check every
tensor's shape; the loader then swaps modules and loads tensors into it with ``assign=True``).
"""

from __future__ import annotations

import torch
from torch import nn


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
