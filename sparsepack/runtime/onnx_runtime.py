"""Run an ONNX export (``sparsepack export --format onnx``) with onnxruntime: greedy generation with the KV cache.

The export directory holds ``model.onnx`` (+ ``model.onnx.data``), ``sparsepack_onnx.json`` (graph layout:
inputs, cache shapes, adapters) and the tokenizer files. With a KV cache the graph takes ``input_ids``,
``attention_mask`` (2-D, past + new), ``position_ids`` and ``past_key_{i}`` / ``past_value_{i}``
``[batch, kv_heads, past_len, head_dim]``, and returns ``logits`` and ``present_key_{i}`` / ``present_value_{i}``;
one graph serves prefill (``past_len = 0``) and decode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sparsepack.formats.errors import ConfigError, MissingFileError

METADATA_FILE = "sparsepack_onnx.json"
FORMAT = "sparsepack-onnx"
FORMAT_VERSION = 1


def session_options():
    """CPU-friendly defaults; warnings off (adapter inputs that have initializers are one, by design)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return opts


def _positions(mask: np.ndarray) -> np.ndarray:
    # As `generate` makes them: count of real tokens so far - 1; padding gets 0.
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 0, pos).astype(np.int64)


def empty_past(layout: dict, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors ``[batch, kv_heads, 0, head_dim]`` for a prefill."""
    shape = (batch, layout["num_kv_heads"], 0, layout["head_dim"])
    return {f"past_{kind}_{i}": np.zeros(shape, np.float32)
            for i in range(layout["num_layers"]) for kind in ("key", "value")}  # fmt: skip


def greedy_decode(session, layout: dict, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int,
                  eos_token_id: int | None = None, pad_token_id: int = 0, run_options=None):  # fmt: skip
    """Greedy generation through a KV-cache graph.

    Args:
        session: an ``onnxruntime.InferenceSession`` on the KV-cache graph.
        layout: ``{"num_layers", "num_kv_heads", "head_dim"}`` from the export metadata.
        input_ids, attention_mask: int64 ``[B, T]`` prompts (left-padded).
        steps: new tokens to produce.
        eos_token_id: finished rows keep emitting ``pad_token_id`` (None: never stop).
        run_options: ``onnxruntime.RunOptions`` (e.g. with an active adapter).

    Returns:
        ``(tokens int64 [B, steps'], logits: list of float32 [B, vocab] per step)``; ``steps' < steps`` only if
        every row finished.
    """
    ids = input_ids.astype(np.int64)
    mask = attention_mask.astype(np.int64)
    past = empty_past(layout, ids.shape[0])
    pos = _positions(mask)
    names = [o.name for o in session.get_outputs()]
    done = np.zeros(ids.shape[0], dtype=bool)
    tokens, logits = [], []
    for _ in range(steps):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, **past}
        outs = dict(zip(names, session.run(names, feeds, run_options), strict=True))
        last = outs["logits"][:, -1, :]  # (B, vocab)
        nxt = last.argmax(-1).astype(np.int64)
        if eos_token_id is not None:
            nxt = np.where(done, pad_token_id, nxt)
            done |= nxt == eos_token_id
        tokens.append(nxt)
        logits.append(last)
        past = {k.replace("present_", "past_"): v for k, v in outs.items() if k.startswith("present_")}
        ids = nxt[:, None]
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
        if done.all():
            break
    return np.stack(tokens, axis=1), logits


class OnnxModel:
    """An exported model in an onnxruntime session, with its tokenizer.

    Args:
        path: the export directory.
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        meta_path = self.path / METADATA_FILE
        if not meta_path.is_file():
            raise MissingFileError(f"not an ONNX export (no {METADATA_FILE})", self.path)
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise ConfigError(f"unsupported export format {self.meta.get('format')} v{self.meta.get('format_version')}",
                              meta_path)  # fmt: skip
        self.session = ort.InferenceSession(str(self.path / self.meta["model"]), session_options(),
                                            providers=providers or ["CPUExecutionProvider"])  # fmt: skip
        self.layout = self.meta["layout"]
        self._tokenizer = None
        self._loaded: dict[str, Any] = {}  # name -> onnxruntime.LoraAdapter (loaded once, kept)
        self._run_options = None
        self.active_adapter: str | None = None

    @property
    def adapters(self) -> list[str]:
        """Swappable adapters of this export (``adapters/NAME.onnx_adapter``)."""
        return sorted(self.meta.get("adapters", {}))

    def set_adapter(self, name: str | None) -> None:
        """Activate adapter ``name`` for the following calls (None: the bare base). Loads it on first use."""
        import onnxruntime as ort

        if name is None:
            self._run_options, self.active_adapter = None, None
            return
        if name not in self.meta.get("adapters", {}):
            raise KeyError(f"unknown adapter {name!r} (export has: {', '.join(self.adapters) or 'none'})")
        if name not in self._loaded:
            adapter = ort.LoraAdapter()
            adapter.Load(str(self.path / self.meta["adapters"][name]))
            self._loaded[name] = adapter
        opts = ort.RunOptions()
        opts.add_active_adapter(self._loaded[name])
        self._run_options, self.active_adapter = opts, name

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from sparsepack.runtime.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    @property
    def kv_cache(self) -> bool:
        return bool(self.meta["kv_cache"])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Logits ``[B, T, vocab]`` of one forward pass (no past)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.kv_cache:
            feeds.update(position_ids=_positions(mask), **empty_past(self.layout, ids.shape[0]))
        return self.session.run(["logits"], feeds, self._run_options)[0]

    def generate(self, prompt: str | list[str], max_new_tokens: int = 32, stop_at_eos: bool = True) -> str | list[str]:
        """Greedy continuation of ``prompt`` (one string or a batch, left-padded)."""
        single = isinstance(prompt, str)
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok([prompt] if single else list(prompt), return_tensors="np", padding=True)
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        eos = self.meta.get("eos_token_id") if stop_at_eos else None
        if self.kv_cache:
            new, _ = greedy_decode(self.session, self.layout, ids, mask, max_new_tokens, eos_token_id=eos,
                                   pad_token_id=tok.pad_token_id, run_options=self._run_options)  # fmt: skip
        else:
            new = self._generate_no_cache(ids, mask, max_new_tokens, eos, tok.pad_token_id)
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return texts[0] if single else texts

    def _generate_no_cache(self, ids, mask, steps, eos, pad_id) -> np.ndarray:
        # Quadratic (re-runs the whole sequence each step): only for graphs exported with --no-kv-cache.
        out, done = [], np.zeros(ids.shape[0], dtype=bool)
        for _ in range(steps):
            nxt = self.logits(ids, mask)[:, -1, :].argmax(-1).astype(np.int64)
            if eos is not None:
                nxt = np.where(done, pad_id, nxt)
                done |= nxt == eos
            out.append(nxt)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
            if done.all():
                break
        return np.stack(out, axis=1)
