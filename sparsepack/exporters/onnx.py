"""``export --format onnx``: a pack as one onnxruntime graph, GPTQ base as MatMulNBits, validated against PyTorch.

Steps (each a small function below):

1. check the request against the pack (adapter names, bit widths, block sizes) before anything is written;
2. load the pack and swap every quantized linear for a dense stand-in ``nn.Linear`` (its dequantized weight), or
   for ``merge``, dequantized weight + the adapter's delta; untie a tied ``lm_head``;
3. ``torch.onnx.export(dynamo=True)`` through a thin wrapper: ``logits`` only, or with explicit named past/present
   key-value tensors (one graph for prefill and decode);
4. rewrite the stand-ins' MatMuls into ``com.microsoft::MatMulNBits`` carrying the GPTQ integers
   (:mod:`sparsepack.exporters.matmulnbits`), save with external data, copy the tokenizer, write metadata;
5. run the saved graph in onnxruntime against the loaded pack (:mod:`sparsepack.exporters.validate`).

All of it happens in a staged sibling directory that is renamed into place only when validation passes.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsepack.exporters.matmulnbits import NBitsWeight, check_layer, rewrite_linears, scope_of, to_nbits
from sparsepack.exporters.onnx_adapters import (
    ADAPTER_DIR,
    SUFFIX,
    AdapterSlotLinear,
    adapter_tensors,
    add_defaults,
    is_custom,
    round_lowrank_fp16,
    run_options,
    sample_slot,
    slot_dynamic_shapes,
    slot_names,
    write_adapter,
)
from sparsepack.exporters.validate import raise_worst, validate_kv, validate_logits
from sparsepack.formats.pack import Pack, read_pack
from sparsepack.formats.staging import check_output, staged_dir
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.layers.inject import set_submodule
from sparsepack.layers.quantized_linear import QuantizedLinear
from sparsepack.runtime.onnx_runtime import FORMAT, FORMAT_VERSION, METADATA_FILE, session_options
from sparsepack.runtime.ort_ops import ADAPTER_OPS

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SCOPE_PREFIX = "m."  # the wrappers below hold the HF model as `self.m`
# --dtype: the float type of weights, activations, past key/values and adapter tensors in the graph. fp16 runs on
# ORT's CPU EP too (it inserts casts around the few ops without an fp16 CPU kernel); MatMulNBits scales follow it.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class UnknownAdapterError(ValueError):
    """An adapter name that the pack does not hold."""


# ----------------------------------------------------------------------------------------------- request


def check_request(pack, adapters: tuple[str, ...], merge: bool, dtype: str = "fp32", adapter_op: str = "standard"
                  ) -> None:  # fmt: skip
    """Fail before any work on names the pack lacks, merge without exactly one adapter, or layers ORT cannot run.

    ``--adapter-op custom`` / ``custom-fp16`` also need the op's library: it is built here (or found built), so a
    missing compiler fails before the export starts.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if adapter_op not in ADAPTER_OPS:
        raise ValueError(f"--adapter-op must be one of {', '.join(ADAPTER_OPS)}, got {adapter_op!r}")
    if is_custom(adapter_op) and dtype != "fp32":
        raise ValueError(f"--adapter-op {adapter_op} runs fp32 graphs only; got --dtype {dtype}")
    for name in adapters:
        if name not in pack.adapters:
            have = ", ".join(sorted(pack.adapters)) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r} (pack has: {have})")
    if merge and len(adapters) != 1:
        raise ValueError(f"--merge folds exactly one adapter in; got {len(adapters)}")
    if merge and adapter_op != "standard":
        raise ValueError("--adapter-op applies to unfused adapters; --merge keeps none")
    if is_custom(adapter_op):
        from sparsepack.runtime.ort_ops import library_path

        library_path()  # OrtOpsBuildError (no compiler, a compile error)
    if pack.quant is not None:
        for name in pack.quantized_modules:
            in_features = pack.tensors[f"{name}.g_idx"].shape[0]
            check_layer(name, in_features, pack.quant["bits"], pack.quant["group_size"])


# ----------------------------------------------------------------------------------------------- model


def adapter_slots(model: nn.Module, unfused: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(module, in, out) of every layer that one of the ``unfused`` adapters touches, in model order."""
    return [(name, mod.in_features, mod.out_features) for name, mod in model.named_modules()
            if isinstance(mod, SparseLowRankLinear) and set(unfused) & set(mod.adapter_names)]  # fmt: skip


def dense_standins(
    model: nn.Module, merged: str | None, slots: list[tuple[str, int, int]] = (), adapter_op: str = "standard"
) -> dict[str, NBitsWeight]:
    """Swap quantized/adapted linears for plain ``nn.Linear`` in place; returns the layers to make MatMulNBits.

    A layer whose adapter ``merged`` is present becomes dense (dequantized + delta, fp32): merging changes
    every weight entry, so the GPTQ integers no longer describe it. Every other quantized layer keeps its
    GPTQ tensors, returned here for :func:`~sparsepack.exporters.matmulnbits.rewrite_linears`. Layers named
    in ``slots`` become an :class:`AdapterSlotLinear` around the stand-in (its MatMul is then ``NAME.base``).
    """
    slot_modules = {m for m, _, _ in slots}
    nbits: dict[str, NBitsWeight] = {}
    wrapped: set[str] = set()  # SparseLowRankLinear names: their `.base` is handled with them
    for name, mod in list(model.named_modules()):
        if name.rpartition(".")[0] in wrapped:
            continue
        delta = None
        if isinstance(mod, SparseLowRankLinear):
            if merged is not None and merged in mod.adapter_names:
                delta = mod.delta_weight(merged)
            base = mod.base
            wrapped.add(name)
        elif isinstance(mod, QuantizedLinear):
            base = mod
        else:
            continue
        if isinstance(base, QuantizedLinear):
            weight, bias = base.dequantized_weight(), base.bias
        else:
            weight, bias = base.weight.detach().float(), base.bias
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        lin.weight = nn.Parameter(weight if delta is None else weight + delta, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
        key = f"{name}.base" if name in slot_modules else name
        if delta is None and isinstance(base, QuantizedLinear):
            nbits[key] = to_nbits(base, name)
        set_submodule(model, name, AdapterSlotLinear(lin, adapter_op) if name in slot_modules else lin)
    return nbits


def untie_lm_head(model: nn.Module) -> bool:
    """Give ``lm_head`` its own weight: a tied one is exported as a Transpose of the embedding, not a MatMul.

    Returns whether it was tied (then :func:`share_tied_embedding` removes the duplicate after export).
    """
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        return True
    return False


def share_tied_embedding(proto, head_module: str = "lm_head") -> bool:
    """Re-tie in the graph: embed with a Gather on the lm_head's ``[hidden, vocab]`` initializer, drop the table.

    ``Gather(E, ids)`` ``[B, T, H]`` == ``Transpose(Gather(E^T, ids, axis=1), [1, 2, 0])``; the lm_head MatMul
    already holds ``E^T``, so the ``[vocab, hidden]`` embedding copy (the largest tensor of a small model) goes.
    """
    from onnx import helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    head = next((n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits
                 and SCOPE_PREFIX + head_module in scope_of(n)), None)  # fmt: skip
    if head is None:
        return False
    shape = tuple(reversed(inits[head.input[1]].dims))  # (vocab, hidden)
    gathers = [i for i, n in enumerate(graph.node)
               if n.op_type == "Gather" and n.input[0] in inits and tuple(inits[n.input[0]].dims) == shape]  # fmt: skip
    if len(gathers) != 1:
        return False
    at = gathers[0]
    old = graph.node[at]
    table = old.input[0]
    users = [n for n in graph.node if table in n.input]
    if len(users) != 1:
        return False
    mid = f"{old.output[0]}.hbt"
    nodes = []
    for i, n in enumerate(graph.node):
        if i != at:
            nodes.append(n)
            continue
        nodes.append(helper.make_node("Gather", [head.input[1], old.input[1]], [mid], axis=1, name=f"{old.name}/t"))
        nodes.append(helper.make_node("Transpose", [mid], [old.output[0]], perm=[1, 2, 0], name=f"{old.name}/tied_T"))
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name != table]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return True


class _Wrapper(nn.Module):
    """Runs the HF model from named graph inputs; :func:`make_wrapper` gives it an explicit signature."""

    def __init__(self, model: nn.Module, kv_cache: bool, slots: list[nn.Module]) -> None:
        super().__init__()
        self.m = model
        self.kv_cache = kv_cache
        self._slots = list(slots)  # a plain list: the slot modules stay registered only under `m`

    def _run(self, kw: dict[str, torch.Tensor]):
        for i, mod in enumerate(self._slots):
            mod.slot = tuple(kw[n] for n in slot_names(i, mod.op))
        if not self.kv_cache:
            return self.m(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], use_cache=False).logits
        from transformers import DynamicCache

        n = self.m.config.num_hidden_layers
        cache = DynamicCache([(kw[f"past_key_{i}"], kw[f"past_value_{i}"]) for i in range(n)], config=self.m.config)
        out = self.m(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"], position_ids=kw["position_ids"],
                     past_key_values=cache, use_cache=True)  # fmt: skip
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def make_wrapper(model: nn.Module, names: list[str], kv_cache: bool, slots: list[nn.Module]) -> nn.Module:
    """A wrapper whose ``forward`` names every input (torch.export reads graph input names off the signature)."""
    args = ", ".join(names)
    src = f"def forward(self, {args}):\n    return self._run({{{', '.join(f'{n!r}: {n}' for n in names)}}})\n"
    scope: dict[str, Any] = {}
    exec(src, scope)  # noqa: S102 - a generated signature from our own identifiers, no outside input
    cls = type("ExportWrapper", (_Wrapper,), {"forward": scope["forward"]})
    return cls(model, kv_cache, slots)


def cache_layout(config, dtype: str = "fp32") -> dict[str, Any]:
    """Past key/value shapes and numpy dtype, as the runtime needs them to build empty pasts."""
    heads = config.num_attention_heads
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "dtype": "float16" if dtype == "fp16" else "float32",
    }


# ----------------------------------------------------------------------------------------------- export


def export_graph(model: nn.Module, kv_cache: bool, opset: int | None, slots: list[tuple[str, int, int]] = (),
                 dtype: torch.dtype = torch.float32, adapter_op: str = "standard"):  # fmt: skip
    """``torch.onnx.export(dynamo=True)`` with dynamic batch / sequence / past length; returns a ModelProto.

    ``slots`` (module, in, out) are the unfused adapter slots: five more inputs each (see ``onnx_adapters``),
    laid out for ``adapter_op``. ``dtype`` is the model's float dtype: past key/values and float adapter inputs
    take it too.
    """
    from torch.export import Dim

    batch, seq = Dim("batch", min=1), Dim("seq", min=1)
    if not kv_cache:
        ids = torch.ones(2, 5, dtype=torch.long)
        args = [ids, torch.ones_like(ids)]
        names, outs = ["input_ids", "attention_mask"], ["logits"]
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    else:
        lay = cache_layout(model.config)
        past_len, mask_len = Dim("past", min=0), Dim("mask_len", min=1)  # Dims cannot be added: own mask dim
        B, T, P = 2, 3, 2  # trace with every dynamic axis >= 2 so none gets specialized
        pasts = [torch.zeros(B, lay["num_kv_heads"], P, lay["head_dim"], dtype=dtype)
                 for _ in range(2 * lay["num_layers"])]  # fmt: skip
        ids = torch.ones(B, T, dtype=torch.long)
        args = [ids, torch.ones(B, P + T, dtype=torch.long), torch.arange(P, P + T).expand(B, T).contiguous(), *pasts]
        kv = [f"{k}_{i}" for i in range(lay["num_layers"]) for k in ("key", "value")]
        names = ["input_ids", "attention_mask", "position_ids", *[f"past_{k}" for k in kv]]
        outs = ["logits", *[f"present_{k}" for k in kv]]
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: mask_len},
                  "position_ids": {0: batch, 1: seq}}  # fmt: skip
        shapes.update({f"past_{k}": {0: batch, 2: past_len} for k in kv})
    for i, (_, k, n) in enumerate(slots):
        names += slot_names(i, adapter_op)
        args += [t.to(dtype) if t.dtype == torch.float32 else t for t in sample_slot(k, n, op=adapter_op)]
        shapes.update(slot_dynamic_shapes(i, adapter_op))
    wrapper = make_wrapper(model, names, kv_cache, [model.get_submodule(m) for m, _, _ in slots])
    with warnings.catch_warnings():
        # one UserWarning per dynamic dim that shares its constraints with another (2 per adapted layer): noise
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(wrapper.eval(), tuple(args), dynamo=True, input_names=names, output_names=outs,
                                    dynamic_shapes=shapes, opset_version=opset, verbose=False)  # fmt: skip
    return program.model_proto


def save_model(proto, out_dir: Path) -> None:
    """``model.onnx`` + every tensor over 1 KiB in ``model.onnx.data`` (protobuf caps a file at 2 GiB)."""
    import onnx

    onnx.save_model(proto, str(out_dir / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)  # fmt: skip
    data = out_dir / DATA_FILE
    if data.exists():
        data.chmod((out_dir / MODEL_FILE).stat().st_mode)  # onnx writes it 0600; give it the model file's mode


def export_onnx(
    pack: str | Path,
    out_dir: str | Path,
    adapters: tuple[str, ...] | list[str] = (),
    merge: bool = False,
    kv_cache: bool = True,
    opset: int | None = None,
    validate: bool = True,
    overwrite: bool = False,
    dtype: str = "fp32",
    adapter_op: str = "standard",
) -> dict[str, Any]:
    """Export a pack to ONNX for onnxruntime.

    Args:
        pack: pack (or GPTQ checkpoint) directory.
        out_dir: export directory to write (atomically).
        adapters: adapter names; with ``merge`` exactly one, folded into the weights.
        merge: fold the adapter in (layers it touches become dense fp32 MatMuls); without it every adapter is
            kept unfused and written as ``adapters/NAME.onnx_adapter`` (the graph alone is the base).
        kv_cache: graph with past/present key-value tensors (else a plain logits graph).
        opset: ONNX opset (default: the exporter's).
        validate: compare onnxruntime against PyTorch and raise ``ExportValidationError`` on a mismatch.
        overwrite: replace an existing ``out_dir``.
        dtype: ``fp32`` or ``fp16`` for the graph's weights, activations, cache and adapters (the MatMulNBits
            integers are the same either way); fp16 is validated with the fp16 rows of the tolerance table.
        adapter_op: how unfused adapters run: ``standard`` ONNX ops (any onnxruntime), or ``custom``, one
            ``sparsepack::SparseLowRankDelta`` node per adapted layer (built from C on first use; fp32 graphs);
            ``custom-fp16`` stores that op's low-rank factors in fp16 (validated against the adapter so rounded).

    Returns:
        A summary: paths, node counts, sizes, timings and validation figures.
    """
    from sparsepack.formats.tokenizer import copy_tokenizer_files
    from sparsepack.runtime.loader import load

    t0 = time.perf_counter()
    adapters = tuple(adapters)
    pack_path, out_dir = Path(pack), Path(out_dir)
    info = read_pack(pack_path, verify=True, check_config=True)
    check_request(info, adapters, merge, dtype, adapter_op)
    check_output(out_dir, overwrite, inputs=[pack_path])
    merged = adapters[0] if merge else None
    unfused = () if merge else adapters
    model = load(info, adapter=merged)  # the record just read and verified: no second read or hash
    slots = adapter_slots(model, unfused)
    np_float = np.float16 if dtype == "fp16" else np.float32
    tensors = {name: {k: v.astype(np_float) if v.dtype == np.float32 else v
                      for k, v in adapter_tensors(model, name, slots, adapter_op).items()}
               for name in unfused}  # fmt: skip
    nbits = dense_standins(model, merged, slots, adapter_op)
    tied = untie_lm_head(model)
    model.to(DTYPES[dtype])
    proto = export_graph(model, kv_cache, opset, slots, DTYPES[dtype], adapter_op)
    t_export = time.perf_counter() - t0
    rewritten = rewrite_linears(proto, nbits, SCOPE_PREFIX, np_float)
    tied = tied and share_tied_embedding(proto)
    add_defaults(proto, slots, np_float, adapter_op)
    del model
    config = info.config
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model": MODEL_FILE, "kv_cache": kv_cache,
        "dtype": dtype, "layout": cache_layout(config, dtype),
        "opset": next(o.version for o in proto.opset_import if o.domain == ""),
        "merged_adapter": merged,
        "adapters": {n: f"{ADAPTER_DIR}/{n}{SUFFIX}" for n in unfused}, "adapter_slots": [m for m, _, _ in slots],
        "adapter_op": adapter_op,
        "quantization": info.quant,
        "matmulnbits_layers": len(rewritten), "vocab_size": config.vocab_size,
        "eos_token_id": config.eos_token_id if isinstance(config.eos_token_id, int) else None,
        "pad_token_id": config.pad_token_id,
    }  # fmt: skip
    summary: dict[str, Any] = {"out": str(out_dir),
                               **{k: meta[k] for k in ("kv_cache", "dtype", "opset", "merged_adapter", "adapter_op")},
                               "matmulnbits_layers": len(rewritten), "nodes": len(proto.graph.node),
                               "tied_embedding_shared": tied}  # fmt: skip
    with staged_dir(out_dir, overwrite, inputs=[pack_path]) as tmp:
        save_model(proto, tmp)
        del proto
        copy_tokenizer_files(pack_path, tmp)
        for name, rel in meta["adapters"].items():
            (tmp / rel).parent.mkdir(exist_ok=True)
            write_adapter(tmp / rel, tensors[name])
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        summary["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        summary["adapters"] = list(meta["adapters"])
        t1 = time.perf_counter()
        if validate:
            summary["validation"] = run_validation(tmp, info, merged, meta)
        summary["validate_s"] = round(time.perf_counter() - t1, 2)
    summary["export_s"] = round(t_export, 2)
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    return summary


def run_validation(export_dir: Path, pack: Pack, adapter: str | None, meta: dict) -> dict[str, Any]:
    """ORT on the written graph vs a fresh model of ``pack`` (same adapter active); raises on a mismatch."""
    import onnxruntime as ort

    from sparsepack.runtime.loader import load

    model = load(pack, adapter=adapter)
    if meta.get("adapter_op") == "custom-fp16":
        round_lowrank_fp16(model)
    session = ort.InferenceSession(str(export_dir / MODEL_FILE), session_options(meta.get("adapter_op")),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    pad = meta["pad_token_id"] if isinstance(meta["pad_token_id"], int) else 0
    dtype = meta.get("dtype", "fp32")
    checks = []
    for name in [None, *meta["adapters"]]:  # the bare graph, then each swappable adapter in the same session
        opts, handle = (None, None) if name is None else run_options(export_dir / meta["adapters"][name])
        if name is not None:
            model.set_adapter(name)
        tag = "" if name is None else f"{name}:"
        if meta["kv_cache"]:
            found = validate_kv(session, model, meta["layout"], meta["vocab_size"], pad, run_options=opts, dtype=dtype)
        else:
            found = validate_logits(session, model, meta["vocab_size"], pad, run_options=opts, dtype=dtype)
        for c in found:
            c.output = tag + c.output
        checks += found
        del handle
    raise_worst(checks)
    return {c.output: {"max_abs_diff": c.max_abs_diff, "allowed": c.allowed} for c in checks}
