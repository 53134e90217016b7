"""One autograd function for an adapted linear layer: frozen base + low-rank + sparse corrections.

    y = base(x) + sum_k s_k * (x A_k^T) B_k^T + sum_j x S_j^T

with ``x [..., in]``, ``A_k [r_k, in]``, ``B_k [out, r_k]``, ``S_j [out, in]`` sparse (CSR support + trainable
``values [nnz_j]``) and the base a :class:`~sparsepack.kernels.base_weight.DenseBase` or
:class:`~sparsepack.kernels.base_weight.GPTQBase`. Gradients flow to ``x``, every ``A``, ``B`` and ``values``;
never to the base. Backward (RoSA's):

    dx = dy W + sum_k s_k (dy B_k) A_k + sum_j dy S_j
    dA_k = s_k (dy B_k)^T x,   dB_k = s_k dy^T (x A_k^T),   dvalues_j = sddmm(dy, x, support_j)

Entry points: :func:`sparse_lowrank_linear` (one adapter, flat arguments, every part optional) and
:func:`sparse_lowrank_linear_multi` (any number of low-rank and sparse parts, e.g. several active adapters).
Each has a ``*_reference`` built from plain differentiable torch ops, which ``torch.autograd.gradcheck`` checks
in float64. The fast function saves ``x`` and each ``x A_k^T`` (``[T, r]``) for backward, nothing weight-sized;
a sparse part is folded into the base's weight when the base materializes it anyway (see ``base_weight``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from sparsepack.kernels import _backend
from sparsepack.kernels.base_weight import BaseWeight, SparseFold
from sparsepack.kernels.sparse import CSRSupport, csr_row_indices, sddmm, spmm, spmm_reference


@dataclass(frozen=True, eq=False)
class LowRankPart:
    """``s * (x A^T) B^T``: ``A [r, in]``, ``B [out, r]`` (PEFT's lora_A / lora_B weights), ``scaling = alpha / r``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 1.0


@dataclass(frozen=True, eq=False)
class SparsePart:
    """``x S^T`` for ``S [out, in]`` with trainable ``values [nnz]`` on a fixed :class:`CSRSupport`."""

    values: torch.Tensor
    support: CSRSupport


@dataclass(frozen=True, eq=False)
class _Plan:
    """Everything about one call that is not a differentiable tensor."""

    base: BaseWeight
    scalings: tuple[float, ...]
    supports: tuple[CSRSupport, ...]
    folded: bool  # all sparse parts go through the base's materialized weight
    backend: str


def _fold(plan: _Plan, values: Sequence[torch.Tensor]) -> SparseFold | None:
    """Every sparse part as one fold into the base's weight, or None when they run as spmm."""
    if not plan.folded or not plan.supports:
        return None
    return SparseFold(plan.supports, tuple(values))


def _forward(plan: _Plan, x2: torch.Tensor, As, Bs, values):
    """Returns ``(y [T, out], us)`` with ``us[k] = x A_k^T [T, r_k]`` kept for backward."""
    y = plan.base.matmul(x2, plan.backend, _fold(plan, values))
    us = []
    for A, B, s in zip(As, Bs, plan.scalings, strict=True):
        u = x2 @ A.to(x2.dtype).t()  # (T, r)
        y.addmm_(u, B.to(x2.dtype).t(), alpha=s)
        us.append(u)
    if not plan.folded:
        for v, sup in zip(values, plan.supports, strict=True):
            y += spmm(x2, v.detach(), sup.row_ptr, sup.col_idx, sup.shape, backend=plan.backend)
    return y, us


class _SparseLowRankFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, n_lowrank: int, x2: torch.Tensor, *params: torch.Tensor):
        As, Bs, values = params[:n_lowrank], params[n_lowrank : 2 * n_lowrank], params[2 * n_lowrank :]
        y, us = _forward(plan, x2, As, Bs, values)
        ctx.plan, ctx.n_lowrank = plan, n_lowrank
        ctx.save_for_backward(x2, *us, *params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        plan, n = ctx.plan, ctx.n_lowrank
        x2, *rest = ctx.saved_tensors
        us, params = rest[:n], rest[n:]
        As, Bs, values = params[:n], params[n : 2 * n], params[2 * n :]
        need_x = ctx.needs_input_grad[2]
        need = ctx.needs_input_grad[3:]
        dy = dy.to(x2.dtype)
        dx = plan.base.matmul_t(dy, plan.backend, _fold(plan, values)) if need_x else None
        dAs, dBs = [None] * n, [None] * n
        for k, (A, B, u, s) in enumerate(zip(As, Bs, us, plan.scalings, strict=True)):
            g = (dy @ B.to(dy.dtype)).mul_(s)  # (T, r): s * dy B, scaled while it is small
            if need[k]:
                dAs[k] = (g.t() @ x2).to(A.dtype)  # (r, in)
            if need[n + k]:
                dBs[k] = (dy.t() @ (u * s)).to(B.dtype)  # (out, r)
            if need_x:
                dx.addmm_(g, A.to(dy.dtype))
        dvals = []
        for j, (v, sup) in enumerate(zip(values, plan.supports, strict=True)):
            grad = sddmm(dy, x2, sup.row_idx, sup.col_idx, backend=plan.backend) if need[2 * n + j] else None
            dvals.append(None if grad is None else grad.to(v.dtype))
            if need_x and not plan.folded:  # dy @ S as spmm with the (cached) transposed support
                st, perm = sup.transpose
                dx += spmm(dy, v.detach()[perm], st.row_ptr, st.col_idx, st.shape, backend=plan.backend)
        return (None, None, dx, *dAs, *dBs, *dvals)


def _check_parts(base: BaseWeight, x: torch.Tensor, lowrank, sparse) -> None:
    out_f, in_f = base.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"x has {x.shape[-1]} features, the base takes {in_f}")
    for p in lowrank:
        if p.A.dim() != 2 or p.A.shape[1] != in_f or p.B.shape != (out_f, p.A.shape[0]):
            raise ValueError(f"low-rank A {tuple(p.A.shape)} / B {tuple(p.B.shape)} do not fit [{out_f}, {in_f}]")
    for p in sparse:
        if tuple(p.support.shape) != (out_f, in_f) or p.values.shape != (p.support.nnz,):
            raise ValueError(f"sparse part {tuple(p.support.shape)} with {p.values.numel()} values does not fit")


def sparse_lowrank_linear_multi(
    x: torch.Tensor,
    base: BaseWeight,
    lowrank: Sequence[LowRankPart] = (),
    sparse: Sequence[SparsePart] = (),
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``base(x) + sum(low-rank parts) + sum(sparse parts)`` -> ``[..., out]`` in x's dtype.

    Args:
        x: activations ``[..., in]``.
        base: the frozen base weight (no gradient).
        lowrank: low-rank parts, e.g. one per active adapter (empty: none).
        sparse: sparse parts, e.g. one per active adapter (empty: none).
        backend: ``reference``, ``cpu`` or ``triton`` for the kernels; None picks by device.
    """
    _check_parts(base, x, lowrank, sparse)
    out_f, in_f = base.shape
    chosen = _backend.resolve(x.device, backend)
    x2 = x.reshape(-1, in_f)
    nnz = sum(p.support.nnz for p in sparse)
    folded = bool(sparse) and base.can_fold(chosen, x.dtype, x2.shape[0], nnz)
    plan = _Plan(base, tuple(float(p.scaling) for p in lowrank), tuple(p.support for p in sparse), folded, chosen)
    params = [p.A for p in lowrank] + [p.B for p in lowrank] + [p.values for p in sparse]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params)):
        y = _SparseLowRankFunction.apply(plan, len(lowrank), x2, *params)
    else:
        y = _forward(
            plan, x2, params[: len(lowrank)], params[len(lowrank) : 2 * len(lowrank)], params[2 * len(lowrank) :]
        )[0]
    return y.reshape(*x.shape[:-1], out_f)


def sparse_lowrank_linear_multi_reference(
    x: torch.Tensor, base: BaseWeight, lowrank: Sequence[LowRankPart] = (), sparse: Sequence[SparsePart] = ()
) -> torch.Tensor:
    """Plain-torch autograd definition of :func:`sparse_lowrank_linear_multi` (gradcheck in float64)."""
    _check_parts(base, x, lowrank, sparse)
    y = x @ base.dense(x.dtype).t()
    if base.bias is not None:
        y = y + base.bias.to(x.dtype)
    for p in lowrank:
        y = y + p.scaling * ((x @ p.A.to(x.dtype).t()) @ p.B.to(x.dtype).t())
    for p in sparse:
        s = p.support
        y = y + spmm_reference(x, p.values, s.row_ptr, s.col_idx, s.shape)
    return y


def _parts(base, A, B, scaling, values, row_ptr, col_idx, row_idx):
    if (A is None) != (B is None):
        raise ValueError("give both A and B, or neither")
    lowrank = [] if A is None else [LowRankPart(A, B, scaling)]
    if values is None:
        return lowrank, []
    if row_ptr is None or col_idx is None:
        raise ValueError("sparse values need row_ptr and col_idx")
    if row_idx is None:
        row_idx = csr_row_indices(row_ptr, col_idx.numel())
    return lowrank, [SparsePart(values, CSRSupport(row_ptr, col_idx, row_idx, base.shape))]


def sparse_lowrank_linear(
    x: torch.Tensor,
    base: BaseWeight,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    scaling: float = 1.0,
    values: torch.Tensor | None = None,
    row_ptr: torch.Tensor | None = None,
    col_idx: torch.Tensor | None = None,
    row_idx: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``base(x) + scaling * (x A^T) B^T + x S^T`` for one adapter; any part may be None.

    Args:
        x: activations ``[..., in]``.
        base: :class:`DenseBase` or :class:`GPTQBase` (frozen).
        A, B: low-rank factors ``[r, in]`` and ``[out, r]``, or both None.
        scaling: ``alpha / r``.
        values: sparse values ``[nnz]`` or None; with ``row_ptr`` int32 ``[out + 1]``, ``col_idx`` int32 ``[nnz]``
            and optionally ``row_idx`` int32 ``[nnz]`` (derived from row_ptr when None).
        backend: kernel backend; None picks by device.

    Several adapters at once: build :class:`LowRankPart` / :class:`SparsePart` lists and call
    :func:`sparse_lowrank_linear_multi`.
    """
    lowrank, sparse = _parts(base, A, B, scaling, values, row_ptr, col_idx, row_idx)
    return sparse_lowrank_linear_multi(x, base, lowrank, sparse, backend=backend)


def sparse_lowrank_linear_reference(
    x, base, A=None, B=None, scaling=1.0, values=None, row_ptr=None, col_idx=None, row_idx=None
) -> torch.Tensor:
    """Plain-torch autograd definition of :func:`sparse_lowrank_linear`."""
    lowrank, sparse = _parts(base, A, B, scaling, values, row_ptr, col_idx, row_idx)
    return sparse_lowrank_linear_multi_reference(x, base, lowrank, sparse)
