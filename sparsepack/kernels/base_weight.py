"""The frozen base of an adapted linear layer: a dense weight or GPTQ-v1 buffers, behind one small interface.

``kernels.autograd`` needs three things from a base, whatever it stores: ``x @ W^T`` (+ bias), the input
gradient ``dy @ W`` and, for the reference, the dense ``W``. Both bases can also *fold* sparse entries into the
weight they materialize anyway: ``x @ (W + S)^T`` then costs one GEMM instead of a GEMM plus a sparse product
over every token. The GPTQ base on CPU folds inside its chunked dequantization (free). The dense base folds in
place when ``W`` is already in the compute dtype: it saves the ``nnz`` entries it touches, adds ``S``, runs the
GEMM and writes the saved entries back (exact: ``W`` is bit-for-bit what it was; a lock makes the window atomic
for other threads). Otherwise it folds into a transient copy of ``W`` (one memory pass over the weight). Either
pays off once ``tokens * nnz >= _FOLD_MIN_WORK * out * in``, or always for weights under
``_FOLD_ALWAYS_ELEMENTS`` (see ``benchmarks/kernels.py``). Folding is only done in fp32/fp64: adding small sparse
deltas to a bf16 weight would round them away.

Weights here are in the ``nn.Linear`` orientation, ``[out, in]``; GPTQ stores ``W^T`` (``[in, out]``, see
``formats.gptq_layout``), which is why its ``matmul`` is ``dequant_matmul`` and its ``matmul_t`` is
``dequant_matmul_t``.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsepack.kernels import _backend
from sparsepack.kernels.dequant_matmul import dequant_matmul, dequant_matmul_t, dequantize_reference
from sparsepack.kernels.sparse import CSRSupport, group_by_column

_FOLD_MIN_WORK = 0.25  # fold into a dense base once tokens * density >= this (spmm work ~ one pass over W)
_FOLD_ALWAYS_ELEMENTS = 1 << 21  # ... or when W is this small: its copy costs less than spmm + spmm_t launches
_FOLD_DTYPES = (torch.float32, torch.float64)
# Held while a dense weight carries a fold in place, so that no other thread reads (or folds into) it meanwhile;
# reentrant, and one for all weights (they may share storage, and training is single-threaded anyway).
_IN_PLACE_LOCK = threading.RLock()


@dataclass(frozen=True, eq=False)
class SparseFold:
    """Sparse entries to fold into the weight: ``S = sum_j S_j [out, in]``, one values tensor per support.

    Several adapters' entries are concatenated (duplicates add up). The index layouts the bases need come from
    each support's cached ones, so a fold of one support (the training case) does no index work per call.
    """

    supports: tuple[CSRSupport, ...]
    values: tuple[torch.Tensor, ...]

    def flat(self) -> torch.Tensor:
        """int64 ``[E]``: offsets ``row * in + col`` into the row-major ``S``, in :meth:`flat_values`' order."""
        if len(self.supports) == 1:
            return self.supports[0].flat_idx
        return torch.cat([s.flat_idx for s in self.supports])

    def flat_values(self, dtype: torch.dtype) -> torch.Tensor:
        """``[E]`` values in ``dtype``, in :meth:`flat`'s order."""
        vals = [v.detach().to(dtype) for v in self.values]
        return vals[0] if len(vals) == 1 else torch.cat(vals)

    def by_input(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries grouped by input feature (``S``'s column): ``(ptr int32 [in + 1], rows int32 [E],
        values [E])``, what the GPTQ base adds while it dequantizes ``W^T`` row by row."""
        if len(self.supports) == 1:
            t, perm = self.supports[0].transpose
            # index_select, not [perm]: faster on CPU (docs/BENCHMARKS.md, Kernels)
            return t.row_ptr, t.col_idx, torch.index_select(self.values[0].detach().to(dtype), 0, perm)
        ptr, perm = group_by_column(torch.cat([s.col_idx for s in self.supports]), self.supports[0].shape[1])
        return ptr, torch.cat([s.row_idx for s in self.supports])[perm], self.flat_values(dtype)[perm]


class BaseWeight(ABC):
    """Interface of a frozen base; see :class:`DenseBase` and :class:`GPTQBase`."""

    bias: torch.Tensor | None

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:  # (out, in)
        ...

    @abstractmethod
    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` (for references and tests)."""

    @abstractmethod
    def can_fold(self, backend: str, dtype: torch.dtype, tokens: int, nnz: int) -> bool:
        """Whether ``matmul``/``matmul_t`` should take the sparse entries as a ``fold``."""

    @abstractmethod
    def matmul(self, x: torch.Tensor, backend: str, fold: SparseFold | None = None) -> torch.Tensor:
        """``x [T, in] @ (W + S)^T + bias -> [T, out]``."""

    @abstractmethod
    def matmul_t(self, dy: torch.Tensor, backend: str, fold: SparseFold | None = None) -> torch.Tensor:
        """``dy [T, out] @ (W + S) -> [T, in]`` (no bias)."""

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y.add_(self.bias.to(y.dtype))


@dataclass(frozen=True, eq=False)
class DenseBase(BaseWeight):
    """A frozen dense weight ``[out, in]`` (``nn.Linear.weight``) and optional bias ``[out]``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.detach().to(dtype)

    def can_fold(self, backend: str, dtype: torch.dtype, tokens: int, nnz: int) -> bool:
        out_f, in_f = self.shape
        worth_it = tokens * nnz >= _FOLD_MIN_WORK * out_f * in_f or out_f * in_f <= _FOLD_ALWAYS_ELEMENTS
        return backend != "reference" and dtype in _FOLD_DTYPES and worth_it

    @contextmanager
    def _effective(self, dtype: torch.dtype, fold: SparseFold | None) -> Iterator[torch.Tensor]:
        """``W + S`` in ``dtype`` for the duration of the block."""
        w = self.weight.detach()
        if fold is None:
            yield w.to(dtype)
            return
        flat, vals = fold.flat(), fold.flat_values(dtype)
        if w.dtype != dtype or not w.is_contiguous() or w.is_inference() or self.weight.requires_grad:
            w = w.to(dtype, copy=True, memory_format=torch.contiguous_format)  # transient (out, in)
            w.view(-1).index_add_(0, flat, vals)
            yield w
            return
        with _IN_PLACE_LOCK:
            # an alias with its own version counter: W may be a view of one buffer holding other parameters (the
            # loader's layout), which autograd saved for backward; the fold leaves W as it found it
            view = torch.empty(0, dtype=w.dtype, device=w.device).set_(w.untyped_storage(), w.storage_offset(),
                                                                       (w.numel(),), (1,))  # fmt: skip
            # the originals (duplicate indices save the same value twice); index_select into a fresh buffer, since
            # `view[flat]` makes the index_add_ below much slower on CPU
            saved = torch.index_select(view, 0, flat, out=torch.empty(flat.shape, dtype=dtype))
            view.index_add_(0, flat, vals)
            try:
                yield view.view(w.shape)
            finally:
                view.index_copy_(0, flat, saved)

    def matmul(self, x, backend, fold=None):
        with self._effective(x.dtype, fold) as w:
            y = F.linear(x, w)
        return self._add_bias(y)

    def matmul_t(self, dy, backend, fold=None):
        with self._effective(dy.dtype, fold) as w:
            return dy @ w


@dataclass(frozen=True, eq=False)
class GPTQBase(BaseWeight):
    """GPTQ-v1 buffers of a frozen quantized linear (layout in ``formats.gptq_layout``)."""

    qweight: torch.Tensor  # int32 [in * bits / 32, out]
    qzeros: torch.Tensor  # int32 [G, out * bits / 32]
    scales: torch.Tensor  # fp16 [G, out]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    bias: torch.Tensor | None = None  # [out]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.scales.shape[1], self.g_idx.numel())

    def _buffers(self):
        return self.qweight, self.qzeros, self.scales, self.g_idx, self.bits

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_reference(*self._buffers(), dtype).t()

    def can_fold(self, backend: str, dtype: torch.dtype, tokens: int, nnz: int) -> bool:
        # the CPU path materializes W chunk by chunk anyway; the fused Triton kernel never does
        return backend == "cpu" and dtype in _FOLD_DTYPES

    def _cpu(self):
        return _backend.kernel_module("_cpu_dequant")

    def _by_input(self, a: torch.Tensor, fold: SparseFold):
        return self._cpu().Fold(*fold.by_input(torch.float64 if a.dtype == torch.float64 else torch.float32))

    def matmul(self, x, backend, fold=None):
        if fold is not None:  # S [out, in] lands in GPTQ's W [in, out] at (col, row): see _cpu_dequant.Fold
            y = self._cpu().dequant_matmul(x, *self._buffers(), transpose=False, fold=self._by_input(x, fold))
        else:
            y = dequant_matmul(x, *self._buffers(), backend=backend)
        return self._add_bias(y)

    def matmul_t(self, dy, backend, fold=None):
        if fold is not None:
            return self._cpu().dequant_matmul(dy, *self._buffers(), transpose=True, fold=self._by_input(dy, fold))
        return dequant_matmul_t(dy, *self._buffers(), backend=backend)
