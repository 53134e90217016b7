"""``x @ W`` for a GPTQ-v1 quantized weight ``W [K, N]`` (input dim first).

``dequant_matmul_reference`` is the plain-torch definition every faster path is tested against.
"""

from __future__ import annotations

import torch

from sparsepack.kernels import packing


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


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    """Dispatching entry point (fast paths are added by the kernels issue)."""
    return dequant_matmul_reference(x, qweight, qzeros, scales, g_idx, bits)
