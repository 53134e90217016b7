"""CPU path of the GPTQ-v1 matmul: dequantize a block of input rows with numba, multiply with torch's GEMM.

A fused dequant-GEMM cannot beat MKL/oneDNN's GEMM at hundreds of tokens on CPU, so the fast path is: unpack
``_chunk_rows(K, N)`` input rows of ``W [K, N]`` into one reused fp32 buffer (a single parallel pass over the
packed words), then ``y += x[:, k0:k1] @ W[k0:k1]``. Peak extra memory is one chunk (at most
``_CHUNK_ELEMENTS`` floats), never a dense copy of the layer. Rows are read through ``g_idx``, so monotone and
act-order layouts take the same path. A layer that fits one chunk (every SmolLM2 layer) is one ``x @ W`` into a
fresh output, without the zero-fill and add; its dequantization goes parallel at a lower threshold than other
kernels, since its row chunks are equal, independent tasks (``_cpu_sparse.parallel``).

The same pass can add a sparse matrix into the chunk (``fold``): ``W[k, n] += S[n, k]``, which is how the
autograd layer gets ``x @ (W + S^T)`` for the price of the dequantization it does anyway.

Decoding (at most ``_GEMV_MAX_TOKENS`` tokens) is memory-bound instead: there a fused kernel reads the packed
words once and never writes a dense row to memory.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from sparsepack.kernels._backend import match_torch_threads
from sparsepack.kernels._cpu_sparse import JIT_OPTIONS, parallel

_CHUNK_ELEMENTS = 1 << 21  # 8 MB of fp32 per chunk: whole SmolLM2/7B-attention layers in one or a few chunks
_GEMV_MAX_TOKENS = 4  # up to this many tokens the fused kernel beats dequantize-then-GEMM
_GEMV_COLS = 256  # output columns per fused-kernel task


@numba.njit(**JIT_OPTIONS)
def _dequant_row(qweight, zeros, scales, g_idx, bits, k0, fold_ptr, fold_rows, fold_vals, out, i):  # pragma: no cover
    # out[i, n] = scales[g, n] * (q[k, n] - zeros[g, n]) + the folded entries of row k = k0 + i, g = g_idx[k].
    # qweight int32 (K*bits/32, N) is one little-endian bit stream per column; zeros/scales (G, N) float.
    n_cols = qweight.shape[1]
    mask = np.int32((1 << bits) - 1)
    ftype = out.dtype.type
    k = k0 + i
    bit = k * bits
    w = bit >> 5
    off = bit & 31
    g = g_idx[k]
    orow = out[i]
    lo = qweight[w]
    zrow = zeros[g]
    srow = scales[g]
    if off + bits <= 32:
        for n in range(n_cols):
            q = (lo[n] >> off) & mask  # arithmetic shift is fine: the kept bits are below 32 - off
            orow[n] = srow[n] * (ftype(q) - zrow[n])
    else:  # 3-bit values 10 and 21 of each 32-value block straddle two words
        hi = qweight[w + 1]
        low_bits = 32 - off
        for n in range(n_cols):
            q = ((lo[n] >> off) & ((1 << low_bits) - 1)) | ((hi[n] << low_bits) & mask)
            orow[n] = srow[n] * (ftype(q) - zrow[n])
    for e in range(fold_ptr[k], fold_ptr[k + 1]):
        orow[fold_rows[e]] += fold_vals[e]


@numba.njit(parallel=True, **JIT_OPTIONS)
def _dequant_parallel(qweight, zeros, scales, g_idx, bits, k0, fold_ptr, fold_rows, fold_vals, out):  # pragma: no cover
    for i in numba.prange(out.shape[0]):
        _dequant_row(qweight, zeros, scales, g_idx, bits, k0, fold_ptr, fold_rows, fold_vals, out, i)


@numba.njit(**JIT_OPTIONS)
def _dequant_serial(qweight, zeros, scales, g_idx, bits, k0, fold_ptr, fold_rows, fold_vals, out):  # pragma: no cover
    for i in range(out.shape[0]):
        _dequant_row(qweight, zeros, scales, g_idx, bits, k0, fold_ptr, fold_rows, fold_vals, out, i)


@numba.njit(**JIT_OPTIONS)
def _gemv_block(x, qweight, zeros, scales, g_idx, bits, out, b):  # pragma: no cover - compiled
    # Output columns [b * _GEMV_COLS, ...) of out (T, N) = x (T, K) @ W, W rebuilt one input row at a time in a
    # register-sized block of columns.
    T, K = x.shape
    n_cols = out.shape[1]
    mask = np.int32((1 << bits) - 1)
    ftype = out.dtype.type
    n0 = b * _GEMV_COLS
    n1 = min(n_cols, n0 + _GEMV_COLS)
    acc = np.zeros((T, n1 - n0), dtype=out.dtype)
    wrow = np.empty(n1 - n0, dtype=out.dtype)
    for k in range(K):
        bit = k * bits
        off = bit & 31
        g = g_idx[k]
        lo = qweight[bit >> 5, n0:n1]
        zrow = zeros[g, n0:n1]
        srow = scales[g, n0:n1]
        if off + bits <= 32:
            for n in range(n1 - n0):
                wrow[n] = srow[n] * (ftype((lo[n] >> off) & mask) - zrow[n])
        else:
            hi = qweight[(bit >> 5) + 1, n0:n1]
            low_bits = 32 - off
            for n in range(n1 - n0):
                q = ((lo[n] >> off) & ((1 << low_bits) - 1)) | ((hi[n] << low_bits) & mask)
                wrow[n] = srow[n] * (ftype(q) - zrow[n])
        for t in range(T):
            xv = x[t, k]
            arow = acc[t]
            for n in range(n1 - n0):
                arow[n] += xv * wrow[n]
    out[:, n0:n1] = acc


@numba.njit(parallel=True, **JIT_OPTIONS)
def _gemv_parallel(x, qweight, zeros, scales, g_idx, bits, out):  # pragma: no cover - compiled
    for b in numba.prange((out.shape[1] + _GEMV_COLS - 1) // _GEMV_COLS):
        _gemv_block(x, qweight, zeros, scales, g_idx, bits, out, b)


@numba.njit(**JIT_OPTIONS)
def _gemv_serial(x, qweight, zeros, scales, g_idx, bits, out):  # pragma: no cover - compiled
    for b in range((out.shape[1] + _GEMV_COLS - 1) // _GEMV_COLS):
        _gemv_block(x, qweight, zeros, scales, g_idx, bits, out, b)


@numba.njit(**JIT_OPTIONS)
def _unpack_cols_kernel(packed, bits, n_cols):  # pragma: no cover - compiled
    # int32 (G, n_cols*bits/32) packed along dim 1 -> int32 (G, n_cols); same bit stream as qweight.
    out = np.empty((packed.shape[0], n_cols), dtype=np.int32)
    mask = (1 << bits) - 1
    for g in range(packed.shape[0]):
        for n in range(n_cols):
            bit = n * bits
            w = bit >> 5
            off = bit & 31
            q = (packed[g, w] >> off) & mask
            if off + bits > 32:
                low_bits = 32 - off
                q = ((packed[g, w] >> off) & ((1 << low_bits) - 1)) | ((packed[g, w + 1] << low_bits) & mask)
            out[g, n] = q
    return out


def _chunk_rows(K: int, N: int) -> int:
    """Input rows per chunk: as many as fit in ``_CHUNK_ELEMENTS``, at least 64 (GEMM efficiency)."""
    return max(64, min(K, _CHUNK_ELEMENTS // max(N, 1)))


class Fold:
    """Sparse entries to add into ``W [K, N]`` while dequantizing: ``W[col, row] += value`` for ``S [N, K]``.

    Entries are grouped by ``col`` (``ptr [K + 1]``) so that each dequantized input row finds its own in
    ``ptr[k]:ptr[k+1]``; ``base_weight.SparseFold.by_input`` gives that layout (from a support's cached transpose).
    """

    def __init__(self, ptr: torch.Tensor, rows: torch.Tensor, values: torch.Tensor):
        self.ptr = ptr.to(torch.int32).contiguous().numpy()
        self.rows = rows.to(torch.int32).contiguous().numpy()
        self.vals = values.detach().contiguous().numpy()

    @staticmethod
    def empty(K: int, dtype) -> Fold:
        none = torch.zeros(0, dtype=torch.int32)
        return Fold(torch.zeros(K + 1, dtype=torch.int32), none, torch.zeros(0, dtype=dtype))


def dequantize_rows(qweight, zeros_f, scales_f, g_idx_np, bits, k0, out, fold: Fold) -> None:
    """Write rows ``[k0, k0 + out.shape[0])`` of the dense ``W`` into ``out`` (numpy, fp32 or fp64)."""
    kernel = _dequant_parallel if parallel("dequant", out.size) else _dequant_serial
    kernel(qweight, zeros_f, scales_f, g_idx_np, bits, k0, fold.ptr, fold.rows, fold.vals, out)


def dequant_matmul(
    a: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    transpose: bool = False,
    fold: Fold | None = None,
) -> torch.Tensor:
    """``a [T, K] @ W -> [T, N]``, or with ``transpose`` ``a [T, N] @ W^T -> [T, K]``, chunk by chunk.

    Args:
        a: 2-D activations (any float dtype; fp16/bf16 multiply in their own dtype after an fp32 dequant).
        qweight, qzeros, scales, g_idx, bits: the GPTQ-v1 tensors (see ``formats.gptq_layout``).
        transpose: compute the input-gradient product ``a @ W^T`` instead.
        fold: optional sparse ``S [N, K]`` to add as ``W + S^T``: a :class:`Fold` in the dequantizing dtype
            (fp64 for fp64 ``a``, else fp32).
    """
    K, N = g_idx.numel(), scales.shape[1]
    wdt = torch.float64 if a.dtype == torch.float64 else torch.float32
    match_torch_threads()
    zeros_f = torch.from_numpy(_unpack_cols_kernel(qzeros.contiguous().numpy(), bits, N)).to(wdt) + 1
    scales_f = scales.to(wdt).contiguous()
    qw = qweight.contiguous().numpy()
    g = g_idx.to(torch.int32).contiguous().numpy()
    if not transpose and fold is None and a.shape[0] <= _GEMV_MAX_TOKENS:
        out = torch.empty(a.shape[0], N, dtype=wdt)
        kernel = _gemv_parallel if parallel("gemv", a.shape[0] * K * N) else _gemv_serial
        kernel(a.to(wdt).contiguous().numpy(), qw, zeros_f.numpy(), scales_f.numpy(), g, bits, out.numpy())
        return out.to(a.dtype)
    want = np.float64 if wdt == torch.float64 else np.float32
    if fold is None:
        fold = Fold.empty(K, wdt)
    elif fold.vals.dtype != want or fold.ptr.shape[0] != K + 1:
        raise ValueError(f"fold has {fold.vals.dtype} values over {fold.ptr.shape[0] - 1} inputs, "
                         f"expected {np.dtype(want)} over {K}")  # fmt: skip
    rows = _chunk_rows(K, N)
    buf = torch.empty(min(rows, K), N, dtype=wdt)  # (rows, N) reused across chunks
    if rows >= K:  # one chunk (every SmolLM2 layer): the GEMM writes the output itself, no zero-fill and add
        dequantize_rows(qw, zeros_f.numpy(), scales_f.numpy(), g, bits, 0, buf.numpy(), fold)
        w = buf if a.dtype == wdt else buf.to(a.dtype)  # (K, N)
        return a @ w.t() if transpose else a @ w
    out = torch.zeros(a.shape[0], K if transpose else N, dtype=a.dtype)
    for k0 in range(0, K, rows):
        k1 = min(K, k0 + rows)
        chunk = buf[: k1 - k0]
        dequantize_rows(qw, zeros_f.numpy(), scales_f.numpy(), g, bits, k0, chunk.numpy(), fold)
        w = chunk if a.dtype == wdt else chunk.to(a.dtype)  # (k1 - k0, N)
        if transpose:
            out[:, k0:k1] = a @ w.t()  # (T, k1 - k0)
        else:
            out.addmm_(a[:, k0:k1], w)
    return out
