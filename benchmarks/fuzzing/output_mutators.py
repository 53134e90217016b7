"""Mutators of valid stage outputs read back as input: ``ckpt`` (a finetune checkpoint) and ``onnx`` (an export).

One registration per mutator under its target (``MUTATORS[target]``). Each damages the sandbox copy in place and
says what it did and whether the reader must now refuse it (:class:`Mutation`). ``benchmarks/fuzz_outputs.py``
runs them at random; the hypothesis tests in ``tests/test_reliability_outputs.py`` draw from the same set.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fuzzing.hostile import HOSTILE_INTS, HOSTILE_NAMES, HOSTILE_VALUES, pick, read_st, symlink, write_st

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


def _bytes_damage(rng: random.Random, path: Path) -> str:
    raw = bytearray(path.read_bytes())
    kind = pick(rng, ("truncate", "flip", "append", "empty"))
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


def _hostile_json_value(rng: random.Random):
    return pick(rng, (*HOSTILE_VALUES, *HOSTILE_INTS))


# ------------------------------------------------------------------------------------------------ checkpoints
# Layout under the sandbox: ckpt/latest, ckpt/step-N/{state.json, state.safetensors}; outside/ holds a copy.


def _ckpt_step(root: Path) -> Path:
    return root / (root / "latest").read_text().strip()


def _st_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return dict(load_file(str(path)))


def _st_save(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


@register("ckpt")
def _ck_bytes(rng, root):
    step = _ckpt_step(root)
    f = pick(rng, (step / "state.safetensors", step / "state.json", root / "latest"))
    return _bytes_damage(rng, f), False


@register("ckpt")
def _ck_delete(rng, root):
    step = _ckpt_step(root)
    f = pick(rng, (step / "state.safetensors", step / "state.json", root / "latest", step))
    if f.is_dir():
        shutil.rmtree(f)
    else:
        f.unlink()
    return f"delete {f.relative_to(root)}", f.name != "latest"  # no latest: nothing to resume (a fresh start)


@register("ckpt")
def _ck_pointer(rng, root):
    value = pick(rng, ("../outside", "/etc", "step-9999999", "", "step-0000006/..", ".lock", "latest",
                        "step-0000004", "step-0000006\n", "x" * 300, "\x00"))  # fmt: skip
    (root / "latest").write_text(value)
    harmless = value.strip() in ("step-0000004", "step-0000006")
    return f"latest -> {value!r:.40}", not harmless


@register("ckpt")
def _ck_symlink_out(rng, root):
    step = _ckpt_step(root)
    name = pick(rng, ("state.safetensors", "state.json"))
    symlink(step / name, root.parent / "outside" / "step-0000006" / name)
    return f"{name} -> outside", True


@register("ckpt")
def _ck_json_field(rng, root):
    step = _ckpt_step(root)
    meta = json.loads((step / "state.json").read_text())
    key = pick(rng, sorted(meta))
    op = pick(rng, ("delete", "replace", "nested"))
    if op == "delete":
        del meta[key]
        detail = f"delete {key}"
    elif op == "replace":
        meta[key] = _hostile_json_value(rng)
        detail = f"{key} = {meta[key]!r:.40}"
    else:
        sub = meta[key]
        if isinstance(sub, dict) and sub:
            k2 = pick(rng, sorted(sub))
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
    text = pick(rng, ("", "[]", "null", "{", "[" * 100000 + "]" * 100000, '{"phase": ' + "9" * 5000 + "}",
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
    key = pick(rng, ("rank", "density", "seed", "lr", "adapter", "method", "steps", "data", "device", "save_every"))
    old = meta["config"].get(key)
    meta["config"][key] = pick(rng, (1, 2, 0.5, "x", None, 12345))
    (step / "state.json").write_text(json.dumps(meta))
    changed = meta["config"][key] != old and key not in ("device", "save_every")
    return f"config.{key}: {old!r} -> {meta['config'][key]!r}", changed, True


@register("ckpt")
def _ck_counters(rng, root):
    step = _ckpt_step(root)
    meta = json.loads((step / "state.json").read_text())
    key = pick(rng, ("phase", "step", "global_step", "tokens", "cursor"))
    value = pick(rng, HOSTILE_INTS + (3, 4, 7, 10**6))
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
    name = pick(rng, sorted(t))
    old = t[name]
    how = pick(rng, ("grow", "shrink", "flatten", "dtype", "empty"))
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
    how = pick(rng, ("drop", "rename", "extra"))
    name = pick(rng, sorted(t))
    if how == "drop":
        del t[name]
    elif how == "rename":
        t[name + ".x"] = t.pop(name)
    else:
        t[pick(rng, ("opt.exp_avg.nope.A", "model.layers.0.self_attn.q_proj.Z", "x"))] = torch.zeros(3)
    _st_save(st, t)
    return f"{how} {name}", True


@register("ckpt")
def _ck_indices(rng, root):
    st = _ckpt_step(root) / "state.safetensors"
    t = _st_tensors(st)
    names = sorted(k for k in t if k.endswith((".row_ptr", ".col_idx")))
    name = pick(rng, names)
    v = t[name].clone()
    i = rng.randrange(v.numel())
    v[i] = pick(rng, (-1, 2**31 - 1, 10**6))
    t[name] = v
    _st_save(st, t)
    return f"{name}[{i}] = {int(v[i])}", True


@register("ckpt")
def _ck_values(rng, root):
    st = _ckpt_step(root) / "state.safetensors"
    t = _st_tensors(st)
    name = pick(rng, sorted(k for k in t if t[k].is_floating_point()))
    v = t[name].clone()
    v.reshape(-1)[rng.randrange(v.numel())] = pick(rng, (float("nan"), float("inf"), -float("inf")))
    t[name] = v
    _st_save(st, t)
    return f"non-finite value in {name}", True


@register("ckpt")
def _ck_st_header(rng, root):
    st = _ckpt_step(root) / "state.safetensors"
    header, data, _ = read_st(st)
    name = pick(rng, sorted(k for k in header if k != "__metadata__"))
    before = json.dumps(header[name])
    how = pick(rng, ("shape", "offsets", "dtype", "text"))
    if how == "shape":
        header[name]["shape"] = pick(rng, ([2**40], [2**62, 2], [-1], [], [0]))
    elif how == "offsets":
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = pick(rng, ([b, e + 2**40], [-8, e], [e, b], [0, e], [b, "x"]))
    elif how == "dtype":
        header[name]["dtype"] = pick(rng, ("F64", "Q4", None, "I32"))
    else:
        write_st(st, pick(rng, ("{", "[]", '{"a": ' + "9" * 5000 + "}", "[" * 10000)), data)
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
    f = pick(rng, ("model.onnx", "model.onnx.data", "sparsepack_onnx.json", "adapters/a1.onnx_adapter"))
    return _bytes_damage(rng, root / f), False


@register("onnx")
def _ox_delete(rng, root):
    f = pick(rng, ("model.onnx", "model.onnx.data", "sparsepack_onnx.json", "adapters/a1.onnx_adapter"))
    (root / f).unlink()
    return f"delete {f}", True


@register("onnx")
def _ox_ext_location(rng, root):
    proto = _model_proto(root)
    t = pick(rng, _external(proto))
    outside = root.parent / "outside" / "model.onnx.data"
    value = pick(rng, ("../outside/model.onnx.data", str(outside), "/etc/passwd", "", "nope.data", "adapters/..",
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
    t = pick(rng, _external(proto))
    key = pick(rng, ("offset", "length"))
    value = pick(rng, ("-1", "0", str(2**40), str(2**63), "x", "1.5", "12345678", "8"))
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
    t = pick(rng, list(proto.graph.initializer))
    dims = pick(rng, ([2**40], [2**31, 2**31], [-1, 4], [0], [3, 3], [2**62, 8]))
    del t.dims[:]
    t.dims.extend(dims)
    _save_proto(root, proto)
    return f"{t.name} dims = {dims}", True


@register("onnx")
def _ox_meta_field(rng, root):
    meta = _meta(root)
    key = pick(rng, sorted(meta))
    value = _hostile_json_value(rng)
    if key == "layout" and rng.random() < 0.7:
        k2 = pick(rng, sorted(meta["layout"]))
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
    text = pick(rng, ("", "[]", "{", "[" * 100000, '{"format_version": ' + "9" * 5000 + "}", "NaN"))
    (root / "sparsepack_onnx.json").write_text(text)
    return f"metadata = {text!r:.30}", True


@register("onnx")
def _ox_adapter_ref(rng, root):
    meta = _meta(root)
    if rng.random() < 0.5:
        name = pick(rng, HOSTILE_NAMES)
        meta["adapters"] = {name: meta["adapters"]["a1"]}
        detail, must = f"adapter name {name!r:.40}", True
    else:
        path = pick(rng, ("../outside/adapters/a1.onnx_adapter", str(root.parent / "outside" / "adapters" /
                                                                      "a1.onnx_adapter"),
                           "/etc/passwd", "adapters/../../outside/adapters/a1.onnx_adapter", "", "model.onnx.data",
                           "adapters/nope.onnx_adapter", "adapters"))  # fmt: skip
        meta["adapters"] = {"a1": path}
        detail, must = f"adapter path {path!r:.60}", path != "model.onnx.data"
    (root / "sparsepack_onnx.json").write_text(json.dumps(meta))
    return detail, must


@register("onnx")
def _ox_symlink_out(rng, root):
    name = pick(rng, ("model.onnx", "model.onnx.data", "sparsepack_onnx.json", "adapters/a1.onnx_adapter",
                       "adapters"))  # fmt: skip
    symlink(root / name, root.parent / "outside" / name)
    return f"{name} -> outside", True


@register("onnx")
def _ox_adapter_params(rng, root):
    import numpy as np
    import onnxruntime as ort

    from sparsepack.exporters.onnx_adapters import write_adapter

    path = _adapter_file(root)
    params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
    name = pick(rng, sorted(params))
    how = pick(rng, ("rename", "transpose", "dtype", "rank3", "extra", "same"))
    if how == "rename":
        params[pick(rng, ("logits", "input_ids", "adapter_99_lora_A", "x"))] = params.pop(name)
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
