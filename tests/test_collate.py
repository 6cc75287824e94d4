"""collate(): one rank's padded batch, and Batch.to() leaving the lengths on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddp_seq.config import DataConfig
from ddp_seq.data.collate import IGNORE_INDEX, collate, fetch
from ddp_seq.data.readers.synthetic import SequenceData, make_synthetic
from ddp_seq.data.sampler import Share


def ragged(lengths, features: int | None, per_step: bool, seed: int = 0) -> SequenceData:
    """Sequences with values that are never 0 (so padding is recognisable) and per-sequence or per-step targets."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(lengths.sum())
    if features is None:  # token ids 1..9
        values = rng.integers(1, 10, size=total).astype(np.int64)
    else:
        values = (rng.random((total, features)) + 0.5).astype(np.float32)
    targets = rng.integers(0, 2, size=total if per_step else len(lengths)).astype(np.int64)
    return SequenceData(values, offsets, targets, per_step)


def rows_of(data: SequenceData, i: int):
    s, e = data.offsets[i], data.offsets[i + 1]
    return data.values[s:e], data.targets[s:e] if data.per_step else data.targets[i]


@pytest.mark.parametrize("features", [3, None], ids=["features", "token-ids"])
@pytest.mark.parametrize("per_step", [False, True], ids=["per-sequence", "per-step"])
def test_collate_pads_masks_and_keeps_indices(features, per_step):
    data = ragged([4, 1, 7, 2, 5, 3], features, per_step)
    indices = np.array([3, 0, 2, 5])
    step = Share(indices, True, global_count=9, global_tokens=40)
    batch = collate(fetch(data, step))
    longest = int(data.lengths[indices].max())
    assert longest == 7

    assert batch.lengths.dtype == torch.int64 and batch.lengths.dim() == 1 and batch.lengths.device.type == "cpu"
    assert batch.lengths.tolist() == data.lengths[indices].tolist()
    assert batch.indices.dtype == torch.int64 and batch.indices.tolist() == indices.tolist()
    expected_shape = (4, longest) if features is None else (4, longest, features)
    assert tuple(batch.inputs.shape) == expected_shape
    assert batch.inputs.dtype == (torch.int64 if features is None else torch.float32)
    assert batch.mask.dtype == torch.bool and tuple(batch.mask.shape) == (4, longest)
    assert batch.weights.dtype == torch.float32 and batch.weights.tolist() == [1.0] * 4
    assert (batch.global_count, batch.global_tokens) == (9, 40)

    for row, idx in enumerate(indices):
        length = int(data.lengths[idx])
        values, targets = rows_of(data, idx)
        np.testing.assert_array_equal(batch.inputs[row, :length].numpy(), values)
        assert torch.all(batch.inputs[row, length:] == 0), "padding past the length must be 0"
        assert batch.mask[row].tolist() == [True] * length + [False] * (longest - length)
        if per_step:
            assert tuple(batch.targets.shape) == (4, longest)
            assert batch.targets[row, :length].tolist() == targets.tolist()
            assert torch.all(batch.targets[row, length:] == IGNORE_INDEX)
        else:
            assert tuple(batch.targets.shape) == (4,)
            assert int(batch.targets[row]) == int(targets)
    assert batch.real_tokens == int(data.lengths[indices].sum())
    assert batch.padded_tokens == 4 * longest


def test_filler_step_weighs_zero():
    data = ragged([4, 1, 7], 2, per_step=True)
    batch = collate(fetch(data, Share(np.array([2]), False, global_count=1, global_tokens=7)))
    assert batch.weights.tolist() == [0.0]
    assert batch.real_tokens == 0
    assert batch.indices.tolist() == [2]
    assert (batch.global_count, batch.global_tokens) == (1, 7)


def test_pad_value_is_used_for_padding():
    data = ragged([2, 5], 2, per_step=False)
    batch = collate(fetch(data, Share(np.array([0, 1]), True, 2, 7)), pad_value=-3.0)
    assert torch.all(batch.inputs[0, 2:] == -3.0)
    assert batch.mask[0].tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("task", ["classify", "regress", "tag"])
def test_collate_synthetic_data(task):
    cfg = DataConfig(task=task, num_train=50, num_val=5, max_length=25)
    data = make_synthetic(cfg, "train")
    indices = np.random.default_rng(0).permutation(50)[:9]
    batch = collate(fetch(data, Share(indices, True, 9, int(data.lengths[indices].sum()))))
    assert batch.mask.sum().item() == batch.real_tokens == int(data.lengths[indices].sum())
    for row, idx in enumerate(indices):
        length = int(data.lengths[idx])
        values, targets = rows_of(data, idx)
        np.testing.assert_array_equal(batch.inputs[row, :length].numpy(), values)
        if task == "tag":
            assert batch.targets[row, :length].tolist() == targets.tolist()
            assert torch.all(batch.targets[row, length:] == IGNORE_INDEX)
        else:
            assert batch.targets[row].item() == pytest.approx(float(targets))


def test_to_moves_the_computed_tensors_but_keeps_lengths_on_cpu():
    # "meta" is a real non-CPU device on every machine: the tensors that move show it.
    data = ragged([3, 6, 2], 2, per_step=True)
    batch = collate(fetch(data, Share(np.array([0, 1, 2]), True, 3, 11)))
    moved = batch.to(torch.device("meta"))
    for name in ("inputs", "targets", "mask", "weights"):
        assert getattr(moved, name).device.type == "meta", name
    assert moved.lengths.device.type == "cpu" and moved.lengths.dtype == torch.int64
    assert moved.lengths.tolist() == [3, 6, 2]
    assert moved.indices.device.type == "cpu"
    assert (moved.global_count, moved.global_tokens) == (3, 11)
    same = batch.to(torch.device("cpu"))
    assert torch.equal(same.inputs, batch.inputs) and torch.equal(same.lengths, batch.lengths)


@pytest.mark.gpu
def test_to_cuda_keeps_lengths_on_cpu():
    data = ragged([3, 6, 2], 2, per_step=False)
    moved = collate(fetch(data, Share(np.array([0, 1, 2]), True, 3, 11))).to(torch.device("cuda"))
    assert moved.inputs.is_cuda and moved.targets.is_cuda and moved.weights.is_cuda
    assert moved.lengths.device.type == "cpu"
