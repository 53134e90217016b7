"""Streamed diagonal-Fisher estimate of one linear layer, for RoSA's support selection.

RoSA scores every weight by the mean, over the micro-batches of one optimizer step, of its squared dense gradient
``dW = dy^T x`` and keeps the per-layer top-k. The reference code keeps a full-model fp32 accumulator (6.5 GB of
masks alone for a 7B model). Here each layer owns a :class:`FisherState` that is updated from the layer's own
``dy [..., out]`` and ``x [..., in]`` as each micro-batch's backward passes, so no gradient tensor is ever stored:

    mean <- mean + (dW**2 - mean) / (count + 1)

A running mean (rather than a sum) keeps values at the scale of one squared gradient, which is what makes a
bf16 accumulator usable; bf16 states are rounded stochastically by default so that the rounding is unbiased
(round-to-nearest would silently drop updates below half an ulp, ~0.4% of the mean). fp16 is refused: squared
gradients underflow its range.

The CPU path computes ``dW`` a block of output rows at a time (one ``[rows, in]`` fp32 temporary of at most
``_CHUNK_ELEMENTS``); the Triton kernel computes each ``dW`` tile in registers and updates the state in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparsepack.kernels import _backend

_CHUNK_ELEMENTS = 1 << 21
_STATE_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class FisherState:
    """Running mean of the squared dense weight gradient of one ``nn.Linear``-shaped weight."""

    mean: torch.Tensor  # [out, in], fp32 or bf16 (half the memory)
    count: int = 0  # micro-batches accumulated so far
    stochastic_rounding: bool = True  # unbiased rounding of bf16 states (ignored for fp32)
    generator: torch.Generator | None = field(default=None, repr=False)  # noise source for the rounding

    @classmethod
    def zeros(
        cls,
        out_features: int,
        in_features: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        stochastic_rounding: bool = True,
    ) -> FisherState:
        """A fresh state; ``dtype`` is the accumulation precision (fp32 or bf16)."""
        if dtype not in _STATE_DTYPES:
            raise ValueError(f"FisherState accumulates in {_STATE_DTYPES}, got {dtype}")
        mean = torch.zeros(out_features, in_features, dtype=dtype, device=device)
        return cls(mean, 0, stochastic_rounding)

    @property
    def rounds_stochastically(self) -> bool:
        return self.stochastic_rounding and self.mean.dtype != torch.float32


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16 with probability of rounding up proportional to the dropped fraction (unbiased).

    Adds uniform noise to the 16 bits that bf16 drops, then truncates them; exact for values bf16 holds.
    """
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _update(mean_rows: torch.Tensor, dW: torch.Tensor, count: int, state: FisherState) -> None:
    """``mean_rows <- mean_rows + (dW**2 - mean_rows) / (count + 1)`` in fp32, rounded once into the state."""
    m = mean_rows.float()
    new = m + (dW * dW - m) / (count + 1)
    if state.rounds_stochastically:
        mean_rows.copy_(round_stochastic(new, mean_rows.dtype, state.generator))
    else:
        mean_rows.copy_(new)


def _flatten(state: FisherState, dy: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = state.mean.shape
    if dy.shape[-1] != out_f or x.shape[-1] != in_f or dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} do not fit a [{out_f}, {in_f}] weight")
    return dy.reshape(-1, out_f), x.reshape(-1, in_f)


def fisher_accumulate_reference(state: FisherState, dy: torch.Tensor, x: torch.Tensor) -> FisherState:
    """Plain torch: the whole ``dW = dy^T x`` in fp32, then one running-mean update. Mutates and returns state."""
    dy2, x2 = _flatten(state, dy, x)
    _update(state.mean, dy2.t().float() @ x2.float(), state.count, state)
    state.count += 1
    return state


def _accumulate_chunked(state: FisherState, dy2: torch.Tensor, x2: torch.Tensor) -> None:
    out_f, in_f = state.mean.shape
    rows = max(1, min(out_f, _CHUNK_ELEMENTS // max(in_f, 1)))
    dyf, xf = dy2.float(), x2.float()
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        _update(state.mean[r0:r1], dyf[:, r0:r1].t() @ xf, state.count, state)  # dW rows (r1 - r0, in)


def fisher_accumulate(state: FisherState, dy: torch.Tensor, x: torch.Tensor, *, backend: str | None = None):
    """Add one micro-batch to a layer's running mean of squared dense weight gradients.

    Args:
        state: the layer's :class:`FisherState` (mutated in place and returned).
        dy: gradient of the layer output ``[..., out]`` for this micro-batch.
        x: layer input ``[..., in]`` for this micro-batch.
        backend: ``reference``, ``cpu`` or ``triton``; None picks by device.

    Returns:
        ``state``, with ``count`` incremented.
    """
    dy2, x2 = _flatten(state, dy, x)
    chosen = _backend.resolve(dy.device, backend)
    if chosen == "reference":
        return fisher_accumulate_reference(state, dy, x)
    if chosen == "triton":
        _backend.kernel_module("_triton_fisher").fisher_update(state, dy2, x2)
    else:
        _accumulate_chunked(state, dy2, x2)
    state.count += 1
    return state
