"""Read and validate a safetensors header without loading (or trusting) any tensor data.

safetensors layout: 8-byte little-endian header length ``n``, ``n`` bytes of UTF-8 JSON mapping tensor
names to ``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the end of the header), then
the data. We check every declared size against the file size *before* anything is allocated, so a hostile
header declaring huge shapes or offsets past the end fails fast with a typed error.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from sparsepack.formats.errors import SafetensorsHeaderError
from sparsepack.formats.json_file import DuplicateKeyError, no_duplicates

# The one dtype table: safetensors' dtype name -> (torch dtype attribute, bytes per element). Everything else
# (readers, the shard writer, the loader) derives from it.
DTYPES = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I16": ("int16", 2), "U16": ("uint16", 2), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "F32": ("float32", 4),
    "I64": ("int64", 8), "U64": ("uint64", 8), "F64": ("float64", 8),
}  # fmt: skip
DTYPE_BYTES = {name: size for name, (_torch, size) in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own cap
MAX_DIMS = 64  # far above any real tensor; bounds the work and the message for a hostile shape


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it declares."""

    file: Path
    name: str
    dtype: str  # safetensors dtype name, e.g. "F16", "I32"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # relative to the start of the data section
    data_start: int = 0  # byte offset of the data section in the file (8 + header length)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate the header of ``path``; returns name -> TensorInfo (metadata excluded)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsHeaderError("file is shorter than the 8-byte header length", path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SafetensorsHeaderError(
                    f"header length {n} exceeds the file size {size} (truncated?)", path
                )
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsHeaderError(f"cannot read: {e.strerror}", path) from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except DuplicateKeyError as e:
        raise SafetensorsHeaderError("tensor name appears twice in the header", path, str(e)) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit, deep nesting
        raise SafetensorsHeaderError(f"header is not valid JSON ({type(e).__name__}: {e})", path) from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("header is not a JSON object", path)
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise SafetensorsHeaderError("entry is not an object", path, name)
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise SafetensorsHeaderError(f"unknown dtype {dtype!r}", path, name)
        if isinstance(shape, list) and len(shape) > MAX_DIMS:  # before any per-dimension work or message
            raise SafetensorsHeaderError(f"shape has {len(shape)} dimensions (at most {MAX_DIMS})", path, name)
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise SafetensorsHeaderError(f"shape must be a list of integers, got {shape!r}", path, name)
        if any(d < 0 for d in shape):
            raise SafetensorsHeaderError(f"negative dimension in shape {shape}", path, name)
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise SafetensorsHeaderError(f"data_offsets must be two integers, got {offs!r}", path, name)
        begin, end = offs
        if not 0 <= begin <= end <= data_size:
            raise SafetensorsHeaderError(
                f"data_offsets {offs} fall outside the {data_size}-byte data section (truncated file?)",
                path,
                name,
            )
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if nbytes != end - begin:
            raise SafetensorsHeaderError(
                f"shape {shape} of {dtype} needs {nbytes} bytes but offsets span {end - begin}", path, name
            )
        spans.append((begin, end, name))
        out[name] = TensorInfo(path, name, dtype, tuple(shape), (begin, end), 8 + n)
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise SafetensorsHeaderError(f"data of {n0!r} and {n1!r} overlap", path, n1)
    return out


def read_tensor_bytes(info: TensorInfo) -> bytes:
    """The raw bytes of one tensor whose header :func:`read_header` validated (for small tensors: g_idx)."""
    try:
        with open(info.file, "rb") as f:
            f.seek(info.data_start + info.offsets[0])
            data = f.read(info.offsets[1] - info.offsets[0])
    except OSError as e:
        raise SafetensorsHeaderError(f"cannot read: {e}", info.file, info.name) from None
    if len(data) != info.offsets[1] - info.offsets[0]:
        raise SafetensorsHeaderError("file shrank while being read", info.file, info.name)
    return data
