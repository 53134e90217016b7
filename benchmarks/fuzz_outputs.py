"""Fuzz target for hostile or broken stage outputs read back as input (issue 8): training checkpoints and ONNX exports.

    python benchmarks/fuzz_outputs.py --cases 2000 --seed 0 --json out/fuzz_outputs.json [--target ckpt|onnx]
        [--real-onnx]                                              # fuzz a real `sparsepack export`, not the tiny one
    python benchmarks/fuzz_outputs.py --case 17 --seed 0 --target onnx --keep /tmp/repro    # replay one case

Two targets, each a valid base mutated at random, then read back:

- ``ckpt``: a ``finetune`` checkpoint directory (``latest`` -> ``step-N/{state.json,state.safetensors}``) of a
  RoSA run on a tiny Llama pack, read by ``Trainer.restore`` of a set-up trainer (what ``--resume`` does).
  Property: restore succeeds (harmless damage) or raises a ``FormatError`` subclass naming the file
  (``CheckpointError``, ``CheckpointMismatchError``, ``MissingFileError``, ``SafetensorsHeaderError``,
  ``UnsafePathError``).
- ``onnx``: an export directory (``model.onnx`` + external data, ``sparsepack_onnx.json``,
  ``adapters/*.onnx_adapter``), read by ``OnnxModel(DIR)`` and ``set_adapter`` for every adapter.
  By default the base is a tiny hand-built export of the same layout (milliseconds per case);
  ``--real-onnx`` fuzzes a real ``sparsepack export`` of a tiny pack instead.

On every case, as in ``benchmarks/fuzz_packs.py``: no other exception type, no hang (alarm), no large allocation
(address space capped 2 GiB above its size), no unpickle, nothing written in the sandbox, and no Python-level
open of anything in the sandbox's ``outside/`` directory (the targets of the escaping paths and symlinks; an
audit hook watches). A mutation that breaks a rule the reader enforces must fail; passing it is ``missed``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, sys.path[0] is benchmarks/, whose module names (onnx.py) would shadow the real packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fuzz_packs import (  # noqa: E402
    BAD,
    GOOD,
    HOSTILE_INTS,
    HOSTILE_NAMES,
    HOSTILE_VALUES,
    CaseTimeout,
    Unpickled,
    deadline,
    memory_cap,
    no_unpickling,
    read_st,
    snapshot,
    write_st,
)

BAD = (*BAD, "read_outside")
TARGETS = ("ckpt", "onnx")


@dataclass
class Mutation:
    mutator: str
    detail: str
    must_fail: bool = False
    touched_record: bool = False  # state.json itself edited: re-sealing would undo nothing, skip it


Mutator = Callable[[random.Random, Path], Mutation]
MUTATORS: dict[str, dict[str, Mutator]] = {t: {} for t in TARGETS}


def register(target: str):
    def wrap(fn):
        name = fn.__name__.lstrip("_")

        def mutator(rng: random.Random, root: Path) -> Mutation:
            detail, must_fail, *rest = fn(rng, root)
            return Mutation(name, detail, must_fail, bool(rest and rest[0]))

        MUTATORS[target][name] = mutator
        return mutator

    return wrap


def _pick(rng: random.Random, seq):
    seq = list(seq)
    return seq[rng.randrange(len(seq))]


def _bytes_damage(rng: random.Random, path: Path) -> str:
    raw = bytearray(path.read_bytes())
    kind = _pick(rng, ("truncate", "flip", "append", "empty"))
    if kind == "truncate" and raw:
        n = rng.randrange(len(raw))
        path.write_bytes(bytes(raw[:n]))
        return f"truncate {path.name} to {n}"
    if kind == "flip" and raw:
        k = rng.randint(1, 8)
        for _ in range(k):
            i = rng.randrange(min(len(raw), 512)) if rng.random() < 0.5 else rng.randrange(len(raw))
            raw[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
        return f"flip {k} bits in {path.name}"
    if kind == "append":
        path.write_bytes(bytes(raw) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
        return f"append junk to {path.name}"
    path.write_bytes(b"")
    return f"empty {path.name}"


def _symlink(link: Path, target: Path | str) -> None:
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif os.path.lexists(link):
        link.unlink()
    os.symlink(target, link)


def _hostile_json_value(rng: random.Random):
    return _pick(rng, (*HOSTILE_VALUES, *HOSTILE_INTS))


# ------------------------------------------------------------------------------------------------ checkpoints
# Layout under the sandbox: ckpt/latest, ckpt/step-N/{state.json, state.safetensors}; outside/ holds a copy.


def _ckpt_step(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def seal_ckpt(root: Path) -> None:
    """Record the (mutated) tensor file's size and sha256 in state.json, so the deeper checks are reached."""
    from sparsepack.formats.manifest import sha256_file

    step = root / "step-0000006"
    try:
        meta = json.loads((step / "state.json").read_text())
        st = step / "state.safetensors"
        meta["files"] = {"state.safetensors": {"sha256": sha256_file(st), "bytes": st.stat().st_size}}
        (step / "state.json").write_text(json.dumps(meta, indent=1))
    except (OSError, ValueError, TypeError):
        return


def _st_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def _st_save(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@register("ckpt")
def _ck_bytes(rng, root):
    step = _ckpt_step(root)
    f = _pick(rng, (step / "state.safetensors", step / "state.json", root / "latest"))
    return _bytes_damage(rng, f), False


@register("ckpt")
def _ck_delete(rng, root):
    step = _ckpt_step(root)
    f = _pick(rng, (step / "state.safetensors", step / "state.json", root / "latest", step))
    if f.is_dir():
        shutil.rmtree(f)
    else:
        f.unlink()
    return f"delete {f.relative_to(root)}", f.name != "latest"  # no latest: nothing to resume (a fresh start)


@register("ckpt")
def _ck_pointer(rng, root):
    value = _pick(rng, ("../outside", "/etc", "step-9999999", "", "step-0000006/..", ".lock", "latest",
                        "step-0000004", "step-0000006\n", "x" * 300, "\x00"))  # fmt: skip
    (root / "latest").write_text(value)
    harmless = value.strip() in ("step-0000004", "step-0000006")
    return f"latest -> {value!r:.40}", not harmless


@register("ckpt")
def _ck_symlink_out(rng, root):
    step = _ckpt_step(root)
    name = _pick(rng, ("state.safetensors", "state.json"))
    _symlink(step / name, root.parent / "outside" / "step-0000006" / name)
    return f"{name} -> outside", True


@register("ckpt")
def _ck_json_field(rng, root):
    step = _ckpt_step(root)
    meta = json.loads((step / "state.json").read_text())
    key = _pick(rng, sorted(meta))
    op = _pick(rng, ("delete", "replace", "nested"))
    if op == "delete":
        del meta[key]
        detail = f"delete {key}"
    elif op == "replace":
        meta[key] = _hostile_json_value(rng)
        detail = f"{key} = {meta[key]!r:.40}"
    else:
        sub = meta[key]
        if isinstance(sub, dict) and sub:
            k2 = _pick(rng, sorted(sub))
            sub[k2] = _hostile_json_value(rng)
            detail = f"{key}.{k2} = {sub[k2]!r:.40}"
        elif isinstance(sub, list) and sub:
            i = rng.randrange(len(sub))
            sub[i] = _hostile_json_value(rng)
            detail = f"{key}[{i}] = {sub[i]!r:.40}"
        else:
            meta[key] = _hostile_json_value(rng)
            detail = f"{key} = {meta[key]!r:.40}"
    (step / "state.json").write_text(json.dumps(meta))
    return detail, False, True


@register("ckpt")
def _ck_json_text(rng, root):
    step = _ckpt_step(root)
    text = _pick(rng, ("", "[]", "null", "{", "[" * 100000 + "]" * 100000, '{"phase": ' + "9" * 5000 + "}",
                       "NaN", "\ufeff{}", '{"a": 1, "a": 2}'))  # fmt: skip
    (step / "state.json").write_text(text)
    if rng.random() < 0.2:
        (step / "state.json").write_bytes(b"\xff\xfe\x00garbage")
        text = "invalid utf-8"
    return f"state.json = {text!r:.30}", True, True


@register("ckpt")
def _ck_config_mismatch(rng, root):
    step = _ckpt_step(root)
    meta = json.loads((step / "state.json").read_text())
    key = _pick(rng, ("rank", "density", "seed", "lr", "adapter", "method", "steps", "data", "device", "save_every"))
    old = meta["config"].get(key)
    meta["config"][key] = _pick(rng, (1, 2, 0.5, "x", None, 12345))
    (step / "state.json").write_text(json.dumps(meta))
    changed = meta["config"][key] != old and key not in ("device", "save_every")
    return f"config.{key}: {old!r} -> {meta['config'][key]!r}", changed, True


@register("ckpt")
def _ck_counters(rng, root):
    step = _ckpt_step(root)
    meta = json.loads((step / "state.json").read_text())
    key = _pick(rng, ("phase", "step", "global_step", "tokens", "cursor"))
    value = _pick(rng, HOSTILE_INTS + (3, 4, 7, 10**6))
    if key == "cursor":
        meta["cursor"][rng.randrange(2)] = value
    else:
        meta[key] = value
    (step / "state.json").write_text(json.dumps(meta))
    return f"{key} <- {value}", value < 0 or value >= 2**62, True


@register("ckpt")
def _ck_tensor_shape(rng, root):
    import torch

    st = _ckpt_step(root) / "state.safetensors"
    t = _st_tensors(st)
    name = _pick(rng, sorted(t))
    old = t[name]
    how = _pick(rng, ("grow", "shrink", "flatten", "dtype", "empty"))
    if how == "grow":
        t[name] = torch.cat([old.reshape(-1), old.reshape(-1)[:1]]) if old.numel() else torch.zeros(1, dtype=old.dtype)
    elif how == "shrink":
        t[name] = old.reshape(-1)[: max(0, old.numel() - 1)]
    elif how == "flatten":
        t[name] = old.reshape(1, -1)
    elif how == "dtype":
        t[name] = old.to(torch.float64 if old.dtype != torch.float64 else torch.float32)
    else:
        t[name] = old.new_zeros((0,))
    _st_save(st, t)
    return f"{name} {how}: {list(old.shape)} -> {list(t[name].shape)} {t[name].dtype}", True


@register("ckpt")
def _ck_tensor_set(rng, root):
    import torch

    st = _ckpt_step(root) / "state.safetensors"
    t = _st_tensors(st)
    how = _pick(rng, ("drop", "rename", "extra"))
    name = _pick(rng, sorted(t))
    if how == "drop":
        del t[name]
    elif how == "rename":
        t[name + ".x"] = t.pop(name)
    else:
        t[_pick(rng, ("opt.exp_avg.nope.A", "model.layers.0.self_attn.q_proj.Z", "x"))] = torch.zeros(3)
    _st_save(st, t)
    return f"{how} {name}", True


@register("ckpt")
def _ck_indices(rng, root):
    st = _ckpt_step(root) / "state.safetensors"
    t = _st_tensors(st)
    names = sorted(k for k in t if k.endswith((".row_ptr", ".col_idx")))
    name = _pick(rng, names)
    v = t[name].clone()
    i = rng.randrange(v.numel())
    v[i] = _pick(rng, (-1, 2**31 - 1, 10**6))
    t[name] = v
    _st_save(st, t)
    return f"{name}[{i}] = {int(v[i])}", True


@register("ckpt")
def _ck_values(rng, root):
    st = _ckpt_step(root) / "state.safetensors"
    t = _st_tensors(st)
    name = _pick(rng, sorted(k for k in t if t[k].is_floating_point()))
    v = t[name].clone()
    v.reshape(-1)[rng.randrange(v.numel())] = _pick(rng, (float("nan"), float("inf"), -float("inf")))
    t[name] = v
    _st_save(st, t)
    return f"non-finite value in {name}", True


@register("ckpt")
def _ck_st_header(rng, root):
    st = _ckpt_step(root) / "state.safetensors"
    header, data, _ = read_st(st)
    name = _pick(rng, sorted(k for k in header if k != "__metadata__"))
    before = json.dumps(header[name])
    how = _pick(rng, ("shape", "offsets", "dtype", "text"))
    if how == "shape":
        header[name]["shape"] = _pick(rng, ([2**40], [2**62, 2], [-1], [], [0]))
    elif how == "offsets":
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = _pick(rng, ([b, e + 2**40], [-8, e], [e, b], [0, e], [b, "x"]))
    elif how == "dtype":
        header[name]["dtype"] = _pick(rng, ("F64", "Q4", None, "I32"))
    else:
        write_st(st, _pick(rng, ("{", "[]", '{"a": ' + "9" * 5000 + "}", "[" * 10000)), data)
        return f"header text of {st.name}", True
    write_st(st, header, data)
    return f"{name} {how} = {header[name]}", json.dumps(header[name]) != before


# ------------------------------------------------------------------------------------------------ ONNX exports
# Layout under the sandbox: export/{model.onnx, model.onnx.data, sparsepack_onnx.json, adapters/a1.onnx_adapter}.


def _model_proto(root: Path):
    import onnx

    return onnx.load(str(root / "model.onnx"), load_external_data=False)


def _save_proto(root: Path, proto) -> None:
    (root / "model.onnx").write_bytes(proto.SerializeToString())


def _external(proto) -> list:
    from onnx import TensorProto

    return [t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]


def _meta(root: Path) -> dict:
    return json.loads((root / "sparsepack_onnx.json").read_text())


def _adapter_file(root: Path) -> Path:
    return root / _meta(root)["adapters"]["a1"]


@register("onnx")
def _ox_bytes(rng, root):
    f = _pick(rng, ("model.onnx", "model.onnx.data", "sparsepack_onnx.json", "adapters/a1.onnx_adapter"))
    return _bytes_damage(rng, root / f), False


@register("onnx")
def _ox_delete(rng, root):
    f = _pick(rng, ("model.onnx", "model.onnx.data", "sparsepack_onnx.json", "adapters/a1.onnx_adapter"))
    (root / f).unlink()
    return f"delete {f}", True


@register("onnx")
def _ox_ext_location(rng, root):
    proto = _model_proto(root)
    t = _pick(rng, _external(proto))
    outside = root.parent / "outside" / "model.onnx.data"
    value = _pick(rng, ("../outside/model.onnx.data", str(outside), "/etc/passwd", "", "nope.data", "adapters/..",
                        "a\x00b", "model.onnx", "./model.onnx.data", "adapters/../model.onnx.data"))  # fmt: skip
    for e in t.external_data:
        if e.key == "location":
            e.value = value
    _save_proto(root, proto)
    safe = value in ("./model.onnx.data", "adapters/../model.onnx.data")
    return f"{t.name} location = {value!r}", not safe and value != "model.onnx"


@register("onnx")
def _ox_ext_range(rng, root):
    proto = _model_proto(root)
    t = _pick(rng, _external(proto))
    key = _pick(rng, ("offset", "length"))
    value = _pick(rng, ("-1", "0", str(2**40), str(2**63), "x", "1.5", "12345678", "8"))
    found = False
    for e in t.external_data:
        if e.key == key:
            e.value, found = value, True
    if not found:
        e = t.external_data.add()
        e.key, e.value = key, value
    _save_proto(root, proto)
    return f"{t.name} {key} = {value}", False


@register("onnx")
def _ox_dims(rng, root):
    proto = _model_proto(root)
    t = _pick(rng, list(proto.graph.initializer))
    dims = _pick(rng, ([2**40], [2**31, 2**31], [-1, 4], [0], [3, 3], [2**62, 8]))
    del t.dims[:]
    t.dims.extend(dims)
    _save_proto(root, proto)
    return f"{t.name} dims = {dims}", True


@register("onnx")
def _ox_meta_field(rng, root):
    meta = _meta(root)
    key = _pick(rng, sorted(meta))
    value = _hostile_json_value(rng)
    if key == "layout" and rng.random() < 0.7:
        k2 = _pick(rng, sorted(meta["layout"]))
        meta["layout"][k2] = value
        detail = f"layout.{k2} = {value!r:.40}"
    elif rng.random() < 0.2:
        del meta[key]
        detail = f"delete {key}"
    else:
        meta[key] = value
        detail = f"{key} = {value!r:.40}"
    (root / "sparsepack_onnx.json").write_text(json.dumps(meta))
    return detail, False


@register("onnx")
def _ox_meta_text(rng, root):
    text = _pick(rng, ("", "[]", "{", "[" * 100000, '{"format_version": ' + "9" * 5000 + "}", "NaN"))
    (root / "sparsepack_onnx.json").write_text(text)
    return f"metadata = {text!r:.30}", True


@register("onnx")
def _ox_adapter_ref(rng, root):
    meta = _meta(root)
    if rng.random() < 0.5:
        name = _pick(rng, HOSTILE_NAMES)
        meta["adapters"] = {name: meta["adapters"]["a1"]}
        detail, must = f"adapter name {name!r:.40}", True
    else:
        path = _pick(rng, ("../outside/adapters/a1.onnx_adapter", str(root.parent / "outside" / "adapters" /
                                                                      "a1.onnx_adapter"),
                           "/etc/passwd", "adapters/../../outside/adapters/a1.onnx_adapter", "", "model.onnx.data",
                           "adapters/nope.onnx_adapter", "adapters"))  # fmt: skip
        meta["adapters"] = {"a1": path}
        detail, must = f"adapter path {path!r:.60}", path != "model.onnx.data"
    (root / "sparsepack_onnx.json").write_text(json.dumps(meta))
    return detail, must


@register("onnx")
def _ox_symlink_out(rng, root):
    name = _pick(rng, ("model.onnx", "model.onnx.data", "sparsepack_onnx.json", "adapters/a1.onnx_adapter",
                       "adapters"))  # fmt: skip
    _symlink(root / name, root.parent / "outside" / name)
    return f"{name} -> outside", True


@register("onnx")
def _ox_adapter_params(rng, root):
    import numpy as np
    import onnxruntime as ort

    from sparsepack.exporters.onnx_adapters import write_adapter

    path = _adapter_file(root)
    params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
    name = _pick(rng, sorted(params))
    how = _pick(rng, ("rename", "transpose", "dtype", "rank3", "extra", "same"))
    if how == "rename":
        params[_pick(rng, ("logits", "input_ids", "adapter_99_lora_A", "x"))] = params.pop(name)
    elif how == "transpose":
        params[name] = np.ascontiguousarray(params[name].T) if params[name].ndim == 2 else params[name][None]
    elif how == "dtype":
        params[name] = params[name].astype(np.float64 if params[name].dtype != np.float64 else np.float32)
    elif how == "rank3":
        params[name] = params[name][None]
    elif how == "extra":
        params["adapter_0_values_x"] = np.zeros(3, np.float32)
    write_adapter(path, params)
    return f"{how} {name}", how != "same"


# ------------------------------------------------------------------------------------------------ bases


def build_ckpt_base(directory: Path):
    """A RoSA checkpoint directory (latest = step 6, mid-train, with sparse supports) and a set-up Trainer."""
    import torch

    from sparsepack.config import TrainConfig
    from sparsepack.pipeline.data import completion_examples
    from sparsepack.pipeline.trainer import Trainer
    from sparsepack.runtime.loader import load
    from sparsepack.runtime.tokenizer import load_tokenizer
    from tests.factories import rtn_pack, tiny_llama

    directory = Path(directory)
    pack, _ = rtn_pack(tiny_llama(), directory / "pack")
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(120)]
    (directory / "c.txt").write_text("\n".join(lines))
    cfg = TrainConfig(data=str(directory / "c.txt"), adapter="a1", rank=2, density=0.02, steps=5, warmup_steps=2,
                      batch_size=2, grad_accum=1, seqlen=32, mask_samples=2, save_every=2, dropout=0.0)  # fmt: skip

    def make_trainer(ckpt_dir: Path | None) -> Trainer:
        model = load(pack, dtype=torch.float32)
        tok = load_tokenizer(pack)
        t = Trainer(model, tok, cfg, completion_examples(tok, cfg.data, cfg.seqlen), ckpt_dir, progress=False)
        t.setup()
        return t

    ckpt_dir = directory / "ckpt"
    ckpt_dir.mkdir()
    make_trainer(ckpt_dir).run()
    (ckpt_dir / "metrics.jsonl").unlink()
    assert (ckpt_dir / "latest").read_text() == "step-0000006", (ckpt_dir / "latest").read_text()
    return ckpt_dir, make_trainer(None)


def build_onnx_base(directory: Path) -> Path:
    """A tiny export in the layout ``sparsepack export`` writes: embedding -> linear + one adapter slot.

    Inputs ``input_ids``/``attention_mask`` int64 ``[B, T]`` and the slot ``adapter_0_lora_A`` ``[r, 8]`` /
    ``adapter_0_lora_B`` ``[16, r]`` (zero defaults); two weights in ``model.onnx.data``; one adapter ``a1``.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sparsepack.exporters.onnx_adapters import write_adapter
    from sparsepack.runtime.onnx_runtime import FORMAT, FORMAT_VERSION, METADATA_FILE

    root = Path(directory) / "export"
    (root / "adapters").mkdir(parents=True)
    V, H = 16, 8
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((V, H)).astype(np.float32), "embed"),
             numpy_helper.from_array(rng.standard_normal((H, V)).astype(np.float32), "head"),
             numpy_helper.from_array(np.zeros((1, H), np.float32), "adapter_0_lora_A"),
             numpy_helper.from_array(np.zeros((V, 1), np.float32), "adapter_0_lora_B")]  # fmt: skip
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "head"], ["base"]),
             helper.make_node("Transpose", ["adapter_0_lora_A"], ["At"], perm=[1, 0]),
             helper.make_node("Transpose", ["adapter_0_lora_B"], ["Bt"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "At"], ["hr"]),
             helper.make_node("MatMul", ["hr", "Bt"], ["delta"]),
             helper.make_node("Add", ["base", "delta"], ["logits"])]  # fmt: skip
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("adapter_0_lora_A", TensorProto.FLOAT, ["r0", H]),
              helper.make_tensor_value_info("adapter_0_lora_B", TensorProto.FLOAT, [V, "r0"])]  # fmt: skip
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])]
    graph = helper.make_graph(nodes, "tiny", inputs, out, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save_model(model, str(root / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=64)  # fmt: skip
    write_adapter(root / "adapters" / "a1.onnx_adapter",
                  {"adapter_0_lora_A": rng.standard_normal((2, H)).astype(np.float32),
                   "adapter_0_lora_B": rng.standard_normal((V, 2)).astype(np.float32)})  # fmt: skip
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": "model.onnx", "kv_cache": False,
            "layout": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 4},
            "adapters": {"a1": "adapters/a1.onnx_adapter"}, "vocab_size": V, "eos_token_id": 0,
            "pad_token_id": 1}  # fmt: skip
    (root / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    return root


def build_real_onnx_base(directory: Path) -> Path:
    """A real ``export --format onnx`` of a tiny pack with one swappable adapter ``a1`` (slow: ~20 s)."""
    from sparsepack.exporters.onnx import export_onnx
    from tests.factories import random_adapter, rtn_pack, tiny_llama

    model = tiny_llama()
    pack, _ = rtn_pack(model, Path(directory) / "pack", adapters={"a1": random_adapter(model)})
    export_onnx(pack, Path(directory) / "export", adapters=("a1",), validate=False)
    return Path(directory) / "export"


# ------------------------------------------------------------------------------------------------ running a case

_WATCH: list[str] = []  # absolute directory prefixes that must never be opened


def _audit(event: str, args: tuple) -> None:
    if _WATCH and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        for prefix in _WATCH:
            if path.startswith(prefix):
                _WATCH.clear()
                raise ReadOutside(f"opened {path}")


class ReadOutside(BaseException):
    """Raised by the audit hook when a file under the watched ``outside/`` directory is opened."""


_HOOKED = False


def _install_audit() -> None:
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True


def check_ckpt(root: Path, trainer) -> None:
    from sparsepack.pipeline import checkpoint as ckpt

    path = ckpt.latest_checkpoint(root)
    if path is not None:
        trainer.restore(path)


def check_onnx(root: Path) -> None:
    from sparsepack.runtime.onnx_runtime import OnnxModel

    m = OnnxModel(root)
    for name in m.adapters:
        m.set_adapter(name)


@dataclass
class CaseResult:
    target: str
    mutator: str
    detail: str
    sealed: bool
    must_fail: bool
    outcome: str
    error: str = ""
    seconds: float = 0.0

    @property
    def good(self) -> bool:
        return self.outcome in GOOD


def run_case(target: str, base: Path, work: Path, mutator: str, rng: random.Random, sealed: bool, trainer=None, *,
             timeout: float = 20.0, headroom: int = 2 << 30, keep: bool = False) -> CaseResult:  # fmt: skip
    """Copy ``base`` into a fresh sandbox (and a copy beside it as ``outside/``), mutate, read back, classify."""
    from sparsepack.formats.errors import FormatError

    _install_audit()
    sandbox = Path(tempfile.mkdtemp(prefix="case-", dir=work))
    try:
        root = sandbox / base.name
        shutil.copytree(base, root, symlinks=True)
        shutil.copytree(base, sandbox / "outside", symlinks=True)
        m = MUTATORS[target][mutator](rng, root)
        sealed = sealed and target == "ckpt" and not m.touched_record
        if sealed:
            seal_ckpt(root)
        must_fail = m.must_fail
        if target == "ckpt" and not sealed and not must_fail:
            must_fail = _ckpt_record_violated(root)
        before = snapshot(sandbox)
        start = time.perf_counter()
        _WATCH[:] = [str(sandbox / "outside") + os.sep]
        try:
            with no_unpickling(), memory_cap(headroom), deadline(timeout):
                check_ckpt(root, trainer) if target == "ckpt" else check_onnx(root)
            outcome, error = "ok", ""
        except FormatError as e:
            outcome, error = "typed", f"{type(e).__name__}: {e}"
        except CaseTimeout as e:
            outcome, error = "timeout", str(e)
        except Unpickled as e:
            outcome, error = "unpickled", str(e)
        except ReadOutside as e:
            outcome, error = "read_outside", str(e)
        except BaseException as e:  # noqa: BLE001 - anything else is a bug
            if isinstance(e, KeyboardInterrupt):
                raise
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            outcome, error = "untyped", f"{type(e).__name__}: {e}\n{''.join(tb[-4:])}"
        finally:
            _WATCH.clear()
        seconds = time.perf_counter() - start
        if outcome == "ok" and must_fail:
            outcome, error = "missed", "accepted damage the reader must refuse"
        after = snapshot(sandbox)
        changed = sorted(k for k, v in after.items() if before.get(k) != v) + sorted(set(before) - set(after))
        if changed and outcome not in ("untyped", "timeout"):
            outcome, error = "wrote", f"files created or changed by reading: {changed[:5]}"
        return CaseResult(target, mutator, m.detail, sealed, must_fail, outcome, error[:2000], round(seconds, 4))
    finally:
        if not keep:
            shutil.rmtree(sandbox, ignore_errors=True)


def _ckpt_record_violated(root: Path) -> bool:
    """The tensor file differs from what state.json records (size or sha256): resuming must refuse it."""
    from sparsepack.formats.manifest import sha256_file

    step = root / "step-0000006"
    try:
        rec = json.loads((step / "state.json").read_text())["files"]["state.safetensors"]
        st = step / "state.safetensors"
        return st.stat().st_size != rec["bytes"] or sha256_file(st) != rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no usable record: the mutation's own must_fail decides


def case_params(seed: int, i: int, names: list[str]) -> tuple[str, random.Random, bool]:
    rng = random.Random(seed * 1_000_003 + i)
    return names[rng.randrange(len(names))], rng, rng.random() < 0.6


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000, help="cases per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append", choices=TARGETS, help="only these targets (default: both)")
    ap.add_argument("--real-onnx", action="store_true", help="fuzz a real export of a tiny pack (not the tiny graph)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--case", type=int, default=None, help="replay only case number CASE")
    ap.add_argument("--keep", type=Path, default=None, help="with --case: keep the mutated sandbox here")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="fuzz-outputs-"))
    report: dict = {"seed": args.seed, "real_onnx": args.real_onnx, "targets": {}}
    bad_total = 0
    try:
        for target in args.target or TARGETS:
            trainer = None
            if target == "ckpt":
                base, trainer = build_ckpt_base(work / "ckpt-base")
            elif args.real_onnx:
                base = build_real_onnx_base(work / "onnx-base")
            else:
                base = build_onnx_base(work / "onnx-base")
            names = sorted(MUTATORS[target])
            outcomes: Counter = Counter()
            per_mutator: dict[str, Counter] = defaultdict(Counter)
            bad = []
            start = time.perf_counter()
            for i in [args.case] if args.case is not None else range(args.cases):
                mutator, rng, sealed = case_params(args.seed, i, names)
                r = run_case(target, base, work, mutator, rng, sealed, trainer, timeout=args.timeout,
                             keep=args.keep is not None)  # fmt: skip
                if args.keep is not None:
                    shutil.copytree(sorted(work.glob("case-*"))[-1], args.keep, symlinks=True, dirs_exist_ok=True)
                outcomes[r.outcome] += 1
                per_mutator[mutator][r.outcome] += 1
                if not r.good:
                    replay = (f"python benchmarks/fuzz_outputs.py --target {target} --seed {args.seed} --case {i}"
                              + " --real-onnx" * args.real_onnx)  # fmt: skip
                    bad.append({"case": i, **asdict(r), "replay": replay})
                    print(f"[{target} {i}] {r.outcome}: {mutator} {r.detail}\n    "
                          f"{r.error.splitlines()[0] if r.error else ''}", file=sys.stderr)  # fmt: skip
                done = sum(outcomes.values())
                if done % 200 == 0:
                    print(f"{target}: {done} cases, {dict(outcomes)}, {time.perf_counter() - start:.0f} s",
                          file=sys.stderr)  # fmt: skip
            bad_total += len(bad)
            report["targets"][target] = {
                "cases": sum(outcomes.values()), "seconds": round(time.perf_counter() - start, 1),
                "outcomes": dict(outcomes), "bad": len(bad),
                "by_mutator": {k: dict(v) for k, v in sorted(per_mutator.items())}, "bad_cases": bad[:100],
            }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    summary = {t: {k: v[k] for k in ("cases", "seconds", "outcomes", "bad")} for t, v in report["targets"].items()}
    print(json.dumps(summary, indent=2))
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
