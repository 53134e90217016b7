"""merge: fold one or several weighted corrections into the base.

- ``dense``: a plain Hugging Face checkpoint (fp16 by default) with ``W = dequant(W_q) + sum_k w_k * dW_k`` in
  every corrected linear; it loads in transformers without sparsepack.
- ``requantize``: the same merged weights, GPTQ-quantized again with error compensation on calibration data
  (the dense merge is written to a temporary sibling and compressed from there), so the result is a
  GPTQ-v1 pack of the corrected model.

Several adapters fuse by weighted sum of their dense corrections: sparse parts add on the union of their
supports and low-rank parts add (equivalently, concatenate along r).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sparsepack.formats.manifest import MANIFEST_FILE, Manifest, StageRecord
from sparsepack.formats.pack import record_files, staged_dir
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.layers.quantized_linear import QuantizedLinear
from sparsepack.runtime.tokenizer import copy_tokenizer_files

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class MergeResult:
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)


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
    from sparsepack.layers.skeleton import empty_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    dense = empty_model(type(model.config).from_dict(config))
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


def merge(pack: str | Path, out: str | Path, adapters: list[tuple[str, float]], mode: str = "dense",
          dtype: str = "float16", qcfg=None, overwrite: bool = False,
          progress: bool = True) -> MergeResult:  # fmt: skip
    """Fold ``adapters`` (name, weight) of ``pack`` into a dense checkpoint or a re-quantized pack at ``out``."""
    from sparsepack.runtime.loader import load

    if mode not in ("dense", "requantize"):
        raise ValueError(f"--mode must be dense or requantize, got {mode!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        from sparsepack.formats.errors import OutputExistsError

        raise OutputExistsError("output exists (pass --overwrite to replace it)", out)
    start = time.perf_counter()
    model = load(pack)
    unknown = [n for n, _ in adapters if n not in model.adapters]
    if unknown or not adapters:
        raise KeyError(f"{pack}: unknown adapter(s) {unknown}; the pack has {model.adapters}")
    src = model.sparsepack.pack
    record = StageRecord("merge", {"adapters": adapters, "mode": mode, "dtype": dtype})
    if mode == "dense":
        _write_dense(model, src, out, adapters, DTYPES[dtype], record, overwrite)
        return MergeResult(out, {"path": str(out), "mode": mode, "seconds": time.perf_counter() - start})
    from sparsepack.pipeline.compress import compress

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.dense-", dir=out.absolute().parent))
    try:
        _write_dense(model, src, tmp / "m", adapters, torch.float32, record, overwrite=False)
        del model
        res = compress(tmp / "m", out, qcfg, overwrite=overwrite, progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return MergeResult(out, {"path": str(out), "mode": mode, "seconds": time.perf_counter() - start,
                             "compress": res.summary()})  # fmt: skip


def _write_dense(model, src, out: Path, adapters, dtype, record: StageRecord, overwrite: bool) -> None:
    state, config = merged_state_dict(model, adapters, dtype)
    manifest = Manifest(base={**src.manifest.base, "merged_adapters": [n for n, _ in adapters]},
                        quantization=None, history=[*src.manifest.history, record])  # fmt: skip
    with staged_dir(out, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer_files(src.path, tmp)
        record_files(tmp, manifest)
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
