"""No code execution on load (issue 8): nothing is ever unpickled, remote code is never trusted.

Two layers: a static scan of the package source (AST, so comments and strings do not count) for every API that
unpickles or runs code from a file, and runtime checks that patch the unpicklers to fail while the real entry
points run (read, load, compress, the CLI), plus packs whose config asks for remote code that would leave a
marker file if it ever ran.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

import sparsepack
from sparsepack.config import QuantConfig
from sparsepack.formats import errors
from sparsepack.formats.pack import read_pack
from sparsepack.formats.tokenizer import load_tokenizer
from sparsepack.pipeline.compress import compress
from tests.factories import random_adapter, rtn_pack, save_hf, tiny_llama

PACKAGE = Path(sparsepack.__file__).resolve().parent

# (module alias as written in the source, attribute): calls that deserialize with pickle or run stored code
UNSAFE_CALLS = {
    ("torch", "load"), ("torch.jit", "load"), ("jit", "load"), ("pickle", "load"), ("pickle", "loads"),
    ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"), ("cloudpickle", "load"), ("joblib", "load"),
    ("marshal", "loads"), ("shelve", "open"), ("serialization", "load"),
}  # fmt: skip
UNSAFE_IMPORTS = {"pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "_pickle"}
SAFE_KEYWORDS = {"trust_remote_code": False, "allow_pickle": False, "weights_only": True}  # only these constants


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def scan(source: str, filename: str) -> list[str]:
    """Every unsafe construct in ``source``: unpickling calls/imports, eval/exec, trust_remote_code not False."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n and n.split(".")[0] in UNSAFE_IMPORTS]
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in [a.name for a in node.names]:
                bad.append("torch.load")
            found += [f"{where}: imports {n}" for n in bad]
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            head, _, attr = name.rpartition(".")
            if (head, attr) in UNSAFE_CALLS or (head.rpartition(".")[2], attr) in UNSAFE_CALLS:
                found.append(f"{where}: calls {name}")
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(f"{where}: calls {name}")
            for kw in node.keywords:
                safe = SAFE_KEYWORDS.get(kw.arg, ...)
                if safe is not ... and not (isinstance(kw.value, ast.Constant) and kw.value.value is safe):
                    found.append(f"{where}: {kw.arg}={ast.unparse(kw.value)}")
    return found


def test_the_scanner_sees_what_it_must():
    bad = """
import pickle
from torch import load
import torch as T
torch.load(f); T.load(f); torch.jit.load(f); pickle.loads(b); np.load(f, allow_pickle=True)
AutoModel.from_pretrained(p, trust_remote_code=True); AutoConfig.from_pretrained(p, trust_remote_code=flag)
eval("1"); exec("x = 1")
"""
    found = scan(bad, "bad.py")
    assert len(found) == 10, found
    ok = 'AutoConfig.from_pretrained(p, trust_remote_code=False)\nsafetensors.torch.load_file(f)\n# torch.load(f)\n'
    assert scan(ok, "ok.py") == []


# Reviewed exceptions: (file, source line) -> why it is safe. Anything else the scan finds fails the test.
ALLOWED = {
    ("sparsepack/exporters/onnx.py", "exec(src, scope)"):
        "make_wrapper builds a forward signature from fixed input names and integers (never from a pack), since "
        "torch.export reads graph input names off the signature",
}  # fmt: skip


def test_package_source_never_unpickles_nor_trusts_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = []
    for f in files:
        rel = f.relative_to(PACKAGE.parent).as_posix()
        lines = f.read_text(encoding="utf-8").splitlines()
        for hit in scan("\n".join(lines), rel):
            line = lines[int(hit.split(":")[1]) - 1].strip()
            if not any(rel == file and line.startswith(code) for file, code in ALLOWED):
                found.append(f"{hit}: {line}")
    assert found == []


@pytest.fixture
def no_unpickling(monkeypatch):
    """Every unpickler fails loudly while the test runs, except numba reading its own JIT cache.

    numba's ``cache=True`` keeps compiled kernels as pickles in the package's ``__pycache__`` (or
    ``NUMBA_CACHE_DIR``): files this package's install wrote, as trusted as its ``.pyc`` files, never anything
    from a pack or a data source. Those reads are allowed and returned, so the test can check where they were.
    """
    numba_reads: list[str] = []
    real_load, real_loads = pickle.load, pickle.loads

    def from_numba() -> bool:
        return sys._getframe(2).f_globals.get("__name__", "").startswith("numba.")

    def load(f, *a, **k):
        if from_numba():
            numba_reads.append(getattr(f, "name", "?"))
            return real_load(f, *a, **k)
        raise AssertionError(f"pickle.load({getattr(f, 'name', f)!r}) was called")

    def loads(data, *a, **k):
        if from_numba():
            return real_loads(data, *a, **k)
        raise AssertionError("pickle.loads was called")

    def refuse(*_a, **_k):
        raise AssertionError("an unpickler was called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", load)
    monkeypatch.setattr(pickle, "loads", loads)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    return numba_reads


def test_entry_points_run_without_any_unpickler(tmp_path, no_unpickling):
    from click.testing import CliRunner

    from sparsepack.cli import main

    model = tiny_llama()
    path, _ = rtn_pack(model, tmp_path / "pack", adapters={"ad": random_adapter(model)})
    save_hf(model, tmp_path / "hf")
    (tmp_path / "c.txt").write_text("def f(x): return x + 1  # the quick brown fox\n" * 200)
    loaded = sparsepack.load(path, adapter="ad")
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 320)
    sparsepack.load(tmp_path / "hf")
    load_tokenizer(path)
    compress(tmp_path / "hf", tmp_path / "q", QuantConfig(group_size=32, calib=str(tmp_path / "c.txt"), nsamples=4,
                                                          seqlen=32), progress=False)  # fmt: skip
    for args in (["inspect", str(path), "--verify"], ["eval", str(path), "--data", str(tmp_path / "c.txt"),
                                                      "--seqlen", "32", "--windows", "2"]):  # fmt: skip
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
    cache_dirs = [PACKAGE] + [Path(d).resolve() for d in [os.environ.get("NUMBA_CACHE_DIR")] if d]
    for name in no_unpickling:  # numba's own cache only: never a file of the pack or the data
        assert any(Path(name).resolve().is_relative_to(d) for d in cache_dirs), name


class _Bomb:
    def __reduce__(self):
        return (exec, ("raise SystemExit('a pickle was unpickled')",))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.ckpt"])
def test_pickle_model_offered_to_the_cli_is_refused_with_how_to_convert(tmp_path, name):
    from click.testing import CliRunner

    from sparsepack.cli import main

    d = tmp_path / "m"
    d.mkdir()
    (d / name).write_bytes(pickle.dumps(_Bomb()))
    (d / "config.json").write_text(json.dumps(tiny_llama().config.to_dict()))
    for args in (["compress", str(d), "-o", str(tmp_path / "out")], ["inspect", str(d)], ["eval", str(d)],
                 ["inspect", str(d / name)]):  # fmt: skip
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, (args, r.output)
        assert "UnsafeFileError" in r.output and ("safe_serialization=True" in r.output or "refused" in r.output)
    assert not (tmp_path / "out").exists()


EVIL = """
import pathlib
pathlib.Path(__file__).resolve().parent.joinpath("REMOTE_CODE_RAN").write_text("yes")
"""


@pytest.mark.parametrize("model_type", ["llama", "evilnet"])
def test_remote_code_in_a_pack_never_runs(tmp_path, model_type):
    model = tiny_llama()
    path, _ = rtn_pack(model, tmp_path / "pack", manifest=False)
    (path / "evil.py").write_text(EVIL)
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    tk = json.loads((path / "tokenizer_config.json").read_text())
    tk["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (path / "tokenizer_config.json").write_text(json.dumps(tk))
    for fn in (read_pack, sparsepack.load, load_tokenizer):
        try:
            fn(path)
        except errors.FormatError:
            pass  # refusing is fine
        except ValueError as e:  # transformers refusing remote code without trust_remote_code
            assert "trust_remote_code" in str(e) or "evil" in str(e).lower(), e
        assert not (path / "REMOTE_CODE_RAN").exists(), f"{fn.__name__} ran code from the pack"
    if model_type == "evilnet":
        with pytest.raises(errors.ConfigError, match="config.json: cannot read model config"):
            read_pack(path)
