"""The method seam: what a fine-tuning method is, and the one registry of them.

A method is one file under ``methods/`` that registers a :class:`Method`: which parts its adapter trains (a
low-rank part ``A, B``, a sparse part ``S`` on a fixed support, or both), how its sparse support is chosen (a
rule in ``masks.SUPPORT_RULES``; rules that need data ask the trainer for gradient statistics by name), how a
trainable-parameter ``--budget`` becomes its rank and density, and which training phases it runs. Whatever it
trains reduces at save time to one deployment form (low-rank factors of any rank + CSR sparse entries,
``formats.adapter_layout``), which the pack, loader, switching, merge and exporters consume without knowing the
method. docs/METHODS.md walks through adding one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparsepack.methods.allocation import ALLOCATORS, Budget
from sparsepack.methods.registry import Registry


@dataclass(frozen=True)
class Method:
    """A registered fine-tuning method (see the module docstring)."""

    name: str
    lowrank: bool  # trains a low-rank part (A, B)
    sparse: bool  # trains a sparse part S on a fixed support
    support: str | None = None  # default sparse support rule (a name in masks.SUPPORT_RULES)
    supports: tuple[str, ...] = ()  # the support rules --support may choose for this method
    lowrank_warmup: bool = False  # train the low-rank part alone before choosing the support (RoSA)
    allocator: str = "uniform"  # a name in allocation.ALLOCATORS

    def layer_budgets(self, shapes: dict[str, tuple[int, int]], rank: int, density: float,
                      budget: int | None = None) -> dict[str, Budget]:  # fmt: skip
        """Each layer's rank and sparse entries: from ``rank`` and ``density``, or, with ``budget`` (trainable
        parameters), from it. Low-rank only: the largest rank whose ``r * (out + in)`` per layer fits. Sparse
        only: density ``budget / sum(out * in)``. Both: ``rank`` as given, the rest of the budget to the sparse
        part. The method's allocator spreads the result (``allocation.ALLOCATORS``).

        Raises:
            ValueError: the budget cannot hold one unit of what the method trains.
        """
        rank, density = (rank if self.lowrank else 0), (density if self.sparse else 0.0)
        if budget is not None:
            lowrank_unit = sum(o + i for o, i in shapes.values())  # parameters of rank 1 everywhere
            if self.lowrank and not self.sparse:
                rank = budget // lowrank_unit
                if rank < 1:
                    raise ValueError(f"--budget {budget} is below one rank of {self.name} ({lowrank_unit} "
                                     "parameters)")  # fmt: skip
            else:
                left = budget - rank * lowrank_unit
                if left < len(shapes):
                    raise ValueError(f"--budget {budget} leaves no sparse entries for {self.name} after rank {rank} "
                                     f"({rank * lowrank_unit} parameters)")  # fmt: skip
                # floor, not the allocator's rounding: the layers' counts must not add up past the budget
                d = left / sum(o * i for o, i in shapes.values())
                return {n: Budget(rank=min(rank, o, i), nnz=max(1, int(d * o * i))) for n, (o, i) in shapes.items()}
        return ALLOCATORS.get(self.allocator)(shapes, rank, density)


METHODS: Registry[Method] = Registry("method")


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (one call in the method's own file)."""
    return METHODS.register(method.name)(method)


def get(name: str) -> Method:
    """The method registered as ``name`` (every method file is imported first); unknown names list the known."""
    import sparsepack.methods.lora  # noqa: F401 - each method file registers itself on import
    import sparsepack.methods.rosa  # noqa: F401
    import sparsepack.methods.shira  # noqa: F401

    return METHODS.get(name)
