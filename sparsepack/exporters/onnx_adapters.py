"""Swappable (unfused) adapters in an ONNX export: graph inputs with zero defaults + ``.onnx_adapter`` files.

Each adapted linear becomes ``y = base(x) + (x @ A_t) @ B_t + S x`` where the five adapter tensors of slot ``i``
are graph inputs (so onnxruntime's LoRA-adapter mechanism can feed them):

- ``adapter_{i}_lora_A`` float ``[in, r_i]`` and ``adapter_{i}_lora_B`` float ``[r_i, out]``: PEFT's ``A^T`` and
  ``(s * B)^T``, stored transposed so the graph runs two plain MatMuls (no per-call Transpose);
- ``adapter_{i}_values`` float ``[nnz_i]``, ``adapter_{i}_rows`` / ``adapter_{i}_cols`` int64 ``[nnz_i]`` (COO).

``r_i`` / ``nnz_i`` are symbolic, so adapters of any size share one graph. Every such input also has a zero
initializer of size 1 (an all-zero correction): with no active adapter the graph is the base model. An adapter
that does not touch slot ``i`` leaves it at those defaults. ``DIR/adapters/NAME.onnx_adapter`` holds one
adapter's tensors (``onnxruntime.AdapterFormat``); ``RunOptions.add_active_adapter`` switches between them.

The sparse term is exact in onnxruntime with any thread count: its scatter-adds are ``ScatterElements(add)``,
which onnxruntime's CPU EP runs serially. ``ScatterND(add)`` is faster at many rows but runs its indices in
parallel and loses updates to a repeated row (measured: 48 of 50 runs wrong at 2 threads, 1536 x 128, 5308
entries); a sparse row with several entries is the rule, so it is not used. An ``If`` on the number of token
rows picks between

- one row (decode): ``x`` and ``y`` viewed 1-D, ``GatherElements`` + ``Mul`` + ``ScatterElements`` (no index
  broadcast);
- many rows (prefill): the same on the last axis, the index vectors broadcast over the rows.

``--adapter-op custom`` replaces all of that by one ``sparsepack::SparseLowRankDelta`` node per slot
(:mod:`sparsepack.runtime.ort_ops`, a C library built on first use and registered with each session). Its slot
inputs are PEFT's layout and CSR: ``lora_A`` ``[r_i, in]``, ``lora_B`` ``[out, r_i]`` (scaling folded in),
``values`` ``[nnz_i]``, ``row_ptr`` int32 ``[out + 1]``, ``col_idx`` int32 ``[nnz_i]``. fp32 graphs only;
``--adapter-op custom-fp16`` stores ``lora_A`` / ``lora_B`` in fp16 (the kernel widens them as it reads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparsepack.runtime.ort_ops import CUSTOM_ADAPTER_OPS

# The five slot inputs of each adapter op ("standard": ONNX ops only, COO int64; "custom": sparsepack's op, CSR int32;
# "custom-fp16": the same op with the low-rank factors stored in fp16)
LAYOUTS = {"standard": ("lora_A", "lora_B", "values", "rows", "cols"),
           **dict.fromkeys(CUSTOM_ADAPTER_OPS, ("lora_A", "lora_B", "values", "row_ptr", "col_idx"))}  # fmt: skip
ADAPTER_DIR = "adapters"
SUFFIX = ".onnx_adapter"


# The scatter-adds accumulate in fp32: onnxruntime's CPU ScatterElements has no fp16 `add` reduction (an fp16
# export would fail at run time); for fp32 graphs the casts are no-ops and vanish.


def _sparse_one_row(x, y, values, rows, cols):
    """``y + x S^T`` for a single token row, on 1-D views (the If picks it only when ``x`` holds one row)."""
    contrib = x.reshape(-1).gather(0, cols) * values  # (nnz,)
    return y.reshape(-1).float().scatter_add(0, rows, contrib.float()).reshape(y.shape).to(y.dtype)


def _sparse_rowwise(x, y, values, rows, cols):
    """``y + x S^T`` with per-element gather/scatter over the last axis, for any number of rows."""
    shape = (*x.shape[:-1], cols.shape[0])  # (..., nnz)
    contrib = torch.gather(x, -1, cols.expand(shape)) * values
    return y.float().scatter_add(-1, rows.expand(shape), contrib.float()).to(y.dtype)


class AdapterSlotLinear(nn.Module):
    """A dense stand-in base plus one adapter slot whose tensors the export wrapper sets per call (``slot``).

    ``op`` picks the graph the slot becomes: ``standard`` ONNX ops, or one ``sparsepack::SparseLowRankDelta``.
    """

    def __init__(self, base: nn.Module, op: str = "standard") -> None:
        super().__init__()
        self.base = base
        self.op = op
        self.slot: tuple[torch.Tensor, ...] | None = None  # this call's slot tensors, in LAYOUTS[op] order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_custom(self.op):
            return self.base(x) + _custom_delta(x, *self.slot)
        A_t, B_t, values, rows, cols = self.slot
        y = self.base(x) + (x @ A_t) @ B_t  # (..., r) -> (..., out)
        one_row = x.numel() // x.shape[-1] == 1
        return torch.cond(one_row, _sparse_one_row, _sparse_rowwise, (x, y, values, rows, cols))


def _custom_delta(x, A, B, values, row_ptr, col_idx):
    """The slot's correction as one ``sparsepack::SparseLowRankDelta`` node (export only: no eager maths)."""
    from sparsepack.runtime.ort_ops import DOMAIN, OP, OP_VERSION

    scale = torch.ones(1, dtype=torch.float32)  # the scaling is folded into B
    return torch.onnx.ops.symbolic(f"{DOMAIN}::{OP}", (x, A, B, scale, values, row_ptr, col_idx), {},
                                   dtype=x.dtype, shape=(*x.shape[:-1], B.shape[0]), version=OP_VERSION)  # fmt: skip


def is_custom(op: str | None) -> bool:
    """Whether adapter op ``op`` is sparsepack's ``SparseLowRankDelta`` (needs its library in every session)."""
    return op in CUSTOM_ADAPTER_OPS


def lowrank_dtype(op: str, dtype=np.float32):
    """numpy dtype of the stored low-rank factors: fp16 for ``custom-fp16``, else the graph's float type."""
    return np.float16 if op == "custom-fp16" else dtype


def slot_names(i: int, op: str = "standard") -> list[str]:
    return [f"adapter_{i}_{p}" for p in LAYOUTS[op]]


def sample_slot(in_features: int, out_features: int, r: int = 6, nnz: int = 7, op: str = "standard"
                ) -> list[torch.Tensor]:  # fmt: skip
    """Trace-time tensors for one slot (sizes distinct from every other dynamic axis so none is specialized)."""
    idx = torch.arange(nnz, dtype=torch.long)
    if is_custom(op):
        row_ptr = torch.full((out_features + 1,), nnz, dtype=torch.int32)
        row_ptr[0] = 0
        ab = torch.float16 if op == "custom-fp16" else torch.float32
        return [torch.zeros(r, in_features, dtype=ab), torch.zeros(out_features, r, dtype=ab), torch.zeros(nnz),
                row_ptr, (idx % in_features).int()]  # fmt: skip
    return [torch.zeros(in_features, r), torch.zeros(r, out_features), torch.zeros(nnz),
            idx % out_features, idx % in_features]  # fmt: skip


def slot_dynamic_shapes(i: int, op: str = "standard") -> dict[str, dict[int, object] | None]:
    from torch.export import Dim

    r, nnz = Dim(f"r{i}", min=1), Dim(f"nnz{i}", min=1)
    a, b, v, ix, iy = slot_names(i, op)
    if is_custom(op):  # A [r, in], B [out, r], row_ptr [out + 1] (static)
        return {a: {0: r}, b: {1: r}, v: {0: nnz}, ix: None, iy: {0: nnz}}
    return {a: {1: r}, b: {0: r}, v: {0: nnz}, ix: {0: nnz}, iy: {0: nnz}}


def zero_defaults(slots: list[tuple[str, int, int]], dtype=np.float32, op: str = "standard") -> dict[str, np.ndarray]:
    """The size-1 all-zero default of every slot input (``slots``: (module, in, out) per slot)."""
    out = {}
    for i, (_, k, n) in enumerate(slots):
        a, b, v, ix, iy = slot_names(i, op)
        if is_custom(op):  # one stored zero, at (0, 0): row_ptr = [0, 1, 1, ..., 1]
            row_ptr = np.ones(n + 1, np.int32)
            row_ptr[0] = 0
            ab = lowrank_dtype(op, dtype)
            out.update({a: np.zeros((1, k), ab), b: np.zeros((n, 1), ab), v: np.zeros(1, dtype),
                        ix: row_ptr, iy: np.zeros(1, np.int32)})  # fmt: skip
            continue
        out.update({a: np.zeros((k, 1), dtype), b: np.zeros((1, n), dtype), v: np.zeros(1, dtype),
                    ix: np.zeros(1, np.int64), iy: np.zeros(1, np.int64)})  # fmt: skip
    return out


def add_defaults(proto, slots: list[tuple[str, int, int]], dtype=np.float32, op: str = "standard") -> None:
    """Give every slot input its zero initializer (an input that is also an initializer is an overridable default)."""
    from onnx import numpy_helper

    inputs = {i.name for i in proto.graph.input}
    for name, arr in zero_defaults(slots, dtype, op).items():
        if name not in inputs:
            raise ValueError(f"adapter input {name} missing from the exported graph")
        proto.graph.initializer.append(numpy_helper.from_array(arr, name))


def adapter_tensors(model: nn.Module, name: str, slots: list[tuple[str, int, int]], op: str = "standard"
                    ) -> dict[str, np.ndarray]:  # fmt: skip
    """Adapter ``name`` of the loaded pack as slot tensors, scaling folded into B.

    ``standard``: A, B transposed, CSR -> COO int64; ``custom``: A, B as PEFT stores them, CSR int32
    (``custom-fp16``: A, B in fp16).
    """
    out: dict[str, np.ndarray] = {}
    for i, (module, _, _) in enumerate(slots):
        layer = model.get_submodule(module)
        a, b, v, ix, iy = slot_names(i, op)
        if name in layer.lora_A:
            A = layer.lora_A[name].detach().float()  # (r, in)
            B = layer.scaling[name] * layer.lora_B[name].detach().float()  # (out, r)
            A, B = (A, B) if is_custom(op) else (A.t(), B.t())
            ab = lowrank_dtype(op)
            out[a], out[b] = np.ascontiguousarray(A.numpy(), ab), np.ascontiguousarray(B.numpy(), ab)
        if name in layer.sparse_values:
            s = layer.supports[name]
            out[v] = layer.sparse_values[name].detach().float().numpy()
            if is_custom(op):
                out[ix], out[iy] = s.row_ptr.to(torch.int32).numpy(), s.col_idx.to(torch.int32).numpy()
            else:
                out[ix], out[iy] = s.row_idx.long().numpy(), s.col_idx.long().numpy()
    return out


def round_lowrank_fp16(model: nn.Module) -> None:
    """Round every adapter's ``A`` and ``s * B`` to fp16 in place, as ``custom-fp16`` stores them.

    Validation of such an export then checks the graph against the adapter it holds, at fp32 tolerances; what the
    rounding itself costs is the benchmark's logit difference against the unrounded adapter.
    """
    from sparsepack.layers.adapter_linear import SparseLowRankLinear

    with torch.no_grad():
        for mod in model.modules():
            if not isinstance(mod, SparseLowRankLinear):
                continue
            for name in list(mod.lora_A):
                A, B, s = mod.lora_A[name], mod.lora_B[name], float(mod.scaling[name])
                A.copy_(A.half().float())
                if s != 0.0:
                    B.copy_((s * B).half().float() / s)


def write_adapter(path: Path, tensors: dict[str, np.ndarray], version: int = 1) -> None:
    """One ``.onnx_adapter`` file (onnxruntime's flatbuffer adapter format)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(version)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    fmt.export_adapter(str(path))


def run_options(path: Path):
    """``RunOptions`` with the adapter at ``path`` active (the adapter object must outlive the options)."""
    import onnxruntime as ort

    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    opts = ort.RunOptions()
    opts.add_active_adapter(adapter)
    return opts, adapter
