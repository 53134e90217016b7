"""Re-score the trained runs of ``benchmarks/finetune.py --part quality`` on a wider held-out set.

The quality table scores each run on the first 16 windows of 256 tokens of each text. For the coreutils info
manual those are its license notice and menus, and 16 windows leave a few percent of sampling noise. This script
takes the packs those runs left behind (``<json stem>-runs/run<k>``, adapter ``q``) and scores them again with
``sparsepack eval``: every window of ``stdlib:pydoc@eval`` and ``--coreutils-windows`` windows spread evenly over
the whole manual (``--spread``). Nothing is retrained; the bare fp32 and 4-bit bases are scored too.

    python benchmarks/quality_eval.py --json out/quality_eval.json --from out/q-lr/quality.json [...] \
        --pack out/q-clip/smollm2-w4g64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks._common as common  # noqa: E402

SEQLEN = 256
CEILING = "fp32 + LoRA r=18 (ceiling)"  # label prefix of the reference row


def _seed(flags: list[str] | None) -> int | None:
    return int(flags[flags.index("--seed") + 1]) if flags and "--seed" in flags else None


def collect(sources: list[str], model_dir: str, pack: str) -> list[dict]:
    """One entry per scored model: the two bases, then the trained runs of each quality JSON.

    A source is ``FILE`` (all its trained rows) or ``FILE:k,k`` (those rows only).
    """
    bare = {"seed": None, "steps": 0, "adapter": None, "from": None}
    items = [{"label": "fp32", "target": model_dir, **bare}, {"label": "4-bit g64", "target": pack, **bare}]
    for spec in sources:
        name, _, only = spec.partition(":")
        src, keep = Path(name), {int(k) for k in only.split(",")} if only else None
        res = json.loads(src.read_text())
        runs = src.parent / (src.stem + "-runs")
        total = res["steps"] + res["warmup"]
        for k, row in enumerate(res["rows"]):
            if row.get("flags") is None or (keep is not None and k not in keep):
                continue  # a bare base, scored once above
            target = runs / f"run{k}"
            if not (target / "adapters" / "q").is_dir():
                raise SystemExit(f"{src}: row {k} ({row['label']}) has no trained pack at {target}")
            label = row["label"] + (f", {total} steps" if total != 160 else "")
            old = {k: row[k] for k in row if k.startswith("ppl_")}
            items.append({"label": label, "seed": _seed(row["flags"]) or 0, "steps": total, "target": str(target),
                          "adapter": "q", "from": str(src), "old": old})  # fmt: skip
    return items


def score(item: dict, texts: dict[str, tuple[str, int | None]], log_dir: Path, i: int) -> dict:
    env = common.child_env(1, NUMBA_NUM_THREADS="1")
    out = dict(item)
    for key, (source, windows) in texts.items():
        cmd = ["eval", item["target"], "--data", source, "--seqlen", str(SEQLEN), "--json"]
        cmd += (["--windows", str(windows), "--spread"] if windows else []) + (
            ["--adapter", item["adapter"]] if item["adapter"] else [])  # fmt: skip
        ev = common.run_timed(common.sparsepack_cmd(*cmd), log_dir / f"e{i}-{key}.log", env=env)
        out[f"ppl_{key}"], out[f"tokens_{key}"] = ev.result["perplexity"], ev.result["tokens"]
    print(json.dumps({k: out[k] for k in out if k not in ("old",)}), flush=True)
    return out


def markdown(rows: list[dict], keys: list[str], cmd: str, texts: dict, meta: dict) -> str:
    ceil = {(r["seed"], r["steps"]): r for r in rows if r["label"].startswith(CEILING)}  # same seed and length
    lines = [f"`{cmd}`", "", "| run | seed | " + " | ".join(f"ppl {k}" for k in keys)
             + " | vs fp32 + LoRA, same seed (" + " / ".join(keys) + ") | first-16-window figures (" + " / ".join(keys)
             + ") |", "|---|---|" + "---|" * (len(keys) + 2)]  # fmt: skip
    first = {}  # label -> first position: rows grouped by label, seeds in order
    for i, r in enumerate(rows):
        first.setdefault(r["label"], i)
    for r in sorted(rows, key=lambda r: (first[r["label"]], r["seed"] or 0)):
        seed = r["seed"]
        ref = ceil.get((seed, r["steps"])) if r["adapter"] else None
        vs = " / ".join(f"{r[f'ppl_{k}'] / ref[f'ppl_{k}'] - 1:+.1%}" for k in keys) if ref else "-"
        old = " / ".join(f"{r['old'][f'ppl_{k}']:.3f}" for k in keys) if r.get("old") else "-"
        ppl = " | ".join(f"{r[f'ppl_{k}']:.3f}" for k in keys)
        lines.append(f"| {r['label']} | {seed if r['adapter'] else '-'} | {ppl} | {vs} | {old} |")
    # mean over seeds of every label scored at more than one seed, against the ceiling's mean over the same seeds
    by_label: dict[str, dict[tuple[int, int], dict]] = {}
    for r in rows:
        if r["adapter"]:
            by_label.setdefault(r["label"], {})[r["seed"], r["steps"]] = r
    lines += ["", "| run, mean over seeds | seeds | " + " | ".join(f"ppl {k}" for k in keys)
              + " | vs fp32 + LoRA over the same seeds |", "|---|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
    for label, per_seed in by_label.items():
        seeds = sorted(s for s in per_seed if s in ceil)
        if len(seeds) < 2:
            continue
        mean = {k: statistics.mean(per_seed[s][f"ppl_{k}"] for s in seeds) for k in keys}
        ref = {k: statistics.mean(ceil[s][f"ppl_{k}"] for s in seeds) for k in keys}
        vs = " / ".join(f"{mean[k] / ref[k] - 1:+.1%}" for k in keys)
        lines.append(f"| {label} | {','.join(str(s) for s, _ in seeds)} | " + " | ".join(f"{mean[k]:.3f}" for k in keys)
                     + f" | {vs} |")  # fmt: skip
    spec = "; ".join(f"{k}: {w or 'all'} windows of {SEQLEN} tokens" + (" spread over the text" if w else "")
                     for k, (_, w) in texts.items())  # fmt: skip
    lines += ["", f"{spec}. One thread per eval, two at once; {meta['time']}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--from", dest="sources", nargs="+", required=True, help="quality JSON files, FILE[:k,k]")
    ap.add_argument("--pack", required=True, help="the 4-bit g64 pack the runs were trained on")
    ap.add_argument("--coreutils-windows", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=2)
    args = ap.parse_args()
    model_dir = str(common.sample_model())
    work = args.json.parent / (args.json.stem + "-logs")
    work.mkdir(parents=True, exist_ok=True)
    info = common.info_text(work / "coreutils.txt")
    texts = {"pydoc": ("stdlib:pydoc@eval", None)}
    if info:
        texts["coreutils"] = (str(info), args.coreutils_windows)
    items = collect(args.sources, model_dir, args.pack)
    meta = common.machine_info(1)
    with common.LoadMonitor() as load, ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda it: score(it[1], texts, work, it[0]), enumerate(items)))
    cmd = "python " + " ".join(["benchmarks/quality_eval.py"] + sys.argv[1:])
    md = markdown(rows, list(texts), cmd, texts, meta)
    args.json.write_text(json.dumps({"meta": meta, "load": load.summary(), "texts": texts, "rows": rows,
                                     "markdown": md}, indent=2))  # fmt: skip
    print(md)


if __name__ == "__main__":
    main()
