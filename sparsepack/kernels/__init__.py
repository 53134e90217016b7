"""Kernels: GPTQ dequant-matmul, sparse products, Fisher accumulation and the adapted-linear autograd function.

Every op has a plain-torch ``*_reference``; the dispatchers pick the numba CPU path or the Triton GPU path per
device (``_backend``; override with ``backend=`` or ``SPARSEPACK_BACKEND``). numba and triton are imported on
first use only.
"""

from sparsepack.kernels.autograd import (
    LowRankPart,
    SparsePart,
    sparse_lowrank_linear,
    sparse_lowrank_linear_multi,
    sparse_lowrank_linear_multi_reference,
    sparse_lowrank_linear_reference,
)
from sparsepack.kernels.base_weight import BaseWeight, DenseBase, GPTQBase
from sparsepack.kernels.dequant_matmul import (
    dequant_matmul,
    dequant_matmul_reference,
    dequant_matmul_t,
    dequant_matmul_t_reference,
    dequantize_reference,
)
from sparsepack.kernels.fisher import FisherState, fisher_accumulate, fisher_accumulate_reference
from sparsepack.kernels.sparse import (
    CSRSupport,
    csr_row_indices,
    sddmm,
    sddmm_reference,
    spmm,
    spmm_reference,
    spmm_t,
    spmm_t_reference,
)

__all__ = [
    "BaseWeight",
    "CSRSupport",
    "DenseBase",
    "FisherState",
    "GPTQBase",
    "LowRankPart",
    "SparsePart",
    "csr_row_indices",
    "dequant_matmul",
    "dequant_matmul_reference",
    "dequant_matmul_t",
    "dequant_matmul_t_reference",
    "dequantize_reference",
    "fisher_accumulate",
    "fisher_accumulate_reference",
    "sddmm",
    "sddmm_reference",
    "sparse_lowrank_linear",
    "sparse_lowrank_linear_multi",
    "sparse_lowrank_linear_multi_reference",
    "sparse_lowrank_linear_reference",
    "spmm",
    "spmm_reference",
    "spmm_t",
    "spmm_t_reference",
]
