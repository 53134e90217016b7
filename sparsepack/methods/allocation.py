"""How a rank/density budget is spread over the adapted modules.

An allocator maps ``{module: (out, in)}`` plus the requested rank and density to a per-module
:class:`Budget`. ``uniform`` gives every module the same rank and the same density (RoSA, LoRA);
zero-cost-proxy allocators (HeteroLoRA) register beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsepack.methods.registry import Registry


@dataclass(frozen=True)
class Budget:
    rank: int  # low-rank dimension r (0 = no low-rank part)
    nnz: int  # sparse entries (0 = no sparse part)


ALLOCATORS: Registry = Registry("allocator")


@ALLOCATORS.register("uniform")
def uniform(shapes: dict[str, tuple[int, int]], rank: int, density: float) -> dict[str, Budget]:
    """Same rank everywhere (capped at the layer's smaller side) and ``round(density * out * in)`` entries."""
    out = {}
    for name, (o, i) in shapes.items():
        nnz = int(round(density * o * i)) if density > 0 else 0
        out[name] = Budget(rank=min(rank, o, i), nnz=min(max(nnz, 1 if density > 0 else 0), o * i))
    return out
