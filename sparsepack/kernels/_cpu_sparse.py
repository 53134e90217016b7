"""Numba kernels for the sparse ops on CPU (imported on first use; see ``_backend.kernel_module``).

Why numba: torch has no SDDMM that beats the dense GEMM on CPU (``torch.sparse.sampled_addmm`` costs ~8 ms at
any density on a 1536x576 layer, the dense ``dy.T @ x`` + gather ~2.6 ms), and its CSR matmul is fast for some
shapes and slow for others. The kernels below do the arithmetic on token-contiguous rows so that the inner loop
is a unit-stride vector loop:

* ``x`` and ``dy`` arrive token-major (``[T, features]``); one transpose each (``[features, T]``, done by torch,
  fused with the cast to fp32) makes every gathered column a contiguous row of T values.
* spmm walks CSR rows in blocks of ``_ROWS`` output rows and ``_TOKENS`` tokens: ``acc[r, :] += v * xT[c, :]``,
  then writes the block back token-major, so the output needs no separate transpose.
* spmm_t is spmm with the transposed CSR (a stable counting sort, O(nnz + in)).
* sddmm is one dot product of two T-long rows per stored entry, parallel over entries.

All kernels are compiled lazily on first call and cached on disk (``cache=True``); they take fp32 or fp64
arrays (fp16/bf16 go through fp32) and int32 indices. ``fastmath`` only allows reassociation and FMA
contraction (the vectorized reductions need it); NaN and inf propagate as usual.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sparsepack.kernels.sparse import csr_row_indices

_FASTMATH = {"reassoc", "contract"}
_JIT = dict(cache=True, fastmath=_FASTMATH, error_model="numpy")
_ROWS = 16  # output rows per spmm task: one 64-byte line of fp32 outputs per token on write-back
_TOKENS = 512  # tokens per spmm task: the accumulator block (_ROWS x _TOKENS fp32 = 32 KB) stays in L1/L2


@numba.njit(parallel=True, **_JIT)
def _spmm_kernel(xT, values, row_ptr, col_idx, y):  # pragma: no cover - compiled
    # y[t, r] = sum_j values[j] * xT[col_idx[j], t] over j in row r.  xT (in, T), y (T, out)
    T = xT.shape[1]
    n_out = y.shape[1]
    n_rb = (n_out + _ROWS - 1) // _ROWS
    n_tb = (T + _TOKENS - 1) // _TOKENS
    for task in numba.prange(n_rb * n_tb):
        r0 = (task // n_tb) * _ROWS
        r1 = min(n_out, r0 + _ROWS)
        t0 = (task % n_tb) * _TOKENS
        t1 = min(T, t0 + _TOKENS)
        acc = np.zeros((_ROWS, t1 - t0), dtype=y.dtype)  # (rows, tokens)
        for r in range(r0, r1):
            arow = acc[r - r0]
            for j in range(row_ptr[r], row_ptr[r + 1]):
                v = values[j]
                xrow = xT[col_idx[j], t0:t1]  # slices keep the inner loop free of index wrap-around checks
                for t in range(t1 - t0):
                    arow[t] += v * xrow[t]
        for t in range(t1 - t0):
            yrow = y[t0 + t, r0:r1]
            for i in range(r1 - r0):
                yrow[i] = acc[i, t]


@numba.njit(parallel=True, **_JIT)
def _sddmm_kernel(dyT, xT, row_idx, col_idx, out, n_chunks):  # pragma: no cover - compiled
    # out[i] = dot(dyT[row_idx[i]], xT[col_idx[i]]).  dyT (out, T), xT (in, T)
    nnz = out.shape[0]
    for c in numba.prange(n_chunks):
        for i in range(c * nnz // n_chunks, (c + 1) * nnz // n_chunks):
            drow = dyT[row_idx[i]]
            xrow = xT[col_idx[i]]
            s = out.dtype.type(0.0)
            for t in range(drow.shape[0]):
                s += drow[t] * xrow[t]
            out[i] = s


@numba.njit(**_JIT)
def _coo_to_csc_kernel(row_idx, col_idx, n_cols):  # pragma: no cover - compiled
    # Stable counting sort of entries by column: (col_ptr [n_cols + 1], perm [nnz]); entry k of the
    # column-sorted order is input entry perm[k], so row-sorted (CSR) input stays row-sorted per column.
    nnz = col_idx.shape[0]
    col_ptr = np.zeros(n_cols + 1, dtype=np.int32)
    for j in range(nnz):
        col_ptr[col_idx[j] + 1] += 1
    for c in range(n_cols):
        col_ptr[c + 1] += col_ptr[c]
    fill = col_ptr[:-1].copy()
    perm = np.empty(nnz, dtype=np.int32)
    for j in range(nnz):
        k = fill[col_idx[j]]
        fill[col_idx[j]] = k + 1
        perm[k] = j
    return col_ptr, perm


def coo_to_csc(row_idx: torch.Tensor, col_idx: torch.Tensor, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Column pointers and the permutation that sorts entries by column (O(nnz + n_cols))."""
    return _coo_to_csc_kernel(_int32(row_idx), _int32(col_idx), n_cols)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64 (gradcheck); everything else computes in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _transposed(a: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``[T, F]`` -> contiguous ``[F, T]`` numpy view in ``dtype`` (one copy: transpose and cast fused)."""
    out = torch.empty(a.shape[1], a.shape[0], dtype=dtype)
    return out.copy_(a.t()).numpy()  # (F, T); `.to(memory_format=...)` would return the strided view as is


def _int32(a: torch.Tensor) -> np.ndarray:
    return a.to(torch.int32).contiguous().numpy()


def spmm(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_out: int):
    """``x [T, in] @ S^T -> [T, out]`` for CSR ``S [out, in]``, in x's dtype."""
    dt = _compute_dtype(x, values)
    y = torch.empty(x.shape[0], n_out, dtype=dt)
    if x.shape[0] and n_out:
        _spmm_kernel(
            _transposed(x, dt), values.detach().to(dt).contiguous().numpy(), _int32(row_ptr), _int32(col_idx), y.numpy()
        )
    return y.to(x.dtype)


def spmm_t(dy: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_in: int):
    """``dy [T, out] @ S -> [T, in]`` for CSR ``S [out, in]``: spmm with the transposed CSR."""
    row_idx = csr_row_indices(row_ptr, col_idx.numel())
    col_ptr, perm = coo_to_csc(row_idx, col_idx, n_in)
    perm_t = torch.from_numpy(perm).long()
    return spmm(dy, values.detach()[perm_t], torch.from_numpy(col_ptr), row_idx[perm_t], n_in)


def sddmm(dy: torch.Tensor, x: torch.Tensor, row_idx: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    """``values[i] = sum_t dy[t, row_idx[i]] * x[t, col_idx[i]]`` -> ``[nnz]`` in dy's dtype."""
    dt = _compute_dtype(dy, x)
    out = torch.zeros(row_idx.shape[0], dtype=dt)
    if out.numel() and dy.shape[0]:
        n_chunks = min(out.numel(), 8 * numba.get_num_threads())  # a few chunks per thread for balance
        _sddmm_kernel(_transposed(dy, dt), _transposed(x, dt), _int32(row_idx), _int32(col_idx), out.numpy(), n_chunks)
    return out.to(dy.dtype)


@numba.njit(**_JIT)
def _correction_kernel(x, y, A, Bt, scaling, values, row_idx, col_idx):  # pragma: no cover - compiled
    # y[t] += scaling * B (A x[t]) + S x[t] in place, token by token.  x (T, in), y (T, out), A (r, in) and
    # Bt = B^T (r, out) (r = 0: no low-rank part), S as COO (row_idx, col_idx, values) (empty: no sparse part).
    T, n_out, r = x.shape[0], y.shape[1], A.shape[0]
    for t in range(T):
        xt, yt = x[t], y[t]
        for k in range(r):  # u_k = scaling * A_k . x, then y += u_k * B[:, k]: two unit-stride loops
            arow = A[k]
            s = y.dtype.type(0.0)
            for i in range(xt.shape[0]):
                s += arow[i] * xt[i]
            u = y.dtype.type(s * scaling)  # stay in y's dtype: a float64 u made the axpy below scalar
            brow = Bt[k]
            for o in range(n_out):
                yt[o] += brow[o] * u
        # one flat loop over the entries: rows average a few entries, so a per-row loop pays its setup per row
        for j in range(values.shape[0]):
            yt[row_idx[j]] += values[j] * xt[col_idx[j]]


def add_correction_(x, y, A, Bt, scaling, values, row_idx, col_idx) -> None:
    """``y [T, out] += scaling * (x A^T) Bt + x S^T`` in place for a few tokens, one compiled call.

    All arguments are numpy arrays of one float dtype (fp32 or fp64), ``x [T, in]`` and ``y`` C-contiguous;
    ``A [r, in]`` and ``Bt = B^T [r, out]`` with ``r = 0``, and empty ``values``/``row_idx``/``col_idx`` (int32
    COO), skip a part. Decode-sized inputs only: a token costs ``r * (in + out) + nnz`` multiply-adds in one
    thread, where the torch path pays the dispatch of five or six small ops per layer (its fixed cost
    dominates at T = 1).
    """
    _correction_kernel(x, y, A, Bt, scaling, values, row_idx, col_idx)
