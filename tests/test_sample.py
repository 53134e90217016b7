"""The sample model converts from its GGUF into a plain HF checkpoint that reloads as is (slow: ~40 s)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")
sample = pytest.importorskip("sparsepack.runtime.sample")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    try:
        sample.find_sample_gguf()
    except sample.SampleModelError as e:
        pytest.skip(str(e))
    return sample.prepare_sample_model(tmp_path_factory.mktemp("cache"))


@pytest.mark.slow
def test_prepared_model_config_and_reload(prepared):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(prepared)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")

    model = AutoModelForCausalLM.from_pretrained(prepared)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    marker = json.loads((prepared / sample.MARKER).read_text())
    assert marker["parameters"] == sum(p.numel() for p in model.parameters()) == 134_515_008

    tok = AutoTokenizer.from_pretrained(prepared)
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits  # [1, L, vocab]
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_second_call_is_a_no_op(prepared):
    before = (prepared / "model.safetensors").stat().st_mtime_ns
    assert sample.prepare_sample_model(prepared.parent) == prepared
    assert (prepared / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in prepared.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEPACK_CACHE", str(tmp_path))
    assert sample.default_cache_dir() == tmp_path


def test_an_outdated_prepared_folder_is_replaced(tmp_path, monkeypatch):
    old = tmp_path / sample.SAMPLE_DIRNAME
    old.mkdir()
    (old / "stale").write_text("old")
    (old / sample.MARKER).write_text('{"version": 0}')  # ours, from an earlier layout: replaced
    monkeypatch.setattr(sample, "find_sample_gguf", lambda: tmp_path / "x.gguf")

    def convert(_gguf, out):
        (out / "config.json").write_text("{}")
        return {"version": sample.MARKER_VERSION}

    monkeypatch.setattr(sample, "_convert", convert)
    assert sample.prepare_sample_model(tmp_path) == old
    assert sorted(p.name for p in old.iterdir()) == ["config.json", sample.MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == [sample.SAMPLE_DIRNAME]
