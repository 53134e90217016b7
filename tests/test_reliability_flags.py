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


# ------------------------------------------------------------------------------------------------ --verify, JSON


@pytest.fixture
def pack_copy(env, tmp_path) -> Path:
    import shutil

    shutil.copytree(env / "pack", tmp_path / "pack")
    return tmp_path / "pack"


def rewrite_manifest_text(pack: Path, fn) -> None:
    from sparsepack.formats.manifest import MANIFEST_FILE

    (pack / MANIFEST_FILE).write_text(fn((pack / MANIFEST_FILE).read_text()))


def inspect_verify(path: Path) -> object:
    return CliRunner().invoke(main, ["inspect", str(path), "--verify"])


def test_verify_refuses_a_weights_file_missing_from_the_file_list(pack_copy):
    import json

    from sparsepack.formats.manifest import MANIFEST_FILE

    data = json.loads((pack_copy / MANIFEST_FILE).read_text())
    del data["files"]["model.safetensors"]
    (pack_copy / MANIFEST_FILE).write_text(json.dumps(data))
    one_line_error(inspect_verify(pack_copy), "ManifestError", "model.safetensors", "not listed")


def test_verify_refuses_a_duplicate_key_that_would_override_the_file_list(pack_copy):
    # a second "files" object (empty) after the real one: json keeps the last, so nothing would be checked
    rewrite_manifest_text(pack_copy, lambda t: t.rstrip().rstrip("}") + ', "files": {}}')
    one_line_error(inspect_verify(pack_copy), "ManifestError", "'files' appears twice")


def test_verify_on_a_directory_without_a_manifest_is_refused(env):
    one_line_error(inspect_verify(env / "hf"), "--verify needs a pack's manifest")


def test_duplicate_key_in_config_json_is_a_config_error(env, tmp_path):
    import shutil

    hf = shutil.copytree(env / "hf", tmp_path / "hf")  # no manifest: the config itself is what is read
    (hf / "config.json").write_text((hf / "config.json").read_text().replace("{", '{"hidden_size": 64, ', 1))
    r = CliRunner().invoke(main, ["inspect", str(hf)])
    one_line_error(r, "ConfigError", "'hidden_size' appears twice")


def test_invalid_utf8_in_json_names_the_line(pack_copy):
    from sparsepack.formats.errors import ManifestError
    from sparsepack.formats.json_file import read_json

    (pack_copy / "x.json").write_bytes(b'{\n"a": 1,\n"b": "\xff"\n}')
    with pytest.raises(ManifestError, match="on line 3"):
        read_json(pack_copy / "x.json", ManifestError)


def test_an_oversized_json_file_is_refused_before_it_is_read(pack_copy):
    from sparsepack.formats.errors import ManifestError
    from sparsepack.formats.json_file import read_json

    (pack_copy / "x.json").write_text("[" + "0," * 600 + "0]")
    with pytest.raises(ManifestError, match="larger than 1000 bytes"):
        read_json(pack_copy / "x.json", ManifestError, limit=1000)


def test_a_header_with_a_million_dimensions_fails_fast_with_a_short_message(tmp_path):
    import json
    import struct

    from sparsepack.formats.errors import SafetensorsHeaderError
    from sparsepack.formats.safetensors_check import read_header

    header = json.dumps({"t": {"dtype": "F32", "shape": [1] * 1_000_000, "data_offsets": [0, 4]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(SafetensorsHeaderError, match=r"shape has 1000000 dimensions \(at most 64\)") as e:
        read_header(tmp_path / "x.safetensors")
    assert len(str(e.value)) < 300


def test_lone_surrogate_in_jsonl_names_the_line(env, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
    r = finetune(env, tmp_path / "o", "--data", str(tmp_path / "d.jsonl"))
    one_line_error(r, "line 2", "lone surrogate")


def test_eval_seqlen_beyond_the_model_context_is_refused(env):
    r = CliRunner().invoke(main, ["eval", str(env / "hf"), "--data", str(env / "c.txt"), "--seqlen", "4096"])
    one_line_error(r, "--seqlen 4096 exceeds the model's context of 256 positions")


def test_written_files_follow_the_umask(env, tmp_path):
    from sparsepack.formats.staging import umask

    r = finetune(env, tmp_path / "o")
    assert r.exit_code == 0, r.output
    want = 0o666 & ~umask()
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in (tmp_path / "o").rglob("*")
             if p.is_file()}  # fmt: skip
    assert modes and all(m == want for m in modes.values()), modes


def test_hard_linked_input_files_keep_their_mode(env, tmp_path):
    import shutil

    src = shutil.copytree(env / "pack", tmp_path / "src")
    for p in src.rglob("*"):
        if p.is_file():
            p.chmod(0o444)  # a read-only input pack: finetune hard-links its files into the output
    r = CliRunner().invoke(main, ["finetune", str(src), "--data", str(env / "c.txt"), "-o", str(tmp_path / "o2"),
                                  "--method", "lora", "--rank", "2", "--steps", "1", "--batch-size", "1",
                                  "--grad-accum", "1", "--seqlen", "32", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert all(p.stat().st_mode & 0o777 == 0o444 for p in src.rglob("*") if p.is_file())


@pytest.mark.parametrize("value", ["NaN", "0"])
def test_a_non_finite_or_zero_norm_epsilon_is_a_config_error(env, tmp_path, value):
    import json
    import shutil

    hf = shutil.copytree(env / "hf", tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rms_norm_eps"] = float(value)
    (hf / "config.json").write_text(json.dumps(cfg))
    one_line_error(CliRunner().invoke(main, ["inspect", str(hf)]), "ConfigError", "rms_norm_eps")


def test_peft_config_with_a_bad_r_is_refused(env, tmp_path):
    import json

    from sparsepack.formats.adapter_layout import read_adapter
    from sparsepack.formats.errors import FormatError
    from tests.factories import random_adapter, tiny_llama

    rtn_pack(tiny_llama(), tmp_path / "p", adapters={"a": random_adapter(tiny_llama())}, manifest=False)
    cfg_path = tmp_path / "p" / "adapters" / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = -3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="'r' must be a positive integer"):
        read_adapter(cfg_path.parent)


def test_symlinks_out_of_a_foreign_model_directory_are_refused(env, tmp_path):
    import shutil

    hf = shutil.copytree(env / "hf", tmp_path / "hf")
    (tmp_path / "elsewhere.json").write_text((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").unlink()
    (hf / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere.json")
    one_line_error(CliRunner().invoke(main, ["inspect", str(hf)]), "UnsafePathError", "resolves outside")


def test_a_line_too_long_for_the_tokenizer_is_one_line(env, tmp_path):
    (tmp_path / "t.txt").write_text("short\n" + "x" * 10_000_001 + "\nshort\n")
    r = finetune(env, tmp_path / "o", "--data", str(tmp_path / "t.txt"))
    one_line_error(r, "line 2 is 10,000,001 characters long")


def test_invalid_utf8_in_training_text_names_the_line(env, tmp_path):
    (tmp_path / "t.txt").write_bytes(b"one\ntwo\nthr\xffee\n")
    r = CliRunner().invoke(main, ["eval", str(env / "hf"), "--data", str(tmp_path / "t.txt")])
    one_line_error(r, "on line 3")


def test_a_hostile_header_shape_is_one_line_through_the_cli(env, tmp_path):
    import json
    import shutil
    import struct

    hf = shutil.copytree(env / "hf", tmp_path / "hf")
    header = json.dumps({"t": {"dtype": "F32", "shape": [1] * 1_000_000, "data_offsets": [0, 4]}}).encode()
    (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    one_line_error(CliRunner().invoke(main, ["inspect", str(hf)]), "shape has 1000000 dimensions")


def test_a_zero_dimensional_lora_a_is_one_line_through_the_cli(env, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from sparsepack.formats.manifest import MANIFEST_FILE, Manifest
    from sparsepack.formats.pack import record_files
    from tests.factories import random_adapter, tiny_llama

    pack, _ = rtn_pack(tiny_llama(), tmp_path / "p", adapters={"a": random_adapter(tiny_llama())})
    f = pack / "adapters" / "a" / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd[next(k for k in sd if "lora_A" in k)] = torch.tensor(1.0)
    save_file(sd, str(f))
    manifest = Manifest.read(pack / MANIFEST_FILE)
    record_files(pack, manifest)  # sealed again: the damage is for the shape checks to find
    (pack / MANIFEST_FILE).write_text(manifest.to_json())
    one_line_error(CliRunner().invoke(main, ["inspect", str(pack), "--verify"]), "ShapeError", "do not fit")


def test_a_perplexity_past_float_range_reads_inf(env, tmp_path):
    import json

    import torch

    from tests.factories import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e4)  # tied head: logits of order 1e8, losses far past exp's range
    save_hf(model, tmp_path / "hf")
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "hf"), "--data", str(env / "c.txt"), "--seqlen", "32",
                                  "--windows", "2", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["perplexity"] == float("inf")
