"""Bad data for every data source (issue 8): each input either works or fails with a DataError naming the source.

``tests/test_data.py`` already covers whitespace-only, NUL-binary and Latin-1 files, malformed and key-less jsonl
records, a directory of binary files, bad source strings and too-short streams; this adds the cases it misses:
zero-byte files, hostile JSON lines, files that are not regular files (a FIFO blocked forever, /dev/zero filled
memory), single-line and huge single-line text, a calibration set smaller than asked, and the CLI's message.
"""

from __future__ import annotations

import json
import os
import signal
import warnings

import pytest

from sparsepack.pipeline.data import DataError, load_documents, sample_windows, token_stream, token_windows
from tests.factories import save_hf, tiny_llama
from tests.helpers_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def alarm():
    """Fail instead of hanging: a read that blocks gets 10 s."""

    def fire(_sig, _frame):
        raise TimeoutError("the data source read blocked")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("zero.txt", b"", "empty source"),
        ("zero.jsonl", b"", "empty source"),
        ("blank.jsonl", b"\n\n  \n", "empty source"),
        ("deep.jsonl", b"[" * 100_000 + b"\n", r"deep\.jsonl line 1: malformed JSON \(RecursionError"),
        ("digits.jsonl", b'{"text": ' + b"9" * 5000 + b"}\n", r"digits\.jsonl line 1: malformed JSON \(ValueError"),
        ("content.jsonl", b'{"content": "hello"}\n', r"content\.jsonl line 1: .* got keys \['content'\]"),
        ("number.jsonl", b'{"text": 5}\n', r"number\.jsonl line 1: a record needs a string 'text'"),
        ("null.jsonl", b'{"prompt": "p", "completion": null}\n', r"null\.jsonl line 1: .*'prompt' and 'completion'"),
        ("second.jsonl", b'{"text": "ok"}\n{"txt": "typo"}\n', r"second\.jsonl line 2: .* got keys \['txt'\]"),
        ("bom-latin1.txt", b"\xef\xbb\xbfcaf\xe9", "binary or not UTF-8"),
        ("late-binary.txt", b"text " * 2000 + b"\xff\xfe\x00\x01", "binary or not UTF-8"),
    ],
)  # fmt: skip
def test_bad_files_are_a_data_error_naming_the_file(tmp_path, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_documents(str(tmp_path / name))
    assert name in str(info.value)


def test_a_fifo_is_refused_instead_of_blocking(tmp_path, alarm):
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(DataError, match=r"pipe\.txt is not a regular file"):
        load_documents(str(tmp_path / "pipe.txt"))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_refused_instead_of_read_forever(alarm):
    with pytest.raises(DataError, match="/dev/zero is not a regular file"):
        load_documents("/dev/zero")


def test_a_fifo_inside_a_directory_is_skipped(tmp_path, alarm):
    (tmp_path / "a.txt").write_text("text\n")
    os.mkfifo(tmp_path / "pipe.txt")
    assert [d.id for d in load_documents(str(tmp_path))] == ["a.txt#0"]


def test_single_short_line_is_too_short_for_calibration(tok, tmp_path):
    (tmp_path / "one.txt").write_text("just one line without a newline")
    assert len(load_documents(str(tmp_path / "one.txt"))) == 1
    with pytest.raises(DataError, match=r"one\.txt: \d+ tokens, need more than seqlen 256"):
        sample_windows(tok, str(tmp_path / "one.txt"), 256, 8, seed=0)
    with pytest.raises(DataError, match=r"one\.txt: \d+ tokens give 0 window"):
        token_windows(tok, str(tmp_path / "one.txt"), 256)


@pytest.mark.parametrize("megabytes", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_huge_single_line_works(tok, tmp_path, megabytes):
    line = "".join(f"w{i % 997}x " for i in range(megabytes * 200_000))  # ~1 MB per 200k words, no newline
    (tmp_path / "line.txt").write_text(line)
    docs = load_documents(str(tmp_path / "line.txt"))
    assert len(docs) == 1 and len(docs[0].text) == len(line.strip())
    w = sample_windows(tok, str(tmp_path / "line.txt"), 128, 4, seed=0)
    assert w.shape == (4, 128)


def test_calibration_set_shorter_than_asked_warns_with_the_number_used(tok, tmp_path):
    (tmp_path / "small.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    tokens = token_stream(tok, load_documents(str(tmp_path / "small.txt"))).numel()
    distinct = tokens // 32
    with pytest.warns(UserWarning, match=rf"small\.txt: {tokens} tokens hold only {distinct} non-overlapping "
                                         rf"window\(s\) of 32 tokens; the 500 windows drawn will overlap"):  # fmt: skip
        w = sample_windows(tok, str(tmp_path / "small.txt"), 32, 500, seed=0)
    assert w.shape == (500, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough text: no warning
        sample_windows(tok, str(tmp_path / "small.txt"), 32, distinct, seed=0)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [(b"", "empty source"), (b"\x00\x01\x02binary", "binary or not UTF-8"), (b"tiny", "need more than seqlen")],
)
def test_cli_compress_names_the_bad_calibration_source(tmp_path, content, pattern):
    from click.testing import CliRunner

    from sparsepack.cli import main

    save_hf(tiny_llama(), tmp_path / "hf")
    (tmp_path / "calib.txt").write_bytes(content)
    r = CliRunner().invoke(main, ["compress", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--calib",
                                  str(tmp_path / "calib.txt"), "--seqlen", "64", "--group-size", "32"])  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "calib.txt" in r.output and pattern in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "hf"]  # no output, no staging leftovers


def test_jsonl_with_wrong_keys_in_the_cli_is_one_line(tmp_path):
    from click.testing import CliRunner

    from sparsepack.cli import main

    save_hf(tiny_llama(), tmp_path / "hf")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "hf"), "--data", str(tmp_path / "d.jsonl")])
    assert r.exit_code == 1 and "d.jsonl line 1" in r.output and "Traceback" not in r.output
