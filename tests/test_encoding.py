"""Vocabularies, classes and the data pipeline of file formats, without processes.

The encoding is checked against a slow, obvious reference (a Counter over the training samples'
tokens); splits, folds and length policies against their definitions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_seq.config import DataConfig
from ddp_seq.data.readers.encoding import PAD, SPECIALS, UNK, Encoding, Parsed, build_encoding, encode, intern_all
from ddp_seq.data.readers.sequences import SequenceData
from ddp_seq.data.readers.sources import describe, fold_indices, load_eval_data, load_inputs, load_splits, read_training
from ddp_seq.errors import UserError

WORDS = ["a", "b", "c", "d", "é", "日本", "zz"]


def token_file(rng: np.random.Generator, n: int, per_step: bool = False, labels=("x", "y", "z")) -> Parsed:
    """``n`` random token samples interned as a parser would, with text-file line numbers."""
    words, targets, lengths = [], [], []
    for _ in range(n):
        length = int(rng.integers(0, 8))
        sample = [WORDS[int(i)] for i in rng.zipf(1.6, size=length) % len(WORDS)]
        words += sample
        lengths.append(length)
        targets += [labels[int(rng.integers(len(labels)))] for _ in (sample if per_step else [None])]
    values, token_symbols = intern_all(words)
    target_ids, label_symbols = intern_all(targets)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = SequenceData(values, offsets, target_ids, per_step, lines=np.arange(n, dtype=np.int64) * 2 + 1,
                        source="f.txt")
    return Parsed(data, token_symbols, label_symbols)


def decoded(parsed: Parsed, i: int) -> tuple[list, object]:
    steps, target = parsed.data[i]
    labels = [parsed.label_symbols[t] for t in np.atleast_1d(target)]
    return [parsed.token_symbols[t] for t in steps], labels if parsed.data.per_step else labels[0]


def reference_vocab(parsed: Parsed, train: np.ndarray, min_freq: int) -> list:
    counts = Counter(token for i in train for token in decoded(parsed, int(i))[0])
    kept = [t for t, c in counts.items() if c >= min_freq]
    return [*SPECIALS, *sorted(kept, key=lambda t: (-counts[t], t))]


@pytest.mark.parametrize("min_freq", [1, 3])
@pytest.mark.parametrize("per_step", [False, True])
def test_encoding_matches_reference(min_freq, per_step):
    rng = np.random.default_rng(min_freq)
    parsed = token_file(rng, 300, per_step)
    train = np.sort(rng.permutation(300)[:200])
    enc = build_encoding(parsed, train, "tag" if per_step else "classify", min_freq)
    assert enc.vocab == reference_vocab(parsed, train, min_freq)
    train_labels = {lab for i in train for lab in np.atleast_1d(decoded(parsed, int(i))[1])}
    assert enc.classes == sorted(train_labels) and enc.num_features == 0
    data = encode(parsed, enc, "tag" if per_step else "classify")
    for i in range(300):
        tokens, label = decoded(parsed, i)
        ids, target = data[i]
        assert ids.tolist() == [enc.vocab.index(t) if t in enc.vocab[2:] else UNK for t in tokens]
        want = [enc.classes.index(x) if x in enc.classes else -1 for x in np.atleast_1d(label)]
        assert np.atleast_1d(target).tolist() == want
    assert PAD not in data.values  # 0 is padding only


def test_vocabulary_counts_training_samples_only_and_unknowns_become_unk():
    ids, symbols = intern_all(list("aab" + "ccq"))  # sample 0 = a a b (train), sample 1 = c c q (val)
    assert symbols == ["a", "b", "c", "q"] and ids.tolist() == [0, 0, 1, 2, 2, 3]
    data = SequenceData(ids, np.array([0, 3, 6]), np.array([0, 1]), False, source="s")
    parsed = Parsed(data, symbols, ["p", "q"])
    enc = build_encoding(parsed, np.array([0, 1]), "classify")
    assert enc.vocab == ["<pad>", "<unk>", "a", "c", "b", "q"]  # most frequent first, ties by token
    with pytest.raises(UserError, match=r"^s: sample 1 has label 'q', which the training data does not have "
                                        r"\(classes: 'p', 'r'; 1 unknown in all\)$"):
        encode(parsed, Encoding(enc.vocab, ["p", "r"]), "classify", check=np.array([1]))
    only_train = build_encoding(parsed, np.array([0]), "regress")
    assert only_train.vocab == ["<pad>", "<unk>", "a", "b"] and only_train.classes is None
    parsed.data.targets = np.array([0.5, 1.5], dtype=np.float32)
    assert encode(parsed, only_train, "regress").values.tolist() == [2, 2, 3, UNK, UNK, UNK]


def test_classes_integer_indices_strings_and_one_class():
    data = SequenceData(np.zeros((3, 2), np.float32), np.array([0, 1, 2, 3]), np.array([0, 1, 2]), False,
                        lines=np.array([4, 5, 6]), source="t.jsonl")
    assert build_encoding(Parsed(data, None, [5, 1, 0]), np.arange(3), "classify").classes == list(range(6))
    assert build_encoding(Parsed(data, None, ["b", "a", "c"]), np.arange(3), "classify").classes == ["a", "b", "c"]
    with pytest.raises(UserError, match=r"^t\.jsonl: the training data holds only the label 'b'"):
        build_encoding(Parsed(data, None, ["b", "a", "c"]), np.array([0]), "classify")
    enc = build_encoding(Parsed(data, None, [0, 1, 9]), np.array([0, 1]), "classify")
    assert enc.classes == [0, 1]
    with pytest.raises(UserError, match=r"^t\.jsonl line 6 has label 9, which the training data does not have"):
        encode(Parsed(data, None, [0, 1, 9]), enc, "classify", check=np.array([1, 2]))


def test_unknown_tag_names_the_sample_of_its_step():
    # samples: [0, 1] [0] [0, 2, 1] -- tag symbol 2 appears only at sample 2, step 1
    data = SequenceData(np.zeros((6, 1), np.float32), np.array([0, 2, 3, 6]), np.array([0, 1, 0, 0, 2, 1]), True,
                        lines=np.array([1, 2, 3]), source="v.jsonl")
    parsed = Parsed(data, None, ["on", "off", "mid"])
    enc = Encoding(None, ["off", "on"], 1)
    with pytest.raises(UserError, match=r"^v\.jsonl line 3 has tag 'mid'"):
        encode(parsed, enc, "tag", check=np.arange(3))
    assert encode(parsed, enc, "tag", check=np.arange(2)).targets.tolist() == [1, 0, 1, 1, -1, 0]


def test_encode_refuses_other_inputs_than_the_model_reads():
    feats = Parsed(SequenceData(np.zeros((2, 3), np.float32), np.array([0, 2]), np.array([0]), False, source="p"),
                   None, ["x"])
    with pytest.raises(UserError, match=r"^p: the file holds feature vectors, but the model reads tokens$"):
        encode(feats, Encoding(["<pad>", "<unk>", "a"], ["x"], 0), "classify")
    with pytest.raises(UserError, match=r"^p: steps have 3 features, but the model was trained on 4$"):
        encode(feats, Encoding(None, ["x"], 4), "classify")


def test_encoding_survives_a_weights_only_checkpoint(tmp_path):
    enc = Encoding(["<pad>", "<unk>", "é", "日本", 17], ["neg", "pos"], 0)
    torch.save({"encoding": enc.state_dict()}, tmp_path / "e.pt")
    assert Encoding.from_state_dict(torch.load(tmp_path / "e.pt", weights_only=True)["encoding"]) == enc


# -- folds, splits and the pipeline on real files ------------------------------------------------

@pytest.mark.parametrize("stratified", [False, True])
def test_folds_partition_the_samples_deterministically(stratified):
    rng = np.random.default_rng(0)
    strata = rng.integers(0, 3, size=103) if stratified else None
    parts = [fold_indices(103, 5, f, seed=4, strata=strata) for f in range(5)]
    vals = [v for _, v in parts]
    assert sorted(np.concatenate(vals).tolist()) == list(range(103))  # every sample validates exactly once
    assert {len(v) for v in vals} <= {20, 21}
    for train, val in parts:
        assert set(train).isdisjoint(val) and len(train) + len(val) == 103 and (np.diff(val) > 0).all()
    again = fold_indices(103, 5, 2, seed=4, strata=strata)
    assert np.array_equal(again[1], vals[2]) and not np.array_equal(fold_indices(103, 5, 2, 5, strata)[1], vals[2])
    if stratified:  # each class spread over the folds within one sample
        for c in range(3):
            per_fold = [int((strata[v] == c).sum()) for v in vals]
            assert max(per_fold) - min(per_fold) <= 1


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


def tsv_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(**{"format": "tsv", "train_path": str(path), **kw})


def test_tsv_pipeline_splits_folds_eval_data_and_inputs(tmp_path):
    rng = np.random.default_rng(3)
    rows = [("pos" if i % 3 else "neg", "".join(rng.choice(list("abcdé"), size=int(rng.integers(1, 9)))))
            for i in range(60)]
    path = write_tsv(tmp_path / "t.tsv", rows)
    splits = load_splits(tsv_cfg(path, val_fraction=0.25))
    assert len(splits.train) == 45 and len(splits.val) == 15
    assert sorted(splits.train.positions.tolist() + splits.val.positions.tolist()) == list(range(60))
    assert splits.val.lines.tolist() == (splits.val.positions + 1).tolist()
    text = [rows[p][1] for p in splits.train.positions]
    assert splits.encoding.vocab[2:] == [t for t, _ in sorted(Counter("".join(text)).items(),
                                                              key=lambda kv: (-kv[1], kv[0]))]
    # evaluate re-derives the same validation samples from the config, with the stored encoding
    val, _ = load_eval_data(tsv_cfg(path, val_fraction=0.25), splits.encoding)
    assert val.positions.tolist() == splits.val.positions.tolist()
    assert np.array_equal(val.targets, splits.val.targets)
    # folds: each fold's encoding comes from its own training part
    cfg = tsv_cfg(path, folds=4)
    training = read_training(cfg)
    folds = [load_splits(cfg, f, training) for f in range(4)]
    assert sorted(p for s in folds for p in s.val.positions.tolist()) == list(range(60))
    for s in folds:
        assert set(s.train.positions.tolist()).isdisjoint(s.val.positions.tolist())
        assert s.encoding.classes == ["neg", "pos"]
    fold_val, _ = load_eval_data(cfg, folds[2].encoding, fold=2)
    assert fold_val.positions.tolist() == folds[2].val.positions.tolist()
    # predict input: labels optional, empty samples dropped but counted
    inputs = tmp_path / "in.tsv"
    inputs.write_text("only text\nneg\t\npos\tabc\n", encoding="utf-8")  # a label column is one of the classes
    data, count, notes = load_inputs(tsv_cfg(path, empty="drop"), splits.encoding, str(inputs))
    assert count == 3 and data.positions.tolist() == [0, 2] and "dropped 1 empty" in notes[0]
    lines = describe(splits, "classify")
    assert "45 training samples" in lines[0] and "majority-class baseline: always 'pos'" in lines[-1]


def test_val_label_unseen_in_training_names_the_val_line(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("a", "xy"), ("b", "yz")])
    val = write_tsv(tmp_path / "val.tsv", [("a", "x"), ("b", "y"), ("c", "z")])
    with pytest.raises(UserError, match=rf"^{val} line 3 has label 'c', which the training data does not have"):
        load_splits(tsv_cfg(train, val_path=str(val)))
    with pytest.raises(UserError, match=r"data.folds: 5 folds need at least 5 samples; .*train.tsv has 2"):
        load_splits(tsv_cfg(train, folds=5), fold=0)
