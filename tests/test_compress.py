"""compress: GPTQ through the block-by-block driver, on a tiny Llama with real-ish text."""

import json

import pytest
import torch

import sparsepack
from sparsepack.config import QuantConfig
from sparsepack.formats.errors import OutputExistsError
from sparsepack.formats.pack import read_pack
from sparsepack.pipeline import compress as compress_mod
from sparsepack.pipeline.compress import compress, relative_output_error
from tests.factories import save_hf, tiny_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    save_hf(tiny_llama(), d / "hf")
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines))
    return d


def cfg(hf_dir, **kw):
    base = dict(bits=4, group_size=32, calib=str(hf_dir / "corpus.txt"), nsamples=8, seqlen=32, batch_size=4)
    base.update(kw)
    return QuantConfig(**base)


def test_compressed_pack_loads_and_stays_close_to_the_fp_model(hf_dir, tmp_path):
    res = compress(hf_dir / "hf", tmp_path / "p", cfg(hf_dir), progress=False, report=tmp_path / "r.md")
    assert len(res.layers) == 14 and all(r.rel_error is not None and 0 < r.rel_error < 0.2 for r in res.layers)
    pack = read_pack(tmp_path / "p")
    assert pack.quant["bits"] == 4 and len(pack.quantized_modules) == 14
    assert set(pack.manifest.quantization["layers"]) == {r.name for r in res.layers}
    assert pack.manifest.history[0].stage == "compress" and pack.manifest.history[0].args["bits"] == 4
    assert "lm_head.weight" not in pack.tensors  # tied: stored once
    assert (tmp_path / "r.md").read_text().count("| model.layers.") == 14
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    fp = tiny_llama()
    with torch.no_grad():
        a, b = sparsepack.load(tmp_path / "p")(ids).logits, fp(ids).logits
    assert (a - b).norm() / b.norm() < 0.2


def test_clip_search_is_on_by_default_and_lowers_the_mean_layer_error(hf_dir, tmp_path):
    clipped = compress(hf_dir / "hf", tmp_path / "c", cfg(hf_dir, bits=3), progress=False)
    plain = compress(hf_dir / "hf", tmp_path / "p", cfg(hf_dir, bits=3, clip_search=0.0), progress=False)
    assert read_pack(tmp_path / "c").manifest.history[0].args["clip_search"] == 0.2
    mean = [sum(r.rel_error for r in res.layers) / len(res.layers) for res in (clipped, plain)]
    assert mean[0] < mean[1], mean
    with pytest.raises(ValueError, match="--clip-search"):
        QuantConfig(clip_search=1.0)
    assert QuantConfig(bits=8).clip_search == 0.0 and QuantConfig(bits=2).clip_search == 0.2


def test_relative_output_error_from_the_hessian_matches_the_direct_one():
    """The manifest's per-layer error (from H, fp32) equals ||X dW^T|| / ||X W^T|| on the inputs themselves."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 96, generator=g) * torch.rand(96, generator=g)
    W = torch.randn(40, 96, generator=g)
    W_q = W + 0.05 * torch.randn(40, 96, generator=g)
    H = 2 / 500 * X.t() @ X
    direct = compress_mod.gptq.layer_output_error(W, W_q, X)
    assert relative_output_error(W, W_q, H) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replaying_block_children_changes_nothing(hf_dir, tmp_path, monkeypatch, dtype):
    """The replay cache (finished children, and o_proj/down_proj tails) only skips recomputation: the pack
    is bit for bit the one written when every pass recomputes everything."""
    import safetensors.torch

    from sparsepack.pipeline import blocks

    used = {"tails": 0, "outputs": 0}
    real_enter = blocks._replaying.__enter__

    def counting_enter(self):
        if self.cache is not None:
            used["tails"] += len(self.cache.tail_inputs)
            used["outputs"] += len(self.cache.outputs)
        return real_enter(self)

    monkeypatch.setattr(blocks._replaying, "__enter__", counting_enter)
    compress(hf_dir / "hf", tmp_path / "on", cfg(hf_dir, dtype=dtype), progress=False)
    assert used["tails"] > 0 and used["outputs"] > 0
    monkeypatch.setattr(compress_mod, "REPLAY_MAX_RATIO", 0.0)
    monkeypatch.setattr(compress_mod, "REPLAY_TAIL_RATIO", 0.0)
    used.update(tails=0, outputs=0)
    compress(hf_dir / "hf", tmp_path / "off", cfg(hf_dir, dtype=dtype), progress=False)
    assert used == {"tails": 0, "outputs": 0}

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(safetensors.torch.load_file(f))
        return out

    on, off = tensors(tmp_path / "on"), tensors(tmp_path / "off")
    assert on.keys() == off.keys()
    assert all(torch.equal(on[k], off[k]) for k in on), [k for k in on if not torch.equal(on[k], off[k])]


def test_a_bf16_block_quantizes_the_source_fp32_weights(hf_dir, tmp_path):
    """Calibration forwards in bf16 must not round the weights that get quantized: at 8 bits bf16's rounding is
    a tenth of a grid step. RTN reads no activations, so its codes and scales are the same either way."""
    import safetensors.torch

    got = {}
    for dtype in ("float32", "bfloat16"):
        compress(hf_dir / "hf", tmp_path / dtype, cfg(hf_dir, dtype=dtype, method="rtn", bits=8), progress=False)
        got[dtype] = safetensors.torch.load_file(next((tmp_path / dtype).glob("*.safetensors")))
    quantized = [k for k in got["float32"] if k.endswith((".qweight", ".qzeros", ".scales"))]
    assert len(quantized) == 3 * 14
    assert all(torch.equal(got["float32"][k], got["bfloat16"][k]) for k in quantized)


def test_gptq_beats_rtn_on_the_calibration_inputs(hf_dir, tmp_path):
    """Per quantization call (one per group of layers reading one input: q/k/v, o, gate/up, down), GPTQ's output
    error on the calibration set is below RTN's on the same inputs."""
    c = cfg(hf_dir)
    captured = {}
    real = compress_mod._quantize_weight

    def spy(weight, H, inv, qcfg):
        params = real(weight, H, inv, qcfg)
        rtn = compress_mod.gptq.rtn_quantize_params(weight, qcfg.bits, qcfg.group_size, qcfg.sym)
        captured[len(captured)] = (
            relative_output_error(weight.float(), compress_mod.gptq.dequantize_params(params), H),
            relative_output_error(weight.float(), compress_mod.gptq.dequantize_params(rtn), H),
        )
        return params

    compress_mod._quantize_weight = spy
    try:
        compress(hf_dir / "hf", tmp_path / "p", c, progress=False)
    finally:
        compress_mod._quantize_weight = real
    assert len(captured) == 8  # 2 blocks x 4 groups (14 layers)
    assert all(g < r for g, r in captured.values()), captured


@pytest.mark.parametrize("opts", [dict(act_order=True), dict(true_sequential=False), dict(bits=3, sym=False),
                                  dict(method="rtn"), dict(bits=8, group_size=-1)])
def test_variants_produce_valid_packs(hf_dir, tmp_path, opts):
    compress(hf_dir / "hf", tmp_path / "p", cfg(hf_dir, **opts), progress=False)
    pack = read_pack(tmp_path / "p")
    model = sparsepack.load(tmp_path / "p")
    q = model.model.layers[0].self_attn.q_proj
    assert q.bits == opts.get("bits", 4)
    if opts.get("act_order"):
        assert pack.quant["desc_act"] and bool((q.g_idx[1:] < q.g_idx[:-1]).any())


def test_bad_group_size_fails_before_any_work(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(compress_mod, "capture_block_inputs", lambda *a, **k: pytest.fail("work was started"))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: in_features=64 .* group size 48; "
                                         r"allowed group sizes for this layer: \[32, 64, -1\]"):
        compress(hf_dir / "hf", tmp_path / "p", cfg(hf_dir, group_size=48), progress=False)
    assert not (tmp_path / "p").exists()


def test_crash_mid_way_leaves_nothing_and_keeps_an_existing_pack(hf_dir, tmp_path, monkeypatch):
    out = tmp_path / "p"
    compress(hf_dir / "hf", out, cfg(hf_dir, method="rtn"), progress=False)
    before = (out / "sparsepack.json").read_text()
    calls = {"n": 0}
    real = compress_mod._quantize_weight

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # second block, mid-way (4 group calls per block)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(compress_mod, "_quantize_weight", flaky)
    with pytest.raises(KeyboardInterrupt):
        compress(hf_dir / "hf", out, cfg(hf_dir), overwrite=True, progress=False)
    assert (out / "sparsepack.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    read_pack(out)
    with pytest.raises(OutputExistsError):
        compress(hf_dir / "hf", out, cfg(hf_dir), progress=False)


def test_refuses_an_already_quantized_model(hf_dir, tmp_path):
    compress(hf_dir / "hf", tmp_path / "p", cfg(hf_dir, method="rtn"), progress=False)
    with pytest.raises(ValueError, match="already GPTQ-quantized"):
        compress(tmp_path / "p", tmp_path / "q", cfg(hf_dir), progress=False)


def test_cli_compress_json(hf_dir, tmp_path):
    from click.testing import CliRunner

    from sparsepack.cli import main

    r = CliRunner().invoke(main, ["compress", str(hf_dir / "hf"), "-o", str(tmp_path / "p"), "--calib",
                                  str(hf_dir / "corpus.txt"), "--nsamples", "4", "--seqlen", "32", "--group-size",
                                  "32", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{"):])
    assert summary["layers"] == 14 and summary["calib_windows"] == 4
    bad = CliRunner().invoke(main, ["compress", str(hf_dir / "hf"), "-o", str(tmp_path / "q"), "--group-size", "48"])
    assert bad.exit_code == 1 and "allowed group sizes" in bad.output
