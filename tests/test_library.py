"""The public pieces without a process group: the sampler in a DataLoader (every index once per
epoch over the ranks, equal steps, resume from its state_dict, torch-style argument checks), the
collate over user items, 0 vs 2 DataLoader workers, and what ``import ddp_seq`` exports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ddp_seq
from ddp_seq import IGNORE_INDEX, BucketBatchSampler, ShareDataset, build_loader, collate
from ddp_seq.data.sampler import global_batches


class Items(Dataset):
    """A user's Dataset: ``(sequence, target)`` items of mixed kinds, no ``lengths`` attribute."""

    def __init__(self, n: int, kind: str = "features", seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.lengths_seen = 0
        self.data = []
        for _ in range(n):
            t = int(rng.integers(1, 30))
            if kind == "features":
                self.data.append((torch.from_numpy(rng.normal(size=(t, 3)).astype(np.float32)), int(rng.integers(4))))
            elif kind == "tokens":
                self.data.append((rng.integers(1, 50, size=t), rng.integers(0, 3, size=t)))
            else:
                self.data.append((rng.normal(size=(t, 2)), float(rng.normal())))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def rank_batches(dataset, world_size: int, epoch: int = 0, **kw) -> list[list]:
    """Every rank's batches of one epoch through a plain DataLoader."""
    out = []
    for rank in range(world_size):
        sampler = BucketBatchSampler(dataset, 8, num_replicas=world_size, rank=rank, seed=1, **kw)
        sampler.set_epoch(epoch)
        out.append(list(DataLoader(ShareDataset(dataset), batch_sampler=sampler, collate_fn=collate)))
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["bucket", "random"])
def test_sampler_in_a_dataloader_covers_every_index_once_with_equal_steps(world_size, strategy):
    data = Items(53)
    for epoch in (0, 1):
        per_rank = rank_batches(data, world_size, epoch, strategy=strategy, pool=2)
        assert len({len(batches) for batches in per_rank}) == 1  # equal steps: no DDP hang
        seen = [int(i) for batches in per_rank for b in batches if b.weights[0] > 0 for i in b.indices]
        assert sorted(seen) == list(range(len(data)))
        lengths = np.array([len(x) for x, _ in data.data])
        for step, batches in enumerate(zip(*per_rank)):
            plan = global_batches(lengths, batch_size=8, strategy=strategy, pool=2, seed=1, epoch=epoch)[step]
            assert {b.global_count for b in batches} == {len(plan)}
            assert {b.global_tokens for b in batches} == {int(lengths[plan].sum())}
            assert {b.position for b in batches} == {step}
            for b in batches:  # the batch's items are the dataset's, padded
                for row, index in enumerate(b.indices.tolist()):
                    x = data[index][0]
                    assert torch.equal(b.inputs[row, :len(x)], x) and b.lengths[row] == len(x)


def test_sampler_state_dict_resumes_mid_epoch_and_refuses_another_plan():
    data = Items(40)
    sampler = BucketBatchSampler(data, 4, num_replicas=2, rank=1, seed=7)
    sampler.set_epoch(2)
    whole = [list(s) for s in sampler]
    sampler.set_epoch(2)
    it = iter(sampler)
    first = [list(next(it)) for _ in range(3)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 3 and state["version"] == 1
    fresh = BucketBatchSampler(data, 4, num_replicas=2, rank=1, seed=7)
    fresh.load_state_dict(state)
    assert first + [list(s) for s in fresh] == whole
    # A loader with workers fetches ahead of the loop: the loop says what it trained.
    sampler.set_epoch(2)
    loader = build_loader(data, sampler, num_workers=1, prefetch_factor=4)
    batches = iter(loader)
    trained = [next(batches) for _ in range(2)]
    assert sampler.state_dict()["position"] > 2  # the sampler ran ahead
    state = sampler.state_dict(position=trained[-1].position + 1)
    fresh.load_state_dict(state)
    assert [b.indices.tolist() for b in trained] + [list(s) for s in fresh] == whole
    other = BucketBatchSampler(data, 8, num_replicas=2, rank=1, seed=7)
    with pytest.raises(ValueError, match="batch_size 4 -> 8"):
        other.load_state_dict(state)
    # Another world size reads the same plan: the position is in global batches.
    BucketBatchSampler(data, 4, num_replicas=3, rank=0, seed=7).load_state_dict(state)


@pytest.mark.parametrize("kwargs, words", [
    (dict(batch_size=0), "batch_size should be an integer >= 1"),
    (dict(batch_size=True), "batch_size should be an integer"),
    (dict(batch_size=2.5), "batch_size should be an integer"),
    (dict(batch_size=4, num_replicas=2, rank=2), r"Invalid rank 2, rank should be in the interval \[0, 1\]"),
    (dict(batch_size=4, num_replicas=2, rank=-1), "Invalid rank -1"),
    (dict(batch_size=4, num_replicas=0, rank=0), "num_replicas should be an integer >= 1"),
    (dict(batch_size=4, max_tokens=-1), "max_tokens should be an integer >= 0"),
    (dict(batch_size=4, strategy="sorted"), "strategy should be 'bucket' or 'random'"),
    (dict(batch_size=4, padding_noise=2.0), r"padding_noise should be in \[0, 1\]"),
    (dict(batch_size=4, shuffle="yes"), "shuffle should be a boolean"),
])
def test_sampler_checks_its_arguments_at_construction(kwargs, words):
    kwargs.setdefault("num_replicas", 1)
    kwargs.setdefault("rank", 0)
    with pytest.raises(ValueError, match=words):
        BucketBatchSampler([3, 1, 2], **kwargs)


def test_sampler_lengths_from_array_attribute_or_one_pass():
    data = Items(9)
    lengths = [len(x) for x, _ in data.data]
    by_pass = BucketBatchSampler(data, 4, num_replicas=1, rank=0).lengths
    assert by_pass.tolist() == lengths
    assert BucketBatchSampler(np.array(lengths), 4, num_replicas=1, rank=0).lengths.tolist() == lengths
    assert BucketBatchSampler(torch.tensor(lengths), 4, num_replicas=1, rank=0).lengths.tolist() == lengths
    data.lengths = np.array(lengths) + 1  # an attribute wins over the pass (it saves reading every item)
    assert BucketBatchSampler(data, 4, num_replicas=1, rank=0).lengths.tolist() == [n + 1 for n in lengths]
    with pytest.raises(ValueError, match="sample 1 has length 0"):
        BucketBatchSampler([3, 0, 2], 4, num_replicas=1, rank=0)


def test_sampler_defaults_to_one_process_without_a_process_group(monkeypatch):
    sampler = BucketBatchSampler([3, 1, 2, 5], 2)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    # Under torchrun before init_process_group, "one process" would silently give every rank the
    # whole global batch: refused instead.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="no process group is initialised yet"):
        BucketBatchSampler([3, 1, 2, 5], 2)
    assert BucketBatchSampler([3, 1, 2, 5], 2, num_replicas=2, rank=1).rank == 1


def test_collate_pads_user_items_of_every_kind():
    tokens = Items(5, "tokens")
    batch = collate([tokens[i] for i in range(5)])
    assert batch.inputs.dtype == torch.int64 and batch.inputs.shape == (5, int(batch.lengths.max()))
    assert batch.targets.shape == batch.inputs.shape and batch.targets.dtype == torch.int64
    for row in range(5):
        n = int(batch.lengths[row])
        assert batch.targets[row, n:].eq(IGNORE_INDEX).all() and batch.mask[row].sum() == n
        assert torch.equal(batch.targets[row, :n], torch.as_tensor(tokens[row][1]))
    values = Items(4, "values")
    batch = collate([values[i] for i in range(4)])
    assert batch.inputs.dtype == torch.float32 and batch.targets.dtype == torch.float32
    assert batch.targets.tolist() == pytest.approx([values[i][1] for i in range(4)])
    # A plain list is one process's whole global batch.
    assert batch.global_count == 4 and batch.global_tokens == int(batch.lengths.sum()) and batch.position == -1
    with pytest.raises(ValueError, match="item 1 has a per-step target of shape"):
        collate([(np.ones(3, dtype=np.int64), np.zeros(3)), (np.ones(2, dtype=np.int64), np.zeros(3))])
    with pytest.raises(ValueError, match="item 0 has no steps"):
        collate([(np.ones((0, 2)), 1)])


def test_two_workers_give_the_same_batches_as_none():
    data = Items(61)
    sampler = BucketBatchSampler(data, 8, num_replicas=2, rank=1, seed=3)
    inline_loader, worker_loader = build_loader(data, sampler), build_loader(data, sampler, num_workers=2)
    for epoch in (0, 1):  # persistent workers see each epoch's set_epoch (the sampler runs here)
        sampler.set_epoch(epoch)
        inline = list(inline_loader)
        sampler.set_epoch(epoch)
        workers = list(worker_loader)
        assert len(inline) == len(workers)
        for a, b in zip(inline, workers):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
            assert torch.equal(a.indices, b.indices) and (a.global_count, a.position) == (b.global_count, b.position)


def test_import_ddp_seq_exports_the_public_api_without_loading_torch():
    # The 21 public names (unchanged by moving the modules into layer folders) and cross_validate.
    assert ddp_seq.__all__ == sorted([
        "BucketBatchSampler", "Share", "Batch", "IGNORE_INDEX", "ShareDataset", "collate", "collate_dp",
        "build_loader", "PackedLSTM", "PackedGRU", "SeqModel", "Objective", "TaskObjective", "LossFunction",
        "Trainer", "evaluate", "Config", "load_config", "DistInfo", "distributed", "UserError", "cross_validate"])
    for name in ddp_seq.__all__:
        assert getattr(ddp_seq, name) is not None
    code = "import sys, ddp_seq; assert 'torch' not in sys.modules; print(len(ddp_seq.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(ddp_seq.__all__)
