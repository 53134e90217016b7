"""SparseLowRankLinear: a frozen base linear plus named corrections ``s * B @ A + S``.

Adapters live in dicts keyed by name, so switching the active set is free (no tensor moves):

- ``lora_A[name]`` ``[r, in]`` and ``lora_B[name]`` ``[out, r]`` (PEFT's names and layout), ``scaling[name] = alpha/r``;
- ``sparse_values[name]`` ``[nnz]`` on a fixed ``supports[name]`` (CSR, int32 indices) over the ``[out, in]`` weight.

The forward goes through ``kernels.sparse_lowrank_linear_multi``: the base never gets a gradient and no
dense weight-sized tensor is kept for backward. Dropout (training only) applies to the low-rank input.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsepack.formats.adapter_layout import AdapterModule
from sparsepack.kernels import (
    BaseWeight,
    CSRSupport,
    DenseBase,
    GPTQBase,
    LowRankPart,
    SparsePart,
    csr_row_indices,
    sparse_lowrank_linear_multi,
)
from sparsepack.kernels._backend import kernel_module
from sparsepack.layers.dropout_lowrank import dropped_lowrank
from sparsepack.layers.quantized_linear import QuantizedLinear


def csr_row_idx(row_ptr: torch.Tensor) -> torch.Tensor:
    """Row index of every stored entry (COO rows from CSR): int32 ``[nnz]``."""
    return csr_row_indices(row_ptr, int(row_ptr[-1]))


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
        self.supports: dict[str, CSRSupport] = {}
        self.scaling: dict[str, float] = {}
        self.alpha: dict[str, float] = {}
        self.dropout = nn.ModuleDict()
        self.active: list[str] = []
        self.row_adapters: list[str | None] | None = None  # per batch row (mixed batches); overrides `active`
        self.fused: str | None = None  # adapter folded into a dense base weight (see fuse)
        self._unfuse: tuple | None = None
        self._spare: torch.Tensor | None = None  # weight-sized buffer kept by unfuse for the next fuse
        # adapter name -> (B, B's version, kernel arguments) for the decode kernel (see _numpy_parts); emptied
        # whenever an adapter's tensors are replaced or the module is moved or cast (_apply)
        self._numpy_parts: dict[str, tuple] = {}  # name -> (B, B._version, KernelParts)

    # ----------------------------------------------------------------------------------------- adapters

    @property
    def adapter_names(self) -> list[str]:
        return sorted(set(self.lora_A) | set(self.sparse_values))

    def has_adapter(self, name: str) -> bool:
        return name in self.lora_A or name in self.sparse_values

    def set_active(self, names: list[str]) -> None:
        """Set the active adapters (names this layer holds), skipping ``nn.Module.__setattr__``'s checks: a
        plain list attribute, set on every layer at each switch."""
        object.__setattr__(self, "active", names)

    @property
    def device(self) -> torch.device:
        for attr in ("weight", "qweight"):  # nn.Linear, QuantizedLinear: no walk over the base's tensors
            t = getattr(self.base, attr, None)
            if isinstance(t, torch.Tensor):
                return t.device
        return next(t for t in list(self.base.parameters()) + list(self.base.buffers())).device

    def add_adapter(self, name: str, module: AdapterModule, dropout: float = 0.0, trainable: bool = False) -> None:
        """Attach one module's stored correction under ``name`` (replacing any adapter of that name)."""
        if self.has_adapter(name) or name in self.dropout:
            self.delete_adapter(name)
        device = self.device
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if module.rank:
            self.lora_A[name] = nn.Parameter(module.A.to(device, torch.float32), requires_grad=trainable)
            self.lora_B[name] = nn.Parameter(module.B.to(device, torch.float32), requires_grad=trainable)
            self.scaling[name] = module.scaling
            self.alpha[name] = module.alpha
        if module.values is not None:
            row_ptr = module.row_ptr.to(device, torch.int32)
            col_idx = module.col_idx.to(device, torch.int32)
            support = CSRSupport(row_ptr, col_idx, csr_row_idx(row_ptr), (self.out_features, self.in_features))
            self.set_support(name, support, module.values.to(device, torch.float32), trainable)

    def init_lowrank(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                     generator: torch.Generator | None = None) -> None:  # fmt: skip
        """A fresh trainable low-rank part: A ~ kaiming-uniform (as PEFT), B = 0, so the correction starts at 0."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform(a=sqrt(5)) on [r, in]
        A = (torch.rand(rank, self.in_features, generator=generator) * 2 - 1) * bound
        self.lora_A[name] = nn.Parameter(A.to(self.device))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, rank, device=self.device))
        self.scaling[name] = alpha / rank
        self.alpha[name] = alpha
        self.dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._numpy_parts.pop(name, None)  # views of the old tensors

    def set_support(self, name: str, support: CSRSupport, values: torch.Tensor | None = None,
                    trainable: bool = True) -> None:  # fmt: skip
        """Give adapter ``name`` a sparse part on ``support`` (values default to 0)."""
        if tuple(support.shape) != (self.out_features, self.in_features):
            raise ValueError(f"support shape {support.shape} != layer ({self.out_features}, {self.in_features})")
        if values is None:
            values = torch.zeros(support.nnz, device=self.device)
        self.supports[name] = support
        self.sparse_values[name] = nn.Parameter(values, requires_grad=trainable)
        self._numpy_parts.pop(name, None)  # views of the old tensors
        if name not in self.dropout:
            self.dropout[name] = nn.Identity()

    def delete_adapter(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.sparse_values, self.dropout):
            if name in d:
                del d[name]
        for d in (self.scaling, self.alpha, self.supports, self._numpy_parts):
            d.pop(name, None)
        self.active = [a for a in self.active if a != name]

    def _apply(self, fn, recurse=True):
        self._numpy_parts.clear()  # .to()/.float()/...: parameters may get new storage
        return super()._apply(fn, recurse)

    def export_adapter(self, name: str) -> AdapterModule:
        """The stored form of adapter ``name`` (detached CPU tensors)."""
        m = AdapterModule(shape=(self.out_features, self.in_features), alpha=self.alpha.get(name, 16.0))
        if name in self.lora_A:
            m.A = self.lora_A[name].detach().cpu().contiguous()
            m.B = self.lora_B[name].detach().cpu().contiguous()
        if name in self.sparse_values:
            s = self.supports[name]
            m.values = self.sparse_values[name].detach().cpu().contiguous()
            m.row_ptr, m.col_idx = s.row_ptr.cpu(), s.col_idx.cpu()
        return m

    # ----------------------------------------------------------------------------------------- compute

    def base_weight(self) -> BaseWeight:
        b = self.base
        if isinstance(b, QuantizedLinear):
            return GPTQBase(b.qweight, b.qzeros, b.scales, b.g_idx, b.bits, b.bias)
        return DenseBase(b.weight, b.bias)

    def dense_base(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight ``[out, in]``."""
        return self.base_weight().dense(dtype)

    def delta_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[out, in]`` correction of adapter ``name`` (for merging and tests)."""
        dw = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.device)
        if name in self.lora_A:
            dw += self.scaling[name] * (self.lora_B[name].detach().to(dtype) @ self.lora_A[name].detach().to(dtype))
        if name in self.sparse_values:
            s = self.supports[name]
            dw.index_put_((s.row_idx.long(), s.col_idx.long()), self.sparse_values[name].detach().to(dtype),
                          accumulate=True)  # fmt: skip
        return dw

    # ----------------------------------------------------------------------------------------- fusing

    def fuse(self, name: str) -> None:
        """Fold adapter ``name`` into a dense base weight (SHiRA-style switching); :meth:`unfuse` is exact.

        With a low-rank part every entry changes: the fused weight is a new tensor ``W + s B A (+ S)`` built in
        one pass (``addmm``), the original is kept aside and :meth:`unfuse` swaps it back (the base's bytes are
        never written, so a memory-mapped base stays clean and shared). :meth:`unfuse` keeps that buffer for
        the next fuse unless told to free it: writing into touched memory is ~3x faster than into fresh pages.
        A sparse-only adapter scatters its values in place and keeps the ``nnz`` originals.
        """
        if isinstance(self.base, QuantizedLinear):
            raise TypeError("fuse needs a dense base; quantized bases merge with `sparsepack merge --mode requantize`")
        self.unfuse()
        param = self.base.weight
        w = param.data
        flat = None
        if name in self.sparse_values:
            s = self.supports[name]
            flat = s.row_idx.long() * self.in_features + s.col_idx.long()  # (nnz,) offsets into W.view(-1)
            values = self.sparse_values[name].detach().to(w.dtype)
        if name in self.lora_A:
            A, B = self.lora_A[name].detach().to(w.dtype), self.lora_B[name].detach().to(w.dtype)
            spare, self._spare = self._spare, None
            if spare is None or spare.shape != w.shape or spare.dtype != w.dtype or spare.device != w.device:
                spare = torch.empty_like(w)
            fused = torch.addmm(w, B, A, alpha=self.scaling[name], out=spare)  # (out, in)
            if flat is not None:
                fused.view(-1).index_add_(0, flat, values)
            param.data = fused
            self._unfuse = ("swap", w)
        elif flat is not None:
            self._unfuse = ("sparse", flat, w.view(-1)[flat])  # advanced indexing copies the originals
            w.view(-1).index_add_(0, flat, values)
        else:
            return
        self.fused = name

    def unfuse(self, free: bool = False) -> None:
        """Restore the base weight exactly; ``free`` also drops the buffer kept for the next :meth:`fuse`."""
        if free:
            self._spare = None
        if self._unfuse is None:
            return
        param = self.base.weight
        if self._unfuse[0] == "swap":
            if not free:
                self._spare = param.data
            param.data = self._unfuse[1]
        else:
            param.data.view(-1)[self._unfuse[1]] = self._unfuse[2]  # duplicates restore the same original value
        self._unfuse, self.fused = None, None

    # ----------------------------------------------------------------------------------------- forward

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed batch: row ``i`` of ``x [b, ..., in]`` gets adapter ``row_adapters[i]`` (None = base)."""
        rows = self.row_adapters
        if len(rows) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(rows)} entries for a batch of {x.shape[0]}")
        y = self.base(x)
        for name in dict.fromkeys(r for r in rows if r is not None):
            idx = torch.tensor([i for i, r in enumerate(rows) if r == name], device=x.device)
            xi = x.index_select(0, idx)
            y = y.index_add(0, idx, _delta(self, name, xi))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None:
            return self._routed(x)
        if not self.active:
            return self.base(x)
        if not self._needs_autograd(x) and (
            x.numel() <= _SPLIT_MAX_TOKENS * x.shape[-1] or isinstance(self.base, nn.Linear)
        ):
            return self._infer_split(x)
        lowrank, sparse, extra = [], [], None
        for name in self.active:
            if name in self.lora_A:
                A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
                drop = self.dropout[name]
                if self.training and isinstance(drop, nn.Dropout):  # dropout sees only the low-rank input
                    term = dropped_lowrank(x, A, B, s, drop.p)  # keeps a bool mask, not dropout(x), for backward
                    extra = term if extra is None else extra + term
                else:
                    lowrank.append(LowRankPart(A, B, s))
            if name in self.sparse_values:
                sparse.append(SparsePart(self.sparse_values[name], self.supports[name]))
        y = sparse_lowrank_linear_multi(x, self.base_weight(), lowrank, sparse)
        return y if extra is None else y + extra

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        if x.requires_grad or (self.training and any(isinstance(self.dropout[n], nn.Dropout) for n in self.active)):
            return True
        params = (d[n] for n in self.active for d in (self.lora_A, self.lora_B, self.sparse_values) if n in d)
        return any(p.requires_grad for p in params)

    def _infer_split(self, x: torch.Tensor) -> torch.Tensor:
        """Inference without autograd: the base's own product, then each active correction added in place.

        Over a dense base the training kernel folds the sparse entries into a transient copy of ``W`` (one GEMM
        instead of a GEMM plus spmm and spmm_t); without a backward that copy is an extra pass over the weight
        on every call, which doubles the cost of decoding, while the sparse product costs ``tokens * nnz``.
        Over a GPTQ base folding is free inside the dequantization, so only decode-sized inputs (a few tokens,
        where the fold's fixed cost shows) come here.
        """
        base = self.base  # one nn.Module.__getattr__ (submodules are not plain attributes)
        if isinstance(base, nn.Linear):  # a module call less: decode is call-bound
            y = F.linear(x, base.weight, base.bias)  # (..., out)
        else:
            y = base(x)
        y2 = y.view(-1, self.out_features)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype == torch.float32 and x2.device.type == "cpu" and x2.is_contiguous() and y2.is_contiguous():
            # CPU fp32: the cached arrays, a few attribute reads and two or three kernel calls per adapter (the
            # generic path's lookups and casts cost ~20 us a layer at 128 tokens, 2-3% of a decoder block)
            parts = [_numpy_parts(self, name) for name in self.active]
            if None not in parts:
                if x2.requires_grad or y2.requires_grad:  # no_grad with a leaf input; detach() only when needed
                    x2, y2 = x2.detach(), y2.detach()
                _add_parts(parts, x2, y2)
                return y
        for name in self.active:
            _add_delta(self, name, x2, y2)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={self.adapter_names}"


_SPLIT_MAX_TOKENS = 4  # GPTQ base: up to this many tokens per call skip the fold (measured: benchmarks/switch.py)
_csr_warning_silenced = False


def _csr(s: CSRSupport, values: torch.Tensor) -> torch.Tensor:
    """A torch sparse CSR view of ``S`` (no copy). torch warns once per process that CSR is "beta"; that
    first warning is silenced here (it would land in the CLI's output), later calls skip the filter's cost."""
    global _csr_warning_silenced
    if _csr_warning_silenced:
        return torch.sparse_csr_tensor(s.row_ptr, s.col_idx, values, s.shape, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        t = torch.sparse_csr_tensor(s.row_ptr, s.col_idx, values, s.shape, check_invariants=False)
    _csr_warning_silenced = True
    return t


_KERNEL_MAX_TOKENS = 4  # CPU fp32 calls of at most this many tokens add the correction in one compiled call


class KernelParts(NamedTuple):
    """One adapter's fp32 tensors as numpy arrays for the CPU kernels (see :func:`_numpy_parts`)."""

    A: np.ndarray  # [r, in] (r = 0: no low-rank part)
    Bt: np.ndarray  # B^T [r, out]
    scaling: float
    A_t: torch.Tensor | None  # A^T [in, r], a view of A (None: no low-rank part)
    Bt_t: torch.Tensor | None  # Bt as a tensor (shares its memory)
    values: np.ndarray  # [nnz] (empty: no sparse part)
    row_idx: np.ndarray  # int32 [nnz]
    col_idx: np.ndarray  # int32 [nnz]
    row_ptr: np.ndarray  # int32 [out + 1]

    def decode_args(self) -> tuple:
        """The arguments of ``add_correction_`` after ``x`` and ``y``."""
        return self.A, self.Bt, self.scaling, self.values, self.row_idx, self.col_idx


def _numpy_parts(layer: SparseLowRankLinear, name: str) -> KernelParts | None:
    """Adapter ``name``'s fp32 tensors as the CPU kernels' arguments (cached per layer; None: not fp32).

    ``A``, the values and the support are numpy views sharing memory with the parameters, so in-place updates
    show through; ``B`` goes in transposed (``[r, out]``: the kernel's axpy rows), a copy rebuilt when ``B``'s
    version moves. The layer empties the cache when it replaces an adapter's tensors or is moved or cast.
    """
    hit = layer._numpy_parts.get(name)
    if hit is not None and (hit[0] is None or hit[0]._version == hit[1]):
        return hit[2]
    A, B, values = layer.lora_A.get(name), layer.lora_B.get(name), layer.sparse_values.get(name)
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu") for t in (A, B, values)):
        return None
    out_f, in_f = layer.out_features, layer.in_features
    if A is None:
        a, bt = np.empty((0, in_f), np.float32), np.empty((0, out_f), np.float32)
        a_t = bt_t = None
    else:
        a_t, bt_t = A.detach().t(), B.detach().t().contiguous()
        a, bt = A.detach().numpy(), bt_t.numpy()
    if values is None:
        v, row_idx, col_idx = np.empty(0, np.float32), np.empty(0, np.int32), np.empty(0, np.int32)
        row_ptr = np.zeros(out_f + 1, np.int32)
    else:
        s = layer.supports[name]
        v = values.detach().numpy()
        row_idx, col_idx = s.row_idx.to(torch.int32).numpy(), s.col_idx.to(torch.int32).numpy()
        row_ptr = s.row_ptr.to(torch.int32).numpy()
    parts = KernelParts(a, bt, float(layer.scaling.get(name, 1.0)), a_t, bt_t, v, row_idx, col_idx, row_ptr)
    layer._numpy_parts[name] = (B, None if B is None else B._version, parts)
    return parts


def _add_parts(parts: list[KernelParts], x2: torch.Tensor, y2: torch.Tensor) -> None:
    """``y2 [T, out] += `` the corrections ``parts`` on ``x2 [T, in]`` (fp32 CPU, C-contiguous, no autograd)."""
    cpu_sparse = kernel_module("_cpu_sparse")
    xn, yn = x2.numpy(), y2.numpy()
    if xn.shape[0] <= _KERNEL_MAX_TOKENS:
        for p in parts:  # decode: one compiled call instead of five or six torch ops (their dispatch is most of it)
            cpu_sparse.add_correction_(xn, yn, *p.decode_args())
        return
    for p in parts:
        if p.A_t is not None:  # many tokens: MKL's two small GEMMs
            y2.addmm_(x2.mm(p.A_t), p.Bt_t, alpha=p.scaling)  # (T, r) @ (r, out)
        if p.values.shape[0]:  # in place by the compiled kernel, straight from the cached arrays
            cpu_sparse.add_spmm_arrays_(xn, yn, p.values, p.row_ptr, p.col_idx)


def _add_delta(layer: SparseLowRankLinear, name: str, x2: torch.Tensor, y2: torch.Tensor) -> None:
    """``y2 [T, out] += correction of adapter name on x2 [T, in]`` (inference, no autograd; any device and
    dtype: CPU fp32 takes :func:`_add_parts`)."""
    if name in layer.lora_A:
        A, B = layer.lora_A[name].to(x2.dtype), layer.lora_B[name].to(x2.dtype)
        y2.addmm_(x2 @ A.t(), B.t(), alpha=layer.scaling[name])  # (T, r) @ (r, out)
    if name in layer.sparse_values:
        s, values = layer.supports[name], layer.sparse_values[name].to(x2.dtype)
        if x2.device.type == "cpu" and x2.dtype in (torch.float32, torch.float64):
            # torch's CSR matmul: ~10x less call overhead than spmm at a few tokens (MKL's: fp32/fp64 only)
            y2.add_((_csr(s, values) @ x2.t()).t())  # (out, T) -> (T, out)
        else:  # the dispatcher computes half types in fp32
            from sparsepack.kernels import spmm

            y2.add_(spmm(x2, values, s.row_ptr, s.col_idx, s.shape))


def _delta(layer: SparseLowRankLinear, name: str, x: torch.Tensor) -> torch.Tensor:
    """The correction of adapter ``name`` alone on ``x`` (inference path of mixed batches)."""
    y = torch.zeros(*x.shape[:-1], layer.out_features, dtype=x.dtype, device=x.device)
    if name in layer.lora_A:
        y = y + layer.scaling[name] * ((x @ layer.lora_A[name].to(x.dtype).t()) @ layer.lora_B[name].to(x.dtype).t())
    if name in layer.sparse_values:
        from sparsepack.kernels import spmm

        s = layer.supports[name]
        y = y + spmm(x, layer.sparse_values[name].to(x.dtype), s.row_ptr, s.col_idx, s.shape)
    return y
