"""RoSA (Nikdan et al. 2024, arXiv 2401.04679): ``W' = W + s B A + S``, ``S`` on a fixed sparse support.

A low-rank-only warm-up, then the support is chosen from data (default: the per-layer top-k of a streamed diagonal
Fisher estimate, the mean squared dense gradient), then both parts train (the trainer's phases).
"""

from sparsepack.methods.base import Method, register

ROSA = register(Method(
    "rosa", lowrank=True, sparse=True, support="fisher",
    supports=("fisher", "grad", "snip", "magnitude", "random", "struct"), lowrank_warmup=True,
))  # fmt: skip
