"""Sparse matrix products for RoSA-style adapters: ``x @ S^T``, ``dy @ S`` and the sampled ``(dy^T x)[support]``.

``S [out, in]`` (the ``nn.Linear`` layout) is stored as CSR:

=========  =====  ================  ==========================================================
tensor     dtype  shape             meaning
=========  =====  ================  ==========================================================
values     float  ``[nnz]``         the trainable entries, row-major order
row_ptr    int32  ``[out + 1]``     entries of row r are ``row_ptr[r]:row_ptr[r + 1]``
col_idx    int32  ``[nnz]``         input column of each entry (int32: no 32767 cap as in spops)
row_idx    int32  ``[nnz]``         output row of each entry (COO rows, what sddmm needs)
=========  =====  ================  ==========================================================

Activations are token-major ``[..., features]``; the ops flatten the leading dims. Each op has a plain-torch
``*_reference`` (differentiable, tests compare against it) and a dispatcher that picks the CPU (numba) or Triton
kernel through ``_backend``; the dispatchers are differentiable too (each backward is made of the other ops). The
adapted linear layer has its own fused autograd function in ``kernels.autograd``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from sparsepack.kernels import _backend

_FAST = {"cpu": "_cpu_sparse", "triton": "_triton_sparse"}  # backend -> module with spmm/spmm_t/sddmm on 2-D


def csr_row_indices(row_ptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """int32 ``[nnz]``: the row of every stored entry of a CSR matrix."""
    if row_ptr.device.type == "cpu":  # numpy's repeat is faster than torch's here (adapter loads)
        ptr = row_ptr.numpy()
        rows = np.repeat(np.arange(ptr.shape[0] - 1, dtype=np.int32), np.diff(ptr))
        if rows.shape[0] != nnz:
            raise ValueError(f"row_ptr spans {rows.shape[0]} entries, expected {nnz}")
        return torch.from_numpy(rows)
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.arange(counts.numel(), dtype=torch.int32, device=row_ptr.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


def group_by_column(col_idx: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(col_ptr int32 [n_cols + 1], perm [nnz])``: a stable sort of entries by column; entry ``k`` of the sorted
    order is entry ``perm[k]``, and column ``c``'s entries are ``col_ptr[c]:col_ptr[c + 1]`` of it."""
    perm = torch.argsort(col_idx, stable=True)
    col_ptr = torch.zeros(n_cols + 1, dtype=torch.int32, device=col_idx.device)
    col_ptr[1:] = torch.cumsum(torch.bincount(col_idx.long(), minlength=n_cols), 0)
    return col_ptr, perm


@dataclass(frozen=True, eq=False)
class CSRSupport:
    """The fixed sparsity pattern of one ``S [out, in]``; values live beside it as a trainable ``[nnz]``."""

    row_ptr: torch.Tensor  # int32 [out + 1]
    col_idx: torch.Tensor  # int32 [nnz], sorted within each row
    row_idx: torch.Tensor  # int32 [nnz]
    shape: tuple[int, int]  # (out, in)

    @classmethod
    def from_coo(cls, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> CSRSupport:
        """Build from unordered ``(row, col)`` pairs (duplicates are kept; they add up in every op)."""
        out_f, in_f = shape
        order = torch.argsort(rows.long() * in_f + cols.long(), stable=True)
        rows, cols = rows[order].to(torch.int32), cols[order].to(torch.int32)
        counts = torch.bincount(rows.long(), minlength=out_f)
        row_ptr = torch.zeros(out_f + 1, dtype=torch.int32, device=rows.device)
        row_ptr[1:] = torch.cumsum(counts, 0)
        return cls(row_ptr, cols.contiguous(), rows.contiguous(), (out_f, in_f))

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> CSRSupport:
        """Build from a boolean ``[out, in]`` mask."""
        rows, cols = mask.nonzero(as_tuple=True)
        return cls.from_coo(rows, cols, tuple(mask.shape))

    @functools.cached_property
    def transpose(self) -> tuple[CSRSupport, torch.Tensor]:
        """``(support of S^T, perm)``: entry k of ``S^T`` is entry ``perm[k]`` of ``S``. Computed once.

        ``dy @ S`` is then ``spmm(dy, values[perm], <S^T support>)``: how the autograd layer runs ``spmm_t``
        without re-sorting a fixed support on every backward.
        """
        col_ptr, perm = group_by_column(self.col_idx, self.shape[1])  # rows stay sorted within each column
        t = CSRSupport(col_ptr, self.row_idx[perm].contiguous(), self.col_idx[perm].contiguous(), self.shape[::-1])
        return t, perm

    @functools.cached_property
    def flat_idx(self) -> torch.Tensor:
        """int64 ``[nnz]``: each entry's offset ``row * in + col`` in the row-major ``S``. Computed once."""
        return self.row_idx.long() * self.shape[1] + self.col_idx.long()

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    def to(self, device: torch.device | str) -> CSRSupport:
        return CSRSupport(self.row_ptr.to(device), self.col_idx.to(device), self.row_idx.to(device), self.shape)

    def validate(self) -> None:
        """Raise ValueError unless the three index tensors describe one well-formed CSR matrix."""
        out_f, in_f = self.shape
        for name, t in (("row_ptr", self.row_ptr), ("col_idx", self.col_idx), ("row_idx", self.row_idx)):
            if t.dtype != torch.int32 or t.dim() != 1:
                raise ValueError(f"{name} must be a 1-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
        check_csr(self.row_ptr, self.col_idx, self.shape)
        if self.row_idx.numel() != self.nnz:
            raise ValueError(f"row_idx has {self.row_idx.numel()} entries, col_idx {self.nnz}")
        if bool((self.row_ptr[1:] < self.row_ptr[:-1]).any()) or int(self.row_ptr[0]) != 0:
            raise ValueError("row_ptr must start at 0 and never decrease")
        if int(self.row_ptr[-1]) != self.nnz:
            raise ValueError(f"row_ptr ends at {int(self.row_ptr[-1])}, but there are {self.nnz} entries")
        if self.nnz and not torch.equal(self.row_idx, csr_row_indices(self.row_ptr, self.nnz)):
            raise ValueError("row_idx does not match row_ptr")
        if self.nnz and (int(self.col_idx.min()) < 0 or int(self.col_idx.max()) >= in_f):
            raise ValueError(f"col_idx out of range [0, {in_f})")


def check_csr(row_ptr: torch.Tensor, col_idx: torch.Tensor, shape: tuple[int, int], values=None) -> None:
    """Cheap shape checks done on every call (no data-dependent checks: see ``CSRSupport.validate``)."""
    if row_ptr.shape != (shape[0] + 1,):
        raise ValueError(f"row_ptr must have shape ({shape[0] + 1},) for {shape[0]} rows, got {tuple(row_ptr.shape)}")
    if values is not None and values.shape != col_idx.shape:
        raise ValueError(f"values {tuple(values.shape)} and col_idx {tuple(col_idx.shape)} differ in length")


def _flat(a: torch.Tensor, features: int, name: str) -> torch.Tensor:
    if a.shape[-1] != features:
        raise ValueError(f"{name} has {a.shape[-1]} features in its last dim, expected {features}")
    return a.reshape(-1, features)


# ---------------------------------------------------------------------------------------------------------
# references: plain torch, differentiable, O(tokens * nnz) memory but never a dense [out, in]
# ---------------------------------------------------------------------------------------------------------


def spmm_reference(x, values, row_ptr, col_idx, shape) -> torch.Tensor:
    """``x [..., in] @ S^T -> [..., out]``."""
    out_f, in_f = shape
    x2 = _flat(x, in_f, "x")
    rows = csr_row_indices(row_ptr, col_idx.numel()).long()
    contrib = x2[:, col_idx.long()] * values.to(x.dtype)  # (T, nnz)
    y = torch.zeros(x2.shape[0], out_f, dtype=x.dtype, device=x.device).index_add(1, rows, contrib)
    return y.reshape(*x.shape[:-1], out_f)


def spmm_t_reference(dy, values, row_ptr, col_idx, shape) -> torch.Tensor:
    """``dy [..., out] @ S -> [..., in]``."""
    out_f, in_f = shape
    dy2 = _flat(dy, out_f, "dy")
    rows = csr_row_indices(row_ptr, col_idx.numel()).long()
    contrib = dy2[:, rows] * values.to(dy.dtype)  # (T, nnz)
    y = torch.zeros(dy2.shape[0], in_f, dtype=dy.dtype, device=dy.device).index_add(1, col_idx.long(), contrib)
    return y.reshape(*dy.shape[:-1], in_f)


def sddmm_reference(dy, x, row_idx, col_idx) -> torch.Tensor:
    """``values[i] = sum_t dy[t, row_idx[i]] * x[t, col_idx[i]]`` over all leading dims of dy and x."""
    dy2 = dy.reshape(-1, dy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    return (dy2[:, row_idx.long()] * x2[:, col_idx.long()].to(dy.dtype)).sum(0)


# ---------------------------------------------------------------------------------------------------------
# dispatchers: fast kernels, differentiable through small autograd wrappers whose backward calls the dispatchers
# ---------------------------------------------------------------------------------------------------------


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _Spmm(torch.autograd.Function):
    """``y = x @ S^T`` (``transpose=False``) or ``y = x @ S`` (``transpose=True``) on 2-D ``x``."""

    @staticmethod
    def forward(ctx, x2, values, row_ptr, col_idx, shape, transpose, backend):
        ctx.save_for_backward(x2, values, row_ptr, col_idx)
        ctx.shape, ctx.transpose, ctx.backend = shape, transpose, backend
        mod = _backend.kernel_module(_FAST[backend])
        if transpose:
            return mod.spmm_t(x2, values, row_ptr, col_idx, shape[1])
        return mod.spmm(x2, values, row_ptr, col_idx, shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, values, row_ptr, col_idx = ctx.saved_tensors
        csr, b = (row_ptr, col_idx, ctx.shape), ctx.backend
        gx = gv = None
        if ctx.needs_input_grad[0]:  # the other product with the same S
            gx = spmm(g, values, *csr, backend=b) if ctx.transpose else spmm_t(g, values, *csr, backend=b)
        if ctx.needs_input_grad[1]:  # dL/dS[r, c] sampled on the support
            rows = csr_row_indices(row_ptr, col_idx.numel())
            gv = sddmm(x2, g, rows, col_idx, backend=b) if ctx.transpose else sddmm(g, x2, rows, col_idx, backend=b)
            gv = gv.to(values.dtype)
        return gx, gv, None, None, None, None, None


class _Sddmm(torch.autograd.Function):
    """``values = (dy^T x)[support]``; its backward scatters through COO index_add (plain torch)."""

    @staticmethod
    def forward(ctx, dy2, x2, row_idx, col_idx, backend):
        ctx.save_for_backward(dy2, x2, row_idx, col_idx)
        return _backend.kernel_module(_FAST[backend]).sddmm(dy2, x2, row_idx, col_idx)

    @staticmethod
    def backward(ctx, gv):
        dy2, x2, row_idx, col_idx = ctx.saved_tensors
        rows, cols = row_idx.long(), col_idx.long()
        gdy = gx = None
        if ctx.needs_input_grad[0]:
            gdy = torch.zeros_like(dy2).index_add(1, rows, x2[:, cols].to(gv.dtype) * gv)
        if ctx.needs_input_grad[1]:
            gx = torch.zeros_like(x2).index_add(1, cols, (dy2[:, rows] * gv).to(x2.dtype))
        return gdy, gx, None, None, None


def spmm(x, values, row_ptr, col_idx, shape, *, backend: str | None = None) -> torch.Tensor:
    """``x [..., in] @ S^T -> [..., out]`` in x's dtype, for CSR ``S [out, in]``.

    Args:
        x: activations ``[..., in]``.
        values, row_ptr, col_idx: CSR of ``S`` (see the module table).
        shape: ``(out, in)``.
        backend: ``reference``, ``cpu`` or ``triton``; None picks by device (see ``_backend.resolve``).

    Differentiable in ``x`` and ``values`` (for the fused layer use ``kernels.autograd``).
    """
    check_csr(row_ptr, col_idx, shape, values)
    chosen = _backend.resolve(x.device, backend)
    if chosen == "reference":
        return spmm_reference(x, values, row_ptr, col_idx, shape)
    x2 = _flat(x, shape[1], "x")
    if _needs_grad(x, values):
        y = _Spmm.apply(x2, values, row_ptr, col_idx, tuple(shape), False, chosen)
    else:
        y = _backend.kernel_module(_FAST[chosen]).spmm(x2, values, row_ptr, col_idx, shape[0])
    return y.reshape(*x.shape[:-1], shape[0])


def spmm_t(dy, values, row_ptr, col_idx, shape, *, backend: str | None = None) -> torch.Tensor:
    """``dy [..., out] @ S -> [..., in]`` in dy's dtype (the input gradient of :func:`spmm`)."""
    check_csr(row_ptr, col_idx, shape, values)
    chosen = _backend.resolve(dy.device, backend)
    if chosen == "reference":
        return spmm_t_reference(dy, values, row_ptr, col_idx, shape)
    dy2 = _flat(dy, shape[0], "dy")
    if _needs_grad(dy, values):
        y = _Spmm.apply(dy2, values, row_ptr, col_idx, tuple(shape), True, chosen)
    else:
        y = _backend.kernel_module(_FAST[chosen]).spmm_t(dy2, values, row_ptr, col_idx, shape[1])
    return y.reshape(*dy.shape[:-1], shape[1])


def sddmm(dy, x, row_idx, col_idx, *, backend: str | None = None) -> torch.Tensor:
    """``values[i] = sum_t dy[t, row_idx[i]] * x[t, col_idx[i]]`` -> ``[nnz]`` in dy's dtype.

    The gradient of S's values; never forms the dense ``dy^T x``. Leading dims of ``dy [..., out]`` and
    ``x [..., in]`` are flattened into one token dim and must match. Entries may come in any order.
    """
    if row_idx.shape != col_idx.shape:
        raise ValueError(f"row_idx {tuple(row_idx.shape)} and col_idx {tuple(col_idx.shape)} differ")
    if dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"dy {tuple(dy.shape)} and x {tuple(x.shape)} have different token dims")
    chosen = _backend.resolve(dy.device, backend)
    if chosen == "reference":
        return sddmm_reference(dy, x, row_idx, col_idx)
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    if _needs_grad(dy, x):
        return _Sddmm.apply(dy2, x2, row_idx, col_idx, chosen)
    return _backend.kernel_module(_FAST[chosen]).sddmm(dy2, x2, row_idx, col_idx)
