"""merge: fold one or several weighted corrections into the base, and measure what folding costs.

- ``dense``: a plain Hugging Face checkpoint (fp16 by default) with ``W = dequant(W_q) + sum_k w_k * dW_k`` in
  every corrected linear; it loads in transformers without sparsepack.
- ``requantize``: the same merged weights, GPTQ-quantized again with error compensation on calibration data
  (the dense merge is written to a temporary sibling and compressed from there), so the result is a
  GPTQ-v1 pack of the corrected model.

Several adapters fuse by weighted sum of their dense corrections: sparse parts add on the union of their
supports and low-rank parts add (equivalently, concatenate along r).

The quality report (``summary["quality"]``) scores every adapter on its own held-out data: the base alone,
the adapter alone (unfused, weight 1), and the merged output; in requantize mode also a naive
round-to-nearest requantization of the same merged weights, so GPTQ's error compensation is measured.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparsepack.formats.manifest import Manifest, StageRecord
from sparsepack.formats.pack import Pack, read_pack, write_pack
from sparsepack.formats.staging import check_output
from sparsepack.formats.tokenizer import copy_tokenizer_files
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.layers.quantized_linear import QuantizedLinear

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_EVAL = "stdlib:pydoc@eval"  # held-out text for adapters whose pack records no training data


@dataclass
class MergeResult:
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class QualityConfig:
    """Perplexity report of a merge (``windows=0`` skips it)."""

    windows: int = 16  # held-out windows per adapter's eval data
    seqlen: int = 256  # tokens per window
    sources: dict[str, str] = field(default_factory=dict)  # adapter name -> eval SOURCE (overrides the records)
    default: str | None = None  # eval SOURCE for adapters with neither an entry in `sources` nor a record
    batch_size: int = 4


def _linear_weight(module: torch.nn.Module, weights: list[tuple[str, float]]) -> torch.Tensor:
    """Dense fp32 ``[out, in]`` of a (possibly quantized, possibly adapted) linear with corrections folded in."""
    if isinstance(module, SparseLowRankLinear):
        w = module.dense_base(torch.float32).clone()
        for name, weight in weights:
            if name in module.adapter_names:
                w += weight * module.delta_weight(name, torch.float32)
        return w
    if isinstance(module, QuantizedLinear):
        return module.dequantized_weight(torch.float32)
    return module.weight.detach().float()


def merged_state_dict(model: torch.nn.Module, weights: list[tuple[str, float]], dtype: torch.dtype):
    """The dense model's state dict (HF names) with every correction folded in, and its config dict."""
    from sparsepack.formats.model_config import meta_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    dense = meta_model(type(model.config).from_dict(config))
    targets = dict(model.named_modules())
    source = model.state_dict()
    out = {}
    for key in dense.state_dict():
        module_name, _, leaf = key.rpartition(".")
        module = targets.get(module_name)
        if leaf == "weight" and isinstance(module, (SparseLowRankLinear, QuantizedLinear)):
            out[key] = _linear_weight(module, weights).to(dtype)
        elif leaf == "bias" and isinstance(module, SparseLowRankLinear):
            out[key] = module.base.bias.detach().to(dtype)
        elif key in source:
            out[key] = source[key].detach().to(dtype)
        elif isinstance(module, torch.nn.Linear):
            out[key] = _linear_weight(module, weights).to(dtype)
        else:
            raise KeyError(f"no source for tensor {key}")
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return {k: v.contiguous() for k, v in out.items()}, config


def requantize_config(pack: str | Path | Pack, **overrides: Any):
    """The :class:`QuantConfig` that re-quantizes ``pack``'s merged weights on its own grid.

    The pack's last ``compress`` record gives every GPTQ setting (damp, ordering, skip, ...); a pack without
    one (a foreign GPTQ checkpoint) gives bits, group size, act-order and symmetry from its quantization
    config. ``overrides`` (calib, nsamples, seqlen, ...) win.
    """
    import dataclasses

    from sparsepack.config import QuantConfig

    src = pack if isinstance(pack, Pack) else read_pack(Path(pack), verify=False, check_config=False)
    q = src.quant
    if q is None:
        raise ValueError(f"{src.path}: the base is not quantized; use --mode dense")
    known = {f.name for f in dataclasses.fields(QuantConfig)}
    kw: dict[str, Any] = {"bits": q["bits"], "group_size": q["group_size"], "act_order": q["desc_act"], "sym": q["sym"]}
    record = next((r for r in reversed(src.manifest.history) if r.stage == "compress"), None)
    own = known - {"method", "device", "calib", "nsamples", "seqlen", "seed"}  # always GPTQ, on the given data
    if record is not None:
        kw.update({k: v for k, v in record.args.items() if k in own})
    kw.update(overrides)
    return QuantConfig(**kw)


def merge(pack: str | Path | Pack, out: str | Path, adapters: list[tuple[str, float]], mode: str = "dense",
          dtype: str = "float16", qcfg=None, overwrite: bool = False, progress: bool = True,
          quality: QualityConfig | None = None) -> MergeResult:  # fmt: skip
    """Fold ``adapters`` (name, weight) of ``pack`` into a dense checkpoint or a re-quantized pack at ``out``.

    Args:
        pack: the pack directory, or a :class:`Pack` already read (it is not opened or hashed again).
        quality: the perplexity report (None: no report). It runs after ``out`` is written.
    """
    from sparsepack.runtime.loader import load

    if mode not in ("dense", "requantize"):
        raise ValueError(f"--mode must be dense or requantize, got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if mode == "requantize" and qcfg is None:
        raise ValueError("--mode requantize needs a quantization config (the pack's own, see the CLI)")
    out = Path(out)
    pack = pack if isinstance(pack, Pack) else read_pack(Path(pack), verify=True, check_config=True)
    check_output(out, overwrite, inputs=[pack.path])
    start = time.perf_counter()
    model = load(pack)
    unknown = [n for n, _ in adapters if n not in model.adapters]
    if unknown or not adapters:
        raise KeyError(f"{pack.path}: unknown adapter(s) {unknown}; the pack has {model.adapters}")
    src = model.sparsepack.pack
    record = StageRecord("merge", {"adapters": adapters, "mode": mode, "dtype": dtype})
    summary: dict[str, Any] = {"path": str(out), "mode": mode, "adapters": adapters}
    if mode == "dense":
        write_dense(model, src, out, adapters, DTYPES[dtype], record, overwrite)
        summary["seconds"] = time.perf_counter() - start
        if quality is not None and quality.windows:
            summary["quality"] = merge_quality(model, {"merged": lambda: load(out, verify=False)}, adapters, quality)
        return MergeResult(out, summary)
    from sparsepack.pipeline.compress import compress

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.dense-", dir=out.absolute().parent))
    try:
        write_dense(model, src, tmp / "m", adapters, torch.float32, record, overwrite=False)
        del model
        res = compress(tmp / "m", out, qcfg, overwrite=overwrite, progress=progress)
        summary.update(seconds=time.perf_counter() - start, compress=res.summary())
        if quality is not None and quality.windows:
            # the naive peer: the same merged weights rounded to nearest on the same grid (no calibration)
            rtn = compress(tmp / "m", tmp / "rtn", replace(qcfg, method="rtn", act_order=False, group_aware=False),
                           progress=False)  # fmt: skip
            outputs = {"merged": lambda: load(out, verify=False), "rtn": lambda: load(rtn.path, verify=False)}
            summary["quality"] = merge_quality(load(pack), outputs, adapters, quality)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeResult(out, summary)


def write_dense(model, src, out: Path, adapters, dtype, record: StageRecord, overwrite: bool) -> None:
    state, config = merged_state_dict(model, adapters, dtype)
    manifest = Manifest(base={**src.manifest.base, "merged_adapters": [n for n, _ in adapters]},
                        quantization=None, history=[*src.manifest.history, record])  # fmt: skip

    def populate(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer_files(src.path, tmp)

    write_pack(out, manifest, populate, overwrite, inputs=[src.path])


# ------------------------------------------------------------------------------------------------ quality


def _eval_split(source: str) -> str:
    """The held-out split of a training SOURCE (``x@train`` -> ``x@eval``, plain ``x`` -> ``x@eval``)."""
    from sparsepack.pipeline.data import parse_source

    base, split = parse_source(source)
    return source if split == "eval" else f"{base}@eval"


def adapter_eval_source(manifest: Manifest, name: str) -> tuple[str, str] | None:
    """``(SOURCE, origin)`` of adapter ``name``'s own held-out data, from the pack's finetune record.

    The record's ``eval_data`` when training had one, else the ``@eval`` split of its training ``data``;
    None when the pack holds no finetune record for ``name`` (adapters imported or built elsewhere).
    """
    for rec in reversed(manifest.history):
        if rec.stage == "finetune" and rec.args.get("adapter") == name:
            if rec.args.get("eval_data"):
                return rec.args["eval_data"], "finetune eval_data"
            if rec.args.get("data"):
                return _eval_split(rec.args["data"]), "finetune data, @eval split"
    return None


def merge_quality(source: torch.nn.Module, outputs: dict[str, Callable[[], torch.nn.Module]],
                  adapters: list[tuple[str, float]], cfg: QualityConfig) -> dict[str, Any]:  # fmt: skip
    """Perplexity of the base, each adapter alone (unfused) and every merged output, on each adapter's data.

    Args:
        source: the loaded source pack (its adapters are switched here).
        outputs: label -> loader of a merged model (``merged``; ``rtn`` for the naive requantization); each is
            loaded, scored on every adapter's data and dropped before the next, so at most two models are alive.

    Returns:
        ``{"windows", "seqlen", "evals": [{adapter, weight, data, data_from, base, alone, <label>...,
        <label>_vs_alone}]}``; ``<label>_vs_alone`` is the relative perplexity change (0.02 = +2%).
    """
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import token_windows
    from sparsepack.pipeline.evaluate import perplexity

    pack = source.sparsepack.pack
    tokenizer = load_tokenizer(pack.path)

    def ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
        return perplexity(model, windows, batch_size=cfg.batch_size, progress=False).perplexity

    evals, windows = [], []
    for name, weight in adapters:
        found = adapter_eval_source(pack.manifest, name)
        if name in cfg.sources:
            data, origin = cfg.sources[name], "given"
        elif found is not None:
            data, origin = found
        else:
            data = cfg.default or DEFAULT_EVAL
            origin = "given for every adapter (no finetune record)" if cfg.default else "default (no finetune record)"
        windows.append(token_windows(tokenizer, data, cfg.seqlen, cfg.windows))
        source.set_adapter(None)
        base = ppl(source, windows[-1])
        source.set_adapter(name)
        evals.append({"adapter": name, "weight": weight, "data": data, "data_from": origin,
                      "windows": windows[-1].shape[0], "base": base, "alone": ppl(source, windows[-1])})  # fmt: skip
    source.set_adapter(None)
    for label, loader in outputs.items():
        model = loader()
        for row, w in zip(evals, windows, strict=True):
            row[label] = ppl(model, w)
            row[f"{label}_vs_alone"] = row[label] / row["alone"] - 1
        del model
    return {"windows": cfg.windows, "seqlen": cfg.seqlen, "evals": evals}


def quality_lines(quality: dict[str, Any]) -> list[str]:
    """The report as text lines (one per adapter) for the CLI."""
    lines = []
    for r in quality["evals"]:
        extra = "".join(f", {k} {r[k]:.4f} ({r[k + '_vs_alone']:+.2%})" for k in ("merged", "rtn") if k in r)
        lines.append(f"  {r['adapter']} (weight {r['weight']:g}) on {r['data']} [{r['data_from']}]: "
                     f"base {r['base']:.4f}, alone {r['alone']:.4f}{extra}")  # fmt: skip
    return lines
