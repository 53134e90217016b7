"""Training checkpoints: safetensors + JSON only (no pickle), written atomically, enough to resume bit for bit.

``DIR/step-000123/`` holds ``state.safetensors`` (trainable tensors, sparse supports, AdamW moments, RNG
states as uint8) and ``state.json`` (phase, step, data cursor, optimizer scalars, config). ``DIR/latest`` names
the newest complete checkpoint; it is replaced with an atomic rename only after that checkpoint is in place,
so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsepack.formats.errors import FormatError
from sparsepack.formats.pack import staged_dir

KEEP = 2  # complete checkpoints kept


def save_checkpoint(directory: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"step-{step:07d}"
    with staged_dir(target, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    pointer = directory / "latest.tmp"
    pointer.write_text(target.name)
    os.replace(pointer, directory / "latest")
    done = sorted(p for p in directory.glob("step-*") if p.is_dir())
    for old in done[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = Path(directory) / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if "/" in name or name.startswith("."):
        raise FormatError(f"invalid checkpoint pointer {name!r}", pointer)
    path = Path(directory) / name
    return path if path.is_dir() else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"unreadable checkpoint state ({e})", path) from None
    return load_file(str(path / "state.safetensors")), meta


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW moments as tensors keyed by parameter name; scalar state (steps) as JSON."""
    tensors, scalars = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            name = names[id(p)]
            for key, val in st.items():
                if isinstance(val, torch.Tensor) and val.dim() > 0:
                    tensors[f"opt.{key}.{name}"] = val
                else:
                    scalars[f"{key}.{name}"] = float(val)
    return tensors, scalars


def load_optimizer_state(opt: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor],
                         scalars: dict[str, float]) -> None:  # fmt: skip
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            st = {}
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if f"opt.{key}.{name}" in tensors:
                    st[key] = tensors[f"opt.{key}.{name}"].to(p.device)
            if f"step.{name}" in scalars:
                st["step"] = torch.tensor(scalars[f"step.{name}"], dtype=torch.float32)
            if st:
                opt.state[p] = st
