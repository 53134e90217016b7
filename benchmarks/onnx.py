"""ONNX export vs PyTorch on the SmolLM2-135M sample: prefill latency, decode speed, adapter switching, sizes.

    python benchmarks/onnx.py --json out/bench_onnx.json [--md docs/BENCHMARKS.md] [--work out/bench-onnx]

One process, CPU, alternating rounds over every variant (best of ``--rounds``):

- PyTorch eager fp32 dense (the sample, transformers), ``sparsepack.load`` of the 4-bit g64 pack;
- onnxruntime: fp32 dense export, 4-bit export without adapter, with the adapter unfused (active) in standard ops
  and with ``--adapter-op custom`` (sparsepack's ``SparseLowRankDelta`` op), merged.

Prefill is one ``1 x 128`` forward; decode is 32 greedy tokens after that 128-token prompt (tokens/s over the 32
steps, prefill excluded), with the KV cache on both sides. The adapter is RoSA-shaped (r=16, density 0.6%, every
decoder linear) with random values: the timing depends on shapes and sparsity, not on trained values. Logit
differences are the prefill logits of each ONNX graph against the PyTorch model it was exported from.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# This file is benchmarks/onnx.py: drop its own folder from the path, or `import onnx` finds this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import ROOT, LoadMonitor, machine_info, sample_model, write_md_part  # noqa: E402

PROMPT_LEN, DECODE = 128, 32
SECTION = "## ONNX export"


def random_rosa_pack(src: Path, out: Path, rank: int = 16, density: float = 0.006, seed: int = 0) -> Path:
    """``src`` + adapter ``rosa``: random A, B and values on a random support in every quantized linear."""
    from sparsepack.formats.adapter_layout import Adapter, AdapterModule
    from sparsepack.formats.manifest import StageRecord
    from sparsepack.formats.pack import read_pack
    from sparsepack.kernels import CSRSupport
    from sparsepack.pipeline.finetune import write_adapter_pack

    if (out / "adapters" / "rosa").is_dir():
        return out
    pack = read_pack(src)
    gen = torch.Generator().manual_seed(seed)
    mods = {}
    for name in pack.quantized_modules:
        in_f = pack.tensors[f"{name}.g_idx"].shape[0]
        out_f = pack.tensors[f"{name}.scales"].shape[1]
        nnz = int(density * in_f * out_f)
        flat = torch.randperm(in_f * out_f, generator=gen)[:nnz]
        support = CSRSupport.from_coo(flat // in_f, flat % in_f, (out_f, in_f))
        mods[name] = AdapterModule(shape=(out_f, in_f), A=torch.randn(rank, in_f, generator=gen) / in_f**0.5,
                                   B=torch.randn(out_f, rank, generator=gen) * 0.01, alpha=16.0,
                                   values=torch.randn(nnz, generator=gen) * 0.01, row_ptr=support.row_ptr,
                                   col_idx=support.col_idx)  # fmt: skip
    adapter = Adapter(mods, "rosa", {"support": "random", "note": "random values (benchmark)"})
    write_adapter_pack(
        pack, out, "rosa", adapter, StageRecord("bench-random-adapter", {"rank": rank, "density": density})
    )
    return out


def prompt_ids(model_dir: Path) -> np.ndarray:
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import token_windows

    w = token_windows(load_tokenizer(model_dir), "stdlib:pydoc@eval", PROMPT_LEN, 1)
    return np.asarray(w[0], dtype=np.int64)[None, :]  # (1, 128)


# ----------------------------------------------------------------------------------------------- runners


class TorchRunner:
    def __init__(self, model) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def prefill(self, ids: np.ndarray):
        return self.model(torch.from_numpy(ids), use_cache=True)

    @torch.no_grad()
    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(ids), use_cache=False).logits.float().numpy()

    @torch.no_grad()
    def decode(self, ids: np.ndarray) -> float:
        out = self.prefill(ids)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(DECODE):
            out = self.model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t


class OrtRunner:
    def __init__(self, export_dir: Path, adapter: str | None = None) -> None:
        from sparsepack.runtime.onnx_runtime import OnnxModel

        self.om = OnnxModel(export_dir)
        self.om.set_adapter(adapter)
        self.names = [o.name for o in self.om.session.get_outputs()]

    def _feeds(self, ids, mask, pos, past):
        return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}

    def prefill(self, ids: np.ndarray):
        from sparsepack.runtime.onnx_runtime import empty_past

        mask = np.ones_like(ids)
        pos = np.arange(ids.shape[1], dtype=np.int64)[None]
        feeds = self._feeds(ids, mask, pos, empty_past(self.om.layout, 1))
        return dict(zip(self.names, self.om.session.run(self.names, feeds, self.om._run_options), strict=True))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.prefill(ids)["logits"]

    def decode(self, ids: np.ndarray) -> float:
        outs = self.prefill(ids)
        n = ids.shape[1]
        t = time.perf_counter()
        for i in range(DECODE):
            nxt = outs["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
            past = {k.replace("present_", "past_"): v for k, v in outs.items() if k.startswith("present_")}
            feeds = self._feeds(nxt, np.ones((1, n + i + 1), np.int64), np.array([[n + i]], np.int64), past)
            outs = dict(zip(self.names, self.om.session.run(self.names, feeds, self.om._run_options), strict=True))
        return time.perf_counter() - t


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------- main


def export_all(work: Path, model_dir: Path, pack: Path) -> dict[str, dict]:
    """The six exports (reused when present: delete ``work`` to re-export)."""
    from sparsepack.exporters.onnx import export_onnx

    jobs = {"ort_fp32_dense": (model_dir, {}), "ort_4bit": (pack, {}),
            "ort_4bit_unfused": (pack, {"adapters": ["rosa"]}),
            "ort_4bit_custom": (pack, {"adapters": ["rosa"], "adapter_op": "custom"}),
            "ort_4bit_custom16": (pack, {"adapters": ["rosa"], "adapter_op": "custom-fp16"}),
            "ort_4bit_merged": (pack, {"adapters": ["rosa"], "merge": True})}  # fmt: skip
    out = {}
    for name, (src, kw) in jobs.items():
        d = work / name
        summary_file = work / f"{name}.export.json"
        if not (d / "sparsepack_onnx.json").is_file():
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            s = export_onnx(src, d, validate=False, overwrite=True, **kw)
            s["loadavg"] = os.getloadavg()
            summary_file.write_text(json.dumps(s, indent=2))
        out[name] = json.loads(summary_file.read_text())
    return out


def switch_times(export_dir: Path, repeats: int = 20) -> dict[str, float]:
    """ms to activate the adapter in a live session: first use (reads the file) and cached switches."""
    from sparsepack.runtime.onnx_runtime import OnnxModel

    om = OnnxModel(export_dir)
    ids = np.ones((1, 4), np.int64)
    om.logits(ids)
    t = time.perf_counter()
    om.set_adapter("rosa")
    first = time.perf_counter() - t
    om.logits(ids)
    cached = []
    for _ in range(repeats):
        for name in (None, "rosa"):
            t = time.perf_counter()
            om.set_adapter(name)
            cached.append(time.perf_counter() - t)
    t = time.perf_counter()
    om.set_adapter("rosa")
    om.logits(ids)
    with_run = time.perf_counter() - t
    om.set_adapter(None)
    t = time.perf_counter()
    om.logits(ids)
    base_run = time.perf_counter() - t
    return {"first_load_ms": first * 1e3, "cached_switch_ms": float(np.median(cached)) * 1e3,
            "first_call_after_switch_extra_ms": (with_run - base_run) * 1e3}  # fmt: skip


def run(args) -> dict:
    from transformers import AutoModelForCausalLM

    import sparsepack

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = sample_model()
    pack = work / "smollm2-w4g64"
    if not pack.exists():
        shutil.copytree(args.pack, pack)
    rosa = random_rosa_pack(pack, work / "smollm2-w4g64-rosa")
    result: dict = {
        "machine": machine_info(args.threads),
        "prompt_tokens": PROMPT_LEN,
        "decode_tokens": DECODE,
        "adapter": "random RoSA-shaped r=16 d=0.6% on every decoder linear",
        "rounds": args.rounds,
    }
    with LoadMonitor() as mon_export:
        t = time.perf_counter()
        exports = export_all(work, model_dir, rosa)
        result["export_wall_s"] = time.perf_counter() - t
    result["exports"] = exports
    result["load_during_export"] = mon_export.summary()
    ids = prompt_ids(model_dir)
    runners = {
        "torch_fp32_dense": TorchRunner(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)),
        "sparsepack_4bit": TorchRunner(sparsepack.load(rosa)),
        "ort_fp32_dense": OrtRunner(work / "ort_fp32_dense"),
        "ort_4bit": OrtRunner(work / "ort_4bit"),
        "ort_4bit_unfused": OrtRunner(work / "ort_4bit_unfused", adapter="rosa"),
        "ort_4bit_custom": OrtRunner(work / "ort_4bit_custom", adapter="rosa"),
        "ort_4bit_custom16": OrtRunner(work / "ort_4bit_custom16", adapter="rosa"),
        "ort_4bit_merged": OrtRunner(work / "ort_4bit_merged"),
    }
    refs = {"ort_fp32_dense": runners["torch_fp32_dense"], "ort_4bit": runners["sparsepack_4bit"],
            "ort_4bit_unfused": TorchRunner(sparsepack.load(rosa, adapter="rosa")),
            "ort_4bit_merged": None}  # fmt: skip
    refs["ort_4bit_merged"] = refs["ort_4bit_custom"] = refs["ort_4bit_custom16"] = refs["ort_4bit_unfused"]
    diffs = {}
    for name, ref in refs.items():
        diffs[name] = float(np.abs(runners[name].logits(ids) - ref.logits(ids)).max())
    diffs["sparsepack_4bit"] = float(np.abs(runners["sparsepack_4bit"].logits(ids)
                                            - runners["torch_fp32_dense"].logits(ids)).max())  # fmt: skip
    del refs
    prefill = {k: [] for k in runners}
    decode = {k: [] for k in runners}
    with LoadMonitor() as mon:
        for _ in range(args.rounds):  # alternate: every variant once per round
            for name, r in runners.items():
                r.prefill(ids)  # warm
                t = time.perf_counter()
                r.prefill(ids)
                prefill[name].append(time.perf_counter() - t)
                decode[name].append(r.decode(ids))
    result["load_during_timing"] = mon.summary()
    rows = {}
    fp32_bytes = dir_bytes(work / "ort_fp32_dense")
    for name in runners:
        rows[name] = {"prefill_ms": min(prefill[name]) * 1e3, "decode_tok_s": DECODE / min(decode[name]),
                      "prefill_ms_all": [x * 1e3 for x in prefill[name]],
                      "decode_tok_s_all": [DECODE / x for x in decode[name]]}  # fmt: skip
        if name.startswith("ort"):
            rows[name]["bytes"] = dir_bytes(work / name)
            rows[name]["size_vs_fp32_export"] = rows[name]["bytes"] / fp32_bytes
        rows[name]["max_abs_logit_diff"] = diffs.get(name)
    result["rows"] = rows
    result["switch"] = switch_times(work / "ort_4bit_unfused")
    result["switch_custom"] = switch_times(work / "ort_4bit_custom")
    base = rows["ort_4bit"]
    result["headline"] = {
        "ort_4bit_decode_vs_torch_fp32": base["decode_tok_s"] / rows["torch_fp32_dense"]["decode_tok_s"],
        "unfused_decode_overhead": base["decode_tok_s"] / rows["ort_4bit_unfused"]["decode_tok_s"] - 1,
        "unfused_prefill_overhead": rows["ort_4bit_unfused"]["prefill_ms"] / base["prefill_ms"] - 1,
        "custom_decode_overhead": base["decode_tok_s"] / rows["ort_4bit_custom"]["decode_tok_s"] - 1,
        "custom_prefill_overhead": rows["ort_4bit_custom"]["prefill_ms"] / base["prefill_ms"] - 1,
        "custom16_decode_overhead": base["decode_tok_s"] / rows["ort_4bit_custom16"]["decode_tok_s"] - 1,
        "custom16_prefill_overhead": rows["ort_4bit_custom16"]["prefill_ms"] / base["prefill_ms"] - 1,
        "merged_decode_overhead": base["decode_tok_s"] / rows["ort_4bit_merged"]["decode_tok_s"] - 1,
        "adapter_switch_ms": result["switch"]["cached_switch_ms"],
    }
    return result


def markdown(r: dict) -> str:
    h, m = r["headline"], r["machine"]
    labels = {
        "torch_fp32_dense": "PyTorch eager fp32 dense",
        "sparsepack_4bit": "`sparsepack.load` 4-bit g64",
        "ort_fp32_dense": "ORT fp32 dense export",
        "ort_4bit": "ORT 4-bit (MatMulNBits), no adapter",
        "ort_4bit_unfused": "ORT 4-bit + RoSA unfused (active), standard ops",
        "ort_4bit_custom": "ORT 4-bit + RoSA unfused (active), `--adapter-op custom`",
        "ort_4bit_custom16": "ORT 4-bit + RoSA unfused (active), `--adapter-op custom-fp16`",
        "ort_4bit_merged": "ORT 4-bit + RoSA merged",
    }
    lines = [
        "Command: `python benchmarks/onnx.py --json out/bench_onnx.json --md docs/BENCHMARKS.md` (SmolLM2-135M "
        f"sample, GPTQ 4-bit g64 pack, adapter: {r['adapter']}; CPU {m['cpu']}, {m['threads']} threads, one run; "
        f"best of {r['rounds']} alternating rounds; load average during timing {r['load_during_timing']['load1_mean']}"
        f" (max {r['load_during_timing']['load1_max']}) on {m['cores']} cores shared with other jobs).",
        "",
        f"- ORT 4-bit decode vs PyTorch eager fp32: **{h['ort_4bit_decode_vs_torch_fp32']:.2f}x** (goal >= 2x)",
        f"- unfused adapter over the 4-bit base, `--adapter-op custom`: decode "
        f"**{100 * h['custom_decode_overhead']:+.1f}%** (goal <= 15%), "
        f"prefill {100 * h['custom_prefill_overhead']:+.1f}%; `custom-fp16`: decode "
        f"{100 * h['custom16_decode_overhead']:+.1f}%, prefill {100 * h['custom16_prefill_overhead']:+.1f}%;"
        f" in standard ops (the default): decode {100 * h['unfused_decode_overhead']:+.1f}%, prefill "
        f"{100 * h['unfused_prefill_overhead']:+.1f}%",
        f"- adapter switch in a live ORT session: **{h['adapter_switch_ms']:.3f} ms** cached (goal <= 10 ms); first "
        f"use incl. reading the file {r['switch']['first_load_ms']:.1f} ms; the first 4-token call after a switch "
        f"took {r['switch']['first_call_after_switch_extra_ms']:.1f} ms more than a bare-base call (custom op: "
        f"{r['switch_custom']['cached_switch_ms']:.3f} ms cached, "
        f"{r['switch_custom']['first_load_ms']:.1f} ms first use)",
        "",
        "| variant | prefill 1x128 (ms) | decode tok/s (32 after 128) | export size | vs fp32 export "
        "| max abs logit diff |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    ref = {
        "sparsepack_4bit": "vs fp32 eager: the 4-bit quantization error, not an export error",
        "ort_fp32_dense": "vs fp32 eager",
        "ort_4bit": "vs sparsepack 4-bit",
        "ort_4bit_unfused": "vs sparsepack 4-bit + adapter",
        "ort_4bit_custom": "vs sparsepack 4-bit + adapter",
        "ort_4bit_custom16": "vs sparsepack 4-bit + adapter",
        "ort_4bit_merged": "vs sparsepack 4-bit + adapter",
    }
    for name, row in r["rows"].items():
        size = f"{row['bytes'] / 2**20:.1f} MiB" if "bytes" in row else "-"
        rel = f"{row['size_vs_fp32_export']:.2f}x" if "bytes" in row else "-"
        d = row["max_abs_logit_diff"]
        diff = "-" if d is None else f"{d:.1e} ({ref[name]})"
        lines.append(f"| {labels[name]} | {row['prefill_ms']:.1f} | {row['decode_tok_s']:.1f} | {size} | {rel} | "
                     f"{diff} |")  # fmt: skip
    lines += [
        "",
        "Merged: the adapter touches every decoder linear, so every layer becomes a dense fp32 MatMul (the size and "
        "speed of the fp32 export); `sparsepack merge --mode requantize` then a 4-bit export is the compact route. "
        "With the load this machine had, each variant's rounds spread widely (all values in the JSON); ratios "
        "between ORT variants measured in the same rounds are the figures to read.",
        "",
        "The unfused sparse term runs as an `If` on the number of token rows: 1-D `GatherElements` + `Mul` + "
        "`ScatterElements(add)` for one row (decode), the same on the last axis with broadcast indices for more "
        "(prefill). Both are exact at any thread count. The faster feature-major `ScatterND(add)` prefill used "
        "before 2026-11-24 lost updates to repeated rows when onnxruntime ran it on 2 threads (the 2.5e-03 logit "
        "difference of that run; a single-layer test reproduced it in most runs); exact prefill costs the "
        "serial per-element scatter. Per-op and per-layer measurements behind these choices are in "
        "`sparsepack/exporters/onnx_adapters.py` and the notes below the table in `docs/BENCHMARKS.md`.",
        "",
        "`--adapter-op custom` runs each slot as one `sparsepack::SparseLowRankDelta` node instead: low-rank and "
        "CSR sparse (int32 indices) in one C kernel (`sparsepack/runtime/csrc/sp_ortops.c`, built with gcc on "
        "first use and registered by `OnnxModel`; `benchmarks/ort_custom_op/REPORT.md` has the probe behind it). "
        "`custom-fp16` also stores A and B in fp16; its logit difference includes that rounding.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True, type=Path, help="Write the full results here.")
    ap.add_argument("--md", type=Path, default=None, help="Update the '## ONNX export' section of this file.")
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "bench-onnx", help="Packs and exports (reused).")
    ap.add_argument("--pack", type=Path, default=ROOT / "out" / "smollm2-w4g64", help="4-bit g64 pack to copy.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    r = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2, default=str))
    md = markdown(r)
    print(md)
    if args.md is not None:
        write_md_part(args.md, SECTION, md, lambda heading: heading == "")  # keeps hand-written ### notes


if __name__ == "__main__":
    main()
