"""merge and the deployment-side adapter API: parity of merged vs unfused, exact unfuse, mixed batches."""

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparsepack
from sparsepack.config import QuantConfig
from sparsepack.formats.pack import read_pack
from sparsepack.pipeline.merge import merge
from tests.factories import random_adapter, rtn_pack, tiny_llama

IDS = torch.randint(0, 320, (3, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    m = tiny_llama()
    ads = {"a": random_adapter(m, seed=1), "b": random_adapter(m, seed=2, rank=2, density=0.02)}
    q, _ = rtn_pack(m, d / "q", adapters=ads)
    # a dense-base pack: the same adapters on the fp32 model (a plain HF dir + adapters via finetune's writer)
    from sparsepack.formats.manifest import StageRecord
    from sparsepack.pipeline.finetune import write_adapter_pack
    from tests.factories import save_hf

    save_hf(m, d / "hf")
    src = read_pack(d / "hf")
    write_adapter_pack(src, d / "dense_a", "a", ads["a"], StageRecord("test", {}))
    write_adapter_pack(read_pack(d / "dense_a"), d / "dense", "b", ads["b"], StageRecord("test", {}))
    return d


def logits(model, **kw):
    with torch.no_grad():
        return model(IDS, **kw).logits


def test_dense_merge_equals_unfused_and_loads_in_plain_transformers(packs, tmp_path):
    merge(packs / "q", tmp_path / "m", [("a", 1.0)], dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ours = sparsepack.load(packs / "q", adapter="a")
    torch.testing.assert_close(logits(plain), logits(ours), atol=1e-4, rtol=0)


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


def test_requantize_yields_a_valid_pack_close_to_unfused(packs, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"line {i}: the quick brown fox jumps over {i * 3}" for i in range(300)))
    cfg = QuantConfig(bits=4, group_size=32, calib=str(corpus), nsamples=8, seqlen=32)
    res = merge(packs / "q", tmp_path / "rq", [("a", 1.0)], mode="requantize", qcfg=cfg)
    pack = read_pack(tmp_path / "rq")
    assert pack.quant["bits"] == 4 and res.summary["compress"]["layers"] == 14
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "rq"]  # temporary dense merge removed
    # GPTQ's error compensation keeps the re-quantized model closer to the unfused one than naive RTN does
    merge(packs / "q", tmp_path / "rtn", [("a", 1.0)], mode="requantize", qcfg=QuantConfig(
        bits=4, group_size=32, method="rtn"))  # fmt: skip
    from sparsepack.pipeline.data import token_windows
    from tests.helpers_tokenizer import tiny_tokenizer

    ids = token_windows(tiny_tokenizer(), str(corpus), 32, 4)
    with torch.no_grad():
        ref = sparsepack.load(packs / "q", adapter="a")(ids).logits
        err = {k: float((sparsepack.load(tmp_path / k)(ids).logits - ref).norm() / ref.norm()) for k in ("rq", "rtn")}
    assert err["rq"] < err["rtn"], err


def test_mixed_batch_equals_each_row_alone(packs):
    model = sparsepack.load(packs / "q")
    mixed = logits(model, adapter_names=["a", None, "b"])
    for i, name in enumerate(["a", None, "b"]):
        model.set_adapter(name)
        torch.testing.assert_close(mixed[i], logits(model)[i], atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="unknown adapter"):
        logits(model, adapter_names=["zzz", None, None])


def test_fuse_unfuse_restores_the_base_bit_for_bit(packs):
    model = sparsepack.load(packs / "dense")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_adapter("a")
    unfused = logits(model)
    model.fuse("a")
    assert model.active_adapters == []
    torch.testing.assert_close(logits(model), unfused, atol=1e-5, rtol=0)
    model.fuse("b")  # switching unfuses a first
    model.unfuse()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_switch_and_delete_adapter_releases_tensors(packs):
    model = sparsepack.load(packs / "q")
    model.delete_adapter("b")
    assert model.adapters == ["a"]
    name = model.load_adapter(packs / "q", name="b2", adapter="b")
    assert name == "b2" and model.adapters == ["a", "b2"]
    model.set_adapter("b2")
    reference = sparsepack.load(packs / "q", adapter="b")
    torch.testing.assert_close(logits(model), logits(reference), atol=1e-6, rtol=0)
    refs = [weakref.ref(p) for layer in model.modules() if hasattr(layer, "lora_A") and "b2" in layer.lora_A
            for p in (layer.lora_A["b2"], layer.lora_B["b2"])]  # fmt: skip
    assert refs
    model.delete_adapter("b2")
    gc.collect()
    assert all(r() is None for r in refs)  # no live references left
    assert model.active_adapters == []


def test_cli_merge_unknown_adapter(packs, tmp_path):
    from click.testing import CliRunner

    from sparsepack.cli import main

    r = CliRunner().invoke(main, ["merge", str(packs / "q"), "-o", str(tmp_path / "m"), "--adapter", "nope"])
    assert r.exit_code == 1 and "unknown adapter" in r.output and not (tmp_path / "m").exists()
    ok = CliRunner().invoke(main, ["merge", str(packs / "q"), "-o", str(tmp_path / "m"), "--adapter", "a", "--json"])
    assert ok.exit_code == 0, ok.output
