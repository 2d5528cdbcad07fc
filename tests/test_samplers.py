"""PK and random batch samplers: structure, determinism and distributed sharding."""
from __future__ import annotations

from collections import Counter

import pytest

from training.data.samplers import IdentityBatchSampler, RandomBatchSampler

LABELS = [pid for pid in range(10) for _ in range(3 + pid % 4)]  # 3..6 images per identity


def test_pk_batches_hold_p_identities_of_k_images():
    sampler = IdentityBatchSampler(LABELS, batch_size=12, num_instances=4)
    batches = list(sampler)
    assert batches and len(batches) == len(sampler)
    for batch in batches:
        counts = Counter(LABELS[i] for i in batch)
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}


def test_pk_is_deterministic_per_epoch_and_changes_between_epochs():
    a, b = IdentityBatchSampler(LABELS, 8, 2, seed=7), IdentityBatchSampler(LABELS, 8, 2, seed=7)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_pk_shards_keep_identities_whole():
    full = IdentityBatchSampler(LABELS, 8, 2, seed=1)
    ranks = [IdentityBatchSampler(LABELS, 8, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for whole, part0, part1 in zip(full, *ranks):
        assert part0 + part1 == whole
        for part in (part0, part1):
            assert set(Counter(LABELS[i] for i in part).values()) == {2}


def test_exactly_p_identities_of_exactly_k_images_make_one_batch_of_every_image():
    """The edges: as many identities as a batch takes (allowed, and one batch, not none), and
    identities with exactly K images (each image once, not K draws with replacement)."""
    labels = [pid for pid in range(4) for _ in range(4)]
    for seed in range(3):
        assert sorted(b for batch in IdentityBatchSampler(labels, 16, 4, seed=seed) for b in batch) == list(range(16))


def test_pk_needs_enough_identities():
    with pytest.raises(ValueError, match="at least 20 identities"):
        IdentityBatchSampler(LABELS, 40, 2)


def test_random_batches_cover_items_once_and_shard():
    sampler = RandomBatchSampler(50, 8, seed=3)
    flat = [i for batch in sampler for i in batch]
    assert len(flat) == 48 and len(set(flat)) == 48
    halves = [RandomBatchSampler(50, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [a + b for a, b in zip(*halves)] == list(sampler)
