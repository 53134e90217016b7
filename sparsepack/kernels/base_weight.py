"""The frozen base of an adapted linear layer: a dense weight or GPTQ-v1 buffers, behind one small interface.

``kernels.autograd`` needs three things from a base, whatever it stores: ``x @ W^T`` (+ bias), the input
gradient ``dy @ W`` and, for the reference, the dense ``W``. Both bases can also *fold* sparse entries into the
weight they materialize anyway: ``x @ (W + S)^T`` then costs one GEMM instead of a GEMM plus a sparse product
over every token. The GPTQ base on CPU folds inside its chunked dequantization (free); the dense base folds into
a transient copy of ``W`` (one memory pass over the weight), which pays off once
``tokens * nnz >= _FOLD_MIN_WORK * out * in``, or always for weights under ``_FOLD_ALWAYS_ELEMENTS`` (copying
those costs less than launching the sparse kernels; see ``benchmarks/kernels.py``). Folding is only done in
fp32/fp64: adding small sparse deltas to a bf16 weight would round them away.

Weights here are in the ``nn.Linear`` orientation, ``[out, in]``; GPTQ stores ``W^T`` (``[in, out]``, see
``formats.gptq_layout``), which is why its ``matmul`` is ``dequant_matmul`` and its ``matmul_t`` is
``dequant_matmul_t``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsepack.kernels import _backend
from sparsepack.kernels.dequant_matmul import dequant_matmul, dequant_matmul_t, dequantize_reference

_FOLD_MIN_WORK = 0.25  # fold into a dense base once tokens * density >= this (spmm work ~ one pass over W)
_FOLD_ALWAYS_ELEMENTS = 1 << 21  # ... or when W is this small: its copy costs less than spmm + spmm_t launches
_FOLD_DTYPES = (torch.float32, torch.float64)

# Sparse entries to fold: (row_idx int32 [E], col_idx int32 [E], values [E]) of S [out, in]; several adapters'
# entries are simply concatenated (duplicates add up).
Fold = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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
    def matmul(self, x: torch.Tensor, backend: str, fold: Fold | None = None) -> torch.Tensor:
        """``x [T, in] @ (W + S)^T + bias -> [T, out]``."""

    @abstractmethod
    def matmul_t(self, dy: torch.Tensor, backend: str, fold: Fold | None = None) -> torch.Tensor:
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

    def _effective(self, dtype: torch.dtype, fold: Fold | None) -> torch.Tensor:
        w = self.weight.detach()
        if fold is None:
            return w.to(dtype)
        rows, cols, vals = fold
        w = w.to(dtype, copy=True)  # transient (out, in); the base itself is never modified
        w.view(-1).index_add_(0, rows.long() * w.shape[1] + cols.long(), vals.detach().to(dtype))
        return w

    def matmul(self, x, backend, fold=None):
        return self._add_bias(F.linear(x, self._effective(x.dtype, fold)))

    def matmul_t(self, dy, backend, fold=None):
        return dy @ self._effective(dy.dtype, fold)


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

    def matmul(self, x, backend, fold=None):
        if fold is not None:  # S [out, in] lands in GPTQ's W [in, out] at (col, row): see _cpu_dequant.Fold
            y = self._cpu().dequant_matmul(x, *self._buffers(), transpose=False, fold=fold)
        else:
            y = dequant_matmul(x, *self._buffers(), backend=backend)
        return self._add_bias(y)

    def matmul_t(self, dy, backend, fold=None):
        if fold is not None:
            return self._cpu().dequant_matmul(dy, *self._buffers(), transpose=True, fold=fold)
        return dequant_matmul_t(dy, *self._buffers(), backend=backend)
