"""Generic decoder-block traversal for layer-by-layer work (no file per architecture).

- :func:`find_blocks` locates the repeated decoder blocks: the ``nn.ModuleList`` holding the most linears.
- :func:`capture_block_inputs` runs the model up to the first block and records what that block receives
  (hidden states plus the keyword arguments the model passes: masks, rotary embeddings, positions).
- :func:`sequential_groups` discovers, by one probe forward, the order in which a block calls its linears
  and which of them read the same input tensor (q/k/v, gate/up): those share one Hessian.
- :class:`ReplayCache` keeps the outputs of the block's children that can no longer change (those that
  finished before a true-sequential pass stopped), and the inputs of the linears that end a child (o_proj,
  down_proj), so later passes over the same block skip recomputing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (its work is done)."""


@dataclass
class BlockInput:
    """What one calibration batch feeds a decoder block."""

    hidden: torch.Tensor  # (b, T, hidden)
    kwargs: dict  # attention_mask, position_embeddings, position_ids, ...


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList whose children hold the most linear layers."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(isinstance(m, nn.Linear) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        _refuse_conv1d(model)
        raise ValueError(f"{type(model).__name__}: no repeated blocks of linear layers found")
    _refuse_conv1d(model)
    return best


def _refuse_conv1d(model: nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            raise ValueError(
                f"{name} is a GPT-2 style Conv1D layer (weight stored [in, out]); sparsepack quantizes "
                "nn.Linear layers only (Llama, Mistral, Qwen2, ... architectures)"
            )


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device) -> list[BlockInput]:  # fmt: skip
    """Run ``model`` on ``windows`` (``[n, T]``) until ``block`` is called; record its inputs per batch."""
    captured: list[BlockInput] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        captured.append(BlockInput(hidden.detach(), kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], batch_size):
            try:
                model(input_ids=windows[i : i + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the first decoder block was never called")
    # One allocation for every batch's hidden states, the views of which each block's outputs are copied
    # into: the long-lived activations never pin the heap (see compress._mmap_large_allocations).
    store = torch.cat([c.hidden for c in captured])
    sizes = [c.hidden.shape[0] for c in captured]
    return [BlockInput(h, c.kwargs) for h, c in zip(store.split(sizes), captured, strict=True)]


def run_block(block: nn.Module, inputs: list[BlockInput], cache: ReplayCache | None = None) -> Iterator[torch.Tensor]:
    """The block's output hidden states, batch by batch (cached submodule outputs replayed)."""
    with _replaying(block, cache) as batch:
        for i, inp in enumerate(inputs):
            batch[0] = i
            yield _first_tensor(block(inp.hidden, **inp.kwargs))


def _versions(out) -> tuple[int, ...] | None:
    """In-place version counters of a tensor / tuple-of-tensors output; None if it has none (not cached)."""
    tensors = [out] if isinstance(out, torch.Tensor) else list(out) if isinstance(out, tuple) else None
    if not tensors or not isinstance(tensors[0], torch.Tensor):
        return None
    if not all(t is None or isinstance(t, torch.Tensor) for t in tensors):
        return None
    try:
        return tuple(t._version for t in tensors if t is not None)
    except RuntimeError:  # inference-mode tensors carry no version counter
        return None


def _numel(out) -> int:
    return out.numel() if isinstance(out, torch.Tensor) else sum(t.numel() for t in out if t is not None)


def _nbytes(out) -> int:
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


class ReplayCache:
    """Per-batch outputs of a block's direct children that are final, replayed instead of recomputed.

    True-sequential GPTQ runs the block once per sublayer group, each pass stopping at the group's first
    linear with every earlier group already quantized. A child that *finished* before the pass stopped (the
    input norm; later the whole attention and the post-attention norm) therefore saw only final weights: its
    output for that batch can no longer change, and every later pass (the last one producing the next block's
    inputs included) takes it from here. Valid only while that holds: the caller records only in passes whose
    already-called linears are final.

    Tails: a child whose output *is* the output of the last linear it calls (the attention's o_proj, the
    MLP's down_proj: checked on the probe by object identity; any other tuple item must be None) is replayed
    as that linear applied to its recorded input, once a pass has stopped at that linear: everything before
    it was final then, and the linear itself is quantized right after. This spares recomputing q/k/v, rotary
    and attention in the gate/up pass, and gate/up in the last pass.

    Only the block's direct children are candidates, and only those a full forward calls exactly once (a
    pass that stops early cannot see a second call, so one probe forward decides): their outputs are
    hidden-sized. Deeper modules (q/k/v) would hold more memory for no more speed (caching every finished
    module doubled the memory: ``docs/BENCHMARKS.md``, Compress). Outputs and tail
    inputs carry their in-place version counters: if anything modified one in place, that module is
    recomputed instead, so a replay never hands out a corrupted tensor.

    Args:
        block: the decoder block.
        probe: one of its calibration inputs (the probe forward uses its first row).
        max_ratio: largest output kept, as a multiple of the block input's size (memory bound: 1.0 keeps
            hidden-sized outputs such as attention and norms, not the MLP's wide intermediate ones).
        tail_ratio: largest tail input kept, likewise (down_proj's input is intermediate-sized: 2.7x on
            SmolLM2, 3.5x on Llama-3-8B); 0 turns tails off.
    """

    def __init__(self, block: nn.Module, probe: BlockInput, max_ratio: float = 1.0, tail_ratio: float = 4.0):
        self.max_ratio, self.tail_ratio = max_ratio, tail_ratio
        # child name -> per batch: (output, its tensors' versions when stored)
        self.outputs: dict[str, list[tuple[object, tuple[int, ...]]]] = {}
        self.recomputed = 0  # replays refused because an output had been modified in place
        once, tails = _probe(block, probe)
        self.candidates = {n for n in once if "." not in n}
        # tail linear (relative name) -> (its child, the child's output tuple length; 0: a bare tensor)
        self.tails = {lin: (child, arity) for child, (lin, arity) in tails.items() if child in self.candidates}
        # child name -> per batch: (the input of its tail linear, that tensor's version when stored)
        self.tail_inputs: dict[str, list[tuple[torch.Tensor, tuple[int, ...]]]] = {}

    def nbytes(self) -> int:
        held = sum(_nbytes(out) for entries in self.outputs.values() for out, _ in entries)
        return held + sum(_nbytes(x) for entries in self.tail_inputs.values() for x, _ in entries)

    def _covered(self, name: str) -> bool:
        """``name`` or one of its ancestors is replayed (so it is never called)."""
        return any(name == r or name.startswith(r + ".") for r in (*self.outputs, *self.tail_inputs))

    def _admit(self, recorded: dict[str, list]) -> None:
        for name, entries in recorded.items():
            # modified in place after it was returned (its recorded value is gone): never cached
            if all(_versions(out) == versions for out, versions in entries):
                self.outputs[name] = entries
                self.tail_inputs.pop(name, None)  # the whole output is kept now

    def _forward(self, module: nn.Module, entries: list, batch: list[int]):
        original = module.forward

        def forward(*args, **kwargs):
            out, versions = entries[batch[0]]
            if _versions(out) == versions:
                return out
            self.recomputed += 1  # modified in place downstream since it was recorded: compute it again
            out = original(*args, **kwargs)
            entries[batch[0]] = (out, _versions(out))
            return out

        return forward

    def _tail_forward(self, module: nn.Module, linear: nn.Module, arity: int, entries: list, batch: list[int]):
        original = module.forward

        def forward(*args, **kwargs):
            x, versions = entries[batch[0]]
            if _versions(x) != versions:
                self.recomputed += 1  # the recorded input was modified in place: run the whole child
                return original(*args, **kwargs)
            y = linear(x)
            return (y,) + (None,) * (arity - 1) if arity else y

        return forward


@torch.no_grad()
def _probe(block: nn.Module, probe: BlockInput) -> tuple[set[str], dict[str, tuple[str, int]]]:
    """One forward of ``block`` on one sample: the submodules it calls exactly once, and the tails.

    Tails: direct child -> (its last-called linear, relative to the block; the child's output tuple length,
    0 for a bare tensor), for each child whose output is that linear's output object and whose other tuple
    items are None.
    """
    calls: dict[str, int] = {}
    last_linear: dict[str, tuple[str, torch.Tensor]] = {}  # direct child -> (its latest linear, that output)
    outputs: dict[str, object] = {}
    handles = []
    for n, m in block.named_modules():
        if not n:
            continue
        handles.append(m.register_forward_pre_hook(lambda *_a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1)))
        if "." not in n:
            handles.append(m.register_forward_hook(lambda _m, _a, out, n=n: outputs.__setitem__(n, out)))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(
                lambda _m, _a, out, n=n: last_linear.__setitem__(n.split(".", 1)[0], (n, out))))  # fmt: skip
    try:
        block(probe.hidden[:1], **_slice_kwargs(probe.kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    once = {n for n, c in calls.items() if c == 1}
    tails = {}
    for child, (lin, y) in last_linear.items():
        out = outputs.get(child)
        if child not in once or lin not in once:
            continue
        if out is y:
            tails[child] = (lin, 0)
        elif isinstance(out, tuple) and out and out[0] is y and all(o is None for o in out[1:]):
            tails[child] = (lin, len(out))
    return once, tails


class _Slab:
    """One allocation holding a tensor per calibration batch, stacked along dim 0.

    Kept activations copied into slabs never pin the malloc heap: with a high mmap threshold (see
    ``compress._mmap_large_allocations``) each slab is one mmap of its own, and the heap holds only
    short-lived tensors, so it neither creeps nor fragments. A tensor whose dim 0 is not its batch's size,
    or whose shape or dtype differs from the first one's, is kept as it is (``put`` returns it).
    """

    def __init__(self, sizes: list[int]):
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.store: torch.Tensor | None = None

    def put(self, batch: int, t: torch.Tensor) -> torch.Tensor:
        a, b = self.offsets[batch], self.offsets[batch + 1]
        if t.dim() == 0 or t.shape[0] != b - a:
            return t
        if self.store is None:
            self.store = t.new_empty((self.offsets[-1], *t.shape[1:]))
        elif self.store.shape[1:] != t.shape[1:] or self.store.dtype != t.dtype:
            return t
        view = self.store[a:b]
        view.copy_(t)
        return view


def _put(slabs: list[_Slab], sizes: list[int], batch: int, out):
    """``out`` (a tensor or a tuple of tensors/None) with each tensor copied into its position's slab."""
    if isinstance(out, torch.Tensor):
        if not slabs:
            slabs.append(_Slab(sizes))
        return slabs[0].put(batch, out)
    while len(slabs) < len(out):
        slabs.append(_Slab(sizes))
    return tuple(t if t is None else slab.put(batch, t) for slab, t in zip(slabs[: len(out)], out, strict=True))


def _copied(out, stored) -> bool:
    items = zip(out, stored, strict=True) if isinstance(out, tuple) else [(out, stored)]
    return any(a is not b for a, b in items)


class _Recorder:
    """Forward hooks that keep, batch by batch, the outputs a pass may add to a :class:`ReplayCache`.

    Outputs are copied into slabs when they are produced, so whatever later modifies the originals in place
    cannot corrupt them; an output kept as it is (no slab fits) must still hold its recorded version.
    """

    def __init__(self, cache: ReplayCache, inputs: list[BlockInput]):
        self.cache, self.inputs = cache, inputs
        self.sizes = [inp.hidden.shape[0] for inp in inputs]
        self.entries: dict[str, list] = {}
        self.slabs: dict[str, list[_Slab]] = {}
        self.rejected: set[str] = set()
        self.batch = 0

    def hook(self, name: str):
        def keep(_module, _args, out):
            if name in self.rejected:
                return
            entries = self.entries.setdefault(name, [])
            versions = _versions(out)
            limit = self.cache.max_ratio * self.inputs[self.batch].hidden.numel()
            # Refused at once (not at the end of the pass) so large outputs never pile up: a second call in
            # one batch, a skipped batch, something other than tensors, or too big.
            if versions is None or len(entries) != self.batch or _numel(out) > limit:
                self.rejected.add(name)
                del self.entries[name]
                self.slabs.pop(name, None)
                return
            stored = _put(self.slabs.setdefault(name, []), self.sizes, self.batch, out)
            entries.append((stored, None if _copied(out, stored) else versions))

        return keep

    def finished(self) -> dict[str, list]:
        """Outputs recorded in every batch (handed over: the recorder lets go of all it holds).

        Copies get their versions now: views of one slab share a counter, which every copy moved.
        """
        done = {n: [(out, _versions(out) if v is None else v) for out, v in e]
                for n, e in self.entries.items() if len(e) == len(self.inputs)}  # fmt: skip
        self.entries, self.slabs = {}, {}
        return done


class _replaying:
    """Context: the cache's modules return their stored output for batch ``batch[0]`` instead of computing."""

    def __init__(self, block: nn.Module, cache: ReplayCache | None):
        self.block, self.cache, self.batch, self.patched = block, cache, [0], []

    def __enter__(self) -> list[int]:
        if self.cache is not None:
            for name, entries in self.cache.outputs.items():
                module = self.block.get_submodule(name)
                module.forward = self.cache._forward(module, entries, self.batch)  # instance attr shadows the class's
                self.patched.append(module)
            for lin, (name, arity) in self.cache.tails.items():
                entries = self.cache.tail_inputs.get(name)
                if entries is None or name in self.cache.outputs:
                    continue
                module = self.block.get_submodule(name)
                module.forward = self.cache._tail_forward(module, self.block.get_submodule(lin), arity, entries,
                                                          self.batch)  # fmt: skip
                self.patched.append(module)
        return self.batch

    def __exit__(self, *exc) -> None:
        for module in self.patched:
            del module.forward  # back to the class's forward


@torch.no_grad()
def sequential_groups(block: nn.Module, probe: BlockInput, names: list[str]) -> list[list[str]]:
    """Linears of ``block`` (relative ``names``) in call order, grouped by shared input tensor.

    The inputs themselves are held until the end: comparing bare addresses would group o_proj with gate/up
    whenever the allocator hands the freed attention output's memory to the post-attention norm's output
    (it does, at random: such runs quantized gate/up against o_proj's Hessian).
    """
    calls: list[tuple[str, torch.Tensor]] = []
    wanted = set(names)
    handles = []
    for name, module in block.named_modules():
        if name in wanted:
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: calls.append((name, args[0]))))  # fmt: skip
    try:
        block(probe.hidden[:1], **_slice_kwargs(probe.kwargs, 1))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    seen: set[str] = set()
    last = None
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        same = last is not None and (x.data_ptr(), x.shape, x.stride()) == (last.data_ptr(), last.shape, last.stride())
        if groups and same:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    missing = wanted - seen
    if missing:  # never called in a forward (e.g. unused experts): quantize them last, on their own
        groups += [[n] for n in sorted(missing)]
    return groups


def _slice_kwargs(kwargs: dict, b: int) -> dict:
    """Keyword tensors cut to the first ``b`` batch rows (masks and rotary tables are batch-major)."""

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1:
            return v[:b]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


@torch.no_grad()
def collect_inputs(block: nn.Module, inputs: list[BlockInput], module_names: list[str], on_input,
                   stop_after: str | None = None, cache: ReplayCache | None = None) -> None:  # fmt: skip
    """Call ``on_input(name, x)`` with the input of each named submodule, for every calibration batch.

    With ``stop_after``, each forward ends as soon as that module has received its input. With ``cache``
    (true-sequential passes only: every linear called before ``stop_after`` must be final), the cache's
    modules are replayed and the outputs of the modules that finish before the stop are added to it.
    """
    handles = []
    recorder = _Recorder(cache, inputs) if cache is not None and stop_after is not None else None
    tail = cache.tails.get(stop_after) if recorder is not None else None  # (child, arity) or None
    if tail is not None and cache._covered(tail[0]):
        tail = None
    tail_inputs: list = []  # per batch: stop_after's input (a copy in tail_slab)
    tail_slab: list[_Slab] = []
    sizes = [inp.hidden.shape[0] for inp in inputs]
    for name, module in block.named_modules():
        if name in module_names:

            def hook(_m, args, name=name):
                on_input(name, args[0])
                if name == stop_after:
                    x, j = args[0], len(tail_inputs)
                    fits = j < len(inputs) and x.numel() <= cache.tail_ratio * inputs[j].hidden.numel()
                    if tail is not None and fits:
                        stored = _put(tail_slab, sizes, j, x)
                        tail_inputs.append(stored if stored is not x else x.clone())
                    raise _Stop

            handles.append(module.register_forward_pre_hook(hook))
        if recorder is not None and name in cache.candidates and not cache._covered(name):
            handles.append(module.register_forward_hook(recorder.hook(name)))
    try:
        with _replaying(block, cache) as batch:
            for i, inp in enumerate(inputs):
                batch[0] = i
                if recorder is not None:
                    recorder.batch = i
                try:
                    block(inp.hidden, **inp.kwargs)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if recorder is not None:
        cache._admit(recorder.finished())
    if tail is not None and len(tail_inputs) == len(inputs):
        cache.tail_inputs[tail[0]] = [(x, _versions(x)) for x in tail_inputs]
