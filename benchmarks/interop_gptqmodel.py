"""Interop with GPTQModel (and transformers + optimum) in both directions, by comparing logits.

  (a) packs written by ``sparsepack compress`` (4-bit g64, and one act-order pack with a non-monotone
      ``g_idx``) load in GPTQModel and in transformers' GPTQ integration (both run in the peer venv), and
      their logits match ``sparsepack.load``'s;
  (b) a checkpoint written by GPTQModel loads in ``sparsepack.load`` and matches GPTQModel's own logits.

GPTQModel's CPU kernels compute in bf16/fp16 only, while ``sparsepack.load`` computes in fp32, so the
tolerance is tied to the noise of bf16 itself: the *dense* source model run in bf16 vs fp32 gives a relative
logit error ``e_bf16`` and a top-1 agreement ``a_bf16``; a pair passes when its relative error is at most
``TOL_FACTOR * e_bf16`` and its top-1 agreement at least ``a_bf16 - TOP1_SLACK``. A layout mistake (a zero point
off by one, a wrong g_idx, unpacked bits in the wrong order) gives errors tens of times larger than that.
Each pair is also compared with sparsepack in bf16 (same arithmetic as the peer, so nearly exact).

Usage:
  python benchmarks/interop_gptqmodel.py [--tiny] [--json OUT] [--workdir DIR] [--nsamples 16]

``--tiny`` uses a random 2-layer Llama built from a config (about two minutes, most of it GPTQModel's
imports); the default is the SmolLM2-135M sample. The peer venv is built by ``gptqmodel_env.sh`` when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Import from the repo root, and drop benchmarks/ itself from the path: benchmarks/kernels.py would shadow the
# `kernels` package that transformers probes for.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import (  # noqa: E402
    LoadMonitor,
    child_env,
    clean_dir,
    machine_info,
    peer_cmd,
    peer_python,
    run_timed,
    sample_model,
    tiny_model,
    write_calibration,
    write_md_part,
)

TOL_FACTOR = 1.5  # relative logit error allowed, as a multiple of the dense model's bf16-vs-fp32 error
TOP1_SLACK = 0.02  # top-1 agreement allowed below the dense model's bf16-vs-fp32 agreement

# Run in the peer venv: transformers' own GPTQ path (needs optimum + gptqmodel there; sparsepack is absent).
# Writes the logits to OUT.npy and a JSON record to OUT.json (stdout is full of GPTQModel's log lines).
HF_LOADER = r"""
import json, sys, time, traceback
import numpy as np, torch
pack, tokens, out = sys.argv[1:4]
rec = {"loader": "transformers+optimum+gptqmodel"}
try:
    import transformers
    rec["transformers"] = transformers.__version__
    from importlib.metadata import PackageNotFoundError, version
    for dist in ("optimum", "gptqmodel"):
        try:
            rec[dist] = version(dist)
        except PackageNotFoundError:
            rec[dist] = "missing"
    from transformers import AutoModelForCausalLM
    ids = torch.tensor(json.load(open(tokens)))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(pack, device_map="cpu")
    rec["load_s"] = time.perf_counter() - t0
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    np.save(out + ".npy", logits.numpy())
    rec["ok"] = True
    rec["dtype"] = str(next(model.parameters()).dtype)
    rec["backend"] = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
except Exception as e:
    rec["ok"] = False
    rec["error"] = f"{type(e).__name__}: {e}"
    rec["traceback"] = traceback.format_exc()[-2000:]
open(out + ".json", "w").write(json.dumps(rec))
"""


def compare(ref: np.ndarray, other: np.ndarray) -> dict:
    """Logit agreement of ``other`` with ``ref`` (both ``[B, T, V]``): relative L2 error, top-1, KL, max abs."""
    a = torch.from_numpy(ref).double()
    b = torch.from_numpy(other).double()
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none")
    return {
        "rel_err": float((a - b).norm() / a.norm()),
        "top1": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
        "kl_nats": float(kl.sum(-1).mean()),  # KL(ref || other) per token
        "max_abs": float((a - b).abs().max()),
    }


def judge(metrics: dict, tol: dict) -> bool:
    return metrics["rel_err"] <= tol["rel_err"] and metrics["top1"] >= tol["top1"]


def our_logits(path: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> np.ndarray:
    import sparsepack

    model = sparsepack.load(path, dtype=dtype)
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()  # (B, T, V)


def dense_logits(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float().numpy()


class Peer:
    """The GPTQModel venv, driven through ``_gptqmodel_peer.py`` and the inline transformers loader."""

    def __init__(self, py: Path, work: Path, threads: int):
        self.py, self.work, self.env = py, work, child_env(threads)

    def logits(self, pack: Path, tokens: Path, tag: str) -> tuple[np.ndarray, dict]:
        out = self.work / f"{tag}.gptqmodel.npy"
        run = run_timed(peer_cmd(self.py, "logits", pack, "--tokens", tokens, "--out", out),
                        self.work / "logs" / f"{tag}.gptqmodel.log", env=self.env)  # fmt: skip
        return np.load(out), {**run.result, "wall_s": run.wall_s}

    def hf_logits(self, pack: Path, tokens: Path, tag: str) -> tuple[np.ndarray | None, dict]:
        script = self.work / "hf_loader.py"
        script.write_text(HF_LOADER)
        out = self.work / f"{tag}.transformers"
        run = run_timed([self.py, "-P", script, pack, tokens, out], self.work / "logs" / f"{tag}.transformers.log",
                        env=self.env, check=False)  # fmt: skip
        rec_path = Path(str(out) + ".json")
        rec = json.loads(rec_path.read_text()) if rec_path.exists() else {"ok": False, "error": run.stderr_tail}
        rec["wall_s"] = run.wall_s
        return (np.load(str(out) + ".npy") if rec.get("ok") else None), rec

    def quantize(self, model_dir: Path, out: Path, calib: Path, nsamples: int, seqlen: int, *extra: str) -> dict:
        run = run_timed(peer_cmd(self.py, "quantize", model_dir, clean_dir(out), "--bits", 4, "--group-size", 64,
                                 "--calib-file", calib, "--nsamples", nsamples, "--seqlen", seqlen, *extra),
                        self.work / "logs" / f"{out.name}.quantize.log", env=self.env)  # fmt: skip
        return {**run.result, "wall_s": run.wall_s, "peak_rss_mb_time": run.peak_rss_mb}


def check_pair(name: str, ours: dict[str, np.ndarray], peer: np.ndarray | None, peer_rec: dict, tol: dict) -> dict:
    """One loader pair: the peer's logits against ours in fp32 (judged) and in bf16 (same arithmetic)."""
    row = {"case": name, **{k: peer_rec.get(k) for k in ("loader", "backend", "dtype", "ok", "error") if k in peer_rec}}
    if peer is None:
        row["pass"] = False
        return row
    row["vs_fp32"] = compare(ours["fp32"], peer)
    row["vs_bf16"] = compare(ours["bf16"], peer)
    row["pass"] = judge(row["vs_fp32"], tol)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a random 2-layer Llama instead of the SmolLM2 sample")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--md", type=Path, help="update the interop subsection of '## Compress' in this markdown file")
    ap.add_argument("--workdir", type=Path, help="keep packs and logs here (default: a temporary directory)")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows (quality is not the point here)")
    ap.add_argument("--seqlen", type=int, default=128, help="tokens per calibration and test window")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows whose logits are compared")
    ap.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 2))
    args = ap.parse_args(argv)

    from sparsepack.config import QuantConfig
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.compress import compress
    from sparsepack.pipeline.data import token_windows

    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sparsepack-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    py = peer_python()
    peer = Peer(py, work, args.threads)
    model_dir = tiny_model(work / "tiny-llama") if args.tiny else sample_model()
    results: dict = {"model": str(model_dir), "machine": machine_info(args.threads), "workdir": str(work)}
    start = time.perf_counter()
    monitor = LoadMonitor()
    with monitor:
        ids = token_windows(load_tokenizer(model_dir), "stdlib:pydoc@eval", args.seqlen, args.windows)  # (B, T)
        tokens = work / "tokens.json"
        tokens.write_text(json.dumps(ids.tolist()))
        calib = work / "calib.jsonl"
        write_calibration(model_dir, calib, "stdlib:pydoc@train", args.seqlen, args.nsamples, seed=0)
        results["tokens"] = list(ids.shape)

        # Tolerance: what bf16 alone does to the dense model's logits.
        fp32 = dense_logits(model_dir, ids, torch.float32)
        base = compare(fp32, dense_logits(model_dir, ids, torch.bfloat16))
        tol = {"rel_err": TOL_FACTOR * base["rel_err"], "top1": base["top1"] - TOP1_SLACK}
        results["bf16_baseline"] = base
        results["tolerance"] = {**tol, "rule": f"rel_err <= {TOL_FACTOR} x dense bf16-vs-fp32 rel_err and top1 >= "
                                               f"dense bf16-vs-fp32 top1 - {TOP1_SLACK}"}  # fmt: skip

        # (a) our packs -> GPTQModel, transformers
        results["ours_to_peer"] = []
        for tag, act_order in (("ours-w4g64", False), ("ours-w4g64-actorder", True)):
            pack = work / tag
            cfg = QuantConfig(bits=4, group_size=64, act_order=act_order, nsamples=args.nsamples, seqlen=args.seqlen)
            compress(model_dir, pack, cfg, overwrite=True, progress=False)
            ours = {"fp32": our_logits(pack, ids), "bf16": our_logits(pack, ids, torch.bfloat16)}
            lg, rec = peer.logits(pack, tokens, tag)
            results["ours_to_peer"].append(check_pair(f"{tag} in GPTQModel", ours, lg, {**rec, "loader": "gptqmodel",
                                                                                         "ok": True}, tol))  # fmt: skip
            lg, rec = peer.hf_logits(pack, tokens, tag)
            results["ours_to_peer"].append(check_pair(f"{tag} in transformers", ours, lg, rec, tol))
            print(json.dumps(results["ours_to_peer"][-2:], indent=1), file=sys.stderr)

        # (b) GPTQModel checkpoints -> sparsepack.load
        results["peer_to_ours"] = []
        for tag, extra in (("gptqmodel-w4g64", ()), ("gptqmodel-w4g64-descact", ("--desc-act",))):
            pack = work / tag
            results.setdefault("peer_quantize", {})[tag] = peer.quantize(model_dir, pack, calib, args.nsamples,
                                                                         args.seqlen, *extra)  # fmt: skip
            lg, rec = peer.logits(pack, tokens, tag)
            ours = {"fp32": our_logits(pack, ids), "bf16": our_logits(pack, ids, torch.bfloat16)}
            results["peer_to_ours"].append(check_pair(f"{tag} in sparsepack.load", ours, lg,
                                                      {**rec, "loader": "sparsepack", "ok": True}, tol))  # fmt: skip
            print(json.dumps(results["peer_to_ours"][-1], indent=1), file=sys.stderr)
    results["seconds"] = time.perf_counter() - start
    results["load"] = monitor.summary()
    results["all_pass"] = all(r["pass"] for r in results["ours_to_peer"] + results["peer_to_ours"]
                              if "transformers" not in r["case"])  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    text = render(results)
    if args.md:
        cmd = "python benchmarks/interop_gptqmodel.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_md_part(args.md, "## Compress", f"### Interop with GPTQModel\n\n`{cmd}`\n\n{text}",
                      owned=lambda heading: heading.startswith("### Interop"))  # fmt: skip
    print(text)
    return results


def render(r: dict) -> str:
    """A markdown table of every loader pair."""
    lines = [f"model {r['model']}, {r['tokens'][0]} x {r['tokens'][1]} held-out tokens; tolerance: "
             f"{r['tolerance']['rule']} (bf16 baseline rel_err {r['bf16_baseline']['rel_err']:.4f}, "
             f"top1 {r['bf16_baseline']['top1']:.4f})", "",
             "| checkpoint -> loader | backend / dtype | rel err vs our fp32 | top-1 | KL (nats) | rel err vs our bf16 "
             "| pass |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["ours_to_peer"] + r["peer_to_ours"]:
        if "vs_fp32" not in row:
            lines.append(f"| {row['case']} | - | failed: {row.get('error', '?')[:200]} | | | | no |")
            continue
        a, b = row["vs_fp32"], row["vs_bf16"]
        lines.append(f"| {row['case']} | {','.join(row.get('backend') or [])} / {row.get('dtype')} | "
                     f"{a['rel_err']:.4f} | {a['top1']:.4f} | {a['kl_nats']:.2e} | {b['rel_err']:.4f} | "
                     f"{'yes' if row['pass'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
