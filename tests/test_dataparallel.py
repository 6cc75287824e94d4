"""Why a PackedSequence cannot go through nn.DataParallel, and why padded tensor + lengths tensor can.

DataParallel's scatter (``torch/nn/parallel/scatter_gather.py``) walks its arguments: a tensor is
cut into chunks along dim 0 (``Scatter.apply`` -> ``torch.cuda.comm.scatter`` -> ``tensor.chunk``,
one chunk per device), a namedtuple such as ``PackedSequence`` is rebuilt from its fields scattered
one by one, anything else is copied to every replica. Its gather concatenates the replicas' outputs
along dim 0. On CPU, ``Scatter.apply`` refuses to run (it copies to GPUs), so these tests call
torch's real ``scatter`` and ``gather`` with only the device copy replaced by what it does to the
data: ``tensor.chunk(n, 0)`` and ``torch.cat(outputs, 0)``. The ``gpu`` tests run the real
``nn.DataParallel``.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from helpers import ragged
from torch import nn
from torch.nn.parallel import scatter_gather
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ddp_seq.data.collate import collate_dp, fetch
from ddp_seq.data.sampler import Share
from ddp_seq.nn.seq_model import SeqModel

TWO_GPUS = [0, 1]  # the device list DataParallel would scatter to; the stand-in only counts it


class _ChunkScatter:
    """``Scatter.apply`` without the copy to GPUs: ``comm.scatter`` cuts with ``tensor.chunk`` (no chunk sizes)."""

    @staticmethod
    def apply(target_gpus, chunk_sizes, dim, tensor):
        assert chunk_sizes is None  # DataParallel passes none
        return tensor.chunk(len(target_gpus), dim)


class _CatGather:
    """``Gather.apply`` without the copy to the output device: a concatenation along ``dim``."""

    @staticmethod
    def apply(target_device, dim, *outputs):
        return torch.cat(outputs, dim)


@pytest.fixture
def cpu_scatter(monkeypatch):
    """torch's own scatter/gather traversal, on CPU tensors."""
    monkeypatch.setattr(scatter_gather, "Scatter", _ChunkScatter)
    monkeypatch.setattr(scatter_gather, "Gather", _CatGather)
    return scatter_gather


def packed_batch(lengths: list[int], features: int = 3, seed: int = 0) -> tuple[torch.Tensor, PackedSequence]:
    torch.manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), features)
    return x, pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False)


def test_scatter_splits_every_field_of_a_packed_sequence(cpu_scatter):
    _, packed = packed_batch([6, 4, 3, 1])
    # batch_sizes counts sequences per TIME STEP: 4 sequences at step 0, 3 at steps 1-2, ...
    assert packed.batch_sizes.tolist() == [4, 3, 3, 2, 1, 1] and packed.data.shape[0] == 14
    pieces = cpu_scatter.scatter((packed,), TWO_GPUS)
    assert len(pieces) == 2
    (first,), (second,) = pieces
    assert isinstance(first, PackedSequence) and isinstance(second, PackedSequence)
    # Every field was cut in half along dim 0, independently of the others:
    assert first.batch_sizes.tolist() == [4, 3, 3] and second.batch_sizes.tolist() == [2, 1, 1]  # time steps!
    assert first.data.shape[0] == second.data.shape[0] == 7  # rows of the interleaved data
    assert first.sorted_indices.tolist() == [0, 1] and second.sorted_indices.tolist() == [2, 3]
    # ... so no piece describes its data: the batch sizes of piece 0 add up to 10 rows, its data has 7;
    # piece 1 claims 2 sequences over 3 steps for 7 rows (it got time steps 3-5 of the batch), and its
    # sorted_indices [2, 3] point past the 2 sequences it claims.
    for piece in (first, second):
        assert int(piece.batch_sizes.sum()) != piece.data.shape[0]
    assert int(second.sorted_indices.max()) >= int(second.batch_sizes[0])
    lstm = nn.LSTM(3, 5, batch_first=True)
    for piece in (first, second):
        with pytest.raises(RuntimeError):
            lstm(piece)


def test_equal_lengths_pass_silently_and_compute_garbage(cpu_scatter):
    """When the cut happens to fit, the LSTM runs without a complaint -- on the wrong problem."""
    x, packed = packed_batch([2, 2, 2, 2])
    torch.manual_seed(1)
    lstm = nn.LSTM(3, 5, batch_first=True)
    right, (h_right, _) = lstm(packed)
    pieces = cpu_scatter.scatter((packed,), TWO_GPUS)
    outputs = [lstm(piece) for (piece,) in pieces]
    for out, (h, _) in outputs:
        assert out.batch_sizes.tolist() == [4]  # each replica saw 4 sequences of ONE step
        assert h.shape[1] == 2  # and returns final states for 2 sequences of the 4
    gathered = torch.cat([out.data for out, _ in outputs])
    assert gathered.shape == right.data.shape  # the shapes line up ...
    # ... but replica 1 ran step 1 of every sequence from a zero state: no recurrence at all.
    no_memory, _ = lstm(x[:, 1:2])
    assert torch.allclose(outputs[1][0].data, no_memory[:, 0], atol=1e-6)
    assert not torch.allclose(gathered, right.data, atol=1e-3)


LENGTHS = [5, 17, 2, 9, 11, 1, 14, 6, 3]


@pytest.mark.parametrize("task", ["classify", "tag"])
@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("cell,bidirectional", [("lstm", False), ("gru", True), ("lstm", True)])
@pytest.mark.parametrize("devices", [2, 3])
def test_padded_tensor_and_lengths_split_reproduce_one_device(cpu_scatter, task, execution, cell, bidirectional,
                                                              devices):
    data = ragged(LENGTHS, 4, per_step=task == "tag")
    batch = collate_dp(fetch(data, Share(np.arange(len(LENGTHS)), True, len(LENGTHS), sum(LENGTHS))))
    assert batch.lengths.tolist() == sorted(LENGTHS, reverse=True)  # longest first, as the workaround does
    torch.manual_seed(0)
    model = SeqModel(task, 4, 3, cell=cell, hidden=8, layers=2, bidirectional=bidirectional, embedding_dim=6,
                     execution=execution)
    one = model(batch.inputs, batch.model_lengths)
    grads_one = torch.autograd.grad(one.square().sum(), list(model.parameters()))

    pieces = cpu_scatter.scatter((batch.inputs, batch.model_lengths), list(range(devices)))
    assert [len(lengths) for _, lengths in pieces] == [len(c) for c in batch.model_lengths.chunk(devices)]
    for inputs, lengths in pieces:  # the lengths travel with their rows
        assert inputs.shape[1] == batch.inputs.shape[1]
        assert (inputs[torch.arange(len(lengths)), lengths - 1] != 0).all()
    outputs = [model(inputs, lengths) for inputs, lengths in pieces]
    if task == "tag":  # unpacked to the whole batch's T, whatever the chunk's longest
        assert {o.shape[1] for o in outputs} == {batch.inputs.shape[1]}
    gathered = cpu_scatter.gather(outputs, 0)
    assert torch.allclose(gathered, one, atol=1e-6)
    grads = torch.autograd.grad(gathered.square().sum(), list(model.parameters()))
    assert relative_diff(grads, grads_one) <= 1e-6


def relative_diff(grads, reference) -> float:
    """Largest entry-wise difference, relative to the largest reference gradient entry."""
    scale = max(float(g.abs().max()) for g in reference)
    return max(float((a - b).abs().max()) for a, b in zip(grads, reference)) / scale


def test_without_total_length_tag_outputs_cannot_be_gathered(cpu_scatter):
    """What ``total_length`` is for: each replica would unpack to its own longest sequence."""
    torch.manual_seed(0)
    rnn = nn.GRU(3, 4, batch_first=True)
    lengths = torch.tensor(sorted(LENGTHS, reverse=True))
    x = torch.randn(len(lengths), int(lengths.max()), 3)

    def replica(inputs, chunk_lengths, total_length):
        out, _ = rnn(pack_padded_sequence(inputs, chunk_lengths, batch_first=True, enforce_sorted=False))
        return pad_packed_sequence(out, batch_first=True, total_length=total_length)[0]

    pieces = cpu_scatter.scatter((x, lengths), TWO_GPUS)
    short = [replica(inputs, chunk_lengths, None) for inputs, chunk_lengths in pieces]
    assert short[0].shape[1] == 17 and short[1].shape[1] == 5
    with pytest.raises(RuntimeError):
        cpu_scatter.gather(short, 0)
    full = [replica(inputs, chunk_lengths, x.shape[1]) for inputs, chunk_lengths in pieces]
    assert cpu_scatter.gather(full, 0).shape == (len(lengths), x.shape[1], 4)


def test_replicas_sharing_the_backward_templates_run_safely_in_threads():
    """DataParallel's replicas share PackedLSTM's (non-module) templates of the padded bidirectional
    path and run in threads; functional_call swaps weights into them, so without the lock in
    ``rnn._one_direction`` a replica can run with another replica's weights (observed: ~1 in 20)."""
    torch.manual_seed(0)
    cfg = dict(cell="lstm", hidden=16, layers=2, bidirectional=True, embedding_dim=8)
    a = SeqModel("tag", 4, 3, **cfg, execution="padded")
    torch.manual_seed(1)
    b = SeqModel("tag", 4, 3, **cfg, execution="padded")
    b.rnn._templates = a.rnn._templates  # what replicate() does: replicas share the module's plain attributes
    x, lengths = torch.randn(4, 12, 4), torch.tensor([12, 9, 5, 2])
    with torch.no_grad():
        expected = {id(a): a(x, lengths), id(b): b(x, lengths)}
    wrong = []

    def run(model: SeqModel) -> None:
        with torch.no_grad():
            for _ in range(150):
                if not torch.equal(model(x, lengths), expected[id(model)]):
                    wrong.append(1)

    threads = [threading.Thread(target=run, args=(m,)) for m in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 300 forward passes used the other replica's weights"


# -- the real nn.DataParallel -------------------------------------------------------------------

def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
def test_real_scatter_cuts_like_tensor_chunk():
    """The stand-in above is faithful: the real scatter's chunks are ``tensor.chunk``'s."""
    devices = list(range(_gpus()))
    x = torch.arange(11 * 2).reshape(11, 2)
    pieces = scatter_gather.scatter((x,), devices)
    assert [p[0].cpu().tolist() for p in pieces] == [c.tolist() for c in x.chunk(len(devices))]


@pytest.mark.gpu
def test_real_dataparallel_refuses_or_corrupts_a_packed_sequence():
    if _gpus() < 2:
        pytest.skip("DataParallel splits a batch only over 2 or more GPUs")
    _, packed = packed_batch([6, 4, 3, 1, 5, 2, 2, 1])
    lstm = nn.DataParallel(nn.LSTM(3, 5, batch_first=True).cuda())
    with pytest.raises(RuntimeError):
        lstm(packed.to("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["classify", "tag"])
@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_real_dataparallel_with_padded_tensor_and_lengths_matches_one_device(task, execution, bidirectional):
    data = ragged(LENGTHS, 4, per_step=task == "tag")
    batch = collate_dp(fetch(data, Share(np.arange(len(LENGTHS)), True, len(LENGTHS), sum(LENGTHS)))).to(
        torch.device("cuda", 0))
    torch.manual_seed(0)
    model = SeqModel(task, 4, 3, hidden=8, layers=2, bidirectional=bidirectional, embedding_dim=6,
                     execution=execution).cuda()
    one = model(batch.inputs, batch.model_lengths)
    grads_one = torch.autograd.grad(one.square().sum(), list(model.parameters()))
    parallel = nn.DataParallel(model)
    out = parallel(batch.inputs, batch.model_lengths)
    assert out.shape == one.shape and torch.allclose(out, one, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert relative_diff(grads, grads_one) <= 1e-5
