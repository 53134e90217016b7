"""ShardWriter: tensors stream to disk one at a time; the shards are ordinary safetensors files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sparsepack.formats.shards import ShardWriter


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "a.qweight": torch.randint(-(2**31), 2**31 - 1, (3, 11), generator=g, dtype=torch.int32),
        "c.scales": torch.randn(3, 3, generator=g).half(),
        "d.mask": torch.rand(13, generator=g) > 0.5,
        "e.scalar": torch.tensor(2.5, dtype=torch.float64),
        "f.empty": torch.zeros(0, 4),
        "g.strided": torch.randn(6, 4, generator=g).t(),  # not contiguous
        "h.bytes": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
    }


@pytest.mark.parametrize("max_bytes", [2 * 1024**3, 64])
def test_shards_load_back_exactly_and_stay_aligned(tmp_path, max_bytes):
    tensors = _tensors()
    w = ShardWriter(tmp_path, max_shard_bytes=max_bytes, metadata={"origin": "test"})
    for k, v in tensors.items():
        w.add(k, v)
    files = w.close()
    assert not list(tmp_path.glob("*.spill")) and not list(tmp_path.glob("*.part"))
    shards = [f for f in files if f.endswith(".safetensors")]
    if max_bytes > 1000:
        assert files == ["model.safetensors"]
    else:
        assert len(shards) > 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for f in shards:
        loaded.update(load_file(tmp_path / f))
        with safe_open(tmp_path / f, "pt") as s:
            assert s.metadata() == {"format": "pt", "origin": "test"}
        header_len = int.from_bytes((tmp_path / f).read_bytes()[:8], "little")
        header = json.loads((tmp_path / f).read_bytes()[8 : 8 + header_len])
        assert (8 + header_len) % 8 == 0
        for name, entry in header.items():
            if name != "__metadata__":
                assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_duplicate_name_and_unknown_dtype_are_refused(tmp_path):
    w = ShardWriter(tmp_path)
    w.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="written twice"):
        w.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="no safetensors name"):
        w.add("y", torch.zeros(2, dtype=torch.complex64))
    assert w.close() == ["model.safetensors"]
