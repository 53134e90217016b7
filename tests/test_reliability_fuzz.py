"""Hostile or broken packs (issue 8): mutate a valid pack, then read and load it.

Property (checked by ``benchmarks.fuzz_packs.run_case`` on every example): ``read_pack`` and ``sparsepack.load``
either succeed, when the mutation is harmless, or raise a ``FormatError`` subclass; never another exception,
never a hang (per-case alarm), never a large allocation (address space capped 2 GiB above its size), never an
unpickle, never a write in the case's sandbox (which holds the symlink targets outside the pack). A mutation that
breaks a rule the reader enforces (symlink out, index out of range, file differing from the manifest...) must
fail. The same mutators run longer outside CI: ``python benchmarks/fuzz_packs.py --cases 3000``.

The second half pins each bug the fuzzer found to a named, deterministic case.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsepack
from benchmarks.fuzz_packs import FAMILIES, build_base, read_st, run_case, seal, write_st
from sparsepack.formats import errors
from sparsepack.formats.manifest import MANIFEST_FILE
from sparsepack.formats.pack import read_pack

# Examples per family in the default run (derandomized: the same cases every run; ~60 ms each).
EXAMPLES = {"bytes": 80, "st_header": 110, "json": 80, "config": 60, "paths": 110, "values": 60}
COUNTS: Counter = Counter()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("fuzz-base"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-cases")


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """Set SPARSEPACK_FUZZ_COUNTS=path.json to get the number of cases run, by family and outcome."""
    yield
    out = os.environ.get("SPARSEPACK_FUZZ_COUNTS")
    if out:
        by_family: dict = {}
        for (family, outcome), n in sorted(COUNTS.items()):
            by_family.setdefault(family, {})[outcome] = n
        Path(out).write_text(json.dumps({"cases": sum(COUNTS.values()), "by_family": by_family}, indent=2))


@pytest.mark.parametrize("family", sorted(EXAMPLES))
def test_mutated_pack_reads_or_fails_with_a_typed_error(family, base, work):
    @settings(max_examples=EXAMPLES[family], deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
    @given(name=st.sampled_from(FAMILIES[family]), rnd=st.randoms(use_true_random=False), verify=st.booleans(),
           sealed=st.booleans())  # fmt: skip
    def prop(name, rnd, verify, sealed):
        r = run_case(base, work, name, rnd, verify, sealed, timeout=20)
        COUNTS[(family, r.outcome)] += 1
        assert r.good, f"{r.outcome}: {r.mutator} ({r.detail}), verify={verify}, sealed={r.sealed}\n{r.error}"

    prop()
    ran = sum(n for (f, _o), n in COUNTS.items() if f == family)
    assert ran >= EXAMPLES[family] // 2  # hypothesis ran the cases (it may stop early only on exhaustion)


# ------------------------------------------------------------------------------------------------ pinned cases


@pytest.fixture
def pack(base, tmp_path) -> Path:
    shutil.copytree(base, tmp_path / "pack")
    return tmp_path / "pack"


def _config(pack: Path, **fields) -> None:
    cfg = json.loads((pack / "config.json").read_text())
    cfg.update(fields)
    (pack / "config.json").write_text(json.dumps(cfg))
    seal(pack)


@pytest.mark.parametrize("value", [2**40, 2**31, 100_000])
def test_huge_layer_count_is_refused_before_building_the_model(pack, value):
    # Found by the fuzzer: num_hidden_layers 100000 built meta modules for minutes (a hang).
    _config(pack, num_hidden_layers=value)
    with pytest.raises(errors.ConfigError, match=r"config.json: config field num_hidden_layers = \d+"):
        read_pack(pack)


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", -1), ("hidden_size", 2**40), ("intermediate_size", -1), ("vocab_size", 0),
     ("num_attention_heads", 0), ("num_key_value_heads", -1), ("head_dim", -1), ("head_dim", 0),
     ("num_attention_heads", 2**40), ("hidden_size", 1.5), ("vocab_size", "320")],
)  # fmt: skip
def test_negative_zero_or_huge_dims_are_a_config_error(pack, field, value):
    # Found by the fuzzer: RuntimeError (negative dimension), ZeroDivisionError, AssertionError and
    # transformers' StrictDataclassFieldValidationError escaped untyped.
    _config(pack, **{field: value})
    with pytest.raises(errors.ConfigError, match="config.json"):
        sparsepack.load(pack)


@pytest.mark.parametrize("qc", [{"bits": 4.0}, {"bits": True}, {"group_size": True}, {"group_size": 32.0}])
def test_non_integer_quantization_fields_are_refused(pack, qc):
    cfg = json.loads((pack / "config.json").read_text())
    _config(pack, quantization_config={**cfg["quantization_config"], **qc})
    with pytest.raises(errors.ConfigError, match="bits|group_size"):
        read_pack(pack)


def _poke_int32(path: Path, tensor: str, index: int, value: int) -> None:
    header, data, _n = read_st(path)
    begin = header[tensor]["data_offsets"][0] + 4 * index
    data = data[:begin] + struct.pack("<i", value) + data[begin + 4 :]
    write_st(path, header, data)


@pytest.mark.parametrize("value", [-1, 2, 2**31 - 1])
def test_g_idx_out_of_range_is_refused_at_read_time(pack, value):
    # Found by the fuzzer: the numba dequant kernel indexes scales/zeros with g_idx unchecked, so a hostile
    # g_idx read memory out of bounds at the first forward. q_proj: K = 64, group 32 -> G = 2.
    _poke_int32(pack / "model.safetensors", "model.layers.1.self_attn.q_proj.g_idx", 5, value)
    seal(pack)
    with pytest.raises(errors.ShapeError, match=r"model.safetensors: tensor 'model.layers.1.self_attn.q_proj.g_idx'"
                                                r": g_idx values must lie in \[0, 2\)"):  # fmt: skip
        sparsepack.load(pack, verify=False)


def test_adapter_safetensors_with_a_duplicated_name_is_refused(pack):
    # Found by the fuzzer: the safetensors library keeps the last of two equal keys; the reader must refuse.
    f = pack / "adapters/ad1/adapter_model.safetensors"
    header, data, _n = read_st(f)
    name = sorted(k for k in header if k != "__metadata__")[0]
    text = json.dumps(header)[:-1] + f", {json.dumps(name)}: {json.dumps(header[name])}}}"
    write_st(f, text, data)
    seal(pack)
    with pytest.raises(errors.SafetensorsHeaderError, match="adapter_model.safetensors: tensor .*appears twice"):
        read_pack(pack)


@pytest.mark.parametrize("metadata", [[1, 2], {"a": 1}])
def test_adapter_safetensors_refused_by_the_library_is_a_typed_error(pack, metadata):
    # Found by the fuzzer: safetensors' own SafetensorError escaped from read_adapter.
    f = pack / "adapters/ad1/sparse_adapter.safetensors"
    header, data, _n = read_st(f)
    header["__metadata__"] = metadata
    write_st(f, header, data)
    seal(pack)
    with pytest.raises(errors.SafetensorsHeaderError, match="sparse_adapter.safetensors: rejected by safetensors"):
        read_pack(pack)


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_broken_symlinks_in_a_pack_are_refused(pack, kind):
    # Found by the fuzzer: a symlink loop raised RuntimeError from Path.resolve; a dangling adapter file was
    # silently treated as absent.
    link = pack / "adapters/ad1/sparse_adapter.safetensors"
    link.unlink()
    link.symlink_to(link if kind == "loop" else pack / "nowhere")
    seal(pack)
    with pytest.raises(errors.UnsafePathError, match="sparse_adapter.safetensors' is broken"):
        read_pack(pack)


@pytest.mark.parametrize("rel", [MANIFEST_FILE, "config.json", "adapters/ad1/sparsepack_adapter.json"])
def test_files_outside_the_manifest_cannot_be_symlinked_out(pack, tmp_path, rel):
    # Found by the fuzzer: the manifest itself (and files it does not list) could be symlinks out of the pack.
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(pack / rel, outside / "f")
    (pack / rel).symlink_to(outside / "f")
    with pytest.raises(errors.UnsafePathError, match="resolves outside the pack"):
        read_pack(pack)


def test_a_symlink_inside_the_pack_is_allowed(pack):
    (pack / "config.json").rename(pack / "real-config.json")
    (pack / "config.json").symlink_to("real-config.json")
    seal(pack)
    assert read_pack(pack).config.hidden_size == 64


@pytest.mark.parametrize(
    "text",
    [b"[" * 100_000, b'{"format": "sparsepack", "format_version": ' + b"9" * 5000 + b"}",
     b'{"format": "sparsepack", "format_version": 1, "history": [{"stage": "x", "args": 5}]}',
     b'{"format": "sparsepack", "format_version": 1, "adapters": {"ad1": 5}}'],
)  # fmt: skip
def test_hostile_manifest_json_is_a_manifest_error(pack, text):
    # Found by the fuzzer: RecursionError, ValueError (int digit limit) and TypeError escaped untyped.
    (pack / MANIFEST_FILE).write_bytes(text)
    with pytest.raises(errors.ManifestError, match="sparsepack.json"):
        read_pack(pack)


@pytest.mark.parametrize("shard", [5, None, ["model.safetensors"]])
def test_index_naming_non_string_shards_is_refused(pack, shard):
    # Found by the fuzzer: TypeError from os.path on a non-string shard name.
    (pack / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(errors.FormatError, match="index.json: 'weight_map' must map"):
        read_pack(pack, verify=False)


@pytest.mark.parametrize("path", ["adapters/ad1\x00", 5])
def test_adapter_path_that_is_not_a_plain_string_is_refused(pack, path):
    data = json.loads((pack / MANIFEST_FILE).read_text())
    data["adapters"]["ad1"]["path"] = path
    (pack / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(errors.FormatError, match="path|'path'"):
        read_pack(pack)


@pytest.mark.parametrize("alpha", [-1e308, 1e6, float("nan"), "16", None])
def test_adapter_alpha_out_of_fp16_range_is_refused(pack, alpha):
    # Found by the fuzzer (--forward): alpha -1e308 loaded, then the first forward overflowed converting alpha / r.
    meta_path = pack / "adapters/ad1/sparsepack_adapter.json"
    meta = json.loads(meta_path.read_text())
    next(iter(meta["modules"].values()))["alpha"] = alpha
    meta_path.write_text(json.dumps(meta))
    seal(pack)
    with pytest.raises(errors.FormatError, match=r"sparsepack_adapter.json: tensor .*: alpha must be a number"):
        read_pack(pack)


@pytest.mark.parametrize(("field", "value"), [("output_hidden_states", {"a": None}), ("use_cache", "yes"),
                                              ("return_dict", [1])])  # fmt: skip
def test_runtime_flags_of_the_wrong_type_are_refused_at_load(pack, field, value):
    # Found by the fuzzer (--forward): output_hidden_states = {"a": None} loaded, then every forward raised TypeError.
    _config(pack, **{field: value})
    with pytest.raises(errors.ConfigError, match=f"config.json: .*{field}"):  # ours, or transformers' own check
        sparsepack.load(pack)
