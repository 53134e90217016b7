"""Stream tensors into (possibly sharded) safetensors files as they are produced.

Compress produces one block at a time; holding the whole quantized model to call ``save_file`` once would
defeat layer-by-layer streaming (and ``save_file`` serializes a shard into one more in-memory buffer: the
8-bit SmolLM2 pack peaked 200 MB higher that way). Each tensor's bytes go straight to a spill file beside
the shard; when a shard reaches ``max_shard_bytes`` (or at ``close``) its safetensors file is written from
the spill in safetensors' own order (by dtype size, then name: every tensor stays aligned to its element
size), copying through a small buffer. Memory stays at about one tensor. ``close`` renames the shards to the
HF convention (``model.safetensors`` when one shard, else ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from sparsepack.formats.safetensors_check import DTYPE_BYTES
from sparsepack.formats.tensor_io import SAFETENSORS_NAMES

_COPY_CHUNK = 8 << 20  # bytes per read/write when a shard is assembled from its spill file


class ShardWriter:
    """Write tensors into safetensors shards under ``directory``, one tensor at a time.

    Args:
        directory: where the shards go (the staged pack directory).
        max_shard_bytes: a shard is closed once its tensors reach this size.
        metadata: the ``__metadata__`` strings of every shard (``format: pt`` is always set).
    """

    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._entries: list[tuple[str, str, list[int], int, int]] = []  # (name, dtype, shape, start, end) in spill
        self._spill = None  # open file of the current shard's raw bytes, in arrival order
        self._spill_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in SAFETENSORS_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors name")
        self._names.add(name)
        t = tensor.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if self._spill is None:
            self._spill = open(self._spill_path(len(self._shards)), "w+b")  # noqa: SIM115 - closed in flush
            self._spill_bytes = 0
        if nbytes:
            self._spill.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        end = self._spill_bytes + nbytes
        self._entries.append((name, SAFETENSORS_NAMES[t.dtype], list(t.shape), self._spill_bytes, end))
        self._spill_bytes += nbytes
        self.total_bytes += nbytes
        if self._spill_bytes >= self.max_shard_bytes:
            self.flush()

    def _spill_path(self, i: int) -> Path:
        return self.directory / f"model-{i + 1:05d}.safetensors.spill"

    def flush(self) -> None:
        """Write the current shard's safetensors file from its spill, then delete the spill."""
        if self._spill is None:
            return
        spill, entries = self._spill, self._entries
        order = sorted(entries, key=lambda e: (-DTYPE_BYTES[e[1]], e[0]))  # safetensors' own order
        header, offset = {"__metadata__": self.metadata}, 0
        for name, dtype, shape, start, end in order:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + end - start]}
            offset += end - start
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        path = self.directory / f"model-{len(self._shards) + 1:05d}.safetensors.part"
        spill.flush()
        _write_shard(path, blob, spill, [(start, end) for _, _, _, start, end in order])
        spill.close()
        self._spill_path(len(self._shards)).unlink()
        self._shards.append((path, sorted(e[0] for e in entries)))
        self._spill, self._entries, self._spill_bytes = None, [], 0

    def close(self) -> list[str]:
        """Flush and give the shards their final names; returns the file names written."""
        self.flush()
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.directory / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self._shards, start=1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / final)
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [*names, "model.safetensors.index.json"]


def _write_shard(path: Path, header: bytes, spill, ranges: list[tuple[int, int]]) -> None:
    """``path``: the 8-byte header length, ``header``, then the spill's byte ``ranges`` in order."""
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for start, end in ranges:
            spill.seek(start)
            left = end - start
            while left:
                chunk = spill.read(min(left, _COPY_CHUNK))
                out.write(chunk)
                left -= len(chunk)
