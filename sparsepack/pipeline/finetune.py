"""finetune: train a correction on a pack's frozen base and write a new pack that carries it as an adapter.

The base (GPTQ pack, GPTQ checkpoint or plain HF model) is loaded with ``sparsepack.load``; the training loop
lives in ``trainer.py``; this module prepares data, handles checkpoints/resume and writes the output pack
(the source pack's files, hard-linked when possible, plus ``adapters/<name>/``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsepack.config import TrainConfig
from sparsepack.formats.adapter_layout import Adapter, write_adapter
from sparsepack.formats.manifest import MANIFEST_FILE, Manifest, StageRecord
from sparsepack.formats.pack import Pack, write_pack
from sparsepack.formats.staging import check_output, staged_file
from sparsepack.methods import base as methods
from sparsepack.pipeline import checkpoint as ckpt
from sparsepack.pipeline.trainer import Trainer, main_steps, plan_phases


@dataclass
class FinetuneResult:
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


class TeacherMismatchError(ValueError):
    """``--teacher`` is not the model the pack was compressed from (other architecture or dimensions)."""


# config fields that must agree between a pack's base and its teacher
_TEACHER_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim")  # fmt: skip


def check_teacher(student: torch.nn.Module, teacher: torch.nn.Module, names: list[str], teacher_dir: Path) -> None:
    """Raise :class:`TeacherMismatchError` unless ``teacher`` has the student's architecture and every
    adapted layer ``names`` as a linear of the same shape."""
    s_cfg, t_cfg = student.config.to_dict(), teacher.config.to_dict()
    for key in _TEACHER_KEYS:
        if s_cfg.get(key) != t_cfg.get(key):
            raise TeacherMismatchError(f"--teacher {teacher_dir}: {key} is {t_cfg.get(key)!r}, the pack's base has "
                                       f"{s_cfg.get(key)!r}; the teacher must be the model the pack was "
                                       "compressed from")  # fmt: skip
    for n in names:
        try:
            t = teacher.get_submodule(n)
        except AttributeError:
            raise TeacherMismatchError(f"--teacher {teacher_dir}: no module {n}") from None
        w = getattr(t, "weight", None)
        s = student.get_submodule(n)
        if not isinstance(t, torch.nn.Linear) or w is None or tuple(w.shape) != (s.out_features, s.in_features):
            raise TeacherMismatchError(f"--teacher {teacher_dir}: {n} is {type(t).__name__} "
                                       f"{tuple(w.shape) if w is not None else ''}, the pack's layer is "
                                       f"[{s.out_features}, {s.in_features}]")  # fmt: skip


def load_teacher(path: str | Path, device: str) -> torch.nn.Module:
    """The fp teacher, frozen, in eval mode (a quantized pack is refused: the residual needs ``W_fp``)."""
    from sparsepack.runtime.loader import load

    teacher = load(path, device=device, dtype=torch.float32)
    if teacher.sparsepack.pack.quant is not None:
        raise TeacherMismatchError(f"--teacher {path} is quantized; give the full-precision model directory")
    return teacher.requires_grad_(False).eval()


KL_SAMPLES_FILE = ckpt.KL_SAMPLES_FILE


def teacher_samples(teacher: torch.nn.Module, tokenizer, n: int, seqlen: int, seed: int, batch_size: int = 16,
                    progress: bool = True) -> torch.Tensor:  # fmt: skip
    """``[n, seqlen]`` token ids sampled from ``teacher`` (temperature 1, no top-k/top-p), each row starting at
    the tokenizer's BOS (EOS where there is none); EOS is held back until the row is full. Deterministic for a
    given ``seed`` on one machine; the global RNG is left as it was."""
    from tqdm.auto import tqdm

    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("--kl-data teacher: the tokenizer has neither a BOS nor an EOS token to start samples from")
    rows = []
    device = next(teacher.parameters()).device
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for i in tqdm(range(0, n, batch_size), desc="sampling the teacher", unit="batch", disable=not progress):
            ids = torch.full((min(batch_size, n - i), 1), start, dtype=torch.long, device=device)
            out = teacher.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                   top_k=0, top_p=1.0, max_new_tokens=seqlen - 1, min_new_tokens=seqlen - 1,
                                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else start)  # fmt: skip
            rows.append(out[:, :seqlen].cpu())
    return torch.cat(rows)


# --kl-samples auto: about four reads per sample (longer runs gain from more), between the two counts measured on the
# sample (docs/BENCHMARKS.md, Finetune, Quality).
KL_SAMPLES_MIN, KL_SAMPLES_MAX, KL_READS_PER_SAMPLE = 128, 512, 4


def kl_sample_count(cfg: TrainConfig, n_examples: int) -> int:
    """``--kl-samples``, or (auto) a quarter of the teacher sequences the run reads (one per training micro-batch
    of every phase) within ``[KL_SAMPLES_MIN, KL_SAMPLES_MAX]``."""
    if cfg.kl_samples is not None:
        return cfg.kl_samples
    steps = sum(p.steps for p in plan_phases(methods.get(cfg.method), cfg, main_steps(cfg, n_examples)))
    reads = steps * cfg.batch_size * cfg.grad_accum
    return min(KL_SAMPLES_MAX, max(KL_SAMPLES_MIN, reads // KL_READS_PER_SAMPLE))


def kl_examples(cfg: TrainConfig, tokenizer, teacher: torch.nn.Module, ckpt_dir: Path, n_examples: int,
                progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """The examples of the KL term's own data (``--kl-data``): a SOURCE read like ``--data``, or ``teacher``:
    :func:`kl_sample_count` sequences sampled from the teacher, saved in ``ckpt_dir`` so that a resumed run reads
    the same ones instead of sampling again. ``n_examples``: the training examples (for ``--epochs``)."""
    from safetensors.torch import load_file, save_file

    from sparsepack.pipeline.data import completion_examples

    if cfg.kl_source != "teacher":
        return completion_examples(tokenizer, cfg.kl_source, cfg.seqlen)
    path = ckpt_dir / KL_SAMPLES_FILE
    ids = load_file(str(path))["input_ids"] if path.is_file() else None
    n = kl_sample_count(cfg, n_examples)
    if ids is None or tuple(ids.shape) != (n, cfg.seqlen):
        ids = teacher_samples(teacher, tokenizer, n, cfg.seqlen, cfg.seed, progress=progress)
        with staged_file(path) as tmp:
            save_file({"input_ids": ids.contiguous()}, str(tmp))
    return [(row, row.clone()) for row in ids]


def default_checkpoint_dir(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / f"{out.name}.ckpt"


def finetune(pack: str | Path, out: str | Path, cfg: TrainConfig, overwrite: bool = False, resume: bool = False,
             checkpoint_dir: Path | None = None, progress: bool = True) -> FinetuneResult:  # fmt: skip
    """Train adapter ``cfg.adapter`` on the base at ``pack``; write the result as a pack at ``out``."""
    out = Path(out)
    inputs = run_inputs(pack, cfg)
    check_output(out, overwrite, inputs)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    created = not os.path.lexists(ckpt_dir)
    ckpt.claim(ckpt_dir, [*inputs, out])  # holds checkpoints only, so removing it later deletes nothing else
    try:
        with ckpt.exclusive(ckpt_dir):  # one run per output at a time: a second fails here with OutputBusyError
            return _finetune_locked(pack, out, cfg, overwrite, resume, ckpt_dir, progress, inputs)
    except BaseException:
        if created and ckpt.latest_checkpoint_name(ckpt_dir) is None:
            ckpt.remove(ckpt_dir)  # nothing to resume from: leave no empty OUT.ckpt behind
        raise


def run_inputs(pack: str | Path, cfg: TrainConfig) -> list[Path | None]:
    """Every path a finetune run reads: its output and checkpoints must overlap none of them."""
    from sparsepack.pipeline.data import source_path

    sources = (cfg.data, cfg.eval_data, cfg.kl_source if cfg.kl_source != "teacher" else None)
    return [Path(pack), Path(cfg.teacher) if cfg.teacher else None, *(source_path(s) for s in sources)]


def _finetune_locked(pack: str | Path, out: Path, cfg: TrainConfig, overwrite: bool, resume: bool, ckpt_dir: Path,
                     progress: bool, inputs: list[Path | None]) -> FinetuneResult:  # fmt: skip
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import completion_examples, token_windows
    from sparsepack.runtime.loader import load

    model = load(pack, device=cfg.device, dtype=torch.float32)
    src: Pack = model.sparsepack.pack
    tokenizer = load_tokenizer(pack)
    examples = completion_examples(tokenizer, cfg.data, cfg.seqlen)
    eval_windows = None
    if cfg.eval_data:
        eval_windows = token_windows(tokenizer, cfg.eval_data, cfg.seqlen, cfg.eval_windows)
    resume_from = ckpt.latest_checkpoint(ckpt_dir) if resume else None
    if resume and resume_from is None:
        warnings.warn(f"{ckpt_dir}: no checkpoint to resume from; starting from scratch", stacklevel=3)
    if resume_from is not None:  # CheckpointError on damage, CheckpointMismatchError (a ValueError) on changes
        ckpt.check_settings(resume_from, ckpt.read_state(resume_from), cfg.to_dict())
    else:
        ckpt.clear(ckpt_dir)  # a fresh run: stale checkpoints and metrics of an earlier run must not mix in

    teacher = None
    if cfg.teacher:
        from sparsepack.layers.inject import find_targets

        teacher = load_teacher(cfg.teacher, cfg.device)
        check_teacher(model, teacher, find_targets(model, cfg.target), Path(cfg.teacher))
    kl = kl_examples(cfg, tokenizer, teacher, ckpt_dir, len(examples), progress) if cfg.kl_source else None
    trainer = Trainer(model, tokenizer, cfg, examples, ckpt_dir, progress=progress, eval_windows=eval_windows,
                      teacher=teacher, kl_examples=kl)  # fmt: skip
    trainer.setup()
    if teacher is not None and cfg.kl_weight == 0:
        trainer.teacher = teacher = None  # only needed for the initialization: free it before training
    summary = trainer.run(resume_from)
    summary["examples"] = len(examples)
    if kl is not None:
        summary["kl_examples"] = len(kl)
    summary["trainable_params"] = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])

    adapter = Adapter(
        modules={n: layer.export_adapter(cfg.adapter) for n, layer in trainer.layers.items()},
        method=cfg.method,
        meta={"support": trainer.support_rule, "dropout": cfg.dropout, "training": summary,
              "config": cfg.to_dict()},  # fmt: skip
    )
    write_adapter_pack(src, out, cfg.adapter, adapter, StageRecord("finetune", cfg.to_dict(), summary=summary),
                       ckpt_dir, overwrite=overwrite, inputs=inputs)  # fmt: skip
    ckpt.remove(ckpt_dir)
    return FinetuneResult(out, summary, trainer.state.history)


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # packs are never modified in place, so sharing the inode is safe and free
    except OSError:
        shutil.copy2(src, dst)


def write_adapter_pack(src: Pack, out: Path, name: str, adapter: Adapter, record: StageRecord,
                       extras_dir: Path | None = None, overwrite: bool = False,
                       inputs: Iterable[Path | str | None] = ()) -> Path:  # fmt: skip
    """A new pack = ``src``'s files (minus any old adapter ``name``) + ``adapters/<name>/``."""
    manifest = copy.deepcopy(src.manifest) if src.kind == "sparsepack" else Manifest(
        base={"source": str(src.path), "model_type": src.config.model_type},
        quantization=dict(src.quant) if src.quant else None)  # fmt: skip

    def populate(tmp: Path) -> None:
        for path in sorted(p for p in src.path.rglob("*") if p.is_file()):
            rel = path.relative_to(src.path)
            if rel.as_posix() == MANIFEST_FILE or rel.parts[:2] == ("adapters", name):
                continue
            if src.kind == "sparsepack" and rel.as_posix() not in src.manifest.files:
                continue  # only what the source pack vouches for
            _link_or_copy(path, tmp / rel)
        adir = tmp / "adapters" / name
        adir.mkdir(parents=True)
        write_adapter(adir, adapter, base_model=str(src.manifest.base.get("source", src.path)))
        if extras_dir is not None and (extras_dir / "metrics.jsonl").is_file():
            shutil.copy2(extras_dir / "metrics.jsonl", adir / "metrics.jsonl")
            _plot_loss(adir / "metrics.jsonl", adir / "loss.png")
        manifest.adapters[name] = {
            "path": f"adapters/{name}", "method": adapter.method,
            "modules": len(adapter.modules),
            "parameters": sum(m.nnz + m.rank * sum(m.shape) for m in adapter.modules.values()),
        }  # fmt: skip

    manifest.history.append(record)
    return write_pack(out, manifest, populate, overwrite, inputs=[src.path, *inputs])


def _plot_loss(metrics: Path, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    for phase in dict.fromkeys(r["phase"] for r in rows):
        pts = [(r["step"], r["loss"]) for r in rows if r["phase"] == phase]
        ax.plot(*zip(*pts, strict=True), label=phase)
    evals = [(r["step"], r["eval_ppl"]) for r in rows if r.get("eval_ppl")]
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals, strict=True), "k--", marker="o", label="eval ppl")
        ax2.set_ylabel("held-out perplexity")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
