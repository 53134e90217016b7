"""Training examples -> padded micro-batches in a deterministic, resumable order.

The order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``; the position in
it is the whole state, so a resumed run sees exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsepack.pipeline.data import IGNORE_INDEX


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0  # examples of this epoch already served


class Batcher:
    """Serves micro-batches of ``batch_size`` examples, reshuffling at each epoch boundary."""

    def __init__(self, examples: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int, pad_id: int, seed: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.cursor = Cursor()
        self._order_epoch = -1
        self._order: torch.Tensor | None = None

    def _order_for(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(len(self.examples), generator=gen)
            self._order_epoch = epoch
        return self._order

    def next(self) -> dict[str, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            order = self._order_for(self.cursor.epoch)
            if self.cursor.position >= len(order):
                self.cursor = Cursor(self.cursor.epoch + 1, 0)
                continue
            picked.append(self.examples[int(order[self.cursor.position])])
            self.cursor.position += 1
        return collate(picked, self.pad_id)


def collate(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: ``input_ids``/``labels``/``attention_mask`` ``[b, L]``."""
    L = max(ids.numel() for ids, _ in examples)
    b = len(examples)
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    labels = torch.full((b, L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(b, L, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        n = ids.numel()
        input_ids[i, :n], labels[i, :n], mask[i, :n] = ids, lab, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
