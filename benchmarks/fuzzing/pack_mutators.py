"""Mutators of a valid pack, one registration each, grouped by family (``FAMILIES``).

Each takes a random source and the pack directory, damages the pack in place, and says what it did and whether
the pack now breaks a rule the reader must enforce (:class:`Mutation`). ``benchmarks/fuzz_packs.py`` runs them
at random; the hypothesis tests in ``tests/test_reliability_fuzz.py`` draw from the same set with a shrinkable
random source. The base pack is ``tests.factories``' tiny 2-layer Llama with one adapter ``ad1``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import struct
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fuzzing.hostile import HOSTILE_INTS, HOSTILE_NAMES, HOSTILE_VALUES, pick, read_st, symlink, write_st

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


# ------------------------------------------------------------------------------------------------ helpers


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


# ------------------------------------------------------------------------------------------------ bytes


@register("bytes")
def _truncate(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, ALL_FILES)
    f = pack / rel
    raw = f.read_bytes()
    cut = pick(rng, [0, 1, 7, 8, 9, len(raw) // 2, len(raw) - 1, rng.randrange(max(len(raw), 1))])
    f.write_bytes(raw[: min(cut, len(raw) - 1)])
    return f"{rel} cut to {min(cut, len(raw) - 1)} of {len(raw)} bytes", False, rel == MANIFEST


@register("bytes")
def _flip(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, ALL_FILES)
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
    rel = pick(rng, ALL_FILES)
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    with open(pack / rel, "ab") as f:
        f.write(junk)
    return f"{rel} + {len(junk)} junk bytes", False, rel == MANIFEST


# ------------------------------------------------------------------------------------------------ safetensors headers


def _st_edit(rng: random.Random, pack: Path, edit: Callable[[dict, str, int], tuple[str, bool]]) -> tuple:
    rel = pick(rng, SAFETENSORS)
    header, data, _n = read_st(pack / rel)
    name = pick(rng, _tensor_names(header))
    detail, must_fail = edit(header, name, len(data))
    write_st(pack / rel, header, data)
    return f"{rel} {name}: {detail}", must_fail


@register("st_header")
def _st_shape(rng: random.Random, pack: Path) -> tuple:
    def edit(h: dict, name: str, _size: int) -> tuple[str, bool]:
        shape = pick(rng, [[2**40, 2**20], [2**62, 2**62], [2**64], [-1, 4], [-(2**40)], [], [0], [1] * 64,
                            [1] * 100_000, [*h[name]["shape"], 2], [3]])  # fmt: skip
        same = shape == h[name]["shape"]
        h[name]["shape"] = shape
        return f"shape -> {shape}", not same

    return _st_edit(rng, pack, edit)


@register("st_header")
def _st_offsets(rng: random.Random, pack: Path) -> tuple:
    def edit(h: dict, name: str, size: int) -> tuple[str, bool]:
        b, e = h[name]["data_offsets"]
        other = h[pick(rng, _tensor_names(h))]["data_offsets"]
        offs = pick(rng, [[size, size + e - b], [b + size, e + size], [-4, e - b - 4], [e, b], [0, 2**64],
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
        new = pick(rng, ["F64", "I64", "BOOL", "U8", "F8_E4M3", "U32", "BF16", "F32", "XYZ", None, 5, ""])
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
        new = pick(rng, [*HOSTILE_NAMES, "model.layers.99.mlp.up_proj.qweight", "base_model.model.x.lora_A.weight",
                          name + ".values", name.upper()])  # fmt: skip
        h[new] = h.pop(name)
        return f"renamed to {new!r}", new != name

    return _st_edit(rng, pack, edit)


@register("st_header")
def _st_duplicate(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, SAFETENSORS)
    header, data, _n = read_st(pack / rel)
    name = pick(rng, _tensor_names(header))
    entry = json.dumps(header[name])
    text = json.dumps(header)
    text = text[:-1] + f", {json.dumps(name)}: {entry}}}"  # the same key twice in one JSON object
    write_st(pack / rel, text, data)
    return f"{rel} {name} declared twice", True


@register("st_header")
def _st_length(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, SAFETENSORS)
    raw = bytearray((pack / rel).read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    new = pick(rng, [0, 1, 2, n - 1, n + 1, n + 8, len(raw), 2**63, 2**64 - 1, 100 * 2**20 + 1])
    raw[:8] = struct.pack("<Q", new)
    (pack / rel).write_bytes(bytes(raw))
    return f"{rel} header length {n} -> {new}", new not in (n, n - 1, n - 2, n - 3)  # may eat padding spaces


@register("st_header")
def _st_metadata(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, SAFETENSORS)
    header, data, _n = read_st(pack / rel)
    header["__metadata__"] = pick(rng, [[1, 2], {"a": 1}, {"a": {"b": "c"}}, "x" * 1000, None, {"format": "pt"}])
    write_st(pack / rel, header, data)
    return f"{rel} __metadata__ -> {str(header['__metadata__'])[:40]}", False


@register("st_header")
def _st_text(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, SAFETENSORS)
    _header, data, _n = read_st(pack / rel)
    text = pick(rng, ["[" * 100_000 + "]" * 100_000, '{"w": ' * 50_000, "[]", "null", '"x"', "{" + "9" * 5000 + "}",
                       '{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}', "\ufeff{}",
                       '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": 1}'])  # fmt: skip
    write_st(pack / rel, text, data)
    return f"{rel} header -> {text[:30]!r}...", True


# ------------------------------------------------------------------------------------------------ JSON


def _json_edit(rng: random.Random, pack: Path, rel: str | None, edit: Callable[[object], tuple[object, str]]) -> tuple:
    rel = rel or pick(rng, JSONS)
    f = pack / rel
    obj, detail = edit(json.loads(f.read_text(encoding="utf-8")))
    f.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1), encoding="utf-8")
    return f"{rel}: {detail}", False, rel == MANIFEST


@register("json")
def _json_delete(rng: random.Random, pack: Path) -> tuple:
    def edit(obj):
        path = pick(rng, list(_json_nodes(obj))[1:])
        del _parent(obj, path)[path[-1]]
        return obj, f"deleted {list(path)}"

    return _json_edit(rng, pack, None, edit)


@register("json")
def _json_replace(rng: random.Random, pack: Path) -> tuple:
    def edit(obj):
        path = pick(rng, list(_json_nodes(obj))[1:])
        value = pick(rng, HOSTILE_VALUES)
        _parent(obj, path)[path[-1]] = value
        return obj, f"{list(path)} -> {value!r}"

    return _json_edit(rng, pack, None, edit)


@register("json")
def _json_shuffle(rng: random.Random, pack: Path) -> tuple:
    return _json_edit(rng, pack, None, lambda obj: (_deep_shuffle(obj, rng), "keys shuffled at every level"))


@register("json")
def _json_duplicate_key(rng: random.Random, pack: Path) -> tuple:
    def edit(obj):
        key = pick(rng, sorted(obj))
        value = pick(rng, HOSTILE_VALUES)
        text = json.dumps(obj)
        return text[:-1] + f", {json.dumps(key)}: {json.dumps(value)}}}", f"{key!r} repeated as {value!r}"

    detail, _must_fail, edited_manifest = _json_edit(rng, pack, None, edit)
    return detail, True, edited_manifest  # every JSON of a pack goes through read_json, which refuses duplicates


@register("json")
def _json_text(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, JSONS)
    raw = pick(rng, [b"", b"null", b"[]", b'"x"', b"[" * 100_000, b"{" + b'"a":{' * 50_000, b"\xff\xfe{}",
                      b'{"x": ' + b"9" * 5000 + b"}", b'{"x": NaN, "y": Infinity}', b"\xef\xbb\xbf{}",
                      b'{"format": "sparsepack", "format_version": 1e400}'])  # fmt: skip
    (pack / rel).write_bytes(raw)
    return f"{rel} -> {raw[:30]!r}", False, rel == MANIFEST


# ------------------------------------------------------------------------------------------------ config


SHAPE_DIMS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 320, "head_dim": 16}  # fmt: skip


@register("config")
def _config_dim(rng: random.Random, pack: Path) -> tuple:
    key = pick(rng, [*SHAPE_DIMS, "max_position_embeddings", "rope_theta", "rms_norm_eps"])
    value = pick(rng, [*HOSTILE_INTS, 1.5, "64", None, True, 3, 7, 1e308])

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
    key = pick(rng, ["bits", "group_size", "checkpoint_format", "quant_method", "desc_act", "sym"])
    value = pick(rng, {
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
    name = pick(rng, HOSTILE_NAMES)

    def fn(d: dict) -> str:
        d["adapters"][name] = d["adapters"].pop("ad1")
        return f"adapter 'ad1' renamed {name!r}"

    return _edit_manifest(pack, fn), True, True


@register("paths")
def _adapter_path(rng: random.Random, pack: Path) -> tuple:
    target = pick(rng, ["../outside/adapters/ad1", str(pack.parent / "outside" / AD), "adapters/ad1/../../../outside/"
                         "adapters/ad1", "..", "/", "adapters/../../outside/adapters/ad1", ".", "", "adapters/ad1\x00",
                         "adapters/ad1/", "./adapters/ad1"])  # fmt: skip

    def fn(d: dict) -> str:
        d["adapters"]["ad1"]["path"] = target
        return f"adapter path -> {target!r}"

    return _edit_manifest(pack, fn), target not in ("adapters/ad1/", "./adapters/ad1"), True


@register("paths")
def _files_entry(rng: random.Random, pack: Path) -> tuple:
    outside = pack.parent / "outside"
    rel = pick(rng, ["../outside/config.json", str(outside / CONFIG), "adapters/../../outside/config.json",
                      "config.json\x00", "../../../../../../etc/hostname", "~/x"])  # fmt: skip

    def fn(d: dict) -> str:
        data = (outside / CONFIG).read_bytes()
        d["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        return f"manifest lists {rel!r}"

    return _edit_manifest(pack, fn), True, True


@register("paths")
def _symlink_out(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, [*ALL_FILES, AD, "adapters"])
    outside = pack.parent / "outside" / rel  # a valid copy: only the link itself is wrong
    target = pick(rng, [outside, os.path.relpath(outside, (pack / rel).parent)])
    symlink(pack / rel, target)
    return f"{rel} -> {target}", True


@register("paths")
def _symlink_broken(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, [*SAFETENSORS, CONFIG, AD_META, AD])
    kind = pick(rng, ["dangling", "loop", "dev"])
    target = {"dangling": pack / "nowhere", "loop": pack / rel, "dev": "/dev/zero"}[kind]
    symlink(pack / rel, target)
    return f"{rel} -> {kind} {target}", True


@register("paths")
def _symlink_inside(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, [*SAFETENSORS, CONFIG, AD_META])
    moved = (pack / rel).with_name("real-" + Path(rel).name)
    (pack / rel).rename(moved)
    os.symlink(moved.name, pack / rel)  # relative, stays inside the pack: allowed
    return f"{rel} -> {moved.name} (inside)", False


@register("paths")
def _index_escape(rng: random.Random, pack: Path) -> tuple:
    header, _data, _n = read_st(pack / MODEL)
    shard = pick(rng, ["../outside/model.safetensors", str(pack.parent / "outside" / MODEL), "model.safetensors",
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
    name = pick(rng, ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl"])
    (pack / name).write_bytes(PICKLE_BOMB)
    dropped = rng.random() < 0.7
    if dropped:
        (pack / MODEL).unlink()
    return f"{name} added{', model.safetensors removed' if dropped else ''}", dropped


@register("paths")
def _delete(rng: random.Random, pack: Path) -> tuple:
    rel = pick(rng, [*ALL_FILES, AD, "adapters"])
    if (pack / rel).is_dir():
        shutil.rmtree(pack / rel)
    else:
        (pack / rel).unlink()
    return f"{rel} deleted", rel in (*SAFETENSORS, CONFIG, AD_META, AD, "adapters")


# ------------------------------------------------------------------------------------------------ tensor values


def _poke(rng: random.Random, pack: Path, rel: str, suffix: str, values: Callable[[int], list[int]]) -> tuple:
    """Overwrite a few int32 elements of one tensor whose name ends with ``suffix`` with one of ``values(count)``."""
    header, data, _n = read_st(pack / rel)
    name = pick(rng, [k for k in _tensor_names(header) if k.endswith(suffix)])
    b, e = header[name]["data_offsets"]
    count = (e - b) // 4
    data = bytearray(data)
    bad = pick(rng, values(count))
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
    rel = pick(rng, SAFETENSORS)
    header, data, _n = read_st(pack / rel)
    floats = [k for k in _tensor_names(header) if header[k]["dtype"] in ("F16", "F32")]
    name = pick(rng, floats)
    b, e = header[name]["data_offsets"]
    data = bytearray(data)
    data[b:e] = bytes([0xFF]) * (e - b)  # all NaN
    write_st(pack / rel, header, bytes(data))
    return f"{rel} {name} -> NaN", False


@register("values")
def _packed_garbage(rng: random.Random, pack: Path) -> tuple:
    header, data, _n = read_st(pack / MODEL)
    name = pick(rng, [k for k in _tensor_names(header) if k.endswith((".qweight", ".qzeros"))])
    b, e = header[name]["data_offsets"]
    data = bytearray(data)
    data[b:e] = bytes(rng.randrange(256) for _ in range(e - b))
    write_st(pack / MODEL, header, bytes(data))
    return f"{name} random bits", False  # any bit pattern is a valid GPTQ word
