"""Perplexity over non-overlapping token windows (and, later, KL to a teacher)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens (windows * (seqlen - 1))
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (LongTensor ``[n, seqlen]``), each window scored alone.

    Every window predicts its tokens 1..seqlen-1 from the preceding ones (no context across windows), which
    is exactly what ``model(input_ids, labels=input_ids).loss`` averages; the mean is over all tokens.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n >= 1, seqlen >= 2], got {tuple(windows.shape)}")
    n, seqlen = windows.shape
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and seqlen > context:  # refused before a forward allocates for it
        raise ValueError(f"--seqlen {seqlen} exceeds the model's context of {context} positions")
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=n, desc="eval", unit="win", disable=not progress, leave=False)
    for i in range(0, n, batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()  # (b, T, V)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll.double())
        total_tokens += ids[:, 1:].numel()
        bar.update(ids.shape[0])
        bar.set_postfix(ppl=f"{_exp(total_nll / total_tokens):.3f}")
    bar.close()
    mean = total_nll / total_tokens
    return PerplexityResult(
        perplexity=_exp(mean), nll=mean, tokens=total_tokens, windows=n, seqlen=seqlen,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def _exp(nll: float) -> float:
    """``exp(nll)``, infinite past float range (a diverged model's perplexity) instead of an OverflowError."""
    return math.exp(nll) if nll < 709.0 else math.inf
