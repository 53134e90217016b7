"""merge and the deployment-side adapter API: parity of merged vs unfused, exact unfuse, mixed batches."""

import gc
import json
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sparsepack
from sparsepack.config import QuantConfig
from sparsepack.formats.adapter_layout import Adapter, AdapterModule
from sparsepack.formats.manifest import StageRecord
from sparsepack.formats.pack import read_pack
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.pipeline.data import token_windows
from sparsepack.pipeline.evaluate import perplexity
from sparsepack.pipeline.merge import QualityConfig, adapter_eval_source, merge
from tests.factories import random_adapter, rtn_pack, tiny_llama
from tests.helpers_tokenizer import tiny_tokenizer

IDS = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(0))
CORPORA = {  # each adapter's own held-out text (recorded as its finetune eval_data)
    "a": "\n".join(f"line {i}: the quick brown fox jumps over {i * 3}" for i in range(300)),
    "b": "\n".join(f"for x in range({i}): print(x * {i % 7})  # sparse plus low-rank" for i in range(300)),
}


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    m = tiny_llama()
    ads = {"a": random_adapter(m, seed=1), "b": random_adapter(m, seed=2, rank=2, density=0.02)}
    rtn_pack(m, d / "q", adapters=ads)
    for name, text in CORPORA.items():
        (d / f"{name}.txt").write_text(text)
    # the same adapters again, with the finetune records a trained pack carries (they name each adapter's data)
    from sparsepack.pipeline.finetune import write_adapter_pack
    from tests.factories import save_hf

    def record(name):
        return StageRecord("finetune", {"adapter": name, "data": "x@train", "eval_data": str(d / f"{name}.txt")})

    write_adapter_pack(read_pack(d / "q"), d / "q_a", "a", ads["a"], record("a"))
    write_adapter_pack(read_pack(d / "q_a"), d / "qr", "b", ads["b"], record("b"))
    save_hf(m, d / "hf")  # a dense-base pack: the same adapters on the fp32 model
    write_adapter_pack(read_pack(d / "hf"), d / "dense_a", "a", ads["a"], StageRecord("test", {}))
    write_adapter_pack(read_pack(d / "dense_a"), d / "dense", "b", ads["b"], StageRecord("test", {}))
    return d


def logits(model, **kw):
    with torch.no_grad():
        return model(IDS, **kw).logits


# Run in a child whose import system refuses sparsepack: the merged checkpoint must need nothing of ours.
PLAIN_LOAD = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "sparsepack":
            raise ImportError("sparsepack must not be imported here")
sys.meta_path.insert(0, Refuse())
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    out = model(torch.tensor(eval(sys.argv[2]))).logits
assert not [m for m in sys.modules if m.startswith("sparsepack")]
save_file({"logits": out.contiguous()}, sys.argv[3])
"""


def test_dense_merge_equals_unfused_and_loads_in_plain_transformers(packs, tmp_path):
    merge(packs / "q", tmp_path / "m", [("a", 1.0)], dtype="float32")
    subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "m"), repr(IDS.tolist()), str(tmp_path / "l")],
                   check=True, cwd=tmp_path)  # fmt: skip
    plain = load_file(str(tmp_path / "l"))["logits"]
    ours = sparsepack.load(packs / "q", adapter="a")
    torch.testing.assert_close(plain, logits(ours), atol=1e-4, rtol=0)
    assert (plain - logits(sparsepack.load(packs / "q"))).abs().max() > 1e-2  # the adapter is in there


def test_weighted_fusion_equals_both_adapters_scaled(packs, tmp_path):
    merge(packs / "q", tmp_path / "m", [("a", 0.5), ("b", 2.0)], dtype="float32")
    fused = sparsepack.load(tmp_path / "m")
    ours = sparsepack.load(packs / "q")
    for layer in ours.modules():
        if hasattr(layer, "lora_B"):
            for name, w in (("a", 0.5), ("b", 2.0)):
                if name in layer.lora_B:
                    layer.lora_B[name].data *= w
                if name in layer.sparse_values:
                    layer.sparse_values[name].data *= w
    ours.set_adapter(["a", "b"])
    torch.testing.assert_close(logits(fused), logits(ours), atol=1e-4, rtol=0)


def _ppl(model, source, seqlen=32, n=4):
    return perplexity(model, token_windows(tiny_tokenizer(), source, seqlen, n), progress=False).perplexity


def test_weighted_fusion_reports_perplexity_on_each_adapters_own_data(packs, tmp_path):
    q = QualityConfig(windows=4, seqlen=32)
    res = merge(packs / "qr", tmp_path / "m", [("a", 0.5), ("b", 1.0)], dtype="float32", quality=q)
    rows = {r["adapter"]: r for r in res.summary["quality"]["evals"]}
    assert sorted(rows) == ["a", "b"]
    fused = sparsepack.load(tmp_path / "m")
    for name in ("a", "b"):
        data = str(packs / f"{name}.txt")
        assert rows[name]["data"] == data and rows[name]["data_from"] == "finetune eval_data"
        # every figure is the perplexity an independent evaluation of that model on that data gives
        assert rows[name]["alone"] == pytest.approx(_ppl(sparsepack.load(packs / "qr", adapter=name), data), rel=1e-6)
        assert rows[name]["base"] == pytest.approx(_ppl(sparsepack.load(packs / "qr"), data), rel=1e-6)
        assert rows[name]["merged"] == pytest.approx(_ppl(fused, data), rel=1e-6)
        assert rows[name]["merged_vs_alone"] == pytest.approx(rows[name]["merged"] / rows[name]["alone"] - 1)
    assert rows["a"]["base"] != pytest.approx(rows["b"]["base"], rel=1e-3)  # two different eval sets


def test_adapter_eval_source_from_the_finetune_record(packs):
    manifest = read_pack(packs / "qr").manifest
    assert adapter_eval_source(manifest, "a") == (str(packs / "a.txt"), "finetune eval_data")
    manifest.history.append(StageRecord("finetune", {"adapter": "c", "data": "stdlib:pydoc@train"}))
    manifest.history.append(StageRecord("finetune", {"adapter": "d", "data": "corpus.txt"}))
    assert adapter_eval_source(manifest, "c") == ("stdlib:pydoc@eval", "finetune data, @eval split")
    assert adapter_eval_source(manifest, "d") == ("corpus.txt@eval", "finetune data, @eval split")
    assert adapter_eval_source(manifest, "zzz") is None


def test_requantize_yields_a_valid_pack_and_reports_cost_vs_unfused_and_rtn(packs, tmp_path):
    corpus = packs / "a.txt"
    cfg = QuantConfig(bits=4, group_size=32, calib=str(corpus), nsamples=8, seqlen=32)
    q = QualityConfig(windows=4, seqlen=32, default=str(corpus))
    res = merge(packs / "q", tmp_path / "rq", [("a", 1.0)], mode="requantize", qcfg=cfg, quality=q)
    pack = read_pack(tmp_path / "rq")
    assert pack.quant["bits"] == 4 and res.summary["compress"]["layers"] == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rq"]  # temporary dense merge and RTN pack removed
    # the report's naive peer is exactly an RTN requantization of the same merged weights
    merge(packs / "q", tmp_path / "rtn", [("a", 1.0)], mode="requantize", qcfg=QuantConfig(
        bits=4, group_size=32, method="rtn"))  # fmt: skip
    (row,) = res.summary["quality"]["evals"]
    assert row["data_from"] == "given for every adapter (no finetune record)"
    assert row["alone"] == pytest.approx(_ppl(sparsepack.load(packs / "q", adapter="a"), str(corpus)), rel=1e-6)
    assert row["merged"] == pytest.approx(_ppl(sparsepack.load(tmp_path / "rq"), str(corpus)), rel=1e-6)
    assert row["rtn"] == pytest.approx(_ppl(sparsepack.load(tmp_path / "rtn"), str(corpus)), rel=1e-6)
    # GPTQ's error compensation keeps the re-quantized model closer to the unfused one than naive RTN does
    ids = token_windows(tiny_tokenizer(), str(corpus), 32, 4)
    with torch.no_grad():
        ref = sparsepack.load(packs / "q", adapter="a")(ids).logits
        err = {k: float((sparsepack.load(tmp_path / k)(ids).logits - ref).norm() / ref.norm()) for k in ("rq", "rtn")}
    assert err["rq"] < err["rtn"], err


def test_requantize_reuses_the_packs_recorded_gptq_settings(packs, tmp_path):
    from sparsepack.pipeline.merge import requantize_config

    cfg = requantize_config(packs / "q", nsamples=4)
    assert (cfg.bits, cfg.group_size, cfg.method, cfg.nsamples) == (4, 32, "gptq", 4)
    with pytest.raises(ValueError, match="not quantized"):
        requantize_config(packs / "hf")


def test_mixed_batch_equals_each_row_alone(packs):
    model = sparsepack.load(packs / "q")
    mixed = logits(model, adapter_names=["a", None, "b"])
    for i, name in enumerate(["a", None, "b"]):
        model.set_adapter(name)
        torch.testing.assert_close(mixed[i], logits(model)[i], atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="unknown adapter"):
        logits(model, adapter_names=["zzz", None, None])
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 3"):
        logits(model, adapter_names=["a", "b"])


@pytest.mark.slow  # ~2 s alone, ~9 s on a loaded machine; the forward test above covers the default suite
def test_mixed_batch_generate_equals_each_row_alone(packs):
    model = sparsepack.load(packs / "q")
    prompts = IDS[:, :5]
    rows = ["b", "a", None]
    mixed = model.generate(prompts, adapter_names=rows, max_new_tokens=5, do_sample=False)
    for i, name in enumerate(rows):
        model.set_adapter(name)
        alone = model.generate(prompts[i : i + 1], max_new_tokens=5, do_sample=False)
        assert torch.equal(mixed[i : i + 1], alone), (name, mixed[i], alone)
    assert not torch.equal(mixed[0], mixed[1][: mixed.shape[1]]) or rows[0] == rows[1]


def test_fuse_unfuse_restores_the_base_bit_for_bit(packs):
    model = sparsepack.load(packs / "dense")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_adapter("a")
    unfused = logits(model)
    model.fuse("a")
    assert model.active_adapters == []
    torch.testing.assert_close(logits(model), unfused, atol=1e-5, rtol=0)
    model.fuse("b")  # switching unfuses a first, and b is written into the buffers a's fusion left
    fused_b = logits(model)
    model.set_adapter("b")  # activating an adapter unfuses too: never fused and active at once
    assert not any(layer.fused for layer in model.modules() if isinstance(layer, SparseLowRankLinear))
    torch.testing.assert_close(logits(model), fused_b, atol=1e-5, rtol=0)
    model.set_adapter(None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    layers = [m for m in model.modules() if isinstance(m, SparseLowRankLinear)]
    assert all(m._spare is not None for m in layers)
    model.unfuse(free=True)
    assert all(m._spare is None for m in layers)


def test_fuse_sparse_only_adapter_scatters_and_restores_exactly(packs):
    model = sparsepack.load(packs / "dense")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = logits(model)
    sparse_only = Adapter({n: AdapterModule(shape=m.shape, values=m.values * 5, row_ptr=m.row_ptr, col_idx=m.col_idx)
                           for n, m in random_adapter(tiny_llama(), seed=3, density=0.1).modules.items()})  # fmt: skip
    from sparsepack.layers.inject import attach_adapter

    attach_adapter(model, "s", sparse_only)
    model.set_adapter("s")
    unfused = logits(model)
    assert (unfused - ref).abs().max() > 1e-2
    model.fuse("s")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer._unfuse[0] == "sparse"  # only the nnz originals are kept, not a copy of the weight
    torch.testing.assert_close(logits(model), unfused, atol=1e-5, rtol=0)
    model.unfuse()
    assert all(torch.equal(base[k], v) for k, v in model.state_dict().items() if k in base)
    with pytest.raises(TypeError, match="dense base"):
        sparsepack.load(packs / "q").fuse("a")


def test_load_switch_and_delete_adapter_releases_tensors(packs):
    model = sparsepack.load(packs / "q")
    model.delete_adapter("b")
    assert model.adapters == ["a"]
    name = model.load_adapter(packs / "q", name="b2", adapter="b")
    assert name == "b2" and model.adapters == ["a", "b2"]
    model.set_adapter("b2")
    reference = sparsepack.load(packs / "q", adapter="b")
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=0)
    logits(model, adapter_names=["b2", "a", None])  # the mixed path and the transposed-support cache used too
    model.set_adapter("b2")
    trained = [p for n, p in model.named_parameters() if n.endswith(".b2")]
    for p in trained:
        p.requires_grad_(True)
    model(IDS).logits.sum().backward()  # gradients (and the transposed-support cache) exist too
    assert all(p.grad is not None for p in trained)
    del trained, p
    refs = []
    for layer in model.modules():
        if isinstance(layer, SparseLowRankLinear) and "b2" in layer.adapter_names:
            s = layer.supports["b2"]
            refs += [weakref.ref(t) for t in (layer.lora_A["b2"], layer.lora_B["b2"], layer.sparse_values["b2"],
                                              s.row_ptr, s.col_idx, s.row_idx)]  # fmt: skip
    del layer, s
    assert len(refs) == 6 * 6  # q, v, down in both blocks
    with pytest.raises(ValueError, match="already loaded"):
        model.load_adapter(packs / "q", name="b2", adapter="b")
    model.delete_adapter("b2")
    gc.collect()
    assert [r() for r in refs if r() is not None] == []  # no live references left
    assert model.active_adapters == [] and model.adapters == ["a"]
    with pytest.raises(KeyError, match="unknown adapter"):
        model.delete_adapter("b2")


def test_cli_merge_unknown_adapter_and_json_report(packs, tmp_path):
    from click.testing import CliRunner

    from sparsepack.cli import main

    r = CliRunner().invoke(main, ["merge", str(packs / "q"), "-o", str(tmp_path / "m"), "--adapter", "nope"])
    assert r.exit_code == 1 and "unknown adapter" in r.output and not (tmp_path / "m").exists()
    ok = CliRunner().invoke(main, ["merge", str(packs / "qr"), "-o", str(tmp_path / "m"), "--adapter", "a", "--json",
                                   "--eval-windows", "2", "--eval-seqlen", "16"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    (row,) = json.loads(ok.output)["quality"]["evals"]
    assert row["adapter"] == "a" and row["data"] == str(packs / "a.txt") and row["merged"] > 1


def test_adapter_layer_cache_follows_wrapping_and_unwrapping(packs):
    from sparsepack.layers.inject import adapter_layers, attach_adapter

    model = sparsepack.load(packs / "q", adapter="a")
    assert len(adapter_layers(model)) == 6
    bare = logits(sparsepack.load(packs / "q"))
    model.delete_adapter("a")
    model.delete_adapter("b")  # every layer unwrapped: back to the plain base modules
    assert adapter_layers(model) == {} and model.adapters == []
    torch.testing.assert_close(logits(model), bare, atol=0, rtol=0)
    attach_adapter(model, "s", random_adapter(tiny_llama(), seed=4, target="o_proj"))  # wraps new layers
    model.set_adapter("s")
    assert sorted(adapter_layers(model)) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert (logits(model) - bare).abs().max() > 1e-3


@pytest.mark.parametrize("base", ["dense", "q"])
def test_unfused_inference_equals_the_dense_reference(packs, base):
    """The no-autograd path (addmm and the compiled CSR product, in place) against W + s B A + S computed
    densely; on the GPTQ base the 5-token call takes the folding kernel and the one-token calls the split path."""
    model = sparsepack.load(packs / base, adapter=["a", "b"])
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    w = layer.dense_base() + layer.delta_weight("a") + layer.delta_weight("b")
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, x @ w.t(), atol=1e-5, rtol=0)
    xg = x.clone().requires_grad_(True)  # the autograd kernel path gives the same numbers
    torch.testing.assert_close(layer(xg).detach(), fast, atol=1e-5, rtol=0)
    decode = torch.cat([layer(x[:, i : i + 1]) for i in range(5)], 1).detach()  # one token at a time
    torch.testing.assert_close(decode, fast, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_unfused_inference_in_other_dtypes_equals_the_dense_reference(dtype):
    """Layers cast away from fp32 (``model.double()``, ``model.bfloat16()``) take the generic no-autograd path
    (torch's low-rank GEMMs and CSR product): prefill- and decode-sized calls equal the dense product."""
    from sparsepack.kernels import CSRSupport

    g = torch.Generator().manual_seed(5)
    base = torch.nn.Linear(24, 40, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(40, 24, generator=g) / 5)
        base.bias.copy_(torch.randn(40, generator=g))
    layer = SparseLowRankLinear(base, 24, 40)
    layer.add_adapter("x", AdapterModule(shape=(40, 24), alpha=6.0, A=torch.randn(3, 24, generator=g),
                                         B=torch.randn(40, 3, generator=g)))  # fmt: skip
    flat = torch.randperm(40 * 24, generator=g)[:50]
    layer.set_support("x", CSRSupport.from_coo(flat // 24, flat % 24, (40, 24)), torch.randn(50, generator=g),
                      trainable=False)  # fmt: skip
    layer.set_active(["x"])
    layer.to(dtype)
    w = layer.base.weight.double() + layer.delta_weight("x", torch.float64)  # from the cast parameters
    rel_tol = {torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]  # bf16: a few roundings of 2^-9 each
    for tokens in (1, 9):
        x = torch.randn(2, tokens, 24, generator=g).to(dtype)
        with torch.no_grad():
            y = layer(x)
        assert y.dtype == dtype
        ref = F.linear(x.double(), w, layer.base.bias.double())
        assert (y.double() - ref).norm() / ref.norm() <= rel_tol


@pytest.mark.parametrize("parts", ["both", "lowrank", "sparse"])
def test_decode_kernel_equals_the_torch_path_and_follows_updates(parts):
    """Calls of at most 4 tokens (fp32, CPU, no autograd) add the correction in one compiled call, longer ones
    reuse the same cached arrays: equal to the dense reference for either part alone or both; in-place value
    updates show through the cached views; a
    replaced adapter is read afresh; deleting the adapter leaves no reference to its tensors."""
    from sparsepack.layers import adapter_linear

    g = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(24, 40)
    layer = SparseLowRankLinear(base, 24, 40)
    module = AdapterModule(shape=(40, 24), alpha=6.0, A=torch.randn(3, 24, generator=g) if parts != "sparse" else None,
                           B=torch.randn(40, 3, generator=g) if parts != "sparse" else None)  # fmt: skip
    layer.add_adapter("x", module)
    if parts != "lowrank":
        flat = torch.randperm(40 * 24, generator=g)[:50]
        from sparsepack.kernels import CSRSupport

        layer.set_support("x", CSRSupport.from_coo(flat // 24, flat % 24, (40, 24)), torch.randn(50, generator=g),
                          trainable=False)  # fmt: skip
    layer.set_active(["x"])
    calls = {"n": 0}
    kernel = adapter_linear._numpy_parts

    def counting(*a):
        calls["n"] += 1
        return kernel(*a)

    adapter_linear._numpy_parts = counting
    try:
        for tokens in (1, 3, 4, 9):  # 9: the many-token path (addmm + in-place CSR product on the cached arrays)
            x = torch.randn(1, tokens, 24, generator=g)
            with torch.no_grad():
                y = layer(x)
            w = base.weight + layer.delta_weight("x")
            torch.testing.assert_close(y, F.linear(x, w, base.bias), atol=1e-5, rtol=1e-5)
        assert calls["n"] == 4
        if parts != "lowrank":
            with torch.no_grad():
                layer.sparse_values["x"].mul_(2)  # in place: the cached views see it
                y = layer(x)
            torch.testing.assert_close(y, F.linear(x, base.weight + layer.delta_weight("x"), base.bias), atol=1e-5,
                                       rtol=1e-5)  # fmt: skip
        refs = [weakref.ref(t) for d in (layer.lora_A, layer.lora_B, layer.sparse_values) for t in d.values()]
        layer.delete_adapter("x")
        gc.collect()
        assert [r() for r in refs if r() is not None] == []
    finally:
        adapter_linear._numpy_parts = kernel
