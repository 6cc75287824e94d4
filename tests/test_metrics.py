"""Macro-F1, per-class precision / recall / F1 and the confusion matrix (issue 19, item 4).

The counts are summed per rank and added (as the all-reduce adds them), filler samples and padded
steps excluded; the results must equal scikit-learn's on the same predictions exactly (the same
float64 operations on the same integer counts), with ``labels=range(C)`` and scikit-learn's default
``zero_division`` (0.0; it warns, hence the filter).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from helpers import ragged

from ddp_seq.data.collate import collate, fetch
from ddp_seq.data.sampler import BucketBatchSampler, Share
from ddp_seq.loggers.report import MAX_PRINTED_CONFUSION, class_report
from ddp_seq.train.objective import PER_CLASS, TaskObjective, class_metrics, confusion_counts

sklearn_metrics = pytest.importorskip("sklearn.metrics")

#: 5 outputs: class 3 is predicted but never true, class 4 neither true nor predicted, class 2 never predicted.
NUM_CLASSES = 5


def fixed_logits(data, task: str, seed: int = 0) -> np.ndarray:
    """One row of logits per sample (classify) or per step (tag), whatever batch it lands in, so
    that every split of the data predicts the same. Column 2 never wins, column 4 never wins."""
    rng = np.random.default_rng(seed)
    rows = len(data.lengths) if task == "classify" else int(data.offsets[-1])
    logits = rng.standard_normal((rows, NUM_CLASSES)).astype(np.float32)
    logits[:, 2] = logits[:, 4] = -10.0
    return logits


def outputs_of(batch, logits: np.ndarray, data, task: str) -> torch.Tensor:
    """The batch's outputs looked up by sample (and step); padded steps get random junk logits,
    which the metrics must ignore."""
    if task == "classify":
        return torch.from_numpy(logits[batch.indices.numpy()])
    out = torch.randn(len(batch.indices), int(batch.mask.shape[1]), NUM_CLASSES)
    for row, (index, length) in enumerate(zip(batch.indices.tolist(), batch.lengths.tolist())):
        start = int(data.offsets[index])
        out[row, :length] = torch.from_numpy(logits[start:start + length])
    return out


def shared_sums(data, logits, task: str, world_size: int) -> tuple[torch.Tensor, int, list[set]]:
    """Every rank's sums over its shares, added; the number of filler samples; each rank's true classes."""
    objective, total, fillers, seen = TaskObjective(task), None, 0, []
    for rank in range(world_size):
        classes: set = set()
        sampler = BucketBatchSampler(data.lengths, rank=rank, num_replicas=world_size, batch_size=4, shuffle=False)
        for share in sampler:
            batch = collate(fetch(data, share))
            fillers += int((batch.weights == 0).sum())
            if bool(batch.weights[0] > 0):
                classes.update(batch.targets[batch.targets >= 0].tolist())
            part = objective.metric_sums(outputs_of(batch, logits, data, task), batch)
            total = part if total is None else total + part
        seen.append(classes)
    return total, fillers, seen


def sklearn_reference(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    labels = list(range(NUM_CLASSES))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # UndefinedMetricWarning: the zero_division cases, scored 0.0
        precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(y_true, y_pred, labels=labels)
        macro = sklearn_metrics.f1_score(y_true, y_pred, average="macro", labels=labels)
    return {"f1_macro": macro, "precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": support.tolist(),
            "confusion": sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()}


@pytest.mark.parametrize("task", ["classify", "tag"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_summed_shares_equal_scikit_learn(task, world_size):
    # 21 sequences in batches of 4: the last global batch (1) leaves ranks with a filler sample
    data = ragged([3, 9, 1, 6, 2, 7, 4, 5, 8, 2, 3, 11, 6, 1, 4, 9, 2, 5, 7, 3, 6], features=2,
                  per_step=task == "tag", seed=world_size)
    if task == "classify":
        data.targets[data.targets == 1] = 3  # class 1 absent from the truth
    # class 2 only in sample 0: absent from the shares of every rank but one
    data.targets[data.targets == 2] = 0
    data.targets[0 if task == "classify" else slice(0, int(data.offsets[1]))] = 2
    logits = fixed_logits(data, task)
    sums, fillers, seen = shared_sums(data, logits, task, world_size)
    if world_size > 1:
        assert fillers > 0, "precondition: some rank got a filler sample"
        assert any(set().union(*seen) - s for s in seen), "precondition: a rank misses a class another rank has"

    got = TaskObjective(task).finalize(sums)
    y_true, y_pred = data.targets, logits.argmax(1)
    want = sklearn_reference(y_true, y_pred)
    for key in want:
        assert got[key] == want[key], (key, got[key], want[key])  # exact, not approximately
    assert sum(map(sum, got["confusion"])) == len(y_true)  # every real sample (token) once, no filler, no padding
    assert got["accuracy"] == float(np.mean(y_true == y_pred))
    # the zero_division cases are really exercised: never predicted, never true, neither
    assert got["precision"][2] == 0.0 and got["support"][2] > 0
    assert got["f1"][4] == 0.0 and got["support"][4] == 0 and got["confusion"][0][4] == 0
    if task == "classify":
        assert got["recall"][1] == 0.0 and got["support"][1] == 0


def test_the_sums_keep_one_vector_and_the_loss_metrics():
    """One all-reduced vector: [loss, correct, count] then C*C counts; the scalar metrics unchanged."""
    data = ragged([4, 2, 6], features=2, per_step=False)
    logits = fixed_logits(data, "classify")
    batch = collate(fetch(data, Share(range(3), global_count=3, global_tokens=12)))
    outputs = outputs_of(batch, logits, data, "classify")
    sums = TaskObjective("classify").metric_sums(outputs, batch)
    assert sums.dtype == torch.float64 and sums.shape == (3 + NUM_CLASSES ** 2,)
    assert torch.equal(sums[3:], confusion_counts("classify", outputs, batch))
    got = TaskObjective("classify").finalize(sums)
    assert set(got) == {"loss", "accuracy", "f1_macro", *PER_CLASS}
    assert isinstance(got["f1_macro"], float) and got["loss"] == pytest.approx(float(sums[0]) / 3)


def test_regress_has_no_class_metrics():
    data = ragged([4, 2], features=2, per_step=False)
    batch = collate(fetch(data, Share([0, 1], global_count=2, global_tokens=6)))
    sums = TaskObjective("regress").metric_sums(torch.zeros(2), batch)
    assert set(TaskObjective("regress").finalize(sums)) == {"loss", "mse", "mae"}
    with pytest.raises(ValueError, match="classify and tag"):
        confusion_counts("regress", torch.zeros(2), batch)


def test_class_metrics_by_hand():
    # true 0: 3 right, 1 taken for 1; true 1: 2 right; class 2: never true, once predicted (for 1)
    got = class_metrics([[3, 1, 0], [0, 2, 1], [0, 0, 0]])
    assert got["precision"] == [1.0, 2 / 3, 0.0] and got["recall"] == [0.75, 2 / 3, 0.0]
    assert got["f1"] == [6 / 7, 4 / 6, 0.0] and got["support"] == [4, 3, 0]
    assert got["f1_macro"] == pytest.approx((6 / 7 + 4 / 6 + 0.0) / 3, abs=1e-15)


def test_class_report_prints_the_table_and_caps_the_matrix():
    metrics = class_metrics([[3, 1], [0, 2]])
    lines = class_report(metrics, ["neg", "pos"])
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["neg", "1.0000", "0.7500", "0.8571", "4"]
    assert lines[-1].split() == ["pos", "0", "2"] and lines[-2].split() == ["neg", "3", "1"]
    big = class_metrics(np.eye(MAX_PRINTED_CONFUSION + 1, dtype=np.int64))
    lines = class_report(big)
    assert len(lines) == MAX_PRINTED_CONFUSION + 3 and "not printed" in lines[-1]
    assert class_report({"loss": 1.0, "mse": 1.0}) == []


def test_wandb_skips_the_matrix_and_the_names():
    """The records go to wandb as they are: per-class lists become one scalar per class, named from
    ``val_classes`` (``class<i>`` without it); the confusion matrix (a list of lists) and the class
    names themselves are skipped, not handed to wandb."""
    from ddp_seq.loggers.tracking import WandbRun

    class Recorder:  # what WandbRun calls on a wandb run
        def __init__(self) -> None:
            self.logged: list = []

        def log(self, values, step):
            self.logged.append((values, step))

    run = WandbRun(Recorder())
    run.log({"kind": "epoch", "step": 7, "val_f1_macro": 0.5, "val_f1": [0.25, 0.75], "val_classes": ["a", "b"],
             "val_confusion": [[1, 2], [3, 4]]})
    run.log({"kind": "epoch", "step": 8, "val_recall": [1.0, 0.5], "padded_tokens_per_rank": [3, 4],
             "val_classes": [0, 1]})  # integer class names (class-index labels) are names, not metrics
    run.log({"kind": "epoch", "step": 9, "val_f1": [0.5, 0.25]})  # a user's Trainer records have no names
    (values, step), (unnamed, _), (nameless, _) = run.run.logged
    assert nameless == {"epoch/val_f1/class0": 0.5, "epoch/val_f1/class1": 0.25}
    assert step == 7 and values == {"epoch/val_f1_macro": 0.5, "epoch/val_f1/a": 0.25, "epoch/val_f1/b": 0.75}
    assert unnamed == {"epoch/val_recall/0": 1.0, "epoch/val_recall/1": 0.5,
                       "epoch/padded_tokens_per_rank/rank0": 3, "epoch/padded_tokens_per_rank/rank1": 4}


def test_monitor_f1_macro_with_an_objective_without_it_is_one_clear_error():
    from workers.user_parts import MeanPoolGRU, make_datasets

    from ddp_seq import Trainer, UserError, load_config

    train, val = make_datasets(num_train=8, num_val=4)
    cfg = load_config(overrides=["training.monitor=val_f1_macro", "checkpoint.save=false"])

    def loss_fn(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs, batch.targets, reduction="sum"), len(batch.targets)

    with pytest.raises(UserError, match=r"^training.monitor: val_f1_macro is not among the metrics of objective "
                                        r"loss_fn \(val_loss\)$"):
        Trainer(MeanPoolGRU(3, 3), train, val, cfg, objective=loss_fn)


def test_monitor_f1_macro_picks_the_best_checkpoint(tmp_path):
    """The library Trainer on a user's model with the built-in objective: val_f1_macro is in every
    epoch record, best.pt is the epoch with the highest one, and it reproduces the logged value."""
    from workers.user_parts import MeanPoolGRU, make_datasets

    from ddp_seq import Trainer, load_config
    from ddp_seq.train.checkpoint import load_checkpoint, trained_at

    train, val = make_datasets(num_train=32, num_val=16)
    cfg = load_config(overrides=["training.epochs=3", "batching.batch_size=16", "training.lr=0.05",
                                 "training.monitor=val_f1_macro", "logging.progress=none"])
    summary = Trainer(MeanPoolGRU(3, 3), train, val, cfg, run_dir=tmp_path / "run").fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 3
    f1 = [r["val_f1_macro"] for r in epochs]
    assert len(set(f1)) > 1, "precondition: the epochs differ"
    best = max(range(3), key=lambda i: (f1[i], -i))  # the first of the highest
    assert summary["best_epoch"] == best + 1 and summary["best_val_f1_macro"] == f1[best]
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    at = trained_at(state)
    assert at["epoch"] == best + 1 and at["metrics"]["val_f1_macro"] == f1[best]
    assert "val_classes" not in epochs[0]  # a user's datasets: no encoding, no names
    assert class_metrics(epochs[best]["val_confusion"])["f1_macro"] == f1[best]


def test_monitor_f1_macro_not_accuracy_decides_best_and_patience():
    """Epochs whose accuracy and macro-F1 disagree: the best epoch and early stopping follow F1."""
    from workers.user_parts import MeanPoolGRU, make_datasets

    from ddp_seq import Trainer, load_config

    train, val = make_datasets(num_train=8, num_val=4)
    cfg = load_config(overrides=["training.monitor=val_f1_macro", "training.patience=2", "training.epochs=9",
                                 "checkpoint.save=false", "logging.progress=none"])
    trainer = Trainer(MeanPoolGRU(3, 3), train, val, cfg)
    row = {"train_loss": 1.0, "tokens_per_s": 1.0, "padding_efficiency": 1.0, "straggler_ratio": 1.0, "train_s": 1.0}
    # accuracy peaks at epoch 1 and 4, macro-F1 at epoch 2 (a majority-class model scores accuracy, not F1)
    scores = [(0.9, 0.3), (0.7, 0.6), (0.8, 0.5), (0.95, 0.4)]
    improved = [trainer._end_epoch({**row, "epoch": e + 1}, {"val_loss": 1.0, "val_accuracy": acc, "val_f1_macro": f1})
                for e, (acc, f1) in enumerate(scores)]
    assert improved == [True, True, False, False]
    assert trainer.state.best["epoch"] == 2 and trainer.state.best["value"] == 0.6
    assert trainer.state.finished  # patience 2 ran out at epoch 4, although accuracy improved there
