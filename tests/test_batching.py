"""The epoch's global batch plan and its split into per-rank shares: pure NumPy, no process group."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ddp_seq.data.sampler import BucketBatchSampler, Share, global_batches, padded_cost, split_shares, straggler_ratio


def skewed_lengths(n: int, seed: int = 0, median: float = 12.0, sigma: float = 1.0, top: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(median), sigma, size=n)), 1, top).astype(np.int64)


def reference_random_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The slow obvious definition of ``random`` without a token budget: permute, cut in order."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def brute_force_best_max_cost(lengths: np.ndarray, world_size: int) -> int:
    """The least possible largest share cost over ALL partitions of the length-sorted batch into
    ``world_size`` contiguous (possibly empty) segments; cost = size x longest."""
    ordered = np.sort(lengths)[::-1]
    n, best = len(ordered), None
    for cuts in itertools.combinations_with_replacement(range(n + 1), world_size - 1):
        bounds = (0, *cuts, n)
        worst = max((b - a) * int(ordered[a]) if b > a else 0 for a, b in zip(bounds[:-1], bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


# -- global batches ------------------------------------------------------------------------------

PLANS = [
    pytest.param(dict(strategy="random", max_tokens=0), id="random"),
    pytest.param(dict(strategy="random", max_tokens=120), id="random-tokens"),
    pytest.param(dict(strategy="bucket", max_tokens=0, pool=3), id="bucket"),
    pytest.param(dict(strategy="bucket", max_tokens=120, pool=3), id="bucket-tokens"),
    pytest.param(dict(shuffle=False, max_tokens=0), id="eval"),
    pytest.param(dict(shuffle=False, max_tokens=120), id="eval-tokens"),
]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("n", [1, 2, 7, 64, 257])
@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_every_index_exactly_once_per_epoch(plan, n, batch_size):
    lengths = skewed_lengths(n, seed=n)
    for epoch in range(3):
        batches = global_batches(lengths, batch_size=batch_size, seed=7, epoch=epoch, **plan)
        assert all(len(b) > 0 for b in batches)
        everything = np.concatenate(batches)
        assert everything.dtype.kind == "i"
        np.testing.assert_array_equal(np.sort(everything), np.arange(n))


@pytest.mark.parametrize("plan", PLANS)
def test_batch_size_and_token_budget_are_respected(plan):
    lengths = skewed_lengths(500, seed=3, sigma=1.2, top=400)  # some sequences alone exceed the budget
    batch_size = 16
    batches = global_batches(lengths, batch_size=batch_size, seed=1, epoch=0, **plan)
    budget = plan["max_tokens"]
    oversized = 0
    for b in batches:
        assert 1 <= len(b) <= batch_size
        if budget:
            cost = len(b) * int(lengths[b].max())
            if len(b) == 1:
                oversized += cost > budget
            else:
                assert cost <= budget, (b, lengths[b])
    if budget:
        assert oversized > 0, "precondition: some sequences are longer than the budget"
        assert any(len(b) > 1 for b in batches)


@pytest.mark.parametrize("n,batch_size", [(1, 4), (10, 3), (64, 16), (100, 7), (257, 32)])
@pytest.mark.parametrize("seed,epoch", [(0, 0), (0, 3), (1234, 1)])
def test_random_matches_obvious_reference(n, batch_size, seed, epoch):
    lengths = skewed_lengths(n, seed=n)
    got = global_batches(lengths, batch_size=batch_size, max_tokens=0, strategy="random", seed=seed, epoch=epoch)
    want = reference_random_batches(n, batch_size, seed, epoch)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("plan", PLANS[:4])
def test_same_seed_and_epoch_same_batches_other_epochs_and_seeds_differ(plan):
    lengths = skewed_lengths(300, seed=5)

    def plan_of(seed: int, epoch: int) -> list[list[int]]:
        return [b.tolist() for b in global_batches(lengths, batch_size=16, seed=seed, epoch=epoch, **plan)]

    assert plan_of(3, 2) == plan_of(3, 2)
    assert plan_of(3, 2) != plan_of(3, 1)
    assert plan_of(3, 2) != plan_of(4, 2)


def test_bucket_pads_less_than_random_and_is_not_in_length_order():
    lengths = skewed_lengths(2000, seed=11, sigma=1.0)

    def padded(batches):
        return sum(len(b) * int(lengths[b].max()) for b in batches)

    rand = global_batches(lengths, batch_size=32, strategy="random", seed=0, epoch=0)
    bucket = global_batches(lengths, batch_size=32, strategy="bucket", pool=10, seed=0, epoch=0)
    assert padded(bucket) < 0.8 * padded(rand)
    longest = [int(lengths[b].max()) for b in bucket]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_eval_plan_is_length_sorted_and_independent_of_seed():
    lengths = skewed_lengths(101, seed=2)
    a = global_batches(lengths, batch_size=20, shuffle=False, seed=0, epoch=0)
    b = global_batches(lengths, batch_size=20, shuffle=False, seed=9, epoch=4)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    flat = lengths[np.concatenate(a)]
    assert np.all(np.diff(flat) <= 0)
    assert [len(x) for x in a] == [20] * 5 + [1]


# -- shares ------------------------------------------------------------------------------------

def _check_shares(batch: np.ndarray, lengths: np.ndarray, world_size: int) -> list[np.ndarray]:
    shares = split_shares(batch, lengths, world_size)
    assert len(shares) == world_size
    joined = np.concatenate(shares)
    assert len(joined) == len(batch), "shares overlap or lose samples"
    np.testing.assert_array_equal(np.sort(joined), np.sort(batch))
    if len(batch) >= world_size:
        assert all(len(s) > 0 for s in shares), "an empty share although every rank could get a sample"
    else:
        assert sum(len(s) > 0 for s in shares) == len(batch)
    # contiguous in length order: every sample of a share is at least as long as any of the next ones
    nonempty = [s for s in shares if len(s)]
    for a, b in zip(nonempty[:-1], nonempty[1:]):
        assert lengths[a].min() >= lengths[b].max()
    return shares


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_split_shares_partition_small_batches(world_size):
    rng = np.random.default_rng(world_size)
    for n in range(1, 3 * world_size + 1):
        for trial in range(5):
            lengths = skewed_lengths(n + 5, seed=100 * n + trial, sigma=1.3)
            batch = rng.permutation(n + 5)[:n]
            _check_shares(batch, lengths, world_size)
    # all the same length, and one huge sequence among short ones
    _check_shares(np.arange(9), np.full(9, 4), world_size)
    _check_shares(np.arange(9), np.array([200] + [1] * 8), world_size)


def test_split_shares_max_cost_equals_brute_force_optimum():
    rng = np.random.default_rng(2024)
    checked = 0
    for trial in range(600):
        n = int(rng.integers(1, 11))
        world_size = int(rng.integers(1, 5))
        if trial % 3 == 0:  # many ties
            lengths = rng.integers(1, 4, size=n + 4).astype(np.int64)
        else:
            lengths = skewed_lengths(n + 4, seed=trial, sigma=1.2, top=80)
        batch = rng.permutation(n + 4)[:n]
        shares = _check_shares(batch, lengths, world_size)
        got = max(padded_cost(s, lengths) for s in shares)
        assert got == brute_force_best_max_cost(lengths[batch], world_size), (lengths[batch], world_size, shares)
        checked += 1
    assert checked == 600


def test_padded_cost_and_straggler_ratio():
    lengths = np.array([5, 3, 8, 1])
    assert padded_cost(np.array([0, 1]), lengths) == 10
    assert padded_cost(np.array([], dtype=np.int64), lengths) == 0
    batches = global_batches(skewed_lengths(200, seed=1), batch_size=16, seed=0, epoch=0)
    lens = skewed_lengths(200, seed=1)
    assert straggler_ratio(batches, lens, 1) == pytest.approx(1.0)
    assert straggler_ratio(batches, lens, 3) >= 1.0


# -- the sampler over ranks ------------------------------------------------------------------

def _all_ranks(lengths: np.ndarray, world_size: int, **kw) -> list[list[Share]]:
    samplers = [BucketBatchSampler(lengths, rank=r, num_replicas=world_size, **kw) for r in range(world_size)]
    return [list(s) for s in samplers]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", ["random", "bucket"])
@pytest.mark.parametrize("max_tokens", [0, 40])
def test_every_rank_same_number_of_steps_and_filler_steps(world_size, strategy, max_tokens):
    for n in range(1, 3 * world_size + 1):
        lengths = skewed_lengths(n, seed=n, sigma=1.5, top=60)
        for batch_size in (1, 2, 3, 5):
            kw = dict(batch_size=batch_size, max_tokens=max_tokens, strategy=strategy, pool=2, seed=3)
            per_rank = _all_ranks(lengths, world_size, **kw)
            plan = global_batches(lengths, epoch=0, **kw)
            assert [len(steps) for steps in per_rank] == [len(plan)] * world_size
            for k, batch in enumerate(plan):
                steps = [per_rank[r][k] for r in range(world_size)]
                real = [s for s in steps if s.real]
                assert len(real) == min(len(batch), world_size)
                np.testing.assert_array_equal(np.sort(np.concatenate([s.indices for s in real])), np.sort(batch))
                for s in steps:
                    assert s.global_count == len(batch)
                    assert s.global_tokens == int(lengths[batch].sum())
                    assert len(s.indices) > 0
                    if not s.real:  # filler: one sample of the batch, weighted 0 by collate
                        assert len(s.indices) == 1 and int(s.indices[0]) in set(batch.tolist())


def test_batch_smaller_than_world_gives_filler_steps():
    lengths = np.array([7, 3, 9])
    per_rank = _all_ranks(lengths, 4, batch_size=2, strategy="random", seed=0)
    # 3 samples, batches of 2 then 1: the second batch leaves three ranks with a filler step
    assert [len(s) for s in per_rank] == [2, 2, 2, 2]
    assert [per_rank[r][0].real for r in range(4)] == [True, True, False, False]
    assert [per_rank[r][1].real for r in range(4)] == [True, False, False, False]


def test_sampler_epochs_cache_and_iter_from():
    lengths = skewed_lengths(100, seed=4)
    s = BucketBatchSampler(lengths, rank=1, num_replicas=2, batch_size=8, strategy="bucket", pool=2, seed=5)
    s.set_epoch(0)
    e0 = [x.indices.tolist() for x in s]
    s.set_epoch(1)
    e1 = [x.indices.tolist() for x in s]
    assert e0 != e1
    s.set_epoch(0)
    assert [x.indices.tolist() for x in s] == e0
    s.load_state_dict({"version": 1, "epoch": 0, "position": 3})
    assert [x.indices.tolist() for x in s] == e0[3:]
    assert [x.indices.tolist() for x in s] == e0  # a resume position serves one iteration only
    assert len(s) == len(global_batches(lengths, batch_size=8, strategy="bucket", pool=2, seed=5, epoch=0))


def test_steps_per_epoch_and_total_steps_plan_each_epoch_without_moving_the_sampler():
    """``len()`` varies between epochs under a token budget; an LR schedule needs every epoch's count."""
    lengths = np.random.default_rng(3).integers(1, 120, size=1000)
    sampler = BucketBatchSampler(lengths, 64, max_tokens=2000, strategy="random", num_replicas=2, rank=1)
    sampler.set_epoch(2)
    counts = [sampler.steps_per_epoch(epoch) for epoch in range(5)]
    assert sampler.epoch == 2 and len(sampler) == counts[2]  # asking about other epochs moves nothing
    for epoch in range(5):
        sampler.set_epoch(epoch)
        assert len(sampler) == counts[epoch] == len(list(sampler))
    assert len(set(counts)) > 1, counts  # the case the docstring warns about
    assert sampler.total_steps(5) == sum(counts)
    assert sampler.total_steps(5, grad_accum=3) == sum(-(-c // 3) for c in counts)
    assert sampler.total_steps(0) == 0
    with pytest.raises(ValueError, match="grad_accum"):
        sampler.total_steps(5, grad_accum=0)
