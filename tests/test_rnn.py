"""PackedLSTM / PackedGRU against the slow obvious reference: the plain ``nn.LSTM``/``nn.GRU`` with
the same weights, through ``pack_padded_sequence``/``pad_packed_sequence``, and each sequence run
alone without any padding.

Everything runs in float64: both execution paths do the reference's arithmetic in another order
(the fused kernel's one matrix product over all steps vs. per-step products on shrinking batches),
so they differ from it by rounding only, ~1e-15. ATOL/RTOL leave a margin of 10^5 over that and are
still ~10^8 below the effect of any real fault (a padded step leaking into a valid one, a direction
reversed over the padding, a wrong layer's weights), which moves values by ~1e-2 or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ddp_seq.nn.rnn import PackedGRU, PackedLSTM, resolve_execution
from ddp_seq.nn.seq_model import SeqModel

DTYPE = torch.float64
ATOL, RTOL = 1e-10, 1e-8
FEATURES, HIDDEN = 5, 4
#: Unsorted, with a length-1 sequence; the batch is padded 3 steps past the longest.
LENGTHS = [9, 3, 1, 7, 9, 4]
EXTRA_STEPS = 3

#: (id, reference class, our class, extra constructor arguments)
CELLS = [("lstm", nn.LSTM, PackedLSTM, {}), ("gru", nn.GRU, PackedGRU, {}),
         ("lstm-proj", nn.LSTM, PackedLSTM, {"proj_size": 3})]
EXECUTIONS = ["packed", "padded", "auto"]


def make_pair(cell: str, bidirectional: bool, layers: int, execution: str, dropout: float = 0.0,
              seed: int = 0) -> tuple[nn.RNNBase, nn.RNNBase]:
    """(reference nn.LSTM/nn.GRU, ours), the same weights."""
    _, ref_cls, cls, extra = next(c for c in CELLS if c[0] == cell)
    torch.manual_seed(seed)
    ref = ref_cls(FEATURES, HIDDEN, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                  dropout=dropout, dtype=DTYPE, **extra)
    ours = cls(FEATURES, HIDDEN, num_layers=layers, bidirectional=bidirectional, dropout=dropout, dtype=DTYPE,
               execution=execution, **extra)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_batch(lengths: list[int] = LENGTHS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, F]`` with large junk in the padding, so that any leak of it shows."""
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    T = max(lengths) + EXTRA_STEPS
    x = torch.randn(len(lengths), T, FEATURES, generator=g, dtype=DTYPE)
    junk = torch.arange(T)[None, :] >= lengths_t[:, None]
    x[junk] = 50 * torch.randn(int(junk.sum()), FEATURES, generator=g, dtype=DTYPE)
    return x, lengths_t


def reference(ref: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain module through pack/pad: outputs, and the top layer's final state per direction."""
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, state = ref(packed)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    h_n = state[0] if isinstance(state, tuple) else state
    directions = 2 if ref.bidirectional else 1
    return out, torch.cat(list(h_n[-directions:]), dim=-1)


def alone(ref: nn.RNNBase, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence run by itself, unpadded: no packing involved at all."""
    outs, lasts = torch.zeros_like(reference(ref, x, lengths)[0]), []
    for i, n in enumerate(lengths.tolist()):
        out, _ = ref(x[i:i + 1, :n])
        outs[i, :n] = out[0]
        width = out.shape[-1] // (2 if ref.bidirectional else 1)
        # forward direction: after its last step; backward direction: after reading back to step 0
        lasts.append(torch.cat([out[0, n - 1, :width], out[0, 0, width:]]))
    return outs, torch.stack(lasts)


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=msg or None)


def test_the_two_references_agree():
    """The reference itself: pack/pad and one sequence at a time give the same numbers."""
    for cell, *_ in CELLS:
        for bidirectional in (False, True):
            ref, _ = make_pair(cell, bidirectional, 2, "packed")
            x, lengths = make_batch()
            with torch.no_grad():
                for a, b in zip(reference(ref, x, lengths), alone(ref, x, lengths)):
                    close(a, b)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", [c[0] for c in CELLS])
def test_outputs_last_states_and_gradients_equal_the_reference(cell, bidirectional, layers, execution):
    ref, ours = make_pair(cell, bidirectional, layers, execution)
    x, lengths = make_batch()
    g = torch.Generator().manual_seed(2)
    results = []
    for module in (ref, ours):
        inputs = x.clone().requires_grad_(True)
        out, last = reference(module, inputs, lengths) if module is ref else module(inputs, lengths)
        # random weights on every output, so that each element's gradient counts
        w_out = torch.randn(out.shape, generator=g.manual_seed(3), dtype=DTYPE)
        w_last = torch.randn(last.shape, generator=g.manual_seed(4), dtype=DTYPE)
        ((out * w_out).sum() + (last * w_last).sum()).backward()
        grads = {name: p.grad for name, p in module.named_parameters()}
        results.append((out.detach(), last.detach(), inputs.grad, grads))
    (ref_out, ref_last, ref_dx, ref_grads), (out, last, dx, grads) = results
    directions = 2 if bidirectional else 1
    width = directions * (ours.proj_size or HIDDEN)
    assert out.shape == (len(LENGTHS), max(LENGTHS) + EXTRA_STEPS, width) and out.dtype == DTYPE
    assert last.shape == (len(LENGTHS), width)
    close(out, ref_out, "output")
    close(last, ref_last, "last")
    close(dx, ref_dx, "input gradient")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        close(grads[name], ref_grads[name], name)


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_padded_steps_are_zeros_and_never_read(cell, bidirectional, execution):
    _, ours = make_pair(cell, bidirectional, 2, execution)
    x, lengths = make_batch()
    other_junk, _ = make_batch(seed=7)
    valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]
    other_junk[valid] = x[valid]  # the same sequences, other padding
    with torch.no_grad():
        out, last = ours(x, lengths)
        out2, last2 = ours(other_junk, lengths)
    assert torch.count_nonzero(out[~valid]) == 0
    assert torch.count_nonzero(out[valid]) == out[valid].numel()
    assert torch.equal(out, out2) and torch.equal(last, last2)


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_dropout_between_layers_as_in_nn_lstm(bidirectional, execution):
    """dropout=1 zeroes the second layer's input in training, so the output is the second layer run
    on zeros (the reference: a 1-layer LSTM with layer 2's weights); in eval dropout is off."""
    ref, ours = make_pair("lstm", bidirectional, 2, execution, dropout=1.0)
    x, lengths = make_batch()
    with torch.no_grad():
        close(ours.eval()(x, lengths)[0], reference(ref.eval(), x, lengths)[0], "eval")
        second = nn.LSTM(2 * HIDDEN if bidirectional else HIDDEN, HIDDEN, batch_first=True,
                         bidirectional=bidirectional, dtype=DTYPE)
        second.load_state_dict({k.replace("_l1", "_l0"): v for k, v in ref.state_dict().items() if "_l1" in k})
        zeros = torch.zeros(x.shape[0], x.shape[1], second.input_size, dtype=DTYPE)
        out, last = ours.train()(x, lengths)
        expected_out, expected_last = reference(second, zeros, lengths)
        close(out, expected_out, "train output")
        close(last, expected_last, "train last")


def test_state_dicts_are_interchangeable_with_torch_modules():
    for ref_cls, cls, extra in ((nn.LSTM, PackedLSTM, {}), (nn.GRU, PackedGRU, {}),
                                (nn.LSTM, PackedLSTM, {"proj_size": 2})):
        ref = ref_cls(FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True, **extra)
        ours = cls(FEATURES, HIDDEN, num_layers=2, bidirectional=True, **extra)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert "weight_hh_l1_reverse" in ours.state_dict()
        ours.load_state_dict(ref.state_dict(), strict=True)
        back = ref_cls(FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True, **extra)
        back.load_state_dict(ours.state_dict(), strict=True)
        for name, tensor in ref.state_dict().items():
            assert torch.equal(back.state_dict()[name], tensor), name
        assert isinstance(ours, ref_cls)


def test_seq_model_keeps_the_torch_parameter_names():
    """Checkpoints of SeqModel with a plain nn.LSTM under ``rnn`` load unchanged."""
    model = SeqModel("classify", 3, 2, cell="lstm", hidden=HIDDEN, layers=2, bidirectional=True, embedding_dim=FEATURES,
                     execution="padded")
    assert isinstance(model.rnn, PackedLSTM) and model.rnn.execution == "padded"
    plain = nn.LSTM(FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
    rnn_keys = [k for k in model.state_dict() if k.startswith("rnn.")]
    assert rnn_keys == [f"rnn.{k}" for k in plain.state_dict()]
    state = model.state_dict()
    state.update({f"rnn.{k}": v for k, v in plain.state_dict().items()})
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.rnn.weight_ih_l1_reverse, plain.weight_ih_l1_reverse)


def test_auto_resolves_by_device():
    assert resolve_execution("auto", torch.device("cpu")) == "padded"
    assert resolve_execution("auto", torch.device("cuda")) == "packed"
    assert resolve_execution("packed", torch.device("cpu")) == "packed"


def test_templates_take_nothing_from_the_seed():
    """A bidirectional module draws from torch's RNG exactly what nn.LSTM draws."""
    torch.manual_seed(0)
    nn.LSTM(FEATURES, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
    expected = torch.rand(3)
    torch.manual_seed(0)
    PackedLSTM(FEATURES, HIDDEN, num_layers=2, bidirectional=True)
    assert torch.equal(torch.rand(3), expected)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="execution"):
        PackedLSTM(FEATURES, HIDDEN, execution="fused")
    with pytest.raises(ValueError, match="execution"):
        PackedGRU(FEATURES, HIDDEN, execution="cudnn")
    for cls in (PackedLSTM, PackedGRU):
        with pytest.raises(ValueError, match="batch_first"):
            cls(FEATURES, HIDDEN, batch_first=False)
    rnn = PackedGRU(FEATURES, HIDDEN, execution="padded")
    x = torch.randn(2, 4, FEATURES)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        rnn(x, torch.tensor([4, 0]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\]"):
        rnn(x, torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="lengths must be"):
        rnn(x, torch.tensor([4, 2, 1]))
    with pytest.raises(ValueError, match="padded must be"):
        rnn(x[0], torch.tensor([4]))


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cls", [PackedLSTM, PackedGRU])
def test_lengths_as_pack_padded_sequence_takes_them(cls, bidirectional, execution):
    """A list, a NumPy array (any integer dtype) or a tensor of another dtype: the same results as int64."""
    torch.manual_seed(0)
    rnn = cls(FEATURES, HIDDEN, num_layers=2, bidirectional=bidirectional, execution=execution)
    x, lengths = torch.randn(3, 6, FEATURES), [6, 2, 4]
    want = rnn(x, torch.tensor(lengths))
    for given in (lengths, np.array(lengths), np.array(lengths, dtype=np.int32), torch.tensor(lengths).int()):
        got = rnn(x, given)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), type(given)


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cls", [PackedLSTM, PackedGRU])
def test_a_batch_of_no_sequences_gives_empty_outputs_on_both_paths(cls, bidirectional, execution):
    """``pack_padded_sequence`` refuses an empty batch ("Cannot pack empty tensors"); the module does not."""
    rnn = cls(FEATURES, HIDDEN, bidirectional=bidirectional, execution=execution)
    width = HIDDEN * (2 if bidirectional else 1)
    for lengths in ([], np.zeros(0, dtype=np.int64), torch.zeros(0, dtype=torch.int64)):
        out, last = rnn(torch.randn(0, 5, FEATURES), lengths)
        assert out.shape == (0, 5, width) and last.shape == (0, width)
