"""Data sources: every source kind, the deterministic split, token windows, prompt masking, every error."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sparsepack.pipeline.data import (
    IGNORE_INDEX,
    DataError,
    Document,
    completion_examples,
    describe_split,
    load_documents,
    sample_windows,
    split_documents,
    token_stream,
    token_windows,
)
from tests.helpers_tokenizer import tiny_tokenizer


def _paragraphs(n: int, words: int = 60, tag: str = "p") -> str:
    """``n`` paragraphs of about ``6 * words`` characters each, separated by blank lines."""
    return "\n\n".join(" ".join(f"{tag}{i}w{j}" for j in range(words)) for i in range(n)) + "\n"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------- source kinds


def test_text_file_is_chunked_at_blank_lines(tmp_path):
    text = _paragraphs(60)  # ~30k characters -> several ~4000-character documents
    (tmp_path / "notes.txt").write_text(text)
    docs = load_documents(str(tmp_path / "notes.txt"))
    assert len(docs) > 4
    assert [d.id for d in docs] == [f"notes.txt#{i}" for i in range(len(docs))]
    assert all(d.prompt is None for d in docs)
    # nothing lost: every paragraph lands whole in exactly one document
    assert sum(d.text.count("\n\n") + 1 for d in docs) == 60
    assert all(len(d.text) >= 4000 for d in docs[:-1])


def test_text_without_blank_lines_is_still_cut(tmp_path):
    (tmp_path / "log.txt").write_text("".join(f"line {i} " * 8 + "\n" for i in range(2000)))
    assert len(load_documents(str(tmp_path / "log.txt"))) > 5


def test_directory_is_recursive_sorted_and_skips_hidden_and_binary(tmp_path):
    (tmp_path / "b.txt").write_text("bee\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.md").write_text("ay\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / ".hidden.txt").write_text("secret\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00data")
    with pytest.warns(UserWarning, match=r"image\.png is binary or not UTF-8"):
        docs = load_documents(str(tmp_path))
    assert [d.id for d in docs] == ["a.txt#0", "b.txt#0", "sub/a.md#0"]
    assert [d.text for d in docs] == ["first", "bee", "ay"]


def test_directory_with_only_binary_files_is_an_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01\x02")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="empty source"):
        load_documents(str(tmp_path))


def test_jsonl_text_and_prompt_completion(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"text": "plain one"}, {"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"text": "plain two"}]
    path.write_text("\n".join(json.dumps(r) for r in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    docs = load_documents(str(path))
    assert [d.id for d in docs] == ["data.jsonl:1", "data.jsonl:2", "data.jsonl:4"]
    assert docs[1] == Document("data.jsonl:2", " 4", prompt="Q: 2+2?\nA:")
    assert docs[1].full_text == "Q: 2+2?\nA: 4"
    assert docs[0].full_text == "plain one"


def test_pydoc_source():
    docs = load_documents("stdlib:pydoc")
    from pydoc_data.topics import topics

    assert [d.id for d in docs] == [f"pydoc:{k}" for k in sorted(topics)]
    assert all(d.text for d in docs)


# ---------------------------------------------------------------- split


def test_split_is_disjoint_covering_and_deterministic(tmp_path):
    (tmp_path / "big.txt").write_text(_paragraphs(400))
    src = str(tmp_path / "big.txt")
    whole = load_documents(src)
    train, ev = load_documents(src + "@train"), load_documents(src + "@eval")
    assert train and ev
    assert {d.id for d in train}.isdisjoint({d.id for d in ev})
    assert sorted(d.id for d in train + ev) == sorted(d.id for d in whole)
    assert load_documents(src + "@eval") == ev


def test_split_rule_is_the_documented_hash():
    import hashlib

    docs = load_documents("stdlib:pydoc")
    ev = [d.id for d in load_documents("stdlib:pydoc@eval")]
    expected = [d.id for d in docs if int(hashlib.sha1(d.id.encode()).hexdigest()[:8], 16) % 10 == 0]
    assert ev == expected
    assert "% 10 == 0" in describe_split()


def test_split_of_few_documents_still_has_an_eval_document():
    docs = [Document(f"d{i}", "x") for i in range(3)]  # none of d0..d2 hashes to 0 mod 10
    ev, train = split_documents(docs, "eval"), split_documents(docs, "train")
    assert len(ev) == 1 and len(train) == 2


def test_split_of_a_single_document_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text("only one short document\n")
    with pytest.raises(DataError, match=r"one\.txt@train.*too few"):
        load_documents(str(tmp_path / "one.txt@train"))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("empty.txt", b"  \n\n\t\n", "empty source"),
        ("nul.txt", b"text\x00more", "binary or not UTF-8"),
        ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "binary or not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl line 2: malformed JSON"),
        (
            "keys.jsonl",
            b'{"text": "ok"}\n\n{"prompt": "p"}\n',
            r"keys\.jsonl line 3: .*'prompt' and 'completion'",
        ),
        ("list.jsonl", b"[1, 2]\n", r"list\.jsonl line 1: expected a JSON object"),
    ],
)
def test_bad_files_raise_naming_the_source(tmp_path, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=pattern) as info:
        load_documents(str(tmp_path / name))
    assert name in str(info.value)


def test_bad_jsonl_in_a_directory_is_not_skipped(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 1"):
        load_documents(str(tmp_path))


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("/no/such/place.txt", "no such file"),
        ("stdlib:nope", "unknown built-in source 'nope'.*stdlib:pydoc"),
        ("stdlib:pydoc@test", "unknown split suffix '@test'"),
    ],
)
def test_bad_source_strings(source, pattern):
    with pytest.raises(DataError, match=pattern):
        load_documents(source)


def test_existing_path_with_at_sign_is_a_path(tmp_path):
    (tmp_path / "me@host.txt").write_text("hello\n")
    assert load_documents(str(tmp_path / "me@host.txt"))[0].text == "hello"


# ---------------------------------------------------------------- tokens


def test_token_stream_joins_documents_with_eos(tok):
    docs = [Document("a", "the fox"), Document("b", " over", prompt="jumps")]
    stream = token_stream(tok, docs)
    a = tok("the fox", add_special_tokens=False)["input_ids"]
    b = tok("jumps over", add_special_tokens=False)["input_ids"]
    assert stream.dtype == torch.long
    assert stream.tolist() == a + [tok.eos_token_id] + b


def test_text_file_streams_as_its_own_tokens_without_eos_between_chunks(tok, tmp_path):
    text = _paragraphs(60)
    (tmp_path / "notes.txt").write_text(text)
    docs = load_documents(str(tmp_path / "notes.txt"))
    assert len(docs) > 4  # several chunks, so a boundary between them is crossed
    stream = token_stream(tok, docs).tolist()
    assert stream == tok(text.strip(), add_special_tokens=False, verbose=False)["input_ids"]
    assert tok.eos_token_id not in stream


def test_split_joins_adjacent_chunks_with_the_files_text_and_gaps_with_eos(tok, tmp_path):
    (tmp_path / "big.txt").write_text(_paragraphs(400))
    for split in ("train", "eval"):
        docs = load_documents(f"{tmp_path / 'big.txt'}@{split}")
        index = [int(d.id.rsplit("#", 1)[1]) for d in docs]
        runs = [[docs[0].text]]  # chunks adjacent in the file; _paragraphs separates them by one blank line
        for prev, i, doc in zip(index, index[1:], docs[1:], strict=False):
            if i == prev + 1:
                runs[-1].append(doc.text)
            else:
                runs.append([doc.text])
        expected = []
        for k, run in enumerate(runs):
            expected += [tok.eos_token_id] * bool(k) + tok("\n\n".join(run), add_special_tokens=False)["input_ids"]
        assert token_stream(tok, docs).tolist() == expected
        if split == "train":
            assert 1 < len(runs) < len(docs)  # both kinds of boundary occur


def test_token_windows_shapes_and_content(tok, tmp_path):
    (tmp_path / "t.txt").write_text(_paragraphs(20))
    src = str(tmp_path / "t.txt")
    stream = token_stream(tok, load_documents(src))
    w = token_windows(tok, src, 32)
    assert w.shape == (stream.numel() // 32, 32) and w.dtype == torch.long
    assert torch.equal(w.flatten(), stream[: w.numel()])
    assert torch.equal(token_windows(tok, src, 32, 3), w[:3])


def test_token_windows_spread_takes_evenly_spaced_windows_from_the_whole_stream(tok, tmp_path):
    (tmp_path / "t.txt").write_text(_paragraphs(20))
    src = str(tmp_path / "t.txt")
    every = token_windows(tok, src, 16)
    n = 4
    assert len(every) >= 3 * n
    spread = token_windows(tok, src, 16, n, spread=True)
    picked = [i * len(every) // n for i in range(n)]
    assert torch.equal(spread, every[picked])
    assert picked[-1] >= 3 * len(every) // 4  # the last quarter of the text, not only its start
    assert torch.equal(token_windows(tok, src, 16, spread=True), every)  # all windows: the same as plain


def test_token_windows_warns_when_fewer_than_asked(tok, tmp_path):
    (tmp_path / "t.txt").write_text("the quick brown fox " * 20)
    src = str(tmp_path / "t.txt")
    available = token_stream(tok, load_documents(src)).numel() // 16
    with pytest.warns(UserWarning, match=f"using the {available} available"):
        w = token_windows(tok, src, 16, available + 5)
    assert w.shape == (available, 16)


def test_token_windows_too_short_names_source_tokens_and_seqlen(tok, tmp_path):
    (tmp_path / "short.txt").write_text("the fox\n")
    n_tokens = token_stream(tok, load_documents(str(tmp_path / "short.txt"))).numel()
    with pytest.raises(DataError, match=rf"short\.txt: {n_tokens} tokens .* seqlen 512"):
        token_windows(tok, str(tmp_path / "short.txt"), 512)
    with pytest.raises(DataError, match="need at least 1000"):
        token_windows(tok, "stdlib:pydoc", 512, min_windows=1000)


def test_long_document_does_not_trigger_the_max_length_warning(tok, caplog):
    import transformers

    transformers.logging.enable_propagation()
    try:
        with caplog.at_level("WARNING"):
            token_stream(tok, [Document("x", "the fox " * 500)])  # far past model_max_length=64
    finally:
        transformers.logging.disable_propagation()
    assert "longer than" not in caplog.text


def test_sample_windows_are_seeded_slices_of_the_stream(tok):
    a = sample_windows(tok, "stdlib:pydoc@eval", 24, 5, seed=0)
    assert a.shape == (5, 24) and a.dtype == torch.long
    assert torch.equal(a, sample_windows(tok, "stdlib:pydoc@eval", 24, 5, seed=0))
    assert not torch.equal(a, sample_windows(tok, "stdlib:pydoc@eval", 24, 5, seed=1))
    stream = token_stream(tok, load_documents("stdlib:pydoc@eval")).tolist()
    row = a[0].tolist()
    assert any(stream[i : i + 24] == row for i in range(len(stream) - 23))


def test_sample_windows_too_short(tok, tmp_path):
    (tmp_path / "s.txt").write_text("the fox\n")
    with pytest.raises(DataError, match=r"s\.txt: \d+ tokens, need more than seqlen 64"):
        sample_windows(tok, str(tmp_path / "s.txt"), 64, 2, seed=0)


def test_completion_examples_mask_the_prompt(tok, tmp_path):
    path = tmp_path / "qa.jsonl"
    recs = [
        {"prompt": "Q: the fox?\nA:", "completion": " jumps"},
        {"prompt": "the quick brown fox " * 20, "completion": " dog"},  # prompt fills seqlen -> dropped
        {"text": "the quick brown fox jumps over the lazy dog " * 6},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.warns(UserWarning, match="dropped 1 record"):
        ex = completion_examples(tok, str(path), 16)
    ids, labels = ex[0]
    p = tok("Q: the fox?\nA:", add_special_tokens=False)["input_ids"]
    c = tok(" jumps", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == (p + c + [tok.eos_token_id])[:16]
    assert labels.tolist() == ([IGNORE_INDEX] * len(p) + c + [tok.eos_token_id])[:16]
    assert len(ex) > 2  # plain text windows follow
    for ids, labels in ex[1:]:
        assert ids.shape == (16,) and torch.equal(ids, labels)


def test_completion_examples_with_nothing_to_learn(tok, tmp_path):
    (tmp_path / "s.txt").write_text("the fox\n")
    with warnings.catch_warnings(), pytest.raises(DataError, match="no training example"):
        completion_examples(tok, str(tmp_path / "s.txt"), 64)
