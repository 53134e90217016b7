"""Named methods as presets of the building blocks: which parts an adapter has and how its support is chosen."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepack.methods.registry import Registry


@dataclass(frozen=True)
class Preset:
    name: str
    lowrank: bool  # has a low-rank part (A, B)
    sparse: bool  # has a sparse part S
    support_rule: str | None = None  # a name in methods.masks.SUPPORT_RULES
    lowrank_warmup: bool = False  # train the low-rank part alone before choosing the support (RoSA)
    allocator: str = "uniform"  # a name in methods.allocation.ALLOCATORS


PRESETS: Registry = Registry("method")


def _add(p: Preset) -> Preset:
    return PRESETS.register(p.name)(p)


_add(Preset("lora", lowrank=True, sparse=False))
_add(Preset("rosa", lowrank=True, sparse=True, support_rule="fisher", lowrank_warmup=True))
