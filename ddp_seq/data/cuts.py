"""The vectorised kernels behind :mod:`ddp_seq.data.sampler`: an epoch's plan of global batches and
the split of one global batch into per-rank shares, computed without a Python step per sequence.

Both reproduce the original per-sequence loops bit for bit (``tests/sampler_reference.py`` keeps
them; ``tests/test_sampler_reference.py`` compares over a grid): checkpoints store positions in the
plan, so any other batch or share at a position would resume on other data. What makes them fast:

- Cutting: a batch that starts at ``s`` ends at the first ``k`` where ``k > batch_size`` or
  ``k x max(lengths of its k first)`` passes ``max_tokens``. Without a token budget that is every
  ``batch_size``; in a length-descending pool the longest is the first, so the end is
  ``s + min(batch_size, max_tokens // length[s])`` -- one array operation per batch *for all pools
  at once* (the pools are cut independently). Only an unsorted order under a token budget needs the
  running maximum, over a window no wider than the batch can be.
- Splitting: the greedy fill that the binary search over the cap evaluates jumps over runs of equal
  lengths (``ceil(run / size)`` segments at once) and stops past ``world_size`` segments, so it
  costs at most ``min(runs, ranks)`` steps; the search starts from the bounds any answer must lie
  in (``total / ranks`` and the equal-count split), which leaves the same least cap.

After fairseq's ``batch_by_size_vec`` (a compiled loop over every sequence with the lengths as an
array): here the loop runs over batches and runs, not sequences.

Every product of a count and a length is taken in int64 (lengths may be int8/int16 arrays).
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np


def narrow_dtype(longest: int) -> np.dtype:
    """The narrowest signed integer dtype that holds ``longest`` (int8, int16, int32 or int64). Signed,
    so that ``-lengths`` (a descending sort key) cannot wrap around."""
    for dtype in (np.int8, np.int16, np.int32):
        if longest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def index_dtype(n: int) -> np.dtype:
    """int32 for the indices of fewer than 2**31 samples, else int64: half the memory of a plan."""
    return np.dtype(np.int32 if n < 2**31 else np.int64)


def descending(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(-keys, kind="stable")``: longest first, ties in their order (any stable sort of the
    same key order gives the same permutation; NumPy radix-sorts 8- and 16-bit keys)."""
    if keys.dtype.kind == "f":
        return np.argsort(-keys, kind="stable")
    return np.argsort(-keys.astype(narrow_dtype(int(keys.max(initial=0))), copy=False), kind="stable")


@dataclass
class Plan:
    """An epoch's global batches without a Python object per batch.

    Global batch ``k`` is ``order[bounds[b]:bounds[b + 1]]`` with ``b = batch_order[k]`` (or ``b = k``
    when ``batch_order`` is None). With ``pool_size`` > 0 the pools of ``order`` are sorted by
    ``keys`` (longest first) when a batch in them is first read: a bucket plan without a token budget
    knows its cuts before any sort, so the first batch waits for one pool's sort, not all of them.
    """

    order: np.ndarray  # [N] sample indices (int32 below 2**31 samples) in cut order
    bounds: np.ndarray  # [num_batches + 1] int64 cut points into ``order``
    batch_order: np.ndarray | None  # [num_batches] int64: the shuffled order of the batches, or None
    pool_size: int = 0  # > 0: pools still to sort on first use
    keys: np.ndarray | None = None  # [N] what the pools sort by (the lengths)
    pending: np.ndarray | None = None  # [num_pools] bool: not sorted yet

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def _sort_pools(self, first: int, last: int) -> None:
        """Sort the pools ``first .. last`` (inclusive) that are not sorted yet."""
        for p in np.flatnonzero(self.pending[first:last + 1]).tolist():
            chunk = self.order[(first + p) * self.pool_size:(first + p + 1) * self.pool_size]
            chunk[:] = chunk[descending(self.keys[chunk])]
        self.pending[first:last + 1] = False

    def finish(self) -> Plan:
        """Sort every pool still pending; ``order`` is then final."""
        if self.pool_size:
            self._sort_pools(0, len(self.pending) - 1)
        return self

    def batch(self, position: int) -> np.ndarray:
        """Global batch ``position`` (a view of ``order``)."""
        b = int(self.batch_order[position]) if self.batch_order is not None else int(position)
        a, z = int(self.bounds[b]), int(self.bounds[b + 1])
        if self.pool_size:  # a batch never spans pools
            self._sort_pools(a // self.pool_size, a // self.pool_size)
        return self.order[a:z]

    def batches(self) -> list[np.ndarray]:
        """Every global batch, in plan order (views of ``order``)."""
        self.finish()
        cuts = self.bounds.tolist()
        ids = range(len(self)) if self.batch_order is None else self.batch_order.tolist()
        return [self.order[cuts[b]:cuts[b + 1]] for b in ids]

    def sizes(self) -> np.ndarray:
        """``[num_batches]`` int64 sequences per global batch, in plan order."""
        sizes = np.diff(self.bounds)
        return sizes if self.batch_order is None else sizes[self.batch_order]


def even_bounds(n: int, pool_starts: np.ndarray, batch_size: int) -> np.ndarray:
    """Cut points without a token budget: ``batch_size``-long batches from each pool's start (the last
    of a pool may be shorter), whatever the lengths."""
    ends = np.append(pool_starts[1:], n).astype(np.int64)
    per_pool = -(-(ends - pool_starts) // batch_size)
    first = np.repeat(pool_starts, per_pool)
    step = np.arange(len(first), dtype=np.int64) - np.repeat(np.cumsum(per_pool) - per_pool, per_pool)
    return np.append(first + step * batch_size, n)


def cut_bounds(lengths: np.ndarray, order: np.ndarray, pool_starts: np.ndarray, batch_size: int, max_tokens: int,
               pools_sorted: bool) -> np.ndarray:
    """Cut points ``[num_batches + 1]`` (int64) into ``order``, cut inside each pool ``[pool_starts[i],
    pool_starts[i + 1])`` (``pool_starts`` starts with 0, without the end).

    ``pools_sorted``: each pool is length-descending, so a batch's longest is its first."""
    n = len(order)
    if not max_tokens:
        return even_bounds(n, pool_starts, batch_size)
    lens = lengths[order]
    ends = np.append(pool_starts[1:], n).astype(np.int64)
    if pools_sorted:
        # A batch's longest is its first: it holds min(batch_size, max_tokens // length[s]) (>= 1).
        room = np.maximum(np.minimum(max_tokens // lens.astype(np.int64), batch_size), 1)
        starts: list[np.ndarray] = []
        open_ = pool_starts < ends
        pos, end = pool_starts[open_].astype(np.int64), ends[open_]
        while len(pos):  # one round per batch of the fullest pool; every open pool moves on at once
            starts.append(pos)
            pos = np.minimum(pos + room[pos], end)
            open_ = pos < end
            pos, end = pos[open_], end[open_]
        cuts = np.sort(np.concatenate(starts)) if starts else np.zeros(0, np.int64)
        return np.append(cuts, n)
    return np.array([*_cut_unsorted(lens, pool_starts.tolist(), ends.tolist(), batch_size, max_tokens), n],
                    dtype=np.int64)


def _cut_unsorted(lens: np.ndarray, pool_starts: list[int], ends: list[int], batch_size: int,
                  max_tokens: int) -> list[int]:
    """Batch starts of an unsorted order under a token budget: per batch, the running maximum over a
    window no wider than the batch can be (``max_tokens // first length``); count x maximum is
    non-decreasing, so the batch's size is where it first passes ``max_tokens`` (>= 1)."""
    counts = np.arange(1, batch_size + 1, dtype=np.int64)
    starts: list[int] = []
    for s, end in zip(pool_starts, ends):
        while s < end:
            starts.append(s)
            room = min(batch_size, end - s, max(max_tokens // int(lens[s]), 1))
            longest = np.maximum.accumulate(lens[s:s + room])
            s += max(int(np.searchsorted(counts[:room] * longest, max_tokens, side="right")), 1)
    return starts


def plan_epoch(lengths: np.ndarray, *, batch_size: int, max_tokens: int = 0, strategy: str = "random",
               pool: int = 50, padding_noise: float = 0.0, seed: int = 0, epoch: int = 0,
               shuffle: bool = True) -> Plan:
    """The epoch's :class:`Plan`; :func:`ddp_seq.data.sampler.global_batches` documents the arguments.
    The random draws are the original's, in its order: the permutation, the noise, the batch order."""
    n = len(lengths)
    if not shuffle:
        order = descending(lengths).astype(index_dtype(n), copy=False)
        return Plan(order, cut_bounds(lengths, order, np.zeros(1, np.int64), batch_size, max_tokens, True), None)
    rng = np.random.default_rng([seed, epoch])
    # rng.permutation(n) is arange(n) shuffled in place: the same draws shuffle a narrower arange.
    order = np.arange(n, dtype=index_dtype(n))
    rng.shuffle(order)
    if strategy == "random":
        return Plan(order, cut_bounds(lengths, order, np.zeros(1, np.int64), batch_size, max_tokens, False), None)
    pool_size = batch_size * pool
    pool_starts = np.arange(0, n, pool_size, dtype=np.int64) if n else np.zeros(1, np.int64)
    if not max_tokens and not padding_noise:
        # Cuts every batch_size whatever the pools' order: sort each pool when it is first read.
        bounds = even_bounds(n, pool_starts, batch_size)
        return Plan(order, bounds, rng.permutation(len(bounds) - 1), pool_size, lengths,
                    np.ones(len(pool_starts) if n else 0, dtype=bool))
    sort_key = lengths * rng.uniform(1 - padding_noise, 1 + padding_noise, size=n) if padding_noise else lengths
    for start in range(0, n, pool_size):
        chunk = order[start:start + pool_size]
        chunk[:] = chunk[descending(sort_key[chunk])]
    bounds = cut_bounds(lengths, order, pool_starts, batch_size, max_tokens, not padding_noise)
    return Plan(order, bounds, rng.permutation(len(bounds) - 1))


def sort_batch(batch: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, sorted_lengths)``: the batch longest first, ties in batch order (a bucket batch
    already is: then no sort), and its lengths in int64."""
    lens = lengths[batch]
    if len(lens) > 1 and not bool(np.all(lens[:-1] >= lens[1:])):
        perm = descending(lens)
        batch, lens = batch[perm], lens[perm]
    return batch, lens.astype(np.int64)


class _Runs:
    """A length-descending batch as runs of equal length, for the greedy fill."""

    def __init__(self, sorted_len: np.ndarray):
        change = np.flatnonzero(sorted_len[1:] != sorted_len[:-1]) + 1
        self.n = len(sorted_len)
        self.ends = [*change.tolist(), self.n]  # run r is [ends[r - 1], ends[r])
        self.values = sorted_len[np.append(0, change)].tolist()

    def greedy(self, cap: int, limit: int, starts: list[int] | None = None) -> int:
        """Segments of the greedy fill under ``cap`` (a segment from ``s`` holds ``max(1, cap //
        length[s])``), counted up to ``limit + 1``; their starts appended to ``starts`` if given."""
        count, s, r = 0, 0, 0
        while s < self.n:
            r = bisect_right(self.ends, s, r)
            size = max(1, cap // self.values[r])
            k = -(-(self.ends[r] - s) // size)  # segments that start inside this run
            if starts is not None:
                starts.extend(range(s, s + k * size, size))
            count += k
            if count > limit:
                return count
            s += k * size
        return count


def share_bounds(sorted_len: np.ndarray, world_size: int) -> np.ndarray:
    """``[world_size + 1]`` int64 bounds of the shares in a length-descending batch (``sorted_len``,
    int64): share ``r`` is ``[bounds[r], bounds[r + 1])``; empty shares at the end.

    The least cap whose greedy fill needs at most ``world_size`` segments, then, while there are
    fewer segments than ranks, the costliest (the first of equals) halved."""
    n = len(sorted_len)
    if world_size == 1 or n == 0:
        return np.array([0] + [n] * world_size, dtype=np.int64)
    runs, top = _Runs(sorted_len), int(sorted_len[0])
    # Any cap the fill meets with <= world_size segments is >= the mean cost per rank and >= the
    # longest; the equal-count split meets it at top x ceil(n / ranks). The least one is in between.
    lo = max(top, -(-int(sorted_len.sum()) // world_size))
    hi = min(top * n, top * -(-n // world_size))
    while lo < hi:
        mid = (lo + hi) // 2
        if runs.greedy(mid, world_size) <= world_size:
            hi = mid
        else:
            lo = mid + 1
    starts: list[int] = []
    runs.greedy(lo, world_size, starts)
    if len(starts) < world_size:
        starts = _halve(starts, sorted_len, world_size)
    bounds = np.full(world_size + 1, n, dtype=np.int64)
    bounds[:len(starts)] = starts
    return bounds


def _halve(starts: list[int], sorted_len: np.ndarray, world_size: int) -> list[int]:
    """Split the costliest segment (size x first length; the first of equals) in halves until there
    are ``world_size`` segments or only single sequences: a heap ordered by (-cost, start) picks the
    same one as the reference's argmax over the segments in order."""
    ends = [*starts[1:], len(sorted_len)]
    heap = [(-((b - a) * int(sorted_len[a])) if b - a > 1 else 1, a, b) for a, b in zip(starts, ends)]
    heapq.heapify(heap)
    count = len(heap)
    while count < world_size and heap[0][0] < 0:
        _, a, b = heapq.heappop(heap)
        mid = a + (b - a) // 2
        for x, y in ((a, mid), (mid, b)):
            heapq.heappush(heap, (-((y - x) * int(sorted_len[x])) if y - x > 1 else 1, x, y))
        count += 1
    return sorted(a for _, a, _ in heap)
