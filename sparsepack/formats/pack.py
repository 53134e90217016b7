"""Write and read pack directories (format v1; spec in docs/FORMAT.md).

Writing is atomic (``staging.py``: a temporary sibling renamed into place when complete; an existing output is
replaced only when asked and only when this tool wrote it). Reading validates before anything large is
allocated: manifest, file sizes and hashes, safetensors headers, tensor shapes/dtypes against the model config,
adapter indices.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsepack.formats import gptq_layout
from sparsepack.formats.adapter_layout import Adapter, read_adapter, validate_adapter_name
from sparsepack.formats.errors import (
    ConfigError,
    FormatError,
    HashMismatchError,
    ManifestError,
    MissingFileError,
    ShapeError,
    UnsafeFileError,
    UnsafePathError,
)
from sparsepack.formats.manifest import MANIFEST_FILE, Manifest, sha256_file
from sparsepack.formats.safetensors_check import TensorInfo, read_header, read_tensor_bytes
from sparsepack.formats.staging import staged_dir, stale_siblings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INT_DTYPE = {"qweight": "I32", "qzeros": "I32", "g_idx": "I32"}
FLOAT_DTYPES = ("F16", "BF16", "F32")


# ------------------------------------------------------------------------------------------------ writing


def record_files(root: Path, manifest: Manifest) -> None:
    """Fill ``manifest.files`` with the sha256 and size of every file under ``root`` except the manifest."""
    files = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_FILE:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest.files = files


def write_pack(out: Path, manifest: Manifest, populate: Callable[[Path], None], overwrite: bool = False,
               inputs: Iterable[Path | str | None] = ()) -> Path:  # fmt: skip
    """Write a pack atomically: ``populate(tmpdir)`` writes the files, then hashes and the manifest go in.

    ``inputs``: the paths the command read, which the output must not overlap (:func:`staging.check_output`).
    """
    with staged_dir(out, overwrite, inputs) as tmp:
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
    if not isinstance(rel, str) or "\x00" in rel:
        raise UnsafePathError(f"path {rel!r} is not a relative path string", root)
    if not rel or os.path.isabs(rel) or any(part == ".." for part in Path(rel).parts):
        raise UnsafePathError(f"path {rel!r} escapes the pack", root)
    path = root / rel
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise UnsafePathError(f"{rel!r} cannot be resolved ({e})", root) from None
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafePathError(f"{rel!r} resolves outside the pack (symlink?)", root)
    return path


def check_links(root: Path) -> None:
    """Refuse a pack holding a symlink that is broken, loops, or resolves outside it (at any depth).

    The manifest's own paths are checked one by one by :func:`safe_child`; this also covers files a reader
    opens without the manifest naming them (the manifest itself, config.json, adapter files).
    """
    top = os.path.realpath(root)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            rel = os.path.relpath(path, root)
            try:
                target = os.path.realpath(path, strict=True)
            except OSError as e:  # dangling or looping
                raise UnsafePathError(f"symlink {rel!r} is broken ({e.strerror})", root) from None
            if os.path.commonpath([top, target]) != top:
                raise UnsafePathError(f"symlink {rel!r} resolves outside the pack, to {target}", root)


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
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise FormatError(f"invalid safetensors index ({type(e).__name__}: {e})", index) from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError("'weight_map' must map tensor names to file names", index)
        names = sorted(set(weight_map.values()))
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
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
            raise ConfigError(f"invalid JSON: {e}", root / "quantize_config.json") from None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        if not callable(getattr(qc, "to_dict", None)):
            raise ConfigError(f"quantization_config must be an object, got {type(qc).__name__}", root / "config.json")
        qc = qc.to_dict()
    method = str(qc.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise ConfigError(
            f"quantization method {method!r} is not supported (GPTQ only)", root / "config.json"
        )
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if type(bits) is not int or bits not in (2, 3, 4, 8):  # type(): refuse 4.0 and True as well
        raise ConfigError(f"quantization bits {bits!r} not in (2, 3, 4, 8)", root / "config.json")
    if type(group_size) is not int or (group_size <= 0 and group_size != -1) or group_size > 2**20:
        raise ConfigError(f"group_size {group_size!r} invalid", root / "config.json")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"checkpoint_format {fmt!r} not supported (gptq or gptq_v2)", root / "config.json")
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
    except Exception as e:  # noqa: BLE001 - config classes run their own validators, each with its own error type
        raise ConfigError(f"cannot read model config: {type(e).__name__}: {e}", path) from None
    return config


# Config fields that size tensors or count modules, with the largest value accepted. A hostile config then fails
# here rather than while the model is built (`num_hidden_layers: 2**40` would build modules until memory runs
# out). An int, or a list of ints for per-layer values; None where the architecture derives the value.
DIM_LIMITS = {
    **dict.fromkeys(("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_inner", "moe_intermediate_size"),
                    2**31 - 1),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer"), 2**16),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts"), 2**16),
}  # fmt: skip
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer")  # each layer holds at least one tensor


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_int_list(v: object) -> bool:
    return isinstance(v, list) and all(type(i) is int for i in v)


RUNTIME_FLAGS = {"use_cache": (_is_bool,), "return_dict": (_is_bool,), "tie_word_embeddings": (_is_bool,),
                 "output_attentions": (_is_bool,), "output_hidden_states": (_is_bool, _is_int_list)}  # fmt: skip


def check_config_dims(config: Any, n_tensors: int, path: Path) -> None:
    """Refuse non-integer, non-positive or huge dimensions in ``config`` before any model is built."""
    for key, limit in DIM_LIMITS.items():
        value = getattr(config, key, None)
        if value is None:
            continue
        values = value if isinstance(value, list) and key not in LAYER_COUNTS else [value]
        if not all(type(v) is int and 1 <= v <= limit for v in values):
            raise ConfigError(f"config field {key} = {value!r} must be a positive integer up to {limit}", path)
        if key in LAYER_COUNTS and value > n_tensors:
            raise ConfigError(f"config field {key} = {value} but the checkpoint holds only {n_tensors} tensors",
                              path)  # fmt: skip
    for key, kinds in RUNTIME_FLAGS.items():  # read by every forward pass: a hostile value fails there, late
        value = getattr(config, key, None)
        if value is not None and not any(kind(value) for kind in kinds):
            raise ConfigError(f"config field {key} = {value!r} has the wrong type", path)


def _build_skeleton(config: Any, path: Path) -> Any:
    from sparsepack.layers.skeleton import empty_model

    try:
        return empty_model(config)
    except Exception as e:  # noqa: BLE001 - model constructors assert, divide and raise on inconsistent configs
        raise ConfigError(f"cannot build the model from config.json: {type(e).__name__}: {e}", path) from None


def check_g_idx(pack: Pack) -> None:
    """Every ``g_idx`` entry must name a group in ``[0, G)``: kernels index scales and zeros with it unchecked."""
    import torch

    for name in pack.quantized_modules:
        info = pack.tensors.get(f"{name}.g_idx")
        if info is None or info.dtype != "I32":
            continue  # check_shapes reports it
        K = info.shape[0] if info.shape else 0
        G = gptq_layout.num_groups(K, pack.quant["group_size"])
        g = torch.frombuffer(bytearray(read_tensor_bytes(info)), dtype=torch.int32)
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= G):
            raise ShapeError(f"g_idx values must lie in [0, {G}), found [{int(g.min())}, {int(g.max())}]",
                             info.file, info.name)  # fmt: skip


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
        left = [p.name for p in stale_siblings(root) if (p / "x").is_dir()]
        hint = f"; a writer died while replacing it, the previous version is in {left[0]}/x" if left else ""
        raise MissingFileError(f"no such pack or model directory{hint}", root)
    if not root.is_dir():
        if root.suffix in PICKLE_SUFFIXES:
            raise UnsafeFileError("pickle checkpoints are refused and never unpickled; convert to safetensors",
                                  root)  # fmt: skip
        raise FormatError("not a directory (a pack is a directory)", root)
    manifest_path = root / MANIFEST_FILE
    if os.path.lexists(manifest_path):
        check_links(root)
        if not manifest_path.is_file():
            raise ManifestError("not a regular file", manifest_path)
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
        from sparsepack.layers.skeleton import linear_shapes

        check_config_dims(config, len(tensors), root / "config.json")
        model = _build_skeleton(config, root / "config.json")
        check_shapes(pack, model)
        if quant is not None:
            check_g_idx(pack)
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
