"""Triton kernel for the streamed Fisher update (CUDA; CPU only under ``TRITON_INTERPRET=1``).

Each program computes one ``dW = dy^T x`` tile of ``[BLOCK_O, BLOCK_I]`` over all tokens with ``tl.dot`` and
folds its square into the state tile in place; the dense ``dW`` never reaches memory. bf16 states are rounded
stochastically with ``tl.randint`` noise in the 16 dropped bits (the same rule as ``fisher.round_stochastic``).
"""

from __future__ import annotations

import torch

from sparsepack.kernels import _backend

triton, tl = _backend.import_triton()

_BLOCK_O, _BLOCK_I, _BLOCK_T = 32, 32, 32


@triton.jit
def _fisher_kernel(
    dy_ptr,
    x_ptr,
    m_ptr,
    T,
    n_out,
    n_in,
    inv_n,
    seed,
    stride_dt,
    stride_do,
    stride_xt,
    stride_xi,
    stride_mo,
    stride_mi,
    STOCHASTIC: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        a = tl.load(
            dy_ptr + offs_t[None, :] * stride_dt + offs_o[:, None] * stride_do,
            mask=mask_t[None, :] & (offs_o < n_out)[:, None],
            other=0.0,
        ).to(tl.float32)  # (BO, BT)
        b = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + offs_i[None, :] * stride_xi,
            mask=mask_t[:, None] & (offs_i < n_in)[None, :],
            other=0.0,
        ).to(tl.float32)  # (BT, BI)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    mask = (offs_o < n_out)[:, None] & (offs_i < n_in)[None, :]
    ptrs = m_ptr + offs_o[:, None] * stride_mo + offs_i[None, :] * stride_mi
    m = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    new = m + (acc * acc - m) * inv_n
    if STOCHASTIC:
        lin = offs_o[:, None] * n_in + offs_i[None, :]
        noise = (tl.randint(seed, lin) & 0xFFFF).to(tl.int32)
        new = ((new.to(tl.int32, bitcast=True) + noise) & -65536).to(tl.float32, bitcast=True)
    tl.store(ptrs, new.to(m_ptr.dtype.element_ty), mask=mask)


def fisher_update(state, dy: torch.Tensor, x: torch.Tensor) -> None:
    """One running-mean update of ``state.mean`` from ``dy [T, out]`` and ``x [T, in]`` (count not changed)."""
    n_out, n_in = state.mean.shape
    seed = 0
    if state.rounds_stochastically:
        gen = state.generator
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen, device=gen.device if gen else "cpu"))
    grid = (triton.cdiv(n_out, _BLOCK_O), triton.cdiv(n_in, _BLOCK_I))
    _fisher_kernel[grid](
        dy,
        x,
        state.mean,
        dy.shape[0],
        n_out,
        n_in,
        1.0 / (state.count + 1),
        seed,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        state.mean.stride(0),
        state.mean.stride(1),
        STOCHASTIC=state.rounds_stochastically,
        BLOCK_O=_BLOCK_O,
        BLOCK_I=_BLOCK_I,
        BLOCK_T=_BLOCK_T,
    )
