"""sparsepack.load: packs, foreign GPTQ checkpoints and plain HF models give the expected logits."""

import pytest
import torch

import sparsepack
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.layers.quantized_linear import QuantizedLinear
from tests.factories import random_adapter, rtn_pack, save_hf, tiny_llama

# Tolerances by kind (fp32 on CPU): the loaded pack computes exactly the reference's dense matmuls up to
# summation order inside the dequant-matmul kernels.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_rtn_pack_logits_equal_the_dequantized_dense_model(tmp_path, model, ids, bits, act_order):
    path, ref = rtn_pack(model, tmp_path / "p", bits=bits, group_size=32, act_order=act_order)
    lm = sparsepack.load(path)
    assert isinstance(lm.model.layers[1].mlp.down_proj, QuantizedLinear)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # still tied
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, ref(ids).logits, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_checkpoint_without_manifest_loads(tmp_path, model, ids, fmt):
    path, ref = rtn_pack(model, tmp_path / "p", manifest=False, checkpoint_format=fmt)
    assert not (path / "sparsepack.json").exists()
    lm = sparsepack.load(path)
    assert lm.sparsepack.pack.kind == "gptq"
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, ref(ids).logits, atol=LOGITS_ATOL, rtol=0)


def test_plain_hf_model_loads_like_transformers(tmp_path, model, ids):
    from transformers import AutoModelForCausalLM

    path = save_hf(model, tmp_path / "hf")
    lm = sparsepack.load(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


def test_adapter_activation_matches_dense_delta(tmp_path, model, ids):
    ad = random_adapter(model)
    path, ref = rtn_pack(model, tmp_path / "p", adapters={"a": ad})
    lm = sparsepack.load(path, adapter="a")
    layer = lm.model.layers[0].self_attn.q_proj
    assert isinstance(layer, SparseLowRankLinear) and layer.active == ["a"]
    for name, part in ad.modules.items():
        dense = torch.zeros(part.shape)
        rows = torch.repeat_interleave(
            torch.arange(part.shape[0]), (part.row_ptr[1:] - part.row_ptr[:-1]).long()
        )
        dense[rows, part.col_idx.long()] = part.values
        w = ref.get_submodule(name).weight
        w.data = w.data + part.scaling * part.B @ part.A + dense
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, ref(ids).logits, atol=LOGITS_ATOL, rtol=0)
        from sparsepack.layers.inject import set_active_adapters

        set_active_adapters(lm, None)
        base = lm(ids).logits
    assert (base - ref(ids).logits).abs().max() > 1e-3  # the adapter really changed the outputs
    with pytest.raises(KeyError, match="unknown adapter"):
        sparsepack.load(path, adapter="nope")


def test_generate_works(tmp_path, model):
    path, ref = rtn_pack(model, tmp_path / "p")
    lm = sparsepack.load(path)
    prompt = torch.tensor([[5, 6, 7, 8]])
    out = lm.generate(prompt, max_new_tokens=6, do_sample=False)
    expected = ref.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)


def test_missing_tensor_is_named(tmp_path, model):
    from safetensors.torch import load_file, save_file

    from sparsepack.formats.errors import ShapeError

    path, _ = rtn_pack(model, tmp_path / "p", manifest=False)
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(ShapeError, match="missing.*model.norm.weight"):
        sparsepack.load(path)
