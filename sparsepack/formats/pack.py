"""Write and read pack directories (format v1; spec in docs/FORMAT.md).

Writing is atomic: everything goes into a temporary sibling directory that is renamed into place only when
complete, so a crash or an error never leaves a partial pack at the output path, and an existing pack is
replaced only when asked. Reading validates before anything large is allocated: manifest, file sizes and
hashes, safetensors headers, tensor shapes/dtypes against the model config, adapter indices.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsepack.formats import gptq_layout
from sparsepack.formats.adapter_layout import Adapter, read_adapter, validate_adapter_name
from sparsepack.formats.errors import (
    FormatError,
    HashMismatchError,
    ManifestError,
    MissingFileError,
    OutputExistsError,
    ShapeError,
    UnsafeFileError,
    UnsafePathError,
)
from sparsepack.formats.manifest import MANIFEST_FILE, Manifest, sha256_file
from sparsepack.formats.safetensors_check import TensorInfo, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INT_DTYPE = {"qweight": "I32", "qzeros": "I32", "g_idx": "I32"}
FLOAT_DTYPES = ("F16", "BF16", "F32")


# ------------------------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out``; on success rename it to ``out``, on failure delete it.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is False (checked before and at the rename, so
            of two concurrent writers one wins and the other fails cleanly).
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError("output exists (pass --overwrite to replace it)", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            if not overwrite:
                raise OutputExistsError("output appeared while writing (another writer?)", out)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError as e:  # ENOTEMPTY/EEXIST: someone else renamed into place first
                raise OutputExistsError(f"output appeared while writing ({e.strerror})", out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def record_files(root: Path, manifest: Manifest) -> None:
    """Fill ``manifest.files`` with the sha256 and size of every file under ``root`` except the manifest."""
    files = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_FILE:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest.files = files


def write_pack(
    out: Path, manifest: Manifest, populate: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Write a pack atomically: ``populate(tmpdir)`` writes the files, then hashes and the manifest go in."""
    with staged_dir(out, overwrite) as tmp:
        populate(tmp)
        record_files(tmp, manifest)
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
    return Path(out)


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class Pack:
    """A validated pack (or foreign GPTQ / plain HF checkpoint) directory; tensors are not loaded."""

    path: Path
    kind: str  # "sparsepack" | "gptq" (foreign GPTQ-v1/v2 checkpoint) | "hf" (plain dense model)
    manifest: Manifest
    config: Any  # transformers.PretrainedConfig
    quant: dict[str, Any] | None  # bits, group_size, desc_act, sym, checkpoint_format
    tensors: dict[str, TensorInfo]
    adapters: dict[str, Adapter] = field(default_factory=dict)

    @property
    def quantized_modules(self) -> list[str]:
        return sorted(n[: -len(".qweight")] for n in self.tensors if n.endswith(".qweight"))


def safe_child(root: Path, rel: str) -> Path:
    """``root / rel`` after checking that it stays inside ``root`` (no '..', absolute paths, or symlinks out)."""
    if not rel or os.path.isabs(rel) or any(part == ".." for part in Path(rel).parts):
        raise UnsafePathError(f"path {rel!r} escapes the pack", root)
    path = root / rel
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafePathError(f"{rel!r} resolves outside the pack (symlink?)", root)
    return path


def _refuse_pickles(root: Path) -> None:
    pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UnsafeFileError(
            f"only pickle checkpoints found ({', '.join(sorted(pickles))}); sparsepack never unpickles files. "
            "Convert it once in a trusted environment: AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(out, safe_serialization=True)",
            root,
        )


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"invalid safetensors index ({e})", index) from None
        return [safe_child(root, n) for n in names]
    single = root / "model.safetensors"
    if single.exists():
        return [safe_child(root, "model.safetensors")]
    _refuse_pickles(root)
    raise MissingFileError("no model.safetensors or model.safetensors.index.json", root)


def _read_quant_config(root: Path, config: Any) -> dict[str, Any] | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None and (root / "quantize_config.json").is_file():
        try:
            qc = json.loads((root / "quantize_config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"invalid JSON: {e}", root / "quantize_config.json") from None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = str(qc.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise FormatError(
            f"quantization method {method!r} is not supported (GPTQ only)", root / "config.json"
        )
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if bits not in (2, 3, 4, 8):
        raise FormatError(f"quantization bits {bits!r} not in (2, 3, 4, 8)", root / "config.json")
    if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1) or group_size > 2**20:
        raise FormatError(f"group_size {group_size!r} invalid", root / "config.json")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise FormatError(f"checkpoint_format {fmt!r} not supported (gptq or gptq_v2)", root / "config.json")
    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(qc.get("desc_act", False)),
        "sym": bool(qc.get("sym", True)),
        "checkpoint_format": fmt,
    }


def _load_config(root: Path) -> Any:
    from transformers import AutoConfig

    path = root / "config.json"
    if not path.is_file():
        raise MissingFileError("missing config.json", root)
    try:
        config = AutoConfig.from_pretrained(str(root), trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise FormatError(f"cannot read model config: {e}", path) from None
    return config


def check_shapes(pack: Pack, model: Any) -> None:
    """Every tensor in the checkpoint must be one the model expects, with the right shape and dtype."""
    import torch

    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = set(pack.quantized_modules)
    if quantized and pack.quant is None:
        raise FormatError(
            "checkpoint holds GPTQ tensors but config.json has no quantization_config", pack.path
        )
    for name in quantized:
        if name not in linears:
            raise ShapeError("GPTQ tensors for a module that is not a linear layer", pack.tensors[
                f"{name}.qweight"].file, f"{name}.qweight")  # fmt: skip
        lin = linears[name]
        gs = pack.quant["group_size"]
        shapes = gptq_layout.expected_shapes(lin.in_features, lin.out_features, pack.quant["bits"], gs)
        expected.pop(f"{name}.weight")
        for suffix, shape in shapes.items():
            expected[f"{name}.{suffix}"] = shape
    for name, info in pack.tensors.items():
        if name not in expected:
            raise ShapeError("tensor is not part of the model", info.file, name)
        if info.shape != expected[name]:
            raise ShapeError(f"shape {list(info.shape)} != expected {list(expected[name])}", info.file, name)
        suffix = name.rsplit(".", 1)[-1]
        module = name.rsplit(".", 1)[0]
        want = INT_DTYPE.get(suffix) if module in quantized else None
        if want and info.dtype != want:
            raise ShapeError(f"dtype {info.dtype} != {want}", info.file, name)
        if not want and info.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"dtype {info.dtype} is not a float type", info.file, name)
    tied = set()
    if getattr(pack.config, "tie_word_embeddings", False):
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = sorted(set(expected) - set(pack.tensors) - tied)
    if missing:
        raise ShapeError(f"{len(missing)} tensors missing, e.g. {missing[:3]}", pack.path, missing[0])


def read_pack(path: Path, verify: bool = True, check_config: bool = True) -> Pack:
    """Open and validate a pack directory without loading tensor data.

    Args:
        path: a sparsepack pack, a GPTQ-v1/v2 checkpoint directory (GPTQModel/AutoGPTQ) or a plain HF model.
        verify: check every file's sha256 against the manifest (sizes are always checked).
        check_config: compare every tensor's shape/dtype with the model built (on meta) from config.json.
    """
    root = Path(path)
    if not root.exists():
        raise MissingFileError("no such pack or model directory", root)
    if not root.is_dir():
        if root.suffix in PICKLE_SUFFIXES:
            raise UnsafeFileError("pickle checkpoints are refused and never unpickled; convert to safetensors",
                                  root)  # fmt: skip
        raise FormatError("not a directory (a pack is a directory)", root)
    manifest_path = root / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = Manifest.read(manifest_path)
        kind = "sparsepack"
        for rel, info in manifest.files.items():
            file = safe_child(root, rel)
            if not file.is_file():
                raise MissingFileError("listed in the manifest but absent", file)
            size = file.stat().st_size
            if size != info["bytes"]:
                raise HashMismatchError(f"size {size} != {info['bytes']} recorded in the manifest", file)
            if verify and sha256_file(file) != info["sha256"]:
                raise HashMismatchError("sha256 differs from the manifest (file modified or corrupt)", file)
    else:
        manifest = Manifest()
        kind = "unknown"
    config = _load_config(root)
    quant = _read_quant_config(root, config)
    if kind == "unknown":
        kind = "gptq" if quant is not None else "hf"
        manifest.base = {"source": str(root), "model_type": config.model_type}
        manifest.quantization = dict(quant) if quant else None
    tensors: dict[str, TensorInfo] = {}
    for file in _weight_files(root):
        if not file.is_file():
            raise MissingFileError("weight file named by the index is absent", file)
        for name, info in read_header(file).items():
            if name in tensors:
                raise ShapeError(f"tensor also present in {tensors[name].file.name}", file, name)
            tensors[name] = info
    pack = Pack(path=root, kind=kind, manifest=manifest, config=config, quant=quant, tensors=tensors)
    shapes = None
    if check_config:
        from sparsepack.layers.skeleton import empty_model, linear_shapes

        model = empty_model(config)
        check_shapes(pack, model)
        shapes = linear_shapes(model)
    for name, info in manifest.adapters.items():
        validate_adapter_name(name)
        rel = info.get("path", f"adapters/{name}") if isinstance(info, dict) else None
        if not isinstance(rel, str):
            raise ManifestError(f"adapter {name!r} has no valid 'path'", manifest_path)
        directory = safe_child(root, rel)
        if not directory.is_dir():
            raise MissingFileError(f"adapter {name!r} directory is absent", directory)
        pack.adapters[name] = read_adapter(directory, shapes)
    return pack
