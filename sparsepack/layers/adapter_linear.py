"""SparseLowRankLinear: a frozen base linear plus named corrections ``s * B @ A + S``.

Adapters live in dicts keyed by name, so switching the active set is free (no tensor moves). ``S`` is CSR:
``values [nnz]``, ``row_ptr`` int32 ``[out + 1]``, ``col_idx`` int32 ``[nnz]`` over the ``[out, in]`` weight.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsepack.formats.adapter_layout import AdapterModule


def csr_row_idx(row_ptr: torch.Tensor) -> torch.Tensor:
    """Row index of every stored entry (COO rows from CSR): int32 ``[nnz]``."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), dtype=torch.int32), counts)


class SparseLowRankLinear(nn.Module):
    """``y = base(x) + sum_{a in active} s_a * (dropout(x) A_a^T) B_a^T + x S_a^T``."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.lora_A = nn.ParameterDict()  # name -> [r, in]
        self.lora_B = nn.ParameterDict()  # name -> [out, r]
        self.sparse_values = nn.ParameterDict()  # name -> [nnz]
        self.scaling: dict[str, float] = {}
        self.dropout = nn.ModuleDict()
        self._csr: dict[
            str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}  # name -> row_ptr, col, row
        self.active: list[str] = []

    @property
    def adapter_names(self) -> list[str]:
        return sorted(set(self.lora_A) | set(self.sparse_values))

    def add_adapter(
        self, name: str, module: AdapterModule, dropout: float = 0.0, trainable: bool = False
    ) -> None:
        """Attach one module's correction under ``name`` (replacing any adapter of that name)."""
        self.delete_adapter(name)
        ref = self.base_reference_tensor()
        device = ref.device
        if module.rank:
            self.lora_A[name] = nn.Parameter(module.A.to(device), requires_grad=trainable)
            self.lora_B[name] = nn.Parameter(module.B.to(device), requires_grad=trainable)
            self.scaling[name] = module.scaling
        if module.values is not None:
            self.sparse_values[name] = nn.Parameter(module.values.to(device), requires_grad=trainable)
            row_ptr = module.row_ptr.to(torch.int32)
            self._csr[name] = (row_ptr.to(device), module.col_idx.to(torch.int32).to(device),
                               csr_row_idx(row_ptr).to(device))  # fmt: skip
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delete_adapter(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.sparse_values, self.dropout):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self._csr.pop(name, None)
        self.active = [a for a in self.active if a != name]

    def base_reference_tensor(self) -> torch.Tensor:
        for t in list(self.base.parameters()) + list(self.base.buffers()):
            return t
        raise ValueError("base layer has no tensors")

    def csr(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._csr[name]

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[out, in]`` correction of adapter ``name`` (for merging and tests)."""
        dw = torch.zeros(
            self.out_features, self.in_features, dtype=dtype, device=self.base_reference_tensor().device
        )
        if name in self.lora_A:
            dw += self.scaling[name] * (self.lora_B[name].to(dtype) @ self.lora_A[name].to(dtype))
        if name in self.sparse_values:
            _, col, row = self._csr[name]
            dw.index_put_((row.long(), col.long()), self.sparse_values[name].to(dtype), accumulate=True)
        return dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name in self.active:
            if name in self.lora_A:
                h = self.dropout[name](x) @ self.lora_A[name].to(x.dtype).t()  # (..., r)
                y = y + self.scaling[name] * (h @ self.lora_B[name].to(x.dtype).t())
            if name in self.sparse_values:
                y = y + sparse_matmul(x, self.sparse_values[name], *self._csr[name], self.out_features)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names}"
        )


def sparse_matmul(
    x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, row_idx: torch.Tensor,
    out_features: int,
) -> torch.Tensor:  # fmt: skip
    """``x [..., in] @ S^T -> [..., out]`` for CSR ``S``; differentiable in x and values."""
    from sparsepack import kernels

    spmm = getattr(kernels, "spmm", None)
    if spmm is not None:
        return spmm(x, values, row_ptr, col_idx, (out_features, x.shape[-1]))
    xf = x.reshape(-1, x.shape[-1])  # (T, in)
    contrib = xf[:, col_idx.long()] * values.to(x.dtype)  # (T, nnz)
    out = torch.zeros(xf.shape[0], out_features, dtype=x.dtype, device=x.device)
    out = out.index_add(1, row_idx.long(), contrib)
    return out.reshape(*x.shape[:-1], out_features)
