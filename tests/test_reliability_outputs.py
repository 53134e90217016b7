"""Stage outputs read back as input (issue 8): finetune checkpoints (``--resume``) and ONNX exports (``OnnxModel``).

Property (``benchmarks.fuzz_outputs.run_case`` on every example): reading a damaged or hostile checkpoint or
export either succeeds (harmless damage) or raises a ``FormatError`` subclass naming the file; never another
exception, a hang, a large allocation, an unpickle, a write, or a Python-level open of the ``outside/`` copy
that escaping paths and symlinks point to. Damage the reader must refuse (a tensor file differing from its
record, a path out of the directory, wrong shapes) must fail. Longer runs:
``python benchmarks/fuzz_outputs.py --cases 2000``. The second half pins single cases by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_outputs import MUTATORS, build_ckpt_base, build_onnx_base, run_case, seal_ckpt
from sparsepack.formats import errors
from sparsepack.pipeline import checkpoint as ckpt
from sparsepack.runtime.onnx_runtime import OnnxModel

EXAMPLES = {"ckpt": 120, "onnx": 150}  # derandomized; ~50 ms (ckpt) and ~20 ms (onnx) per case
COUNTS: Counter = Counter()


@pytest.fixture(scope="module")
def ckpt_base(tmp_path_factory):
    return build_ckpt_base(tmp_path_factory.mktemp("ckpt-base"))


@pytest.fixture(scope="module")
def onnx_base(tmp_path_factory) -> Path:
    return build_onnx_base(tmp_path_factory.mktemp("onnx-base"))


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """SPARSEPACK_FUZZ_COUNTS=path.json: cases run per target and outcome."""
    yield
    out = os.environ.get("SPARSEPACK_FUZZ_COUNTS")
    if out:
        by: dict = {}
        for (target, outcome), n in sorted(COUNTS.items()):
            by.setdefault(target, {})[outcome] = n
        Path(out).write_text(json.dumps({"cases": sum(COUNTS.values()), "by_target": by}, indent=2))


@pytest.mark.parametrize("target", sorted(EXAMPLES))
def test_damaged_output_reads_or_fails_with_a_typed_error(target, ckpt_base, onnx_base, tmp_path):
    base, trainer = ckpt_base if target == "ckpt" else (onnx_base, None)

    @settings(max_examples=EXAMPLES[target], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
    @given(name=st.sampled_from(sorted(MUTATORS[target])), rnd=st.randoms(use_true_random=False), sealed=st.booleans())
    def prop(name, rnd, sealed):
        r = run_case(target, base, tmp_path, name, rnd, sealed, trainer, timeout=20)
        COUNTS[(target, r.outcome)] += 1
        assert r.good, f"{r.outcome}: {r.mutator} ({r.detail}), sealed={r.sealed}\n{r.error}"

    prop()
    assert sum(n for (t, _o), n in COUNTS.items() if t == target) >= EXAMPLES[target] // 2
    assert COUNTS[(target, "typed")] > 0 and COUNTS[(target, "ok")] > 0  # both kinds of damage were drawn


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture
def ck(ckpt_base, tmp_path):
    base, trainer = ckpt_base
    shutil.copytree(base, tmp_path / "ckpt")
    return tmp_path / "ckpt", trainer


def _edit_state(where: Path, **fields) -> None:
    meta = json.loads((where / "state.json").read_text())
    meta.update(fields)
    (where / "state.json").write_text(json.dumps(meta))


def test_intact_checkpoint_restores(ck):
    root, trainer = ck
    trainer.restore(ckpt.latest_checkpoint(root))
    assert trainer.state.global_step == 6


def test_truncated_tensors_name_the_file(ck):
    root, trainer = ck
    st = root / "step-0000006" / "state.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(errors.CheckpointError, match=r"step-0000006/state.safetensors: size \d+ != \d+"):
        trainer.restore(root / "step-0000006")


def test_flipped_byte_in_tensor_data_is_caught_by_the_recorded_hash(ck):
    root, trainer = ck
    st = root / "step-0000006" / "state.safetensors"
    raw = bytearray(st.read_bytes())
    raw[-5] ^= 0x10  # inside the data: the header still parses
    st.write_bytes(bytes(raw))
    with pytest.raises(errors.CheckpointError, match="sha256 differs"):
        trainer.restore(root / "step-0000006")


@pytest.mark.parametrize("missing", ["state.json", "state.safetensors"])
def test_missing_file_is_named(ck, missing):
    root, trainer = ck
    (root / "step-0000006" / missing).unlink()
    with pytest.raises(errors.MissingFileError, match=f"step-0000006/{missing}"):
        trainer.restore(root / "step-0000006")


@pytest.mark.parametrize("text", ["", "{", "[]", '{"phase": ' + "9" * 5000 + "}", "[" * 100000])
def test_bad_json_is_a_checkpoint_error(ck, text):
    root, trainer = ck
    (root / "step-0000006" / "state.json").write_text(text)
    with pytest.raises(errors.CheckpointError, match="step-0000006/state.json"):
        trainer.restore(root / "step-0000006")


@pytest.mark.parametrize(("field", "value"), [("phase", 99), ("step", -1), ("cursor", [0, 10**6]),
                                              ("cursor", "0"), ("optimizer_scalars", {"step.x": 1}),
                                              ("sparse_in_optimizer", 1), ("files", {})])  # fmt: skip
def test_hostile_counters_are_refused_before_use(ck, field, value):
    root, trainer = ck
    _edit_state(root / "step-0000006", **{field: value})
    with pytest.raises(errors.CheckpointError, match="state.json"):
        trainer.restore(root / "step-0000006")


def test_wrong_shape_and_out_of_range_indices_name_the_tensor(ck):
    from safetensors.torch import load_file, save_file

    root, trainer = ck
    step = root / "step-0000006"
    good = load_file(str(step / "state.safetensors"))
    name = next(k for k in good if k.endswith(".A"))
    bad = dict(good)
    bad[name] = torch.zeros(good[name].shape[0] + 1, good[name].shape[1])
    save_file(bad, str(step / "state.safetensors"))
    seal_ckpt(root)
    with pytest.raises(errors.CheckpointError, match=f"tensor '{name}': torch.float32 \\[3, "):
        trainer.restore(step)
    col = next(k for k in good if k.endswith(".col_idx"))
    bad = dict(good)
    bad[col] = good[col].clone()
    bad[col][0] = 10**6
    save_file(bad, str(step / "state.safetensors"))
    seal_ckpt(root)
    with pytest.raises(errors.CheckpointError, match=f"tensor '{col}': col_idx outside"):
        trainer.restore(step)


def test_settings_differing_from_the_command_line_are_named(ck):
    root, trainer = ck
    meta = json.loads((root / "step-0000006" / "state.json").read_text())
    _edit_state(root / "step-0000006", config={**meta["config"], "rank": 8, "device": "cuda"})
    with pytest.raises(errors.CheckpointMismatchError, match=r"state.json: .*these differ: \['rank'\]"):
        trainer.restore(root / "step-0000006")
    # a setting added after the checkpoint was written counts as its default; set otherwise, it is named
    older = {k: v for k, v in meta["config"].items() if k != "init_samples"}
    _edit_state(root / "step-0000006", config=older)
    ckpt.check_settings(root / "step-0000006", {"config": older}, trainer.cfg.to_dict())
    changed = dataclasses.replace(trainer.cfg, init_samples=7).to_dict()
    with pytest.raises(errors.CheckpointMismatchError, match=r"these differ: \['init_samples'\]"):
        ckpt.check_settings(root / "step-0000006", {"config": older}, changed)
    # ... unless it behaved otherwise then: before --kl-data the KL term read the training batches
    older = {k: v for k, v in meta["config"].items() if k != "kl_data"}
    ckpt.check_settings(root / "step-0000006", {"config": older}, {**trainer.cfg.to_dict(), "kl_data": "batch"})
    with pytest.raises(errors.CheckpointMismatchError, match=r"these differ: \['kl_data'\]"):
        ckpt.check_settings(root / "step-0000006", {"config": older}, {**trainer.cfg.to_dict(), "kl_data": None})


@pytest.mark.parametrize("pointer", ["../outside", "step-0000009", "", ".lock"])
def test_bad_latest_pointer_is_refused(ck, pointer):
    root, _ = ck
    (root / "latest").write_text(pointer)
    with pytest.raises((errors.CheckpointError, errors.MissingFileError), match="latest"):
        ckpt.latest_checkpoint(root)


def test_symlink_out_of_a_checkpoint_is_refused(ck, tmp_path):
    root, trainer = ck
    shutil.copy(root / "step-0000006" / "state.json", tmp_path / "elsewhere.json")
    (root / "step-0000006" / "state.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", root / "step-0000006" / "state.json")
    with pytest.raises(errors.UnsafePathError, match="resolves outside"):
        trainer.restore(root / "step-0000006")


# ------------------------------------------------------------------------------------------------ ONNX exports


@pytest.fixture
def export(onnx_base, tmp_path) -> Path:
    shutil.copytree(onnx_base, tmp_path / "export")
    return tmp_path / "export"


def _proto(export: Path):
    import onnx

    return onnx.load(str(export / "model.onnx"), load_external_data=False)


def _set_external(export: Path, key: str, value: str) -> None:
    proto = _proto(export)
    t = next(t for t in proto.graph.initializer if t.external_data)
    next(e for e in t.external_data if e.key == key).value = value
    (export / "model.onnx").write_bytes(proto.SerializeToString())


def test_tiny_export_runs_with_and_without_its_adapter(export):
    m = OnnxModel(export)
    base = m.logits(np.array([[1, 2, 3]]))
    m.set_adapter("a1")
    assert base.shape == (1, 3, 16) and not np.allclose(base, m.logits(np.array([[1, 2, 3]])))


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "adapters/../../x"])
def test_external_data_outside_the_directory_is_refused(export, location, tmp_path):
    shutil.copy(export / "model.onnx.data", tmp_path / "outside.data")
    _set_external(export, "location", location)
    with pytest.raises(errors.UnsafePathError, match="escapes|outside"):
        OnnxModel(export)


@pytest.mark.parametrize(("key", "value"), [("offset", str(2**40)), ("length", "12345678"), ("offset", "-1")])
def test_external_data_range_past_the_file_is_refused(export, key, value):
    _set_external(export, key, value)
    with pytest.raises(errors.OnnxFormatError, match="does not fit in model.onnx.data"):
        OnnxModel(export)


def test_huge_declared_shape_is_refused_before_onnxruntime_allocates(export):
    proto = _proto(export)
    t = next(t for t in proto.graph.initializer if t.external_data)
    del t.dims[:]
    t.dims.extend([2**31, 2**31])
    (export / "model.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(errors.OnnxFormatError, match=r"declared shape \[2147483648, 2147483648\] is larger"):
        OnnxModel(export)


@pytest.mark.parametrize("name", ["model.onnx.data", "adapters", "sparsepack_onnx.json"])
def test_symlinks_out_of_the_export_are_refused(export, name, tmp_path):
    target = tmp_path / "elsewhere"
    shutil.copytree(export, target)
    (shutil.rmtree if (export / name).is_dir() else os.unlink)(export / name)
    os.symlink(target / name, export / name)
    with pytest.raises(errors.UnsafePathError, match="resolves outside"):
        OnnxModel(export)


@pytest.mark.parametrize(("name", "path"), [("../evil", "adapters/a1.onnx_adapter"), ("a1", "../x.onnx_adapter"),
                                            ("a1", "/etc/passwd")])  # fmt: skip
def test_adapter_names_and_paths_escaping_are_refused(export, name, path):
    meta = json.loads((export / "sparsepack_onnx.json").read_text())
    meta["adapters"] = {name: path}
    (export / "sparsepack_onnx.json").write_text(json.dumps(meta))
    with pytest.raises(errors.UnsafePathError):
        OnnxModel(export)


def test_truncated_adapter_file_is_a_typed_error_naming_it(export):
    f = export / "adapters" / "a1.onnx_adapter"
    f.write_bytes(f.read_bytes()[:100])
    m = OnnxModel(export)  # adapters are read when first activated
    with pytest.raises(errors.OnnxFormatError, match=r"a1.onnx_adapter: not a valid adapter file"):
        m.set_adapter("a1")


def test_adapter_tensor_not_fitting_the_graph_is_named(export):
    from sparsepack.exporters.onnx_adapters import write_adapter

    write_adapter(export / "adapters" / "a1.onnx_adapter", {"adapter_0_lora_A": np.zeros((2, 9), np.float32)})
    with pytest.raises(errors.ShapeError, match=r"tensor 'adapter_0_lora_A': shape \[2, 9\] does not fit"):
        OnnxModel(export).set_adapter("a1")


@pytest.mark.parametrize("meta", ["{", "[]", json.dumps({"format": "sparsepack-onnx", "format_version": 1})])
def test_bad_metadata_is_a_typed_error(export, meta):
    (export / "sparsepack_onnx.json").write_text(meta)
    with pytest.raises(errors.FormatError, match="sparsepack_onnx.json"):
        OnnxModel(export)


@pytest.mark.parametrize("dtype", ["float64", "object", ["float16"], 7])
def test_unknown_cache_dtype_is_a_typed_error(export, dtype):
    meta_path = export / "sparsepack_onnx.json"
    meta = json.loads(meta_path.read_text())
    meta["layout"]["dtype"] = dtype
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(errors.FormatError, match="layout.dtype"):
        OnnxModel(export)
