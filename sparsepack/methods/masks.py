"""Sparse support rules: which ``nnz`` entries of each adapted weight the sparse part may train.

A rule is ``rule(ctx) -> {module: CSRSupport}``. Rules that need data (RoSA's Fisher scores) ask the
context for scores of a group of modules at a time (``ctx.scores(names)``), so the trainer can stream the
statistics and free them after each group. Register a new rule with ``@SUPPORT_RULES.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsepack.kernels.sparse import CSRSupport
from sparsepack.methods.registry import Registry

SUPPORT_RULES: Registry = Registry("support rule")


@dataclass
class SupportContext:
    """What a rule may use."""

    shapes: dict[str, tuple[int, int]]  # module -> (out, in)
    nnz: dict[str, int]  # module -> entries to keep
    base_weight: Callable[[str], torch.Tensor]  # module -> dense base weight [out, in] (fp32)
    scores: Callable[[list[str]], dict[str, torch.Tensor]] | None  # data-driven scores for a group of modules
    groups: list[list[str]]  # module groups whose scores fit the memory budget together
    generator: torch.Generator  # seeded; every module draws from it in a fixed order


def topk_support(score: torch.Tensor, k: int) -> CSRSupport:
    """The ``k`` largest entries of ``score [out, in]`` as a CSR support (ties broken by index)."""
    out_f, in_f = score.shape
    flat = score.reshape(-1).float()
    idx = torch.topk(flat, k, sorted=False).indices if k < flat.numel() else torch.arange(flat.numel())
    return CSRSupport.from_coo(idx // in_f, idx % in_f, (out_f, in_f))


@SUPPORT_RULES.register("fisher")
def fisher_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """RoSA: top-k of the mean squared dense gradient (diagonal Fisher), streamed group by group."""
    if ctx.scores is None:
        raise ValueError("the fisher support rule needs gradient statistics (training data)")
    out = {}
    for group in ctx.groups:
        for name, score in ctx.scores(group).items():
            out[name] = topk_support(score, ctx.nnz[name])
    return out


@SUPPORT_RULES.register("random")
def random_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """Uniformly random entries; each module draws from one seeded generator in turn (no repeats across
    same-shape layers, unlike a fresh default generator per layer)."""
    out = {}
    for name in sorted(ctx.shapes):
        o, i = ctx.shapes[name]
        idx = torch.randperm(o * i, generator=ctx.generator)[: ctx.nnz[name]]
        out[name] = CSRSupport.from_coo(idx // i, idx % i, (o, i))
    return out


@SUPPORT_RULES.register("magnitude")
def magnitude_support(ctx: SupportContext) -> dict[str, CSRSupport]:
    """Largest ``|W|`` of the base weight (SHiRA-WM)."""
    return {n: topk_support(ctx.base_weight(n).abs(), ctx.nnz[n]) for n in sorted(ctx.shapes)}
