"""sparsepack compress vs GPTQModel, side by side in one run: wall time, CPU time, peak RSS, perplexity.

Both tools quantize the SmolLM2-135M sample from the *same* calibration windows (``sample_windows`` of
``stdlib:pydoc@train``, written as token ids for GPTQModel), each in its own child process under
``/usr/bin/time -v`` with the same thread count. Every resulting checkpoint, GPTQModel's included, is then
scored by the same evaluator (``sparsepack eval``: fp32 compute, our loader reads GPTQModel's GPTQ-v1 output),
so perplexities are comparable.

Rows (per bit width):
  fp32            the source model
  rtn             sparsepack, round to nearest (no calibration)
  ours            sparsepack GPTQ, our defaults: damp 0.01, natural column order, Hessian-weighted clip search
                  (0.2 below 8 bits, off at 8)
  gptqmodel       GPTQModel forced to the same settings (damp 0.01, act_group_aware off), no range search (its default)
  gptqmodel-mse   the same with GPTQModel's own range search on (mse 2.4, the reference GPTQ's norm)
  ours-noclip     sparsepack without the clip search (plain min/max group grids, like the gptqmodel row)
  ours-gar        sparsepack GPTQ with GPTQModel's defaults: damp 0.05, group-aware order
  gptqmodel-def   GPTQModel with its own defaults (damp 0.05, act_group_aware on)
All sym, no act-order, true-sequential. GPTQModel computes in bf16 while quantizing (its CPU default).

Usage:
  python benchmarks/compress.py --json out/bench_compress.json [--bits 4 3 8] [--md docs/BENCHMARKS.md]

The machine is shared: the 1-minute load average is sampled during every run and written beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

# Import from the repo root, and drop benchmarks/ itself from the path: benchmarks/kernels.py would shadow the
# `kernels` package that transformers probes for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    ROOT,
    LoadMonitor,
    child_env,
    clean_dir,
    info_text,
    machine_info,
    peer_cmd,
    peer_python,
    run_timed,
    sample_model,
    sparsepack_cmd,
    write_calibration,
    write_md_part,
)

# name -> (tool, extra flags); flags are the CLI's for sparsepack and _gptqmodel_peer.py's for GPTQModel.
ROWS = {
    "rtn": ("sparsepack", ["--method", "rtn"]),
    "ours": ("sparsepack", ["--damp", "0.01", "--no-group-aware"]),
    "gptqmodel": ("gptqmodel", ["--damp", "0.01", "--no-act-group-aware"]),
    "ours-gar": ("sparsepack", ["--damp", "0.05", "--group-aware"]),
    "ours-noclip": ("sparsepack", ["--damp", "0.01", "--no-group-aware", "--clip-search", "0"]),
    "gptqmodel-mse": ("gptqmodel", ["--damp", "0.01", "--no-act-group-aware", "--mse", "2.4"]),
    "gptqmodel-def": ("gptqmodel", []),
}
PAIRS = [("ours", "gptqmodel"), ("ours", "gptqmodel-mse"), ("ours-noclip", "gptqmodel"),
         ("ours-gar", "gptqmodel-def")]  # (ours, peer) with the same settings
SECTION = "## Compress"
INTEROP_HEADING = "### Interop"  # that subsection belongs to interop_gptqmodel.py


def quantize_row(name: str, model_dir: Path, work: Path, bits: int, args, calib: Path, py: Path | None) -> dict:
    tool, extra = ROWS[name]
    out = clean_dir(work / f"{name}-w{bits}g{args.group_size}")
    log = work / "logs" / f"{out.name}.log"
    common = ["--bits", bits, "--group-size", args.group_size, "--nsamples", args.nsamples, "--seqlen", args.seqlen]
    if tool == "sparsepack":
        cmd = sparsepack_cmd("compress", model_dir, "-o", out, *common, "--calib", args.calib, "--seed", args.seed,
                             *extra, "--json")  # fmt: skip
    else:
        cmd = peer_cmd(py, "quantize", model_dir, out, *common, "--calib-file", calib, *extra)
    with LoadMonitor() as load:
        run = run_timed(cmd, log, env=child_env(args.threads))
    res = run.result or {}
    row = {"tool": tool, "flags": " ".join(extra), "pack": str(out), "wall_s": run.wall_s, "user_s": run.user_s,
           "sys_s": run.sys_s, "peak_rss_mb": run.peak_rss_mb, "load": load.summary(), "cmd": " ".join(run.cmd),
           "result": res}  # fmt: skip
    if tool == "sparsepack":
        row["tool_s"] = res.get("seconds")  # compress() itself: read, calibrate, quantize, write
        row["compute_s"] = row["tool_s"]
    else:
        row["tool_s"] = res.get("seconds")  # load + quantize + save
        row["compute_s"] = (res.get("quantize_s") or 0) + (res.get("save_s") or 0)  # without GPTQModel.load
    print(f"[{name} w{bits}] wall {run.wall_s:.1f} s, rss {run.peak_rss_mb or 0:.0f} MB, load {load.summary()}",
          file=sys.stderr)  # fmt: skip
    return row


def evaluate(path: Path, work: Path, tag: str, data: str, windows: int | None, args) -> dict:
    cmd = sparsepack_cmd("eval", path, "--data", data, "--seqlen", args.seqlen, "--json")
    if windows:
        cmd += ["--windows", str(windows)]
    run = run_timed(cmd, work / "logs" / f"eval-{tag}.log", env=child_env(args.threads))
    res = run.result or {}
    return {"data": data, "perplexity": res.get("perplexity"), "nll": res.get("nll"), "tokens": res.get("tokens"),
            "windows": res.get("windows"), "seconds": res.get("seconds")}  # fmt: skip


def ratios(table: dict) -> dict:
    out = {}
    for ours, peer in PAIRS:
        a, b = table.get(ours), table.get(peer)
        if not (a and b):
            continue

        def r(x, y):
            return x / y if (x is not None and y) else None

        rec = {"wall": r(a["wall_s"], b["wall_s"]), "tool": r(a["tool_s"], b["tool_s"]),
               "compute": r(a["compute_s"], b["compute_s"]),
               "cpu": r((a["user_s"] or 0) + (a["sys_s"] or 0), (b["user_s"] or 0) + (b["sys_s"] or 0)),
               "peak_rss": r(a["peak_rss_mb"], b["peak_rss_mb"])}  # fmt: skip
        for key, ev in a.get("eval", {}).items():
            rec[f"ppl[{key}]"] = r(ev["perplexity"], b["eval"][key]["perplexity"])
        out[f"{ours}/{peer}"] = rec
    return out


def render(results: dict) -> str:
    """The markdown section (table per bit width, ratios, reproduction command)."""
    m, s = results["machine"], results["settings"]
    evals = list(results["eval_sets"])
    lines = [f"`{results['command']}`", "",
             f"SmolLM2-135M sample, group {s['group_size']}, sym, {s['nsamples']} x {s['seqlen']}-token windows of "
             f"`{s['calib']}` (seed {s['seed']}; GPTQModel gets the identical token ids), {m['threads']} threads, "
             f"{m['cpu']} ({m['cores']} cores, shared: 1-min load average {results['load']['load1_mean']:.1f} mean, "
             f"{results['load']['load1_max']:.1f} max during the run), torch {m['torch']}, GPTQModel 7.7.0. "
             f"Perplexity: `sparsepack eval` (fp32 compute) for every checkpoint, GPTQModel's included; "
             f"seqlen {s['seqlen']}, " + ", ".join(f"{k} = {v}" for k, v in results["eval_sets"].items()) + ". "
             "wall = child process (imports included); tool = the tool's own timer (GPTQModel: load + quantize + "
             "save); compute = tool without GPTQModel.load. Its CPU kernels were JIT-compiled before (cached), so "
             "no JIT is in these times."]  # fmt: skip
    if s.get("other_bits_rows") and len(s["bits"]) > 1:
        lines[-1] += (f" To fit the shared machine's time, {s['bits'][0]}-bit runs every row and the other widths "
                      f"only {', '.join(s['other_bits_rows'])}.")  # fmt: skip
    lines.append("")
    for bits, table in results["tables"].items():
        head = "| row | settings | wall s | tool s | compute s | CPU s | peak RSS MB | load | " + " | ".join(
            f"ppl {k}" for k in evals) + " |"  # fmt: skip
        lines += [f"### {bits}-bit", "", head, "|" + "---|" * (8 + len(evals))]
        for name, row in table.items():
            ppl = " | ".join(f"{row['eval'][k]['perplexity']:.3f}" for k in evals)
            if name == "fp32":
                lines.append(f"| fp32 | - | | | | | | | {ppl} |")
                continue
            cpu = (row["user_s"] or 0) + (row["sys_s"] or 0)
            lines.append(f"| {name} ({row['tool']}) | {row['flags'] or 'defaults'} | {row['wall_s']:.0f} | "
                         f"{row['tool_s'] or 0:.0f} | {row['compute_s'] or 0:.0f} | {cpu:.0f} | "
                         f"{row['peak_rss_mb'] or 0:.0f} | {row['load']['load1_mean']:.1f} | {ppl} |")  # fmt: skip
        lines += ["", "| ours / peer | wall | tool | compute | CPU | peak RSS | " + " | ".join(
            f"ppl {k}" for k in evals) + " |", "|" + "---|" * (6 + len(evals))]  # fmt: skip
        for pair, rec in results["ratios"][bits].items():
            cells = [rec.get(k) for k in ("wall", "tool", "compute", "cpu", "peak_rss")]
            cells += [rec.get(f"ppl[{k}]") for k in evals]
            lines.append(f"| {pair} | " + " | ".join(f"{c:.3f}" if c is not None else "-" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_section(md: Path, text: str) -> None:
    """Our part of ``## Compress`` in ``md``: everything but the interop subsection (interop_gptqmodel.py's)."""
    write_md_part(md, SECTION, text, owned=lambda heading: not heading.startswith(INTEROP_HEADING))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="write the results here")
    ap.add_argument("--md", type=Path, help="update the '## Compress' section of this markdown file")
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--calib", default="stdlib:pydoc@train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--other-bits-rows", nargs="+", choices=list(ROWS),
                    help="rows for every bit width after the first (default: --rows); e.g. rtn ours gptqmodel "
                    "to keep a three-width run short")  # fmt: skip
    ap.add_argument("--extra-windows", type=int, default=40,
                    help="windows of the second held-out text (GNU coreutils manual); 0 skips it")  # fmt: skip
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-compress")
    args = ap.parse_args(argv)

    work = args.workdir
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model_dir = sample_model()
    py = peer_python() if any(ROWS[r][0] == "gptqmodel" for r in args.rows + (args.other_bits_rows or [])) else None
    calib = work / "calib.jsonl"
    windows = write_calibration(model_dir, calib, args.calib, args.seqlen, args.nsamples, args.seed)
    eval_sets = {"pydoc@eval": ("stdlib:pydoc@eval", None)}
    extra = info_text(work / "coreutils.txt") if args.extra_windows else None
    if extra is not None:
        eval_sets["coreutils"] = (str(extra), args.extra_windows)
    results = {
        "command": "python benchmarks/compress.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(args.threads), "model": str(model_dir),
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "md", "workdir")},
        "calibration": {"file": str(calib), "shape": list(windows.shape),
                        "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()},
        "eval_sets": {k: (f"{v[0]} (first {v[1]} windows)" if v[1] else v[0]) for k, v in eval_sets.items()},
        "tables": {}, "ratios": {},
    }  # fmt: skip
    start = time.perf_counter()
    with LoadMonitor(interval=10) as load:
        fp32 = {"eval": {k: evaluate(model_dir, work, f"fp32-{k}", d, n, args) for k, (d, n) in eval_sets.items()}}
        for bits in args.bits:
            table = {"fp32": fp32}
            rows = args.rows if bits == args.bits[0] or not args.other_bits_rows else args.other_bits_rows
            for name in rows:  # ours and the peer alternate, so drifting load hits both alike
                table[name] = quantize_row(name, model_dir, work, bits, args, calib, py)
                table[name]["eval"] = {k: evaluate(Path(table[name]["pack"]), work, f"{name}-w{bits}-{k}", d, n, args)
                                       for k, (d, n) in eval_sets.items()}  # fmt: skip
                print(f"[{name} w{bits}] " + json.dumps({k: v["perplexity"] for k, v in table[name]["eval"].items()}),
                      file=sys.stderr)  # fmt: skip
            results["tables"][str(bits)] = table
            results["ratios"][str(bits)] = ratios(table)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**results, "load": load.summary()}, indent=2))  # partial results
    results["load"] = load.summary()
    results["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - start
    args.json.write_text(json.dumps(results, indent=2))
    section = render(results)
    if args.md:
        write_section(args.md, section)
    print(section)
    return results


if __name__ == "__main__":
    main()
