"""``--adapter-op custom``: sparsepack's onnxruntime op (C, built on first use) against dense maths and PyTorch."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
if not any(shutil.which(c) for c in ("gcc", "cc", "clang")):
    pytest.skip("no C compiler to build the custom-op library", allow_module_level=True)

import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from sparsepack.exporters.onnx import export_onnx  # noqa: E402
from sparsepack.runtime import ort_ops  # noqa: E402
from sparsepack.runtime.onnx_runtime import OnnxModel  # noqa: E402
from tests.factories import random_adapter, rtn_pack, tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One build of the library for the module, in its own cache directory (``$SPARSEPACK_CACHE``)."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEPACK_CACHE", str(root))
    yield root
    mp.undo()


def _op_session(cache, rank: int, index_type=TensorProto.INT32):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t"] * (rank - 1) + ["in"]),
              helper.make_tensor_value_info("A", TensorProto.FLOAT, ["r", "in"]),
              helper.make_tensor_value_info("B", TensorProto.FLOAT, ["out", "r"]),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info("values", TensorProto.FLOAT, ["nnz"]),
              helper.make_tensor_value_info("row_ptr", index_type, ["out1"]),
              helper.make_tensor_value_info("col_idx", index_type, ["nnz"])]  # fmt: skip
    node = helper.make_node(ort_ops.OP, [i.name for i in inputs], ["y"], domain=ort_ops.DOMAIN)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ort_ops.DOMAIN, ort_ops.OP_VERSION)]
    model = helper.make_model(graph, opset_imports=opsets)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    ort_ops.register(so, cache)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _csr(rng, out_f, in_f, nnz):
    flat = np.sort(rng.choice(out_f * in_f, size=nnz, replace=False))
    rows, cols = flat // in_f, flat % in_f
    row_ptr = np.zeros(out_f + 1, np.int64)
    np.add.at(row_ptr, rows + 1, 1)
    return rng.standard_normal(nnz).astype(np.float32), np.cumsum(row_ptr), cols


@pytest.mark.parametrize("rank,nnz,shape,in_f,out_f", [
    (5, 700, (1, 1), 96, 130), (5, 700, (3, 17), 96, 130), (0, 700, (9,), 96, 130), (5, 0, (1, 4), 96, 130),
    (16, 40, (2, 1), 96, 130),
    (16, 5308, (1, 1), 576, 1536), (8, 3000, (1,), 500, 1001), (0, 9000, (1,), 700, 900),  # model-sized decode
])  # fmt: skip
def test_custom_op_equals_dense_maths(cache, rank, nnz, shape, in_f, out_f):
    """y = scale (x A^T) B^T + x S^T against float64 numpy: decode and prefill rows, r = 0, nnz = 0, empty rows,
    and decode at a real layer's size (odd output counts included)."""
    rng = np.random.default_rng(rank + nnz)
    values, row_ptr, cols = _csr(rng, out_f, in_f, nnz)
    A = rng.standard_normal((rank, in_f)).astype(np.float32)
    B = rng.standard_normal((out_f, rank)).astype(np.float32)
    x = rng.standard_normal((*shape, in_f)).astype(np.float32)
    dense = np.zeros((out_f, in_f))
    dense[np.repeat(np.arange(out_f), np.diff(row_ptr)), cols] = values
    ref = 0.5 * (x.astype(np.float64) @ A.T) @ B.T + x @ dense.T
    sess = _op_session(cache, len(shape) + 1)
    feeds = {"x": x, "A": A, "B": B, "scale": np.array([0.5], np.float32), "values": values,
             "row_ptr": row_ptr.astype(np.int32), "col_idx": cols.astype(np.int32)}  # fmt: skip
    y = sess.run(None, feeds)[0]
    assert y.shape == (*shape, out_f)
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    if nnz:  # a CSR structure that does not fit is refused with the input named, not read out of bounds
        bad = dict(feeds, col_idx=np.where(np.arange(nnz) == nnz // 2, in_f, cols).astype(np.int32))
        with pytest.raises(Exception, match="col_idx"):
            sess.run(None, bad)


def test_library_is_built_once_per_source_and_cpu(cache, monkeypatch):
    lib = ort_ops.library_path(cache)
    stamp = lib.stat().st_mtime_ns
    assert ort_ops.library_path(cache) == lib and lib.stat().st_mtime_ns == stamp  # found, not rebuilt
    monkeypatch.setattr(ort_ops, "_cpu_signature", lambda: "another cpu")
    assert ort_ops.library_path(cache) != lib  # -march=native code is not shared across CPUs


def test_every_adapter_op_has_a_slot_layout_and_a_cli_choice():
    from sparsepack.cli import main
    from sparsepack.exporters.onnx_adapters import LAYOUTS

    assert tuple(LAYOUTS) == ort_ops.ADAPTER_OPS and "standard" not in ort_ops.CUSTOM_ADAPTER_OPS
    export = next(c for c in main.commands.values() if c.name == "export")
    choice = next(p for p in export.params if p.name == "adapter_op").type
    assert tuple(choice.choices) == ort_ops.ADAPTER_OPS


def test_no_compiler_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    import sparsepack.runtime.ort_ops as mod

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(mod.shutil, "which", lambda name: None)
    with pytest.raises(mod.OrtOpsBuildError, match="C compiler.*--adapter-op standard"):
        mod.library_path(tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def packs(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("onnx_custom")
    model = tiny_llama()
    adapters = {"a": random_adapter(model), "b": random_adapter(model, seed=1, target="q_proj|o_proj")}
    return root, rtn_pack(model, root / "w4", bits=4, act_order=True, adapters=adapters)[0]


@pytest.fixture(scope="module")
def custom_export(packs):
    root, pack = packs
    return export_onnx(pack, root / "kv", adapters=["a", "b"], adapter_op="custom"), root / "kv"


def test_custom_op_export_is_validated_and_runs_one_node_per_slot(packs, custom_export):
    import onnx

    summary, out = custom_export
    assert summary["adapter_op"] == "custom"
    for tag in ("", "a:", "b:"):  # greedy tokens of the bare graph and each adapter == PyTorch generate
        assert summary["validation"][f"{tag}tokens"]["max_abs_diff"] == 0
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count(ort_ops.OP) == 8  # q, v, down (a) and q, o (b) of 2 layers: union {q, v, o, down} x 2
    assert "ScatterElements" not in ops and "If" not in ops
    assert json.loads((out / "sparsepack_onnx.json").read_text())["adapter_op"] == "custom"


def test_custom_op_adapters_switch_and_equal_pytorch(packs, custom_export):
    import sparsepack

    root, pack = packs
    om = OnnxModel(custom_export[1])
    ids = np.array([[5, 9, 40, 7, 11], [3, 3, 100, 2, 8]], dtype=np.int64)
    ref = {a: sparsepack.load(pack, adapter=a)(torch.from_numpy(ids)).logits.detach().numpy()
           for a in (None, "a", "b")}  # fmt: skip
    assert min(np.abs(ref[a] - ref[None]).max() for a in ("a", "b")) > 1e-3  # both adapters matter
    for a in (None, "a", "b", None, "b", "a"):
        om.set_adapter(a)
        assert np.abs(om.logits(ids) - ref[a]).max() < 1e-5, a


def test_custom_op_adapter_file_holds_csr_int32(packs, custom_export):
    import sparsepack
    from sparsepack.exporters.onnx import adapter_slots
    from sparsepack.exporters.onnx_adapters import adapter_tensors

    root, pack = packs
    model = sparsepack.load(pack)
    slots = adapter_slots(model, ("a", "b"))
    expect = adapter_tensors(model, "b", slots, "custom")
    got = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(
        str(custom_export[1] / "adapters" / "b.onnx_adapter")).get_parameters().items()}  # fmt: skip
    assert sorted(got) == sorted(expect) and len(got) == 4 * 5  # q, o of 2 layers
    for k in expect:
        assert got[k].dtype == expect[k].dtype and np.array_equal(got[k], expect[k]), k
    i = [m for m, _, _ in slots].index("model.layers.0.self_attn.o_proj")
    layer = model.get_submodule("model.layers.0.self_attn.o_proj")
    assert got[f"adapter_{i}_row_ptr"].dtype == np.int32
    assert np.array_equal(got[f"adapter_{i}_row_ptr"], layer.supports["b"].row_ptr.numpy())
    assert got[f"adapter_{i}_lora_A"].shape == tuple(layer.lora_A["b"].shape)  # PEFT's [r, in]


def test_custom_op_refusals_write_nothing(packs, tmp_path, monkeypatch):
    from sparsepack.cli import main

    root, pack = packs
    out = root / "never"
    with monkeypatch.context() as m:  # no library built in this cache and no compiler: refused before any work
        m.setenv("SPARSEPACK_CACHE", str(tmp_path / "empty"))
        m.delenv("CC", raising=False)
        m.setattr(ort_ops.shutil, "which", lambda name: None)
        res = CliRunner().invoke(main, ["export", str(pack), "-o", str(out), "--adapter", "a", "--adapter-op",
                                        "custom"])  # fmt: skip
        assert res.exit_code == 1 and "OrtOpsBuildError" in res.output and "C compiler" in res.output
    with pytest.raises(ValueError, match="fp32 graphs only"):
        export_onnx(pack, out, adapters=["a"], adapter_op="custom", dtype="fp16")
    with pytest.raises(ValueError, match="--merge keeps none"):
        export_onnx(pack, out, adapters=["a"], merge=True, adapter_op="custom")
    with pytest.raises(ValueError, match="--adapter-op must be one of"):
        export_onnx(pack, out, adapters=["a"], adapter_op="fast")
    res = CliRunner().invoke(main, ["export", str(pack), "--format", "peft", "--adapter", "a", "-o", str(out),
                                    "--adapter-op", "custom"])  # fmt: skip
    assert res.exit_code == 2 and "--adapter-op" in res.output
    assert not out.exists() and not list(root.glob(".never*"))


def test_custom_fp16_stores_half_factors_and_matches_its_rounded_adapter(packs):
    import sparsepack
    from sparsepack.exporters.onnx_adapters import round_lowrank_fp16

    root, pack = packs
    summary = export_onnx(pack, root / "f16", adapters=["a"], adapter_op="custom-fp16", kv_cache=False)
    assert summary["validation"]["a:logits"]["max_abs_diff"] < 1e-5  # against A, sB rounded as stored
    params = ort.AdapterFormat.read_adapter(str(root / "f16" / "adapters" / "a.onnx_adapter")).get_parameters()
    kinds = {k.split("_", 2)[-1]: v.numpy().dtype for k, v in params.items()}  # adapter_{i}_{part}
    assert kinds == {"lora_A": np.float16, "lora_B": np.float16, "values": np.float32, "row_ptr": np.int32,
                     "col_idx": np.int32}  # fmt: skip
    om = OnnxModel(root / "f16")
    om.set_adapter("a")
    ids = np.array([[5, 9, 40, 7, 11]], dtype=np.int64)
    model = sparsepack.load(pack, adapter="a")
    exact = model(torch.from_numpy(ids)).logits.detach().numpy()
    round_lowrank_fp16(model)
    rounded = model(torch.from_numpy(ids)).logits.detach().numpy()
    got = om.logits(ids)
    assert np.abs(got - rounded).max() < 1e-5
    assert 1e-6 < np.abs(got - exact).max() < 1e-2  # the rounding shows, and stays small


def test_unknown_adapter_op_in_metadata_is_refused(custom_export, tmp_path):
    from sparsepack.formats.errors import ManifestError

    copy = tmp_path / "copy"
    shutil.copytree(custom_export[1], copy)
    meta = json.loads((copy / "sparsepack_onnx.json").read_text())
    (copy / "sparsepack_onnx.json").write_text(json.dumps({**meta, "adapter_op": "turbo"}))
    with pytest.raises(ManifestError, match="adapter_op"):
        OnnxModel(copy)
