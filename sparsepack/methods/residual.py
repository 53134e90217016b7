"""Residual initialization: start a correction at the quantization error ``W_fp - W_q`` instead of at zero.

For one layer with residual ``R = W_fp - W_q`` (``[out, in]``), a sparse budget of ``nnz`` entries and rank ``r``:

1. the sparse part takes the ``nnz`` largest ``|R|`` entries, with their values (they are the outliers a
   low-rank factorization serves worst);
2. the low-rank part is the rank-``r`` truncated SVD of what remains, ``R - S = U diag(sigma) V^T``:
   ``s * B @ A = U_r diag(sigma_r) V_r^T`` with the singular values split evenly,
   ``B = U_r sqrt(sigma_r / s)`` and ``A = sqrt(sigma_r / s) V_r^T`` (both factors of similar scale, so AdamW
   moves them at similar relative rates).

By Eckart-Young this is the best rank-``r`` fit of ``R - S`` in Frobenius norm, so the corrected weight
``W_q + s B A + S`` is never farther from ``W_fp`` than ``W_q`` is. The same idea as LoftQ/PiSSA-style
initializations, applied to a fixed quantized base and with RoSA's sparse part taking the outliers first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsepack.kernels.sparse import CSRSupport
from sparsepack.methods.masks import topk_support


@dataclass
class ResidualInit:
    """The initial correction of one layer."""

    A: torch.Tensor | None  # [r, in] fp32 (None when rank == 0)
    B: torch.Tensor | None  # [out, r] fp32
    support: CSRSupport | None  # nnz entries of [out, in] (None when nnz == 0)
    values: torch.Tensor | None  # [nnz] fp32, R on the support in CSR order


def svd_factors(
    delta: torch.Tensor, rank: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` fit of ``delta [out, in]`` (Eckart-Young) as ``scaling * B @ A``.

    The singular values are split evenly between the factors (``B = U_r sqrt(sigma_r / scaling)``,
    ``A = sqrt(sigma_r / scaling) V_r^T``); the SVD runs in float64 so the truncation matches any reference.

    Returns:
        ``(A [r, in], B [out, r], err2, total2)``: fp32 factors, and the squared Frobenius norms of the residual
        ``delta - scaling * B @ A`` and of ``delta``.
    """
    U, sigma, Vh = torch.linalg.svd(delta.double(), full_matrices=False)  # (out, k) (k,) (k, in)
    r = min(rank, sigma.numel())
    root = (sigma[:r] / scaling).sqrt()  # (r,)
    B = (U[:, :r] * root).float().contiguous()  # (out, r)
    A = (root[:, None] * Vh[:r]).float().contiguous()  # (r, in)
    return A, B, float((sigma[r:] ** 2).sum()), float((sigma**2).sum())


def residual_init(w_fp: torch.Tensor, w_q: torch.Tensor, rank: int, nnz: int, scaling: float) -> ResidualInit:
    """Sparse top-``nnz`` of ``|W_fp - W_q|`` plus the rank-``rank`` SVD truncation of the rest.

    Args:
        w_fp: the full-precision weight ``[out, in]`` (the teacher's).
        w_q: the base weight actually used (dequantized), ``[out, in]``.
        rank: low-rank dimension (0: no low-rank part).
        nnz: sparse entries (0: no sparse part).
        scaling: the adapter's ``alpha / r``; ``scaling * B @ A`` equals the truncation.

    Returns:
        :class:`ResidualInit` with fp32 tensors on ``w_q``'s device.
    """
    if w_fp.shape != w_q.shape:
        raise ValueError(f"teacher weight {tuple(w_fp.shape)} and base weight {tuple(w_q.shape)} differ in shape")
    if scaling <= 0 and rank:
        raise ValueError(f"scaling must be positive, got {scaling}")
    resid = w_fp.to(w_q.device, torch.float32) - w_q.float()  # (out, in)
    support = values = None
    if nnz:
        support = topk_support(resid.abs(), nnz)
        rows, cols = support.row_idx.long(), support.col_idx.long()
        values = resid[rows, cols].clone()  # (nnz,) in CSR order
        resid[rows, cols] = 0.0  # the low-rank part fits what the sparse part leaves
    A = B = None
    if rank:
        A, B, _, _ = svd_factors(resid, rank, scaling)
    return ResidualInit(A, B, support, values)
