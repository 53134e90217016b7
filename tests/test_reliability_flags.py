"""Issue 26's silent wrong results and tracebacks, through the CLI: non-finite flags are refused at parse time, a
run whose parameters step into NaN/inf stops with one line and writes nothing, ``-o`` under a regular file is one
line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from sparsepack.cli import main
from tests.factories import rtn_pack, save_hf, tiny_llama
from tests.helpers_cli import one_line_error


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("flags")
    model = tiny_llama()
    save_hf(model, d / "hf")
    rtn_pack(model, d / "pack")
    (d / "c.txt").write_text("\n".join(f"line {i}: the quick brown fox jumps over {i * 7}" for i in range(200)))
    return d


def finetune(env: Path, out: Path, *extra) -> object:
    argv = ["finetune", env / "pack", "--data", env / "c.txt", "-o", out, "--method", "lora", "--rank", "2",
            "--steps", "1", "--batch-size", "1", "--grad-accum", "1", "--seqlen", "32", "--json", *extra]  # fmt: skip
    return CliRunner().invoke(main, [str(a) for a in argv])


@pytest.mark.parametrize(("flag", "value"), [("--lr", "nan"), ("--lr-lowrank", "inf"), ("--alpha", "-inf"),
                                             ("--kl-weight", "nan"), ("--dropout", "nan")])  # fmt: skip
def test_non_finite_training_flags_are_refused_before_anything_runs(env, tmp_path, flag, value):
    one_line_error(finetune(env, tmp_path / "o", flag, value), flag, "finite")
    assert list(tmp_path.iterdir()) == []


def test_non_finite_compress_flag_is_refused(env, tmp_path):
    r = CliRunner().invoke(main, ["compress", str(env / "hf"), "-o", str(tmp_path / "p"), "--group-size", "32",
                                  "--damp", "nan"])  # fmt: skip
    one_line_error(r, "--damp")
    assert list(tmp_path.iterdir()) == []


def test_a_step_into_nan_stops_the_run_and_writes_no_adapter(env, tmp_path, monkeypatch):
    """A finite loss whose optimizer step leaves a NaN (what an overflowing update does): one line, no output, even
    with a single step (the case that used to write an all-NaN adapter)."""
    import torch

    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real(self, *a, **k)
        self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    one_line_error(finetune(env, tmp_path / "o"), "TrainingDivergedError", "NaN or infinite")
    assert list(tmp_path.iterdir()) == []


def test_a_learning_rate_too_large_for_the_optimizer_is_refused(env, tmp_path):
    one_line_error(finetune(env, tmp_path / "o", "--lr-lowrank", "1e39"), "--lr-lowrank must be in")
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_regular_file_is_one_line(env, tmp_path):
    (tmp_path / "f").write_text("a file")
    one_line_error(finetune(env, tmp_path / "f" / "o"), "is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
