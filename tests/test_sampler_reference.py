"""The vectorised plan against the original per-sequence loops (tests/sampler_reference.py), bit for
bit: checkpoints store positions in the plan, so another batch or share at a position is a bug.

A grid of strategies, batch sizes, token budgets (off, small, large, below the longest sequence),
padding noise, pools, seeds and epochs, length distributions (uniform, lognormal, all equal, a few
huge ones among short), and world sizes 1 to 1,024 (more ranks than sequences included), each rank
read through the sampler. Sizes are small: the reference is the slow part.
"""

from __future__ import annotations

import numpy as np
import pytest
import sampler_reference as ref

from ddp_seq.data.cuts import narrow_dtype
from ddp_seq.data.readers.files import is_memory_mapped
from ddp_seq.data.sampler import (
    BucketBatchSampler,
    compact_lengths,
    global_batches,
    padded_cost,
    share_costs,
    shared_lengths,
    split_shares,
    straggler_ratio,
)

WORLD_SIZES = (1, 2, 3, 7, 64, 1024)


def distributions(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    huge = rng.integers(1, 6, size=n)
    huge[rng.choice(n, size=max(1, n // 100), replace=False)] = 5000  # a few far past any budget here
    return {
        "uniform": rng.integers(1, 201, size=n),
        "lognormal": np.clip(np.rint(rng.lognormal(np.log(45), 0.8, size=n)), 1, 400).astype(np.int64),
        "equal": np.full(n, 7, dtype=np.int64),
        "huge": huge.astype(np.int64),
    }


PLANS = [  # (strategy, shuffle, pool, padding_noise)
    ("random", True, 50, 0.0),
    ("bucket", True, 1, 0.0),
    ("bucket", True, 3, 0.0),
    ("bucket", True, 50, 0.0),
    ("bucket", True, 3, 0.3),
    ("bucket", True, 2, 1.0),
    ("bucket", False, 50, 0.0),  # evaluation: sorted by length, one pool
]


def assert_same_batches(got: list[np.ndarray], want: list[np.ndarray], dtype_too: bool = True) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
        if dtype_too:
            assert g.dtype == w.dtype


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "equal", "huge"])
def test_global_batches_match_the_reference(dist):
    checked = 0
    for n in (1, 5, 300):
        lengths = distributions(n, seed=n)[dist]
        longest = int(lengths.max())
        for strategy, shuffle, pool, noise in PLANS:
            for batch_size in (1, 7, 64) if n < 300 else (7, 64):  # batch 1 of 300: the slow reference's cost
                # off, below the longest sequence, small, large
                for max_tokens in (0, max(1, longest // 2), 3 * longest, 50 * longest):
                    for seed, epoch in ((0, 0), (3, 2)):
                        kw = dict(batch_size=batch_size, max_tokens=max_tokens, strategy=strategy, pool=pool,
                                  padding_noise=noise, seed=seed, epoch=epoch, shuffle=shuffle)
                        want = ref.global_batches(lengths, **kw)
                        assert_same_batches(global_batches(lengths, **kw), want)
                        if seed:  # the narrow lengths the sampler keeps give the same plan
                            narrow = lengths.astype(narrow_dtype(longest))
                            assert_same_batches(global_batches(narrow, **kw), want)
                        checked += 1
    assert checked == (2 * 3 + 2) * len(PLANS) * 4 * 2


def random_batches(rng: np.random.Generator, lengths: np.ndarray, count: int) -> list[np.ndarray]:
    """Unsorted batches of many sizes, plus a length-sorted one (a bucket batch)."""
    out = [rng.permutation(len(lengths))[:int(rng.integers(1, min(len(lengths), 200) + 1))] for _ in range(count)]
    out.append(np.argsort(-lengths, kind="stable")[:200])
    return out


@pytest.mark.parametrize("dist", ["uniform", "lognormal", "equal", "huge"])
def test_split_shares_and_costs_match_the_reference(dist):
    rng = np.random.default_rng(len(dist))
    lengths = distributions(400, seed=7)[dist]
    narrow = compact_lengths(lengths)
    assert narrow.dtype.itemsize < lengths.dtype.itemsize
    batches = random_batches(rng, lengths, 8)
    for world_size in WORLD_SIZES:
        for batch in batches:
            want = ref.split_shares(batch, lengths, world_size)
            for lens in (lengths, narrow):
                assert_same_batches(split_shares(batch, lens, world_size), want)
        sizes, padded = share_costs(batches, narrow, world_size)
        for k, batch in enumerate(batches):
            shares = ref.split_shares(batch, lengths, world_size)
            assert sizes[k].tolist() == [len(s) for s in shares]
            assert padded[k].tolist() == [ref.padded_cost(s, lengths) for s in shares]
            assert [padded_cost(s, narrow) for s in shares] == padded[k].tolist()
        # the same float, to the last bit (the sums run in the same order)
        assert straggler_ratio(batches, narrow, world_size) == ref.straggler_ratio(batches, lengths, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_rank_reads_the_reference_share(world_size):
    """Each rank's shares through the sampler, over epochs and plans, as the reference splits them."""
    lengths = distributions(300, seed=world_size)["lognormal"]
    ranks = sorted({0, world_size // 2, world_size - 1})
    for strategy, shuffle, pool, noise in (PLANS[0], PLANS[2], PLANS[4], PLANS[6]):
        for max_tokens in (0, 900):
            kw = dict(batch_size=max(8, world_size // 4), max_tokens=max_tokens, strategy=strategy, pool=pool,
                      padding_noise=noise, seed=5, shuffle=shuffle)
            for epoch in (0, 1):
                plan = ref.global_batches(lengths, epoch=epoch, **kw)
                samplers = [BucketBatchSampler(lengths, rank=r, num_replicas=world_size, **kw) for r in ranks]
                for s in samplers:
                    s.set_epoch(epoch)
                    assert len(s) == len(plan) == s.steps_per_epoch(epoch)
                    assert_same_batches(s.batches(), plan, dtype_too=False)
                got = [list(s) for s in samplers]
                for k, batch in enumerate(plan):
                    shares = ref.split_shares(batch, lengths, world_size)
                    for r, steps in zip(ranks, got):
                        share = steps[k]
                        expected = shares[r] if len(shares[r]) else batch[:1]
                        assert share.indices.tolist() == expected.tolist()
                        assert share.real == (len(shares[r]) > 0)
                        assert share.global_count == len(batch) and share.global_tokens == int(lengths[batch].sum())
                        assert (share.epoch, share.position) == (epoch, k)


def test_steps_per_epoch_of_other_epochs_without_a_plan():
    """Without a token budget the count needs no draw; with one, it is the plan's length."""
    lengths = distributions(1000, seed=1)["uniform"]
    for max_tokens in (0, 700):
        for strategy in ("random", "bucket"):
            kw = dict(batch_size=48, max_tokens=max_tokens, strategy=strategy, pool=3, seed=2)
            sampler = BucketBatchSampler(lengths, num_replicas=4, rank=1, **kw)
            for epoch in range(3):
                assert sampler.steps_per_epoch(epoch) == len(ref.global_batches(lengths, epoch=epoch, **kw))


def test_products_past_int32_are_exact_with_narrow_lengths():
    """count x length past 2**31 (int32 lengths) and past 127 (int8): every product in int64."""
    lengths = np.full(70_000, 40_000, dtype=np.int64)
    narrow = compact_lengths(lengths)
    assert narrow.dtype == np.int32
    batch = np.arange(70_000)
    assert padded_cost(batch, narrow) == 70_000 * 40_000
    sizes, padded = share_costs([batch], narrow, 3)
    assert sizes[0].tolist() == [23_334, 23_334, 23_332]  # equal lengths: the equal-count split
    assert padded[0].tolist() == [s * 40_000 for s in sizes[0].tolist()]
    plan = global_batches(narrow, batch_size=70_000, max_tokens=2**40, strategy="bucket", seed=1)
    assert [len(b) for b in plan] == [70_000]
    small = compact_lengths(np.full(500, 100))
    assert small.dtype == np.int8
    kw = dict(batch_size=64, max_tokens=3_000, strategy="random", seed=2)
    assert_same_batches(global_batches(small, **kw), ref.global_batches(np.full(500, 100), **kw))


def test_shared_lengths_map_one_file_that_the_sampler_keeps(tmp_path):
    lengths = distributions(1000, seed=3)["lognormal"]
    path = tmp_path / "lengths.npy"
    first = shared_lengths(lengths, path)
    again = shared_lengths(lengths, path)  # a second rank: maps the file as it is
    assert is_memory_mapped(first) and is_memory_mapped(again) and first.dtype == np.int16
    np.testing.assert_array_equal(again, lengths)
    sampler = BucketBatchSampler(again, 32, num_replicas=2, rank=1, seed=4)
    assert is_memory_mapped(sampler.lengths)  # kept mapped, not copied
    assert_same_batches(sampler.batches(), ref.global_batches(lengths, batch_size=32, strategy="bucket", seed=4),
                        dtype_too=False)
    other = lengths[::-1].copy()
    np.testing.assert_array_equal(shared_lengths(other, path), other)  # other lengths: the file is rewritten
    assert not list(tmp_path.glob(".*.tmp"))
