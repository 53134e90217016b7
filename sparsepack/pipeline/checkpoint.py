"""Training checkpoints: safetensors + JSON only (no pickle), written atomically, enough to resume bit for bit.

``DIR/step-000123/`` holds ``state.safetensors`` (trainable tensors, sparse supports, AdamW moments, RNG
states as uint8) and ``state.json`` (phase, step, data cursor, optimizer scalars, config, and the size and
sha256 of ``state.safetensors``). ``DIR/latest`` names the newest complete checkpoint; it is replaced with an
atomic rename only after that checkpoint is in place, so a crash at any point leaves the previous checkpoint
usable. Each ``step-N`` is written through ``staged_dir``; a save killed half-way leaves a
``.step-N.tmp-PID@HOST-*`` sibling, which the next save (of any step) removes once its writer is dead.

``DIR/.lock`` (``flock``, released by the kernel when the holder dies; :func:`exclusive`) makes one run at a
time own ``DIR``: a second run writing the same output fails at once with ``OutputBusyError`` instead of
mixing its checkpoints and metrics with the first's.

:func:`load_checkpoint` trusts nothing it reads: every missing, truncated or corrupt file, a wrong type or
shape, indices out of range, or settings differing from the resuming run raise a
:class:`~sparsepack.formats.errors.CheckpointError` naming the file, before any tensor is allocated from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsepack.formats.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ForeignOutputError,
    MissingFileError,
    OutputBusyError,
    SafetensorsHeaderError,
)
from sparsepack.formats.json_file import read_json
from sparsepack.formats.manifest import sha256_file
from sparsepack.formats.pack import check_links
from sparsepack.formats.safetensors_check import read_header
from sparsepack.formats.staging import (
    SIBLING_RE,
    check_placement,
    clean_stale_siblings,
    replace_file,
    staged_dir,
    stale_file_tmp,
)

KEEP = 2  # complete checkpoints kept
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
LOCK_FILE = ".lock"
DIR_MARKER = "sparsepack_checkpoints.json"  # marks a directory as ours to fill and delete (formats.staging)
KL_SAMPLES_FILE = "kl_samples.safetensors"  # --kl-data teacher: the sampled ids, kept beside the checkpoints
METRICS_FILE = "metrics.jsonl"
MAX_STATE_JSON = 64 << 20  # bytes: far above any real state.json (one scalar per trained tensor)
_STEP_RE = re.compile(r"^step-\d{7,}$")
IGNORED_SETTINGS = ("device", "save_every")  # may change between a run and its resume
# settings a checkpoint predates that then behaved otherwise than today's default: the KL term read the training
# batches before --kl-data existed
LEGACY_SETTINGS = {"kl_data": "batch"}


# ------------------------------------------------------------------------------------------------ writing


def clean_stale_saves(directory: Path) -> list[Path]:
    """Remove staging directories of checkpoint saves whose writer died (any step, not only the next one)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = {m["name"] for p in directory.iterdir() if (m := SIBLING_RE.match(p.name))}
    removed = []
    for name in sorted(names):
        removed += clean_stale_siblings(directory / name)
    return removed


def save_checkpoint(directory: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clean_stale_saves(directory)
    target = directory / f"step-{step:07d}"
    with staged_dir(target, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
        files = {STATE_TENSORS: {"sha256": sha256_file(tmp / STATE_TENSORS),
                                 "bytes": (tmp / STATE_TENSORS).stat().st_size}}  # fmt: skip
        (tmp / STATE_JSON).write_text(json.dumps({**meta, "files": files}, indent=2))
    _point_latest(directory, target.name)
    done = sorted(p for p in directory.glob("step-*") if p.is_dir() and _STEP_RE.match(p.name))
    for old in done[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    for p in [*directory.glob("latest.tmp-*"), *directory.glob(f"{METRICS_FILE}.tmp-*")]:  # of killed writers
        if stale_file_tmp(p.name):
            p.unlink(missing_ok=True)
    return target


def _point_latest(directory: Path, name: str) -> None:
    replace_file(directory / "latest", name)  # only once the checkpoint it names is complete and in place


# ------------------------------------------------------------------------------------------------ the directory


def _is_own_entry(name: str) -> bool:
    """A name this module (or the finetune run it serves) writes into a checkpoint directory."""
    fixed = (LOCK_FILE, DIR_MARKER, "latest", METRICS_FILE, KL_SAMPLES_FILE)
    tmps = ("latest.tmp-", f"{METRICS_FILE}.tmp-", f"{KL_SAMPLES_FILE}.tmp")
    return name in fixed or name.startswith(tmps) or bool(_STEP_RE.match(name) or SIBLING_RE.match(name))


def claim(directory: Path, inputs: list[Path | str | None] = ()) -> Path:
    """Make ``directory`` this run's checkpoint directory: new, empty, or one that holds only checkpoint files.

    It then carries :data:`DIR_MARKER`. Anything else (a pack, a data folder, a user's notes) is refused, so that
    :func:`clear` and :func:`remove` can never delete what this tool did not write.

    Raises:
        OutputOverlapsInputError: ``directory`` is, holds or lies inside one of ``inputs`` (the pack, the output...).
        ForeignOutputError: it exists and holds files that are not checkpoints, or is not a directory.
    """
    directory = Path(directory).absolute()
    check_placement(directory, inputs, "--checkpoint-dir")
    if os.path.lexists(directory):
        if directory.is_symlink() or not directory.is_dir():
            raise ForeignOutputError("--checkpoint-dir exists and is not a directory", directory)
        foreign = sorted(p.name for p in directory.iterdir() if not _is_own_entry(p.name))
        if foreign:
            raise ForeignOutputError(f"--checkpoint-dir holds files that are not sparsepack checkpoints (e.g. "
                                     f"{foreign[0]!r}); refusing to use it: choose an empty or new directory",
                                     directory)  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / DIR_MARKER).is_file():
        replace_file(directory / DIR_MARKER, json.dumps({"format": "sparsepack-checkpoints", "version": 1}) + "\n")
    return directory


@contextlib.contextmanager
def exclusive(directory: Path) -> Iterator[Path]:
    """Own checkpoint ``directory`` for one run (created if needed): hold an ``flock`` on ``DIR/.lock``.

    The kernel releases the lock when the holder exits or is killed, so a crashed run never blocks the next.

    Raises:
        OutputBusyError: another live process holds the lock (it is writing the same output).
    """
    directory = Path(directory)
    lock = directory / LOCK_FILE
    for _ in range(100):  # retried only if the holder removed the directory between our open and our lock
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            msg = (f"another run (pid {holder}) is writing this output and holds its checkpoint directory; "
                   "wait for it to finish or choose another --output")  # fmt: skip
            raise OutputBusyError(msg, directory) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputBusyError("cannot lock the checkpoint directory (it keeps disappearing)", directory)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield directory
    finally:
        os.close(fd)


def clear(directory: Path) -> None:
    """Delete the checkpoint files in ``directory`` (not its lock or marker, never a name this module does not
    write): a fresh run must not mix in an earlier run's files."""
    for p in Path(directory).iterdir():
        if p.name in (LOCK_FILE, DIR_MARKER) or not _is_own_entry(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def remove(directory: Path) -> None:
    """Delete a checkpoint directory after its run: its checkpoint files, then the directory itself if nothing
    else is left in it (a file someone put there since is kept, and so is the directory)."""
    directory = Path(directory)
    if not (directory / DIR_MARKER).is_file():
        return
    clear(directory)
    for name in (DIR_MARKER, LOCK_FILE):
        (directory / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


def trim_metrics(path: Path, step: int) -> None:
    """Drop the rows of ``metrics.jsonl`` logged after ``step``: a resume from that step logs them again.

    Unparsable lines (a write cut by a crash) go too. The file is replaced atomically.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    replace_file(path, "".join(f"{line}\n" for line in kept))


def latest_checkpoint_name(directory: Path) -> str | None:
    """What ``DIR/latest`` names, unchecked (None when there is no pointer)."""
    try:
        return (Path(directory) / "latest").read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = Path(directory) / "latest"
    if not os.path.lexists(pointer):
        return None
    try:
        if not pointer.is_file() or pointer.stat().st_size > 256:
            raise CheckpointError("not a small regular file", pointer)
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable checkpoint pointer ({e})", pointer) from None
    if not _STEP_RE.match(name):
        raise CheckpointError(f"invalid checkpoint pointer {name!r}", pointer)
    path = Path(directory) / name
    if not path.is_dir() or path.is_symlink():
        raise MissingFileError(f"names checkpoint {name}, which is absent (restart without --resume)", pointer)
    return path


# ------------------------------------------------------------------------------------------------ reading


def _is_int(v: object, lo: int = 0) -> bool:
    return type(v) is int and lo <= v < 2**62


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of checkpoint ``path``, its fields type-checked (raises :class:`CheckpointError`)."""
    path = Path(path)
    file = path / STATE_JSON
    if not path.is_dir():
        raise MissingFileError("checkpoint directory is absent", path)
    check_links(path)  # UnsafePathError: a symlink out of the checkpoint
    if not file.is_file():
        raise MissingFileError("checkpoint state is absent", file)
    meta = read_json(file, CheckpointError, MAX_STATE_JSON)
    if not isinstance(meta, dict):
        raise CheckpointError("not a JSON object", file)

    def bad(field: str, want: str) -> CheckpointError:
        return CheckpointError(f"field {field!r} must be {want}, got {meta.get(field)!r:.80}", file)

    for key in ("phase", "step", "global_step", "tokens"):
        if not _is_int(meta.get(key)):
            raise bad(key, "a non-negative integer")
    cursor = meta.get("cursor")
    if not (isinstance(cursor, list) and len(cursor) == 2 and all(_is_int(c) for c in cursor)):
        raise bad("cursor", "[epoch, position] (non-negative integers)")
    scalars = meta.get("optimizer_scalars")
    if not isinstance(scalars, dict) or not all(
        isinstance(k, str) and type(v) in (int, float) and math.isfinite(v) and 0 <= v < 2**53
        for k, v in scalars.items()
    ):  # fmt: skip
        raise bad("optimizer_scalars", "an object of finite non-negative numbers")
    if not isinstance(meta.get("config"), dict):
        raise bad("config", "an object")
    if type(meta.get("sparse_in_optimizer")) is not bool:
        raise bad("sparse_in_optimizer", "true or false")
    files = meta.get("files")
    info = files.get(STATE_TENSORS) if isinstance(files, dict) else None
    if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and _is_int(info.get("bytes"))):
        raise CheckpointError(f"no valid 'files' record of {STATE_TENSORS} (written by an older sparsepack? "
                              "restart without --resume)", file)  # fmt: skip
    return meta


def check_settings(path: Path, meta: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse to resume from ``path`` with settings other than those it was trained with. A setting the checkpoint
    predates counts as its default (the behaviour of the version that wrote it)."""
    from sparsepack.config import TrainConfig

    saved = meta["config"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | LEGACY_SETTINGS
    changed = sorted(k for k, v in settings.items() if saved.get(k, defaults.get(k)) != v and k not in IGNORED_SETTINGS)
    if changed:
        raise CheckpointMismatchError(f"resuming needs the same settings; these differ: {changed}",
                                      Path(path) / STATE_JSON)  # fmt: skip


def _read_tensors(path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    file = path / STATE_TENSORS
    if not file.is_file():
        raise MissingFileError("checkpoint tensors are absent", file)
    want = meta["files"][STATE_TENSORS]
    size = file.stat().st_size
    if size != want["bytes"]:
        raise CheckpointError(f"size {size} != {want['bytes']} recorded in {STATE_JSON} (truncated?)", file)
    if sha256_file(file) != want["sha256"]:
        raise CheckpointError(f"sha256 differs from {STATE_JSON} (file modified or corrupt)", file)
    read_header(file)  # typed errors before the library maps anything
    try:
        return load_file(str(file))
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: whatever our header check let through
        raise SafetensorsHeaderError(f"{type(e).__name__}: {e}", file) from None


def load_checkpoint(path: Path, trainer: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check checkpoint ``path``; with ``trainer`` (a set-up ``Trainer``) also check that it fits it.

    Raises :class:`CheckpointError` (or :class:`MissingFileError`, :class:`SafetensorsHeaderError`) naming the
    file for any damage, and :class:`CheckpointMismatchError` when the trainer's settings differ.
    """
    path = Path(path)
    meta = read_state(path)
    if trainer is not None:
        check_settings(path, meta, trainer.cfg.to_dict())
    tensors = _read_tensors(path, meta)
    file = path / STATE_TENSORS
    rng = tensors.get("rng.torch")
    ref = torch.get_rng_state()
    if rng is None or rng.dtype != torch.uint8 or rng.shape != ref.shape:
        raise CheckpointError(f"'rng.torch' must be uint8 {list(ref.shape)}", file, "rng.torch")
    if trainer is not None:
        check_fits(path, tensors, meta, trainer)
    return tensors, meta


def _want(cond: bool, msg: str, file: Path, tensor: str | None = None) -> None:
    if not cond:
        raise CheckpointError(msg, file, tensor)


def check_fits(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], trainer: Any) -> None:
    """Every tensor and counter of the checkpoint fits ``trainer`` (its layers, phases, data): nothing else."""
    file, jfile = path / STATE_TENSORS, path / STATE_JSON
    a = trainer.cfg.adapter
    phase = meta["phase"]
    _want(phase <= len(trainer.phases), f"phase {phase} but this run has {len(trainer.phases)} phases", jfile)
    steps = trainer.phases[phase].steps if phase < len(trainer.phases) else 0  # the end: saved at the last step
    _want(meta["step"] <= steps, f"step {meta['step']} past the {steps} steps of phase {phase}", jfile)
    epoch, position = meta["cursor"]
    n_examples = len(trainer.batcher.examples)
    _want(position <= n_examples, f"cursor position {position} past the {n_examples} examples", jfile)
    selected = any(p.name == "select" for p in trainer.phases[:phase])
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"rng.torch": (tuple(torch.get_rng_state().shape),
                                                                             torch.uint8)}  # fmt: skip
    if "rng.cuda" in tensors:
        expected["rng.cuda"] = (tuple(tensors["rng.cuda"].shape), torch.uint8)
    params: dict[str, tuple[int, ...]] = {}
    for n, layer in trainer.layers.items():
        if a in layer.lora_A:
            params[f"{n}.A"] = tuple(layer.lora_A[a].shape)
            params[f"{n}.B"] = tuple(layer.lora_B[a].shape)
        if selected and f"{n}.S" in tensors:
            nnz = tensors[f"{n}.S"].shape[0] if tensors[f"{n}.S"].dim() == 1 else -1
            _want(nnz == trainer.budgets[n].nnz, f"{nnz} sparse values, the budget is {trainer.budgets[n].nnz}",
                  file, f"{n}.S")  # fmt: skip
            params[f"{n}.S"] = (nnz,)
            expected[f"{n}.row_ptr"] = ((layer.out_features + 1,), torch.int32)
            expected[f"{n}.col_idx"] = ((nnz,), torch.int32)
        elif selected and trainer.budgets[n].nnz > 0:
            raise CheckpointError("sparse values missing after support selection", file, f"{n}.S")
    expected.update({k: (s, torch.float32) for k, s in params.items()})
    moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for key in tensors:
        if key.startswith("opt."):
            kind, _, pname = key[4:].partition(".")
            _want(kind in moments and pname in params, "optimizer state of no trained tensor", file, key)
            expected[key] = (params[pname], torch.float32)
    for key, (shape, dtype) in expected.items():
        t = tensors.get(key)
        _want(t is not None, "missing", file, key)
        _want(tuple(t.shape) == shape and t.dtype == dtype,
              f"{t.dtype} {list(t.shape)} != expected {dtype} {list(shape)}", file, key)  # fmt: skip
    extra = sorted(set(tensors) - set(expected))
    _want(not extra, f"{len(extra)} tensors this run does not have", file, extra[0] if extra else None)
    for key, (_shape, dtype) in expected.items():
        if dtype == torch.float32:
            _want(bool(torch.isfinite(tensors[key]).all()), "holds NaN or infinite values", file, key)
    for n, layer in trainer.layers.items():
        if f"{n}.row_ptr" not in tensors:
            continue
        rp, ci = tensors[f"{n}.row_ptr"], tensors[f"{n}.col_idx"]
        nnz = ci.numel()
        _want(int(rp[0]) == 0 and int(rp[-1]) == nnz and bool((rp[1:] >= rp[:-1]).all()),
              f"row_ptr must rise from 0 to nnz = {nnz}", file, f"{n}.row_ptr")  # fmt: skip
        _want(nnz == 0 or (int(ci.min()) >= 0 and int(ci.max()) < layer.in_features),
              f"col_idx outside [0, {layer.in_features})", file, f"{n}.col_idx")  # fmt: skip
    scalars = meta["optimizer_scalars"]
    for key in scalars:
        kind, _, pname = key.partition(".")
        _want(kind == "step" and pname in params, f"optimizer scalar {key!r} of no trained tensor", jfile)
    for pname in params:
        has = [f"opt.{m}.{pname}" in tensors for m in moments[:2]]
        _want(all(has) == any(has) == (f"step.{pname}" in scalars),
              "AdamW state incomplete (moments and step must come together)", file, pname)  # fmt: skip
    if not meta["sparse_in_optimizer"]:
        _want(not any(f"opt.{m}.{p}" in tensors for m in moments for p in params if p.endswith(".S")),
              "optimizer state for sparse values that are not trained", file)  # fmt: skip


# ------------------------------------------------------------------------------------------------ state


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
