"""``export --format safetensors`` and ``--format peft``: the pack for tools that know neither GPTQ nor RoSA.

- ``safetensors``: a dense Hugging Face checkpoint, ``W = dequant(W_q) (+ the adapter's delta)``, written by the
  dense merge of :mod:`sparsepack.pipeline.merge` (one implementation of "fold a correction in").
- ``peft``: the adapter's low-rank part as a plain PEFT LoRA directory (the sparse part is dropped and its size
  reported); a sparse-only (SHiRA) adapter in PEFT's own SHiRA layout (``formats.peft_shira``); or with
  ``lora_approx=RANK`` one LoRA of at most that rank per module from a truncated SVD of the whole correction
  ``s * B @ A + S`` (what vLLM and other LoRA servers can load), with the relative Frobenius error
  ``||dW - B' A'|| / ||dW||`` reported per module and overall.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from sparsepack.formats.adapter_layout import Adapter, AdapterModule, write_adapter
from sparsepack.formats.manifest import StageRecord
from sparsepack.formats.pack import read_pack
from sparsepack.formats.peft_shira import NotShiraSizedError, peft_shira_rank, write_peft_shira
from sparsepack.formats.staging import check_output, staged_dir
from sparsepack.layers.adapter_linear import SparseLowRankLinear
from sparsepack.methods.residual import svd_factors

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class NoLowRankError(ValueError):
    """``--format peft`` of an adapter without a low-rank part (and no ``--lora-approx``)."""


def _check(pack: Path, out: Path, adapter: str | None, overwrite: bool):
    """Typed errors before any work: unknown adapter, existing output."""
    from sparsepack.exporters.onnx import UnknownAdapterError

    info = read_pack(pack, verify=True, check_config=True)
    if adapter is not None and adapter not in info.adapters:
        have = ", ".join(sorted(info.adapters)) or "none"
        raise UnknownAdapterError(f"unknown adapter {adapter!r} (pack has: {have})")
    check_output(out, overwrite, inputs=[pack])
    return info


def export_safetensors(pack: str | Path, out: str | Path, adapter: str | None = None, dtype: str = "fp32",
                       overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """A dense merged HF checkpoint of ``pack`` (with ``adapter`` folded in, if given) at ``out``."""
    from sparsepack.pipeline.merge import write_dense
    from sparsepack.runtime.loader import load

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pack, out = Path(pack), Path(out)
    t0 = time.perf_counter()
    model = load(_check(pack, out, adapter, overwrite))
    pairs = [] if adapter is None else [(adapter, 1.0)]
    record = StageRecord("export", {"format": "safetensors", "adapter": adapter, "dtype": dtype})
    write_dense(model, model.sparsepack.pack, out, pairs, DTYPES[dtype], record, overwrite)
    return {"out": str(out), "format": "safetensors", "merged_adapter": adapter, "dtype": dtype,
            "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
            "total_s": round(time.perf_counter() - t0, 2)}  # fmt: skip


def export_peft(pack: str | Path, out: str | Path, adapter: str, lora_approx: int | None = None,
                overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Adapter ``adapter`` of ``pack`` as a PEFT LoRA directory at ``out`` (see the module docstring)."""
    from sparsepack.runtime.loader import load

    if adapter is None:
        raise ValueError("--format peft needs --adapter NAME")
    if lora_approx is not None and lora_approx < 1:
        raise ValueError(f"--lora-approx must be a rank >= 1, got {lora_approx}")
    pack, out = Path(pack), Path(out)
    t0 = time.perf_counter()
    info = _check(pack, out, adapter, overwrite)
    stored = info.adapters[adapter]  # formats.adapter_layout.Adapter, validated
    model = load(info)
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear) and adapter in m.adapter_names
    }
    dropped_nnz = sum(m.supports[adapter].nnz for m in layers.values() if adapter in m.sparse_values)
    summary: dict[str, Any] = {"out": str(out), "format": "peft", "adapter": adapter, "modules": len(layers)}
    base_model = str(model.sparsepack.pack.manifest.base.get("source", pack))
    if lora_approx is None:
        lowrank = {n: AdapterModule(shape=m.shape, A=m.A, B=m.B, alpha=m.alpha)
                   for n, m in stored.modules.items() if m.rank}  # fmt: skip
        if not lowrank and not any(m.rank for m in stored.modules.values()):  # sparse only: PEFT's SHiRA
            try:
                r = peft_shira_rank(stored)
            except NotShiraSizedError as e:
                raise NoLowRankError(f"adapter {adapter!r} is sparse only and not in PEFT SHiRA's sizing ({e}); "
                                     "pass --lora-approx RANK to turn it into a LoRA") from None  # fmt: skip
            with staged_dir(out, overwrite, inputs=[pack]) as tmp:
                write_peft_shira(tmp, stored, base_model=base_model)
            summary.update(peft_type="SHIRA", r=r, nnz=sum(m.nnz for m in stored.modules.values()),
                           sparse_dropped_nnz=0, lora_approx=None)  # fmt: skip
            summary["total_s"] = round(time.perf_counter() - t0, 2)
            return summary
        if not lowrank:
            raise NoLowRankError(f"adapter {adapter!r} has no low-rank part; pass --lora-approx RANK to turn the "
                                 "sparse part into a LoRA")  # fmt: skip
        meta = {"source_adapter": adapter, "sparse_dropped_nnz": dropped_nnz}
        with staged_dir(out, overwrite, inputs=[pack]) as tmp:
            write_adapter(tmp, Adapter(lowrank, method="lora", meta=meta), base_model=base_model)
        summary.update(sparse_dropped_nnz=dropped_nnz, lora_approx=None)
    else:
        modules, errors, err2_sum, tot2_sum = {}, {}, 0.0, 0.0
        for name, layer in layers.items():
            A, B, err2, tot2 = svd_factors(layer.delta_weight(adapter, torch.float32), lora_approx)
            modules[name] = AdapterModule(
                shape=(layer.out_features, layer.in_features), A=A, B=B, alpha=float(A.shape[0])
            )  # alpha = r: scaling 1, the factors carry it
            errors[name] = math.sqrt(err2 / tot2) if tot2 > 0 else 0.0
            err2_sum, tot2_sum = err2_sum + err2, tot2_sum + tot2
        meta = {"source_adapter": adapter, "lora_approx": lora_approx, "relative_error": errors}
        with staged_dir(out, overwrite, inputs=[pack]) as tmp:
            write_adapter(tmp, Adapter(modules, method="lora", meta=meta), base_model=base_model)
        summary.update(
            lora_approx=lora_approx, sparse_dropped_nnz=0,
            relative_error=math.sqrt(err2_sum / tot2_sum) if tot2_sum > 0 else 0.0,
            relative_error_max=max(errors.values(), default=0.0),
            relative_error_per_module=errors,
        )  # fmt: skip
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    return summary
