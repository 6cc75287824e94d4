"""The global batch plan of an epoch and its split across ranks.

The design, after fairseq: the list of *global* batches of an epoch is a function of
``(seed, epoch)`` alone -- never of the world size. Each global batch is then split into one
share per rank, contiguous in length order so that each share pads little and the shares cost
(near) the same number of padded tokens. Every rank therefore runs exactly as many steps as
there are global batches, and a step's gradient (sum over the global batch / global count) is
the same whatever the world size.

Pure NumPy (the sampler is a torch ``Sampler``): tested without any process group.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from ddp_seq.data.cuts import Plan, narrow_dtype, plan_epoch, share_bounds, sort_batch


def global_batches(lengths: np.ndarray, *, batch_size: int, max_tokens: int = 0, strategy: str = "random",
                   pool: int = 50, padding_noise: float = 0.0, seed: int = 0, epoch: int = 0,
                   shuffle: bool = True) -> list[np.ndarray]:
    """The epoch's global batches (int64 arrays of sample indices); every index appears exactly once.

    ``random``: shuffle, cut. ``bucket``: shuffle, sort by length inside pools of ``pool`` batches
    (by ``length * U(1 - padding_noise, 1 + padding_noise)``, as AllenNLP does, so that batches mix
    neighbouring lengths), cut, then shuffle the batches so that lengths do not come in order.
    ``shuffle=False`` (evaluation) sorts everything by length for the least padding. A batch ends
    before ``batch_size`` sequences or, when ``max_tokens`` > 0, before its count x longest passes
    ``max_tokens``; a sequence longer than the budget still gets a batch of its own.
    ``lengths`` ``[N]``: any integer dtype. Vectorised (:mod:`ddp_seq.data.cuts`); the same batches as
    the original per-sequence loop (``tests/sampler_reference.py``).
    """
    plan = plan_epoch(np.asarray(lengths), batch_size=batch_size, max_tokens=max_tokens, strategy=strategy,
                      pool=pool, padding_noise=padding_noise, seed=seed, epoch=epoch, shuffle=shuffle)
    plan.order = plan.finish().order.astype(np.int64, copy=False)
    return plan.batches()


def split_shares(batch: np.ndarray, lengths: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Split one global batch into ``world_size`` shares of (near) equal padded-token cost.

    The batch is ordered longest first and cut into contiguous segments, which minimises padding
    inside each share. The largest segment cost is minimised by binary search over the cap with a
    greedy fill (optimal for contiguous segments); if that yields fewer segments than ranks, the
    costliest ones are halved. Shares may be empty only when the batch has fewer sequences than ranks.
    Returns ``world_size`` arrays of ``batch``'s dtype (see :func:`~ddp_seq.data.cuts.share_bounds`).
    """
    order, sorted_len = sort_batch(np.asarray(batch), lengths)
    bounds = share_bounds(sorted_len, world_size).tolist()
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def padded_cost(share: np.ndarray, lengths: np.ndarray) -> int:
    """Padded tokens of a share: its size times its longest sequence (int64 arithmetic)."""
    return len(share) * int(lengths[share].max()) if len(share) else 0


def share_costs(batches: list[np.ndarray], lengths: np.ndarray, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's share of every batch, as figures: ``(sizes, padded)``, both ``[len(batches),
    world_size]`` int64 -- sequences and padded tokens (size x longest) of rank ``r``'s share of
    batch ``k``. The same shares as :func:`split_shares`, without building them (one call per epoch
    where a rank only needs its own: ``ddp-seq plan``, the bench, the straggler ratio)."""
    sizes = np.zeros((len(batches), world_size), dtype=np.int64)
    padded = np.zeros_like(sizes)
    for k, batch in enumerate(batches):
        _, sorted_len = sort_batch(np.asarray(batch), lengths)
        bounds = share_bounds(sorted_len, world_size)
        sizes[k] = np.diff(bounds)
        first = np.minimum(bounds[:-1], max(len(sorted_len) - 1, 0))
        padded[k] = sizes[k] * (sorted_len[first] if len(sorted_len) else 0)
    return sizes, padded


def straggler_ratio(batches: list[np.ndarray], lengths: np.ndarray, world_size: int) -> float:
    """How long ranks wait on the slowest, if time is proportional to padded tokens:
    ``sum over steps of max_r cost / sum over steps of mean_r cost`` (1.0 = perfectly balanced)."""
    _, padded = share_costs(batches, lengths, world_size)
    slowest = mean = 0.0
    # Summed step by step in Python floats, as the original did: the same float to the last bit.
    for top, total in zip(padded.max(axis=1, initial=0).tolist(), padded.sum(axis=1).tolist()):
        slowest += top
        mean += total / world_size
    return slowest / mean if mean else 1.0


class Share(list):
    """This rank's part of one global batch: a ``list`` of sample indices, as a batch sampler yields,
    plus what the loss needs to know about the whole global batch.

    A share is never empty: a rank whose share of a small global batch is empty gets the batch's
    first sample with ``real=False`` and runs a zero-weighted step, so it still joins every
    collective. It pickles with its attributes, so it reaches DataLoader workers whole.

    Attributes:
        real: False for such a filler share (its loss and metrics weigh 0).
        global_count: sequences in the whole global batch, over all ranks.
        global_tokens: real time steps in the whole global batch.
        epoch: the epoch whose plan it comes from.
        position: the global batch's index in that epoch's plan (0-based).
    """

    def __init__(self, indices, real: bool = True, global_count: int = 0, global_tokens: int = 0,
                 epoch: int = 0, position: int = 0) -> None:
        super().__init__(indices.tolist() if isinstance(indices, np.ndarray) else (int(i) for i in indices))
        self.real, self.global_count, self.global_tokens = real, global_count, global_tokens
        self.epoch, self.position = epoch, position

    @property
    def indices(self) -> np.ndarray:
        """The sample indices as an int64 array."""
        return np.asarray(self, dtype=np.int64)

    def __repr__(self) -> str:
        return (f"Share({list(self)}, real={self.real}, global_count={self.global_count}, "
                f"global_tokens={self.global_tokens}, epoch={self.epoch}, position={self.position})")


def _check_int(name: str, value, minimum: int) -> int:
    """torch's BatchSampler style: a plain int (not a bool) of at least ``minimum``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} should be an integer >= {minimum}, but got {name}={value!r}")
    return int(value)


def _checked_lengths(source) -> np.ndarray:
    """The lengths ``[N]`` of a lengths array or a Dataset, checked, in their own integer dtype (a
    memory-mapped array stays mapped)."""
    array_like = getattr(source, "ndim", None) == 1 and hasattr(source, "__array__")  # ndarray, tensor
    numbers = isinstance(source, (list, tuple)) and all(isinstance(x, (int, np.integer)) for x in source)
    if array_like or numbers:
        lengths = np.asarray(source)
    elif hasattr(source, "lengths"):
        lengths = np.asarray(source.lengths)
    else:
        lengths = np.fromiter((len(source[i][0]) for i in range(len(source))), dtype=np.int64, count=len(source))
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError(f"lengths should be a non-empty 1-D sequence, got shape {lengths.shape}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError(f"lengths should be integers, got dtype {lengths.dtype}")
    if lengths.min() < 1:
        i = int(np.argmin(lengths))
        raise ValueError(f"sample {i} has length {int(lengths[i])}: every sequence needs at least one step "
                         "(pack_padded_sequence rejects empty ones)")
    return lengths


def lengths_of(source) -> np.ndarray:
    """Sequence lengths ``[N]`` int64 of a lengths array or of a Dataset: its ``lengths`` attribute if
    it has one, else ``len(dataset[i][0])`` for every item (one pass over the data)."""
    return _checked_lengths(source).astype(np.int64, copy=False)


def compact_lengths(source) -> np.ndarray:
    """The lengths ``[N]`` of :func:`lengths_of` in the narrowest signed integer dtype that holds the
    longest (int8 up to 127 steps, int16 up to 32,767, ...): 1-2 bytes a sequence instead of 8. An
    array already that narrow (e.g. memory-mapped with ``np.load(path, mmap_mode="r")``, which the
    ranks of a node then share through the page cache) is kept as it is, not copied.
    Products and sums of these must be taken in int64 (``int(...)`` or ``.astype(np.int64)``)."""
    lengths = _checked_lengths(source)
    narrow = narrow_dtype(int(lengths.max()))
    return lengths if lengths.dtype.itemsize <= narrow.itemsize else lengths.astype(narrow)


def shared_lengths(source, path: str | os.PathLike) -> np.ndarray:
    """:func:`compact_lengths` of ``source``, memory-mapped read-only from the ``.npy`` file ``path``,
    written first when it is missing or holds other lengths. Every rank of a node that passes the same
    path (e.g. under ``/dev/shm`` or next to the data) maps one file, which the page cache holds once
    for all of them; pass the result to :class:`BucketBatchSampler`, which keeps it mapped.
    The file is written under a temporary name and renamed, so ranks writing at once leave one whole
    file. Raises OSError where ``path`` cannot be written."""
    lengths, path = compact_lengths(source), Path(path)
    try:
        mapped = np.load(path, mmap_mode="r")
        if mapped.dtype == lengths.dtype and np.array_equal(mapped, lengths):
            return mapped
    except (OSError, ValueError):  # missing, truncated or not an .npy: write it
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, lengths)
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar lengths, sharded over the ranks of a DDP job: a batch sampler for
    ``DataLoader(dataset, batch_sampler=...)`` that gives every rank the same number of batches.

    Each epoch's list of *global* batches is a function of ``(seed, epoch)`` alone (see
    :func:`global_batches`), never of the world size; each global batch is split into
    ``num_replicas`` shares of near-equal padded-token cost (:func:`split_shares`) and this rank
    yields its :class:`Share` of each. So ``len()`` -- the steps of an epoch -- is equal on every
    rank (no DDP hang from uneven batch counts), and a step's gradient is the same whatever the
    world size when the loss is divided by ``Share.global_count``. After fairseq's
    ``batch_by_size`` + ``EpochBatchIterator`` and AllenNLP's bucket sampler; the argument names
    are ``DistributedSampler``'s.

    Args:
        data_source: a lengths array ``[N]`` (ints >= 1), or a Dataset whose items are
            ``(sequence, target)``: its ``lengths`` attribute is used if it has one, else one pass
            over the items.
        batch_size: sequences per *global* batch (over all ranks).
        max_tokens: when > 0, also at most this many padded tokens (count x longest) per global batch.
        num_replicas: ranks; default the process group's world size (1 without one; an error under
            torchrun before the group is initialised).
        rank: this rank; default the process group's rank (0 without one).
        shuffle: True: batches drawn from ``(seed, epoch)``; False: sorted by length (evaluation).
        seed: the seed of the batch order; must be the same on every rank.
        strategy: ``bucket`` (sort by length within pools of ``pool`` batches) or ``random``.
        pool: batches per sorting pool (``bucket``).
        padding_noise: sort by ``length * U(1 - noise, 1 + noise)`` (``bucket``), in [0, 1].

    Raises:
        ValueError: an argument out of range (checked here, as torch's samplers do), or a
            sequence of length 0.
    """

    def __init__(self, data_source, batch_size: int, *, max_tokens: int = 0, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0, strategy: str = "bucket",
                 pool: int = 50, padding_noise: float = 0.0) -> None:
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            grouped = dist.is_available() and dist.is_initialized()
            if not grouped and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                # Under torchrun but before init_process_group: defaulting to one process would give
                # every rank the whole global batch (and a loss W times too large), silently.
                raise ValueError("BucketBatchSampler: WORLD_SIZE > 1 but no process group is initialised yet; "
                                 "call torch.distributed.init_process_group first, or pass num_replicas and rank")
            num_replicas = (dist.get_world_size() if grouped else 1) if num_replicas is None else num_replicas
            rank = (dist.get_rank() if grouped else 0) if rank is None else rank
        num_replicas = _check_int("num_replicas", num_replicas, 1)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank {rank!r}, rank should be in the interval [0, {num_replicas - 1}]")
        if strategy not in ("bucket", "random"):
            raise ValueError(f"strategy should be 'bucket' or 'random', but got strategy={strategy!r}")
        if not 0.0 <= float(padding_noise) <= 1.0:
            raise ValueError(f"padding_noise should be in [0, 1], but got padding_noise={padding_noise!r}")
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle should be a boolean value, but got shuffle={shuffle!r}")
        self.lengths = compact_lengths(data_source)  # narrow: a length's bytes times N per rank
        self.num_replicas, self.rank = num_replicas, int(rank)
        self.options = dict(batch_size=_check_int("batch_size", batch_size, 1),
                            max_tokens=_check_int("max_tokens", max_tokens, 0), strategy=strategy,
                            pool=_check_int("pool", pool, 1), padding_noise=float(padding_noise),
                            seed=int(seed), shuffle=shuffle)
        self.epoch = 0
        self._start = 0  # where the next __iter__ begins (load_state_dict sets it)
        self._yielded = 0  # global batches of this epoch handed out so far
        self._cache: tuple[int, Plan] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next ``__iter__`` yields (as ``DistributedSampler.set_epoch``)."""
        if epoch != self.epoch:
            self._start = self._yielded = 0
        self.epoch = epoch

    def plan(self) -> Plan:
        """This epoch's plan of global batches (the same on every rank), computed once per epoch;
        global batch ``k`` is ``plan().batch(k)`` (:class:`~ddp_seq.data.cuts.Plan`)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, plan_epoch(self.lengths, epoch=self.epoch, **self.options))
        return self._cache[1]

    def batches(self) -> list[np.ndarray]:
        """This epoch's global batches (the same on every rank): the arrays of :func:`global_batches`,
        as int32 views of the plan (int64 from 2**31 samples)."""
        return self.plan().batches()

    def __len__(self) -> int:
        """Global batches of the epoch set by :meth:`set_epoch` = steps per rank (the same on every rank).

        It can vary from epoch to epoch: with ``max_tokens > 0`` and ``strategy="random"`` (or any
        strategy, when a pool's lengths vary) each epoch's batches are cut by the token budget from
        another order, e.g. 119, 119, 118, 120 for 1,000 sequences. For an LR schedule use
        :meth:`steps_per_epoch` or :meth:`total_steps`, which plan each epoch.
        """
        return len(self.plan())

    def steps_per_epoch(self, epoch: int) -> int:
        """Global batches of ``epoch`` (= steps per rank), without changing the epoch this sampler is set to."""
        if epoch == self.epoch:
            return len(self.plan())
        if not self.options["max_tokens"]:  # batch_size-long batches (pools hold whole batches): no draw needed
            return -(-len(self.lengths) // self.options["batch_size"])
        return len(plan_epoch(self.lengths, epoch=int(epoch), **self.options))

    def total_steps(self, epochs: int, grad_accum: int = 1) -> int:
        """Optimizer steps of epochs ``0 .. epochs - 1`` with ``grad_accum`` global batches per step
        (a last, shorter group of an epoch is a step): what an LR schedule's total should be."""
        accum = _check_int("grad_accum", grad_accum, 1)
        return sum(-(-self.steps_per_epoch(epoch) // accum) for epoch in range(_check_int("epochs", epochs, 0)))

    def share(self, position: int) -> Share:
        """This rank's share of global batch ``position`` of the epoch: only this rank's bounds are
        read, from one sort of the batch (none for a bucket batch) and the greedy fill's search."""
        plan = self.plan()
        if not -len(plan) <= position < len(plan):
            raise IndexError(f"position {position} is outside the epoch's {len(plan)} global batches")
        batch = plan.batch(position % len(plan))
        order, sorted_len = sort_batch(batch, self.lengths)
        bounds = share_bounds(sorted_len, self.num_replicas)
        share = order[int(bounds[self.rank]):int(bounds[self.rank + 1])]
        real = len(share) > 0
        return Share(share if real else batch[:1], real, len(batch), int(sorted_len.sum()), self.epoch, position)

    def __iter__(self) -> Iterator[Share]:
        start, self._start = self._start, 0
        for position in range(start, len(self)):
            self._yielded = position + 1
            yield self.share(position)

    def state_dict(self, position: int | None = None) -> dict:
        """Where the epoch stands: ``{"version", "epoch", "position", "plan"}``.

        ``position``: the global batches of this epoch already trained -- pass ``batch.position + 1``
        of the last batch your loop trained. The default counts the batches this sampler has
        yielded, which is the same only without prefetching: a DataLoader with workers fetches
        ``num_workers * prefetch_factor`` batches ahead, and a resume from that count would skip them.
        """
        done = max(self._yielded, self._start) if position is None else int(position)
        return {"version": 1, "epoch": self.epoch, "position": done, "plan": self.plan_key()}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next ``__iter__`` starts at ``state["position"]`` of epoch ``state["epoch"]``.

        Raises ValueError if the state comes from a sampler whose plan differs (another batch
        size, token budget, strategy, seed or data): its position would index other batches.
        """
        if state.get("version") != 1:
            raise ValueError(f"unknown sampler state version {state.get('version')!r}")
        if "plan" in state and state["plan"] != self.plan_key():
            changed = [f"{k} {state['plan'].get(k)!r} -> {v!r}" for k, v in self.plan_key().items()
                       if state["plan"].get(k) != v]
            raise ValueError("the saved position indexes another plan of batches: " + ", ".join(changed))
        self.set_epoch(int(state["epoch"]))
        self._start = self._yielded = int(state["position"])

    def plan_key(self) -> dict:
        """What the plan of batches depends on besides the epoch (world size and rank do not count)."""
        return {**{k: v for k, v in self.options.items() if k != "shuffle"}, "num_samples": len(self.lengths),
                "total_length": int(self.lengths.sum())}
