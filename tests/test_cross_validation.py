"""k-fold for everyone: ``ddp_seq.cross_validate`` of a user's dataset and model, and the config
path's ``data.folds`` with ``data.target`` through it.

The split is pure data code (``ddp_seq.data.folds``), tested without a process group; the job is
tested as users run it: in one process, on 2 torchrun ranks (the same folds and metrics), and
killed in fold 2 then started again (it resumes there and ends with the uninterrupted metrics).
"""

from __future__ import annotations

import json
import signal
import sys

import numpy as np
import pytest
from helpers import PYTHON, REPO, run, torchrun

from ddp_seq import UserError, cross_validate, load_config
from ddp_seq.cli import main
from ddp_seq.data.folds import fold_assignment

WORKERS = REPO / "tests" / "workers"
sys.path.insert(0, str(WORKERS))
from off_road import OVERRIDES, ReviewModel, Reviews  # noqa: E402

KFOLD = WORKERS / "kfold.py"


def test_stratified_folds_hold_each_class_in_proportion():
    labels = np.random.default_rng(0).choice(6, size=301, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])
    assigned = fold_assignment(301, 5, seed=3, strata=labels)
    assert np.array_equal(assigned, fold_assignment(301, 5, seed=3, strata=labels))  # from the seed alone
    assert sorted(np.bincount(assigned)) == [60, 60, 60, 60, 61]
    for c in range(6):
        per_fold = np.bincount(assigned[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)  # each fold holds its share of every class


def test_group_folds_keep_each_group_whole_and_balance_the_sizes():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 40, size=500)  # 40 speakers, about 12 utterances each
    assigned = fold_assignment(500, 4, seed=7, groups=groups)
    for g in np.unique(groups):
        assert len(set(assigned[groups == g])) == 1, g
    sizes = np.bincount(assigned, minlength=4)
    assert sizes.max() - sizes.min() <= np.bincount(groups).max(), sizes  # greedy: within one group's size
    assert not np.array_equal(assigned, fold_assignment(500, 4, seed=8, groups=groups))
    with pytest.raises(ValueError, match="3 groups cannot fill 4 folds"):
        fold_assignment(6, 4, seed=0, groups=[0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"folds should be in \[2, 6\]"):
        fold_assignment(6, 7, seed=0)


def in_process(run_dir, **kwargs) -> dict:
    cfg = load_config(overrides=[*OVERRIDES, "checkpoint.every_steps=3", "training.epochs=2"])
    return cross_validate(lambda: ReviewModel(50, 6), Reviews(300, 0), folds=3, cfg=cfg, objective="classify",
                          run_dir=run_dir, **kwargs)


def result_of(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> tuple:
    run_dir = tmp_path_factory.mktemp("kfold") / "one"
    return in_process(run_dir), run_dir


def test_cross_validate_writes_each_fold_and_the_mean_and_std(one_rank):
    result, run_dir = one_rank
    assert [r["fold"] for r in result["folds"]] == [1, 2, 3] and result["monitor"] == "val_accuracy"
    accuracy = [r["val_accuracy"] for r in result["folds"]]
    assert result["mean"]["val_accuracy"] == pytest.approx(np.mean(accuracy))
    assert result["std"]["val_accuracy"] == pytest.approx(np.std(accuracy))
    assert json.loads((run_dir / "folds.json").read_text()) == result
    for fold in (1, 2, 3):
        assert (run_dir / f"fold-{fold}" / "checkpoints" / "best.pt").is_file()
    # 300 items in 3 stratified folds: 100 validation items each
    records = [json.loads(line) for line in (run_dir / "fold-1" / "metrics.jsonl").read_text().splitlines()]
    assert "cross-validation: fold 1, 200 training and 100 validation items" in (run_dir / "fold-1" /
                                                                                 "train.log").read_text()
    assert records[-1]["kind"] == "summary"


def test_a_finished_job_is_not_trained_again_and_another_split_is_refused(one_rank, capsys):
    result, run_dir = one_rank
    before = (run_dir / "fold-2" / "metrics.jsonl").read_text()
    assert in_process(run_dir) == result  # every fold finished: read back, nothing trained
    assert (run_dir / "fold-2" / "metrics.jsonl").read_text() == before
    cfg = load_config(overrides=[*OVERRIDES, "checkpoint.every_steps=3", "training.epochs=2"])
    with pytest.raises(UserError, match="holds a k-fold job of another split, config or model \\(folds 3 -> 4"):
        cross_validate(lambda: ReviewModel(50, 6), Reviews(300, 0), folds=4, cfg=cfg, run_dir=run_dir)
    # the same split with another learning rate and a wider model: its stored folds are not this job's
    cfg.training.lr = 0.5
    with pytest.raises(UserError) as refused:
        cross_validate(lambda: ReviewModel(50, 6, hidden=40), Reviews(300, 0), folds=3, cfg=cfg, run_dir=run_dir)
    line = str(refused.value)
    assert "off_road:ReviewModel" in line and "training.lr 0.02 -> 0.5" in line and "overwrite=True" in line, line
    assert (run_dir / "fold-2" / "metrics.jsonl").read_text() == before  # nothing was trained or removed


@pytest.mark.slow
def test_two_ranks_make_the_same_folds_and_metrics(one_rank, tmp_path):
    result, _ = one_rank
    two = result_of(torchrun(KFOLD, tmp_path / "two", nproc=2, timeout=240).check().stdout)
    assert [r["fold"] for r in two["folds"]] == [1, 2, 3]
    for a, b in zip(result["folds"], two["folds"]):
        assert a["best_epoch"] == b["best_epoch"] and a["val_accuracy"] == b["val_accuracy"], (a, b)
        # the same sums in another order on 2 ranks: float32 rounding (measured ~2e-8)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)


@pytest.mark.slow
def test_a_job_killed_in_fold_2_resumes_there_and_ends_as_uninterrupted(one_rank, tmp_path, capsys):
    result, _ = one_rank
    run_dir = tmp_path / "killed"
    # 200 training items / batch 32 = 7 steps an epoch, 14 a fold: loss 21 is fold 2's step 7, after
    # its step-6 checkpoint (checkpoint.every_steps=3)
    killed = run([PYTHON, str(KFOLD), str(run_dir), "21"], timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.report()
    assert (run_dir / "fold-1" / "result.json").is_file() and not (run_dir / "fold-2" / "result.json").exists()
    fold_1 = (run_dir / "fold-1" / "metrics.jsonl").read_text()
    assert in_process(run_dir) == result
    assert (run_dir / "fold-1" / "metrics.jsonl").read_text() == fold_1  # the finished fold was not trained again
    log = (run_dir / "fold-2" / "train.log").read_text()
    assert f"resuming from {run_dir / 'fold-2' / 'checkpoints' / 'step-00000006.pt'}: epoch 1, global batch 6/7" in log


def test_the_config_path_k_folds_a_data_target(tmp_path, capsys):
    worker = WORKERS / "off_road.py"
    args = ["train", f"data.target={worker}:make_data", f"model.target={worker}:ReviewModel", "data.folds=3",
            *OVERRIDES, "training.epochs=1", f"logging.root={tmp_path}", "logging.name=cv"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "k-fold over the 400 training items" in out and "mean +- std over folds" in out
    result = json.loads((tmp_path / "cv" / "folds.json").read_text())
    assert [r["fold"] for r in result["folds"]] == [1, 2, 3]
    for fold in (1, 2, 3):
        assert "--- resolved config ---" in (tmp_path / "cv" / f"fold-{fold}" / "train.log").read_text()
