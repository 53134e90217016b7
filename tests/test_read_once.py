"""One read of a pack per command: every file the manifest lists is hashed exactly once, and the pack directory is
opened (``read_pack``) once, however many models the command then builds from it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsepack.cli import main
from sparsepack.formats import pack as pack_mod
from sparsepack.formats.manifest import MANIFEST_FILE, Manifest
from tests.factories import random_adapter, rtn_pack, tiny_llama


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("read-once")
    model = tiny_llama()
    rtn_pack(model, d / "pack", adapters={"a": random_adapter(model)})
    return d / "pack"


@pytest.fixture
def counted(monkeypatch):
    hashed: Counter = Counter()
    opened: Counter = Counter()
    real_hash, real_read = pack_mod.sha256_file, pack_mod.read_pack

    def sha256_file(path, *a, **k):
        hashed[Path(path).resolve()] += 1
        return real_hash(path, *a, **k)

    def read_pack(path, *a, **k):
        opened[Path(path).resolve()] += 1
        return real_read(path, *a, **k)

    monkeypatch.setattr(pack_mod, "sha256_file", sha256_file)
    monkeypatch.setattr(pack_mod, "read_pack", read_pack)
    for mod in ("sparsepack.runtime.loader", "sparsepack.exporters.onnx", "sparsepack.exporters.dense",
                "sparsepack.pipeline.merge"):  # fmt: skip
        module = __import__(mod, fromlist=["_"])
        if hasattr(module, "read_pack"):
            monkeypatch.setattr(module, "read_pack", read_pack)
    return hashed, opened


COMMANDS = {
    "inspect": ["inspect", "{pack}", "--verify", "--json"],
    "export-safetensors": ["export", "{pack}", "--format", "safetensors", "-o", "{out}", "--adapter", "a", "--json"],
    "export-peft": ["export", "{pack}", "--format", "peft", "-o", "{out}", "--adapter", "a", "--json"],
    "export-onnx": ["export", "{pack}", "--format", "onnx", "-o", "{out}", "--adapter", "a", "--no-kv-cache",
                    "--json"],
    "merge": ["merge", "{pack}", "-o", "{out}", "--adapter", "a", "--eval-windows", "0", "--json"],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_hashes_every_file_of_its_pack_once(src, tmp_path, counted, command):
    hashed, opened = counted
    argv = [a.format(pack=src, out=tmp_path / "out") for a in COMMANDS[command]]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    listed = {(src / rel).resolve() for rel in Manifest.read(src / MANIFEST_FILE).files}
    assert {p: n for p, n in hashed.items() if p in listed} == dict.fromkeys(listed, 1)
    assert opened[src.resolve()] == 1
