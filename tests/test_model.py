"""SeqModel: a sequence's output does not depend on the batch it is in (packing / padding invariance),
and the packed and padded execution paths agree."""

from __future__ import annotations

import pytest
import torch

from ddp_seq.nn.seq_model import SeqModel

ATOL = 1e-5
FEATURES, CLASSES, VOCAB = 5, 3, 11
#: The sequence of interest (length 4) among much longer ones, and a length-1 sequence.
LENGTHS = [29, 4, 17, 1, 23]

HEADS = [("classify", "last"), ("classify", "mean"), ("classify", "max"),
         ("regress", "last"), ("regress", "mean"), ("regress", "max"), ("tag", "last")]
HEAD_IDS = [f"{t}-{p}" if t != "tag" else "tag" for t, p in HEADS]


def make_model(task: str, pooling: str, cell: str, bidirectional: bool, layers: int, execution: str,
               vocab: int = 0, seed: int = 0) -> SeqModel:
    torch.manual_seed(seed)
    cfg = dict(cell=cell, hidden=6, layers=layers, bidirectional=bidirectional, dropout=0.0,
               pooling=pooling, embedding_dim=7)
    outputs = {"classify": CLASSES, "regress": 1, "tag": 2}[task]
    return SeqModel(task, FEATURES, outputs, **cfg, vocab_size=vocab, execution=execution).eval()


def make_sequences(vocab: int = 0, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if vocab:
        return [torch.randint(1, vocab, (n,), generator=g) for n in LENGTHS]
    return [torch.randn(n, FEATURES, generator=g) for n in LENGTHS]


def pad(seqs: list[torch.Tensor], total: int | None = None, garbage: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``seqs`` padded to ``total`` steps; the padding is junk (never read) unless ``garbage`` is off."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    total = total or int(lengths.max())
    g = torch.Generator().manual_seed(99)
    shape = (len(seqs), total) + tuple(seqs[0].shape[1:])
    if seqs[0].dtype == torch.int64:
        out = torch.randint(1, VOCAB, shape, generator=g) if garbage else torch.zeros(shape, dtype=torch.int64)
    else:
        out = 50 * torch.randn(shape, generator=g) if garbage else torch.zeros(shape)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out, lengths


def assert_row_matches_alone(task: str, batched: torch.Tensor, alone: torch.Tensor, row: int, length: int):
    if task == "tag":
        assert batched.shape[-1] == alone.shape[-1] == 2
        torch.testing.assert_close(batched[row, :length], alone[0, :length], atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(batched[row], alone[0], atol=ATOL, rtol=0)


def check_invariance(model: SeqModel, task: str, seqs: list[torch.Tensor]) -> None:
    with torch.no_grad():
        inputs, lengths = pad(seqs)
        batched = model(inputs, lengths)
        B, T = len(seqs), int(lengths.max())
        if task == "tag":
            assert tuple(batched.shape) == (B, T, 2)
        elif task == "regress":
            assert tuple(batched.shape) == (B,)
        else:
            assert tuple(batched.shape) == (B, CLASSES)
        assert torch.isfinite(batched if task != "tag" else batched[:, :1]).all()
        for row, s in enumerate(seqs):
            alone = model(*pad([s], garbage=False))
            assert_row_matches_alone(task, batched, alone, row, len(s))
        # a reordered batch with extra padding columns gives the same rows
        perm = [2, 0, 4, 1, 3]
        shuffled = model(*pad([seqs[i] for i in perm], total=T + 6))
        if task == "tag":
            assert shuffled.shape[1] == T + 6
        for new_row, old_row in enumerate(perm):
            assert_row_matches_alone(task, shuffled, batched[old_row:old_row + 1], new_row, len(seqs[old_row]))


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("task,pooling", HEADS, ids=HEAD_IDS)
def test_output_independent_of_batch_mates(task, pooling, cell, bidirectional, layers, execution):
    model = make_model(task, pooling, cell, bidirectional, layers, execution)
    check_invariance(model, task, make_sequences())


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("task,pooling", HEADS, ids=HEAD_IDS)
def test_token_ids_output_independent_of_batch_mates(task, pooling, bidirectional, execution):
    model = make_model(task, pooling, "lstm", bidirectional, 1, execution, vocab=VOCAB)
    assert isinstance(model.input_layer, torch.nn.Embedding)
    check_invariance(model, task, make_sequences(vocab=VOCAB))


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("task,pooling", HEADS, ids=HEAD_IDS)
def test_packed_and_padded_paths_agree_on_outputs_and_gradients(task, pooling, cell, bidirectional, layers):
    packed = make_model(task, pooling, cell, bidirectional, layers, "packed")
    padded = make_model(task, pooling, cell, bidirectional, layers, "padded")
    padded.load_state_dict(packed.state_dict())  # the same parameters, the same names
    inputs, lengths = pad(make_sequences())
    mask = torch.arange(inputs.shape[1])[None, :] < lengths[:, None]
    results = []
    for model in (packed, padded):
        model.zero_grad()
        out = model(inputs, lengths)
        valid = out[mask] if task == "tag" else out
        (valid.sin().sum()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results.append((valid.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=ATOL, rtol=0)
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], atol=ATOL, rtol=1e-4, msg=name)


def test_last_pooling_is_the_state_at_the_last_valid_step():
    """Unidirectional 'last' equals the tag head's view of the output at step length-1."""
    torch.manual_seed(0)
    cfg = dict(cell="lstm", hidden=6, layers=1, bidirectional=False, pooling="last", embedding_dim=7)
    clf = SeqModel("classify", FEATURES, 2, **cfg, execution="packed").eval()
    tag = SeqModel("tag", FEATURES, 2, **cfg, execution="packed").eval()
    tag.load_state_dict(clf.state_dict())
    inputs, lengths = pad(make_sequences())
    with torch.no_grad():
        per_seq = clf(inputs, lengths)
        per_step = tag(inputs, lengths)
    torch.testing.assert_close(per_seq, per_step[torch.arange(len(lengths)), lengths - 1], atol=ATOL, rtol=0)


def test_bad_arguments_are_refused():
    cfg = dict(hidden=4, embedding_dim=4)
    with pytest.raises(ValueError, match="task"):
        SeqModel("translate", FEATURES, 2, **cfg)
    with pytest.raises(ValueError, match="execution"):
        SeqModel("classify", FEATURES, 2, **cfg, execution="auto")
    with pytest.raises(ValueError, match="cell"):
        SeqModel("classify", FEATURES, 2, **cfg, cell="rnn")
    with pytest.raises(ValueError, match="pooling"):
        SeqModel("classify", FEATURES, 2, **cfg, pooling="sum")
