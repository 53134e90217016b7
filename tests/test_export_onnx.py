"""ONNX export: MatMulNBits carries GPTQ exactly; onnxruntime == PyTorch (no cache, KV cache, merged adapter)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from sparsepack.exporters import validate as V  # noqa: E402
from sparsepack.exporters.matmulnbits import (  # noqa: E402
    UnsupportedLayerError,
    check_layer,
    dequantize_nbits,
    rewrite_linears,
    to_nbits,
)
from sparsepack.exporters.onnx import UnknownAdapterError, export_onnx  # noqa: E402
from sparsepack.formats.gptq_layout import GPTQTensors, rtn_quantize  # noqa: E402
from sparsepack.layers.quantized_linear import QuantizedLinear  # noqa: E402
from sparsepack.runtime.onnx_runtime import OnnxModel  # noqa: E402
from tests.factories import random_adapter, rtn_pack, tiny_llama  # noqa: E402


def _qlinear(bits: int, act_order: bool, K: int = 64, N: int = 48, group: int = 32) -> QuantizedLinear:
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(N, K, generator=gen)
    q, z, s, g = rtn_quantize(w, bits, group)
    if act_order:
        g = g[torch.randperm(K, generator=gen)]
    return QuantizedLinear.from_tensors(GPTQTensors.from_int(q, z, s, g, bits), group)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_matmulnbits_matches_gptq(bits, act_order):
    layer = _qlinear(bits, act_order)
    w = to_nbits(layer)
    ref = layer.dequantized_weight().t().numpy()  # (K, N)
    assert np.array_equal(dequantize_nbits(w), ref)  # repack is lossless
    # one MatMul tagged like torch.onnx tags it, rewritten, run in onnxruntime
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=str(["", "lin"]))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 48])],
        [numpy_helper.from_array(ref, "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert rewrite_linears(model, {"lin": w}) == ["lin"]
    assert [n.op_type for n in model.graph.node] == (["Gather"] if act_order else []) + ["MatMulNBits"]
    assert "w" not in {t.name for t in model.graph.initializer}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    expect = x @ ref
    assert np.abs(y - expect).max() <= 1e-5 * np.abs(expect).max()


def test_unsupported_layers_are_named():
    with pytest.raises(UnsupportedLayerError, match="3-bit"):
        check_layer("model.layers.0.mlp.up_proj", 64, 3, 32)
    with pytest.raises(UnsupportedLayerError, match="power-of-two"):
        check_layer("model.layers.0.mlp.up_proj", 96, 4, 48)


def test_validation_error_names_worst_output():
    ref = np.zeros((2, 3), np.float32)
    checks = [V.compare("logits", "logits", ref, ref + 1e-6),
              V.compare("decode_logits[1]", "decode_logits", ref, ref + 1)]  # fmt: skip
    with pytest.raises(V.ExportValidationError, match=r"decode_logits\[1\]") as e:
        V.raise_worst(checks)
    assert e.value.max_abs_diff == pytest.approx(1.0)


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    model = tiny_llama()
    adapter = random_adapter(model)
    out = {}
    for bits, act in ((4, True), (8, False)):
        out[bits] = rtn_pack(model, root / f"w{bits}", bits=bits, act_order=act, adapters={"a": adapter})[0]
    return root, out


def test_no_cache_graph_matches_pytorch_4bit_act_order(packs):
    root, p = packs
    s = export_onnx(p[4], root / "nocache", kv_cache=False)
    assert s["matmulnbits_layers"] == 14 and s["validation"]["logits"]["max_abs_diff"] < 1e-5
    assert s["tied_embedding_shared"]  # one [hidden, vocab] table serves the embedding and lm_head
    meta = json.loads((root / "nocache" / "sparsepack_onnx.json").read_text())
    assert meta["kv_cache"] is False and (root / "nocache" / "model.onnx.data").is_file()
    assert (root / "nocache" / "tokenizer.json").is_file()


@pytest.fixture(scope="module")
def kv_unfused(packs):
    root, p = packs
    return export_onnx(p[4], root / "kv", adapters=["a"]), root / "kv"


def test_kv_cache_decode_matches_generate_and_runtime(packs, kv_unfused):
    import sparsepack
    from sparsepack.formats.tokenizer import load_tokenizer

    root, p = packs
    s, out = kv_unfused
    for tag in ("", "a:"):  # the bare graph and the swappable adapter: greedy tokens == model.generate
        assert s["validation"][f"{tag}tokens"]["max_abs_diff"] == 0
    # the runtime wrapper: text generation equals PyTorch greedy generation, with and without the adapter
    om = OnnxModel(out)
    tok = load_tokenizer(p[4])
    prompt = "def token_windows"
    ids = tok(prompt, return_tensors="pt").input_ids
    for adapter in (None, "a"):
        model = sparsepack.load(p[4], adapter=adapter)
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=1)
        om.set_adapter(adapter)
        assert om.generate(prompt, max_new_tokens=6, stop_at_eos=False) == tok.decode(ref[0, ids.shape[1] :])


def test_adapter_switching_in_one_session(packs, kv_unfused):
    import sparsepack

    root, p = packs
    om = OnnxModel(kv_unfused[1])
    assert om.adapters == ["a"] and (kv_unfused[1] / "adapters" / "a.onnx_adapter").is_file()
    ids = np.array([[5, 9, 40, 7, 11]], dtype=np.int64)
    ref = {a: sparsepack.load(p[4], adapter=a)(torch.from_numpy(ids)).logits.detach().numpy() for a in (None, "a")}
    assert np.abs(ref["a"] - ref[None]).max() > 1e-3  # the adapter matters
    for a in (None, "a", None, "a"):
        om.set_adapter(a)
        assert np.abs(om.logits(ids) - ref[a]).max() < 1e-5
    with pytest.raises(KeyError, match="nope"):
        om.set_adapter("nope")


def test_onnx_adapter_round_trip(packs, kv_unfused):
    import sparsepack
    from sparsepack.exporters.onnx import adapter_slots
    from sparsepack.exporters.onnx_adapters import adapter_tensors

    root, p = packs
    model = sparsepack.load(p[4])
    expect = adapter_tensors(model, "a", adapter_slots(model, ("a",)))
    fmt = ort.AdapterFormat.read_adapter(str(kv_unfused[1] / "adapters" / "a.onnx_adapter"))
    got = {k: v.numpy() for k, v in fmt.get_parameters().items()}
    assert sorted(got) == sorted(expect) and len(got) == 6 * 5  # q, v, down of 2 layers; A, B, values, rows, cols
    for k in expect:
        assert np.array_equal(got[k], expect[k]), k


def test_merged_export_equals_unfused_with_adapter(packs, kv_unfused):
    root, p = packs
    s = export_onnx(p[4], root / "merged", adapters=["a"], merge=True, kv_cache=False)
    assert s["merged_adapter"] == "a" and s["matmulnbits_layers"] == 14 - 6  # q, v, down of 2 layers go dense
    assert s["validation"]["logits"]["max_abs_diff"] < 1e-5  # vs PyTorch with the adapter active
    merged, unfused = OnnxModel(root / "merged"), OnnxModel(kv_unfused[1])
    unfused.set_adapter("a")
    ids = np.array([[5, 9, 40, 7], [3, 3, 100, 2]], dtype=np.int64)
    assert np.abs(merged.logits(ids) - unfused.logits(ids)).max() < 1e-5


def test_unknown_adapter_fails_before_writing(packs):
    root, p = packs
    out = root / "never"
    with pytest.raises(UnknownAdapterError, match="'nope'"):
        export_onnx(p[4], out, adapters=["nope"], merge=True)
    assert not out.exists() and not list(root.glob(".never*"))


@pytest.mark.slow
def test_failed_validation_writes_nothing(packs, monkeypatch):
    root, p = packs
    monkeypatch.setitem(V.TOLERANCES, "logits", {"atol": -1.0, "rtol": 0.0})
    out = root / "bad"
    with pytest.raises(V.ExportValidationError, match="logits"):
        export_onnx(p[4], out, kv_cache=False)
    assert not out.exists() and not list(root.glob(".bad*"))


def test_cli_export_8bit_json(packs):
    from sparsepack.cli import main

    root, p = packs
    res = CliRunner().invoke(main, ["export", str(p[8]), "--format", "onnx", "-o", str(root / "cli"),
                                    "--no-kv-cache", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["matmulnbits_layers"] == 14  # stderr may carry torch export warnings
    res = CliRunner().invoke(main, ["export", str(p[8]), "-o", str(root / "cli2"), "--adapter", "zz", "--merge"])
    assert res.exit_code == 1 and "unknown adapter 'zz'" in res.output


@pytest.mark.slow
def test_fp16_export_with_adapter(packs):
    root, p = packs
    s = export_onnx(p[4], root / "fp16", adapters=["a"], dtype="fp16")
    assert s["dtype"] == "fp16" and s["matmulnbits_layers"] == 14
    worst = max(v["max_abs_diff"] for v in s["validation"].values())
    assert 0 < worst < V.TOLERANCES["logits_fp16"]["atol"] * 10  # fp16 rounding shows, within the fp16 row
    om = OnnxModel(root / "fp16")
    ids = np.array([[5, 9, 40, 7]], dtype=np.int64)
    assert om.logits(ids).dtype == np.float16
    assert {i.type for i in om.session.get_inputs() if i.name.startswith("past_")} == {"tensor(float16)"}
    fmt = ort.AdapterFormat.read_adapter(str(root / "fp16" / "adapters" / "a.onnx_adapter"))
    assert fmt.get_parameters()["adapter_0_values"].numpy().dtype == np.float16
    with pytest.raises(ValueError, match="--dtype"):
        export_onnx(p[4], root / "never16", dtype="bf16")
    assert not (root / "never16").exists()


def _zero_sparse(model):
    from sparsepack.layers.adapter_linear import SparseLowRankLinear

    for mod in model.modules():
        if isinstance(mod, SparseLowRankLinear):
            for v in mod.sparse_values.values():
                v.data.zero_()
    return model


def test_peft_export_loads_in_peft_on_the_dense_export(packs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import sparsepack
    from sparsepack.exporters.dense import export_peft, export_safetensors

    root, p = packs
    s = export_safetensors(p[4], root / "dense")  # the dequantized base as a plain fp32 HF checkpoint
    assert s["dtype"] == "fp32" and (root / "dense" / "model.safetensors").is_file()
    s = export_peft(p[4], root / "peft", "a")
    assert s["sparse_dropped_nnz"] > 0 and s["modules"] == 6
    ids = torch.tensor([[5, 9, 40, 7, 11], [3, 3, 100, 2, 8]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "dense"), root / "peft").eval()
    with torch.no_grad():
        got = peft(ids).logits
        ref = _zero_sparse(sparsepack.load(p[4], adapter="a"))(ids).logits  # ours, low-rank part only
        with peft.disable_adapter():
            bare = peft(ids).logits
    assert (got - ref).abs().max() < 1e-4
    assert (got - bare).abs().max() > 1e-3  # the LoRA is really applied


def test_lora_approx_full_rank_is_the_dense_delta(packs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import sparsepack
    from sparsepack.exporters.dense import export_peft, export_safetensors
    from sparsepack.formats.adapter_layout import read_adapter

    root, p = packs
    if not (root / "dense").exists():
        export_safetensors(p[4], root / "dense")
    s = export_peft(p[4], root / "approx", "a", lora_approx=64)  # 64 >= min(out, in) of every layer: exact
    assert s["relative_error"] < 1e-6 and s["modules"] == 6
    model = sparsepack.load(p[4])
    for name, m in read_adapter(root / "approx").modules.items():
        delta = model.get_submodule(name).delta_weight("a")
        assert m.rank == min(delta.shape)
        assert (m.scaling * (m.B @ m.A) - delta).abs().max() < 1e-5 * delta.abs().max()
    # PEFT serves it: the whole correction (low-rank + sparse) on the dense base == ours with the adapter
    ids = torch.tensor([[5, 9, 40, 7, 11]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "dense"), root / "approx").eval()
    with torch.no_grad():
        assert (peft(ids).logits - sparsepack.load(p[4], adapter="a")(ids).logits).abs().max() < 1e-4
    low = export_peft(p[4], root / "approx2", "a", lora_approx=2)
    assert 0.05 < low["relative_error"] < 1 and low["relative_error_max"] >= low["relative_error"] * 0.5


def test_dense_exports_refuse_unknown_adapter_before_writing(packs):
    from sparsepack.cli import main

    root, p = packs
    for fmt in ("safetensors", "peft"):
        out = root / f"never-{fmt}"
        res = CliRunner().invoke(main, ["export", str(p[4]), "--format", fmt, "-o", str(out), "--adapter", "zz"])
        assert res.exit_code == 1 and "unknown adapter 'zz'" in res.output, res.output
        assert not out.exists() and not list(root.glob(f".never-{fmt}*"))
    res = CliRunner().invoke(main, ["export", str(p[4]), "--format", "peft", "-o", str(root / "never-peft")])
    assert res.exit_code != 0 and "--adapter" in res.output


def test_sampler_matches_softmax_and_filters():
    from sparsepack.runtime.onnx_runtime import make_sampler

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    choose = make_sampler(seed=1, top_k=0)
    counts = np.bincount([int(choose(logits)[0]) for _ in range(4000)], minlength=4) / 4000
    assert np.abs(counts - [0.5, 0.3, 0.15, 0.05]).max() < 0.03
    assert {int(make_sampler(top_k=2, seed=s)(logits)[0]) for s in range(30)} == {0, 1}
    assert {int(make_sampler(top_p=0.7, seed=s)(logits)[0]) for s in range(30)} == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert all(int(make_sampler(top_p=0.4, seed=s)(logits)[0]) == 0 for s in range(10))
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(temperature=0)


def test_cli_generate_onnx_equals_pytorch_generate(packs, kv_unfused):
    from sparsepack.cli import main

    root, p = packs
    run = CliRunner()
    for extra in ([], ["--adapter", "a"]):
        args = ["--prompt", "def token_windows", "--max-new-tokens", "6", *extra]
        ours = run.invoke(main, ["generate", str(kv_unfused[1]), "--onnx", *args])
        ref = run.invoke(main, ["generate", str(p[4]), *args])
        assert ours.exit_code == 0 and ref.exit_code == 0, ours.output + ref.output
        assert ours.stdout.strip() == ref.stdout.strip() and len(ours.stdout.strip()) > len("def token_windows")
    sampled = [run.invoke(main, ["generate", str(kv_unfused[1]), "--onnx", "--prompt", "x", "--do-sample",
                                 "--seed", str(s), "--max-new-tokens", "8"]).stdout for s in (0, 0, 1)]  # fmt: skip
    assert sampled[0] == sampled[1] != sampled[2]
    res = run.invoke(main, ["generate", str(p[4]), "--onnx", "--prompt", "x"])  # a pack, not an export
    assert res.exit_code == 1 and "not an ONNX export" in res.output


def _export_slot(path, in_f: int, out_f: int) -> torch.nn.Linear:
    """Export one adapter slot around a dense linear as the model's slots are; returns the linear.

    Dynamic rows, rank and nnz, as in the model export.
    """
    from torch.export import Dim

    from sparsepack.exporters.onnx_adapters import AdapterSlotLinear, sample_slot

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = AdapterSlotLinear(torch.nn.Linear(in_f, out_f, bias=False))

        def forward(self, x, a, b, values, rows, cols):
            self.lin.slot = (a, b, values, rows, cols)
            return self.lin(x)

    r, nnz, seq = Dim("r", min=1), Dim("nnz", min=1), Dim("seq", min=1)
    shapes = ({1: seq}, {1: r}, {0: r}, {0: nnz}, {0: nnz}, {0: nnz})
    args = (torch.randn(1, 3, in_f), *sample_slot(in_f, out_f))
    one = One().eval()
    prog = torch.onnx.export(one, args, dynamo=True, dynamic_shapes=shapes, verbose=False,
                             input_names=["x", "a", "b", "values", "rows", "cols"])  # fmt: skip
    prog.save(str(path))
    return one.lin.base


def test_sparse_term_is_exact_with_threads_and_repeated_rows(tmp_path):
    """Every call equals the dense product, prefill and decode, with 2 intra-op threads and rows hit many times.

    onnxruntime's ScatterND(add) runs its indices in parallel and drops updates to a repeated row (most runs of
    this case came out wrong with it); the exported graph must use a scatter that is exact.
    """
    in_f, out_f, nnz = 192, 256, 6000
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 24, (nnz,), generator=gen)  # 24 rows, about 250 entries each
    cols = torch.randint(0, in_f, (nnz,), generator=gen)
    values = torch.randn(nnz, generator=gen)
    a, b = torch.randn(in_f, 4, generator=gen), torch.randn(4, out_f, generator=gen)
    base = _export_slot(tmp_path / "slot.onnx", in_f, out_f)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(tmp_path / "slot.onnx"), so, providers=["CPUExecutionProvider"])
    dense = torch.zeros(out_f, in_f).index_put_((rows, cols), values, accumulate=True)
    for seq in (1, 96):
        x = torch.randn(1, seq, in_f, generator=gen)
        with torch.no_grad():
            ref = (base(x) + (x @ a) @ b + x @ dense.t()).numpy()
        feeds = {"x": x.numpy(), "a": a.numpy(), "b": b.numpy(), "values": values.numpy(), "rows": rows.numpy(),
                 "cols": cols.numpy()}  # fmt: skip
        errs = [float(np.abs(sess.run(None, feeds)[0] - ref).max()) for _ in range(20)]
        assert max(errs) < 1e-3, (seq, errs)
