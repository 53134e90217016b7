"""How much of the quantization loss each residual initialization recovers before any training.

For every adapted linear of the sample (RoSA budget r=16, density 0.6%, uniform), the correction starts from
``R = W_fp - W_q`` in one of these ways, and the corrected 4-bit model's held-out perplexity is measured at
step 0 (no training):

- ``residual``: ``--init residual``: S on the largest ``|R|`` entries with their values, A/B from an SVD of the rest;
- ``sparse-only``: that S alone (A/B zero);
- ``residual-lowrank``: ``--init residual-lowrank`` at step 0: A/B from an SVD of the whole R, S zero;
- ``activation-weighted``: S and A/B as ``residual``, but fitted to ``R diag(d)`` with ``d_j`` the RMS of
  input feature ``j`` on calibration windows (then unscaled), i.e. weighted by what each column feeds;
- ``lowrank-weighted``: S zero, A/B the rank-r SVD of ``R diag(d)``, unscaled (``residual-lowrank``, weighted);
- ``residual-whitened``: ``--init residual-whitened`` at step 0: S zero, A/B the best rank-r fit of the
  layer's output error on the calibration inputs (``methods.residual.whitened_factors``: with
  ``X^T X + damp = L L^T``, the SVD of ``R L`` truncated to rank r, times ``L^-1``).

Besides perplexity, each mode reports the input-weighted residual error ``sum ||(R - correction) diag(d)||^2``
relative to the uncorrected ``sum ||R diag(d)||^2`` (a proxy for the layer-output error).

    python benchmarks/residual_init.py --json out/residual_init.json --pack out/q-clip/smollm2-w4g64 [--wide]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("residual", "sparse-only", "residual-lowrank", "activation-weighted", "lowrank-weighted", "residual-whitened")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--pack", default="out/q-clip/smollm2-w4g64", help="4-bit pack of the sample")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wide", action="store_true",
                    help="score on every pydoc@eval window and 64 windows spread over the coreutils manual "
                         "(benchmarks/quality_eval.py's set) instead of the first 16 pydoc@eval windows")  # fmt: skip
    args = ap.parse_args()

    import torch

    from benchmarks._common import info_text, sample_model
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.layers.inject import find_targets, set_active_adapters, wrap
    from sparsepack.methods.allocation import uniform
    from sparsepack.methods.masks import topk_support
    from sparsepack.methods.residual import residual_init, svd_factors, whitened_factors
    from sparsepack.pipeline.data import sample_windows, token_windows
    from sparsepack.pipeline.evaluate import perplexity
    from sparsepack.runtime.loader import load

    torch.set_num_threads(args.threads)
    model_dir = str(sample_model())
    tok = load_tokenizer(args.pack)
    if args.wide:
        texts = {"pydoc": token_windows(tok, "stdlib:pydoc@eval", 256)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        info = info_text(args.json.parent / "coreutils.txt")
        if info:
            texts["coreutils"] = token_windows(tok, str(info), 256, 64, spread=True)
    else:
        texts = {"pydoc": token_windows(tok, "stdlib:pydoc@eval", 256, 16)}  # the quality table's windows
    calib = sample_windows(tok, "stdlib:pydoc@train", 256, 32, 0)
    teacher = load(model_dir, dtype=torch.float32).eval()
    model = load(args.pack, dtype=torch.float32).eval()
    names = find_targets(model, "all-linear")

    sq = {}  # name -> sum over calibration tokens of x_j^2, the teacher's inputs of that linear
    gram = {}  # name -> X^T X over the same tokens (only for residual-whitened)
    whiten = "residual-whitened" in args.modes

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + (x * x).sum(0)
            if whiten:
                gram[name] = gram.get(name, 0) + x.T @ x

        return f

    handles = [teacher.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(0, calib.shape[0], 4):
            teacher(input_ids=calib[i : i + 4])
    for h in handles:
        h.remove()
    rms = {n: (sq[n] / calib.numel()).sqrt().float().clamp_min(1e-6) for n in names}  # (in,)

    def ppl(m):
        """One perplexity (the first 16 pydoc windows), or {text: perplexity} with --wide."""
        with torch.no_grad():
            got = {k: perplexity(m, w, progress=False).perplexity for k, w in texts.items()}
        return got if args.wide else got["pydoc"]

    res = {"pack": args.pack, "teacher": model_dir, "fp32": ppl(teacher), "modes": {}}
    layers = {n: wrap(model, n) for n in names}
    res["4-bit"] = ppl(model)
    budgets = uniform({n: (la.out_features, la.in_features) for n, la in layers.items()}, 16, 0.006)
    for mode in args.modes:
        t0 = time.perf_counter()
        err, base_err = 0.0, 0.0
        for n, layer in layers.items():
            b, d = budgets[n], rms[n]
            w_fp, w_q = teacher.get_submodule(n).weight.detach().float(), layer.dense_base()
            layer.init_lowrank("r", b.rank, 16.0)
            s = layer.scaling["r"]
            R = w_fp - w_q
            if mode == "activation-weighted":
                support = topk_support((R * d).abs(), b.nnz)
                rows, cols = support.row_idx.long(), support.col_idx.long()
                values = R[rows, cols].clone()
                rest = R.clone()
                rest[rows, cols] = 0.0
                A, B, _, _ = svd_factors(rest * d, b.rank, s)
                A = A / d
            elif mode == "lowrank-weighted":
                support = None
                A, B, _, _ = svd_factors(R * d, b.rank, s)
                A = A / d
            elif mode == "residual-whitened":
                support = None
                A, B, _, _ = whitened_factors(R, gram[n], b.rank, s)
            else:
                init = residual_init(w_fp, w_q, b.rank, 0 if mode == "residual-lowrank" else b.nnz, s)
                A, B, support, values = init.A, init.B, init.support, init.values
                if mode == "sparse-only":
                    A, B = torch.zeros_like(A), torch.zeros_like(B)
            layer.lora_A["r"].data.copy_(A)
            layer.lora_B["r"].data.copy_(B)
            if support is not None:
                layer.set_support("r", support, values, trainable=False)
            layer.requires_grad_(False)
            err += float((((R - layer.delta_weight("r")) * d) ** 2).sum())
            base_err += float(((R * d) ** 2).sum())
        set_active_adapters(model, "r")
        res["modes"][mode] = {"ppl": ppl(model), "weighted_error_ratio": err / base_err,
                              "seconds": time.perf_counter() - t0}  # fmt: skip
        print(mode, json.dumps(res["modes"][mode]), flush=True)
        set_active_adapters(model, None)
        for layer in layers.values():
            layer.delete_adapter("r")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "modes"}))


if __name__ == "__main__":
    main()
