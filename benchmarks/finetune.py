"""Finetune speed, memory and quality, side by side with PEFT LoRA, on the SmolLM2-135M sample (CPU).

Speed and memory (``--part speed``): every configuration runs in its own child process (so its peak RSS is its
own), on the same token windows (``stdlib:pydoc@train``, batch 4 x 128, one micro-batch per optimizer step),
``--steps`` steps each (the first is a warm-up, excluded); the kinds alternate for ``--rounds`` rounds and the
headline ratios are medians over rounds of ``ours / PEFT`` from the same round, so a load change on the shared
machine hits both sides. Kinds: PEFT LoRA r=16 all-linear on the fp32 sample (the peer); RoSA r=16 d=0.6% on the
same fp32 base; RoSA on the 4-bit g64 pack. RoSA's support is drawn at random there, since only the joint
phase's step time is compared; the cost of Fisher support selection is measured separately (``selection``: a
few training steps, then selection over ``SELECT_SAMPLES`` samples; its extra peak over training comes from the
kernel's peak-RSS counter ``VmHWM``, reset between the two).

Quality (``--part quality``): the CLI end to end (``sparsepack finetune`` then ``sparsepack eval``) on the 4-bit
g64 pack and the fp32 sample, same steps and data, equal trainable-parameter budgets; held-out perplexity on
``stdlib:pydoc@eval`` and on the coreutils info manual.

    python benchmarks/finetune.py --json out/bench_finetune.json --md docs/BENCHMARKS.md [--part speed|quality]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Import from the repo root, and drop benchmarks/ itself from the path: benchmarks/onnx.py would shadow the onnx
# package and benchmarks/kernels.py the `kernels` package that transformers probes for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import LoadMonitor, child_env, machine_info, run_timed, sample_model, write_md_part  # noqa: E402

BATCH, SEQLEN, RANK, ALPHA, DENSITY = 4, 128, 16, 16.0, 0.006
SELECT_SAMPLES = 16  # support selection: examples scored (the CLI default is 32; halved to fit the shared machine)
SECTION = "## Finetune"
SPEED_HEADINGS = ("### Speed and memory", "### Support selection")


# ------------------------------------------------------------------------------------------------ children


def _status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process from /proc, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _windows(tokenizer, n):
    from sparsepack.pipeline.data import token_windows

    return token_windows(tokenizer, "stdlib:pydoc@train", SEQLEN, n)


def _nbytes(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _ours(base: str, tok, windows, method: str = "rosa", **kw):
    """Our trainer on ``base`` with a random support (rosa) and its optimizer built, as in the joint phase."""
    import torch

    from sparsepack.config import TrainConfig
    from sparsepack.methods.masks import SUPPORT_RULES, SupportContext
    from sparsepack.pipeline.trainer import Trainer
    from sparsepack.runtime.loader import load

    model = load(base, dtype=torch.float32)
    stages = {"after_load": _status_mb("VmRSS")}
    cfg = TrainConfig(method=method, rank=RANK, alpha=ALPHA, density=DENSITY, batch_size=BATCH, grad_accum=1,
                      seqlen=SEQLEN, steps=100, warmup_steps=0, **kw)  # fmt: skip
    tr = Trainer(model, tok, cfg, [(w, w.clone()) for w in windows], None, progress=False)
    tr.setup()
    if method == "rosa" and "mask_samples" not in kw:
        ctx = SupportContext(
            shapes={n: (m.out_features, m.in_features) for n, m in tr.layers.items()},
            nnz={n: b.nnz for n, b in tr.budgets.items()}, base_weight=None, scores=None, groups=[],
            generator=torch.Generator().manual_seed(0))  # fmt: skip
        for n, s in SUPPORT_RULES.get("random")(ctx).items():
            tr.layers[n].set_support(cfg.adapter, s)
        tr._build_optimizer(with_sparse=True)
    else:
        tr._build_optimizer(with_sparse=False)
    stages["after_setup"] = _status_mb("VmRSS")
    return tr, stages


def _base_bytes(model) -> float:
    from sparsepack.layers.adapter_linear import SparseLowRankLinear

    adapter = {id(t) for m in model.modules() if isinstance(m, SparseLowRankLinear)
               for d in (m.lora_A, m.lora_B, m.sparse_values) for t in d.values()}  # fmt: skip
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in adapter:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**20


def worker(kind: str, model_dir: str, pack: str, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    from sparsepack.formats.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    windows = _windows(tok, BATCH * (steps + 1))
    stages = {"start": _status_mb("VmRSS")}
    times, cpu = [], []
    if kind == "peft-lora":
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        stages["after_load"] = _status_mb("VmRSS")
        cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules="all-linear",
                              task_type="CAUSAL_LM")  # fmt: skip
        model = peft.get_peft_model(model, cfg)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=7e-4)
        stages["after_setup"] = _status_mb("VmRSS")
        base_mb = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad) / 2**20

        def step(i: int) -> None:  # what our trainer does per step: forward, backward, clip, AdamW
            ids = windows[i * BATCH : (i + 1) * BATCH]
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        params = trainable
    else:
        base = pack if kind.endswith("4bit") else model_dir
        tr, more = _ours(base, tok, windows, "lora" if kind.startswith("lora") else "rosa")
        stages.update(more)
        tr.model.train()
        base_mb = _base_bytes(tr.model)

        def step(i: int) -> None:
            tr._train_step(tr.phases[-1])
            tr.state.step += 1

        params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(i)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            stages["after_step1"] = _status_mb("VmRSS")
    trainable_mb = _nbytes(params)
    return {"kind": kind, "step_s": statistics.median(times[1:]), "step_cpu_s": statistics.median(cpu[1:]),
            "step_times": times, "steps": steps, "trainable_params": sum(p.numel() for p in params),
            "peak_rss_mb": _status_mb("VmHWM"), "rss_stages_mb": stages,
            "bytes_mb": {"base": base_mb, "trainable": trainable_mb, "grads": trainable_mb,
                         "adamw_state": 2 * trainable_mb},
            "loadavg": os.getloadavg()}  # fmt: skip


def selection_worker(pack: str, model_dir: str, train_steps: int = 2) -> dict:
    """RoSA support selection (fisher rule, default memory budget) after a few warm-up steps."""
    from sparsepack.formats.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    windows = _windows(tok, 64)
    tr, _ = _ours(pack, tok, windows, "rosa", mask_samples=SELECT_SAMPLES)
    tr.model.train()
    for _ in range(train_steps):  # low-rank warm-up steps: the training peak selection is compared with
        tr._train_step(tr.phases[-1])
        tr.state.step += 1
    train_peak = _status_mb("VmHWM")
    _reset_peak()
    info = tr._select_support()
    return {"kind": "selection", **info, "train_peak_rss_mb": train_peak, "selection_peak_rss_mb": _status_mb("VmHWM"),
            "extra_peak_mb": _status_mb("VmHWM") - train_peak, "train_steps": train_steps,
            "mask_samples": SELECT_SAMPLES, "fisher_budget": tr.cfg.fisher_budget,
            "loadavg": os.getloadavg()}  # fmt: skip


# ------------------------------------------------------------------------------------------------ speed


def run_speed(args, log_dir: Path) -> dict:
    kinds = args.kinds.split(",")
    rounds: list[dict[str, dict]] = []
    env = child_env(args.threads, NUMBA_NUM_THREADS=str(args.threads))
    with LoadMonitor() as load:
        for r in range(args.rounds):
            got = {}
            for kind in kinds if r % 2 == 0 else kinds[::-1]:  # alternate the order too
                if kind == "selection" and r > 0:
                    continue
                cmd = [sys.executable, __file__, "--json", "/dev/null", "--steps", str(args.steps), "--pack",
                       args.pack, "--_worker", kind]  # fmt: skip
                run = run_timed(cmd, log_dir / f"{kind}-{r}.log", env=env)
                got[kind] = {**run.result, "time_v_peak_rss_mb": run.peak_rss_mb}
                print(f"round {r} {kind}: {json.dumps({k: v for k, v in got[kind].items() if k != 'step_times'})}",
                      flush=True)  # fmt: skip
            rounds.append(got)
    ratios = {}
    for kind in kinds:
        if kind in ("peft-lora", "selection"):
            continue
        st = [g[kind]["step_s"] / g["peft-lora"]["step_s"] for g in rounds if kind in g and "peft-lora" in g]
        cpu = [g[kind]["step_cpu_s"] / g["peft-lora"]["step_cpu_s"] for g in rounds if kind in g and "peft-lora" in g]
        mem = [g[kind]["peak_rss_mb"] / g["peft-lora"]["peak_rss_mb"] for g in rounds if kind in g and "peft-lora" in g]
        ratios[kind] = {"step_time": statistics.median(st), "step_cpu": statistics.median(cpu),
                        "peak_rss": statistics.median(mem), "per_round_step_time": st}  # fmt: skip
    return {"rounds": rounds, "ratios": ratios, "load": load.summary()}


def speed_markdown(res: dict, meta: dict, cmd: str) -> str:
    rounds, ratios = res["rounds"], res["ratios"]

    def med(kind, key):
        vals = [g[kind][key] for g in rounds if kind in g]
        return statistics.median(vals) if vals else float("nan")

    names = {"peft-lora": "PEFT LoRA r=16, fp32 base (peer)", "rosa": "RoSA r=16 d=0.6%, fp32 base",
             "lora": "our LoRA r=16, fp32 base", "rosa-4bit": "RoSA r=16 d=0.6%, 4-bit g64 base"}  # fmt: skip
    goals = {"rosa": ("<= 1.15", "<= 1.05")}
    lines = [SPEED_HEADINGS[0], "", f"`{cmd}`", "",
             "| run | trainable params | step s (median) | vs PEFT | CPU s/step | vs PEFT | peak RSS MB | vs PEFT "
             "| goal |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in names:
        if not any(kind in g for g in rounds):
            continue
        r = ratios.get(kind)
        g = goals.get(kind)
        goal = ""
        if g and r:
            verdict = {True: "met", False: "**missed**"}
            goal = (f"time {g[0]}: {verdict[r['step_time'] <= 1.15]}; "
                    f"RSS {g[1]}: {verdict[r['peak_rss'] <= 1.05]}")  # fmt: skip
        trainable = next(x[kind]["trainable_params"] for x in rounds if kind in x)
        rt, rc, rm = ("1", "1", "1") if r is None else (f"{r[k]:.2f}" for k in ("step_time", "step_cpu", "peak_rss"))
        lines.append(
            f"| {names[kind]} | {trainable:,} | {med(kind, 'step_s'):.2f} | {rt} | {med(kind, 'step_cpu_s'):.2f} | "
            f"{rc} | {med(kind, 'peak_rss_mb'):.0f} | {rm} | {goal} |"
        )
    lines += ["", "Memory breakdown (MB; RSS at each stage of one run, tensor bytes from the model):", "",
              "| run | RSS: start | after load | after setup | after step 1 | peak | base weights | trainable | "
              "grads + AdamW state |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in names:
        row = next((g[kind] for g in rounds if kind in g), None)
        if row is None:
            continue
        s, b = row["rss_stages_mb"], row["bytes_mb"]
        lines.append(f"| {names[kind]} | {s['start']:.0f} | {s['after_load']:.0f} | {s['after_setup']:.0f} | "
                     f"{s['after_step1']:.0f} | {row['peak_rss_mb']:.0f} | {b['base']:.0f} | {b['trainable']:.1f} | "
                     f"{b['grads'] + b['adamw_state']:.1f} |")  # fmt: skip
    ld = res["load"]
    per_round = "; ".join(f"{k}: " + ", ".join(f"{x:.2f}" for x in v["per_round_step_time"]) for k, v in ratios.items())
    lines += ["", f"Batch {BATCH} x {SEQLEN} tokens, fp32, one micro-batch per step, {meta['steps']} steps per run "
              f"(first excluded), {len(rounds)} alternating rounds, each run its own process; torch and numba "
              f"{meta['threads']} threads; ratios are medians over rounds of ours / PEFT in the same round "
              f"(per round step-time ratios: {per_round}). Peak RSS is the child's VmHWM. Load average "
              f"(1 min) {ld['load1_min']}-{ld['load1_max']}, mean {ld['load1_mean']} on {meta['cores']} cores; "
              f"{meta['time']}."]  # fmt: skip
    sel = next((g["selection"] for g in rounds if "selection" in g), None)
    if sel:
        lines += ["", SPEED_HEADINGS[1], "",
                  "| base | samples | passes (memory budget) | time s | training peak RSS MB | selection peak RSS MB "
                  "| extra over training |", "|---|---|---|---|---|---|---|",
                  f"| 4-bit g64 | {sel['mask_samples']} | {sel['passes']} ({sel['fisher_budget']:.0%} of adapted "
                  f"weights) | {sel['seconds']:.1f} | {sel['train_peak_rss_mb']:.0f} | "
                  f"{sel['selection_peak_rss_mb']:.0f} | {sel['extra_peak_mb']:+.0f} MB "
                  f"({sel['extra_peak_mb'] / sel['train_peak_rss_mb']:+.1%}) |", "",
                  f"After {sel['train_steps']} low-rank training steps (batch {BATCH} x {SEQLEN}) the peak counter is "
                  "reset, then the support of every adapted layer is chosen from the mean squared dense gradient "
                  f"over {sel['mask_samples']} samples, streamed in groups; load average at the end "
                  f"{sel['loadavg'][0]:.2f}."]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ quality

Q_SEQLEN, Q_EVAL_SEQLEN = 128, 256
# windows scored per text: None = all (pydoc@eval has 46); N = N windows spread over the text (``eval --spread``).
# Tables before 2026-11-25 used the first 16 windows of each; benchmarks/quality_eval.py re-scored their runs.
Q_EVAL_WINDOWS = {"pydoc": None, "coreutils": 64}
Q_RANK_LORA = 18  # LoRA rank whose parameter count matches RoSA r=16 d=0.6% on SmolLM2-135M (within 0.5%)


def quality_runs(pack: str, model_dir: str, steps: int, warmup: int, seed: int = 0) -> list[dict]:
    """The configurations of the quality table: (label, base, finetune flags or None for the bare base)."""
    common = ["--data", "stdlib:pydoc@train", "--batch-size", str(BATCH), "--grad-accum", "1", "--seqlen",
              str(Q_SEQLEN), "--lr-lowrank", "1e-3", "--lr", "4e-4", "--seed", str(seed)]  # fmt: skip
    lora = [*common, "--method", "lora", "--rank", str(Q_RANK_LORA), "--steps", str(steps + warmup)]
    rosa = [*common, "--method", "rosa", "--rank", str(RANK), "--density", str(DENSITY)]
    return [
        {"label": "fp32", "base": model_dir, "train": None},
        {"label": "4-bit g64", "base": pack, "train": None},
        {"label": f"4-bit + LoRA r={Q_RANK_LORA}", "base": pack, "train": lora},
        {"label": "4-bit + RoSA r=16 d=0.6%", "base": pack,
         "train": [*rosa, "--warmup-steps", str(warmup), "--mask-samples", "8", "--steps", str(steps)]},
        {"label": "4-bit + RoSA --teacher (residual init + KL)", "base": pack,
         "train": [*rosa, "--teacher", model_dir, "--init", "residual", "--kl-data", "batch",
                   "--steps", str(steps + warmup)]},
        {"label": "4-bit + RoSA residual init only (--kl-weight 0)", "base": pack,
         "train": [*rosa, "--teacher", model_dir, "--init", "residual", "--kl-weight", "0",
                   "--steps", str(steps + warmup)]},
        {"label": "4-bit + RoSA KL only (zero init)", "base": pack,
         "train": [*rosa, "--teacher", model_dir, "--init", "zero", "--kl-data", "batch", "--warmup-steps", str(warmup),
                   "--mask-samples", "8", "--steps", str(steps)]},
        {"label": f"fp32 + LoRA r={Q_RANK_LORA} (ceiling)", "base": model_dir, "train": lora},
        {"label": "4-bit + RoSA low-rank residual init (--init residual-lowrank --kl-weight 0)", "base": pack,
         "train": [*rosa, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-weight", "0",
                   "--warmup-steps", str(warmup), "--mask-samples", "8", "--steps", str(steps)]},
        {"label": f"4-bit + LoRA r={Q_RANK_LORA} low-rank residual init (--init residual-lowrank --kl-weight 0)",
         "base": pack, "train": [*lora, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-weight", "0"]},
        *({"label": f"4-bit + RoSA low-rank residual init + KL (--init residual-lowrank --kl-weight {kl})",
           "base": pack, "train": [*rosa, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-weight", kl,
                                   "--kl-data", "batch", "--warmup-steps", str(warmup), "--mask-samples", "8",
                                   "--steps", str(steps)]}
          for kl in ("1", "0.25")),
        *({"label": f"4-bit + RoSA low-rank residual init, --lr-lowrank {lr} (--init residual-lowrank --kl-weight 0)",
           "base": pack, "train": [*rosa, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-weight", "0",
                                   "--lr-lowrank", lr, "--warmup-steps", str(warmup), "--mask-samples", "8",
                                   "--steps", str(steps)]}
          for lr in ("5e-4", "2e-4")),
        # dropout on the low-rank input also perturbs the quantization residual the start put into A/B
        {"label": "4-bit + RoSA low-rank residual init, --dropout 0 (--init residual-lowrank --kl-weight 0)",
         "base": pack, "train": [*rosa, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-weight", "0",
                                 "--dropout", "0", "--warmup-steps", str(warmup), "--mask-samples", "8",
                                 "--steps", str(steps)]},
        {"label": f"fp32 + LoRA r={Q_RANK_LORA}, --dropout 0", "base": model_dir, "train": [*lora, "--dropout", "0"]},
        # the low-rank start fitted to each layer's output error on the teacher's inputs instead of in Frobenius norm
        {"label": "4-bit + RoSA whitened residual init (--init residual-whitened --kl-weight 0)", "base": pack,
         "train": [*rosa, "--teacher", model_dir, "--init", "residual-whitened", "--kl-weight", "0",
                   "--warmup-steps", str(warmup), "--mask-samples", "8", "--steps", str(steps)]},
        # the KL term on samples drawn from the teacher instead of the training batches (data-free distillation);
        # these runs pin --kl-samples 128, the default when they ran (now it depends on the run's length)
        *({"label": f"4-bit + RoSA low-rank residual init + KL on teacher samples (--kl-data teacher --kl-weight {kl})",
           "base": pack, "train": [*rosa, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-data", "teacher",
                                   "--kl-weight", kl, "--kl-samples", "128", "--warmup-steps", str(warmup),
                                   "--mask-samples", "8", "--steps", str(steps)]}
          for kl in ("1", "0.25", "2", "4")),
        {"label": "4-bit + RoSA whitened residual init + KL on teacher samples (--init residual-whitened --kl-data "
                  "teacher --kl-weight 1)", "base": pack,
         "train": [*rosa, "--teacher", model_dir, "--init", "residual-whitened", "--kl-data", "teacher", "--kl-weight",
                   "1", "--kl-samples", "128", "--warmup-steps", str(warmup), "--mask-samples", "8",
                   "--steps", str(steps)]},
        # RoSA <= LoRA at equal budget, both with the defaults of --teacher (run 17 is the RoSA side)
        {"label": f"4-bit + LoRA r={Q_RANK_LORA} low-rank residual init + KL on teacher samples (--kl-data teacher "
                  "--kl-weight 1)", "base": pack,
         "train": [*lora, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-data", "teacher",
                   "--kl-weight", "1", "--kl-samples", "128"]},
        # run 17 at half the KL weight (appended, so that the indices above stay the commands' --q-only numbers)
        {"label": "4-bit + RoSA low-rank residual init + KL on teacher samples (--kl-data teacher --kl-weight 0.5)",
         "base": pack, "train": [*rosa, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-data", "teacher",
                                 "--kl-weight", "0.5", "--kl-samples", "128", "--warmup-steps", str(warmup),
                                 "--mask-samples", "8", "--steps", str(steps)]},
        # run 17 with four times the teacher samples (at 480 steps each of 128 is reused 15 times)
        {"label": "4-bit + RoSA low-rank residual init + KL on 512 teacher samples (--kl-data teacher "
                  "--kl-samples 512)",
         "base": pack, "train": [*rosa, "--teacher", model_dir, "--init", "residual-lowrank", "--kl-data", "teacher",
                                 "--kl-weight", "1", "--kl-samples", "512", "--warmup-steps", str(warmup),
                                 "--mask-samples", "8", "--steps", str(steps)]},
    ]  # fmt: skip


def _quality_one(i: int, run: dict, work: Path, log_dir: Path, threads: int, texts: dict[str, str],
                 ckpt_flags: tuple[str, ...] = ()) -> dict:  # fmt: skip
    from benchmarks._common import sparsepack_cmd

    env = child_env(threads, NUMBA_NUM_THREADS=str(threads))
    target, adapter, row = run["base"], None, {"label": run["label"], "flags": run["train"]}
    if run["train"] is not None:
        out = work / f"run{i}"
        ft = run_timed(sparsepack_cmd("finetune", run["base"], "-o", out, "--adapter", "q", "--overwrite", "--json",
                                      *run["train"], *ckpt_flags), log_dir / f"q{i}-finetune.log", env=env)  # fmt: skip
        target, adapter = str(out), "q"
        # with --q-resume, train_s covers only this invocation's part of the run
        row.update({"resumed": "--resume" in ckpt_flags, "train_s": ft.wall_s, "train_peak_rss_mb": ft.peak_rss_mb,
                    "summary": ft.result})
    for key, source in texts.items():
        n = Q_EVAL_WINDOWS[key]
        cmd = ["eval", target, "--data", source, "--seqlen", str(Q_EVAL_SEQLEN), "--json",
               *(["--windows", str(n), "--spread"] if n else []),
               *(["--adapter", adapter] if adapter else [])]  # fmt: skip
        ev = run_timed(sparsepack_cmd(*cmd), log_dir / f"q{i}-eval-{key}.log", env=env)
        row[f"ppl_{key}"] = ev.result["perplexity"]
        row[f"tokens_{key}"] = ev.result["tokens"]
    print(json.dumps({k: v for k, v in row.items() if k != "summary"}), flush=True)
    return row


def run_quality(args, log_dir: Path, model_dir: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks._common import info_text

    work = args.json.parent / (args.json.stem + "-runs")
    work.mkdir(parents=True, exist_ok=True)
    info = info_text(work / "coreutils.txt")
    texts = {"pydoc": "stdlib:pydoc@eval", **({"coreutils": str(info)} if info else {})}
    runs = quality_runs(args.pack, model_dir, args.q_steps, args.q_warmup, args.q_seed)
    if args.q_only:
        keep = {int(x) for x in args.q_only.split(",")}
        runs = [r for i, r in enumerate(runs) if i in keep]
    # checkpoints let a run cut short (a session's end) continue bit-for-bit with --q-resume
    ckpt_flags = (*(["--save-every", str(args.q_save_every)] if args.q_save_every else []),
                  *(["--resume"] if args.q_resume else []))  # fmt: skip
    # perplexities do not depend on the machine's load: runs go in parallel (1 thread each) to fit the time
    with LoadMonitor() as load, ThreadPoolExecutor(args.q_parallel) as pool:
        rows = list(pool.map(lambda ir: _quality_one(ir[0], ir[1], work, log_dir, 1, texts, ckpt_flags),
                             enumerate(runs)))
    return {"rows": rows, "texts": texts, "steps": args.q_steps, "warmup": args.q_warmup, "seed": args.q_seed,
            "load": load.summary()}


def quality_markdown(res: dict, meta: dict, cmd: str) -> str:
    rows, texts = res["rows"], res["texts"]
    keys = list(texts)
    ref = next((r for r in rows if r["label"].endswith("(ceiling)")), None)
    head = " | ".join(f"ppl {k}" for k in keys)
    lines = ["### Quality", "", f"`{cmd}`", "", f"| run | trainable params | {head} | vs fp32 + LoRA ({keys[0]}) |",
             "|---|---|" + "---|" * len(keys) + "---|"]  # fmt: skip
    for r in rows:
        params = "-"
        summ = r.get("summary") or {}
        if summ:
            params = f"{summ.get('trainable_params', '?')}"
        ppl = " | ".join(f"{r[f'ppl_{k}']:.3f}" for k in keys)
        vs = f"{r[f'ppl_{keys[0]}'] / ref[f'ppl_{keys[0]}'] - 1:+.1%}" if ref else "-"
        lines.append(f"| {r['label']} | {params} | {ppl} | {vs} |")
    steps, warm = res["steps"], res["warmup"]
    tokens = (steps + warm) * BATCH * Q_SEQLEN
    lines += ["", f"Every trained run: {steps + warm} optimizer steps of one {BATCH} x {Q_SEQLEN}-token micro-batch "
              f"({tokens:,} training tokens of `stdlib:pydoc@train`), lr 1e-3 (A, B) / 4e-4 (sparse), cosine "
              f"schedule, seed {res.get('seed', 0)}. RoSA: the first {warm} steps are its low-rank warm-up, then "
              "support selection over "
              "8 samples (extra forward/backward passes, not optimizer steps); the residual-init runs take the support "
              f"from `W_fp - W_q` and train jointly from step 0. LoRA r={Q_RANK_LORA} matches RoSA r=16 d=0.6% in "
              f"trainable parameters. Perplexity over {Q_EVAL_SEQLEN}-token windows: "
              + ", ".join((f"all of `{v}`" if k == "pydoc" else f"{Q_EVAL_WINDOWS[k]} spread over the coreutils manual")
                          for k, v in texts.items())
              + f". Runs went in parallel, 1 thread each; load average {res['load']['load1_min']}-"
              f"{res['load']['load1_max']}; {meta['time']}."]  # fmt: skip
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, help="write the tables into the ## Finetune section of this file")
    ap.add_argument("--part", choices=["speed", "quality"], default="speed")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pack", default="out/smollm2-w4g64", help="4-bit g64 pack of the sample")
    ap.add_argument("--kinds", default="peft-lora,rosa,rosa-4bit,selection")
    ap.add_argument("--q-steps", type=int, default=12, help="quality: joint-phase steps (all runs get + warm-up)")
    ap.add_argument("--q-warmup", type=int, default=4, help="quality: RoSA's low-rank warm-up steps")
    ap.add_argument("--q-seed", type=int, default=0, help="quality: --seed of every run (init, data order, dropout)")
    ap.add_argument("--q-parallel", type=int, default=3, help="quality: runs at once")
    ap.add_argument("--q-only", default=None, help="quality: comma-separated run indices")
    ap.add_argument("--q-save-every", type=int, default=0, help="quality: finetune checkpoints every N steps")
    ap.add_argument("--q-resume", action="store_true", help="quality: continue each run from its last checkpoint")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_dir = str(sample_model())
    if args._worker:
        import torch

        torch.set_num_threads(args.threads)
        res = selection_worker(args.pack, model_dir) if args._worker == "selection" else worker(
            args._worker, model_dir, args.pack, args.steps)  # fmt: skip
        print(json.dumps(res))
        return
    meta = {**machine_info(args.threads), "steps": args.steps}
    log_dir = args.json.parent / (args.json.stem + "-logs")
    cmd = "python " + " ".join(["benchmarks/finetune.py"] + [a for a in sys.argv[1:]])
    if args.part == "speed":
        res = run_speed(args, log_dir)
        md = speed_markdown(res, meta, cmd)
        owned = SPEED_HEADINGS.__contains__
    else:
        res = run_quality(args, log_dir, model_dir)
        md = quality_markdown(res, meta, cmd)
        owned = "### Quality".__eq__
    meta["loadavg_end"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, **res, "markdown": md}, indent=2))
    if args.md:
        write_md_part(args.md, SECTION, md, owned)
    print(md)


if __name__ == "__main__":
    main()
