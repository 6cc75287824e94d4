"""npz loading, its one-line errors, check_sequences, subset, the held-out val split and num_outputs."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_seq.config import DataConfig, UserError
from ddp_seq.data import synthetic
from ddp_seq.data.files import check_sequences, load_npz
from ddp_seq.data.sources import holdout_indices, load_splits, num_outputs, subset
from ddp_seq.data.synthetic import SequenceData

LENGTHS = [3, 1, 4, 2, 5]


def arrays(task: str, lengths=LENGTHS, features: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A valid set of arrays for ``task`` with offsets."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    total, n = int(lengths.sum()), len(lengths)
    out = {"data": rng.standard_normal((total, features)),  # float64: the loader converts
           "offsets": np.concatenate([[0], np.cumsum(lengths)])}
    if task == "classify":
        out["labels"] = rng.integers(0, 4, size=n)
    elif task == "regress":
        out["targets"] = rng.standard_normal(n)
    else:
        out["tags"] = rng.integers(0, 3, size=total).astype(np.int32)
    return out


def save(tmp_path: Path, name: str = "d.npz", **arrs) -> Path:
    path = tmp_path / name
    np.savez(path, **arrs)
    return path


def raises(path: Path, *fragments: str):
    """pytest.raises for a UserError whose one-line message starts with ``path`` and has each fragment."""
    pattern = "^" + re.escape(str(path)) + ": .*" + ".*".join(re.escape(f) for f in fragments)
    return pytest.raises(UserError, match=pattern)


def one_line(exc: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(exc.value)


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["classify", "regress", "tag"])
@pytest.mark.parametrize("framing", ["offsets", "lengths", "both"])
def test_round_trip(tmp_path, task, framing):
    arrs = arrays(task)
    if framing != "offsets":
        arrs["lengths"] = np.asarray(LENGTHS, dtype=np.int32)
    if framing == "lengths":
        del arrs["offsets"]
    data = load_npz(save(tmp_path, **arrs), task)
    target = {"classify": "labels", "regress": "targets", "tag": "tags"}[task]
    assert data.values.dtype == np.float32 and data.values.shape == arrs["data"].shape
    np.testing.assert_allclose(data.values, arrs["data"].astype(np.float32))
    assert data.offsets.dtype == np.int64
    np.testing.assert_array_equal(data.offsets, np.concatenate([[0], np.cumsum(LENGTHS)]))
    assert data.targets.dtype == (np.float32 if task == "regress" else np.int64)
    np.testing.assert_allclose(data.targets, arrs[target].astype(data.targets.dtype))
    assert data.per_step == (task == "tag") and len(data) == len(LENGTHS)


def test_one_dimensional_data_is_one_feature_and_whole_floats_are_labels(tmp_path):
    arrs = arrays("classify")
    arrs["data"] = np.arange(15, dtype=np.float64)
    arrs["labels"] = arrs["labels"].astype(np.float64)  # whole-valued floats are fine
    data = load_npz(save(tmp_path, **arrs), "classify")
    assert data.values.shape == (15, 1) and data.num_features == 1
    np.testing.assert_array_equal(data.values[:, 0], np.arange(15))
    assert data.targets.dtype == np.int64


# -- the file itself -------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with raises(path, "no such file"):
        load_npz(path, "classify")


def test_text_file_and_npy_file_and_truncated_zip(tmp_path):
    text = tmp_path / "t.npz"
    text.write_text("data,labels\n1,2\n")
    with raises(text, "not an .npz file"):
        load_npz(text, "classify")
    npy = tmp_path / "a.npy"
    np.save(npy, np.zeros(3))
    with raises(npy, "single .npy array"):
        load_npz(npy, "classify")
    good = save(tmp_path, **arrays("classify"))
    blob = good.read_bytes()
    for cut in (len(blob) // 2, 40):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(blob[:cut])
        with raises(bad, "not a readable .npz file") as exc:
            load_npz(bad, "classify")
        one_line(exc)


class Boobytrap:
    """Unpickling this opens (creates) the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_object_array_is_refused_without_unpickling(tmp_path):
    arrs = arrays("classify")
    control_marker, marker = tmp_path / "control-fired", tmp_path / "fired"
    # Control: the same payload does fire when numpy is allowed to unpickle (so the test can fail).
    control = tmp_path / "control.npz"
    np.savez(control, trap=np.array([Boobytrap(control_marker)], dtype=object), allow_pickle=True)
    np.load(control, allow_pickle=True)["trap"]
    assert control_marker.exists()

    for name in ("labels", "data"):
        path = tmp_path / f"obj-{name}.npz"
        arrs_obj = dict(arrs, **{name: np.array([Boobytrap(marker)] * 5, dtype=object)})
        np.savez(path, **arrs_obj, allow_pickle=True)
        with raises(path, f"array '{name}' holds Python objects") as exc:
            load_npz(path, "classify")
        one_line(exc)
        assert not marker.exists()


# -- arrays: presence, shapes, dtypes, framing -------------------------------------------------------

def test_missing_arrays_are_named_with_what_the_file_has(tmp_path):
    arrs = arrays("classify")
    path = save(tmp_path, data=arrs["data"], offsets=arrs["offsets"], extra=np.zeros(2))
    with raises(path, "missing array 'labels'", "the file has data, extra, offsets"):
        load_npz(path, "classify")
    path = save(tmp_path, "t.npz", data=arrs["data"], labels=arrs["labels"])
    with raises(path, "missing array 'offsets or lengths'", "the file has data, labels"):
        load_npz(path, "classify")
    with raises(path, "missing array 'offsets or lengths' and 'tags'"):
        load_npz(path, "tag")


@pytest.mark.parametrize("task, change, fragments", [
    ("classify", {"data": np.zeros((15, 2, 2))}, ["array 'data' must be [total_steps, features]", "(15, 2, 2)"]),
    ("classify", {"data": np.zeros((15, 0))}, ["array 'data' must be", "(15, 0)"]),
    ("classify", {"data": np.array(["a"] * 15)}, ["array 'data' must be numeric", "<U1"]),
    ("classify", {"labels": np.array([0, 1, 2.5, 1, 0])}, ["array 'labels' must hold integers", "labels[2] is 2.5"]),
    ("classify", {"labels": np.array([0, 1, np.nan, 1, 0])}, ["array 'labels' must hold integers", "labels[2]"]),
    ("classify", {"labels": np.array(["a"] * 5)}, ["array 'labels' must hold integers", "dtype <U1"]),
    ("classify", {"labels": np.zeros((5, 1), np.int64)}, ["array 'labels' must be 1-D", "(5, 1)"]),
    ("classify", {"labels": np.zeros(4, np.int64)}, ["array 'labels' has 4 entries but there are 5 samples"]),
    ("regress", {"targets": np.zeros(6)}, ["array 'targets' has 6 entries but there are 5 samples"]),
    ("regress", {"targets": np.array([b"x"] * 5)}, ["array 'targets' must be numeric"]),
    ("tag", {"tags": np.zeros(14, np.int64)}, ["array 'tags' has 14 entries but there are 15 steps"]),
    ("classify", {"offsets": np.array([1, 3, 4, 8, 10, 15])}, ["array 'offsets' must start with 0"]),
    ("classify", {"offsets": np.array([0, 3, 2, 8, 10, 15])},
     ["array 'offsets' decreases at offsets[2]", "sample 1 would have a negative length"]),
    ("classify", {"offsets": np.array([0, 3, 4, 8, 10, 14])}, ["array 'offsets' ends at 14 but 'data' has 15 steps"]),
    ("classify", {"offsets": np.array([0.0, 3, 4, 8, 10, 15.5])}, ["array 'offsets' must hold integers"]),
    ("classify", {"offsets": np.zeros((2, 3), np.int64)}, ["array 'offsets' must be 1-D"]),
    ("classify", {"offsets": None, "lengths": np.array([3, 1, -4, 10, 5])},
     ["array 'lengths' has a negative length for sample 2"]),
    ("classify", {"offsets": None, "lengths": np.array([3, 1, 4, 2, 4])}, ["'lengths' sums to 14 but 'data' has 15"]),
    ("classify", {"lengths": np.array([3, 1, 4, 3, 4])}, ["arrays 'offsets' and 'lengths' disagree"]),
])
def test_bad_arrays(tmp_path, task, change, fragments):
    arrs = arrays(task)
    arrs.update(change)
    arrs = {k: v for k, v in arrs.items() if v is not None}
    path = save(tmp_path, **arrs)
    with raises(path, *fragments) as exc:
        load_npz(path, task)
    one_line(exc)


# -- check_sequences ---------------------------------------------------------------------------------

def seqs(lengths, features: int = 2, per_step: bool = False, regress: bool = False) -> SequenceData:
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.ones((int(lengths.sum()), features), np.float32)
    size = len(values) if per_step else len(lengths)
    targets = np.zeros(size, np.float32 if regress else np.int64)
    return SequenceData(values, offsets, targets, per_step)


@pytest.mark.parametrize("bad, kind", [(np.nan, "nan"), (np.inf, "+inf"), (-np.inf, "-inf")])
def test_check_sequences_locates_nonfinite_values(bad, kind):
    data = seqs([3, 2, 4, 1], features=3)
    data.values[3 + 2 + 2, 1] = bad  # sample 2, step 2, feature 1
    data.values[-1, 0] = np.nan  # a later one: the first is reported, the count covers both
    with pytest.raises(UserError, match=rf"^src: sample 2 step 2 feature 1 is {re.escape(kind)} .*2 non-finite"):
        check_sequences(data, "src")


def test_check_sequences_empty_dataset_and_empty_sample():
    with pytest.raises(UserError, match=r"^src: the dataset is empty \(0 samples\)"):
        check_sequences(seqs([]), "src")
    with pytest.raises(UserError, match=r"^src: sample 17 is empty \(length 0\)$"):
        check_sequences(seqs([2] * 17 + [0] + [3] * 5), "src")
    with pytest.raises(UserError, match=r"^src: sample 1 is empty \(length 0\); 2 samples are empty"):
        check_sequences(seqs([2, 0, 0, 1]), "src")


def test_check_sequences_targets():
    data = seqs([2, 3, 1], regress=True)
    data.targets[1] = np.inf
    with pytest.raises(UserError, match=r"^src: sample 1 has target \+inf \(targets must be finite"):
        check_sequences(data, "src")
    data = seqs([2, 3, 1])
    data.targets[2] = -1
    with pytest.raises(UserError, match=r"^src: sample 2 has class label -1 \(class labels must be >= 0"):
        check_sequences(data, "src")
    data = seqs([2, 3, 1], per_step=True)
    data.targets[4] = -3  # sample 1, step 2
    with pytest.raises(UserError, match=r"^src: sample 1 step 2 has tag -3"):
        check_sequences(data, "src")


def test_load_npz_runs_the_sequence_checks(tmp_path):
    arrs = arrays("regress")
    arrs["data"][5, 2] = np.nan  # lengths 3, 1, 4: step 5 is sample 2, step 1
    path = save(tmp_path, **arrs)
    with raises(path, "sample 2 step 1 feature 2 is nan"):
        load_npz(path, "regress")
    arrs = arrays("classify", lengths=[3, 0, 2])
    path = save(tmp_path, "e.npz", **arrs)
    with raises(path, "sample 1 is empty (length 0)"):
        load_npz(path, "classify")
    arrs = arrays("classify", lengths=[])
    path = save(tmp_path, "z.npz", **arrs)
    with raises(path, "the dataset is empty"):
        load_npz(path, "classify")


def test_check_sequences_is_vectorised():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 80, size=50_000)
    lengths[-1] += 2_000_000 - lengths.sum()
    data = seqs(lengths, features=8)
    assert len(data.values) == 2_000_000
    start = time.perf_counter()
    check_sequences(data, "big")
    assert time.perf_counter() - start < 2.0


# -- subset, split, num_outputs -------------------------------------------------------------------

def reference_subset(data: SequenceData, indices) -> SequenceData:
    values, targets, lengths = [], [], []
    for i in indices:
        s, e = data.offsets[i], data.offsets[i + 1]
        values.append(data.values[s:e])
        targets.append(data.targets[s:e] if data.per_step else data.targets[i:i + 1])
        lengths.append(e - s)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    return SequenceData(np.concatenate(values), offsets, np.concatenate(targets), data.per_step)


@pytest.mark.parametrize("per_step", [False, True])
def test_subset_matches_reference(per_step):
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 9, size=200)
    data = seqs(lengths, features=3, per_step=per_step)
    data.values[:] = rng.standard_normal(data.values.shape)
    data.targets[:] = rng.integers(0, 5, size=len(data.targets))
    for indices in (rng.permutation(200)[:70], rng.integers(0, 200, size=300), np.array([], np.int64)):
        got, want = subset(data, indices), reference_subset(data, indices) if len(indices) else None
        if want is None:
            assert len(got) == 0 and got.values.shape == (0, 3) and got.offsets.tolist() == [0]
            continue
        np.testing.assert_array_equal(got.offsets, want.offsets)
        np.testing.assert_array_equal(got.values, want.values)
        np.testing.assert_array_equal(got.targets, want.targets)
        assert got.per_step == per_step and got.offsets.dtype == np.int64


def test_holdout_split_is_deterministic_disjoint_complete_and_ordered():
    train, val = holdout_indices(101, 0.1, seed=7)
    assert len(val) == 10 and len(train) == 91
    assert set(train).isdisjoint(val) and sorted(set(train) | set(val)) == list(range(101))
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    again = holdout_indices(101, 0.1, seed=7)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(holdout_indices(101, 0.1, seed=8)[1], val)
    assert [len(v) for _, v in (holdout_indices(n, 0.01, 0) for n in (2, 3, 10))] == [1, 1, 1]


def npz_cfg(tmp_path: Path, task: str = "classify", **kw) -> DataConfig:
    return DataConfig(task=task, format="npz", train_path=str(tmp_path / "train.npz"), **kw)


def test_load_splits_holds_out_in_file_order(tmp_path):
    lengths = np.arange(1, 21)
    arrs = arrays("tag", lengths=lengths)
    arrs["data"][:, 0] = np.repeat(np.arange(20), lengths)  # feature 0 = the sample's index in the file
    np.savez(tmp_path / "train.npz", **arrs)
    cfg = npz_cfg(tmp_path, "tag", val_fraction=0.25, seed=3)
    train, val = load_splits(cfg)
    assert len(train) == 15 and len(val) == 5
    ids_t, ids_v = train.values[train.offsets[:-1], 0], val.values[val.offsets[:-1], 0]
    assert np.array_equal(np.sort(np.concatenate([ids_t, ids_v])), np.arange(20))
    assert (np.diff(ids_t) > 0).all() and (np.diff(ids_v) > 0).all()
    np.testing.assert_array_equal(train.lengths, ids_t + 1)  # lengths (and per-step tags) follow along
    full = load_npz(cfg.train_path, "tag")
    np.testing.assert_array_equal(val.targets, subset(full, ids_v.astype(np.int64)).targets)


def test_load_splits_val_path_synthetic_and_too_small(tmp_path):
    np.savez(tmp_path / "train.npz", **arrays("regress"))
    np.savez(tmp_path / "val.npz", **arrays("regress", lengths=[2, 2], seed=1))
    train, val = load_splits(npz_cfg(tmp_path, "regress", val_path=str(tmp_path / "val.npz")))
    assert len(train) == 5 and len(val) == 2
    cfg = DataConfig(num_train=7, num_val=3)
    s_train, s_val = load_splits(cfg)
    assert len(s_train) == 7 and len(s_val) == 3
    np.savez(tmp_path / "train.npz", **arrays("regress", lengths=[4]))
    with raises(tmp_path / "train.npz", "1 sample cannot be split", "data.val_fraction"):
        load_splits(npz_cfg(tmp_path, "regress"))


def test_num_outputs(tmp_path):
    cfg = npz_cfg(tmp_path)
    labels = seqs([1, 1, 1])
    labels.targets[:] = [0, 4, 2]
    assert num_outputs(cfg, labels) == 5
    assert num_outputs(cfg, labels, labels) == 5
    zeros = seqs([1, 1])
    assert num_outputs(cfg, zeros) == 2  # one class present still needs two outputs
    val = seqs([1, 1])
    val.targets[:] = [1, 7]
    with pytest.raises(UserError, match=r"^.*train\.npz \(held-out .*: label 7 in the validation data does not "
                                        r"occur in training \(classes 0\.\.4\)$"):
        num_outputs(cfg, labels, val)
    tag_cfg = npz_cfg(tmp_path, "tag", val_path="v.npz")
    with pytest.raises(UserError, match=r"^v\.npz: tag 7 in the validation data"):
        num_outputs(tag_cfg, labels, val)
    assert num_outputs(npz_cfg(tmp_path, "regress"), seqs([1], regress=True)) == 1
    syn = DataConfig(num_classes=6)
    assert num_outputs(syn, labels) == synthetic.num_outputs(syn) == 6
