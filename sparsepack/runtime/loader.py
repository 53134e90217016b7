"""Deployment loader: ``sparsepack.load(path)`` for packs, GPTQ-v1/v2 checkpoints and plain HF models.

The model is built from ``config.json`` on the meta device (no weight memory), ``QuantizedLinear`` is
swapped in wherever the checkpoint holds GPTQ tensors, and tensors are attached with
``load_state_dict(assign=True)`` straight from memory-mapped safetensors files: nothing is unpickled, and
neither optimum nor gptqmodel is needed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparsepack.formats import gptq_layout
from sparsepack.formats.errors import ShapeError
from sparsepack.formats.pack import Pack, read_pack
from sparsepack.formats.tensor_io import load_tensors
from sparsepack.layers.inject import attach_adapter, set_active_adapters, set_submodule
from sparsepack.layers.quantized_linear import QuantizedLinear
from sparsepack.layers.skeleton import materialize_buffers


@dataclass
class PackInfo:
    """Attached to a loaded model as ``model.sparsepack``: where it came from and what it holds."""

    pack: Pack
    active: list[str]


def _swap_quantized(model: nn.Module, pack: Pack) -> None:
    q = pack.quant
    for name in pack.quantized_modules:
        lin = model.get_submodule(name)
        has_bias = f"{name}.bias" in pack.tensors
        layer = QuantizedLinear(lin.in_features, lin.out_features, q["bits"], q["group_size"], bias=has_bias,
                                device="meta")  # fmt: skip
        set_submodule(model, name, layer)


def _default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def load(
    path: str | Path | Pack,
    adapter: str | list[str] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> nn.Module:
    """Load a pack (or GPTQ checkpoint / plain HF model directory) as a ready HF causal LM.

    Args:
        path: the directory, or a :class:`Pack` a command has already read (and verified, if it asked to):
            it is not opened or hashed again, and its checked meta model is reused.
        adapter: adapter name (or names) to activate; every adapter in the pack is loaded either way.
        device: where the model runs.
        dtype: compute dtype of the unquantized parameters (default fp32 on CPU, fp16 on CUDA); GPTQ
            buffers keep their stored dtypes.
        verify: check file hashes against the manifest (sizes and shapes are always checked).

    Returns:
        The ``transformers`` model in eval mode, with ``model.sparsepack`` (a :class:`PackInfo`).
    """
    device = torch.device(device)
    dtype = dtype or _default_dtype(device)
    if isinstance(path, Pack):
        pack = path
        if not pack.checked:
            raise ValueError(f"{pack.path}: read with check_config=False; the loader needs a checked pack")
    else:  # hashing goes on beside the loading (a second core); nothing is returned before it has passed
        pack = read_pack(Path(path), verify=verify, check_config=True, defer_verify=True)
    try:
        model = _build(pack, adapter, device, dtype)
    finally:
        pack.wait_verified()
    return model


def _build(pack: Pack, adapter: str | list[str] | None, device: torch.device, dtype: torch.dtype) -> nn.Module:
    model = pack.take_skeleton()
    state = load_tensors(pack.tensors)
    # the large unquantized tensors (the embedding) go to the compute dtype on a second thread while this one swaps
    # in the GPTQ layers: writing them is most of a CPU load's own time
    quantized = tuple(f"{n}." for n in pack.quantized_modules)
    big = {k: t for k, t in state.items() if t.is_floating_point() and t.dtype != dtype and t.numel() >= 1 << 20
           and not k.startswith(quantized)}  # fmt: skip
    with ThreadPoolExecutor(max_workers=1) as pool:
        converted = pool.submit(lambda: {k: t.to(dtype) for k, t in big.items()})
        if pack.quant is not None:
            _swap_quantized(model, pack)
        state.update(converted.result())
    if pack.quant is not None and pack.quant["checkpoint_format"] == "gptq_v2":
        for name in pack.quantized_modules:
            state[f"{name}.qzeros"] = gptq_layout.v2_to_v1_zeros(state[f"{name}.qzeros"], pack.quant["bits"])
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ShapeError("tensor is not part of the model", pack.path, result.unexpected_keys[0])
    model.tie_weights()
    materialize_buffers(model)
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing:
        raise ShapeError(f"{len(missing)} tensors missing from the checkpoint", pack.path, missing[0])
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue  # GPTQ buffers keep their layout dtypes
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != dtype:
                setattr(module, pname, nn.Parameter(p.to(dtype), requires_grad=False))
        for bname, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != dtype and "inv_freq" not in bname:
                module.register_buffer(
                    bname, b.to(dtype), persistent=bname not in module._non_persistent_buffers_set
                )
    model.tie_weights()
    model.requires_grad_(False)
    for name, ad in pack.adapters.items():
        attach_adapter(model, name, ad)
    model.to(device)
    set_active_adapters(model, adapter)
    active = [] if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    model.sparsepack = PackInfo(pack=pack, active=active)
    from sparsepack.runtime.adapters import install

    return install(model).eval()
