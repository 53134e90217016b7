"""The CLI: inspect and eval, against direct transformers computations."""

import json

import pytest
import torch
from click.testing import CliRunner

from sparsepack.cli import main
from tests.factories import random_adapter, rtn_pack, save_hf, tiny_llama
from tests.helpers_tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "quantized", "sparse", "adapter", "window", "token", "model"]
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, 10, (12,), generator=gen)) for _ in range(200)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def test_version_and_help():
    assert run("--version").output.startswith("sparsepack, version")
    out = run("--help").output
    assert "compress" in out and "finetune" in out and "inspect" in out and "eval" in out


def test_eval_on_plain_hf_model_equals_transformers_loss(tmp_path, model, text_file):
    path = save_hf(model, tmp_path / "hf")
    result = run("eval", path, "--data", text_file, "--seqlen", 32, "--windows", 5, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    tok = tiny_tokenizer()
    ids = tok(text_file.read_text(), add_special_tokens=False, verbose=False)["input_ids"][: 5 * 32]
    windows = torch.tensor(ids).view(5, 32)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    expected = torch.stack(losses).mean().exp().item()
    assert got["windows"] == 5 and got["tokens"] == 5 * 31
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_eval_spread_scores_windows_from_the_whole_text(tmp_path, model, text_file):
    path = save_hf(model, tmp_path / "hf")
    result = run("eval", path, "--data", text_file, "--seqlen", 32, "--windows", 3, "--spread", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    ids = tiny_tokenizer()(text_file.read_text(), add_special_tokens=False, verbose=False)["input_ids"]
    every = torch.tensor(ids[: len(ids) // 32 * 32]).view(-1, 32)
    picked = every[torch.arange(3) * len(every) // 3]  # [3, 32]
    assert len(every) >= 6  # so the spread windows differ from the first three
    with torch.no_grad():
        expected = torch.stack([model(input_ids=w[None], labels=w[None]).loss for w in picked]).mean().exp().item()
    assert got["spread"] is True and got["windows"] == 3
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_eval_with_adapter_changes_perplexity(tmp_path, model, text_file):
    path, _ = rtn_pack(model, tmp_path / "p", adapters={"a": random_adapter(model)})
    base = json.loads(run("eval", path, "--data", text_file, "--seqlen", 32, "--windows", 3, "--json").output)
    with_a = run(
        "eval", path, "--data", text_file, "--seqlen", 32, "--windows", 3, "--adapter", "a", "--json"
    )
    assert with_a.exit_code == 0, with_a.output
    assert json.loads(with_a.output)["perplexity"] != base["perplexity"]


def test_eval_too_short_source_is_a_clear_error(tmp_path, model):
    path = save_hf(model, tmp_path / "hf")
    short = tmp_path / "short.txt"
    short.write_text("alpha beta")
    result = run("eval", path, "--data", short, "--seqlen", 64)
    assert result.exit_code == 1
    assert "short.txt" in result.output and "seqlen 64" in result.output


def test_inspect_text_json_and_verify(tmp_path, model):
    path, _ = rtn_pack(model, tmp_path / "p", adapters={"a": random_adapter(model)})
    text = run("inspect", path)
    assert text.exit_code == 0, text.output
    assert "quantized layers:" in text.output and "model.layers.1.mlp.down_proj" in text.output
    data = json.loads(run("inspect", path, "--json", "--verify").output)
    assert data["quantization"]["bits"] == 4 and len(data["layers"]) == 14 and data["verified"]
    assert data["adapters"][0]["name"] == "a" and data["adapters"][0]["nnz"] > 0
    (path / "config.json").write_text((path / "config.json").read_text() + " ")
    bad = run("inspect", path, "--verify")
    assert bad.exit_code == 1 and "config.json" in bad.output and "HashMismatchError" in bad.output


def test_missing_pack_is_a_clear_error(tmp_path):
    result = run("inspect", tmp_path / "nope")
    assert result.exit_code == 1 and "nope" in result.output and "no such pack" in result.output


def test_generate_streams_the_greedy_continuation(tmp_path, model):
    path, ref = rtn_pack(model, tmp_path / "p", adapters={"a": random_adapter(model)})
    result = run("generate", path, "--prompt", "alpha beta", "--max-new-tokens", 5, "--adapter", "a")
    assert result.exit_code == 0, result.output
    import sparsepack

    lm = sparsepack.load(path, adapter="a")
    ids = tiny_tokenizer()("alpha beta", return_tensors="pt")["input_ids"]
    expected = lm.generate(ids, max_new_tokens=5, do_sample=False)
    assert result.output.strip() == tiny_tokenizer().decode(expected[0], skip_special_tokens=True).strip()


def test_eval_on_a_text_file_scores_the_windows_of_the_whole_tokenized_text(tmp_path, model):
    # the usual protocol (GPTQ's and lm-eval's wikitext perplexity): tokenize the text as one stream, cut windows
    words = ["alpha", "beta", "gamma", "delta", "quantized", "sparse", "adapter", "window", "token", "model"]
    gen = torch.Generator().manual_seed(1)
    paragraphs = ["\n".join(" ".join(words[i] for i in torch.randint(0, 10, (12,), generator=gen)) for _ in range(4))
                  for _ in range(50)]  # fmt: skip
    text = "\n\n".join(paragraphs) + "\n"  # ~16k characters: several of data.py's ~4000-character chunks
    (tmp_path / "held_out.txt").write_text(text)
    path = save_hf(model, tmp_path / "hf")
    ids = tiny_tokenizer()(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // 128 - 1  # all but the last window: the file's final newline is not part of a window
    result = run("eval", path, "--data", tmp_path / "held_out.txt", "--seqlen", 128, "--windows", n, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    windows = torch.tensor(ids[: n * 128]).view(n, 128)  # [n, 128]
    with torch.no_grad():
        expected = model(input_ids=windows, labels=windows).loss.exp().item()  # equal windows: mean of means
    assert got["windows"] == n and got["tokens"] == n * 127
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_generate_json_prints_one_summary_instead_of_streaming(tmp_path, model):
    import sparsepack

    path, _ = rtn_pack(model, tmp_path / "p", adapters={"a": random_adapter(model)})
    result = run("generate", path, "--prompt", "alpha beta", "--max-new-tokens", 5, "--adapter", "a", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)  # nothing streamed before or after the JSON
    tok = tiny_tokenizer()
    ids = tok("alpha beta", return_tensors="pt")["input_ids"]
    expected = sparsepack.load(path, adapter="a").generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1] :]
    counts = {"prompt_tokens": ids.shape[1], "new_tokens": expected.numel()}
    assert {k: got[k] for k in ("prompt", "adapter", *counts)} == {"prompt": "alpha beta", "adapter": "a", **counts}
    assert got["text"] == tok.decode(expected, skip_special_tokens=True) and got["seconds"] >= 0


@pytest.mark.parametrize("method", ["lora", "rosa"])
def test_finetune_rank_zero_with_a_low_rank_method_is_refused_before_training(tmp_path, model, text_file, method):
    path = save_hf(model, tmp_path / "hf")
    result = run("finetune", path, "--data", text_file, "-o", tmp_path / "out", "--method", method, "--rank", 0)
    assert result.exit_code == 1
    expected = f"Error: ValueError: --rank must be >= 1 for --method {method} (it trains a low-rank part), got 0"
    assert result.output.strip() == expected  # one line
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert not (tmp_path / "out").exists()
