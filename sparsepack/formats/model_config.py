"""What a model's ``config.json`` implies: validated dimensions, the GPTQ settings, and every tensor's expected
shape and dtype (checked against a model built from the config on the meta device, allocating nothing).

Split from pack reading so that any directory reader (packs, foreign GPTQ checkpoints, plain HF models) checks
a config the same way.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sparsepack.formats import gptq_layout
from sparsepack.formats.errors import ConfigError, FormatError, MissingFileError, ShapeError
from sparsepack.formats.json_file import read_json
from sparsepack.formats.safetensors_check import read_tensor_bytes

INT_DTYPE = {"qweight": "I32", "qzeros": "I32", "g_idx": "I32"}
FLOAT_DTYPES = ("F16", "BF16", "F32")


def read_quant_config(root: Path, config: Any) -> dict[str, Any] | None:
    qc = getattr(config, "quantization_config", None)
    if qc is None and (root / "quantize_config.json").is_file():
        qc = read_json(root / "quantize_config.json", ConfigError)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        if not callable(getattr(qc, "to_dict", None)):
            raise ConfigError(f"quantization_config must be an object, got {type(qc).__name__}", root / "config.json")
        qc = qc.to_dict()
    method = str(qc.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise ConfigError(
            f"quantization method {method!r} is not supported (GPTQ only)", root / "config.json"
        )
    bits, group_size = qc.get("bits"), qc.get("group_size", -1)
    if type(bits) is not int or bits not in (2, 3, 4, 8):  # type(): refuse 4.0 and True as well
        raise ConfigError(f"quantization bits {bits!r} not in (2, 3, 4, 8)", root / "config.json")
    if type(group_size) is not int or (group_size <= 0 and group_size != -1) or group_size > 2**20:
        raise ConfigError(f"group_size {group_size!r} invalid", root / "config.json")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"checkpoint_format {fmt!r} not supported (gptq or gptq_v2)", root / "config.json")
    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": bool(qc.get("desc_act", False)),
        "sym": bool(qc.get("sym", True)),
        "checkpoint_format": fmt,
    }


def load_config(root: Path) -> Any:
    from transformers import AutoConfig

    path = root / "config.json"
    if not path.is_file():
        raise MissingFileError("missing config.json", root)
    read_json(path, ConfigError)  # size, UTF-8 and duplicate keys, which transformers' reader lets through
    try:
        config = AutoConfig.from_pretrained(str(root), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - config classes run their own validators, each with its own error type
        raise ConfigError(f"cannot read model config: {type(e).__name__}: {e}", path) from None
    return config


# Config fields that size tensors or count modules, with the largest value accepted. A hostile config then fails
# here rather than while the model is built (`num_hidden_layers: 2**40` would build modules until memory runs
# out). An int, or a list of ints for per-layer values; None where the architecture derives the value.
DIM_LIMITS = {
    **dict.fromkeys(("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_inner", "moe_intermediate_size"),
                    2**31 - 1),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "n_layer"), 2**16),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts"), 2**16),
}  # fmt: skip
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layer")  # each layer holds at least one tensor


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_int_list(v: object) -> bool:
    return isinstance(v, list) and all(type(i) is int for i in v)


RUNTIME_FLAGS = {"use_cache": (_is_bool,), "return_dict": (_is_bool,), "tie_word_embeddings": (_is_bool,),
                 "output_attentions": (_is_bool,), "output_hidden_states": (_is_bool, _is_int_list)}  # fmt: skip


POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta")


def check_config_dims(config: Any, n_tensors: int, path: Path) -> None:
    """Refuse non-integer, non-positive or huge dimensions in ``config`` before any model is built."""
    for key, limit in DIM_LIMITS.items():
        value = getattr(config, key, None)
        if value is None:
            continue
        values = value if isinstance(value, list) and key not in LAYER_COUNTS else [value]
        if not all(type(v) is int and 1 <= v <= limit for v in values):
            raise ConfigError(f"config field {key} = {value!r} must be a positive integer up to {limit}", path)
        if key in LAYER_COUNTS and value > n_tensors:
            raise ConfigError(f"config field {key} = {value} but the checkpoint holds only {n_tensors} tensors",
                              path)  # fmt: skip
    for key in POSITIVE_FLOATS:  # read by every forward: NaN or 0 there makes every output NaN, silently
        value = getattr(config, key, None)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value) or value <= 0):
            raise ConfigError(f"config field {key} = {value!r} must be a positive finite number", path)
    for key, kinds in RUNTIME_FLAGS.items():  # read by every forward pass: a hostile value fails there, late
        value = getattr(config, key, None)
        if value is not None and not any(kind(value) for kind in kinds):
            raise ConfigError(f"config field {key} = {value!r} has the wrong type", path)


def meta_model(config: Any, dtype: Any = None) -> Any:
    """An ``AutoModelForCausalLM`` for ``config`` with every parameter and buffer on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    kwargs = {"dtype": dtype} if dtype is not None else {}
    with torch.device("meta"), no_init_weights():  # meta tensors hold no values: initializing them is wasted work
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Fully qualified name -> (out_features, in_features) of every ``nn.Linear``."""
    import torch

    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def build_skeleton(config: Any, path: Path) -> Any:
    """:func:`meta_model`, with the constructor's own errors as a ``ConfigError`` naming ``path``."""
    try:
        return meta_model(config)
    except Exception as e:  # noqa: BLE001 - model constructors assert, divide and raise on inconsistent configs
        raise ConfigError(f"cannot build the model from config.json: {type(e).__name__}: {e}", path) from None


def check_g_idx(pack: Any) -> None:
    """Every ``g_idx`` entry must name a group in ``[0, G)``: kernels index scales and zeros with it unchecked."""
    import torch

    for name in pack.quantized_modules:
        info = pack.tensors.get(f"{name}.g_idx")
        if info is None or info.dtype != "I32":
            continue  # check_shapes reports it
        K = info.shape[0] if info.shape else 0
        G = gptq_layout.num_groups(K, pack.quant["group_size"])
        g = torch.frombuffer(bytearray(read_tensor_bytes(info)), dtype=torch.int32)
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= G):
            raise ShapeError(f"g_idx values must lie in [0, {G}), found [{int(g.min())}, {int(g.max())}]",
                             info.file, info.name)  # fmt: skip


def check_shapes(pack: Any, model: Any) -> None:
    """Every tensor in the checkpoint must be one the model expects, with the right shape and dtype."""
    import torch

    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = set(pack.quantized_modules)
    if quantized and pack.quant is None:
        raise FormatError(
            "checkpoint holds GPTQ tensors but config.json has no quantization_config", pack.path
        )
    for name in quantized:
        if name not in linears:
            raise ShapeError("GPTQ tensors for a module that is not a linear layer", pack.tensors[
                f"{name}.qweight"].file, f"{name}.qweight")  # fmt: skip
        lin = linears[name]
        gs = pack.quant["group_size"]
        shapes = gptq_layout.expected_shapes(lin.in_features, lin.out_features, pack.quant["bits"], gs)
        expected.pop(f"{name}.weight")
        for suffix, shape in shapes.items():
            expected[f"{name}.{suffix}"] = shape
    for name, info in pack.tensors.items():
        if name not in expected:
            raise ShapeError("tensor is not part of the model", info.file, name)
        if info.shape != expected[name]:
            raise ShapeError(f"shape {list(info.shape)} != expected {list(expected[name])}", info.file, name)
        suffix = name.rsplit(".", 1)[-1]
        module = name.rsplit(".", 1)[0]
        want = INT_DTYPE.get(suffix) if module in quantized else None
        if want and info.dtype != want:
            raise ShapeError(f"dtype {info.dtype} != {want}", info.file, name)
        if not want and info.dtype not in FLOAT_DTYPES:
            raise ShapeError(f"dtype {info.dtype} is not a float type", info.file, name)
    tied = set()
    if getattr(pack.config, "tie_word_embeddings", False):
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = sorted(set(expected) - set(pack.tensors) - tied)
    if missing:
        raise ShapeError(f"{len(missing)} tensors missing, e.g. {missing[:3]}", pack.path, missing[0])
