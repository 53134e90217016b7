"""Kernel figures of issue 4, side by side with the dense alternative (CPU, SmolLM2 layer shapes, 512 tokens).

    python benchmarks/kernels.py --json out/kernels.json [--md out/kernels.md] [--repeats 30] [--quick]

Figures (goal in brackets):
  sddmm           vs dense ``dy.T @ x`` then gather                          [>= 3x faster at 1%]
  spmm            vs ``x @ S_dense.T``                                       [>= 3x faster at 1%]
  spmm_t          vs ``dy @ S_dense``                                        (no goal; the input gradient)
  dequant_matmul  4-bit g64 vs fp32 ``x @ W`` with W pre-dequantized         [<= 1.3x the time, 1/8 the bytes]
  dequant_matmul_t                                                            (no goal; the input gradient)
  layer           RoSA r=16 d=0.6% forward+backward vs PEFT LoRA r=16        [<= 1.15x the time]

Timing: each pair of callables is run alternately (ours, theirs, ours, ...) so that load from other processes
hits both alike; the ratio uses the minimum over repeats, the median is reported beside it. The machine load is
recorded. Triton kernels are not timed: no machine of this project has a GPU, and the interpreter's speed means
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

# benchmarks/ itself off the path: its onnx.py would shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sparsepack.formats.gptq_layout import GPTQTensors, rtn_quantize  # noqa: E402
from sparsepack.kernels import (  # noqa: E402
    CSRSupport,
    DenseBase,
    GPTQBase,
    base_weight,
    dequant_matmul,
    dequant_matmul_t,
    dequantize_reference,
    sddmm,
    sparse_lowrank_linear,
    spmm,
    spmm_t,
)

SHAPES = [(1536, 576), (576, 1536), (576, 576)]  # (out, in) of SmolLM2-135M's MLP up/gate, down, attention q/o
DENSITIES = [0.005, 0.01, 0.02]
TRITON_NOTE = "not timed: no GPU on this machine (the Triton interpreter's speed is meaningless)"


def paired_times(ours, theirs, repeats: int, warmup: int = 3) -> tuple[dict, dict]:
    """Alternate the two callables; return per-callable ``{min_ms, median_ms}``."""
    for _ in range(warmup):
        ours()
        theirs()
    a, b = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, a), (theirs, b)):
            t0 = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - t0) * 1e3)
    summary = lambda ts: {"min_ms": round(min(ts), 4), "median_ms": round(statistics.median(ts), 4)}  # noqa: E731
    return summary(a), summary(b)


def _row(op, shape, density, ours, theirs, baseline: str, goal: str, ratio: float, met: bool | None, **extra):
    return {"op": op, "out_x_in": f"{shape[0]}x{shape[1]}", "density": density, "ours": ours, "baseline": theirs,
            "baseline_name": baseline, "ratio": round(ratio, 3), "goal": goal, "met": met, **extra}  # fmt: skip


def _support(shape, density, seed=0) -> CSRSupport:
    gen = torch.Generator().manual_seed(seed)
    return CSRSupport.from_mask(torch.rand(shape, generator=gen) < density)


def _dense_sddmm(dy, x, rows, cols):
    return (dy.t() @ x)[rows, cols]  # (out, in) temporary, then the gather


def bench_sparse(tokens: int, densities, repeats: int) -> list[dict]:
    rows = []
    for shape in SHAPES:
        out_f, in_f = shape
        x, dy = torch.randn(tokens, in_f), torch.randn(tokens, out_f)
        for d in densities:
            sup = _support(shape, d)
            vals = torch.randn(sup.nnz)
            S = torch.zeros(shape).index_put((sup.row_idx.long(), sup.col_idx.long()), vals)
            csr = (sup.row_ptr, sup.col_idx, shape)
            ours, theirs = paired_times(
                partial(sddmm, dy, x, sup.row_idx, sup.col_idx),
                partial(_dense_sddmm, dy, x, sup.row_idx.long(), sup.col_idx.long()),
                repeats,
            )
            r = theirs["min_ms"] / ours["min_ms"]
            rows.append(
                _row(
                    "sddmm",
                    shape,
                    d,
                    ours,
                    theirs,
                    "dy.T @ x + gather",
                    ">= 3x faster at 1%",
                    r,
                    r >= 3 if d == 0.01 else None,
                    temp_bytes_ours=4 * tokens * (in_f + out_f),
                    temp_bytes_baseline=4 * out_f * in_f,
                )
            )
            ours, theirs = paired_times(partial(spmm, x, vals, *csr), partial(torch.matmul, x, S.t()), repeats)
            r = theirs["min_ms"] / ours["min_ms"]
            rows.append(
                _row(
                    "spmm",
                    shape,
                    d,
                    ours,
                    theirs,
                    "x @ S_dense.T",
                    ">= 3x faster at 1%",
                    r,
                    r >= 3 if d == 0.01 else None,
                )
            )
            ours, theirs = paired_times(partial(spmm_t, dy, vals, *csr), partial(torch.matmul, dy, S), repeats)
            r = theirs["min_ms"] / ours["min_ms"]
            rows.append(_row("spmm_t", shape, d, ours, theirs, "dy @ S_dense", "-", r, None))
    return rows


def _gptq(shape, bits=4, group=64, seed=0) -> GPTQTensors:
    out_f, in_f = shape
    gen = torch.Generator().manual_seed(seed)
    q, z, s, g = rtn_quantize(torch.randn(out_f, in_f, generator=gen) * 0.02, bits, group, sym=False)
    return GPTQTensors.from_int(q, z, s, g, bits)


def bench_dequant(tokens: int, repeats: int) -> list[dict]:
    rows = []
    for shape in SHAPES:
        out_f, in_f = shape
        t = _gptq(shape)
        args = (t.qweight, t.qzeros, t.scales, t.g_idx, t.bits)
        W = dequantize_reference(*args)  # (in, out) fp32, the baseline's pre-dequantized weight
        packed = sum(a.numel() * a.element_size() for a in (t.qweight, t.qzeros, t.scales, t.g_idx))
        x, dy = torch.randn(tokens, in_f), torch.randn(tokens, out_f)
        ours, theirs = paired_times(partial(dequant_matmul, x, *args), partial(torch.matmul, x, W), repeats)
        r = ours["min_ms"] / theirs["min_ms"]
        rows.append(
            _row(
                "dequant_matmul w4g64",
                shape,
                None,
                ours,
                theirs,
                "x @ W (fp32, pre-dequantized)",
                "<= 1.3x time",
                r,
                r <= 1.3,
                weight_bytes_ours=packed,
                weight_bytes_baseline=W.numel() * 4,
            )
        )
        ours, theirs = paired_times(partial(dequant_matmul_t, dy, *args), partial(torch.matmul, dy, W.t()), repeats)
        r = ours["min_ms"] / theirs["min_ms"]
        rows.append(_row("dequant_matmul_t w4g64", shape, None, ours, theirs, "dy @ W.T (fp32)", "-", r, None))
    return rows


class RoSALayer(nn.Module):
    """The benchmarked layer: frozen base + LoRA + sparse through ``sparse_lowrank_linear``."""

    def __init__(self, base, shape, r: int, density: float, alpha: float):
        super().__init__()
        out_f, in_f = shape
        self.base, self.scaling, self.support = base, alpha / r, _support(shape, density, seed=1)
        self.A = nn.Parameter(torch.randn(r, in_f) / in_f**0.5)
        self.B = nn.Parameter(torch.randn(out_f, r) * 0.01)
        self.values = nn.Parameter(torch.randn(self.support.nnz) * 0.01)

    def forward(self, x):
        s = self.support
        return sparse_lowrank_linear(
            x, self.base, self.A, self.B, self.scaling, self.values, s.row_ptr, s.col_idx, s.row_idx
        )


def _peft_lora(linear: nn.Linear, r: int, alpha: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    layer = LoraLinear(linear, "default", LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0), r=r, lora_alpha=alpha)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.01)  # PEFT starts B at zero; the timing does not care
    return layer


def _train_step(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor):
    def step():
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        layer(x).backward(gy)

    return step


def bench_layer(tokens: int, repeats: int, r: int = 16, density: float = 0.006, alpha: float = 16) -> list[dict]:
    rows = []
    for shape in SHAPES:
        out_f, in_f = shape
        linear = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
        lora = _peft_lora(linear, r, alpha)
        x = torch.randn(tokens, in_f, requires_grad=True)
        gy = torch.randn(tokens, out_f)
        theirs_step = _train_step(lora, x, gy)
        t = _gptq(shape)
        variants = {
            "layer RoSA (dense base)": RoSALayer(DenseBase(linear.weight), shape, r, density, alpha),
            "layer RoSA (GPTQ w4g64 base)": RoSALayer(
                GPTQBase(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits), shape, r, density, alpha
            ),
        }
        for name, layer in variants.items():
            ours, theirs = paired_times(_train_step(layer, x, gy), theirs_step, repeats)
            ratio = ours["min_ms"] / theirs["min_ms"]
            met = ratio <= 1.15 if "dense" in name else None
            rows.append(
                _row(
                    name,
                    shape,
                    density,
                    ours,
                    theirs,
                    "PEFT LoRA r=16 (dense base)",
                    "<= 1.15x time",
                    ratio,
                    met,
                    rank=r,
                )
            )
        # the same dense-base layer with the sparse part forced through spmm/spmm_t (no folding), for reference
        saved = base_weight._FOLD_MIN_WORK, base_weight._FOLD_ALWAYS_ELEMENTS
        base_weight._FOLD_MIN_WORK, base_weight._FOLD_ALWAYS_ELEMENTS = float("inf"), -1
        try:
            layer = variants["layer RoSA (dense base)"]
            ours, theirs = paired_times(_train_step(layer, x, gy), theirs_step, repeats)
        finally:
            base_weight._FOLD_MIN_WORK, base_weight._FOLD_ALWAYS_ELEMENTS = saved
        rows.append(
            _row(
                "layer RoSA (dense base, unfolded)",
                shape,
                density,
                ours,
                theirs,
                "PEFT LoRA r=16 (dense base)",
                "-",
                ours["min_ms"] / theirs["min_ms"],
                None,
                rank=r,
            )
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    head = (
        "| op | out x in | density | ours ms (min / median) | baseline | baseline ms (min / median) | ratio | "
        "goal | met |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        d = "-" if r["density"] is None else f"{100 * r['density']:.1f}%"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(
            f"| {r['op']} | {r['out_x_in']} | {d} | {r['ours']['min_ms']:.3f} / {r['ours']['median_ms']:.3f} | "
            f"{r['baseline_name']} | {r['baseline']['min_ms']:.3f} / {r['baseline']['median_ms']:.3f} | "
            f"{r['ratio']:.2f} | {r['goal']} | {met} |"
        )
    lines.append("")
    lines.append("ratio: baseline / ours for sddmm, spmm, spmm_t (speed-up); ours / baseline otherwise (slow-down).")
    lines.append(f"Triton kernels: {meta['triton']}.")
    lines.append(
        f"{meta['tokens']} tokens, fp32, {meta['repeats']} alternating repeats; torch threads {meta['torch_threads']}, "
        f"numba threads {meta['numba_threads']}; load average {meta['loadavg_start'][0]:.2f} -> "
        f"{meta['loadavg_end'][0]:.2f}; {meta['time']}."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True, help="write all measurements here")
    ap.add_argument("--md", type=Path, help="also write the markdown table here")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="1%% density only, 8 repeats")
    ap.add_argument("--only", choices=["sparse", "dequant", "layer"], help="run one group of figures")
    ap.add_argument("--threads", type=int, help="torch and numba threads (default: theirs, i.e. all cores)")
    args = ap.parse_args()
    repeats = 8 if args.quick else args.repeats
    densities = [0.01] if args.quick else DENSITIES
    torch.manual_seed(0)
    import numba

    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    meta = {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
        "torch": torch.__version__, "numba": numba.__version__, "tokens": args.tokens, "repeats": repeats,
        "loadavg_start": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "triton": TRITON_NOTE if not torch.cuda.is_available() else "not timed by this script",
    }  # fmt: skip
    rows = []
    if args.only in (None, "sparse"):
        rows += bench_sparse(args.tokens, densities, repeats)
    if args.only in (None, "dequant"):
        rows += bench_dequant(args.tokens, repeats)
    if args.only in (None, "layer"):
        rows += bench_layer(args.tokens, repeats)
    meta["loadavg_end"] = os.getloadavg()
    md = markdown(rows, meta)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": rows, "markdown": md}, indent=2))
    if args.md:
        args.md.write_text(md + "\n")
    print(md)
    print(f"\nload average {meta['loadavg_start']} -> {meta['loadavg_end']}; JSON: {args.json}")


if __name__ == "__main__":
    main()
