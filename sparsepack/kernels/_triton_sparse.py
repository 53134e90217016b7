"""Triton kernels for the sparse ops (CUDA; on CPU only under ``TRITON_INTERPRET=1``, as the tests run them).

* spmm, CSR row kernel: one program per (output row, block of tokens) walks the row's entries in blocks of
  ``BLOCK_NZ``, gathers ``x[tokens, cols]`` and reduces over the entries. Rows of any length, no atomics.
* spmm_t: spmm with the transposed CSR, built by a stable sort of the entries by column (deterministic, unlike
  scattering with atomics).
* sddmm, structure-aware: one program per block of consecutive entries. CSR order keeps most of a block in one
  or two rows, so the ``dy[tokens, rows]`` gathers hit the same lines; the reduction runs over token blocks.

Strides are passed explicitly, so non-contiguous activations need no copy. Accumulation is fp32; outputs are
cast to the activation dtype.
"""

from __future__ import annotations

import torch

from sparsepack.kernels import _backend
from sparsepack.kernels.sparse import csr_row_indices

triton, tl = _backend.import_triton()

_BLOCK_T = 64  # tokens per program (spmm) / per reduction step (sddmm)
_BLOCK_NZ = 32  # stored entries per step


@triton.jit
def _spmm_kernel(
    x_ptr,
    val_ptr,
    row_ptr,
    col_ptr,
    y_ptr,
    T,
    stride_xt,
    stride_xc,
    stride_yt,
    stride_yc,
    BLOCK_T: tl.constexpr,
    BLOCK_NZ: tl.constexpr,
):
    # y[t, r] = sum_{j in row r} val[j] * x[t, col[j]];  x (T, in), y (T, out)
    r = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_NZ):
        offs_j = j0 + tl.arange(0, BLOCK_NZ)
        mask_j = offs_j < end
        cols = tl.load(col_ptr + offs_j, mask=mask_j, other=0)
        vals = tl.load(val_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)
        xs = tl.load(
            x_ptr + offs_t[:, None] * stride_xt + cols[None, :] * stride_xc,
            mask=mask_t[:, None] & mask_j[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_T, BLOCK_NZ)
        acc += tl.sum(xs * vals[None, :], axis=1)
    tl.store(y_ptr + offs_t * stride_yt + r * stride_yc, acc.to(y_ptr.dtype.element_ty), mask=mask_t)


@triton.jit
def _sddmm_kernel(
    dy_ptr,
    x_ptr,
    row_ptr,
    col_ptr,
    out_ptr,
    T,
    nnz,
    stride_dt,
    stride_dc,
    stride_xt,
    stride_xc,
    BLOCK_T: tl.constexpr,
    BLOCK_NZ: tl.constexpr,
):
    # out[i] = sum_t dy[t, row[i]] * x[t, col[i]] for the BLOCK_NZ entries of this program
    offs_j = tl.program_id(0) * BLOCK_NZ + tl.arange(0, BLOCK_NZ)
    mask_j = offs_j < nnz
    rows = tl.load(row_ptr + offs_j, mask=mask_j, other=0)
    cols = tl.load(col_ptr + offs_j, mask=mask_j, other=0)
    acc = tl.zeros((BLOCK_NZ,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        m = (offs_t < T)[:, None] & mask_j[None, :]
        a = tl.load(dy_ptr + offs_t[:, None] * stride_dt + rows[None, :] * stride_dc, mask=m, other=0.0)
        b = tl.load(x_ptr + offs_t[:, None] * stride_xt + cols[None, :] * stride_xc, mask=m, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=0)  # (BLOCK_NZ,)
    tl.store(out_ptr + offs_j, acc.to(out_ptr.dtype.element_ty), mask=mask_j)


def spmm(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_out: int):
    """``x [T, in] @ S^T -> [T, out]`` for CSR ``S [out, in]``."""
    T = x.shape[0]
    y = torch.empty(T, n_out, dtype=x.dtype, device=x.device)
    if T == 0 or n_out == 0:
        return y
    grid = (n_out, triton.cdiv(T, _BLOCK_T))
    _spmm_kernel[grid](
        x,
        values.detach().contiguous(),
        row_ptr.to(torch.int32).contiguous(),
        col_idx.to(torch.int32).contiguous(),
        y,
        T,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        BLOCK_T=_BLOCK_T,
        BLOCK_NZ=_BLOCK_NZ,
    )
    return y


def spmm_t(dy: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_in: int):
    """``dy [T, out] @ S -> [T, in]``: spmm with the CSR of ``S^T``."""
    rows = csr_row_indices(row_ptr, col_idx.numel())
    perm = torch.argsort(col_idx, stable=True)  # rows stay sorted within each column
    counts = torch.bincount(col_idx.long(), minlength=n_in)
    col_ptr = torch.zeros(n_in + 1, dtype=torch.int32, device=dy.device)
    col_ptr[1:] = torch.cumsum(counts, 0)
    return spmm(dy, values.detach()[perm], col_ptr, rows[perm], n_in)


def sddmm(dy: torch.Tensor, x: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    """``values[i] = sum_t dy[t, row_idx[i]] * x[t, col_idx[i]]`` -> ``[nnz]`` in dy's dtype."""
    nnz = row_idx.numel()
    out = torch.zeros(nnz, dtype=dy.dtype, device=dy.device)
    if nnz == 0 or dy.shape[0] == 0:
        return out
    grid = (triton.cdiv(nnz, _BLOCK_NZ),)
    _sddmm_kernel[grid](
        dy,
        x,
        row_idx.to(torch.int32).contiguous(),
        col_idx.to(torch.int32).contiguous(),
        out,
        dy.shape[0],
        nnz,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        BLOCK_T=_BLOCK_T,
        BLOCK_NZ=_BLOCK_NZ,
    )
    return out
