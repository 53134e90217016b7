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

``--init residual-whitened`` fits the low-rank part to the layer's *output* error instead: given the Gram matrix
``H = X^T X`` of the layer's inputs on calibration tokens (the teacher's), it minimizes
``||(R - s B A) X^T||_F``. With ``H + damp = L L^T`` (Cholesky), that is the rank-``r`` truncation of ``R L``
mapped back by ``L^-1`` (the same whitening as QERA/SVD-LLM-style error reconstructions). GPTQ leaves ``R``
partly cancelling along the calibration inputs, so the plain SVD spends rank on directions the inputs barely use.
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


def whitened_factors(
    delta: torch.Tensor, gram: torch.Tensor, rank: int, scaling: float = 1.0, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-``rank`` fit of ``delta [out, in]`` in the input-weighted norm ``||(delta - s B A) L||_F``.

    ``L`` is the Cholesky factor of ``gram + damp * mean(diag(gram)) * I`` (``gram [in, in]`` = ``X^T X`` over
    calibration inputs), so the fit minimizes the output error on those inputs (plus a small ridge that keeps
    directions the inputs never visit at the plain-SVD weighting). Factors split the singular values of
    ``delta @ L`` evenly, as :func:`svd_factors`; ``A`` is then mapped back by ``L^-1``.

    Returns:
        ``(A [r, in], B [out, r], err2, total2)``: fp32 factors, and the squared weighted norms of the residual
        ``(delta - scaling * B @ A) @ L`` and of ``delta @ L``.
    """
    n = delta.shape[1]
    if gram.shape != (n, n):
        raise ValueError(f"gram matrix {tuple(gram.shape)} does not match {n} input features")
    H = gram.to(delta.device, torch.float64).clone()
    H.diagonal().add_(damp * float(H.diagonal().mean().clamp_min(1e-12)))
    L = torch.linalg.cholesky(H)  # (in, in) lower
    A, B, err2, total2 = svd_factors(delta.double() @ L, rank, scaling)
    A = torch.linalg.solve_triangular(L, A.double(), upper=False, left=False)  # A L^-1
    return A.float().contiguous(), B, err2, total2


def residual_init(
    w_fp: torch.Tensor, w_q: torch.Tensor, rank: int, nnz: int, scaling: float, gram: torch.Tensor | None = None
) -> ResidualInit:
    """Sparse top-``nnz`` of ``|W_fp - W_q|`` plus the rank-``rank`` SVD truncation of the rest.

    Args:
        w_fp: the full-precision weight ``[out, in]`` (the teacher's).
        w_q: the base weight actually used (dequantized), ``[out, in]``.
        rank: low-rank dimension (0: no low-rank part).
        nnz: sparse entries (0: no sparse part).
        scaling: the adapter's ``alpha / r``; ``scaling * B @ A`` equals the truncation.
        gram: ``X^T X`` of the layer's calibration inputs ``[in, in]``: fit the low-rank part to the output error
            (:func:`whitened_factors`) instead of in Frobenius norm.

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
        fit = svd_factors(resid, rank, scaling) if gram is None else whitened_factors(resid, gram, rank, scaling)
        A, B = fit[0], fit[1]
    return ResidualInit(A, B, support, values)
