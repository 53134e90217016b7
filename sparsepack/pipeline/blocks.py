"""Generic decoder-block traversal for layer-by-layer work (no file per architecture).

- :func:`find_blocks` locates the repeated decoder blocks: the ``nn.ModuleList`` holding the most linears.
- :func:`capture_block_inputs` runs the model up to the first block and records what that block receives
  (hidden states plus the keyword arguments the model passes: masks, rotary embeddings, positions).
- :func:`sequential_groups` discovers, by one probe forward, the order in which a block calls its linears
  and which of them read the same input tensor (q/k/v, gate/up): those share one Hessian.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (its work is done)."""


@dataclass
class BlockInput:
    """What one calibration batch feeds a decoder block."""

    hidden: torch.Tensor  # (b, T, hidden)
    kwargs: dict  # attention_mask, position_embeddings, position_ids, ...


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList whose children hold the most linear layers."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(isinstance(m, nn.Linear) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        _refuse_conv1d(model)
        raise ValueError(f"{type(model).__name__}: no repeated blocks of linear layers found")
    _refuse_conv1d(model)
    return best


def _refuse_conv1d(model: nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            raise ValueError(
                f"{name} is a GPT-2 style Conv1D layer (weight stored [in, out]); sparsepack quantizes "
                "nn.Linear layers only (Llama, Mistral, Qwen2, ... architectures)"
            )


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[BlockInput]:  # fmt: skip
    """Run ``model`` on ``windows`` (``[n, T]``) until ``block`` is called; record its inputs per batch."""
    captured: list[BlockInput] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append(BlockInput(hidden.detach(), kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the first decoder block was never called")
    return captured


def run_block(block: nn.Module, inputs: list[BlockInput]) -> Iterator[torch.Tensor]:
    """The block's output hidden states, batch by batch."""
    for inp in inputs:
        yield _first_tensor(block(inp.hidden, **inp.kwargs))


@torch.no_grad()
def sequential_groups(block: nn.Module, probe: BlockInput, names: list[str]) -> list[list[str]]:
    """Linears of ``block`` (relative ``names``) in call order, grouped by shared input tensor."""
    calls: list[tuple[str, int]] = []
    wanted = set(names)
    handles = []
    for name, module in block.named_modules():
        if name in wanted:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: calls.append((name, args[0].data_ptr()))))  # fmt: skip
    try:
        block(probe.hidden[:1], **_slice_kwargs(probe.kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last_ptr = None
    for name, ptr in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and ptr == last_ptr:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_ptr = ptr
    missing = wanted - seen
    if missing:  # never called in a forward (e.g. unused experts): quantize them last, on their own
        groups += [[n] for n in sorted(missing)]
    return groups


def _slice_kwargs(kwargs: dict, b: int) -> dict:
    """Keyword tensors cut to the first ``b`` batch rows (masks and rotary tables are batch-major)."""

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            return v[:b]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


@torch.no_grad()
def collect_inputs(block: nn.Module, inputs: list[BlockInput], module_names: list[str], on_input,
                   stop_after: str | None = None) -> None:  # fmt: skip
    """Call ``on_input(name, x)`` with the input of each named submodule, for every calibration batch.

    With ``stop_after``, each forward ends as soon as that module has received its input.
    """
    handles = []
    for name, module in block.named_modules():
        if name in module_names:

            def hook(_m, args, name=name):
                on_input(name, args[0])
                if name == stop_after:
                    raise _Stop

            handles.append(module.register_forward_pre_hook(hook))
    try:
        for inp in inputs:
            try:
                block(inp.hidden, **inp.kwargs)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
