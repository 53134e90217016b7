"""The pack manifest (``sparsepack.json``): what a pack holds, how it was made, and file hashes.

The manifest is plain JSON with a format name and an integer version; readers refuse versions they do not
know. See docs/FORMAT.md for the field-by-field spec.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsepack.formats.errors import ManifestError, VersionError

FORMAT_NAME = "sparsepack"
FORMAT_VERSION = 1
MANIFEST_FILE = "sparsepack.json"


def tool_version() -> str:
    from sparsepack import __version__

    return __version__


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class StageRecord:
    """One pipeline stage that produced (part of) this pack."""

    stage: str  # "import", "compress", "finetune", "merge", ...
    args: dict[str, Any]  # the stage's arguments as given (JSON-serializable)
    tool_version: str = field(default_factory=tool_version)
    time: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    summary: dict[str, Any] = field(default_factory=dict)  # measured figures (errors, times, losses)


@dataclass
class Manifest:
    """Contents of ``sparsepack.json``."""

    base: dict[str, Any] = field(
        default_factory=dict
    )  # architecture, model_type, source, num_parameters, dtype
    quantization: dict[str, Any] | None = (
        None  # GPTQ config + per-layer table {layers: {name: {...}}}; None=dense
    )
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {path, method, ...}
    history: list[StageRecord] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relpath -> {sha256, bytes}
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, path: object = None) -> Manifest:
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object", path)
        fmt = data.get("format")
        if fmt != FORMAT_NAME:
            raise ManifestError(f"format is {fmt!r}, expected {FORMAT_NAME!r}", path)
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ManifestError(f"format_version must be an integer, got {version!r}", path)
        if version != FORMAT_VERSION:
            raise VersionError(
                f"format_version {version} is not supported by sparsepack {tool_version()} "
                f"(reads version {FORMAT_VERSION})",
                path,
            )
        kinds = {"base": dict, "adapters": dict, "history": list, "files": dict}
        for key, kind in kinds.items():
            if key in data and not isinstance(data[key], kind):
                raise ManifestError(f"field {key!r} must be a JSON {kind.__name__}", path)
        quant = data.get("quantization")
        if quant is not None and not isinstance(quant, dict):
            raise ManifestError("field 'quantization' must be an object or null", path)
        history = []
        for i, rec in enumerate(data.get("history", [])):
            if not isinstance(rec, dict) or not isinstance(rec.get("stage"), str):
                raise ManifestError(f"history[{i}] must be an object with a 'stage' string", path)
            for key in ("args", "summary"):
                if not isinstance(rec.get(key) or {}, dict):
                    raise ManifestError(f"history[{i}].{key} must be an object", path)
            history.append(
                StageRecord(
                    stage=rec["stage"],
                    args=dict(rec.get("args") or {}),
                    tool_version=str(rec.get("tool_version", "")),
                    time=str(rec.get("time", "")),
                    summary=dict(rec.get("summary") or {}),
                )
            )
        files = data.get("files", {})
        for rel, info in files.items():
            if (
                not isinstance(info, dict)
                or not isinstance(info.get("sha256"), str)
                or type(info.get("bytes")) is not int
            ):
                raise ManifestError(f"files[{rel!r}] must be {{sha256: str, bytes: int}}", path)
        for name, info in data.get("adapters", {}).items():
            if not isinstance(info, dict):
                raise ManifestError(f"adapters[{name!r}] must be an object", path)
        return cls(
            base=dict(data.get("base", {})),
            quantization=quant,
            adapters={k: dict(v) for k, v in data.get("adapters", {}).items()},
            history=history,
            files=dict(files),
        )

    @classmethod
    def read(cls, path: Path) -> Manifest:
        from sparsepack.formats.json_file import read_json

        return cls.from_dict(read_json(path, ManifestError), path)
