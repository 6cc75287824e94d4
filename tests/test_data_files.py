"""npz loading (memory-mapped), its one-line errors, check_sequences, views, the length policies, the held-out
val split and the classes of integer labels."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from ddp_seq.config import DataConfig
from ddp_seq.data.readers import synthetic
from ddp_seq.data.readers.files import check_sequences, is_memory_mapped, load_npz, read_npz
from ddp_seq.data.readers.sources import apply_length_policies, holdout_indices, load_splits
from ddp_seq.data.readers.synthetic import SequenceData
from ddp_seq.errors import UserError

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


def policy(data: SequenceData, **cfg):
    from ddp_seq.data.readers.encoding import Parsed

    data.source = "src"
    parsed, notes = apply_length_policies(Parsed(data, None, None), DataConfig(**cfg))
    return parsed.data, notes


def test_empty_dataset_and_empty_samples():
    with pytest.raises(UserError, match=r"^src: the dataset is empty \(0 samples\)"):
        check_sequences(seqs([]), "src")
    check_sequences(seqs([2, 0, 1]), "src")  # empty samples are the policy's business
    with pytest.raises(UserError, match=r"^src: sample 17 is empty \(length 0\): .*data.empty=drop$"):
        policy(seqs([2] * 17 + [0] + [3] * 5))
    with pytest.raises(UserError, match=r"^src: sample 1 is empty \(length 0\); 2 samples are empty"):
        policy(seqs([2, 0, 0, 1]))
    kept, notes = policy(seqs([2, 0, 0, 1]), empty="drop")
    assert kept.lengths.tolist() == [2, 1] and kept.positions.tolist() == [0, 3]
    assert notes == ["src: dropped 2 empty sample(s) (data.empty=drop)"]
    with pytest.raises(UserError, match=r"^src: every sample is empty"):
        policy(seqs([0, 0]), empty="drop")


def test_truncation_policies_cut_spans_not_steps():
    data = seqs([2, 7, 5, 9])
    data.values[:, 0] = np.arange(len(data.values))  # feature 0 = the step's index in storage
    with pytest.raises(UserError, match=r"^src: sample 3 has 9 steps, more than data.max_length=5 \(the longest; "
                                        r"2 sample\(s\) are longer\): set data.truncate=pre"):
        policy(data, max_length=5)
    post, notes = policy(data, max_length=5, truncate="post")
    pre, _ = policy(data, max_length=5, truncate="pre")
    assert notes == ["src: cut 2 sample(s) to data.max_length=5 (data.truncate=post)"]
    for i, steps in enumerate(([0, 1], [2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13], list(range(14, 23)))):
        assert post[i][0][:, 0].tolist() == steps[:5]  # the first max_length steps
        assert pre[i][0][:, 0].tolist() == steps[-5:]  # the last max_length steps
    assert post.values is data.values and pre.values is data.values  # views: nothing copied
    assert policy(data, max_length=9)[0].lengths.tolist() == [2, 7, 5, 9]


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
        load_splits(npz_cfg(tmp_path, train_path=str(path)))


def test_uncompressed_data_is_memory_mapped_and_compressed_data_is_read(tmp_path):
    arrs = arrays("tag")
    arrs["data"] = arrs["data"].astype(np.float32)
    np.savez(tmp_path / "plain.npz", **arrs)
    np.savez_compressed(tmp_path / "packed.npz", **arrs)
    np.savez(tmp_path / "wide.npz", **{**arrs, "data": arrs["data"].astype(np.float64)})
    plain, packed, wide = (load_npz(tmp_path / f"{n}.npz", "tag") for n in ("plain", "packed", "wide"))
    assert is_memory_mapped(plain.values) and not is_memory_mapped(packed.values)
    assert not is_memory_mapped(wide.values)  # float64 is converted to float32: a copy
    for got in (plain, packed, wide):
        np.testing.assert_array_equal(got.values, arrs["data"])
    splits = load_splits(npz_cfg(tmp_path, "tag", train_path=str(tmp_path / "plain.npz"), val_fraction=0.4))
    assert is_memory_mapped(splits.train.values) and is_memory_mapped(splits.val.values)  # views of the map
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


# -- views, split, classes -------------------------------------------------------------------------

def reference_subset(data: SequenceData, indices) -> list:
    out = []
    for i in indices:
        s, e = data.offsets[i], data.offsets[i + 1]
        out.append((data.values[s:e], data.targets[s:e] if data.per_step else data.targets[i]))
    return out


@pytest.mark.parametrize("per_step", [False, True])
def test_select_matches_reference(per_step):
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 9, size=200)
    data = seqs(lengths, features=3, per_step=per_step)
    data.values[:] = rng.standard_normal(data.values.shape)
    data.targets[:] = rng.integers(0, 5, size=len(data.targets))
    for indices in (rng.permutation(200)[:70], rng.integers(0, 200, size=300), np.array([], np.int64)):
        got, want = data.select(indices), reference_subset(data, indices)
        assert len(got) == len(want) and got.values is data.values and got.per_step == per_step
        assert got.positions.tolist() == list(indices)
        for i, (values, target) in enumerate(want):
            steps, got_target = got[i]
            np.testing.assert_array_equal(steps, values)
            np.testing.assert_array_equal(got_target, target)
        again = got.select(np.arange(len(got))[::-1])  # a view of a view
        assert again.positions.tolist() == list(indices)[::-1]


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
    return DataConfig(**{"task": task, "format": "npz", "train_path": str(tmp_path / "train.npz"), **kw})


def test_load_splits_holds_out_in_file_order(tmp_path):
    lengths = np.arange(1, 21)
    arrs = arrays("tag", lengths=lengths)
    arrs["data"][:, 0] = np.repeat(np.arange(20), lengths)  # feature 0 = the sample's index in the file
    np.savez(tmp_path / "train.npz", **arrs)
    cfg = npz_cfg(tmp_path, "tag", val_fraction=0.25, seed=3)
    splits = load_splits(cfg)
    train, val = splits.train, splits.val
    assert len(train) == 15 and len(val) == 5
    ids_t, ids_v = train.values[train.starts, 0], val.values[val.starts, 0]
    assert np.array_equal(np.sort(np.concatenate([ids_t, ids_v])), np.arange(20))
    assert (np.diff(ids_t) > 0).all() and (np.diff(ids_v) > 0).all()
    assert train.positions.tolist() == ids_t.tolist() and val.positions.tolist() == ids_v.tolist()
    np.testing.assert_array_equal(train.lengths, ids_t + 1)  # lengths (and per-step tags) follow along
    full = load_npz(cfg.train_path, "tag")
    for i, position in enumerate(val.positions):
        np.testing.assert_array_equal(val[i][1], full[int(position)][1])


def test_load_splits_val_path_synthetic_and_too_small(tmp_path):
    np.savez(tmp_path / "train.npz", **arrays("regress"))
    np.savez(tmp_path / "val.npz", **arrays("regress", lengths=[2, 2], seed=1))
    splits = load_splits(npz_cfg(tmp_path, "regress", val_path=str(tmp_path / "val.npz")))
    assert len(splits.train) == 5 and len(splits.val) == 2 and splits.encoding.classes is None
    synth = load_splits(DataConfig(num_train=7, num_val=3))
    assert len(synth.train) == 7 and len(synth.val) == 3
    np.savez(tmp_path / "train.npz", **arrays("regress", lengths=[4]))
    with raises(tmp_path / "train.npz", "1 sample cannot be split", "data.val_fraction"):
        load_splits(npz_cfg(tmp_path, "regress"))


def classes_of(tmp_path: Path, train_labels: list[int], val_labels: list[int] | None = None, task="classify"):
    def write(name, labels):
        arrs = arrays("classify", lengths=[1] * len(labels))
        if task == "tag":
            arrs["tags"] = np.asarray(labels)
            del arrs["labels"]
        else:
            arrs["labels"] = np.asarray(labels)
        np.savez(tmp_path / name, **arrs)
    write("train.npz", train_labels)
    val = {}
    if val_labels is not None:
        write("val.npz", val_labels)
        val = {"val_path": str(tmp_path / "val.npz")}
    return load_splits(npz_cfg(tmp_path, task, **val)).encoding


def test_integer_labels_are_class_indices(tmp_path):
    assert classes_of(tmp_path, [0, 4, 2], [1, 1]).classes == [0, 1, 2, 3, 4]
    assert read_npz(str(tmp_path / "train.npz"), "classify").label_symbols == [0, 1, 2, 3, 4]
    assert classes_of(tmp_path, [0, 0], [0]).num_outputs("classify") == 2  # one class still needs two outputs
    with pytest.raises(UserError, match=r"val\.npz: sample 1 has label 7, which the training data does not have "
                                        r"\(classes: 0, 1, 2, 3, 4; 1 unknown in all\)$"):
        classes_of(tmp_path, [0, 4, 2], [1, 7])
    with pytest.raises(UserError, match=r"val\.npz: sample 0 has tag 7, which the training data"):
        classes_of(tmp_path, [0, 4, 2], [7, 1], task="tag")
    syn = DataConfig(num_classes=6, num_train=4, num_val=2)  # synthetic: the configured classes, present or not
    assert load_splits(syn).encoding.num_outputs("classify") == synthetic.num_outputs(syn) == 6
