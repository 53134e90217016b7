"""Run an ONNX export (``sparsepack export --format onnx``) with onnxruntime: greedy generation with the KV cache.

The export directory holds ``model.onnx`` (+ ``model.onnx.data``), ``sparsepack_onnx.json`` (graph layout:
inputs, cache shapes, adapters) and the tokenizer files. With a KV cache the graph takes ``input_ids``,
``attention_mask`` (2-D, past + new), ``position_ids`` and ``past_key_{i}`` / ``past_value_{i}``
``[batch, kv_heads, past_len, head_dim]``, and returns ``logits`` and ``present_key_{i}`` / ``present_value_{i}``;
one graph serves prefill (``past_len = 0``) and decode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sparsepack.formats.errors import ConfigError, ManifestError, MissingFileError, OnnxFormatError, ShapeError

METADATA_FILE = "sparsepack_onnx.json"
FORMAT = "sparsepack-onnx"
FORMAT_VERSION = 1
MAX_METADATA_BYTES = 16 << 20
MAX_TENSOR_BYTES = 1 << 40  # a declared tensor size above this is refused outright


# ------------------------------------------------------------------------------------------------ checks
# An export directory is input like a pack: nothing in it is trusted. Metadata, graph and adapter files are checked
# (paths inside DIR, sizes against the files, shapes against the graph) before onnxruntime reads them, so a
# hostile or damaged export fails with a typed FormatError naming the file, and nothing outside DIR is read.


def read_export_metadata(root: Path) -> dict:
    """``sparsepack_onnx.json`` of export ``root``, with types, ranges and paths checked."""
    from sparsepack.formats.adapter_layout import validate_adapter_name
    from sparsepack.formats.pack import check_links, safe_child

    if not root.is_dir():
        raise MissingFileError("no such export directory", root)
    check_links(root)  # UnsafePathError: a symlink out of DIR, broken or looping
    meta_path = root / METADATA_FILE
    if not meta_path.is_file():
        raise MissingFileError(f"not an ONNX export (no {METADATA_FILE})", root)
    from sparsepack.formats.json_file import read_json

    meta = read_json(meta_path, ManifestError, MAX_METADATA_BYTES)
    if not isinstance(meta, dict):
        raise ManifestError("not a JSON object", meta_path)
    version = meta.get("format_version", 0)
    if meta.get("format") != FORMAT or type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ConfigError(f"unsupported export format {meta.get('format')!r:.40} v{version!r:.20}", meta_path)

    def bad(field: str, want: str) -> ManifestError:
        return ManifestError(f"field {field!r} must be {want}, got {meta.get(field)!r:.80}", meta_path)

    if not isinstance(meta.get("model"), str):
        raise bad("model", "a file name")
    model = safe_child(root, meta["model"])
    if not model.is_file():
        raise MissingFileError("graph file named by the metadata is absent", model)
    if type(meta.get("kv_cache")) is not bool:
        raise bad("kv_cache", "true or false")
    layout = meta.get("layout")
    keys = ("num_layers", "num_kv_heads", "head_dim")
    if not isinstance(layout, dict) or not all(type(layout.get(k)) is int and 1 <= layout[k] <= 2**16 for k in keys):
        raise bad("layout", f"an object of {', '.join(keys)} (integers in [1, 65536])")
    if layout.get("dtype", "float32") not in ("float32", "float16"):
        raise ManifestError(f"field 'layout.dtype' must be 'float32' or 'float16', got {layout['dtype']!r:.80}",
                            meta_path)  # fmt: skip
    adapters = meta.get("adapters", {})
    if not isinstance(adapters, dict) or not all(isinstance(v, str) for v in adapters.values()):
        raise bad("adapters", "an object mapping adapter names to files")
    for name, rel in adapters.items():
        validate_adapter_name(name)
        path = safe_child(root, rel)
        if not path.is_file():
            raise MissingFileError(f"adapter {name!r} file is absent", path)
    from sparsepack.runtime.ort_ops import ADAPTER_OPS

    if meta.get("adapter_op", "standard") not in ADAPTER_OPS:
        raise bad("adapter_op", f"one of {', '.join(ADAPTER_OPS)}")
    for key in ("eos_token_id", "pad_token_id", "vocab_size"):
        if meta.get(key) is not None and (type(meta[key]) is not int or not 0 <= meta[key] < 2**31):
            raise bad(key, "a non-negative integer or null")
    return meta


def check_graph(root: Path, model: Path) -> dict[str, tuple[int, list[int | None]]]:
    """Parse ``model`` (without its external data) and check every external-data reference and tensor size.

    Returns the graph inputs as ``name -> (element type, dims)`` (None for a symbolic dim).
    """
    import onnx
    from onnx import TensorProto, external_data_helper, helper

    from sparsepack.formats.pack import safe_child

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, RecursionError, ValueError...
        raise OnnxFormatError(f"not a readable ONNX graph ({type(e).__name__}: {str(e)[:200]})", model) from None
    sizes: dict[Path, int] = {}
    for t in external_data_helper._get_all_tensors(proto):
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            raise OnnxFormatError(f"unknown data type {t.data_type}", model, t.name) from None
        if any(d < 0 for d in t.dims):
            raise OnnxFormatError(f"negative dimension in {list(t.dims)}", model, t.name)
        nbytes = itemsize
        for d in t.dims:
            nbytes *= d
            if nbytes > MAX_TENSOR_BYTES:
                raise OnnxFormatError(f"declared shape {list(t.dims)} is larger than {MAX_TENSOR_BYTES} bytes",
                                      model, t.name)  # fmt: skip
        if t.data_location != TensorProto.EXTERNAL:
            if t.HasField("raw_data") and len(t.raw_data) != nbytes:
                raise OnnxFormatError(f"shape {list(t.dims)} needs {nbytes} bytes, raw data holds "
                                      f"{len(t.raw_data)}", model, t.name)  # fmt: skip
            continue
        info = {e.key: e.value for e in t.external_data}
        location = safe_child(root, info.get("location", ""))  # UnsafePathError: '..', absolute, symlink out
        try:
            offset, length = int(info.get("offset", "0")), int(info.get("length", str(nbytes)))
        except ValueError:
            raise OnnxFormatError(f"external data offset/length not integers: {info}", model, t.name) from None
        if location not in sizes:
            if not location.is_file():
                raise MissingFileError("external data file is absent", location)
            sizes[location] = location.stat().st_size
        if offset < 0 or length != nbytes or offset + length > sizes[location]:
            msg = (f"external data [{offset}, +{length}) for shape {list(t.dims)} ({nbytes} bytes) does not fit "
                   f"in {location.name} ({sizes[location]} bytes)")  # fmt: skip
            raise OnnxFormatError(msg, model, t.name)
    inputs = {}
    for i in proto.graph.input:
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        inputs[i.name] = (tt.elem_type, dims)
    return inputs


ORT_TYPES = {"tensor(float)": 1, "tensor(uint8)": 2, "tensor(int8)": 3, "tensor(int32)": 6, "tensor(int64)": 7,
             "tensor(float16)": 10, "tensor(double)": 11, "tensor(bfloat16)": 16}  # fmt: skip


def check_adapter_file(path: Path, inputs: dict[str, tuple[int, list[int | None]]]) -> None:
    """An ``.onnx_adapter`` file must parse and set only adapter inputs of the graph, with their type and shape."""
    import onnxruntime as ort

    try:
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    except Exception as e:  # noqa: BLE001 - onnxruntime reports a failed flatbuffer verification as RuntimeError
        raise OnnxFormatError(f"not a valid adapter file ({type(e).__name__}: {str(e)[:200]})", path) from None
    for name, value in params.items():
        if not name.startswith("adapter_") or name not in inputs:
            raise ShapeError("not an adapter input of the graph", path, name)
        elem, dims = inputs[name]
        got = ORT_TYPES.get(value.data_type())
        if got != elem:
            raise ShapeError(f"type {value.data_type()} != the graph's element type {elem}", path, name)
        shape = list(value.shape())
        if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape, strict=True)):
            raise ShapeError(f"shape {shape} does not fit the graph input {dims}", path, name)


def session_options(adapter_op: str | None = None):
    """CPU-friendly defaults; warnings off (adapter inputs that have initializers are one, by design).

    ``adapter_op`` ``custom`` / ``custom-fp16`` (an export's ``adapter_op``) registers sparsepack's op library,
    building it if needed.
    """
    import onnxruntime as ort

    from sparsepack.runtime.ort_ops import CUSTOM_ADAPTER_OPS, register

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if adapter_op in CUSTOM_ADAPTER_OPS:
        register(opts)
    return opts


def _positions(mask: np.ndarray) -> np.ndarray:
    # As `generate` makes them: count of real tokens so far - 1; padding gets 0.
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 0, pos).astype(np.int64)


def empty_past(layout: dict, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors ``[batch, kv_heads, 0, head_dim]`` (the graph's float dtype) for a prefill."""
    shape = (batch, layout["num_kv_heads"], 0, layout["head_dim"])
    dtype = np.dtype(layout.get("dtype", "float32"))
    return {f"past_{kind}_{i}": np.zeros(shape, dtype)
            for i in range(layout["num_layers"]) for kind in ("key", "value")}  # fmt: skip


def greedy_decode(session, layout: dict, input_ids: np.ndarray, attention_mask: np.ndarray, steps: int,
                  eos_token_id: int | None = None, pad_token_id: int = 0, run_options=None,
                  forced_tokens: np.ndarray | None = None, choose=None):  # fmt: skip
    """Greedy generation through a KV-cache graph.

    Args:
        session: an ``onnxruntime.InferenceSession`` on the KV-cache graph.
        layout: ``{"num_layers", "num_kv_heads", "head_dim"}`` from the export metadata.
        input_ids, attention_mask: int64 ``[B, T]`` prompts (left-padded).
        steps: new tokens to produce.
        eos_token_id: finished rows keep emitting ``pad_token_id`` (None: never stop).
        run_options: ``onnxruntime.RunOptions`` (e.g. with an active adapter).
        forced_tokens: int64 ``[B, steps]`` to feed instead of the argmax (teacher forcing, for validation).
        choose: ``f(last_logits [B, vocab]) -> int64 [B]`` picking the next tokens (sampling); default argmax.

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
        if forced_tokens is not None:
            nxt = forced_tokens[:, len(tokens)].astype(np.int64)
        else:
            nxt = (last.argmax(-1) if choose is None else choose(last)).astype(np.int64)
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


def make_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0):
    """``f(logits [B, vocab]) -> int64 [B]``: softmax sampling at ``temperature`` over the ``top_k`` most likely
    tokens (0: all) whose cumulative probability first reaches ``top_p`` (as ``transformers``' warpers do)."""
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    rng = np.random.default_rng(seed)

    def choose(logits: np.ndarray) -> np.ndarray:
        z = logits.astype(np.float64) / temperature  # (B, V)
        order = np.argsort(-z, axis=-1)  # most likely first
        zs = np.take_along_axis(z, order, axis=-1)
        if 0 < top_k < zs.shape[-1]:
            zs[:, top_k:] = -np.inf
        p = np.exp(zs - zs[:, :1])
        p /= p.sum(-1, keepdims=True)
        drop = np.cumsum(p, axis=-1) - p >= top_p  # keep the smallest prefix reaching top_p (always the first)
        p[drop] = 0.0
        p /= p.sum(-1, keepdims=True)
        picks = [rng.choice(p.shape[-1], p=row) for row in p]
        return order[np.arange(len(picks)), picks].astype(np.int64)

    return choose


class OnnxModel:
    """An exported model in an onnxruntime session, with its tokenizer.

    Args:
        path: the export directory.
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = read_export_metadata(self.path)
        model = self.path / self.meta["model"]
        self._inputs = check_graph(self.path, model)
        options = session_options(self.meta.get("adapter_op"))  # OrtOpsBuildError: custom op library not built
        try:
            self.session = ort.InferenceSession(str(model), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's Fail/InvalidGraph/InvalidProtobuf/RuntimeException
            raise OnnxFormatError(f"onnxruntime cannot load it ({type(e).__name__}: {str(e)[:300]})", model) from None
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
            file = self.path / self.meta["adapters"][name]
            check_adapter_file(file, self._inputs)
            adapter = ort.LoraAdapter()
            try:
                adapter.Load(str(file))
            except Exception as e:  # noqa: BLE001 - changed since checked, or a check onnxruntime adds
                raise OnnxFormatError(f"onnxruntime cannot load it ({type(e).__name__}: {e})", file) from None
            self._loaded[name] = adapter
        opts = ort.RunOptions()
        opts.add_active_adapter(self._loaded[name])
        self._run_options, self.active_adapter = opts, name

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from sparsepack.formats.tokenizer import load_tokenizer

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

    def generate(self, prompt: str | list[str], max_new_tokens: int = 32, stop_at_eos: bool = True,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0,
                 seed: int = 0) -> str | list[str]:  # fmt: skip
        """Continuation of ``prompt`` (one string or a batch, left-padded): greedy, or sampled with ``do_sample``
        (``temperature`` / ``top_k`` / ``top_p`` / ``seed`` as in ``sparsepack generate``)."""
        single = isinstance(prompt, str)
        tok = self.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok([prompt] if single else list(prompt), return_tensors="np", padding=True)
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        eos = self.meta.get("eos_token_id") if stop_at_eos else None
        choose = make_sampler(temperature, top_k, top_p, seed) if do_sample else None
        if self.kv_cache:
            new, _ = greedy_decode(self.session, self.layout, ids, mask, max_new_tokens, eos_token_id=eos,
                                   pad_token_id=tok.pad_token_id, run_options=self._run_options,
                                   choose=choose)  # fmt: skip
        else:
            new = self._generate_no_cache(ids, mask, max_new_tokens, eos, tok.pad_token_id, choose)
        texts = tok.batch_decode(new, skip_special_tokens=True)
        return texts[0] if single else texts

    def _generate_no_cache(self, ids, mask, steps, eos, pad_id, choose=None) -> np.ndarray:
        # Quadratic (re-runs the whole sequence each step): only for graphs exported with --no-kv-cache.
        out, done = [], np.zeros(ids.shape[0], dtype=bool)
        for _ in range(steps):
            last = self.logits(ids, mask)[:, -1, :]
            nxt = (last.argmax(-1) if choose is None else choose(last)).astype(np.int64)
            if eos is not None:
                nxt = np.where(done, pad_id, nxt)
                done |= nxt == eos
            out.append(nxt)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
            if done.all():
                break
        return np.stack(out, axis=1)
