"""SHiRA (Bhardwaj et al. 2024, arXiv 2406.13175): train only a fixed sparse set of the base weights,
``W' = W + S``, ``S`` on a support chosen once before training; no low-rank part.

Support rules (``--support``; ``masks.py``): ``snip`` (largest ``|W * grad|``, the paper's choice for LLMs; the
default), ``grad`` (largest ``|grad|``), ``magnitude`` (largest ``|W|``), ``random`` (seeded per layer and per
adapter) and ``struct`` (every f-th row and column plus the diagonal). The gradient rules read ``--mask-samples``
examples once. Fusing scatters the stored values into the weight and unfusing puts the originals back: only
the ``nnz`` stored entries are touched.

``--budget N`` follows PEFT's SHiRA: ``r * (out + in)`` entries per layer with ``r = N // sum(out + in)``, so an
adapter sized that way exports to PEFT's own SHiRA format (``export --format peft``); ``--density`` instead
gives each layer ``density * out * in`` entries.
"""

from __future__ import annotations

from sparsepack.methods.allocation import Budget
from sparsepack.methods.base import Method, register


class ShiraMethod(Method):
    def layer_budgets(self, shapes: dict[str, tuple[int, int]], rank: int, density: float,
                      budget: int | None = None) -> dict[str, Budget]:  # fmt: skip
        """With ``budget``: PEFT's sizing, ``r * (out + in)`` entries per layer, ``r = budget // sum(out + in)``."""
        if budget is None:
            return super().layer_budgets(shapes, rank, density)
        r = budget // sum(o + i for o, i in shapes.values())
        if r < 1:
            raise ValueError(f"--budget {budget} is below PEFT SHiRA's smallest size, r = 1: "
                             f"{sum(o + i for o, i in shapes.values())} parameters")  # fmt: skip
        return {n: Budget(rank=0, nnz=min(r * (o + i), o * i)) for n, (o, i) in shapes.items()}


SHIRA = register(ShiraMethod(
    "shira", lowrank=False, sparse=True, support="snip", supports=("snip", "grad", "magnitude", "random", "struct"),
))  # fmt: skip
