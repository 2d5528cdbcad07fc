"""Batch samplers: random batches (``softmax``) and P identities x K images (``triplet``).

Both are deterministic functions of (seed, epoch) and shard every global batch across
distributed ranks, so a resumed or multi-process run sees exactly the batches a single
uninterrupted run would.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np


class _ShardedBatchSampler:
    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int, multiple: int = 1):
        if batch_size % (world_size * multiple):
            raise ValueError(
                f"batch size {batch_size} must split evenly into {world_size} ranks of whole groups of {multiple}"
            )
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_size // self.world_size
        for batch in self.global_batches():
            yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __len__(self) -> int:
        return len(self.global_batches())


class RandomBatchSampler(_ShardedBatchSampler):
    """Shuffled batches of ``batch_size``; the incomplete last batch is dropped."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        self.num_items = num_items

    def global_batches(self) -> list[list[int]]:
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_items).tolist()
        n = len(order) // self.batch_size
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n)]


class IdentityBatchSampler(_ShardedBatchSampler):
    """Batches of P = batch_size / K identities with K images each (PK sampling for triplet mining).

    An identity with fewer than K images is sampled with replacement; each identity contributes as
    many K-groups as its images allow, and the epoch ends when fewer than P identities have groups left.
    """

    def __init__(
        self, labels: Sequence[int], batch_size: int, num_instances: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        super().__init__(batch_size, seed, rank, world_size, multiple=num_instances)
        self.k = num_instances
        self.p = batch_size // num_instances
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(labels):
            self.by_pid[int(pid)].append(index)
        if len(self.by_pid) < self.p:
            raise ValueError(
                f"PK sampling needs at least {self.p} identities per batch (batch_size/num_instances) "
                f"but the training set has {len(self.by_pid)}"
            )

    def global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        groups: dict[int, list[list[int]]] = {}
        for pid in sorted(self.by_pid):
            idxs = self.by_pid[pid]
            if len(idxs) < self.k:
                idxs = rng.choice(idxs, size=self.k, replace=True).tolist()
            else:
                idxs = rng.permutation(idxs).tolist()
            groups[pid] = [idxs[i : i + self.k] for i in range(0, len(idxs) - self.k + 1, self.k)]
        batches = []
        available = [pid for pid in sorted(groups) if groups[pid]]
        while len(available) >= self.p:
            chosen = rng.choice(len(available), size=self.p, replace=False)
            batch = []
            for c in sorted(chosen):
                batch += groups[available[c]].pop()
            batches.append(batch)
            available = [pid for pid in available if groups[pid]]
        return batches
