"""On-disk layout of one adapter: a PEFT LoRA part plus a sparse CSR sidecar.

``adapters/<name>/``

- ``adapter_config.json``: PEFT ``LoraConfig`` (per-module ranks in ``rank_pattern``); absent when no module
  has a low-rank part.
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``[r, in]`` and
  ``...lora_B.weight`` ``[out, r]`` — PEFT loads it as is.
- ``sparse_adapter.safetensors``: per module ``<module>.values`` ``[nnz]`` (float), ``<module>.row_ptr``
  int32 ``[out + 1]`` (monotone, 0 .. nnz), ``<module>.col_idx`` int32 ``[nnz]`` (in ``[0, in)``), i.e. a CSR
  matrix ``S [out, in]`` added to the weight: ``W' = W + s * B @ A + S``. Absent when no module is sparse.
- ``sparsepack_adapter.json``: ``{"method", "modules": {name: {"shape": [out, in], "rank", "alpha", "nnz"}},
  "support", "training"}``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsepack.formats.errors import (
    FormatError,
    MissingFileError,
    SafetensorsHeaderError,
    ShapeError,
    SparseIndexError,
    UnsafePathError,
)
from sparsepack.formats.json_file import read_json
from sparsepack.formats.safetensors_check import read_header

PEFT_PREFIX = "base_model.model."
ADAPTER_META = "sparsepack_adapter.json"
LORA_CONFIG = "adapter_config.json"
LORA_WEIGHTS = "adapter_model.safetensors"
SPARSE_WEIGHTS = "sparse_adapter.safetensors"
MAX_ALPHA = 65504.0  # the scale alpha / r must fit fp16, the dtype adapters run in on GPU
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def validate_adapter_name(name: str) -> str:
    """Adapter names become directory names: refuse separators, '..', and anything exotic."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UnsafePathError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter "
            "or digit, with no path separators and no '..'"
        )
    return name


@dataclass
class AdapterModule:
    """One module's correction ``s * B @ A + S`` with ``S`` in CSR form. Any part may be absent."""

    shape: tuple[int, int]  # (out_features, in_features) of the base linear
    A: torch.Tensor | None = None  # [r, in]
    B: torch.Tensor | None = None  # [out, r]
    alpha: float = 16.0
    values: torch.Tensor | None = None  # [nnz]
    row_ptr: torch.Tensor | None = None  # int32 [out + 1]
    col_idx: torch.Tensor | None = None  # int32 [nnz]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    @property
    def nnz(self) -> int:
        return 0 if self.values is None else self.values.numel()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclass
class Adapter:
    """A named set of module corrections plus metadata."""

    modules: dict[str, AdapterModule]
    method: str = "rosa"
    meta: dict[str, Any] = field(default_factory=dict)  # support rule, training summary, ...


def check_csr(file: object, module: str, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
              shape: tuple[int, int]) -> None:  # fmt: skip
    """Validate a CSR triple; raises SparseIndexError / ShapeError naming file and tensor."""
    out_f, in_f = shape
    if row_ptr.dtype != torch.int32 or col_idx.dtype != torch.int32:
        raise ShapeError("row_ptr and col_idx must be int32", file, f"{module}.row_ptr")
    if row_ptr.dim() != 1 or row_ptr.numel() != out_f + 1:
        raise ShapeError(f"row_ptr has shape {tuple(row_ptr.shape)}, expected ({out_f + 1},)", file,
                         f"{module}.row_ptr")  # fmt: skip
    if col_idx.dim() != 1 or values.dim() != 1 or col_idx.numel() != values.numel():
        raise ShapeError(f"col_idx {tuple(col_idx.shape)} and values {tuple(values.shape)} must be 1-D of equal "
                         "length", file, f"{module}.col_idx")  # fmt: skip
    nnz = values.numel()
    if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz:
        raise SparseIndexError(f"row_ptr must start at 0 and end at nnz={nnz}", file, f"{module}.row_ptr")
    if bool((row_ptr[1:] < row_ptr[:-1]).any()):
        raise SparseIndexError("row_ptr is not monotone non-decreasing", file, f"{module}.row_ptr")
    if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= in_f):
        raise SparseIndexError(f"column index out of range [0, {in_f})", file, f"{module}.col_idx")


def _peft_config(adapter: Adapter, base_model: str) -> dict[str, Any] | None:
    lowrank = {n: m for n, m in adapter.modules.items() if m.rank}
    if not lowrank:
        return None
    ranks = sorted({m.rank for m in lowrank.values()})
    r = max(ranks, key=lambda k: sum(m.rank == k for m in lowrank.values()))
    alphas = [m.alpha for m in lowrank.values()]
    alpha = max(set(alphas), key=alphas.count)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        # exact module names (PEFT matches a list entry by suffix, so full names select exactly these)
        "target_modules": sorted(lowrank),
        "rank_pattern": {f"^{re.escape(n)}$": m.rank for n, m in lowrank.items() if m.rank != r},
        "alpha_pattern": {f"^{re.escape(n)}$": m.alpha for n, m in lowrank.items() if m.alpha != alpha},
        "lora_dropout": float(adapter.meta.get("dropout", 0.0)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def write_adapter(directory: Path, adapter: Adapter, base_model: str = "") -> list[str]:
    """Write ``adapter`` into ``directory`` (which must exist). Returns the file names written."""
    directory = Path(directory)
    written = []
    cfg = _peft_config(adapter, base_model)
    if cfg is not None:
        tensors = {}
        for n, m in adapter.modules.items():
            if m.rank:
                tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.A.detach().contiguous()
                tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.B.detach().contiguous()
        save_file(tensors, str(directory / LORA_WEIGHTS))
        (directory / LORA_CONFIG).write_text(json.dumps(cfg, indent=2))
        written += [LORA_WEIGHTS, LORA_CONFIG]
    sparse = {}
    for n, m in adapter.modules.items():
        if m.values is not None:
            sparse[f"{n}.values"] = m.values.detach().contiguous()
            sparse[f"{n}.row_ptr"] = m.row_ptr.to(torch.int32).contiguous()
            sparse[f"{n}.col_idx"] = m.col_idx.to(torch.int32).contiguous()
    if sparse:
        save_file(sparse, str(directory / SPARSE_WEIGHTS))
        written.append(SPARSE_WEIGHTS)
    meta = {
        "method": adapter.method,
        "modules": {
            n: {"shape": list(m.shape), "rank": m.rank, "alpha": m.alpha, "nnz": m.nnz, **m.extra}
            for n, m in adapter.modules.items()
        },
        **adapter.meta,
    }
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    written.append(ADAPTER_META)
    return written


def _load_checked(path: Path) -> dict[str, torch.Tensor]:
    """Load a small safetensors file after validating its header ourselves (typed errors, no duplicate names)."""
    read_header(path)
    try:
        return load_file(str(path))
    except SafetensorError as e:  # stricter than read_header in places (holes between tensors, metadata types)
        raise SafetensorsHeaderError(f"rejected by safetensors: {e}", path) from None


def _read_meta(directory: Path) -> tuple[Path, dict[str, Any]]:
    """The adapter's ``sparsepack_adapter.json``: its path and its object, which must hold a ``modules`` object."""
    meta_path = directory / ADAPTER_META
    if not meta_path.is_file():
        raise MissingFileError(f"missing {ADAPTER_META}", directory)
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), dict):
        raise FormatError("must be an object with a 'modules' object", meta_path)
    return meta_path, meta


def _module_from_meta(name: str, info: Any, meta_path: Path,
                      expected_shapes: dict[str, tuple[int, int]] | None) -> AdapterModule:  # fmt: skip
    """One module's metadata entry as an :class:`AdapterModule` without tensors: shape, alpha and extras checked."""
    shape = info.get("shape") if isinstance(info, dict) else None
    if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(d, int) and 0 < d < 2**31 for d in shape):
        raise ShapeError(f"module shape must be [out, in] positive integers, got {shape!r}", meta_path, name)
    shape_t = (shape[0], shape[1])
    if expected_shapes is not None:
        if name not in expected_shapes:
            raise ShapeError("module is not a linear layer of the base model", meta_path, name)
        if expected_shapes[name] != shape_t:
            raise ShapeError(f"adapter shape {shape_t} != base layer shape {expected_shapes[name]}", meta_path,
                             name)  # fmt: skip
    alpha = info.get("alpha", 16.0)
    if type(alpha) not in (int, float) or not abs(alpha) <= MAX_ALPHA:  # `not <=` also catches NaN
        raise FormatError(f"alpha must be a number in [-{MAX_ALPHA}, {MAX_ALPHA}], got {alpha!r}", meta_path, name)
    extra = {k: v for k, v in info.items() if k not in ("shape", "rank", "alpha", "nnz")}
    return AdapterModule(shape=shape_t, alpha=float(alpha), extra=extra)


def _attach_lora(lora_path: Path, modules: dict[str, AdapterModule]) -> None:
    """Set each module's ``A`` / ``B`` from the PEFT weights file, then check that they pair up and fit."""
    for key, t in _load_checked(lora_path).items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise FormatError("unexpected tensor name in LoRA weights", lora_path, key)
        name, part = key[len(PEFT_PREFIX) :].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if name not in modules:
            raise ShapeError("LoRA tensor for a module absent from the adapter metadata", lora_path, key)
        setattr(modules[name], "A" if part == "lora_A" else "B", t)
    for name, m in modules.items():
        if (m.A is None) != (m.B is None):
            raise MissingFileError("lora_A and lora_B must both be present", lora_path, name)
        if m.A is not None:
            if not (m.A.is_floating_point() and m.B.is_floating_point()):
                raise ShapeError(f"lora_A/lora_B must be float, got {m.A.dtype}/{m.B.dtype}", lora_path, name)
            out_f, in_f = m.shape
            r = m.A.shape[0] if m.A.dim() == 2 else -1  # a 0-d or 1-d lora_A has no rank: refused just below
            if m.A.dim() != 2 or m.A.shape[1] != in_f or tuple(m.B.shape) != (out_f, r):
                raise ShapeError(f"lora_A {tuple(m.A.shape)} / lora_B {tuple(m.B.shape)} do not fit "
                                 f"[r, {in_f}] / [{out_f}, r]", lora_path, name)  # fmt: skip


def _attach_sparse(sparse_path: Path, modules: dict[str, AdapterModule]) -> None:
    """Set each module's CSR ``values`` / ``row_ptr`` / ``col_idx`` from the sparse sidecar, each triple checked."""
    tensors = _load_checked(sparse_path)
    names = {k.rsplit(".", 1)[0] for k in tensors}
    for name in names:
        if name not in modules:
            raise ShapeError("sparse tensors for a module absent from the adapter metadata", sparse_path, name)
        try:
            values, row_ptr, col_idx = (tensors[f"{name}.{p}"] for p in ("values", "row_ptr", "col_idx"))
        except KeyError as e:
            raise MissingFileError(f"missing {e.args[0]}", sparse_path, name) from None
        if not values.is_floating_point():
            raise ShapeError(f"values must be float, got {values.dtype}", sparse_path, f"{name}.values")
        check_csr(sparse_path, name, row_ptr, col_idx, values, modules[name].shape)
        m = modules[name]
        m.values, m.row_ptr, m.col_idx = values, row_ptr, col_idx


def _check_declared_counts(directory: Path, meta: dict[str, Any], modules: dict[str, AdapterModule]) -> None:
    """The rank and nnz the metadata declares must be what the weights hold (a missing or swapped file shows here)."""
    for name, info in meta["modules"].items():
        for key, actual in (("rank", modules[name].rank), ("nnz", modules[name].nnz)):
            declared = info.get(key)
            if declared is not None and declared != actual:
                raise ShapeError(f"{ADAPTER_META} declares {key} {declared!r} but the weights hold {actual}",
                                 directory, name)  # fmt: skip


def _check_peft_config(path: Path) -> None:
    """The PEFT config beside the weights: PEFT and LoRA servers size layers from its ``r`` and scale by
    ``lora_alpha / r``, so both must be usable numbers (sparsepack itself reads the per-module record)."""
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise FormatError("must be a JSON object", path)
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
    if type(r) is not int or not 1 <= r <= 2**20:
        raise FormatError(f"'r' must be a positive integer, got {r!r:.40}", path)
    if type(alpha) not in (int, float) or not math.isfinite(alpha):
        raise FormatError(f"'lora_alpha' must be a finite number, got {alpha!r:.40}", path)


def read_adapter(directory: Path, expected_shapes: dict[str, tuple[int, int]] | None = None) -> Adapter:
    """Read and validate an adapter directory.

    Args:
        directory: ``adapters/<name>`` inside a pack.
        expected_shapes: module name -> (out, in) of the base model's linears; when given, every adapter
            module must exist in the base with that shape.
    """
    directory = Path(directory)
    meta_path, meta = _read_meta(directory)
    modules = {
        name: _module_from_meta(name, info, meta_path, expected_shapes) for name, info in meta["modules"].items()
    }
    if (directory / LORA_WEIGHTS).is_file():
        _attach_lora(directory / LORA_WEIGHTS, modules)
    if (directory / LORA_CONFIG).is_file():
        _check_peft_config(directory / LORA_CONFIG)
    if (directory / SPARSE_WEIGHTS).is_file():
        _attach_sparse(directory / SPARSE_WEIGHTS, modules)
    _check_declared_counts(directory, meta, modules)
    meta_rest = {k: v for k, v in meta.items() if k not in ("method", "modules")}
    return Adapter(modules=modules, method=str(meta.get("method", "unknown")), meta=meta_rest)
