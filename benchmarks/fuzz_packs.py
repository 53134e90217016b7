"""Fuzz target for hostile or broken packs (issue 8): mutate a valid pack at random, then read and load it.

    python benchmarks/fuzz_packs.py --cases 3000 --seed 0 --json out/fuzz_packs.json [--family paths] [--no-load]
        [--forward]                                                          # a pack that loads must also run
    python benchmarks/fuzz_packs.py --case 1234 --seed 0 --keep /tmp/repro     # replay one case, keep its pack

Property checked on every case: ``read_pack(pack, verify)`` and then ``sparsepack.load(pack, verify)`` either
succeed (the mutation was harmless, e.g. a flipped byte inside tensor data with ``verify=False``) or raise a
:class:`sparsepack.formats.errors.FormatError` subclass; never another exception type, never a hang (per-case
alarm), never a large allocation (the address space is capped a little above its size before the case), never
an unpickle (``torch.load``/``pickle.load(s)`` patched to fail loudly), and nothing written anywhere (the case's
sandbox is compared before and after). Mutations that break a rule the reader must enforce (a symlink out of
the pack, an index out of range, a file that differs from the manifest, ...) must fail: passing them is a miss.

The mutators live here, one registration per mutator and grouped by family, so that the hypothesis tests in
``tests/test_reliability_fuzz.py`` draw from the same set (``FAMILIES``) with a shrinkable random source.
Outcomes: ``ok``, ``typed`` (good), and the bad ones ``untyped``, ``missed``, ``timeout``, ``wrote``,
``unpickled``. The JSON report counts them overall, per family and per mutator, and lists every bad case with
the command line that replays it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ itself off the path: its onnx.py and kernels.py would shadow those packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MANIFEST = "sparsepack.json"
CONFIG = "config.json"
MODEL = "model.safetensors"
AD = "adapters/ad1"
SPARSE = f"{AD}/sparse_adapter.safetensors"
LORA = f"{AD}/adapter_model.safetensors"
AD_META = f"{AD}/sparsepack_adapter.json"
PEFT_CFG = f"{AD}/adapter_config.json"
SAFETENSORS = (MODEL, SPARSE, LORA)
JSONS = (MANIFEST, CONFIG, AD_META, PEFT_CFG)
ALL_FILES = (*SAFETENSORS, *JSONS, "tokenizer.json", "tokenizer_config.json")
GOOD = ("ok", "typed")
BAD = ("untyped", "missed", "timeout", "wrote", "unpickled")


# ------------------------------------------------------------------------------------------------ registry


@dataclass
class Mutation:
    """What a mutator did to the pack."""

    mutator: str
    detail: str
    must_fail: bool = False  # the pack now breaks a rule the reader must enforce
    touched_manifest: bool = False  # the manifest itself was edited: do not re-seal it


Mutator = Callable[[random.Random, Path], Mutation]
MUTATORS: dict[str, Mutator] = {}
FAMILIES: dict[str, list[str]] = defaultdict(list)


def register(family: str) -> Callable[[Callable[[random.Random, Path], tuple]], Mutator]:
    """Register ``fn(rng, pack) -> (detail, must_fail[, touched_manifest])`` as mutator ``fn.__name__``."""

    def wrap(fn: Callable[[random.Random, Path], tuple]) -> Mutator:
        name = fn.__name__.lstrip("_")

        def mutator(rng: random.Random, pack: Path) -> Mutation:
            detail, must_fail, *rest = fn(rng, pack)
            return Mutation(name, detail, must_fail, bool(rest and rest[0]))

        MUTATORS[name] = mutator
        FAMILIES[family].append(name)
        return mutator

    return wrap


# ------------------------------------------------------------------------------------------------ file helpers

HOSTILE_INTS = (-1, 0, -(2**31), 2**31 - 1, 2**31, 2**40, 2**63, 2**64, -(2**63))
HOSTILE_VALUES = (None, True, False, -1, 0, 2**31, 2**40, 2**63, 2**64, 1.5, 1e308, -1e308, "", "x", "../../etc/passwd",
                  "/etc/passwd", [], {}, [1, 2], {"a": None})  # fmt: skip
HOSTILE_NAMES = ("../evil", "..", "a/b", "/abs", "", ".hidden", "x" * 65, "a\\b", "ad1/../..", "a\x00b", "\u202e",
                 " ", "a" * 1000)  # fmt: skip


def read_st(path: Path) -> tuple[dict, bytes, int]:
    """A safetensors file as (header dict, data section, header length)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :], n


def write_st(path: Path, header: dict | str, data: bytes) -> None:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def _json_nodes(obj: object, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_nodes(v, (*path, i))


def _parent(obj: object, path: tuple) -> object:
    for p in path[:-1]:
        obj = obj[p]
    return obj


def _deep_shuffle(obj: object, rng: random.Random) -> object:
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _deep_shuffle(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_deep_shuffle(v, rng) for v in obj]
    return obj


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


# ------------------------------------------------------------------------------------------------ bytes


@register("bytes")
def _truncate(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, ALL_FILES)
    f = pack / rel
    raw = f.read_bytes()
    cut = _pick(rng, [0, 1, 7, 8, 9, len(raw) // 2, len(raw) - 1, rng.randrange(max(len(raw), 1))])
    f.write_bytes(raw[: min(cut, len(raw) - 1)])
    return f"{rel} cut to {min(cut, len(raw) - 1)} of {len(raw)} bytes", False, rel == MANIFEST


@register("bytes")
def _flip(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, ALL_FILES)
    f = pack / rel
    data = bytearray(f.read_bytes())
    near_start = rng.random() < 0.5  # headers and JSON keys live at the start
    span = min(len(data), 512) if near_start else len(data)
    where = sorted({rng.randrange(span) for _ in range(rng.randint(1, 8))})
    for i in where:
        data[i] ^= rng.randint(1, 255)
    f.write_bytes(bytes(data))
    return f"{rel} bytes {where[:8]} flipped", False, rel == MANIFEST


@register("bytes")
def _append(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, ALL_FILES)
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    with open(pack / rel, "ab") as f:
        f.write(junk)
    return f"{rel} + {len(junk)} junk bytes", False, rel == MANIFEST


# ------------------------------------------------------------------------------------------------ safetensors headers


def _st_edit(rng: random.Random, pack: Path, edit: Callable[[dict, str, int], tuple[str, bool]]) -> tuple:
    rel = _pick(rng, SAFETENSORS)
    header, data, _n = read_st(pack / rel)
    name = _pick(rng, _tensor_names(header))
    detail, must_fail = edit(header, name, len(data))
    write_st(pack / rel, header, data)
    return f"{rel} {name}: {detail}", must_fail


@register("st_header")
def _st_shape(rng: random.Random, pack: Path) -> tuple:
    def edit(h: dict, name: str, _size: int) -> tuple[str, bool]:
        shape = _pick(rng, [[2**40, 2**20], [2**62, 2**62], [2**64], [-1, 4], [-(2**40)], [], [0], [1] * 64,
                            [*h[name]["shape"], 2], [3]])  # fmt: skip
        same = shape == h[name]["shape"]
        h[name]["shape"] = shape
        return f"shape -> {shape}", not same

    return _st_edit(rng, pack, edit)


@register("st_header")
def _st_offsets(rng: random.Random, pack: Path) -> tuple:
    def edit(h: dict, name: str, size: int) -> tuple[str, bool]:
        b, e = h[name]["data_offsets"]
        other = h[_pick(rng, _tensor_names(h))]["data_offsets"]
        offs = _pick(rng, [[size, size + e - b], [b + size, e + size], [-4, e - b - 4], [e, b], [0, 2**64],
                           [2**63, 2**63 + e - b], [b, e + 1], [b - 1, e - 1] if b else [1, e - b + 1],
                           [other[0], other[0] + e - b], [b], [b, e, 0], "0-4", [str(b), str(e)]])  # fmt: skip
        h[name]["data_offsets"] = offs
        # moving a tensor onto another one of the same size, or onto itself, is not detectable
        return f"data_offsets -> {offs}", offs not in ([b, e], other)

    return _st_edit(rng, pack, edit)


@register("st_header")
def _st_dtype(rng: random.Random, pack: Path) -> tuple:
    from sparsepack.formats.safetensors_check import DTYPE_BYTES

    def edit(h: dict, name: str, _size: int) -> tuple[str, bool]:
        old = h[name]["dtype"]
        new = _pick(rng, ["F64", "I64", "BOOL", "U8", "F8_E4M3", "U32", "BF16", "F32", "XYZ", None, 5, ""])
        h[name]["dtype"] = new
        resized = new not in DTYPE_BYTES or DTYPE_BYTES[new] != DTYPE_BYTES[old]
        return f"dtype {old} -> {new!r}", resized

    return _st_edit(rng, pack, edit)


@register("st_header")
def _st_drop(rng: random.Random, pack: Path) -> tuple:
    def edit(h: dict, name: str, _size: int) -> tuple[str, bool]:
        del h[name]
        return "entry removed", True

    return _st_edit(rng, pack, edit)


@register("st_header")
def _st_rename(rng: random.Random, pack: Path) -> tuple:
    def edit(h: dict, name: str, _size: int) -> tuple[str, bool]:
        new = _pick(rng, [*HOSTILE_NAMES, "model.layers.99.mlp.up_proj.qweight", "base_model.model.x.lora_A.weight",
                          name + ".values", name.upper()])  # fmt: skip
        h[new] = h.pop(name)
        return f"renamed to {new!r}", new != name

    return _st_edit(rng, pack, edit)


@register("st_header")
def _st_duplicate(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, SAFETENSORS)
    header, data, _n = read_st(pack / rel)
    name = _pick(rng, _tensor_names(header))
    entry = json.dumps(header[name])
    text = json.dumps(header)
    text = text[:-1] + f", {json.dumps(name)}: {entry}}}"  # the same key twice in one JSON object
    write_st(pack / rel, text, data)
    return f"{rel} {name} declared twice", True


@register("st_header")
def _st_length(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, SAFETENSORS)
    raw = bytearray((pack / rel).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    new = _pick(rng, [0, 1, 2, n - 1, n + 1, n + 8, len(raw), 2**63, 2**64 - 1, 100 * 2**20 + 1])
    raw[:8] = struct.pack("<Q", new)
    (pack / rel).write_bytes(bytes(raw))
    return f"{rel} header length {n} -> {new}", new not in (n, n - 1, n - 2, n - 3)  # may eat padding spaces


@register("st_header")
def _st_metadata(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, SAFETENSORS)
    header, data, _n = read_st(pack / rel)
    header["__metadata__"] = _pick(rng, [[1, 2], {"a": 1}, {"a": {"b": "c"}}, "x" * 1000, None, {"format": "pt"}])
    write_st(pack / rel, header, data)
    return f"{rel} __metadata__ -> {str(header['__metadata__'])[:40]}", False


@register("st_header")
def _st_text(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, SAFETENSORS)
    _header, data, _n = read_st(pack / rel)
    text = _pick(rng, ["[" * 100_000 + "]" * 100_000, '{"w": ' * 50_000, "[]", "null", '"x"', "{" + "9" * 5000 + "}",
                       '{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}', "\ufeff{}",
                       '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": 1}'])  # fmt: skip
    write_st(pack / rel, text, data)
    return f"{rel} header -> {text[:30]!r}...", True


# ------------------------------------------------------------------------------------------------ JSON


def _json_edit(rng: random.Random, pack: Path, rel: str | None, edit: Callable[[object], tuple[object, str]]) -> tuple:
    rel = rel or _pick(rng, JSONS)
    f = pack / rel
    obj, detail = edit(json.loads(f.read_text(encoding="utf-8")))
    f.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1), encoding="utf-8")
    return f"{rel}: {detail}", False, rel == MANIFEST


@register("json")
def _json_delete(rng: random.Random, pack: Path) -> tuple:
    def edit(obj):
        path = _pick(rng, list(_json_nodes(obj))[1:])
        del _parent(obj, path)[path[-1]]
        return obj, f"deleted {list(path)}"

    return _json_edit(rng, pack, None, edit)


@register("json")
def _json_replace(rng: random.Random, pack: Path) -> tuple:
    def edit(obj):
        path = _pick(rng, list(_json_nodes(obj))[1:])
        value = _pick(rng, HOSTILE_VALUES)
        _parent(obj, path)[path[-1]] = value
        return obj, f"{list(path)} -> {value!r}"

    return _json_edit(rng, pack, None, edit)


@register("json")
def _json_shuffle(rng: random.Random, pack: Path) -> tuple:
    return _json_edit(rng, pack, None, lambda obj: (_deep_shuffle(obj, rng), "keys shuffled at every level"))


@register("json")
def _json_duplicate_key(rng: random.Random, pack: Path) -> tuple:
    def edit(obj):
        key = _pick(rng, sorted(obj))
        value = _pick(rng, HOSTILE_VALUES)
        text = json.dumps(obj)
        return text[:-1] + f", {json.dumps(key)}: {json.dumps(value)}}}", f"{key!r} repeated as {value!r}"

    return _json_edit(rng, pack, None, edit)


@register("json")
def _json_text(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, JSONS)
    raw = _pick(rng, [b"", b"null", b"[]", b'"x"', b"[" * 100_000, b"{" + b'"a":{' * 50_000, b"\xff\xfe{}",
                      b'{"x": ' + b"9" * 5000 + b"}", b'{"x": NaN, "y": Infinity}', b"\xef\xbb\xbf{}",
                      b'{"format": "sparsepack", "format_version": 1e400}'])  # fmt: skip
    (pack / rel).write_bytes(raw)
    return f"{rel} -> {raw[:30]!r}", False, rel == MANIFEST


# ------------------------------------------------------------------------------------------------ config


SHAPE_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 320, "head_dim": 16}  # fmt: skip


@register("config")
def _config_dim(rng: random.Random, pack: Path) -> tuple:
    key = _pick(rng, [*SHAPE_DIMS, "max_position_embeddings", "rope_theta", "rms_norm_eps"])
    value = _pick(rng, [*HOSTILE_INTS, 1.5, "64", None, True, 3, 7, 1e308])

    def edit(cfg):
        cfg[key] = value
        return cfg, f"{key} -> {value!r}"

    detail, *_ = _json_edit(rng, pack, CONFIG, edit)
    # a dimension that sets a tensor shape, changed to any other value, must be refused
    harmless = (type(value) is int and value == SHAPE_DIMS[key]) if key in SHAPE_DIMS else True
    harmless |= key == "head_dim" and value is None  # then derived as hidden_size / heads = 16, the real value
    return detail, not harmless


@register("config")
def _config_quant(rng: random.Random, pack: Path) -> tuple:
    key = _pick(rng, ["bits", "group_size", "checkpoint_format", "quant_method", "desc_act", "sym"])
    value = _pick(rng, {
        "bits": [5, 0, -4, 4.0, "4", True, 2**40, None, 8, 3],
        "group_size": [0, -2, 7, 2**40, "32", 32.0, None, True, 64, -1],
        "checkpoint_format": ["gptq_v3", None, 1, "gptq_v2"],
        "quant_method": ["awq", "GPTQ", None, 1, "bitsandbytes"],
        "desc_act": ["yes", None, 1],
        "sym": ["no", None, 0],
    }[key])  # fmt: skip

    def edit(cfg):
        cfg["quantization_config"][key] = value
        return cfg, f"quantization_config.{key} -> {value!r}"

    detail, *_ = _json_edit(rng, pack, CONFIG, edit)
    # another bit width or group size changes every GPTQ tensor's shape; a non-integer one is not a GPTQ config
    return detail, key in ("bits", "group_size") or (key == "quant_method" and value != "GPTQ")


EVIL_MODULE = """
import pathlib
pathlib.Path(__file__).resolve().parent.parent.joinpath("REMOTE_CODE_RAN").write_text("executed")
raise SystemExit("remote code executed")
"""


@register("config")
def _config_remote_code(rng: random.Random, pack: Path) -> tuple:
    (pack / "evil.py").write_text(EVIL_MODULE)

    def edit(cfg):
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        if rng.random() < 0.5:
            cfg["model_type"] = "evil"
        return cfg, f"auto_map -> evil.py (model_type {cfg['model_type']})"

    detail, *_ = _json_edit(rng, pack, CONFIG, edit)
    return detail, "model_type evil" in detail


# ------------------------------------------------------------------------------------------------ paths


def _edit_manifest(pack: Path, fn: Callable[[dict], str]) -> str:
    data = json.loads((pack / MANIFEST).read_text())
    detail = fn(data)
    (pack / MANIFEST).write_text(json.dumps(data, indent=1))
    return detail


@register("paths")
def _adapter_name(rng: random.Random, pack: Path) -> tuple:
    name = _pick(rng, HOSTILE_NAMES)

    def fn(d: dict) -> str:
        d["adapters"][name] = d["adapters"].pop("ad1")
        return f"adapter 'ad1' renamed {name!r}"

    return _edit_manifest(pack, fn), True, True


@register("paths")
def _adapter_path(rng: random.Random, pack: Path) -> tuple:
    target = _pick(rng, ["../outside/adapters/ad1", str(pack.parent / "outside" / AD), "adapters/ad1/../../../outside/"
                         "adapters/ad1", "..", "/", "adapters/../../outside/adapters/ad1", ".", "", "adapters/ad1\x00",
                         "adapters/ad1/", "./adapters/ad1"])  # fmt: skip

    def fn(d: dict) -> str:
        d["adapters"]["ad1"]["path"] = target
        return f"adapter path -> {target!r}"

    return _edit_manifest(pack, fn), target not in ("adapters/ad1/", "./adapters/ad1"), True


@register("paths")
def _files_entry(rng: random.Random, pack: Path) -> tuple:
    outside = pack.parent / "outside"
    rel = _pick(rng, ["../outside/config.json", str(outside / CONFIG), "adapters/../../outside/config.json",
                      "config.json\x00", "../../../../../../etc/hostname", "~/x"])  # fmt: skip

    def fn(d: dict) -> str:
        data = (outside / CONFIG).read_bytes()
        d["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        return f"manifest lists {rel!r}"

    return _edit_manifest(pack, fn), True, True


def _symlink(link: Path, target: str | Path) -> None:
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(target, link)


@register("paths")
def _symlink_out(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, [*ALL_FILES, AD, "adapters"])
    outside = pack.parent / "outside" / rel  # a valid copy: only the link itself is wrong
    target = _pick(rng, [outside, os.path.relpath(outside, (pack / rel).parent)])
    _symlink(pack / rel, target)
    return f"{rel} -> {target}", True


@register("paths")
def _symlink_broken(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, [*SAFETENSORS, CONFIG, AD_META, AD])
    kind = _pick(rng, ["dangling", "loop", "dev"])
    target = {"dangling": pack / "nowhere", "loop": pack / rel, "dev": "/dev/zero"}[kind]
    _symlink(pack / rel, target)
    return f"{rel} -> {kind} {target}", True


@register("paths")
def _symlink_inside(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, [*SAFETENSORS, CONFIG, AD_META])
    moved = (pack / rel).with_name("real-" + Path(rel).name)
    (pack / rel).rename(moved)
    os.symlink(moved.name, pack / rel)  # relative, stays inside the pack: allowed
    return f"{rel} -> {moved.name} (inside)", False


@register("paths")
def _index_escape(rng: random.Random, pack: Path) -> tuple:
    header, _data, _n = read_st(pack / MODEL)
    shard = _pick(rng, ["../outside/model.safetensors", str(pack.parent / "outside" / MODEL), "model.safetensors",
                        "adapters/../../outside/model.safetensors", 5, None, ""])  # fmt: skip
    index = {"metadata": {"total_size": 1}, "weight_map": {k: shard for k in _tensor_names(header)}}
    if rng.random() < 0.5:
        (pack / MODEL).unlink()
    (pack / "model.safetensors.index.json").write_text(json.dumps(index))
    return f"index points every tensor at {shard!r}", shard != "model.safetensors"


class _Bomb:
    def __reduce__(self):
        return (exec, ("raise SystemExit('a pickle was unpickled')",))


PICKLE_BOMB = pickle.dumps(_Bomb())  # raises SystemExit if anything ever unpickles it


@register("paths")
def _pickle_only(rng: random.Random, pack: Path) -> tuple:
    name = _pick(rng, ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl"])
    (pack / name).write_bytes(PICKLE_BOMB)
    dropped = rng.random() < 0.7
    if dropped:
        (pack / MODEL).unlink()
    return f"{name} added{', model.safetensors removed' if dropped else ''}", dropped


@register("paths")
def _delete(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, [*ALL_FILES, AD, "adapters"])
    if (pack / rel).is_dir():
        shutil.rmtree(pack / rel)
    else:
        (pack / rel).unlink()
    return f"{rel} deleted", rel in (*SAFETENSORS, CONFIG, AD_META, AD, "adapters")


# ------------------------------------------------------------------------------------------------ tensor values


def _poke(rng: random.Random, pack: Path, rel: str, suffix: str, values: Callable[[int], list[int]]) -> tuple:
    """Overwrite a few int32 elements of one tensor whose name ends with ``suffix`` with one of ``values(count)``."""
    header, data, _n = read_st(pack / rel)
    name = _pick(rng, [k for k in _tensor_names(header) if k.endswith(suffix)])
    b, e = header[name]["data_offsets"]
    count = (e - b) // 4
    data = bytearray(data)
    bad = _pick(rng, values(count))
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(count)
        data[b + 4 * i : b + 4 * i + 4] = struct.pack("<i", bad)
    write_st(pack / rel, header, bytes(data))
    return name, bad


@register("values")
def _gidx_out_of_range(rng: random.Random, pack: Path) -> tuple:
    # g_idx has K entries and the fixture's group size is 32, so G = K / 32 groups
    name, bad = _poke(rng, pack, MODEL, ".g_idx", lambda k: [-1, k // 32, k // 32 + 1, 2**31 - 1, -(2**31)])
    return f"{name} element -> {bad}", True


@register("values")
def _csr_col_out_of_range(rng: random.Random, pack: Path) -> tuple:
    # in_features is 64, except 128 for down_proj
    name, bad = _poke(rng, pack, SPARSE, ".col_idx", lambda _n: [-1, 64, 128, 2**31 - 1, -(2**31)])
    return f"{name} element -> {bad}", bad < 0 or bad >= 128 or "down_proj" not in name


@register("values")
def _csr_row_ptr(rng: random.Random, pack: Path) -> tuple:
    name, bad = _poke(rng, pack, SPARSE, ".row_ptr", lambda _n: [-1, 2**31 - 1, -(2**31), 100_000])
    return f"{name} element -> {bad}", True


@register("values")
def _float_garbage(rng: random.Random, pack: Path) -> tuple:
    rel = _pick(rng, SAFETENSORS)
    header, data, _n = read_st(pack / rel)
    floats = [k for k in _tensor_names(header) if header[k]["dtype"] in ("F16", "F32")]
    name = _pick(rng, floats)
    b, e = header[name]["data_offsets"]
    data = bytearray(data)
    data[b:e] = bytes([0xFF]) * (e - b)  # all NaN
    write_st(pack / rel, header, bytes(data))
    return f"{rel} {name} -> NaN", False


@register("values")
def _packed_garbage(rng: random.Random, pack: Path) -> tuple:
    header, data, _n = read_st(pack / MODEL)
    name = _pick(rng, [k for k in _tensor_names(header) if k.endswith((".qweight", ".qzeros"))])
    b, e = header[name]["data_offsets"]
    data = bytearray(data)
    data[b:e] = bytes(rng.randrange(256) for _ in range(e - b))
    write_st(pack / MODEL, header, bytes(data))
    return f"{name} random bits", False  # any bit pattern is a valid GPTQ word


# ------------------------------------------------------------------------------------------------ running a case


class CaseTimeout(BaseException):
    """Raised by the per-case alarm; a BaseException so that no ``except Exception`` in the reader swallows it."""


class Unpickled(BaseException):
    """Raised by the patched ``torch.load`` / ``pickle.load(s)``."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`CaseTimeout` after ``seconds`` (main thread only; elsewhere a no-op)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(_signum, _frame):
        raise CaseTimeout(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _vm_size() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def memory_cap(headroom: int) -> Iterator[None]:
    """Cap the address space at its current size + ``headroom`` bytes: any large allocation fails at once.

    The packs fuzzed here are ~150 KB, so a reader that tries to allocate more than the headroom is acting on
    a size it read from the file without checking it. The soft limit is restored afterwards.
    """
    vm = _vm_size()
    if headroom <= 0 or vm is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def no_unpickling() -> Iterator[None]:
    """``torch.load`` and ``pickle.load(s)`` raise :class:`Unpickled`, except when numba reads its own JIT cache.

    numba's ``cache=True`` keeps compiled kernels as pickles in the package's ``__pycache__``: files written by
    this installation, as trusted as its ``.pyc`` files, never a file of the pack (see docs/RELIABILITY.md).
    """
    import torch

    real_load, real_loads = pickle.load, pickle.loads

    def from_numba() -> bool:
        return sys._getframe(2).f_globals.get("__name__", "").startswith("numba.")

    def load(f, *a, **k):
        if from_numba():
            return real_load(f, *a, **k)
        raise Unpickled(f"pickle.load({getattr(f, 'name', '?')}) was called")

    def loads(data, *a, **k):
        if from_numba():
            return real_loads(data, *a, **k)
        raise Unpickled("pickle.loads was called")

    def refuse(*_a, **_k):
        raise Unpickled("torch.load was called")

    saved = (torch.load, pickle.load, pickle.loads)
    torch.load, pickle.load, pickle.loads = refuse, load, loads
    try:
        yield
    finally:
        torch.load, pickle.load, pickle.loads = saved


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` (symlinks not followed) with its type, size and mtime."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def seal(pack: Path) -> None:
    """Rewrite the manifest's ``files`` to match the (mutated) files, so that deeper checks are reached."""
    from sparsepack.formats.manifest import sha256_file

    try:
        data = json.loads((pack / MANIFEST).read_text(encoding="utf-8"))
        data["files"] = {}
    except (OSError, ValueError, TypeError):
        return
    for dirpath, _dirs, files in os.walk(pack):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(pack).as_posix()
            if rel != MANIFEST and p.is_file():
                with contextlib.suppress(OSError):
                    data["files"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    (pack / MANIFEST).write_text(json.dumps(data, indent=1))


def manifest_violated(pack: Path, verify: bool) -> bool:
    """True when the pack differs from what its manifest records (in a way ``verify`` covers), or it has none."""
    from sparsepack.formats.manifest import Manifest, sha256_file

    if not (pack / MANIFEST).is_file():
        return False  # read as a foreign checkpoint: nothing recorded to violate
    try:
        m = Manifest.read(pack / MANIFEST)
    except Exception:  # noqa: BLE001 - any manifest the reader cannot parse must make it fail
        return True
    for rel, info in m.files.items():
        p = pack / rel
        try:
            if not p.is_file() or p.stat().st_size != info["bytes"]:
                return True
            if verify and sha256_file(p) != info["sha256"]:
                return True
        except (OSError, ValueError):
            return True
    return False


@dataclass
class CaseResult:
    mutator: str
    detail: str
    verify: bool
    sealed: bool
    must_fail: bool
    outcome: str  # ok | typed | untyped | missed | timeout | wrote | unpickled
    error: str = ""
    seconds: float = 0.0

    @property
    def good(self) -> bool:
        return self.outcome in GOOD


def build_base(directory: Path) -> Path:
    """A valid tiny pack (2-layer Llama, 4-bit RTN, one adapter with low-rank and sparse parts) + nothing else."""
    from tests.factories import random_adapter, rtn_pack, tiny_llama

    model = tiny_llama()
    path, _ref = rtn_pack(model, Path(directory) / "base", adapters={"ad1": random_adapter(model)})
    return path


def check_pack(pack: Path, verify: bool, load: bool, timeout: float, headroom: int,
               forward: bool = False) -> tuple[str, str]:  # fmt: skip
    """Read (and load, and run) ``pack``; returns (outcome, error text): ok | typed | untyped | timeout | unpickled.

    With ``forward``, a pack that loads must also run: one forward pass with every adapter active.
    """
    import sparsepack
    from sparsepack.formats.errors import FormatError
    from sparsepack.formats.pack import read_pack

    try:
        with no_unpickling(), memory_cap(headroom), deadline(timeout):
            read_pack(pack, verify=verify)
            if load:
                model = sparsepack.load(pack, verify=verify)
                if forward:
                    import torch

                    from sparsepack.layers.inject import set_active_adapters

                    set_active_adapters(model, list(model.sparsepack.pack.adapters))
                    with torch.no_grad():
                        model(torch.tensor([[1, 2, 3, 4]]))
    except FormatError as e:
        return "typed", f"{type(e).__name__}: {e}"
    except CaseTimeout as e:
        return "timeout", str(e)
    except Unpickled as e:
        return "unpickled", str(e)
    except BaseException as e:  # noqa: BLE001 - the point is to classify anything else as a bug
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        return "untyped", f"{type(e).__name__}: {e}\n{''.join(tb[-4:])}"
    return "ok", ""


def run_case(base: Path, work: Path, mutator: str, rng: random.Random, verify: bool, sealed: bool, *,
             load: bool = True, forward: bool = False, timeout: float = 20.0, headroom: int = 2 << 30,
             keep: bool = False) -> CaseResult:  # fmt: skip
    """Copy ``base`` into a fresh sandbox under ``work``, mutate it, and check the property."""
    sandbox = Path(tempfile.mkdtemp(prefix="case-", dir=work))
    try:
        pack = sandbox / "pack"
        shutil.copytree(base, pack, symlinks=True)
        shutil.copytree(base, sandbox / "outside", symlinks=True)
        m = MUTATORS[mutator](rng, pack)
        sealed = sealed and not m.touched_manifest
        if sealed:
            seal(pack)
        must_fail = m.must_fail or manifest_violated(pack, verify)
        before = snapshot(sandbox)
        start = time.perf_counter()
        outcome, error = check_pack(pack, verify, load, timeout, headroom, forward)
        seconds = time.perf_counter() - start
        if outcome == "ok" and must_fail:
            outcome, error = "missed", "the reader accepted a pack that breaks a rule it must enforce"
        changed = sorted(k for k, v in snapshot(sandbox).items() if before.get(k) != v)
        changed += sorted(set(before) - set(snapshot(sandbox)))
        if changed and outcome not in ("untyped", "timeout"):
            outcome, error = "wrote", f"files created or changed by reading: {changed[:5]}"
        return CaseResult(mutator, m.detail, verify, sealed, must_fail, outcome, error[:2000], round(seconds, 4))
    finally:
        if not keep:
            shutil.rmtree(sandbox, ignore_errors=True)


def case_params(seed: int, i: int, names: list[str]) -> tuple[str, random.Random, bool, bool]:
    """Mutator, random source, verify and seal of case ``i``: a pure function of (seed, i)."""
    rng = random.Random(seed * 1_000_003 + i)
    return names[rng.randrange(len(names))], rng, rng.random() < 0.5, rng.random() < 0.7


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families")
    ap.add_argument("--no-load", action="store_true", help="read_pack only, skip sparsepack.load")
    ap.add_argument("--forward", action="store_true", help="a pack that loads must also run one forward pass")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--case", type=int, default=None, help="replay only case number CASE")
    ap.add_argument("--keep", type=Path, default=None, help="with --case: keep the mutated sandbox here")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    names = sorted(n for f in (args.family or sorted(FAMILIES)) for n in FAMILIES[f])
    family_of = {n: f for f, ns in FAMILIES.items() for n in ns}
    work = Path(tempfile.mkdtemp(prefix="fuzz-packs-"))
    base = build_base(work)
    indices = [args.case] if args.case is not None else range(args.cases)
    outcomes: Counter = Counter()
    per_family: dict[str, Counter] = defaultdict(Counter)
    per_mutator: dict[str, Counter] = defaultdict(Counter)
    bad = []
    start = time.perf_counter()
    try:
        for i in indices:
            mutator, rng, verify, sealed = case_params(args.seed, i, names)
            keep = args.keep is not None
            r = run_case(base, work, mutator, rng, verify, sealed, load=not args.no_load, forward=args.forward,
                         timeout=args.timeout, keep=keep)  # fmt: skip
            if keep:
                kept = sorted(work.glob("case-*"))[-1]
                shutil.copytree(kept, args.keep, symlinks=True, dirs_exist_ok=True)
            outcomes[r.outcome] += 1
            per_family[family_of[mutator]][r.outcome] += 1
            per_mutator[mutator][r.outcome] += 1
            if not r.good:
                flags = " --no-load" * args.no_load + " --forward" * args.forward
                replay = f"python benchmarks/fuzz_packs.py --seed {args.seed} --case {i}{flags}"
                bad.append({"case": i, **asdict(r), "replay": replay})
                print(f"[{i}] {r.outcome}: {mutator} {r.detail}\n    {r.error.splitlines()[0] if r.error else ''}",
                      file=sys.stderr)  # fmt: skip
            done = sum(outcomes.values())
            if done % 100 == 0:
                print(f"{done} cases, {dict(outcomes)}, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "cases": sum(outcomes.values()),
        "seed": args.seed,
        "load": not args.no_load,
        "forward": args.forward,
        "seconds": round(time.perf_counter() - start, 1),
        "outcomes": dict(outcomes),
        "bad": len(bad),
        "by_family": {k: dict(v) for k, v in sorted(per_family.items())},
        "by_mutator": {k: dict(v) for k, v in sorted(per_mutator.items())},
        "bad_cases": bad[:200],
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps({k: report[k] for k in ("cases", "seconds", "outcomes", "bad", "by_family")}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
