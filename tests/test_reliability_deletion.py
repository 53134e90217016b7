"""The deletion rule (docs/RELIABILITY.md): a command replaces or deletes only a directory this tool wrote (it
carries one of ``staging.OWNER_MARKERS``) and never a path that holds or lies inside one of its own inputs.

Every writer is driven through the CLI with a destination it must refuse; each refusal is one line, exit status 1,
and leaves the destination byte for byte as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsepack.cli import main
from sparsepack.formats import staging
from sparsepack.formats.errors import ForeignOutputError, OutputExistsError, OutputOverlapsInputError
from sparsepack.formats.manifest import MANIFEST_FILE
from sparsepack.pipeline import checkpoint as ckpt
from tests.factories import random_adapter, rtn_pack, save_hf, tiny_llama
from tests.helpers_cli import one_line_error


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("deletion")
    model = tiny_llama()
    save_hf(model, d / "hf")
    rtn_pack(model, d / "pack", adapters={"a": random_adapter(model)})
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(120)]
    (d / "c.txt").write_text("\n".join(lines))
    return d


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def user_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine\n")
    return path


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def finetune_argv(env: Path, out: Path, *extra) -> list:
    return ["finetune", env / "pack", "--data", env / "c.txt", "-o", out, "--rank", "2", "--density", "0.02",
            "--steps", "1", "--warmup-steps", "0", "--batch-size", "1", "--seqlen", "32", "--mask-samples", "1",
            "--json", *extra]  # fmt: skip


def test_checkpoint_dir_holding_user_files_is_refused_and_kept(env, tmp_path):
    mine = user_dir(tmp_path / "v")
    before = snapshot(mine)
    r = cli(*finetune_argv(env, tmp_path / "ft", "--checkpoint-dir", mine))
    one_line_error(r, "ForeignOutputError", "notes.txt")
    assert snapshot(mine) == before
    assert not (tmp_path / "ft").exists()


def test_checkpoint_dir_at_the_input_pack_is_refused(env, tmp_path):
    before = snapshot(env / "pack")
    r = cli(*finetune_argv(env, tmp_path / "ft", "--checkpoint-dir", env / "pack"))
    one_line_error(r, "OutputOverlapsInputError")
    assert snapshot(env / "pack") == before


def test_checkpoint_dir_at_the_output_is_refused(env, tmp_path):
    one_line_error(cli(*finetune_argv(env, tmp_path / "ft", "--checkpoint-dir", tmp_path / "ft" / "ck")),
            "OutputOverlapsInputError")  # fmt: skip
    assert not (tmp_path / "ft").exists()


def test_finetune_over_its_own_input_is_refused(env, tmp_path):
    before = snapshot(env / "pack")
    one_line_error(cli(*finetune_argv(env, env / "pack", "--overwrite")), "OutputOverlapsInputError")
    assert snapshot(env / "pack") == before
    assert not (env / "pack.ckpt").exists()


def test_finetune_into_an_empty_checkpoint_dir_cleans_up_after_itself(env, tmp_path):
    empty = tmp_path / "ck"
    empty.mkdir()
    r = cli(*finetune_argv(env, tmp_path / "ft", "--checkpoint-dir", empty))
    assert r.exit_code == 0, r.output
    assert not empty.exists()  # it held nothing else: the run's own directory goes with its checkpoints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]


def test_failed_run_leaves_no_checkpoint_dir_it_created(env, tmp_path):
    one_line_error(cli(*finetune_argv(env, tmp_path / "ft", "--adapter", "a/b")))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["user-dir", "file"])
@pytest.mark.parametrize("command", ["compress", "merge", "export-safetensors", "export-peft", "export-onnx"])
def test_overwrite_never_replaces_what_sparsepack_did_not_write(env, tmp_path, command, kind):
    out = user_dir(tmp_path / "out") if kind == "user-dir" else tmp_path / "out"
    if kind == "file":
        out.write_text("a file of the user's\n")
    before = snapshot(out)
    argv = {
        "compress": ["compress", env / "hf", "-o", out, "--group-size", "32", "--method", "rtn", "--nsamples", "2",
                     "--seqlen", "16", "--calib", env / "c.txt"],
        "merge": ["merge", env / "pack", "-o", out, "--adapter", "a"],
        "export-safetensors": ["export", env / "pack", "--format", "safetensors", "-o", out],
        "export-peft": ["export", env / "pack", "--format", "peft", "--adapter", "a", "-o", out],
        "export-onnx": ["export", env / "pack", "--format", "onnx", "-o", out, "--no-validate"],
    }[command]  # fmt: skip
    why = "ForeignOutputError" if kind == "user-dir" else "not a directory"
    one_line_error(cli(*argv, "--overwrite"), str(out), why)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.tmp-* left behind


def test_overwrite_replaces_an_output_sparsepack_wrote(env, tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        r = cli("export", env / "pack", "--format", "peft", "--adapter", "a", "-o", out, "--overwrite", "--json")
        assert r.exit_code == 0, r.output
    assert staging.is_owned(out)


@pytest.mark.parametrize("command", ["merge", "export-safetensors"])
def test_output_inside_the_input_is_refused(env, tmp_path, command):
    before = snapshot(env / "pack")
    argv = {"merge": ["merge", env / "pack", "--adapter", "a"],
            "export-safetensors": ["export", env / "pack", "--format", "safetensors"]}[command]  # fmt: skip
    one_line_error(cli(*argv, "-o", env / "pack" / "sub"), "OutputOverlapsInputError")
    one_line_error(cli(*argv, "-o", env / "pack", "--overwrite"), "OutputOverlapsInputError")
    assert snapshot(env / "pack") == before


def test_sample_cache_refuses_a_foreign_folder(tmp_path, monkeypatch):
    from sparsepack.runtime import sample

    mine = user_dir(tmp_path / sample.SAMPLE_DIRNAME)
    monkeypatch.setattr(sample, "find_sample_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(sample, "_convert", lambda *_a: pytest.fail("converted into a folder it must not replace"))
    with pytest.raises(ForeignOutputError, match="notes.txt|not written by sparsepack"):
        sample.prepare_sample_model(tmp_path, force=True)
    assert snapshot(mine) == {"notes.txt": b"mine\n"}


def test_checkpoint_remove_keeps_files_it_did_not_write(tmp_path):
    d = ckpt.claim(tmp_path / "ck")
    ckpt.save_checkpoint(d, 1, {"x": __import__("torch").zeros(2)}, {"phase": 0})
    (d / "added-later.txt").write_text("keep me")
    ckpt.remove(d)
    assert sorted(p.name for p in d.iterdir()) == ["added-later.txt"]


def test_claim_accepts_a_checkpoint_dir_of_an_earlier_version(tmp_path):
    d = tmp_path / "ck"
    (d / "step-0000002").mkdir(parents=True)
    (d / "latest").write_text("step-0000002")
    (d / ckpt.METRICS_FILE).write_text("")
    ckpt.claim(d)
    assert (d / ckpt.DIR_MARKER).is_file()


def test_check_output_rules(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(OutputOverlapsInputError):
        staging.check_output(tmp_path, overwrite=True, inputs=[tmp_path / "in"])
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        staging.check_output(tmp_path / "in")
    (tmp_path / "in" / MANIFEST_FILE).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ForeignOutputError):  # a symlinked marker does not count
        staging.check_output(tmp_path / "in", overwrite=True)
    assert staging.check_output(tmp_path / "new", inputs=[None, "stdlib:pydoc"]) == tmp_path / "new"


def test_every_writer_marker_is_listed():
    from sparsepack.formats.adapter_layout import ADAPTER_META
    from sparsepack.runtime.onnx_runtime import METADATA_FILE
    from sparsepack.runtime.sample import MARKER

    assert {MANIFEST_FILE, ADAPTER_META, METADATA_FILE, MARKER, ckpt.DIR_MARKER, ckpt.STATE_JSON} <= set(
        staging.OWNER_MARKERS
    )
