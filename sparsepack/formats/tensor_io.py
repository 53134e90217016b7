"""Tensors out of safetensors files as zero-copy views of a read-only memory map, and the torch side of the
dtype table (``safetensors_check.DTYPES``). Headers are parsed and validated once, by ``read_header``; this
module trusts the ``TensorInfo`` records it is handed.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from sparsepack.formats.errors import FormatError
from sparsepack.formats.safetensors_check import DTYPES, TensorInfo

# safetensors dtype name <-> torch dtype, for the dtypes this torch build has
TORCH_DTYPES = {name: getattr(torch, attr) for name, (attr, _size) in DTYPES.items() if hasattr(torch, attr)}
SAFETENSORS_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def map_file(path: Path) -> torch.Tensor:
    """Memory-map ``path`` read-only (copy-on-write: writes never reach the file) as a flat uint8 tensor."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return torch.empty(0, dtype=torch.uint8)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.uint8)


def load_tensors(infos: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Tensors as zero-copy views of memory-mapped files (copied only when misaligned); each file mapped once."""
    maps: dict[Path, torch.Tensor] = {}
    out = {}
    for name, info in infos.items():
        if info.file not in maps:
            maps[info.file] = map_file(info.file)
        dtype = TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise FormatError(f"dtype {info.dtype} is not supported by the loader", info.file, name)
        begin, end = info.data_start + info.offsets[0], info.data_start + info.offsets[1]
        chunk = maps[info.file][begin:end]
        if begin % dtype.itemsize:
            chunk = chunk.clone()
        out[name] = chunk.view(dtype).reshape(info.shape)
    return out
