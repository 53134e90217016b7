"""Sparse support rules: which ``nnz`` entries of each adapted weight the sparse part may train.

A rule is ``rule(ctx) -> {module: CSRSupport}``. Rules that need data ask the context for a gradient statistic of
a group of modules at a time (``ctx.scores(kind, names)``: ``"fisher"``, the mean squared dense gradient over the
scoring examples; ``"grad"``, the dense gradient of their mean loss), so the trainer can stream the statistics and
free them after each group. Register a new rule with ``@SUPPORT_RULES.register("name")``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from sparsepack.kernels.sparse import CSRSupport
from sparsepack.methods.registry import Registry

SUPPORT_RULES: Registry = Registry("support rule")
SCORE_KINDS = ("fisher", "grad")  # the gradient statistics a trainer provides to ctx.scores


@dataclass
class SupportContext:
    """What a rule may use."""

    shapes: dict[str, tuple[int, int]]  # module -> (out, in)
    nnz: dict[str, int]  # module -> entries to keep
    base_weight: Callable[[str], torch.Tensor]  # module -> dense base weight [out, in] (fp32)
    scores: Callable[[str, list[str]], dict[str, torch.Tensor]] | None  # (kind, modules) -> [out, in] statistics
    groups: list[list[str]]  # module groups whose statistics fit the memory budget together
    seed: int  # the run's seed
    adapter: str = "default"  # the adapter's name: random supports differ between adapters of one seed

    def generator(self, module: str) -> torch.Generator:
        """A generator seeded from (seed, adapter, module): same-shape layers, and adapters, never share draws."""
        key = f"{self.seed}\0{self.adapter}\0{module}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)

    def streamed(self, kind: str) -> Iterator[dict[str, torch.Tensor]]:
        """``kind`` statistics of every module, one group at a time (a dict per group)."""
        if self.scores is None:
            raise ValueError(f"this support rule needs gradient statistics ({kind}) from training data")
        for group in self.groups:
            yield self.scores(kind, group)


def topk_support(score: torch.Tensor, k: int) -> CSRSupport:
    """The ``k`` largest entries of ``score [out, in]`` as a CSR support."""
    out_f, in_f = score.shape
    flat = score.reshape(-1)
    flat = flat if flat.dtype == torch.float64 else flat.float()  # fp64 scores keep ties apart (struct_score)
    idx = torch.topk(flat, k, sorted=False).indices if k < flat.numel() else torch.arange(flat.numel())
    return CSRSupport.from_coo(idx // in_f, idx % in_f, (out_f, in_f))


@SUPPORT_RULES.register("fisher")
def fisher_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """RoSA: top-k of the mean squared dense gradient (diagonal Fisher), streamed group by group."""
    return {n: topk_support(s, ctx.nnz[n]) for group in ctx.streamed("fisher") for n, s in group.items()}


@SUPPORT_RULES.register("grad")
def grad_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """SHiRA-grad: top-k of ``|grad|``, the dense gradient of the scoring examples' mean loss."""
    return {n: topk_support(s.abs(), ctx.nnz[n]) for group in ctx.streamed("grad") for n, s in group.items()}


@SUPPORT_RULES.register("snip")
def snip_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """SHiRA-SNIP: top-k of ``|W * grad|`` (the base weight times its gradient; the paper's choice for LLMs)."""
    return {n: topk_support((ctx.base_weight(n) * s).abs(), ctx.nnz[n])
            for group in ctx.streamed("grad") for n, s in group.items()}  # fmt: skip


@SUPPORT_RULES.register("random")
def random_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """Uniformly random entries, drawn per layer from (seed, adapter, layer): unlike a fresh default generator per
    layer, same-shape layers (and two adapters) get different masks."""
    out = {}
    for name in sorted(ctx.shapes):
        o, i = ctx.shapes[name]
        idx = torch.randperm(o * i, generator=ctx.generator(name))[: ctx.nnz[name]]
        out[name] = CSRSupport.from_coo(idx // i, idx % i, (o, i))
    return out


@SUPPORT_RULES.register("magnitude")
def magnitude_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """Largest ``|W|`` of the (dequantized) base weight (SHiRA-WM)."""
    return {n: topk_support(ctx.base_weight(n).abs(), ctx.nnz[n]) for n in sorted(ctx.shapes)}


def struct_score(o: int, i: int, nnz: int) -> torch.Tensor:
    """``[o, i]`` priorities of SHiRA-struct: the diagonal first, then every f-th row and column (f chosen so that
    the rows and columns hold about ``nnz`` entries), then nothing; within a level, lower flat index first.
    Every value is distinct, so the top ``nnz`` are one well-defined set."""
    f = max(1, round(2 * o * i / max(nnz, 1)))
    level = torch.zeros(o, i, dtype=torch.float64)
    level[::f, :] = 1
    level[:, ::f] = 1
    d = torch.arange(min(o, i))
    level[d, d] = 2
    order = torch.arange(o * i, 0, -1, dtype=torch.float64).view(o, i) / (o * i + 1)  # (0, 1), falling with index
    return level + order


@SUPPORT_RULES.register("struct")
def struct_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """SHiRA-struct: every f-th row and column plus the diagonal (no data, no weights)."""
    return {n: topk_support(struct_score(*ctx.shapes[n], ctx.nnz[n]), ctx.nnz[n]) for n in sorted(ctx.shapes)}
