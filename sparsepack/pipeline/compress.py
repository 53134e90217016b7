"""compress: GPTQ-quantize a Hugging Face causal LM block by block into a pack.

Peak memory is one decoder block plus the calibration activations plus the unblocked tensors (embeddings,
final norm): the model is built on the meta device, each block's weights are read from the memory-mapped
source safetensors only when its turn comes, quantized, written out, and released.

Per block (true-sequential): capture the block's inputs, then for each group of linears that read the
same input (q/k/v, then o, then gate/up, then down) accumulate one Hessian over the calibration set, run
GPTQ on each member, and put the quantized weights back into the block so the next group sees the
quantized outputs; finally run the quantized block to produce the next block's inputs.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsepack.config import QuantConfig
from sparsepack.formats import gptq_layout
from sparsepack.formats.manifest import Manifest, StageRecord
from sparsepack.formats.pack import Pack, read_pack, write_pack
from sparsepack.formats.shards import ShardWriter
from sparsepack.formats.staging import check_output
from sparsepack.formats.tensor_io import load_tensors
from sparsepack.formats.tokenizer import copy_tokenizer_files, load_tokenizer
from sparsepack.layers.skeleton import materialize_buffers
from sparsepack.pipeline import gptq
from sparsepack.pipeline.blocks import (
    BlockInput,
    ReplayCache,
    capture_block_inputs,
    collect_inputs,
    find_blocks,
    run_block,
)
from sparsepack.pipeline.blocks import sequential_groups as discover_groups
from sparsepack.pipeline.data import source_path

# Largest block-child output a true-sequential pass may keep for the next passes over the same block, as a
# multiple of the block input's size (see blocks.ReplayCache): 1.0 keeps the norms and the attention, whose
# recomputation is a large share of the block time (docs/BENCHMARKS.md, Compress); 0 turns the cache off.
REPLAY_MAX_RATIO = 1.0
# Largest input of a child-ending linear (o_proj, down_proj) kept to replay that child as the linear alone,
# likewise (down_proj's is 2.7x on SmolLM2); 0 turns tails off.
REPLAY_TAIL_RATIO = 4.0


@functools.cache
def _libc():
    """glibc's handle, or None (not Linux, or a libc without mallopt/malloc_trim such as musl); loaded once."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _mmap_large_allocations(threshold: int = 64 << 20) -> None:
    """glibc only: a fixed mmap threshold, so the activations kept across passes never pin the heap.

    Every activation kept for later (block inputs, replayed outputs, tail inputs) lives in one slab per
    kind, each far above ``threshold`` and so an mmap of its own, freed to the system when dropped; the
    heap holds only short-lived tensors (below it), is reused batch after batch, and is trimmed after each
    block (:func:`_trim_heap`). glibc's default instead raises its threshold after the first large free
    and carves the kept activations out of the heap, where they pin it (peak RSS creeps up block after block).
    A 1 MiB threshold also stops the creep but makes every activation a fresh mmap, whose page faults cost
    system time (docs/BENCHMARKS.md, Compress). The setting is process-wide, hence only here; a
    MALLOC_MMAP_THRESHOLD_ set in the environment wins.
    """
    libc = _libc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# From this width up, a block whose forwards run in bf16 quantizes the source's wider weights rather than their bf16
# copies: bf16 rounds a weight by up to 2^-9 of it, about a tenth of an 8-bit step but under 2% of a 4-bit one,
# where the source weights were no better (docs/BENCHMARKS.md, Compress).
MASTER_MIN_BITS = 8


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype of the calibration forwards: ``name``, or for ``auto`` bfloat16 where it runs natively.

    GPTQModel also runs its CPU forwards in bf16: faster on such CPUs, at no cost in held-out perplexity
    (docs/BENCHMARKS.md, Compress). The Hessians and the GPTQ walk stay in fp32, only the activations they are
    built from are bf16.
    """
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out, in)
    rel_error: float | None  # ||X(W - W_q)^T||_F / ||X W^T||_F on the calibration inputs (None for RTN)
    seconds: float
    damp: float = 0.0


@dataclass
class CompressResult:
    path: Path
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calib_windows: int = 0
    bytes_written: int = 0
    dtype: str = "float32"  # of the calibration forwards

    def summary(self) -> dict[str, Any]:
        errs = [r.rel_error for r in self.layers if r.rel_error is not None]
        return {
            "path": str(self.path),
            "layers": len(self.layers),
            "seconds": round(self.seconds, 2),
            "calib_windows": self.calib_windows,
            "dtype": self.dtype,
            "mean_rel_error": sum(errs) / len(errs) if errs else None,
            "max_rel_error": max(errs) if errs else None,
            "tensor_bytes": self.bytes_written,
        }


def relative_output_error(weight: torch.Tensor, w_q: torch.Tensor, H: torch.Tensor) -> float:
    """``||X dW^T||_F / ||X W^T||_F`` from the Hessian ``H ~ 2/n X^T X``: ``sqrt(tr(dW H dW^T) / tr(W H W^T))``.

    Exact for the calibration inputs, without keeping them. Computed in ``H``'s dtype (at least fp32): a
    report figure needs a few digits, not fp64's cost.
    """
    dtype = torch.promote_types(H.dtype, torch.float32)
    H = H.to(dtype)
    W = weight.to(dtype)
    dW = W - w_q.to(dtype)
    num = ((dW @ H) * dW).sum()
    den = ((W @ H) * W).sum()
    return float((num.clamp_min(0) / den.clamp_min(1e-30)).sqrt())


def _targets(block: nn.Module, block_prefix: str, cfg: QuantConfig) -> list[str]:
    skip = re.compile(cfg.skip)
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and not skip.search(f"{block_prefix}.{n}")]


def check_quantizable(model: nn.Module, cfg: QuantConfig) -> tuple[str, nn.ModuleList]:
    """Every target must fit the GPTQ-v1 layout at these bits/group size: fail before any work is done."""
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name in _targets(block, f"{prefix}.{i}", cfg):
            lin = block.get_submodule(name)
            gptq_layout.check_packable(f"{prefix}.{i}.{name}", lin.in_features, lin.out_features, cfg.bits,
                                       cfg.group_size)  # fmt: skip
    return prefix, blocks


@contextmanager
def _cpu_threads(n: int, device: torch.device):
    """Run the body with ``n`` intra-op CPU threads (no-op on other devices)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantize_weight(weight: torch.Tensor, H: torch.Tensor | None, inv, cfg: QuantConfig) -> gptq.QuantParams:
    if cfg.method == "rtn":
        return gptq.rtn_quantize_params(weight, cfg.bits, cfg.group_size, cfg.sym)
    # The GPTQ loop is thousands of tiny ops: one thread. With two, every op pays an OpenMP fork/join, and when
    # another job holds the cores each join waits for a descheduled thread (docs/BENCHMARKS.md, Compress).
    with _cpu_threads(1, weight.device):
        clip = gptq.ClipSearch(cfg.clip_search) if cfg.clip_search else None
        return gptq.gptq_quantize(weight, inv, cfg.bits, cfg.group_size, cfg.sym, cfg.act_order, cfg.damp,
                                  cfg.block_size, cfg.static_groups, cfg.group_aware, clip)  # fmt: skip


def _invert(H: torch.Tensor, cfg: QuantConfig) -> gptq.InverseHessian:
    """One inversion shared by the layers of a group (they read the same input, so they have the same K)."""
    K = H.shape[0]
    group = K if cfg.group_size in (-1, 0) else cfg.group_size
    return gptq.invert_hessian(H, cfg.damp, cfg.act_order, group if cfg.group_aware else 0)


def _quantize_block(block: nn.Module, prefix: str, names: list[str], inputs: list[BlockInput] | None,
                    cfg: QuantConfig, writer: ShardWriter, bar: tqdm, cache: ReplayCache | None = None,
                    masters: dict[str, torch.Tensor] | None = None) -> list[LayerReport]:  # fmt: skip
    """Quantize ``names`` in ``block`` in place (weights replaced by their dequantized values).

    ``masters`` maps a name to its weight at the source's precision when the block runs in a narrower dtype:
    that weight is what gets quantized (and what the error report measures against), not its bf16 rounding.

    ``cache`` (true-sequential only) collects the outputs of submodules that are final after each group,
    so the later passes over this block, :func:`run_block` included, replay them instead of recomputing.
    """
    reports = []
    groups = [[n] for n in names] if inputs is None else discover_groups(block, inputs[0], names)
    hdtype = getattr(torch, cfg.hessian_dtype)

    def accumulator(name: str) -> gptq.HessianAccumulator:
        return gptq.HessianAccumulator(block.get_submodule(name).in_features, hdtype, inputs[0].hidden.device)

    if inputs is not None and not cfg.true_sequential:  # every Hessian from the unquantized block, one pass
        accs = {g[0]: accumulator(g[0]) for g in groups}
        collect_inputs(block, inputs, list(accs), lambda n, x: accs[n].add(x))
    for group in groups:  # members of a group read the same input: one Hessian, one inversion
        H = None
        if inputs is not None:
            if cfg.true_sequential:
                acc = accumulator(group[0])
                collect_inputs(block, inputs, [group[0]], lambda _n, x, acc=acc: acc.add(x),
                               stop_after=group[0], cache=cache)  # fmt: skip
                H = acc.H
            else:
                H = accs[group[0]].H
        inv = _invert(H, cfg) if (H is not None and cfg.method == "gptq") else None
        lins = [block.get_submodule(name) for name in group]
        weights = [masters[name] if masters and name in masters else lin.weight.data
                   for name, lin in zip(group, lins, strict=True)]  # fmt: skip
        start = time.perf_counter()
        if inv is not None and len(group) > 1:  # one column walk for the whole group, cut per layer
            joint = torch.cat(weights)  # (sum N, K)
            parts = _quantize_weight(joint, H, inv, cfg).split([lin.out_features for lin in lins])
        else:
            parts = [_quantize_weight(w, H, inv, cfg) for w in weights]
        share = (time.perf_counter() - start) / sum(lin.out_features for lin in lins)  # seconds per output row
        for name, lin, weight, params in zip(group, lins, weights, parts, strict=True):
            start = time.perf_counter()
            w_q = gptq.dequantize_params(params, torch.float32)
            err = relative_output_error(weight.float(), w_q, H) if H is not None else None
            bias = lin.bias.data if lin.bias is not None else None
            for key, t in params.to_gptq_tensors(bias).state_dict(f"{prefix}.{name}").items():
                writer.add(key, t)
            lin.weight.data = w_q.to(lin.weight.dtype)
            seconds = time.perf_counter() - start + share * lin.out_features
            reports.append(LayerReport(f"{prefix}.{name}", (lin.out_features, lin.in_features), err, seconds,
                                       params.damp))  # fmt: skip
            bar.set_postfix_str(f"{name} err={err:.4f}" if err is not None else name)
    return reports


def _to_device_except(model: nn.Module, prefix: str, device: torch.device) -> None:
    """Move everything but the (still meta) blocks at ``prefix`` to ``device``."""
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, blocks)


@dataclass
class _Source:
    """The model being compressed, opened for the block-by-block walk: built on meta, blocks not yet read."""

    model_dir: Path
    pack: Pack  # the source, read without hashing; its block tensors are read when each block's turn comes
    prefix: str  # module path of the decoder blocks, e.g. "model.layers"
    blocks: nn.ModuleList  # on the meta device until their turn, and again after it
    outside: dict[str, Any]  # the source's tensors outside the blocks (embeddings, final norm, head), by name
    device: torch.device
    dtype: torch.dtype  # of the calibration forwards
    # the next block's calibration inputs (None for RTN), overwritten by each block's outputs; dropped (set to None)
    # once the last block is done, so the activations are freed before the rest is written
    inputs: list[BlockInput] | None = None
    calib_windows: int = 0


def _open_source(model_dir: str | Path, cfg: QuantConfig) -> _Source:
    """Build the source model on meta, with everything but the blocks loaded, and capture the first block's inputs.

    Raises:
        ValueError: the source is already GPTQ-quantized.
    """
    device = torch.device(cfg.device)
    if device.type == "cpu":
        _mmap_large_allocations()
    src = read_pack(Path(model_dir), verify=False, check_config=True)
    if src.quant is not None:
        raise ValueError(f"{model_dir}: already GPTQ-quantized; compress needs the unquantized model")
    model = src.take_skeleton()
    prefix, blocks = check_quantizable(model, cfg)
    outside = {k: v for k, v in src.tensors.items() if not k.startswith(prefix + ".")}
    dtype = compute_dtype(cfg.dtype, device)  # the embeddings' dtype sets the activations' (and rotary tables')
    model.load_state_dict({k: t.to(dtype) for k, t in load_tensors(outside).items()}, strict=False, assign=True)
    model.tie_weights()
    materialize_buffers(model, check=False)
    _to_device_except(model, prefix, device)
    source = _Source(Path(model_dir), src, prefix, blocks, outside, device, dtype)
    if cfg.method == "gptq":
        from sparsepack.pipeline.data import sample_windows

        windows = sample_windows(load_tokenizer(model_dir), cfg.calib, cfg.seqlen, cfg.nsamples, cfg.seed)
        source.calib_windows = windows.shape[0]
        source.inputs = capture_block_inputs(model, blocks[0], windows, cfg.batch_size, device)
    # Embeddings, final norm, head: not needed again until they are written (from the source) at the end.
    _to_device_except(model, prefix, torch.device("meta"))
    return source


def _load_block(block: nn.Module, block_prefix: str, source: _Source,
                cfg: QuantConfig) -> tuple[list[str], dict[str, torch.Tensor]]:  # fmt: skip
    """Read ``block``'s weights from the source onto the device, in the forwards' dtype.

    Returns:
        The names of the linears to quantize, and their master weights: the source's weights in fp32 where they are
        wider than the forwards' dtype and ``cfg.bits >= MASTER_MIN_BITS`` (else none).
    """
    own = {k[len(block_prefix) + 1 :]: v for k, v in source.pack.tensors.items() if k.startswith(block_prefix + ".")}
    loaded = load_tensors(own)
    state = {k: t.to(source.dtype).clone() for k, t in loaded.items()}
    block.load_state_dict(state, strict=True, assign=True)
    block.to(source.device)
    names = _targets(block, block_prefix, cfg)
    masters = {}
    if cfg.bits >= MASTER_MIN_BITS:
        masters = {n: loaded[f"{n}.weight"].to(source.device, torch.float32) for n in names
                   if loaded[f"{n}.weight"].dtype.itemsize > source.dtype.itemsize}  # fmt: skip
    return names, masters


def _compress_blocks(writer: ShardWriter, source: _Source, cfg: QuantConfig, progress: bool) -> list[LayerReport]:
    """Quantize the blocks one at a time into ``writer``, each block's quantized outputs the next one's inputs.

    Only the block in turn is off the meta device; ``source.inputs`` is overwritten in place by its outputs.
    """
    blocks, inputs, reports = source.blocks, source.inputs, []
    bar = tqdm(total=len(blocks), desc="compress", unit="block", disable=not progress)
    for i in range(len(blocks)):
        block_prefix = f"{source.prefix}.{i}"
        block = blocks[i]
        bar.set_description(f"compress {block_prefix}")
        names, masters = _load_block(block, block_prefix, source, cfg)
        cache = None
        if inputs and cfg.true_sequential:
            cache = ReplayCache(block, inputs[0], REPLAY_MAX_RATIO, REPLAY_TAIL_RATIO)
        with torch.no_grad():
            reports += _quantize_block(block, block_prefix, names, inputs, cfg, writer, bar, cache, masters)
            for key, t in block.state_dict().items():
                if key.rsplit(".", 1)[0] not in names:
                    writer.add(f"{block_prefix}.{key}", t.to(torch.float16))
            if inputs is not None and i + 1 < len(blocks):
                # in place, batch by batch: the block's inputs and outputs never both live in full
                for j, out in enumerate(run_block(block, inputs, cache)):
                    inputs[j].hidden.copy_(out)
        del cache
        blocks[i] = block.to("meta")  # release the block's memory
        if source.device.type == "cpu":
            _trim_heap()
        bar.update(1)
    bar.close()
    return reports


def _write_outside(writer: ShardWriter, source: _Source) -> None:
    """The tensors outside the blocks, from the source in fp16 (a head tied to the embeddings is not stored)."""
    tied = {"lm_head.weight"} if getattr(source.pack.config, "tie_word_embeddings", False) else set()
    for key in sorted(source.outside):
        if key not in tied:
            writer.add(key, load_tensors({key: source.outside[key]})[key].to(torch.float16))


def _write_configs(tmp: Path, source: _Source, cfg: QuantConfig) -> None:
    """``config.json`` with the GPTQ ``quantization_config``, ``quantize_config.json`` and the tokenizer files."""
    config = source.pack.config.to_dict()
    config["quantization_config"] = cfg.gptq_config()
    config["torch_dtype"] = "float16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "quantize_config.json").write_text(json.dumps(cfg.gptq_config(), indent=2))
    copy_tokenizer_files(source.model_dir, tmp)


def _populate(tmp: Path, *, source: _Source, cfg: QuantConfig, result: CompressResult, manifest: Manifest,
              start: float, progress: bool, report: str | Path | None) -> None:  # fmt: skip
    """``write_pack``'s populate step: every file of the pack into the staging directory ``tmp``.

    Fills ``result`` and the manifest's per-layer records and summary (the manifest is written after this returns);
    ``start`` is when the command began (``time.perf_counter``).
    """
    writer = ShardWriter(tmp)
    result.layers += _compress_blocks(writer, source, cfg, progress)
    source.inputs = None  # the activations are not needed for writing the rest
    _write_outside(writer, source)
    writer.close()
    result.bytes_written = writer.total_bytes
    _write_configs(tmp, source, cfg)
    result.seconds = time.perf_counter() - start
    manifest.quantization["layers"] = {
        r.name: {"rel_error": r.rel_error, "seconds": round(r.seconds, 4), "damp": r.damp} for r in result.layers
    }
    manifest.history[0].summary = result.summary()
    if report is not None:
        write_report(Path(report), result, cfg)


def compress(model_dir: str | Path, out: str | Path, cfg: QuantConfig, overwrite: bool = False,
             progress: bool = True, report: str | Path | None = None) -> CompressResult:  # fmt: skip
    """Quantize the HF model at ``model_dir`` into a pack at ``out`` (atomic: nothing at ``out`` on failure)."""
    start = time.perf_counter()
    read_paths = [model_dir, source_path(cfg.calib)]
    check_output(Path(out), overwrite, read_paths)  # before any work: an hour of quantization must not end refused
    source = _open_source(model_dir, cfg)
    result = CompressResult(path=Path(out), calib_windows=source.calib_windows,
                            dtype=str(source.dtype).removeprefix("torch."))  # fmt: skip
    src = source.pack
    num_params = sum(math.prod(t.shape) for t in src.tensors.values())
    manifest = Manifest(
        base={"source": str(model_dir), "model_type": src.config.model_type,
              "architectures": getattr(src.config, "architectures", None), "num_parameters": num_params},
        quantization={**cfg.gptq_config(), "method": cfg.method},
        history=[StageRecord("compress", args=cfg.to_dict())],
    )  # fmt: skip
    populate = functools.partial(_populate, source=source, cfg=cfg, result=result, manifest=manifest, start=start,
                                 progress=progress, report=report)  # fmt: skip
    write_pack(out, manifest, populate, overwrite=overwrite, inputs=read_paths)
    result.seconds = time.perf_counter() - start
    return result


def write_report(path: Path, result: CompressResult, cfg: QuantConfig) -> None:
    """A markdown table of per-layer errors and times, plus a PNG plot beside it when matplotlib exists."""
    lines = [f"# compress report: {cfg.method} {cfg.bits}-bit, group {cfg.group_size}", "",
             f"{len(result.layers)} layers, {result.calib_windows} calibration windows of {cfg.seqlen} tokens.", "",
             "| layer | out x in | rel. output error | seconds |", "|---|---|---|---|"]  # fmt: skip
    for r in result.layers:
        err = f"{r.rel_error:.5f}" if r.rel_error is not None else "-"
        lines.append(f"| {r.name} | {r.shape[0]}x{r.shape[1]} | {err} | {r.seconds:.3f} |")
    png = path.with_suffix(".png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        errs = [r.rel_error or 0.0 for r in result.layers]
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.plot(range(len(errs)), errs, marker=".")
        ax.set_xlabel("layer (execution order)")
        ax.set_ylabel("relative output error")
        ax.set_title(f"{cfg.method} w{cfg.bits} g{cfg.group_size}")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)
        lines += ["", f"![per-layer error]({png.name})"]
    except ImportError:
        lines += ["", "(install matplotlib for the per-layer error plot)"]
    path.write_text("\n".join(lines) + "\n")
