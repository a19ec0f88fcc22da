"""Deterministic batching of preference pairs, addressable by position for exact resumption."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchPosition:
    """Where the next micro-batch starts: epoch and micro-batch number within it."""

    epoch: int = 0
    batch: int = 0


class PairBatches:
    """Micro-batches of pair indices: each epoch a seeded permutation, cut into full batches.

    The permutation depends only on (seed, epoch), so iteration can restart at any
    :class:`BatchPosition` and yield the same batches an uninterrupted run would.
    A last partial batch is dropped (every optimizer step sees the same number of pairs);
    those pairs come first in another epoch's order.
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_pairs < batch_size:
            raise ValueError(f"{num_pairs} valid pairs is fewer than one batch of {batch_size}")
        self.num_pairs = num_pairs
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle

    @property
    def batches_per_epoch(self) -> int:
        return self.num_pairs // self.batch_size

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_pairs))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_pairs, generator=generator).tolist()

    def iterate(self, start: BatchPosition = BatchPosition()) -> Iterator[tuple[BatchPosition, list[int]]]:
        """Yield (position of this batch, indices) forever, starting at ``start``."""
        epoch, batch = start.epoch, start.batch
        while True:
            order = self.order(epoch)
            for b in range(batch, self.batches_per_epoch):
                yield BatchPosition(epoch, b), order[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, batch = epoch + 1, 0
