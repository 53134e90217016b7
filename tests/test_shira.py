"""SHiRA on the method seam: support rules against their definitions (and a dense gradient reference), sparse-only
training through every stage, PEFT's own SHiRA format round trip, and the flags that make no sense together."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import sparsepack
from sparsepack.cli import main
from sparsepack.config import TrainConfig
from sparsepack.formats.pack import read_pack
from sparsepack.methods import base as methods
from sparsepack.methods.masks import SUPPORT_RULES, SupportContext, struct_score
from sparsepack.pipeline import trainer as trainer_mod
from sparsepack.pipeline.finetune import finetune
from tests.factories import rtn_pack, run_interrupted, save_hf, tiny_llama


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("shira")
    model = tiny_llama()
    rtn_pack(model, d / "pack")
    save_hf(model, d / "hf")
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(300)]
    (d / "c.txt").write_text("\n".join(lines))
    return d


def small(env, **kw) -> TrainConfig:
    base = dict(data=str(env / "c.txt"), adapter="s1", method="shira", density=0.05, steps=4, batch_size=2,
                grad_accum=2, seqlen=32, mask_samples=4, lr=5e-3, dropout=0.0)  # fmt: skip
    base.update(kw)
    if "budget" in kw:
        del base["density"]
    return TrainConfig(**base)


def support_set(s) -> set[tuple[int, int]]:
    rows = torch.repeat_interleave(torch.arange(s.shape[0]), torch.diff(s.row_ptr.long()))
    return set(zip(rows.tolist(), s.col_idx.tolist(), strict=True))


def ctx_for(shapes, nnz, weights=None, seed=0, adapter="a") -> SupportContext:
    return SupportContext(shapes=shapes, nnz=nnz, base_weight=lambda n: weights[n], scores=None,
                          groups=[list(shapes)], seed=seed, adapter=adapter)  # fmt: skip


# ------------------------------------------------------------------------------------------------ support rules


def test_magnitude_picks_the_largest_weights():
    w = torch.tensor([[0.1, -5.0, 0.2], [3.0, 0.0, -0.3]])
    s = SUPPORT_RULES.get("magnitude")(ctx_for({"l": (2, 3)}, {"l": 2}, {"l": w}))["l"]
    assert support_set(s) == {(0, 1), (1, 0)}


def test_random_masks_differ_across_same_shape_layers_and_adapters_and_repeat_per_seed():
    shapes = {"a": (16, 24), "b": (16, 24)}
    nnz = {"a": 20, "b": 20}
    rule = SUPPORT_RULES.get("random")
    one, again = rule(ctx_for(shapes, nnz)), rule(ctx_for(shapes, nnz))
    other_adapter, other_seed = rule(ctx_for(shapes, nnz, adapter="b")), rule(ctx_for(shapes, nnz, seed=1))
    assert support_set(one["a"]) == support_set(again["a"])
    assert support_set(one["a"]) != support_set(one["b"])
    assert support_set(one["a"]) != support_set(other_adapter["a"])
    assert support_set(one["a"]) != support_set(other_seed["a"])
    assert all(s.nnz == 20 for s in one.values())


def test_struct_takes_the_diagonal_then_every_fth_row_and_column():
    o, i, nnz = 12, 16, 60
    s = SUPPORT_RULES.get("struct")(ctx_for({"l": (o, i)}, {"l": nnz}))["l"]
    got = support_set(s)
    assert len(got) == nnz
    assert {(k, k) for k in range(min(o, i))} <= got
    f = max(1, round(2 * o * i / nnz))
    pattern = {(r, c) for r in range(o) for c in range(i) if r % f == 0 or c % f == 0}
    assert got - {(k, k) for k in range(min(o, i))} <= pattern
    assert len(torch.unique(struct_score(o, i, nnz))) == o * i  # no ties: one well-defined set


@pytest.mark.parametrize("rule", ["grad", "snip"])
def test_gradient_rules_equal_a_dense_reference(env, rule):
    """Before anything trains, the gradient reaching each layer is the dense model's dL/dW: ``grad`` keeps the top
    |sum of dW|, ``snip`` the top |W * sum of dW|, over the same scoring examples."""
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.batches import Batcher
    from sparsepack.pipeline.data import completion_examples

    tok = load_tokenizer(env / "hf")
    cfg = small(env, support=rule)
    examples = completion_examples(tok, cfg.data, cfg.seqlen)
    tr = trainer_mod.Trainer(sparsepack.load(env / "hf"), tok, cfg, examples, None, progress=False)
    tr.setup()
    name = "model.layers.1.mlp.down_proj"
    got = tr._gradient_scores("grad", [name])[name]

    ref = tiny_llama().requires_grad_(False)
    w = ref.get_submodule(name).weight.requires_grad_(True)
    batches = Batcher(examples, cfg.batch_size, tok.pad_token_id, cfg.seed)
    for _ in range(2):  # 4 scoring samples / batch 2
        ref(**batches.next(), use_cache=False).loss.backward()
    torch.testing.assert_close(got, w.grad, rtol=1e-4, atol=1e-7)

    summary = tr._select_support()
    score = w.grad.abs() if rule == "grad" else (w.detach() * w.grad).abs()
    k = tr.budgets[name].nnz
    rows, cols = torch.unravel_index(torch.topk(score.reshape(-1), k).indices, score.shape)
    want = set(zip(rows.tolist(), cols.tolist(), strict=True))
    assert summary["rule"] == rule and support_set(tr.layers[name].supports["s1"]) == want


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("shira-out") / "p"
    res = finetune(env / "pack", out, small(env, budget=8300, save_every=2), progress=False)
    return out, res


def test_shira_trains_only_a_sparse_part_sized_like_peft(env, trained):
    out, res = trained
    ad = read_pack(out).adapters["s1"]
    assert ad.method == "shira" and all(m.rank == 0 and m.values is not None for m in ad.modules.values())
    unit = sum(sum(m.shape) for m in ad.modules.values())
    r = 8300 // unit  # 4 on the tiny model: r * (out + in) < out * in in every layer, as PEFT requires
    assert all(m.nnz == r * sum(m.shape) for m in ad.modules.values())
    assert res.summary["trainable_params"] == sum(m.nnz for m in ad.modules.values()) <= 8300
    assert any(bool(m.values.abs().sum() > 0) for m in ad.modules.values())


def test_shira_merge_changes_only_the_stored_entries_and_fuse_restores_bit_for_bit(env, trained):
    out, _ = trained
    model = sparsepack.load(env / "hf")  # fuse folds into a dense base: the adapter trained on the 4-bit one
    model.load_adapter(out, adapter="s1")
    model.set_adapter("s1")
    ids = torch.arange(20).view(2, 10) + 5
    with torch.no_grad():
        unfused = model(ids).logits
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "supports") and "s1" in m.supports}
    before = {n: m.dense_base().clone() for n, m in layers.items()}
    model.fuse("s1")
    for n, m in layers.items():
        changed = (m.dense_base() != before[n]).nonzero()
        assert set(map(tuple, changed.tolist())) <= support_set(m.supports["s1"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unfused, rtol=1e-5, atol=1e-5)
    model.unfuse()
    assert all(torch.equal(m.dense_base(), before[n]) for n, m in layers.items())


def test_shira_resume_is_bit_for_bit(env, trained, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    def values(path):
        return load_file(str(path / "adapters" / "s1" / "sparse_adapter.safetensors"))

    cfg = small(env, budget=8300, save_every=2)
    run_interrupted(monkeypatch, 3, lambda: finetune(env / "pack", tmp_path / "o", cfg, progress=False))
    finetune(env / "pack", tmp_path / "o", cfg, resume=True, progress=False)
    want, got = values(trained[0]), values(tmp_path / "o")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_shira_exports_to_peft_s_own_shira_format_with_equal_logits(env, trained, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out, _ = trained
    r = CliRunner().invoke(main, ["export", str(out), "--format", "peft", "--adapter", "s1", "-o",
                                  str(tmp_path / "peft"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["peft_type"] == "SHIRA"
    r = CliRunner().invoke(main, ["export", str(out), "--format", "safetensors", "-o", str(tmp_path / "dense")])
    assert r.exit_code == 0, r.output
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ours = sparsepack.load(out, adapter="s1")
    ids = torch.arange(24).view(2, 12) + 7
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    merged = pm.merge_and_unload()
    stored = read_pack(out).adapters["s1"].modules
    for name, m in stored.items():
        w = merged.get_submodule(name).weight.detach()
        changed = set(map(tuple, (w != before[f"{name}.weight"]).nonzero().tolist()))
        rows = torch.repeat_interleave(torch.arange(m.shape[0]), torch.diff(m.row_ptr.long()))
        assert changed <= set(zip(rows.tolist(), m.col_idx.tolist(), strict=True))


def test_shira_adapter_not_in_peft_sizing_is_refused_with_the_way_out(env, tmp_path):
    out = tmp_path / "p"
    finetune(env / "pack", out, small(env, steps=1, support="magnitude"), progress=False)
    r = CliRunner().invoke(main, ["export", str(out), "--format", "peft", "--adapter", "s1", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "--budget" in r.output and "--lora-approx" in r.output, r.output
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "shira", "--rank", "4"], "--rank does not apply to --method shira"),
    (["--method", "lora", "--support", "snip"], "--support does not apply to --method lora"),
    (["--method", "shira", "--support", "fisher"], "--support 'fisher' is not one of --method shira's"),
    (["--method", "shira", "--budget", "1000", "--density", "0.01"], "--budget sets --method shira's size"),
    (["--method", "nosuch"], "unknown method 'nosuch'"),
])  # fmt: skip
def test_flags_that_make_no_sense_together_are_one_line_errors(env, tmp_path, argv, message):
    r = CliRunner().invoke(main, ["finetune", str(env / "pack"), "--data", str(env / "c.txt"), "-o",
                                  str(tmp_path / "o"), *argv])  # fmt: skip
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.ckpt").exists()


def test_budget_sizes_every_method_within_it():
    shapes = {"a": (64, 96), "b": (128, 64)}
    for name, budget in (("lora", 2000), ("rosa", 6000), ("shira", 2000)):
        m = methods.get(name)
        rank = 16 if name == "lora" else 4 if name == "rosa" else 0
        b = m.layer_budgets(shapes, rank, 0.006, budget)
        used = sum(x.nnz + x.rank * sum(shapes[n]) for n, x in b.items())
        assert 0 < used <= budget, (name, used)


@pytest.mark.parametrize("adapter_op", ["standard", "custom"])
def test_shira_exports_to_onnx_matching_pytorch(trained, tmp_path, adapter_op):
    """A sparse-only adapter goes through the existing sparse slots (and the custom op): the export's own
    validation compares onnxruntime with PyTorch, with and without the adapter, and fails the command on a mismatch."""
    out, _ = trained
    r = CliRunner().invoke(main, ["export", str(out), "--format", "onnx", "--adapter", "s1", "--adapter-op", adapter_op,
                                  "--no-kv-cache", "-o", str(tmp_path / "onnx"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    checks = json.loads(r.output)["validation"]
    assert any(k.startswith("s1:") for k in checks) and all(v["max_abs_diff"] <= v["allowed"] for v in checks.values())
