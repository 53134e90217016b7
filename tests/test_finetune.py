"""finetune: phases, Fisher support selection against a dense reference, resume bit for bit, PEFT parity."""

import json

import pytest
import torch

import sparsepack
from sparsepack.config import TrainConfig
from sparsepack.pipeline import trainer as trainer_mod
from sparsepack.pipeline.finetune import finetune
from sparsepack.pipeline.trainer import TrainingDivergedError
from tests.factories import rtn_pack, run_interrupted, save_hf, tiny_llama


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    model = tiny_llama()
    pack, _ = rtn_pack(model, d / "pack")
    save_hf(model, d / "hf")
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(300)]
    (d / "c.txt").write_text("\n".join(lines))
    return d


def small(env, **kw):
    base = dict(data=str(env / "c.txt"), adapter="a1", rank=4, density=0.05, steps=4, warmup_steps=2, batch_size=2,
                grad_accum=2, seqlen=32, mask_samples=4, lr=5e-3, lr_lowrank=5e-3)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def adapter_tensors(path, name="a1"):
    from safetensors.torch import load_file

    d = path / "adapters" / name
    out = dict(load_file(str(d / "adapter_model.safetensors")))
    if (d / "sparse_adapter.safetensors").exists():
        out.update(load_file(str(d / "sparse_adapter.safetensors")))
    return out


def test_rosa_on_quantized_base_writes_a_loadable_pack(env, tmp_path):
    res = finetune(env / "pack", tmp_path / "out", small(env, eval_data=str(env / "c.txt"), eval_every=2,
                                                           eval_windows=2), progress=False)  # fmt: skip
    phases = [r["phase"] for r in res.history]
    assert phases == ["warmup", "warmup", "train", "train", "train", "train"]
    assert res.summary["selection"]["nnz"] > 0 and "eval_ppl" in res.summary
    d = tmp_path / "out" / "adapters" / "a1"
    meta = json.loads((d / "sparsepack_adapter.json").read_text())
    q = meta["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["rank"] == 4 and q["nnz"] == round(0.05 * 64 * 64)
    assert (d / "metrics.jsonl").read_text().count("\n") == 6 and (d / "loss.png").exists()
    lm = sparsepack.load(tmp_path / "out", adapter="a1")
    ids = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        with_a = lm(ids).logits
        from sparsepack.layers.inject import set_active_adapters

        set_active_adapters(lm, None)
        assert (lm(ids).logits - with_a).abs().max() > 0  # the correction is not a no-op
    assert not (tmp_path / "out.ckpt").exists()  # checkpoints cleaned up after success


def test_fisher_scores_equal_dense_squared_gradients(env):
    """With B = 0 the adapted model is the base: scores must equal mean over micro-batches of (dL/dW)^2."""
    model = sparsepack.load(env / "hf")
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import completion_examples

    tok = load_tokenizer(env / "hf")
    cfg = small(env, dropout=0.0, mask_samples=4)
    examples = completion_examples(tok, cfg.data, cfg.seqlen)
    tr = trainer_mod.Trainer(model, tok, cfg, examples, None, progress=False)
    tr.setup()
    tr._build_optimizer(with_sparse=False)
    name = "model.layers.1.mlp.down_proj"
    scores = tr._gradient_scores("fisher", [name])[name]

    ref_model = tiny_llama()
    w = ref_model.get_submodule(name).weight
    ref_model.requires_grad_(False)
    w.requires_grad_(True)
    from sparsepack.pipeline.batches import Batcher

    b = Batcher(examples, cfg.batch_size, tok.pad_token_id, cfg.seed)
    acc = torch.zeros_like(w)
    for _ in range(2):  # 4 samples / batch 2
        ref_model(**b.next(), use_cache=False).loss.backward()
        acc += w.grad**2
        w.grad = None
    torch.testing.assert_close(scores, acc / 2, rtol=1e-4, atol=1e-12)


def test_resume_is_bit_for_bit(env, tmp_path, monkeypatch):
    cfg = small(env, steps=5, save_every=2)
    finetune(env / "pack", tmp_path / "full", cfg, progress=False)
    expected = adapter_tensors(tmp_path / "full")

    # interrupted after the checkpoint at global step 4 (phase train, step 2)
    run_interrupted(monkeypatch, 6, lambda: finetune(env / "pack", tmp_path / "part", cfg, progress=False))
    assert not (tmp_path / "part").exists() and (tmp_path / "part.ckpt" / "latest").exists()
    res = finetune(env / "pack", tmp_path / "part", cfg, resume=True, progress=False)
    assert res.summary["steps"] == 7
    got = adapter_tensors(tmp_path / "part")
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # the rows logged after the checkpoint (step 5) were logged again by the resume, not kept twice
    (metrics,) = (tmp_path / "part").glob("adapters/*/metrics.jsonl")
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 8))


def test_resume_refuses_changed_settings(env, tmp_path, monkeypatch):
    cfg = small(env, method="lora", steps=3, save_every=1)
    run_interrupted(monkeypatch, 2, lambda: finetune(env / "pack", tmp_path / "o", cfg, progress=False))
    with pytest.raises(ValueError, match=r"these differ: \['rank'\]"):
        finetune(env / "pack", tmp_path / "o", small(env, method="lora", steps=3, save_every=1, rank=8),
                 resume=True, progress=False)  # fmt: skip


def test_nan_loss_stops_with_a_clear_message(env, tmp_path, monkeypatch):
    cfg = small(env, method="lora", steps=4, save_every=1)
    real = trainer_mod.Trainer._loss_terms
    calls = {"n": 0}

    def nan_terms(self, batch, kl_batch=None):
        calls["n"] += 1
        for term in real(self, batch, kl_batch):
            yield term * float("nan") if calls["n"] > 4 else term

    monkeypatch.setattr(trainer_mod.Trainer, "_loss_terms", nan_terms)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 2 .*step-0000002"):
        finetune(env / "pack", tmp_path / "o", cfg, progress=False)
    assert not (tmp_path / "o").exists()


def test_lora_low_rank_part_loads_in_peft_with_equal_logits(env, tmp_path):
    """PEFT loads our adapter dir onto the dense model; with no sparse part its logits equal ours."""
    peft = pytest.importorskip("peft")
    finetune(env / "hf", tmp_path / "out", small(env, method="lora", steps=3, lr_lowrank=5e-2), progress=False)
    ours = sparsepack.load(tmp_path / "out", adapter="a1")
    base = tiny_llama()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "out" / "adapters" / "a1")).eval()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ours(ids).logits, peft_model(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(ids).logits - a).abs().max() > 1e-4  # the adapter really moved the outputs


def test_rosa_low_rank_part_in_peft_equals_ours_with_sparse_zeroed(env, tmp_path):
    peft = pytest.importorskip("peft")
    finetune(env / "hf", tmp_path / "out", small(env, steps=2, lr_lowrank=5e-2), progress=False)
    ours = sparsepack.load(tmp_path / "out", adapter="a1")
    for layer in ours.modules():
        if hasattr(layer, "sparse_values") and "a1" in layer.sparse_values:
            layer.sparse_values["a1"].data.zero_()
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out" / "adapters" / "a1")).eval()
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=0)


def test_prompt_completion_jsonl_trains_on_completions(env, tmp_path):
    rows = [{"prompt": f"Q: what is {i} times 2? A:", "completion": f" {2 * i}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    res = finetune(env / "pack", tmp_path / "out", small(env, method="lora", data=str(tmp_path / "d.jsonl"),
                                                          steps=2), progress=False)  # fmt: skip
    assert res.summary["examples"] == 40
    # label tokens: completion + EOS only
    assert res.summary["tokens"] < 2 * 2 * 2 * 12


def test_cli_finetune(env, tmp_path):
    from click.testing import CliRunner

    from sparsepack.cli import main

    r = CliRunner().invoke(main, ["finetune", str(env / "pack"), "--data", str(env / "c.txt"), "-o",
                                  str(tmp_path / "o"), "--rank", "2", "--density", "0.02", "--steps", "2",
                                  "--warmup-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--seqlen", "32",
                                  "--mask-samples", "2", "--adapter", "cli", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["adapter"] == "cli"
    bad = CliRunner().invoke(main, ["finetune", str(env / "pack"), "--data", str(env / "c.txt"), "-o",
                                    str(tmp_path / "o2"), "--adapter", "../x"])  # fmt: skip
    assert bad.exit_code == 1 and "invalid adapter name" in bad.output
