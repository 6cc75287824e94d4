"""Exact evaluation: every validation sample counted exactly once, whatever the world size.

Note on tolerances: a float32 RNN's output for one sequence changes in the last bits with the
other sequences of its batch (observed ~3e-8), and world size 2 batches the validation samples
differently from world size 1; so loss-like metrics are compared with a relative tolerance of 1e-6
(a single sample counted twice or lost moves the loss of 101 samples by ~1e-2) and accuracy exactly,
as the counts (classify, tag: the confusion matrix and what derives from it, f1_macro and the
per-class lists) are.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DDP_SCENARIOS

from ddp_seq.builders import build_seq_model
from ddp_seq.config import load_config
from ddp_seq.data.readers.synthetic import make_synthetic, num_outputs
from ddp_seq.data.sampler import global_batches
from ddp_seq.parallel.process_group import DistInfo
from ddp_seq.train.evaluation import evaluate
from ddp_seq.train.objective import METRICS, PER_CLASS, class_metrics

REL = 1e-6
#: Metrics compared with a relative tolerance; every other one (counts and what derives from them) exactly.
LOSS_LIKE = ("loss", "mse", "mae")
SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)


def result_keys(task: str) -> set[str]:
    """What evaluate() returns for ``task``: the scalar metrics and, for classify and tag, the per-class ones."""
    return set(METRICS[task]) | (set() if task == "regress" else set(PER_CLASS))


@torch.no_grad()
def naive_metrics(model, data, task: str) -> dict:
    """Each validation sample alone through the model; sums in float64, divided once; the
    confusion matrix counted sample by sample (token by token)."""
    model.eval()
    loss = correct = sq = ab = 0.0
    count = 0
    classes = model.head.out_features if task != "regress" else 0
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for i in range(len(data)):
        s, e = int(data.offsets[i]), int(data.offsets[i + 1])
        out = model(torch.from_numpy(data.values[s:e])[None], torch.tensor([e - s]))[0].double()
        if task == "classify":
            y = int(data.targets[i])
            loss += float(-F.log_softmax(out, -1)[y])
            correct += float(out.argmax() == y)
            confusion[y, int(out.argmax())] += 1
            count += 1
        elif task == "tag":
            y = torch.from_numpy(data.targets[s:e])
            loss += float(F.cross_entropy(out[:e - s], y, reduction="sum"))
            correct += float((out[:e - s].argmax(-1) == y).sum())
            np.add.at(confusion, (y.numpy(), out[:e - s].argmax(-1).numpy()), 1)
            count += e - s
        else:
            err = float(out) - float(data.targets[i])
            loss += err * err
            sq += err * err
            ab += abs(err)
            count += 1
    if task == "regress":
        return {"loss": loss / count, "mse": sq / count, "mae": ab / count}
    return {"loss": loss / count, "accuracy": correct / count, **class_metrics(confusion)}


def assert_metrics_equal(got: dict, want: dict, rel: float = REL) -> None:
    assert set(got) == set(want), (got, want)
    for k in want:
        if k in LOSS_LIKE:
            assert math.isclose(got[k], want[k], rel_tol=rel, abs_tol=0.0), (k, got, want)
        else:
            assert got[k] == want[k], (k, got, want)


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize("task", ["classify", "tag", "regress"])
def test_evaluate_equals_naive_per_sample_loop(task, execution):
    cfg = load_config(overrides=[f"data.task={task}", "data.num_val=37", "data.length_median=9",
                                 "data.max_length=25", "model.hidden=8", "model.embedding_dim=8",
                                 "model.bidirectional=true", "model.pooling=mean", f"model.execution={execution}",
                                 "batching.eval_batch_size=8", "training.monitor=val_loss"])
    data = make_synthetic(cfg.data, "val")
    torch.manual_seed(3)
    model = build_seq_model(task, data.num_features, num_outputs(cfg.data), cfg.model)
    model.train()
    got = evaluate(model, data, cfg, SINGLE)
    assert model.training, "evaluate() must restore the module's training mode"
    assert set(got) == result_keys(task)
    assert_metrics_equal(got, naive_metrics(model, data, task))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("name", list(DDP_SCENARIOS))
def test_two_ranks_evaluate_exactly_like_one(ddp_runs, name, when):
    """world size 2 (torchrun, gloo) vs 1 on the same fixed model, 101 validation samples."""
    cfg = load_config(overrides=DDP_SCENARIOS[name])
    data = make_synthetic(cfg.data, "val")
    assert len(data) == 101
    plan = global_batches(data.lengths, batch_size=cfg.batching.eval_batch_size, shuffle=False)
    assert min(len(b) for b in plan) < 2, "precondition: one eval batch leaves a rank with a filler sample"
    one, two = ddp_runs.metrics(name, 1)[when], ddp_runs.metrics(name, 2)[when]
    assert set(one) == result_keys(cfg.data.task)
    assert_metrics_equal(two, one)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DDP_SCENARIOS))
def test_two_ranks_evaluate_like_the_naive_loop(ddp_runs, name):
    cfg = load_config(overrides=DDP_SCENARIOS[name])
    data = make_synthetic(cfg.data, "val")
    model = build_seq_model(cfg.data.task, data.num_features, num_outputs(cfg.data), cfg.model)
    model.load_state_dict(ddp_runs.state(name, 2)["before"])
    want = naive_metrics(model, data, cfg.data.task)
    assert_metrics_equal(ddp_runs.metrics(name, 2)["before"], want)
    # and the metrics moved with the step (the 'after' comparison above is not vacuous)
    assert ddp_runs.metrics(name, 2)["after"]["loss"] != want["loss"]


def test_filler_and_uneven_eval_split_in_process():
    """The same plan split for 2 ranks, run here rank by rank, sums to the world-size-1 metrics."""
    from ddp_seq.data.collate import collate, fetch
    from ddp_seq.data.sampler import BucketBatchSampler
    from ddp_seq.train import objective

    cfg = load_config(overrides=["data.task=tag", "data.num_val=21", "model.hidden=8", "model.embedding_dim=8",
                                 "batching.eval_batch_size=4", "training.monitor=val_loss"])
    data = make_synthetic(cfg.data, "val")
    torch.manual_seed(0)
    model = build_seq_model("tag", data.num_features, 2, cfg.model).eval()
    total = None
    tag = objective.TaskObjective("tag")
    with torch.no_grad():
        for rank in range(3):
            sampler = BucketBatchSampler(data.lengths, rank=rank, num_replicas=3, batch_size=4, shuffle=False)
            for step in sampler:
                batch = collate(fetch(data, step))
                part = tag.metric_sums(model(batch.inputs, batch.lengths), batch)
                total = part if total is None else total + part
    assert int(total[2]) == int(np.sum(data.lengths))  # every valid token once, fillers weigh 0
    assert int(total[3:].sum()) == int(np.sum(data.lengths))  # and counted once in the confusion matrix
    assert_metrics_equal(tag.finalize(total), evaluate(model, data, cfg, SINGLE))
