"""Shared plumbing for the side-by-side benchmarks: the peer venv, timed child processes, the machine's load.

Every measured run is a separate child process started under ``/usr/bin/time -v`` so wall time, CPU time and
peak RSS are read the same way for sparsepack and for GPTQModel (whose venv cannot import sparsepack).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "benchmarks" / "_gptqmodel_peer.py"
PEER_ENV_SCRIPT = ROOT / "benchmarks" / "gptqmodel_env.sh"
PEER_VENV = Path(os.environ.get("SPARSEPACK_GPTQMODEL_VENV", ROOT / "benchmarks" / ".venv-gptqmodel"))
GNU_TIME = Path("/usr/bin/time")


# ------------------------------------------------------------------------------------------------ processes


@dataclass
class Run:
    """One finished child process."""

    cmd: list[str]
    rc: int
    wall_s: float
    user_s: float | None = None  # CPU seconds (from /usr/bin/time -v; None without it)
    sys_s: float | None = None
    peak_rss_mb: float | None = None  # maximum resident set size of the child
    stdout: str = ""
    stderr_tail: str = ""
    result: dict | None = None  # the last JSON object the child printed on stdout

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("stdout")
        d["cmd"] = " ".join(self.cmd)
        return d


def last_json(text: str) -> dict | None:
    """The last JSON object in ``text``: a one-line object (the peer) or a pretty-printed one (our CLI)."""
    for line in reversed(text.splitlines()):
        if line.startswith("{") and line.rstrip().endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    start = text.rfind("\n{")
    start = 0 if text.startswith("{") and start < 0 else start + 1
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None


def _parse_gnu_time(text: str) -> dict:
    def grab(label: str) -> str | None:
        m = re.search(rf"^\s*{re.escape(label)}: (.+)$", text, re.M)
        return m.group(1).strip() if m else None

    out = {}
    if (v := grab("User time (seconds)")) is not None:
        out["user_s"] = float(v)
    if (v := grab("System time (seconds)")) is not None:
        out["sys_s"] = float(v)
    if (v := grab("Maximum resident set size (kbytes)")) is not None:
        out["peak_rss_mb"] = int(v) / 1024
    return out


def run_timed(cmd: list[str], log: Path, env: dict | None = None, timeout: float | None = None,
              check: bool = True) -> Run:  # fmt: skip
    """Run ``cmd`` under ``/usr/bin/time -v``; stderr goes to ``log``, stdout is kept (it carries the JSON)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    timefile = log.with_suffix(".time")
    full = ([str(GNU_TIME), "-v", "-o", str(timefile)] if GNU_TIME.exists() else []) + [str(c) for c in cmd]
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(full, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - start
    stats = _parse_gnu_time(timefile.read_text()) if timefile.exists() else {}
    tail = log.read_text(errors="replace")[-3000:]
    run = Run([str(c) for c in cmd], proc.returncode, wall, stdout=proc.stdout, stderr_tail=tail,
              result=last_json(proc.stdout), **stats)  # fmt: skip
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(run.cmd)} exited {proc.returncode}; see {log}:\n{tail}")
    return run


def child_env(threads: int, **extra: str) -> dict:
    """Environment for a measured child: the same thread count for every tool."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["GPTQMODEL_CPU_WORKERS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra)
    return env


def sparsepack_cmd(*args: str) -> list[str]:
    """Our CLI in this interpreter (the benchmark runs from the project's venv)."""
    return [sys.executable, "-c", "from sparsepack.cli import main; main()", *map(str, args)]


# ------------------------------------------------------------------------------------------------ the peer


def peer_python(build: bool = True) -> Path | None:
    """The GPTQModel venv's python; built with ``gptqmodel_env.sh`` when missing and ``build`` (minutes)."""
    py = PEER_VENV / "bin" / "python"
    if py.exists() and any(PEER_VENV.glob(".sparsepack-built-gptqmodel-*")):
        return py
    if not build:
        return None
    out = subprocess.run(["bash", str(PEER_ENV_SCRIPT), str(PEER_VENV)], check=True, stdout=subprocess.PIPE,
                         text=True)  # fmt: skip
    return Path(out.stdout.strip().splitlines()[-1])


def peer_cmd(py: Path, *args: str) -> list[str]:
    # -P: keep benchmarks/ off sys.path, or benchmarks/kernels.py shadows the `kernels` package that
    # transformers probes for (its import then fails in the peer venv, which has no sparsepack).
    return [str(py), "-P", str(PEER_SCRIPT), *map(str, args)]


# ------------------------------------------------------------------------------------------------ models, data


def sample_model() -> Path:
    """The SmolLM2-135M fp32 sample (prepared once, then cached)."""
    from sparsepack.runtime.sample import prepare_sample_model

    return prepare_sample_model()


def tiny_model(path: Path) -> Path:
    """A random 2-layer Llama (hidden 128: group 64 divides every linear) and a byte-level BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (path / "config.json").exists():
        return path
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)  # fmt: skip
    return path


def write_calibration(model_dir: Path, dest: Path, source: str, seqlen: int, nsamples: int, seed: int):
    """The exact windows ``sparsepack compress`` draws (same tokenizer, source, seed), as peer jsonl.

    Returns:
        int64 tensor ``[nsamples, seqlen]``.
    """
    from sparsepack.formats.tokenizer import load_tokenizer
    from sparsepack.pipeline.data import sample_windows

    windows = sample_windows(load_tokenizer(model_dir), source, seqlen, nsamples, seed)  # (n, T)
    dest.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in windows.tolist()))
    return windows


def info_text(dest: Path, name: str = "coreutils") -> Path | None:
    """A second held-out text: a Debian GNU info manual, decompressed to plain text (None when absent)."""
    import gzip

    src = Path(f"/usr/share/info/{name}.info.gz")
    if not src.exists():
        return None
    if not dest.exists():
        dest.write_text(gzip.decompress(src.read_bytes()).decode("utf-8", errors="replace"))
    return dest


# ------------------------------------------------------------------------------------------------ the machine


@dataclass
class LoadMonitor:
    """Samples the 1-minute load average in a thread while benchmarks run (the machine is shared)."""

    interval: float = 5.0
    samples: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadMonitor:
        self.samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        s = self.samples or [float("nan")]
        return {"load1_mean": round(sum(s) / len(s), 2), "load1_max": round(max(s), 2),
                "load1_min": round(min(s), 2), "samples": len(s)}  # fmt: skip


def machine_info(threads: int) -> dict:
    import platform

    import torch

    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "loadavg_start": os.getloadavg(),
        "python": platform.python_version(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ markdown


def write_md_part(md: Path, section: str, part: str, owned) -> None:
    """Put ``part`` into ``section`` (a ``## `` heading line) of ``md``, touching nothing outside that section.

    The section's body is cut into its preamble (heading ``""``) and its ``### `` subsections; those that
    ``owned(heading)`` claims are replaced by ``part`` (at the first one's place, else appended) and the others
    kept, so two scripts can share one section, each owning its subsections.
    """
    head = "# Benchmarks\n\nLatest measured tables; each section names the command that produced it.\n"
    lines = (md.read_text() if md.exists() else head).rstrip("\n").splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip() == section), None)
    if start is None:
        lines += ["", section]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    parts: list[tuple[str, list[str]]] = [("", [])]
    for line in lines[start + 1 : end]:
        if line.startswith("### "):
            parts.append((line.rstrip(), []))
        parts[-1][1].append(line)
    mine = part.strip("\n").splitlines()
    body: list[str] = []
    for heading, chunk in parts:
        if not any(x.strip() for x in chunk):
            continue
        if owned(heading):
            if mine:
                body += ["", *mine]
                mine = []
        else:
            body += ["", *[x for x in chunk if x.strip() or body]]
    if mine:
        body += ["", *mine]
    body = [x.rstrip() for x in body]
    squeezed = [x for i, x in enumerate(body) if x or (i and body[i - 1])]  # no double blank lines
    while squeezed and not squeezed[0]:
        squeezed.pop(0)
    tail = lines[end:]
    text = "\n".join(lines[: start + 1] + [""] + squeezed + ([""] + tail if tail else []))
    md.write_text(text.rstrip("\n") + "\n")


def clean_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path
