"""k-fold splits are checked for every fold before any fold trains (issue 17, part 4).

A class whose only sample falls in fold 3's validation part used to stop the job at fold 3, after
folds 1 and 2 had trained, with a message blaming "the training data" (the file holds the label:
fold 3's training part lacks it). ``sources.check_folds`` now finds it up front. The fast tests
call the functions directly and take ``load_splits`` of each fold -- what training does -- as the
ground truth of which folds fail; the slow one runs ``train.py`` on the reproduction file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, python

from ddp_seq.cli.folds import train_folds
from ddp_seq.config import Config, DataConfig, LoggingConfig
from ddp_seq.data.readers.sources import (
    check_folds,
    fold_assignment,
    fold_indices,
    holdout_indices,
    load_splits,
    read_training,
)
from ddp_seq.errors import UserError
from ddp_seq.parallel.process_group import DistInfo

TABLE_DOC = REPO / "docs" / "fault-tolerance.md"
ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                       backend=None)
TINY = ["model.hidden=8", "model.embedding_dim=8", "model.layers=1", "training.epochs=1", "training.warmup_steps=0",
        "logging.progress=none"]


def reproduction(tmp: Path) -> Path:
    """The bug report's file: 11 ordinary pos/neg lines, then ``rare`` on line 12."""
    rows = [f"{'pos' if i % 2 else 'neg'}\t{'good' if i % 2 else 'bad'} w{i}\n" for i in range(11)]
    path = tmp / "t.tsv"
    path.write_text("".join(rows) + "rare\tdull dull\n", encoding="utf-8")
    return path


def tsv_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(**{"format": "tsv", "tokenizer": "whitespace", "train_path": str(path), **kw})


def failing_folds(cfg: DataConfig) -> list[int]:
    """The folds whose data ``load_splits`` refuses, as a k-fold job would meet them one by one."""
    training, bad = read_training(cfg), []
    for fold in range(cfg.folds):
        try:
            load_splits(cfg, fold, training)
        except UserError:
            bad.append(fold)
    return bad


def check(cfg: DataConfig, world_size: int = 1) -> None:
    check_folds(cfg, read_training(cfg)[0], world_size)


# -- the reproduction -----------------------------------------------------------------------------

def test_the_reported_file_fails_up_front_naming_the_fold_the_label_and_the_file(tmp_path: Path) -> None:
    path = reproduction(tmp_path)
    cfg = tsv_cfg(path, folds=3)
    training = read_training(cfg)[0]
    rare = training.label_symbols.index("rare")
    strata = training.data.targets
    # The fold whose validation part holds line 12, from the dealing itself ...
    fold = next(f for f in range(3) if 11 in fold_indices(12, 3, f, cfg.seed, strata)[1])
    assert int(np.flatnonzero(training.data.targets == rare)[0]) == 11
    # ... is the one load_splits refuses, and the only one (folds before it would have trained).
    assert failing_folds(cfg) == [fold]
    with pytest.raises(UserError) as raised:
        check(cfg)
    message = str(raised.value)
    assert message.startswith(f"{path}: data.folds=3: fold {fold + 1} cannot train: ")
    for part in ("the only sample with label 'rare' (line 12)", f"in fold {fold + 1}'s validation part",
                 "its training part (the other folds) lacks that class", "drop the rare label or merge it"):
        assert part in message, message
    assert "the training data does not have" not in message
    assert "\n" not in message


def test_load_splits_of_that_fold_says_which_split_lacks_the_label(tmp_path: Path) -> None:
    """Without the pre-check (a library caller of load_splits), the fold's own message no longer
    blames "the training data"."""
    cfg = tsv_cfg(reproduction(tmp_path), folds=3)
    [fold] = failing_folds(cfg)
    with pytest.raises(UserError, match=rf"line 12 has label 'rare', which fold {fold + 1}'s training part \(the "
                                        r"other folds\) does not have \(classes: 'neg', 'pos'; 1 unknown in all\)$"):
        load_splits(cfg, fold)


def test_train_folds_refuses_before_any_directory_or_fold(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    cfg = Config(data=tsv_cfg(reproduction(tmp_path), folds=3), logging=LoggingConfig(root=str(root)))
    trained = []
    with pytest.raises(UserError, match=r"data\.folds=3: fold \d cannot train"):
        train_folds(cfg, ONE_PROCESS, lambda *args: trained.append(args))
    assert trained == []
    assert not root.exists() or list(root.iterdir()) == []


# -- counts ---------------------------------------------------------------------------------------

def test_more_folds_than_samples_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("pos\tab\nneg\tcd\npos\tef\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^data\.folds: 5 folds need at least 5 samples; {path} has 3: use at most "
                                        r"data\.folds=3, or add samples$"):
        check(tsv_cfg(path, folds=5))
    path.write_text("pos\tab\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"need at least 2 samples; .* has 1: add samples$"):
        check(tsv_cfg(path, folds=2))


@pytest.mark.parametrize("folds", [2, 3, 5, 8])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_more_folds_than_samples_of_a_class(tmp_path: Path, folds: int, count: int) -> None:
    """Stratified dealing puts a class's samples in consecutive folds (one each while there are fewer
    than ``folds``): a class of 2 or more is in every training part, even with more folds than
    samples (only some validation parts lack it); a class of one sample is missing from exactly
    the training part of the fold that validates on it, whatever the number of folds."""
    rows = [f"{'pos' if i % 2 else 'neg'}\tw{i} x\n" for i in range(20)]
    rows[7:7] = [f"rare\tr{j} y\n" for j in range(count)]  # lines 8 .. 7 + count
    path = tmp_path / "t.tsv"
    path.write_text("".join(rows), encoding="utf-8")
    cfg = tsv_cfg(path, folds=folds)
    bad = failing_folds(cfg)
    if count >= 2:
        assert bad == []
        check(cfg)
        for fold in range(folds):
            assert "rare" in load_splits(cfg, fold).encoding.classes
        return
    assert len(bad) == 1
    with pytest.raises(UserError, match=rf"fold {bad[0] + 1} cannot train: the only sample with label 'rare' "
                                        r"\(line 8\) is in fold"):
        check(cfg)


def test_a_fold_training_part_smaller_than_the_ranks(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("".join(f"{'pos' if i % 2 else 'neg'}\tw{i}\n" for i in range(5)), encoding="utf-8")
    cfg = tsv_cfg(path, folds=2)
    check(cfg, world_size=2)  # folds of 3 and 2 samples: training parts of 2 and 3
    with pytest.raises(UserError, match=rf"^{path}: data\.folds=2: fold 1's training part has 2 samples, too few to "
                                        r"feed 3 ranks \(one per rank at least\); add samples or run fewer ranks$"):
        check(cfg, world_size=3)


def test_a_file_of_one_label(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("pos\ta\npos\tb\npos\tc\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}: data\.folds=3: the file holds only the label 'pos' \(at least "
                                        r"two classes are needed\)$"):
        check(tsv_cfg(path, folds=3))


# -- valid configs pass ---------------------------------------------------------------------------

@pytest.mark.parametrize("folds", [2, 3, 5, 10])
def test_a_valid_k_fold_config_passes_for_every_fold(tmp_path: Path, folds: int) -> None:
    rng = np.random.default_rng(folds)
    labels = ["pos"] * 25 + ["neg"] * 20 + ["meh"] * 5
    rows = [f"{label}\t{' '.join(rng.choice(list('abcdef'), size=int(rng.integers(1, 6))))}\n"
            for label in rng.permutation(labels)]
    path = tmp_path / "t.tsv"
    path.write_text("".join(rows), encoding="utf-8")
    cfg = tsv_cfg(path, folds=folds)
    check(cfg, world_size=2)
    covered = []
    for fold in range(folds):
        splits = load_splits(cfg, fold)
        assert splits.encoding.classes == ["meh", "neg", "pos"]
        covered.extend(splits.val.positions.tolist())
    assert sorted(covered) == list(range(50))


def test_synthetic_and_regress_folds_pass(tmp_path: Path) -> None:
    synthetic = DataConfig(folds=4, num_train=40)
    check(synthetic, world_size=2)
    path = tmp_path / "r.tsv"
    path.write_text("".join(f"{i * 0.5}\tw{i}\n" for i in range(9)), encoding="utf-8")
    check(tsv_cfg(path, task="regress", folds=3))


# -- the pre-check agrees with the folds' own loading ---------------------------------------------

def write_jsonl(path: Path, task: str, labels: list) -> None:
    key = "tags" if task == "tag" else "label"
    rows = []
    for i, label in enumerate(labels):
        tokens = [f"t{i % 4}", "x"] if task != "tag" else [f"t{j}" for j in range(len(label))]
        rows.append(json.dumps({"tokens": tokens, key: label}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def random_labels(rng: np.random.Generator, task: str, n: int) -> list:
    names = ["a", "b", "c", "d"] if task != "ints" else [0, 1, 2, 3]
    p = [0.45, 0.4, 0.1, 0.05]
    if task == "tag":
        return [[str(t) for t in rng.choice(names, size=int(rng.integers(1, 4)), p=p)] for _ in range(n)]
    return [names[i] if task == "names" else int(names[i]) for i in rng.choice(4, size=n, p=p)]


def test_the_pre_check_fails_exactly_when_some_fold_fails_and_names_the_first(tmp_path: Path) -> None:
    """Random small files with rare labels -- class names, class indices (JSON integers: the classes are
    0..largest, so a rare middle index is no error) and per-step tags (folds not stratified)."""
    rng = np.random.default_rng(17)
    outcomes = {"pass": 0, "fold": 0, "one label": 0}
    for case in range(150):
        task = ["names", "ints", "tag"][case % 3]
        n = int(rng.integers(4, 15))
        path = tmp_path / f"c{case}.jsonl"
        write_jsonl(path, task, random_labels(rng, task, n))
        cfg = DataConfig(format="jsonl", train_path=str(path), task="tag" if task == "tag" else "classify",
                         folds=int(rng.integers(2, min(5, n) + 1)), seed=case)
        bad = failing_folds(cfg)
        try:
            check(cfg)
        except UserError as e:
            message = str(e)
            if "the file holds only" in message:
                assert bad == list(range(cfg.folds)), (case, message)
                outcomes["one label"] += 1
            else:
                assert bad and f"fold {bad[0] + 1} cannot train" in message, (case, bad, message)
                outcomes["fold"] += 1
        else:
            assert bad == [], (case, bad)
            outcomes["pass"] += 1
    assert outcomes["pass"] > 20 and outcomes["fold"] > 20, outcomes


def test_a_tag_split_by_chance_into_one_fold(tmp_path: Path) -> None:
    """Tags are not stratified: a tag of 2 samples can land in one fold; then fewer folds or another
    seed may help, and the message says so."""
    labels = [["a", "b"]] * 10 + [["a", "z"], ["b", "z", "a"]]
    samples = np.array([10, 11])
    seed = next(s for s in range(100) if len(set(fold_assignment(12, 4, s)[samples])) == 1)
    fold = int(fold_assignment(12, 4, seed)[10])
    path = tmp_path / "t.jsonl"
    write_jsonl(path, "tag", labels)
    cfg = DataConfig(format="jsonl", train_path=str(path), task="tag", folds=4, seed=seed)
    assert failing_folds(cfg) == [fold]
    with pytest.raises(UserError, match=rf"fold {fold + 1} cannot train: all 2 samples with tag 'z' \(lines 11, "
                                        r"12\) are in fold .* lacks that tag; use fewer folds or another data\.seed, "
                                        r"or drop or merge the rare tag$"):
        check(cfg)


# -- the hold-out's message -----------------------------------------------------------------------

def test_a_held_out_label_names_the_training_part_and_what_to_do(tmp_path: Path) -> None:
    path = reproduction(tmp_path)
    seed = next(s for s in range(100) if 11 in holdout_indices(12, 0.25, s)[1])
    with pytest.raises(UserError, match=rf"^{path} line 12 has label 'rare', which the training part \(all but the "
                                        r"data\.val_fraction=0\.25 hold-out\) does not have \(classes: 'neg', 'pos'; "
                                        r"1 unknown in all\); drop or merge the rare label, change data\.seed, or "
                                        r"give data\.val_path$"):
        load_splits(tsv_cfg(path, val_fraction=0.25, seed=seed))


# -- the docs -------------------------------------------------------------------------------------

def test_the_bad_input_table_shows_these_messages(tmp_path: Path) -> None:
    table = TABLE_DOC.read_text(encoding="utf-8").split("<!-- bad-input:start -->", 1)[1].split(
        "<!-- bad-input:end -->", 1)[0]
    path = reproduction(tmp_path)
    messages = {}
    for name, run in (("fold-lacks-a-rare-class", lambda: check(tsv_cfg(path, folds=3))),
                      ("val-fraction-holds-out-a-rare-label",
                       lambda: load_splits(tsv_cfg(path, val_fraction=0.25, seed=1)))):
        with pytest.raises(UserError) as raised:
            run()
        messages[name] = str(raised.value).replace(f"{tmp_path}/", "")
    for name, message in messages.items():
        row = next((line for line in table.splitlines() if f"`{name}`" in line), "")
        assert f"`ddp-seq: error: {message}`" in row, f"the row {name} should show:\nddp-seq: error: {message}"


# -- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_py_on_the_reported_file_exits_2_with_one_line_and_leaves_no_run(tmp_path: Path) -> None:
    path = reproduction(tmp_path)
    root = tmp_path / "runs"
    proc = python("train.py", *TINY, "data.format=tsv", "data.tokenizer=whitespace", f"data.train_path={path}",
                  "data.folds=3", f"logging.root={root}").check(2)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.report()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.report()
    assert lines[0].startswith(f"ddp-seq: error: {path}: data.folds=3: fold "), proc.report()
    assert "label 'rare'" in lines[0] and "line 12" in lines[0], proc.report()
    assert not root.exists() or list(root.iterdir()) == [], proc.report()
