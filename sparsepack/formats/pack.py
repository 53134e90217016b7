"""Write and read pack directories (format v1; spec in docs/FORMAT.md).

Writing is atomic (``staging.py``: a temporary sibling renamed into place when complete; an existing output is
replaced only when asked and only when this tool wrote it). Reading validates before anything large is
allocated: manifest, file sizes and hashes, safetensors headers, tensor shapes/dtypes against the model config,
adapter indices.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsepack.formats.adapter_layout import Adapter, read_adapter, validate_adapter_name
from sparsepack.formats.errors import (
    FormatError,
    HashMismatchError,
    ManifestError,
    MissingFileError,
    ShapeError,
    UnsafeFileError,
    UnsafePathError,
)
from sparsepack.formats.json_file import read_json
from sparsepack.formats.manifest import MANIFEST_FILE, Manifest, sha256_file
from sparsepack.formats.model_config import (
    build_skeleton,
    check_config_dims,
    check_g_idx,
    check_shapes,
    linear_shapes,
    load_config,
    read_quant_config,
)
from sparsepack.formats.safetensors_check import TensorInfo, read_header
from sparsepack.formats.staging import staged_dir, stale_siblings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


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
    # the meta-device model read_pack checked the tensors against; the loader takes it (take_skeleton) instead of
    # building a second one
    skeleton: Any = field(default=None, repr=False, compare=False)
    checked: bool = False  # tensors and adapters were checked against the config (read_pack's check_config)
    pending: Any = field(default=None, repr=False, compare=False)  # hash check still running (defer_verify)

    def wait_verified(self) -> None:
        """Wait for a deferred hash check; raises ``HashMismatchError`` for a file that differs from the manifest."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def take_skeleton(self) -> Any:
        """The meta model built while reading (once: the caller fills it), or a fresh one."""
        model, self.skeleton = self.skeleton, None
        return model if model is not None else build_skeleton(copy.deepcopy(self.config), self.path / "config.json")

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
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FormatError("'weight_map' must map tensor names to file names", index)
        names = sorted(set(weight_map.values()))
        return [safe_child(root, n) for n in names]
    single = root / "model.safetensors"
    if single.exists():
        return [safe_child(root, "model.safetensors")]
    _refuse_pickles(root)
    raise MissingFileError("no model.safetensors or model.safetensors.index.json", root)


def read_pack(path: Path, verify: bool = True, check_config: bool = True, defer_verify: bool = False) -> Pack:
    """Open and validate a pack directory without loading tensor data.

    Args:
        path: a sparsepack pack, a GPTQ-v1/v2 checkpoint directory (GPTQModel/AutoGPTQ) or a plain HF model.
        verify: check every file's sha256 against the manifest (sizes are always checked).
        check_config: compare every tensor's shape/dtype with the model built (on meta) from config.json.
        defer_verify: return while the hashes are still being checked; the caller must call
            :meth:`Pack.wait_verified` before it hands out anything built from the pack (the loader does: hashing
            then overlaps with loading, whose allocations the size checks already bound).
    """
    root = Path(path)
    hashing = None
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
        listed = []
        for rel, info in manifest.files.items():
            file = safe_child(root, rel)
            if not file.is_file():
                raise MissingFileError("listed in the manifest but absent", file)
            size = file.stat().st_size
            if size != info["bytes"]:
                raise HashMismatchError(f"size {size} != {info['bytes']} recorded in the manifest", file)
            listed.append((file, info["sha256"]))
        if verify:
            hashing = _HashCheck(listed)
    else:
        check_links(root)  # a foreign model directory follows the same rule (its weights already did: safe_child)
        manifest = Manifest()
        kind = "unknown"
    try:
        pack = _read_checked(root, kind, manifest, check_config, listed_only=verify and kind == "sparsepack")
    except BaseException:
        if hashing is not None:
            hashing.result()  # a file that differs from the manifest is the error to report, not what it caused
        raise
    pack.pending = hashing
    if not defer_verify:
        pack.wait_verified()
    return pack


class _HashCheck:
    """sha256 of the listed files in a background thread (hashlib releases the GIL), so that verification overlaps
    with reading the config and building the meta model; sizes are checked before, so nothing unbounded runs
    meanwhile. :meth:`result` waits and raises ``HashMismatchError`` for the first file that differs."""

    def __init__(self, files: list[tuple[Path, str]]) -> None:
        self.bad: Path | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(files,), name="sparsepack-verify", daemon=True)
        self.thread.start()

    def _run(self, files: list[tuple[Path, str]]) -> None:
        try:
            self.bad = next((f for f, digest in files if sha256_file(f) != digest), None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the reading thread by result()
            self.error = e

    def result(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.bad is not None:
            raise HashMismatchError("sha256 differs from the manifest (file modified or corrupt)", self.bad)


def _read_checked(root: Path, kind: str, manifest: Manifest, check_config: bool, listed_only: bool) -> Pack:
    """The part of :func:`read_pack` after the manifest: config, tensor headers, shapes, adapters.

    ``listed_only`` (verification): every file read here must be one the manifest lists (and so hashes)."""
    manifest_path = root / MANIFEST_FILE

    def vouched(path: Path) -> None:
        rel = path.relative_to(root).as_posix()
        if listed_only and path.is_file() and rel not in manifest.files:
            raise ManifestError(f"{rel!r} is read but not listed in the manifest's files, so it cannot be verified",
                                manifest_path)  # fmt: skip

    for name in ("config.json", "quantize_config.json", "model.safetensors.index.json"):
        vouched(root / name)
    config = load_config(root)
    quant = read_quant_config(root, config)
    if kind == "unknown":
        kind = "gptq" if quant is not None else "hf"
        manifest.base = {"source": str(root), "model_type": config.model_type}
        manifest.quantization = dict(quant) if quant else None
    tensors: dict[str, TensorInfo] = {}
    for file in _weight_files(root):
        vouched(file)
        if not file.is_file():
            raise MissingFileError("weight file named by the index is absent", file)
        for name, info in read_header(file).items():
            if name in tensors:
                raise ShapeError(f"tensor also present in {tensors[name].file.name}", file, name)
            tensors[name] = info
    pack = Pack(path=root, kind=kind, manifest=manifest, config=config, quant=quant, tensors=tensors)
    shapes = None
    if check_config:
        check_config_dims(config, len(tensors), root / "config.json")
        model = build_skeleton(copy.deepcopy(config), root / "config.json")  # the model's own: callers mutate it
        check_shapes(pack, model)
        if quant is not None:
            check_g_idx(pack)
        shapes = linear_shapes(model)
        pack.skeleton, pack.checked = model, True
    for name, info in manifest.adapters.items():
        validate_adapter_name(name)
        rel = info.get("path", f"adapters/{name}") if isinstance(info, dict) else None
        if not isinstance(rel, str):
            raise ManifestError(f"adapter {name!r} has no valid 'path'", manifest_path)
        directory = safe_child(root, rel)
        if not directory.is_dir():
            raise MissingFileError(f"adapter {name!r} directory is absent", directory)
        for file in sorted(directory.iterdir()):
            vouched(file)
        pack.adapters[name] = read_adapter(directory, shapes)
    return pack
