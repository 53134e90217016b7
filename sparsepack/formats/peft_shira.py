"""PEFT's own SHiRA adapter layout (peft >= 0.17, ``peft_type`` SHIRA), written from a sparse-only adapter.

``adapter_config.json``: ``{"peft_type": "SHIRA", "r", "mask_type": "random", "target_modules", ...}``;
``adapter_model.safetensors``: per module ``base_model.model.<module>.shira_weight`` fp32 ``[nnz]`` and
``base_model.model.<module>.shira_indices`` int32 ``[2, nnz]`` (rows, then columns), scaling 1. PEFT sizes every
SHiRA layer as ``r * (out + in)`` entries for one ``r`` (the parameter count of a rank-r LoRA), so only an adapter
sized that way (``finetune --method shira --budget N``) has this form; :func:`peft_shira_rank` says which.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparsepack.formats.adapter_layout import ADAPTER_META, LORA_CONFIG, LORA_WEIGHTS, PEFT_PREFIX, Adapter


class NotShiraSizedError(ValueError):
    """The adapter is not sparse-only, or its layers do not all hold ``r * (out + in)`` entries for one ``r``."""


def peft_shira_rank(adapter: Adapter) -> int:
    """The ``r`` with ``nnz == r * (out + in)`` in every module.

    Raises:
        NotShiraSizedError: a module has a low-rank part or no sparse part, or the sizes fit no single ``r``.
    """
    ranks = set()
    for name, m in adapter.modules.items():
        o, i = m.shape
        if m.rank or m.values is None:
            raise NotShiraSizedError(f"{name}: PEFT's SHiRA holds sparse values only (this module has rank {m.rank}"
                                     f"{'' if m.values is not None else ' and no sparse part'})")  # fmt: skip
        if m.nnz % (o + i):
            raise NotShiraSizedError(f"{name}: {m.nnz} entries is not r * (out + in) = r * {o + i} for any r, as "
                                     "PEFT's SHiRA needs; train with --method shira --budget N")  # fmt: skip
        ranks.add(m.nnz // (o + i))
    if len(ranks) != 1:
        raise NotShiraSizedError(f"the modules hold r * (out + in) entries for several r ({sorted(ranks)}); PEFT's "
                                 "SHiRA has one r: train with --method shira --budget N")  # fmt: skip
    return ranks.pop()


def write_peft_shira(directory: Path, adapter: Adapter, base_model: str = "") -> list[str]:
    """Write ``adapter`` into ``directory`` (which must exist) as a PEFT SHiRA adapter, plus sparsepack's own
    ``sparsepack_adapter.json`` record. Returns the file names written."""
    directory = Path(directory)
    r = peft_shira_rank(adapter)
    tensors = {}
    for name, m in adapter.modules.items():
        rows = torch.repeat_interleave(torch.arange(m.shape[0], dtype=torch.int32), torch.diff(m.row_ptr.long()))
        tensors[f"{PEFT_PREFIX}{name}.shira_weight"] = m.values.detach().float().contiguous()  # [nnz]
        tensors[f"{PEFT_PREFIX}{name}.shira_indices"] = torch.stack([rows, m.col_idx.to(torch.int32)])  # [2, nnz]
    save_file(tensors, str(directory / LORA_WEIGHTS))
    config = {"peft_type": "SHIRA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": r,
              "mask_type": "random", "random_seed": None, "target_modules": sorted(adapter.modules),
              "fan_in_fan_out": False, "init_weights": True, "inference_mode": True,
              "modules_to_save": None}  # fmt: skip
    (directory / LORA_CONFIG).write_text(json.dumps(config, indent=2))
    meta = {"method": adapter.method, "format": "peft-shira", "r": r, **adapter.meta}
    (directory / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    return [LORA_WEIGHTS, LORA_CONFIG, ADAPTER_META]
