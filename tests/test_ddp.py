"""DDP equivalence: one optimizer step on 2 real gloo ranks (torchrun) == one step in one process.

The worker (tests/workers/ddp_worker.py) builds the real Trainer and calls Trainer.train_step on
this rank's share of the first global batch(es) of epoch 0. ``batching.strategy=random`` makes the
two shares differ in size, which is what breaks a loss that is a mean of per-rank means; the last
test checks that such a loss would indeed be caught at this tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DDP_SCENARIOS

from ddp_seq.builders import build_seq_model
from ddp_seq.config import load_config
from ddp_seq.data.collate import collate, fetch
from ddp_seq.data.readers.synthetic import make_synthetic, num_outputs
from ddp_seq.data.sampler import Share, global_batches

pytestmark = pytest.mark.slow

ATOL = 1e-6
SCENARIOS = list(DDP_SCENARIOS)


def config(name: str):
    return load_config(overrides=DDP_SCENARIOS[name])


def planned_batches(cfg) -> list[np.ndarray]:
    """The first ``grad_accum`` global batches of epoch 0, computed here from the config."""
    data = make_synthetic(cfg.data, "train")
    b = cfg.batching
    plan = global_batches(data.lengths, batch_size=b.batch_size, max_tokens=b.max_tokens, strategy=b.strategy,
                          pool=b.pool, seed=cfg.training.seed, epoch=0)
    return plan[:cfg.training.grad_accum]


def sum_and_count(model, data, task: str, indices) -> tuple[torch.Tensor, int]:
    """The obvious loss: summed over the given samples (tokens for tag), and how many there are."""
    batch = collate(fetch(data, Share(np.asarray(indices, dtype=np.int64), True, 0, 0)))
    out = model(batch.inputs, batch.lengths)
    if task == "classify":
        return F.cross_entropy(out, batch.targets, reduction="sum"), len(indices)
    if task == "regress":
        return ((out - batch.targets) ** 2).sum(), len(indices)
    return F.cross_entropy(out[batch.mask], batch.targets[batch.mask], reduction="sum"), int(batch.mask.sum())


def reference_step(cfg, before: dict, lr: float, groups_per_term: list[list[list[int]]]) -> dict:
    """SGD (no momentum) step from ``before`` on ``mean over terms of (sum of loss / count)``,
    each term being a list of index groups; with global gradient-norm clipping if configured."""
    data = make_synthetic(cfg.data, "train")
    model = build_seq_model(cfg.data.task, data.num_features, num_outputs(cfg.data), cfg.model)
    model.load_state_dict(before)
    model.train()
    params = dict(model.named_parameters())
    loss = 0.0
    for groups in groups_per_term:
        sums = [sum_and_count(model, data, cfg.data.task, g) for g in groups]
        loss = loss + sum(s for s, _ in sums) / sum(c for _, c in sums)
    loss = loss / len(groups_per_term)
    grads = torch.autograd.grad(loss, list(params.values()))
    scale = 1.0
    if cfg.training.grad_clip > 0:
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        assert norm > cfg.training.grad_clip, "precondition: clipping is active in this scenario"
        scale = min(1.0, cfg.training.grad_clip / (norm + 1e-6))
    after = {k: v.clone() for k, v in before.items()}
    with torch.no_grad():
        for (name, _), g in zip(params.items(), grads):
            after[name] = before[name] - lr * scale * g
    return after


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("name", SCENARIOS)
def test_shares_split_the_planned_global_batches(ddp_runs, name):
    cfg = config(name)
    plan = planned_batches(cfg)
    data = make_synthetic(cfg.data, "train")
    r0, r1 = ddp_runs.share(name, 2, 0), ddp_runs.share(name, 2, 1)
    single = ddp_runs.share(name, 1, 0)
    assert r0["world_size"] == r1["world_size"] == 2 and single["world_size"] == 1
    assert len(r0["steps"]) == len(r1["steps"]) == len(single["steps"]) == len(plan) == cfg.training.grad_accum
    unequal = False
    for k, batch in enumerate(plan):
        a, b, s = r0["steps"][k], r1["steps"][k], single["steps"][k]
        assert a["real"] and b["real"] and s["real"]
        assert not set(a["indices"]) & set(b["indices"])
        assert sorted(a["indices"] + b["indices"]) == sorted(batch.tolist()) == sorted(s["indices"])
        for step in (a, b, s):
            assert step["global_count"] == len(batch)
            assert step["global_tokens"] == int(data.lengths[batch].sum())
        size = (lambda ix: int(data.lengths[ix].sum())) if cfg.data.task == "tag" else len
        unequal |= size(a["indices"]) != size(b["indices"])
    assert unequal, "precondition: the ranks' shares must differ in size (count, or tokens for tag)"


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_ranks_end_with_the_parameters_of_one_process(ddp_runs, name):
    one, two = ddp_runs.state(name, 1), ddp_runs.state(name, 2)
    assert max_diff(one["before"], two["before"]) == 0.0, "both start from the same seeded weights"
    moved = max_diff(one["before"], one["after"])
    assert moved > 1e-3, f"the step must move the weights well beyond the tolerance (moved {moved:.2e})"
    diff = max_diff(one["after"], two["after"])
    assert diff <= ATOL, f"world size 2 differs from world size 1 by {diff:.3e} after one step"


@pytest.mark.parametrize("name", SCENARIOS)
def test_step_is_sgd_on_the_mean_loss_of_the_global_batch(ddp_runs, name):
    """Independent reference: grad of (total loss / global count) in one process, here."""
    cfg = config(name)
    lr = ddp_runs.metrics(name, 2)["lr"]
    assert lr == pytest.approx(cfg.training.lr)  # warmup_steps=0: the first step runs at the peak rate
    two = ddp_runs.state(name, 2)
    plan = [b.tolist() for b in planned_batches(cfg)]
    expected = reference_step(cfg, two["before"], lr, [plan])
    diff = max_diff(expected, two["after"])
    assert diff <= ATOL, f"DDP step differs from SGD on the global mean loss by {diff:.3e}"


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_mean_of_per_rank_means_would_be_caught(ddp_runs, name):
    """Sensitivity: the same step with the loss averaged per rank first lands far outside ATOL."""
    cfg = config(name)
    lr = ddp_runs.metrics(name, 2)["lr"]
    two = ddp_runs.state(name, 2)
    per_rank = [[step["indices"] for step in ddp_runs.share(name, 2, r)["steps"]] for r in (0, 1)]
    wrong = reference_step(cfg, two["before"], lr, per_rank)
    diff = max_diff(wrong, two["after"])
    assert diff > 50 * ATOL, f"a mean of per-rank means is only {diff:.3e} away: the test could not see it"
