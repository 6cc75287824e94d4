"""The sampler's plan as ddp_seq computed it up to issue 27: per-sequence Python loops, kept
verbatim as the slow reference that ``ddp_seq.data.sampler`` must match bit for bit (checkpoints
point into the plan: a different batch or share at the same position is a bug).

Only the pure functions are here; ``tests/test_sampler_reference.py`` compares them over a grid.
"""

from __future__ import annotations

import numpy as np


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _cut(order: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Cut ``order`` into consecutive batches of at most ``batch_size`` sequences and, when
    ``max_tokens`` > 0, at most ``max_tokens`` padded tokens (count x longest). A sequence longer
    than the token budget still gets a batch of its own: nothing is dropped."""
    batches, start, longest = [], 0, 0
    for pos, idx in enumerate(order):
        n_after = pos - start + 1
        longest_after = max(longest, int(lengths[idx]))
        if n_after > 1 and (n_after > batch_size or (max_tokens and n_after * longest_after > max_tokens)):
            batches.append(order[start:pos])
            start, longest_after = pos, int(lengths[idx])
        longest = longest_after
    if start < len(order):
        batches.append(order[start:])
    return batches


def global_batches(lengths: np.ndarray, *, batch_size: int, max_tokens: int = 0, strategy: str = "random",
                   pool: int = 50, padding_noise: float = 0.0, seed: int = 0, epoch: int = 0,
                   shuffle: bool = True) -> list[np.ndarray]:
    """The epoch's global batches (arrays of sample indices); every index appears exactly once.

    ``random``: shuffle, cut. ``bucket``: shuffle, sort by length inside pools of ``pool`` batches
    (by ``length * U(1 - padding_noise, 1 + padding_noise)``, as AllenNLP does, so that batches mix
    neighbouring lengths), cut, then shuffle the batches so that lengths do not come in order.
    ``shuffle=False`` (evaluation) sorts everything by length for the least padding.
    """
    n = len(lengths)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return _cut(order, lengths, batch_size, max_tokens)
    rng = _epoch_rng(seed, epoch)
    order = rng.permutation(n)
    if strategy == "random":
        return _cut(order, lengths, batch_size, max_tokens)
    pool_size = batch_size * pool
    sort_key = lengths * rng.uniform(1 - padding_noise, 1 + padding_noise, size=n) if padding_noise else lengths
    batches: list[np.ndarray] = []
    for start in range(0, n, pool_size):
        chunk = order[start:start + pool_size]
        chunk = chunk[np.argsort(-sort_key[chunk], kind="stable")]
        batches.extend(_cut(chunk, lengths, batch_size, max_tokens))
    return [batches[i] for i in rng.permutation(len(batches))]


def _segments_within(costs_len: np.ndarray, cap: int) -> list[int]:
    """Greedy cut points of a length-descending array into segments of padded cost <= cap."""
    cuts, start = [], 0
    for pos in range(1, len(costs_len) + 1):
        if pos == len(costs_len) or (pos + 1 - start) * int(costs_len[start]) > cap:
            cuts.append(pos)
            start = pos
    return cuts


def split_shares(batch: np.ndarray, lengths: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Split one global batch into ``world_size`` shares of (near) equal padded-token cost.

    The batch is ordered longest first and cut into contiguous segments, which minimises padding
    inside each share. The largest segment cost is minimised by binary search over the cap with a
    greedy fill (optimal for contiguous segments); if that yields fewer segments than ranks, the
    costliest ones are halved. Shares may be empty only when the batch has fewer sequences than ranks.
    """
    order = batch[np.argsort(-lengths[batch], kind="stable")]
    sorted_len = lengths[order]
    if world_size == 1 or len(order) == 0:
        return [order] + [order[:0]] * (world_size - 1)
    lo, hi = int(sorted_len[0]), int(sorted_len[0]) * len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(_segments_within(sorted_len, mid)) <= world_size:
            hi = mid
        else:
            lo = mid + 1
    bounds = [0] + _segments_within(sorted_len, lo)
    segments = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    while len(segments) < world_size and any(len(s) > 1 for s in segments):
        costs = [len(s) * int(lengths[s[0]]) if len(s) > 1 else -1 for s in segments]
        i = int(np.argmax(costs))
        seg = segments[i]
        segments[i:i + 1] = [seg[: len(seg) // 2], seg[len(seg) // 2:]]
    segments += [order[:0]] * (world_size - len(segments))
    return segments


def padded_cost(share: np.ndarray, lengths: np.ndarray) -> int:
    """Padded tokens of a share: its size times its longest sequence."""
    return int(len(share) * lengths[share].max()) if len(share) else 0


def straggler_ratio(batches: list[np.ndarray], lengths: np.ndarray, world_size: int) -> float:
    """How long ranks wait on the slowest, if time is proportional to padded tokens:
    ``sum over steps of max_r cost / sum over steps of mean_r cost`` (1.0 = perfectly balanced)."""
    slowest = mean = 0.0
    for batch in batches:
        costs = [padded_cost(share, lengths) for share in split_shares(batch, lengths, world_size)]
        slowest += max(costs)
        mean += sum(costs) / world_size
    return slowest / mean if mean else 1.0
