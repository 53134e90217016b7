"""Numba kernels for the sparse ops on CPU (imported on first use; see ``_backend.kernel_module``).

Why numba: torch has no SDDMM that beats the dense GEMM on CPU (``torch.sparse.sampled_addmm`` is slower than the
dense ``dy.T @ x`` + gather at any density), and its CSR matmul is fast for some shapes and slow for others. The
kernels below do the arithmetic on token-contiguous rows so that the inner loop is a unit-stride vector loop:

* ``x`` and ``dy`` arrive token-major (``[T, features]``). Both ops walk the tokens in blocks of 64
  (``_SPMM_TOKENS``, ``_SDDMM_TOKENS``): each block's rows are transposed (SIMD 8 x 8 blocks from
  ``_cpu_transpose``) into small feature-major buffers that stay in L2, so every gathered column is a contiguous
  row of 64 values. Blocks are the parallel tasks, so the transposes run in parallel too. This beats
  transposing whole inputs first (through memory, on one thread) and then walking T-long rows
  (``docs/BENCHMARKS.md``, Kernels).
* spmm runs the CSR rows of ``S`` over the block, ``_ROWS`` output rows at a time into an accumulator
  ``acc[r, :] += v * xb[c, :]``, and writes each accumulator back token-major (SIMD 8 x 8 transposes), so the
  output needs no separate transpose. Blocks write disjoint token rows. ``add_spmm_arrays_`` adds into an
  existing output instead (inference: the base's product, no buffer and no extra pass).
* spmm_t is spmm with the transposed CSR (a stable counting sort, O(nnz + in)).
* sddmm takes one dot product of two block-long rows per stored entry and block, into per-block partial sums
  added in block order (so serial and parallel results are the same bits).

Each parallel kernel is a per-task body with two drivers, ``*_parallel`` (``prange``) and ``*_serial``; a call
takes the serial one when its estimated serial time is short (see ``parallel``), because waking numba's
threads costs more than such calls compute. numba runs as many threads as torch (``match_torch_threads``).

All kernels are compiled lazily on first call and cached on disk (``cache=True``); they take fp32 or fp64
arrays (fp16/bf16 go through fp32) and int32 indices. ``fastmath`` only allows reassociation and FMA
contraction (the vectorized reductions need it); NaN and inf propagate as usual.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sparsepack.kernels._backend import match_torch_threads
from sparsepack.kernels._cpu_transpose import transpose_rows_into, write_back
from sparsepack.kernels.sparse import csr_row_indices

_FASTMATH = {"reassoc", "contract"}
JIT_OPTIONS = dict(cache=True, fastmath=_FASTMATH, error_model="numpy")
_ROWS = 16  # output rows per spmm accumulator: one 64-byte line of fp32 outputs per token on write-back
_SPMM_TOKENS = 64  # tokens per spmm block: in x 64 fp32 transposed inputs, in L2 (32 and 128: slower)
_SDDMM_TOKENS = 64  # tokens per sddmm block: (out + in) x 64 fp32 transposed values, in L2 (32 and 128: slower)
# Serial nanoseconds per unit of work (multiply-add, dequantized weight) of each kernel, and the estimated serial
# time below which a call runs on the calling thread: waking numba's sleeping workqueue threads costs more than
# short calls compute. sddmm stays below it in training (its parallel driver was slower inside a training step);
# spmm and the dequantization split into equal, independent tasks, so they go parallel sooner. Figures in
# docs/BENCHMARKS.md, Kernels.
_NS_PER_UNIT = {"spmm": 0.2, "sddmm": 0.18, "dequant": 0.18, "gemv": 0.22}
_PARALLEL_MIN_NS = 500_000
_PARALLEL_MIN_NS_BY_KERNEL = {"spmm": 100_000, "dequant": 50_000}


def parallel(kernel: str, units: int) -> bool:
    """Whether a call of ``kernel`` doing ``units`` of work should take its parallel driver."""
    floor = _PARALLEL_MIN_NS_BY_KERNEL.get(kernel, _PARALLEL_MIN_NS)
    return units * _NS_PER_UNIT[kernel] >= floor and torch.get_num_threads() > 1


@numba.njit(**JIT_OPTIONS)
def _blocks(a, tokens):  # pragma: no cover - compiled
    return (a.shape[0] + tokens - 1) // tokens


@numba.njit(**JIT_OPTIONS)
def _spmm_scratch(x, tokens, rows):  # pragma: no cover - compiled
    # (in, tokens): one block's rows of x, transposed; (rows, tokens): the accumulator of `rows` outputs
    return np.empty((x.shape[1], tokens), dtype=x.dtype), np.empty((rows, tokens), dtype=x.dtype)


@numba.njit(**JIT_OPTIONS)
def _spmm_task(x, values, row_ptr, col_idx, y, tokens, b, accumulate, xb, acc):  # pragma: no cover - compiled
    # Block b of spmm: y[t, r] (+)= sum_j values[j] * x[t, col_idx[j]] over j in row r, for every output row r
    # and the tokens t of block b.  x (T, in), y (T, out); xb, acc: scratch from _spmm_scratch
    rows = acc.shape[0]
    t0 = b * tokens
    n = min(tokens, x.shape[0] - t0)
    transpose_rows_into(x, t0, n, xb)
    for r0 in range(0, y.shape[1], rows):
        r1 = min(y.shape[1], r0 + rows)
        for r in range(r0, r1):
            arow = acc[r - r0]
            for t in range(n):
                arow[t] = 0.0
            for j in range(row_ptr[r], row_ptr[r + 1]):
                v = values[j]
                xrow = xb[col_idx[j]]
                for t in range(n):
                    arow[t] += v * xrow[t]
        write_back(acc, r1 - r0, n, y, r0, t0, accumulate)  # token-major, through 8 x 8 SIMD transposes


@numba.njit(parallel=True, **JIT_OPTIONS)
def _spmm_parallel(x, values, row_ptr, col_idx, y, tokens, accumulate):  # pragma: no cover - compiled
    for b in numba.prange(_blocks(x, tokens)):  # blocks write disjoint token rows of y
        xb, acc = _spmm_scratch(x, tokens, _ROWS)
        _spmm_task(x, values, row_ptr, col_idx, y, tokens, b, accumulate, xb, acc)


@numba.njit(**JIT_OPTIONS)
def _spmm_serial(x, values, row_ptr, col_idx, y, tokens, accumulate):  # pragma: no cover - compiled
    xb, acc = _spmm_scratch(x, tokens, _ROWS)
    for b in range(_blocks(x, tokens)):
        _spmm_task(x, values, row_ptr, col_idx, y, tokens, b, accumulate, xb, acc)


def _spmm_kernel(x, values, row_ptr, col_idx, y, accumulate) -> None:
    kernel = _spmm_parallel if parallel("spmm", values.shape[0] * x.shape[0]) else _spmm_serial
    kernel(x, values, row_ptr, col_idx, y, _SPMM_TOKENS, accumulate)


@numba.njit(**JIT_OPTIONS)
def _sddmm_scratch(dy, x, tokens):  # pragma: no cover - compiled
    # (out, tokens) and (in, tokens): one block's rows of dy and x, transposed
    return np.empty((dy.shape[1], tokens), dtype=dy.dtype), np.empty((x.shape[1], tokens), dtype=x.dtype)


@numba.njit(**JIT_OPTIONS)
def _sddmm_task(dy, x, row_idx, col_idx, out, tokens, b, accumulate, dyb, xb):  # pragma: no cover - compiled
    # out[i] (+)= sum over the tokens t of block b of dy[t, row_idx[i]] * x[t, col_idx[i]].  dy (T, out), x (T, in);
    # dyb, xb: scratch from _sddmm_scratch
    t0 = b * tokens
    n = min(tokens, dy.shape[0] - t0)
    transpose_rows_into(dy, t0, n, dyb)
    transpose_rows_into(x, t0, n, xb)
    for i in range(out.shape[0]):
        drow = dyb[row_idx[i]]
        xrow = xb[col_idx[i]]
        s = out.dtype.type(0.0)
        for t in range(n):
            s += drow[t] * xrow[t]
        out[i] = out[i] + s if accumulate else s


@numba.njit(parallel=True, **JIT_OPTIONS)
def _sddmm_parallel(dy, x, row_idx, col_idx, out, tokens):  # pragma: no cover - compiled
    nb = _blocks(dy, tokens)
    parts = np.empty((nb, out.shape[0]), dtype=out.dtype)
    for b in numba.prange(nb):
        dyb, xb = _sddmm_scratch(dy, x, tokens)
        _sddmm_task(dy, x, row_idx, col_idx, parts[b], tokens, b, False, dyb, xb)
    out[:] = parts[0]
    for b in range(1, nb):  # block order, as the serial driver adds them
        for i in range(out.shape[0]):
            out[i] = out[i] + parts[b, i]


@numba.njit(**JIT_OPTIONS)
def _sddmm_serial(dy, x, row_idx, col_idx, out, tokens):  # pragma: no cover - compiled
    dyb, xb = _sddmm_scratch(dy, x, tokens)  # once: the blocks run one after another
    for b in range(_blocks(dy, tokens)):
        _sddmm_task(dy, x, row_idx, col_idx, out, tokens, b, b > 0, dyb, xb)


@numba.njit(**JIT_OPTIONS)
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


def _contiguous(a: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``a`` as a C-contiguous numpy array in ``dtype`` (no copy when it already is one)."""
    return a.detach().to(dtype).contiguous().numpy()


def _int32(a: torch.Tensor) -> np.ndarray:
    return a.to(torch.int32).contiguous().numpy()


def spmm(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_out: int):
    """``x [T, in] @ S^T -> [T, out]`` for CSR ``S [out, in]``, in x's dtype."""
    dt = _compute_dtype(x, values)
    y = torch.empty(x.shape[0], n_out, dtype=dt)
    if x.shape[0] and n_out:
        match_torch_threads()
        _spmm_kernel(_contiguous(x, dt), _contiguous(values, dt), _int32(row_ptr), _int32(col_idx), y.numpy(), False)
    return y.to(x.dtype)


def add_spmm_arrays_(x: np.ndarray, y: np.ndarray, values: np.ndarray, row_ptr: np.ndarray,
                     col_idx: np.ndarray) -> None:  # fmt: skip
    """``y [T, out] += x [T, in] @ S^T`` in place (inference, many tokens): the product of :func:`spmm` without
    its output buffer, cast and extra add, on numpy arrays the caller keeps (fp32 or fp64 ``x`` and ``y``
    C-contiguous, ``values`` in their dtype, int32 CSR ``row_ptr``/``col_idx``); no per-call conversions."""
    if not (y.flags.c_contiguous and x.flags.c_contiguous):
        raise ValueError(f"add_spmm_arrays_: x and y must be C-contiguous, got strides {x.strides} and {y.strides}")
    if x.shape[0] and y.shape[1]:
        match_torch_threads()
        _spmm_kernel(x, values, row_ptr, col_idx, y, True)


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
        match_torch_threads()
        kernel = _sddmm_parallel if parallel("sddmm", out.numel() * dy.shape[0]) else _sddmm_serial
        kernel(_contiguous(dy, dt), _contiguous(x, dt), _int32(row_idx), _int32(col_idx), out.numpy(),
               _SDDMM_TOKENS)  # fmt: skip
    return out.to(dy.dtype)


@numba.njit(**JIT_OPTIONS)
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
