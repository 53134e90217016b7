"""Stream tensors into (possibly sharded) safetensors files as they are produced.

Compress produces one block at a time; holding the whole quantized model to call ``save_file`` once would
defeat layer-by-layer streaming. Tensors are buffered until ``max_shard_bytes`` and flushed as
``model-0000i.safetensors``; ``close`` renames them to the HF convention (``model.safetensors`` when one
shard, else ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


class ShardWriter:
    def __init__(self, directory: Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        t = tensor.detach().contiguous().cpu()
        self._buffer[name] = t
        nbytes = t.numel() * t.element_size()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes
        if self._buffer_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.directory / f"model-{len(self._shards) + 1:05d}.safetensors.part"
        save_file(self._buffer, str(path), metadata=self.metadata)
        self._shards.append((path, sorted(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

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
