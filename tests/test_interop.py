"""Benchmark plumbing (runs anywhere) and the GPTQModel interop check (needs the peer venv; slow)."""

import json

import numpy as np
import pytest

from benchmarks import _common
from benchmarks.compress import SECTION, write_section
from benchmarks.interop_gptqmodel import compare, judge


def test_compare_is_zero_for_equal_logits_and_sees_a_shift():
    a = np.random.default_rng(0).standard_normal((2, 5, 11)).astype(np.float32)
    same = compare(a, a.copy())
    assert same["rel_err"] == 0 and same["top1"] == 1 and abs(same["kl_nats"]) < 1e-12
    shifted = compare(a, a + 0.5 * np.eye(11, dtype=np.float32)[a.argmin(-1)] * 100)  # boost the worst token
    assert shifted["top1"] == 0 and shifted["rel_err"] > 1
    tol = {"rel_err": 0.01, "top1": 0.98}
    assert judge(same, tol) and not judge(shifted, tol)


def test_markdown_parts_keep_other_sections_and_each_others_subsections(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    write_section(md, "first run\n\n### 4-bit\n\n| a |\n")
    assert md.read_text().startswith("# Benchmarks") and "| a |" in md.read_text()
    md.write_text(md.read_text() + "\n## Kernels\n\nkernel table\n\n### sizes\n\nx\n")
    _common.write_md_part(md, SECTION, "### Interop with GPTQModel\n\ninterop\n", lambda h: h.startswith("### Interop"))
    write_section(md, "second run\n\n### 4-bit\n\n| b |\n")
    text = md.read_text()
    assert "second run" in text and "| b |" in text and "first" not in text and "| a |" not in text
    assert text.count(SECTION) == 1 and "interop" in text
    assert text.endswith("## Kernels\n\nkernel table\n\n### sizes\n\nx\n")
    assert text.index("second run") < text.index("### Interop") < text.index("## Kernels")


def test_last_json_reads_one_line_and_pretty_printed_objects():
    assert _common.last_json('log line\n{"a": 1}\n') == {"a": 1}
    assert _common.last_json('progress...\n{\n  "b": [1, 2]\n}\n') == {"b": [1, 2]}
    assert _common.last_json("no json here") is None


def test_run_timed_reports_rss_and_the_childs_json(tmp_path):
    import sys

    run = _common.run_timed([sys.executable, "-c", "import json; print(json.dumps({'ok': 1}))"], tmp_path / "x.log")
    assert run.rc == 0 and run.result == {"ok": 1} and run.wall_s > 0
    if _common.GNU_TIME.exists():
        assert run.peak_rss_mb and run.peak_rss_mb > 1 and run.user_s is not None


def test_calibration_file_holds_exactly_the_windows_compress_draws(tmp_path):
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import sample_windows
    from tests.factories import save_hf, tiny_llama

    model_dir = save_hf(tiny_llama(), tmp_path / "hf")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"def f{i}(x): return x + {i}" for i in range(300)))
    w = _common.write_calibration(model_dir, tmp_path / "calib.jsonl", str(corpus), 16, 5, seed=3)
    rows = [json.loads(line)["input_ids"] for line in (tmp_path / "calib.jsonl").read_text().splitlines()]
    assert rows == w.tolist() == sample_windows(load_tokenizer(model_dir), str(corpus), 16, 5, 3).tolist()


@pytest.mark.slow
@pytest.mark.skipif(_common.peer_python(build=False) is None, reason="GPTQModel venv absent (gptqmodel_env.sh)")
def test_interop_both_directions_on_a_tiny_llama(tmp_path):
    from benchmarks.interop_gptqmodel import main

    res = main(["--tiny", "--workdir", str(tmp_path), "--nsamples", "8", "--seqlen", "64", "--windows", "2"])
    assert res["all_pass"], json.dumps(res, indent=1)
