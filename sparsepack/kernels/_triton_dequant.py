"""Fused GPTQ-v1 dequantize-and-multiply Triton kernels (CUDA; CPU only under ``TRITON_INTERPRET=1``).

Each program owns an output tile and walks the reduction dim; the weight tile ``W[k-block, n-block]`` is rebuilt
in registers from the packed words (bit-stream addressing, so 2/3/4/8 bits and act-order ``g_idx`` are one
code path) and fed to ``tl.dot``. No dense weight exists anywhere.

* forward ``x [M, K] @ W -> [M, N]``: tiles (M, N), loop over K.
* transposed ``dy [M, N] @ W^T -> [M, K]``: tiles (M, K), loop over N; the input gradient.

``tl.dot`` runs in the activation dtype on a GPU (fp16/bf16 tensor cores; fp32 in IEEE precision). The Triton
interpreter cannot multiply bf16 (numpy has no bf16), so under ``TRITON_INTERPRET=1`` tiles go through fp32.
"""

from __future__ import annotations

import torch

from sparsepack.kernels import _backend

triton, tl = _backend.import_triton()

_BLOCK_M, _BLOCK_N, _BLOCK_K = 32, 64, 64


@triton.jit
def _extract(lo_ptrs, step, off, mask, BITS: tl.constexpr):
    # b-bit unsigned value starting at bit `off` of the int32 word at lo_ptrs; the stream continues in the
    # word at lo_ptrs + step (next packed row of qweight, next packed column of qzeros).
    lo = tl.load(lo_ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True)
    off = off.to(tl.uint32)
    q = (lo >> off) & ((1 << BITS) - 1)
    if BITS == 3:  # values 10 and 21 of every 32 straddle two words
        straddle = off > 29
        hi = tl.load(lo_ptrs + step, mask=mask & straddle, other=0).to(tl.uint32, bitcast=True)
        shift = tl.where(straddle, 32 - off, 0).to(tl.uint32)
        q = tl.where(straddle, q | ((hi << shift) & ((1 << BITS) - 1)), q)
    return q.to(tl.int32)


@triton.jit
def _weight_tile(
    qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_sc, BITS: tl.constexpr
):
    # fp32 W[offs_k, offs_n] = scales[g, n] * (q[k, n] - (qzeros[g, n] + 1)), g = g_idx[k]; shape (BK, BN)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_n < N)[None, :]
    kbit = offs_k * BITS
    q = _extract(
        qw_ptr + (kbit // 32)[:, None] * stride_qw + offs_n[None, :], stride_qw, (kbit % 32)[:, None], mask, BITS
    )
    g = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
    nbit = offs_n * BITS
    z = _extract(qz_ptr + g[:, None] * stride_qz + (nbit // 32)[None, :], 1, (nbit % 32)[None, :], mask, BITS)
    s = tl.load(sc_ptr + g[:, None] * stride_sc + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return s * (q - (z + 1)).to(tl.float32)


@triton.jit
def _dot(a, w, acc, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
    return tl.dot(a, w.to(a.dtype), acc)


@triton.jit
def _matmul_kernel(
    a_ptr,
    qw_ptr,
    qz_ptr,
    sc_ptr,
    g_ptr,
    out_ptr,
    M,
    K,
    N,
    stride_am,
    stride_ak,
    stride_qw,
    stride_qz,
    stride_sc,
    stride_om,
    stride_on,
    BITS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out (M, N) = a (M, K) @ W (K, N)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_m < M)[:, None] & (offs_k < K)[None, :],
            other=0.0,
        )  # (BM, BK)
        w = _weight_tile(
            qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_sc, BITS
        )  # (BK, BN)
        acc = _dot(a, w, acc, DOT_F32)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _matmul_t_kernel(
    a_ptr,
    qw_ptr,
    qz_ptr,
    sc_ptr,
    g_ptr,
    out_ptr,
    M,
    K,
    N,
    stride_am,
    stride_an,
    stride_qw,
    stride_qz,
    stride_sc,
    stride_om,
    stride_ok,
    BITS: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # out (M, K) = a (M, N) @ W^T (N, K)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_n[None, :] * stride_an,
            mask=(offs_m < M)[:, None] & (offs_n < N)[None, :],
            other=0.0,
        )  # (BM, BN)
        w = _weight_tile(
            qw_ptr, qz_ptr, sc_ptr, g_ptr, offs_k, offs_n, K, N, stride_qw, stride_qz, stride_sc, BITS
        )  # (BK, BN)
        acc = _dot(a, tl.trans(w), acc, DOT_F32)
    mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, acc.to(out_ptr.dtype.element_ty), mask=mask
    )


def dequant_matmul(
    a: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    transpose: bool = False,
) -> torch.Tensor:
    """``a [M, K] @ W -> [M, N]``, or with ``transpose`` ``a [M, N] @ W^T -> [M, K]``, in a's dtype."""
    K, N = g_idx.numel(), scales.shape[1]
    M = a.shape[0]
    n_out = K if transpose else N
    out = torch.empty(M, n_out, dtype=a.dtype, device=a.device)
    if M == 0:
        return out
    qweight, qzeros, scales = qweight.contiguous(), qzeros.contiguous(), scales.contiguous()
    g_idx = g_idx.to(torch.int32).contiguous()
    dot_f32 = a.dtype not in (torch.float16, torch.bfloat16) or _backend.interpreting()  # fp64: via fp32
    kernel = _matmul_t_kernel if transpose else _matmul_kernel
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(n_out, _BLOCK_K if transpose else _BLOCK_N))
    kernel[grid](
        a,
        qweight,
        qzeros,
        scales,
        g_idx,
        out,
        M,
        K,
        N,
        a.stride(0),
        a.stride(1),
        qweight.stride(0),
        qzeros.stride(0),
        scales.stride(0),
        out.stride(0),
        out.stride(1),
        BITS=bits,
        DOT_F32=dot_f32,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_K=_BLOCK_K,
    )
    return out
