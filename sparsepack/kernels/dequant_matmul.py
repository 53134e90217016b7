"""``x @ W`` and ``dy @ W^T`` for a GPTQ-v1 quantized weight ``W [K, N]`` (input dim first).

Layout (see ``formats.gptq_layout``): ``qweight`` int32 ``[K * bits / 32, N]``, ``qzeros`` int32
``[G, N * bits / 32]`` holding zero-1, ``scales`` fp16 ``[G, N]``, ``g_idx`` int32 ``[K]`` (non-monotone under
act-order); ``W[k, n] = scales[g, n] * (q[k, n] - (qzeros[g, n] + 1))`` with ``g = g_idx[k]``.

``dequant_matmul_reference`` / ``dequant_matmul_t_reference`` are the plain-torch definitions every faster path
is tested against. The dispatchers pick, per device (``_backend``):

* ``cpu``: dequantize a chunk of input rows at a time with numba and multiply with torch's GEMM
  (``_cpu_dequant``); never more than one chunk of dense weight alive.
* ``triton``: a fused dequantize-and-multiply kernel (``_triton_dequant``); no dense weight at all.

Both are differentiable in the activations (the weight is frozen): ``QuantizedLinear`` passes gradients on.
"""

from __future__ import annotations

import torch

from sparsepack.kernels import _backend, packing

_FAST = {"cpu": "_cpu_dequant", "triton": "_triton_dequant"}  # backend -> module with dequant_matmul(...)


def dequantize_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """GPTQ-v1 tensors -> dense ``W [K, N]``: ``scales[g, n] * (q[k, n] - (qzeros[g, n] + 1))``."""
    q = packing.unpack_rows(qweight, bits)  # (K, N)
    zeros = packing.unpack_cols(qzeros, bits) + 1  # (G, N)
    g = g_idx.long()
    return scales.to(dtype)[g] * (q.to(dtype) - zeros.to(dtype)[g])


def dequant_matmul_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """``x [..., K] @ W [K, N] -> [..., N]`` computed in x's dtype."""
    return x @ dequantize_reference(qweight, qzeros, scales, g_idx, bits, x.dtype)


def dequant_matmul_t_reference(
    dy: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """``dy [..., N] @ W^T -> [..., K]`` computed in dy's dtype (the input gradient of ``x @ W``)."""
    return dy @ dequantize_reference(qweight, qzeros, scales, g_idx, bits, dy.dtype).t()


def _check(a: torch.Tensor, qweight, scales, g_idx, bits: int, features: int, name: str) -> None:
    packing._check_bits(bits)
    K, N = g_idx.numel(), scales.shape[1]
    if qweight.shape != (K * bits // 32, N):
        raise ValueError(f"qweight {tuple(qweight.shape)} does not match K={K}, N={N} at {bits} bits")
    if a.shape[-1] != features:
        raise ValueError(f"{name} has {a.shape[-1]} features in its last dim, expected {features}")


def _run(a, qweight, qzeros, scales, g_idx, bits, transpose: bool, backend: str) -> torch.Tensor:
    """The fast kernel on 2-D activations (no autograd)."""
    n_in, n_out = (scales.shape[1], g_idx.numel()) if transpose else (g_idx.numel(), scales.shape[1])
    mod = _backend.kernel_module(_FAST[backend])
    out = mod.dequant_matmul(a.reshape(-1, n_in), qweight, qzeros, scales, g_idx, bits, transpose=transpose)
    return out.reshape(*a.shape[:-1], n_out)


class _DequantMatmul(torch.autograd.Function):
    """Differentiable in the activations: the gradient of ``a @ W`` is ``g @ W^T`` and vice versa."""

    @staticmethod
    def forward(ctx, a, qweight, qzeros, scales, g_idx, bits, transpose, backend):
        ctx.save_for_backward(qweight, qzeros, scales, g_idx)
        ctx.bits, ctx.transpose, ctx.backend = bits, transpose, backend
        return _run(a, qweight, qzeros, scales, g_idx, bits, transpose, backend)

    @staticmethod
    def backward(ctx, g):
        # the backward is itself a _DequantMatmul, so double backward works too
        grad = _DequantMatmul.apply(g, *ctx.saved_tensors, ctx.bits, not ctx.transpose, ctx.backend)
        return grad, None, None, None, None, None, None, None


def _dispatch(a, qweight, qzeros, scales, g_idx, bits, transpose: bool, backend: str | None) -> torch.Tensor:
    K, N = g_idx.numel(), scales.shape[1]
    _check(a, qweight, scales, g_idx, bits, N if transpose else K, "dy" if transpose else "x")
    chosen = _backend.resolve(a.device, backend)
    if chosen == "reference":
        ref = dequant_matmul_t_reference if transpose else dequant_matmul_reference
        return ref(a, qweight, qzeros, scales, g_idx, bits)
    if torch.is_grad_enabled() and a.requires_grad:
        return _DequantMatmul.apply(a, qweight, qzeros, scales, g_idx, bits, transpose, chosen)
    return _run(a, qweight, qzeros, scales, g_idx, bits, transpose, chosen)


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``x [..., K] @ W [K, N] -> [..., N]`` in x's dtype, without keeping a dense copy of ``W``.

    Args:
        x: activations ``[..., K]``.
        qweight, qzeros, scales, g_idx, bits: the GPTQ-v1 tensors (module docstring).
        backend: ``reference``, ``cpu`` or ``triton``; None picks by device (see ``_backend.resolve``).
    """
    return _dispatch(x, qweight, qzeros, scales, g_idx, bits, False, backend)


def dequant_matmul_t(
    dy: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``dy [..., N] @ W^T -> [..., K]`` in dy's dtype: the input gradient of :func:`dequant_matmul`."""
    return _dispatch(dy, qweight, qzeros, scales, g_idx, bits, True, backend)
