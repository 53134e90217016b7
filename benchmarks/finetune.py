"""Finetune speed and memory, side by side with PEFT LoRA, on the SmolLM2-135M sample (CPU).

Every configuration runs in its own subprocess (so peak RSS is its own), on the same token windows
(`stdlib:pydoc@train`, batch 4 x 128), for ``--steps`` optimizer steps of one micro-batch each; the first
step is a warm-up and excluded from the median step time.

    python benchmarks/finetune.py --json out/bench_finetune.json [--steps 6] [--pack out/smollm2-w4g64]

Rows: PEFT LoRA r=16 all-linear on fp32 (the peer); ours LoRA r=16 and RoSA r=16 d=0.6% on the same fp32
base; ours RoSA on the 4-bit g64 pack. RoSA's support is drawn at random here (selection cost is timed
separately in the `selection` row), since only the joint phase's step time is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

BATCH, SEQLEN, RANK, ALPHA, DENSITY = 4, 128, 16, 16.0, 0.006


def _windows(tokenizer, n):
    from sparsepack.pipeline.data import token_windows

    return token_windows(tokenizer, "stdlib:pydoc@train", SEQLEN, n)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(kind: str, model_dir: str, pack: str, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    from sparsepack.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    windows = _windows(tok, BATCH * (steps + 1))
    rss_before = _rss_mb()
    times = []
    if kind == "peft-lora":
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules="all-linear",
                              task_type="CAUSAL_LM")  # fmt: skip
        model = peft.get_peft_model(model, cfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=7e-4)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        for i in range(steps):
            ids = windows[i * BATCH : (i + 1) * BATCH]
            t0 = time.perf_counter()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    else:
        from sparsepack.config import TrainConfig
        from sparsepack.methods.masks import SUPPORT_RULES, SupportContext
        from sparsepack.pipeline.trainer import Trainer
        from sparsepack.runtime.loader import load

        base = pack if kind.endswith("4bit") else model_dir
        method = "lora" if kind.startswith("lora") else "rosa"
        model = load(base, dtype=torch.float32)
        examples = [(w, w.clone()) for w in windows]
        cfg = TrainConfig(method=method, rank=RANK, alpha=ALPHA, density=DENSITY, batch_size=BATCH, grad_accum=1,
                          seqlen=SEQLEN, steps=steps, warmup_steps=0)  # fmt: skip
        tr = Trainer(model, tok, cfg, examples, None, progress=False)
        tr.setup()
        if method == "rosa":
            ctx = SupportContext(
                shapes={n: (m.out_features, m.in_features) for n, m in tr.layers.items()},
                nnz={n: b.nnz for n, b in tr.budgets.items()}, base_weight=None, scores=None, groups=[],
                generator=torch.Generator().manual_seed(0))  # fmt: skip
            for n, s in SUPPORT_RULES.get("random")(ctx).items():
                tr.layers[n].set_support(cfg.adapter, s)
        tr._build_optimizer(with_sparse=True)
        params = sum(p.numel() for g in tr.optimizer.param_groups for p in g["params"])
        tr.model.train()
        for _ in range(steps):
            t0 = time.perf_counter()
            tr._train_step(tr.phases[-1])
            tr.state.step += 1
            times.append(time.perf_counter() - t0)
    return {"kind": kind, "step_s": statistics.median(times[1:]), "steps": steps, "trainable_params": params,
            "peak_rss_mb": _rss_mb(), "rss_before_training_mb": rss_before,
            "loadavg": os.getloadavg()}  # fmt: skip


def selection_worker(pack: str, model_dir: str) -> dict:
    """RoSA support selection alone (32 samples, fisher rule, budget 0.25) on the 4-bit pack."""
    import torch

    torch.set_num_threads(2)
    from sparsepack.config import TrainConfig
    from sparsepack.pipeline.trainer import Trainer
    from sparsepack.runtime.loader import load
    from sparsepack.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    windows = _windows(tok, 64)
    model = load(pack, dtype=torch.float32)
    cfg = TrainConfig(method="rosa", rank=RANK, density=DENSITY, batch_size=BATCH, seqlen=SEQLEN, mask_samples=32)
    tr = Trainer(model, tok, cfg, [(w, w.clone()) for w in windows], None, progress=False)
    tr.setup()
    tr._build_optimizer(with_sparse=False)
    rss0 = _rss_mb()
    info = tr._select_support()
    return {"kind": "selection", **info, "peak_rss_mb": _rss_mb(), "rss_before_mb": rss0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pack", default="out/smollm2-w4g64", help="4-bit pack of the sample (make demo writes it)")
    ap.add_argument("--kinds", default="peft-lora,lora,rosa,rosa-4bit,selection")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from sparsepack.runtime.sample import prepare_sample_model

    model_dir = str(prepare_sample_model())
    if args._worker:
        res = selection_worker(args.pack, model_dir) if args._worker == "selection" else worker(
            args._worker, model_dir, args.pack, args.steps)  # fmt: skip
        print(json.dumps(res))
        return
    rows = []
    for kind in args.kinds.split(","):
        cmd = [sys.executable, __file__, "--json", "/dev/null", "--steps", str(args.steps), "--pack", args.pack,
               "--_worker", kind]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    peer = next((r for r in rows if r["kind"] == "peft-lora"), None)
    if peer:
        for r in rows:
            if "step_s" in r:
                r["step_time_vs_peft"] = r["step_s"] / peer["step_s"]
                r["peak_rss_vs_peft"] = r["peak_rss_mb"] / peer["peak_rss_mb"]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"batch": BATCH, "seqlen": SEQLEN, "rank": RANK, "density": DENSITY,
                                     "rows": rows}, indent=2))  # fmt: skip
    print("| run | trainable params | step (s) | vs PEFT | peak RSS (MB) | vs PEFT |\n|---|---|---|---|---|---|")
    for r in rows:
        if "step_s" in r:
            print(f"| {r['kind']} | {r['trainable_params']:,} | {r['step_s']:.3f} | {r.get('step_time_vs_peft', 1):.2f}x "
                  f"| {r['peak_rss_mb']:.0f} | {r.get('peak_rss_vs_peft', 1):.2f}x |")
        else:
            print(f"| support selection (4-bit, 32 samples) | - | {r['seconds']:.1f} total | - | "
                  f"{r['peak_rss_mb']:.0f} (before: {r['rss_before_mb']:.0f}) | - |")


if __name__ == "__main__":
    main()
