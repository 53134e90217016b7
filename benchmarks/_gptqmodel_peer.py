"""GPTQModel as a peer, run inside its own venv (``benchmarks/gptqmodel_env.sh``) through subprocess.

Standalone on purpose: it imports gptqmodel/transformers/torch only (sparsepack is not installed in the peer
venv). Every command prints exactly one JSON line on stdout and nothing else: GPTQModel logs to stdout, so
file descriptor 1 is pointed at stderr while it runs. A failure exits non-zero with the traceback on stderr.

Commands:
  quantize MODEL_DIR OUT [--bits 4] [--group-size 64] [--calib-file F.jsonl] [--nsamples 128] [--seqlen 256]
      Calibration records are JSON lines: {"input_ids": [...]} (used as given, cut to --seqlen: pass the same
      token windows to both tools for a fair comparison) or {"text": "..."} (tokenized with MODEL_DIR's
      tokenizer). Prints {"seconds", "load_s", "quantize_s", "save_s", "peak_rss_mb", ...}.
  logits PACK_DIR --tokens tokens.json [--out logits.npy]
      tokens.json: [[ids...], ...] or {"input_ids": [[...], ...]} (equal lengths, no padding). Saves float32
      logits [B, T, V] as .npy; prints {"out", "shape", "seconds", "backend"}. GPTQModel's quantized kernels
      run in fp16/bf16 only (--dtype float32 is refused); the first load JIT-compiles its CPU kernel (minutes).
  selftest [--workdir DIR]
      Builds a tiny random Llama (hidden 128, 2 layers, vocab 1000, byte-level tokenizer), quantizes it
      (4-bit, group 64), saves, reloads for logits; prints what the checkpoint holds.

Set GPTQMODEL_CPU_WORKERS to the core count on small machines (done here when unset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(min(os.cpu_count() or 1, 2)))

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _run_quietly(func, args: argparse.Namespace) -> dict:
    """Run ``func(args)`` with fd 1 pointed at stderr, so stdout carries only our JSON line."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        return func(args)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def _torch_dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def _read_calibration(path: str, model_dir: str, nsamples: int, seqlen: int) -> list:
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()][:nsamples]
    if not records:
        raise SystemExit(f"{path}: no calibration records")
    if all("input_ids" in r for r in records):
        out = []
        for r in records:
            ids = list(r["input_ids"])[:seqlen]
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for r in records:
        enc = tok(r["text"], truncation=True, max_length=seqlen)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def quantize(args: argparse.Namespace) -> dict:
    """Quantize MODEL_DIR with GPTQModel and save a GPTQ-v1 checkpoint to OUT."""
    from gptqmodel import GPTQModel, QuantizeConfig

    if args.calib_file:
        calib = _read_calibration(args.calib_file, args.model_dir, args.nsamples, args.seqlen)
    else:
        calib = [_default_text(i) for i in range(args.nsamples)]
    cfg = dict(bits=args.bits, group_size=args.group_size, sym=args.sym, desc_act=args.desc_act)
    if args.damp is not None:
        cfg["damp_percent"] = args.damp
    if args.mse:
        cfg["mse"] = args.mse
    if not args.desc_act:
        cfg["act_group_aware"] = args.act_group_aware
    load_kw = {} if args.dtype == "auto" else {"dtype": _torch_dtype(args.dtype)}
    t0 = time.perf_counter()
    model = GPTQModel.load(args.model_dir, QuantizeConfig(**cfg), device="cpu", **load_kw)
    t1 = time.perf_counter()
    model.quantize(calib, batch_size=args.batch_size)
    t2 = time.perf_counter()
    model.save(args.out)
    t3 = time.perf_counter()
    return {
        "tool": "gptqmodel",
        "out": str(args.out),
        "seconds": t3 - t0,
        "load_s": t1 - t0,
        "quantize_s": t2 - t1,
        "save_s": t3 - t2,
        "peak_rss_mb": _peak_rss_mb(),
        "bits": args.bits,
        "group_size": args.group_size,
        "nsamples": len(calib),
        "seqlen": args.seqlen,
        "quantize_config": cfg,
    }


def _default_text(i: int) -> str:
    return (
        f"Sample {i}: the quick brown fox jumps over the lazy dog while a compiler turns source code into "
        "machine instructions, and a quantizer rounds weights to a few bits per value. " * 3
    )


def _read_tokens(path: str) -> list[list[int]]:
    data = json.loads(Path(path).read_text())
    ids = data["input_ids"] if isinstance(data, dict) else data
    if ids and isinstance(ids[0], int):
        ids = [ids]
    if len({len(row) for row in ids}) != 1:
        raise SystemExit(f"{path}: sequences must have equal lengths (no padding support)")
    return ids


def logits(args: argparse.Namespace) -> dict:
    """Load a GPTQ checkpoint with GPTQModel and save the logits of the given token ids."""
    import numpy as np
    import torch
    from gptqmodel import GPTQModel

    ids = torch.tensor(_read_tokens(args.tokens), dtype=torch.long)  # (B, T)
    load_kw = {} if args.dtype == "auto" else {"dtype": _torch_dtype(args.dtype)}
    t0 = time.perf_counter()
    model = GPTQModel.load(args.pack_dir, device="cpu", backend=args.backend, **load_kw)
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = model.model(input_ids=ids).logits.float()  # (B, T, V)
    t2 = time.perf_counter()
    dest = Path(args.out) if args.out else Path(args.pack_dir) / "gptqmodel_logits.npy"
    np.save(dest, out.numpy())
    backends = sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})
    return {
        "tool": "gptqmodel",
        "out": str(dest),
        "shape": list(out.shape),
        "load_s": t1 - t0,
        "seconds": t2 - t1,
        "backend": backends,
        "dtype": str(next(model.model.parameters()).dtype),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _tiny_llama(path: Path) -> None:
    """A random 2-layer Llama plus a byte-level tokenizer (no download)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    ).save_pretrained(path)


def selftest(args: argparse.Namespace) -> dict:
    """Tiny end-to-end run; reports the checkpoint's tensors and configs (one layer)."""
    from safetensors import safe_open

    work = Path(args.workdir or tempfile.mkdtemp(prefix="gptqmodel-selftest-"))
    model_dir, out = work / "tiny-llama", work / "tiny-llama-gptq"
    _tiny_llama(model_dir)
    calib = work / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": _default_text(i)}) + "\n" for i in range(16)))
    qargs = argparse.Namespace(
        model_dir=str(model_dir), out=str(out), bits=4, group_size=64, calib_file=str(calib), nsamples=16,
        seqlen=128, batch_size=4, sym=True, desc_act=False, act_group_aware=True, damp=None, dtype="auto",
    )  # fmt: skip
    q = quantize(qargs)
    tensors = {}
    with safe_open(out / "model.safetensors", "pt") as f:
        for k in sorted(f.keys()):
            if ".layers.0." in k or ".layers." not in k:
                t = f.get_tensor(k)
                tensors[k] = [str(t.dtype).removeprefix("torch."), list(t.shape)]
        qz = f.get_tensor("model.layers.0.self_attn.q_proj.qzeros")
    qz_words = sorted({f"0x{v & 0xFFFFFFFF:08x}" for v in qz.flatten().tolist()})
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps([[1, 50, 60, 70, 80, 90, 100, 110], [1, 5, 6, 7, 8, 9, 10, 11]]))
    lg = logits(argparse.Namespace(pack_dir=str(out), tokens=str(tokens), out=str(work / "logits.npy"),
                                   backend="auto", dtype="auto"))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    return {
        "workdir": str(work),
        "quantize": q,
        "logits": lg,
        "files": sorted(p.name for p in out.iterdir()),
        "tensors": tensors,
        "qzeros_words_layer0_q_proj": qz_words,
        "quantize_config": json.loads((out / "quantize_config.json").read_text()),
        "config_quantization_config": config.get("quantization_config"),
        "config_dtype": config.get("dtype", config.get("torch_dtype")),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a HF model directory with GPTQModel")
    q.add_argument("model_dir")
    q.add_argument("out")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--calib-file", help="jsonl of {'input_ids': [...]} or {'text': ...}")
    q.add_argument("--nsamples", type=int, default=128)
    q.add_argument("--seqlen", type=int, default=256)
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    q.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=False)
    q.add_argument("--act-group-aware", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQModel's group-aware reordering (its default when desc_act is off)")  # fmt: skip
    q.add_argument("--damp", type=float, default=None, help="damp_percent (GPTQModel default 0.05)")
    q.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype while quantizing")
    q.add_argument("--mse", type=float, default=0.0,
                   help="GPTQModel's clipping-range search with this error norm (0: off, its default; 2.4: GPTQ's)")
    q.set_defaults(func=quantize)

    lg = sub.add_parser("logits", help="logits of a GPTQ checkpoint loaded by GPTQModel")
    lg.add_argument("pack_dir")
    lg.add_argument("--tokens", required=True, help="json: [[ids...], ...] or {'input_ids': [[...]]}")
    lg.add_argument("--out", help=".npy path (default PACK_DIR/gptqmodel_logits.npy)")
    lg.add_argument("--backend", default="auto", help="GPTQModel BACKEND value, e.g. auto, gptq_torch")
    lg.add_argument("--dtype", choices=DTYPES, default="auto", help="float16/bfloat16 (auto: bfloat16 on CPU)")
    lg.set_defaults(func=logits)

    st = sub.add_parser("selftest", help="tiny random Llama end to end")
    st.add_argument("--workdir")
    st.set_defaults(func=selftest)

    args = ap.parse_args(argv)
    print(json.dumps(_run_quietly(args.func, args)), flush=True)


if __name__ == "__main__":
    main()
