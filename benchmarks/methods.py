"""Issue 31's figures: LoRA, RoSA and SHiRA (five support rules) at one budget, side by side with PEFT (CPU).

    python benchmarks/methods.py --json out/bench_methods.json [--md docs/BENCHMARKS.md] [--pack out/smollm2-w4g64]
        [--steps 60] [--seeds 0 1] [--rows LABEL,...]

Base: the SmolLM2-135M sample, GPTQ 4-bit g64 (``--pack``). Every row trains on ``stdlib:pydoc@train`` with the same
steps, batch (4 x 128 tokens, one micro-batch per step), learning rates (1e-3 low-rank, 4e-4 sparse, cosine with
3% warm-up, clipping 1.0, AdamW without weight decay) and data order (``Batcher`` seeded by ``--seed``), at one budget
``N = 3 * sum(out + in)`` over the 210 adapted linears (0.86% of their weights): ``--budget N`` gives LoRA r=3 and
SHiRA r=3 in PEFT's sizing (``r * (out + in)`` entries per layer); RoSA takes r=2 and the rest sparse. RoSA's first
16 steps are its low-rank warm-up (the total stays ``--steps``).

Peers on the same dequantized base (``sparsepack export PACK --format safetensors``, fp32): PEFT LoRA r=3 and PEFT
SHiRA r=3 (its random mask, ``random_seed`` = the seed), trained by a loop in this file (``peft_worker``) over
sparsepack's own ``completion_examples`` and ``Batcher`` with the trainer's ``cosine_lr``.

Every training run is its own child process (its peak RSS, from ``/usr/bin/time -v``, is its own); rows alternate
ours and the peer within each seed. Step time: median of the training phase's per-step seconds, the first step
excluded (ours from the adapter's ``metrics.jsonl``; support selection is not a step). Perplexity: 16 windows of 128
tokens spread over ``stdlib:pydoc@eval`` and over the held-out split of the coreutils info manual, the same windows
for every row. Fuse / unfuse: our adapters (seed 0) on the dense fp32 base vs PEFT ``merge_and_unload`` of the PEFT
LoRA row, alternating, CPU-time minimum over repeats. Multi-adapter: a second adapter per method trained on the
coreutils manual's train split; both active at once (their corrections add: fusion with weights 1/1), each adapter's
own held-out perplexity against it alone.
"""

from __future__ import annotations

import argparse
import copy
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
from benchmarks._common import (  # noqa: E402
    LoadMonitor,
    child_env,
    info_text,
    machine_info,
    run_timed,
    sparsepack_cmd,
    write_md_part,
)  # fmt: skip

BATCH, SEQLEN, ALPHA, DROPOUT = 4, 128, 16.0, 0.05
LR_LOWRANK, LR_SPARSE = 1e-3, 4e-4
RANK = 3  # SHiRA's and LoRA's r at the budget: N = RANK * sum(out + in)
ROSA_RANK, ROSA_WARMUP, MASK_SAMPLES = 2, 16, 16
EVAL_WINDOWS, EVAL_SEQLEN = 16, 128
SECTION = "## Methods"
TRAIN = "stdlib:pydoc@train"


# ------------------------------------------------------------------------------------------------ rows


def train_rows(seeds: list[int], coreutils: str) -> list[dict]:
    """The training runs, in run order: per seed, each peer next to its counterpart; then the one-seed rows."""
    rows = []
    for s in seeds:
        rows += [
            {"label": "PEFT SHiRA (random)", "kind": "peft", "method": "shira", "seed": s},
            {"label": "shira --support random", "kind": "ours", "method": "shira", "support": "random", "seed": s},
            {"label": "PEFT LoRA", "kind": "peft", "method": "lora", "seed": s},
            {"label": "lora", "kind": "ours", "method": "lora", "seed": s},
            {"label": "shira --support snip", "kind": "ours", "method": "shira", "support": "snip", "seed": s},
            {"label": "rosa", "kind": "ours", "method": "rosa", "seed": s},
        ]  # fmt: skip
    s0 = seeds[0]
    rows += [{"label": f"shira --support {rule}", "kind": "ours", "method": "shira", "support": rule, "seed": s0}
             for rule in ("grad", "magnitude", "struct")]  # fmt: skip
    rows += [{"label": f"{m} on coreutils", "kind": "ours", "method": m, "seed": s0, "data": coreutils,
              **({"support": "snip"} if m == "shira" else {})} for m in ("shira", "lora")]  # fmt: skip
    for r in rows:
        r.setdefault("data", TRAIN)
        r["key"] = "-".join([r["kind"], r["method"], r.get("support", ""), "cu" if r["data"] != TRAIN else "pd",
                             f"s{r['seed']}"]).replace("--", "-")  # fmt: skip
    return rows


def ours_flags(r: dict, budget: int, steps: int) -> list[str]:
    flags = ["--data", r["data"], "--method", r["method"], "--budget", str(budget), "--seed", str(r["seed"]),
             "--batch-size", str(BATCH), "--grad-accum", "1", "--seqlen", str(SEQLEN), "--lr", str(LR_SPARSE),
             "--lr-lowrank", str(LR_LOWRANK), "--alpha", str(ALPHA), "--dropout", str(DROPOUT)]  # fmt: skip
    if "support" in r:
        flags += ["--support", r["support"], "--mask-samples", str(MASK_SAMPLES)]
    if r["method"] == "rosa":
        return [*flags, "--rank", str(ROSA_RANK), "--warmup-steps", str(ROSA_WARMUP), "--steps", str(steps - ROSA_WARMUP)]  # noqa: E501
    return [*flags, "--steps", str(steps)]


# ------------------------------------------------------------------------------------------------ children


def _texts(coreutils: str) -> dict[str, str]:
    return {"pydoc": "stdlib:pydoc@eval", "coreutils": coreutils.replace("@train", "@eval")}


def _windows(tokenizer, texts: dict[str, str]):
    from sparsepack.pipeline.data import token_windows

    return {k: token_windows(tokenizer, src, EVAL_SEQLEN, EVAL_WINDOWS, spread=True) for k, src in texts.items()}


def _ppl(model, windows: dict) -> dict[str, float]:
    from sparsepack.pipeline.evaluate import perplexity

    return {k: perplexity(model, w, progress=False).perplexity for k, w in windows.items()}


def _dir_bytes(path: Path, exts=(".safetensors", ".json")) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix in exts)


def eval_worker(pack: str, adapter: str | None, coreutils: str) -> dict:
    """Held-out perplexity of ``pack`` with ``adapter`` active (or the bare base)."""
    import sparsepack
    from sparsepack.formats.tokenizer import load_tokenizer

    model = sparsepack.load(pack, adapter=adapter)
    return {"ppl": _ppl(model, _windows(load_tokenizer(pack), _texts(coreutils)))}


def peft_worker(kind: str, dense: str, out: str, seed: int, steps: int, coreutils: str) -> dict:
    """Train PEFT LoRA / SHiRA on the dense base exactly as ``sparsepack finetune`` schedules its runs."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.layers.inject import find_targets
    from sparsepack.pipeline.batches import Batcher
    from sparsepack.pipeline.data import completion_examples
    from sparsepack.pipeline.trainer import cosine_lr

    tok = load_tokenizer(dense)
    base = AutoModelForCausalLM.from_pretrained(dense, torch_dtype=torch.float32)
    targets = find_targets(base, "all-linear")
    torch.manual_seed(seed)
    if kind == "lora":
        cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=targets)
        lr = LR_LOWRANK
    else:
        cfg = peft.ShiraConfig(r=RANK, target_modules=targets, random_seed=seed)
        lr = LR_SPARSE
    model = peft.get_peft_model(base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params, "lr": lr, "base_lr": lr}], weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batcher = Batcher(completion_examples(tok, TRAIN, SEQLEN), BATCH, pad, seed)
    model.train()
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = batcher.next()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * cosine_lr(step, steps, 0.03)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    model.eval()
    model.save_pretrained(out)
    ppl = _ppl(model, _windows(tok, _texts(coreutils)))
    return {"trainable_params": sum(p.numel() for p in params), "step_s": statistics.median(times[1:]),
            "final_loss": losses[-1], "ppl": ppl, "adapter_bytes": _dir_bytes(Path(out))}  # fmt: skip


def fuse_worker(dense: str, ours: dict[str, str], peft_lora: str, repeats: int) -> dict:
    """Fuse and unfuse times of our adapters on the dense fp32 base vs PEFT ``merge_and_unload`` (alternating)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    import sparsepack
    from benchmarks.switch import _stats, alternate

    model = sparsepack.load(dense)
    for name, pack in ours.items():
        model.load_adapter(pack, name=name, adapter="default")
    base = AutoModelForCausalLM.from_pretrained(dense, torch_dtype=torch.float32).eval()
    holder = {}

    def peft_setup():
        holder["pm"] = peft.PeftModel.from_pretrained(copy.deepcopy(base), peft_lora).eval()

    def peft_merge():
        holder["merged"] = holder.pop("pm").merge_and_unload()

    peer = "PEFT merge_and_unload"
    pairs = {peer: (peft_setup, peft_merge, holder.clear)}
    for name in ours:
        pairs[f"{name} fuse"] = (None, lambda n=name: model.fuse(n), model.unfuse)
        pairs[f"{name} unfuse"] = (lambda n=name: model.fuse(n), model.unfuse, None)
    # bit-exact check on every adapted weight: unfuse must restore the base
    w = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2}
    times = alternate(pairs, repeats)
    model.unfuse()
    exact = all(torch.equal(w[n], p) for n, p in model.named_parameters() if n in w)
    return {"times": {k: _stats(v) for k, v in times.items()}, "unfuse_exact": exact}


def multi_worker(pack: str, pairs: dict[str, tuple[str, str]], coreutils: str) -> dict:
    """Each method's pydoc and coreutils adapters, alone and both active (weights 1/1), on their own held-out text."""
    import sparsepack
    from sparsepack.formats.tokenizer import load_tokenizer

    model = sparsepack.load(pack)
    windows = _windows(load_tokenizer(pack), _texts(coreutils))
    res = {}
    for method, (a_pack, b_pack) in pairs.items():
        a, b = f"{method}_a", f"{method}_b"
        model.load_adapter(a_pack, name=a, adapter="default")
        model.load_adapter(b_pack, name=b, adapter="default")
        alone, both = {}, {}
        model.set_adapter(a)
        alone["pydoc"] = _ppl(model, {"pydoc": windows["pydoc"]})["pydoc"]
        model.set_adapter(b)
        alone["coreutils"] = _ppl(model, {"coreutils": windows["coreutils"]})["coreutils"]
        model.set_adapter([a, b])
        both = _ppl(model, windows)
        res[method] = {"alone": alone, "both": both,
                       "degradation": {k: both[k] / alone[k] - 1 for k in alone}}  # fmt: skip
        model.set_adapter(None)
        model.delete_adapter(a)
        model.delete_adapter(b)
    return res


def _worker_main(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    spec = json.loads(args._spec)
    if args._worker == "eval":
        return eval_worker(**spec)
    if args._worker == "peft":
        return peft_worker(**spec)
    if args._worker == "fuse":
        return fuse_worker(**spec)
    return multi_worker(**spec)


# ------------------------------------------------------------------------------------------------ driver


def _self_cmd(worker: str, spec: dict, threads: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--json", "-", "--threads", str(threads),
            "--_worker", worker, "--_spec", json.dumps(spec)]  # fmt: skip


def _step_s(pack: Path) -> float:
    metrics = pack / "adapters" / "default" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    train = [r["seconds"] for r in rows if r.get("phase") == "train"]
    return statistics.median(train[1:] if len(train) > 1 else train)


def budget_of(dense: str) -> tuple[int, int]:
    """(N, weights): N = RANK * sum(out + in) over the adapted linears, and their weight count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsepack.layers.inject import find_targets

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dense))
    shapes = [m.get_submodule(n).weight.shape for n in find_targets(m, "all-linear")]
    return RANK * sum(o + i for o, i in shapes), sum(o * i for o, i in shapes)


def run_row(r: dict, p: dict, args, logs: Path) -> dict:
    cache = p["work"] / f"{r['key']}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    env = child_env(args.threads)
    out = p["work"] / r["key"]
    res = {k: v for k, v in r.items()}
    if r["kind"] == "ours":
        flags = ours_flags(r, p["budget"], args.steps)
        ft = run_timed(sparsepack_cmd("finetune", p["pack"], "-o", out, "--overwrite", "--json", *flags),
                       logs / f"{r['key']}-finetune.log", env=env)  # fmt: skip
        ev = run_timed(_self_cmd("eval", {"pack": str(out), "adapter": "default", "coreutils": p["coreutils"]},
                                 args.threads), logs / f"{r['key']}-eval.log", env=env)  # fmt: skip
        res.update({"flags": flags, "trainable_params": ft.result["trainable_params"], "step_s": _step_s(out),
                    "train_wall_s": ft.wall_s, "peak_rss_mb": ft.peak_rss_mb, "ppl": ev.result["ppl"],
                    "adapter_bytes": _dir_bytes(out / "adapters" / "default"), "final_loss": ft.result.get("final_loss"),  # noqa: E501
                    "pack": str(out)})  # fmt: skip
    else:
        spec = {"kind": r["method"], "dense": p["dense"], "out": str(out), "seed": r["seed"], "steps": args.steps,
                "coreutils": p["coreutils"]}  # fmt: skip
        ft = run_timed(_self_cmd("peft", spec, args.threads), logs / f"{r['key']}.log", env=env)
        res.update({**ft.result, "train_wall_s": ft.wall_s, "peak_rss_mb": ft.peak_rss_mb, "dir": str(out)})
    cache.write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("label", "seed", "trainable_params", "step_s", "peak_rss_mb", "ppl")}),
          flush=True)  # fmt: skip
    return res


def prepare(args) -> dict:
    work = args.json.parent / (args.json.stem + "-runs")
    work.mkdir(parents=True, exist_ok=True)
    pack = Path(args.pack)
    if not (pack / "sparsepack.json").exists():
        raise SystemExit(f"{pack}: no pack; make it with `sparsepack compress <sample> -o {pack} --group-size 64`")
    dense = work / "dense-fp32"
    if not (dense / "config.json").exists():
        run_timed(sparsepack_cmd("export", pack, "--format", "safetensors", "-o", dense), work / "export.log")
    info = info_text(work / "coreutils.txt")
    if info is None:
        raise SystemExit("needs /usr/share/info/coreutils.info.gz for the second text")
    budget, weights = budget_of(str(dense))
    return {"work": work, "pack": str(pack), "dense": str(dense), "coreutils": f"{info}@train", "budget": budget,
            "weights": weights}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, help="write the table into the ## Methods section of this file")
    ap.add_argument("--pack", default="out/smollm2-w4g64", help="4-bit g64 pack of the sample")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of every row")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rows", default=None, help="comma-separated row keys to run (default: all)")
    ap.add_argument("--parts", default="train,fuse,multi")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="fuse / unfuse repeats")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print(json.dumps(_worker_main(args)))
        return
    p = prepare(args)
    meta = {**machine_info(args.threads), "steps": args.steps, "seeds": args.seeds, "budget": p["budget"],
            "weights": p["weights"]}  # fmt: skip
    logs = p["work"] / "logs"
    rows = train_rows(args.seeds, p["coreutils"])
    if args.rows:
        keep = set(args.rows.split(","))
        rows = [r for r in rows if r["key"] in keep]
    parts = set(args.parts.split(","))
    res: dict = {"rows": []}
    with LoadMonitor() as load:
        if "train" in parts:
            res["rows"] = [run_row(r, p, args, logs) for r in rows]
        done = {r["key"]: json.loads(f.read_text()) for r in train_rows(args.seeds, p["coreutils"])
                if (f := p["work"] / f"{r['key']}.json").exists()}  # fmt: skip
        s0 = args.seeds[0]
        if "fuse" in parts:
            ours = {m: done[k]["pack"] for m, k in (("lora", f"ours-lora-pd-s{s0}"), ("rosa", f"ours-rosa-pd-s{s0}"),
                                                    ("shira_snip", f"ours-shira-snip-pd-s{s0}"),
                                                    ("shira_random", f"ours-shira-random-pd-s{s0}")) if k in done}
            spec = {"dense": p["dense"], "ours": ours, "peft_lora": done[f"peft-lora-pd-s{s0}"]["dir"],
                    "repeats": args.repeats}  # fmt: skip
            res["fuse"] = run_timed(_self_cmd("fuse", spec, args.threads), logs / "fuse.log",
                                    env=child_env(args.threads)).result  # fmt: skip
        if "multi" in parts:
            pairs = {m: (done[f"ours-{m}{sup}-pd-s{s0}"]["pack"], done[f"ours-{m}{sup}-cu-s{s0}"]["pack"])
                     for m, sup in (("shira", "-snip"), ("lora", ""))}  # fmt: skip
            res["multi"] = run_timed(_self_cmd("multi", {"pack": p["pack"], "pairs": pairs, "coreutils": p["coreutils"]},  # noqa: E501
                                               args.threads), logs / "multi.log", env=child_env(args.threads)).result
    res["rows"] = list(done.values())
    res["load"] = load.summary()
    meta["loadavg_end"] = os.getloadavg()
    cmd = "python " + " ".join(["benchmarks/methods.py", *sys.argv[1:]])
    md = markdown(res, meta, p, cmd)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, **res, "markdown": md}, indent=2, default=str))
    if args.md:
        write_md_part(args.md, SECTION, md, lambda h: True)
    print(md)


# ------------------------------------------------------------------------------------------------ markdown


def _agg(vals: list[float], fmt: str = "{:.3f}") -> str:
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"


def markdown(res: dict, meta: dict, p: dict, cmd: str) -> str:
    order = ["shira --support random", "PEFT SHiRA (random)", "lora", "PEFT LoRA", "shira --support snip", "rosa",
             "shira --support grad", "shira --support magnitude", "shira --support struct"]  # fmt: skip
    groups: dict[str, list[dict]] = {}
    for r in res["rows"]:
        if r["data"] == TRAIN:
            groups.setdefault(r["label"], []).append(r)
    lines = [f"`{cmd}`", "",
             "| row | seeds | trainable params | ppl pydoc@eval | ppl coreutils@eval | step s | peak RSS MB | adapter MB |",  # noqa: E501
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label in [x for x in order if x in groups]:
        g = sorted(groups[label], key=lambda r: r["seed"])
        lines.append(
            f"| {label} | {','.join(str(r['seed']) for r in g)} | {g[0]['trainable_params']:,} | "
            f"{_agg([r['ppl']['pydoc'] for r in g])} | {_agg([r['ppl']['coreutils'] for r in g])} | "
            f"{_agg([r['step_s'] for r in g], '{:.2f}')} | {_agg([r['peak_rss_mb'] for r in g], '{:.0f}')} | "
            f"{g[0]['adapter_bytes'] / 2**20:.2f} |")  # fmt: skip
    lines += ["", "Several seeds: mean (min-max)."]
    if fz := res.get("fuse"):
        t = fz["times"]
        peer = t["PEFT merge_and_unload"]["cpu_min_ms"]
        lines += ["", "| fuse / unfuse on the dense fp32 base (seed 0 adapters) | fuse ms | unfuse ms | "
                  "PEFT LoRA merge_and_unload ms | PEFT / ours (fuse + unfuse) |", "|---|---|---|---|---|"]  # fmt: skip
        for name in [k[: -len(" fuse")] for k in t if k.endswith(" fuse")]:
            f, u = t[f"{name} fuse"]["cpu_min_ms"], t[f"{name} unfuse"]["cpu_min_ms"]
            lines.append(f"| {name} | {f:.1f} | {u:.1f} | {peer:.1f} | {peer / (f + u):.1f}x |")
        lines += ["", f"CPU-time minimum over {t['PEFT merge_and_unload']['n']} alternating repeats (wall minima in "
                  f"the JSON); unfuse restored every weight bit for bit: {fz['unfuse_exact']}."]  # fmt: skip
    if mu := res.get("multi"):
        lines += ["", "| multi-adapter (pydoc + coreutils adapters, both active, 1/1) | pydoc alone | pydoc both | "
                  "coreutils alone | coreutils both | degradation pydoc / coreutils |", "|---|---|---|---|---|---|"]
        for m, d in mu.items():
            lines.append(f"| {m} | {d['alone']['pydoc']:.3f} | {d['both']['pydoc']:.3f} | {d['alone']['coreutils']:.3f}"
                         f" | {d['both']['coreutils']:.3f} | {d['degradation']['pydoc']:+.1%} / "
                         f"{d['degradation']['coreutils']:+.1%} |")  # fmt: skip
    lines += ["", f"Budget N = {p['budget']:,} trainable parameters ({p['budget'] / p['weights']:.2%} of the "
              f"{p['weights']:,} adapted linear weights), {meta['steps']} steps of {BATCH} x {SEQLEN} tokens of "
              f"`{TRAIN}`; {meta['threads']} threads, runs one at a time; load average {res['load']['load1_min']}-"
              f"{res['load']['load1_max']}; {meta['time']}; {meta['cpu']}."]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
