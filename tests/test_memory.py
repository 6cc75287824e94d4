"""Peak memory per rank stays flat across epochs (issue 17).

On CPU oneDNN caches the primitives of every distinct LSTM/GRU input shape ``(B, T)`` (1024 by
default), and each holds memory that grows with its shape; with variable-length shares every epoch
brought new shapes and peak RSS grew every epoch. ``distributed.onednn_cache_capacity`` (default 8)
bounds the cache through ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` when the environment does not set it.
``collate(..., pad_to_multiple_of=k)`` bounds the shapes instead (measured, not the default: see
docs/batching.md "Memory"); its tests are here too.
"""

from __future__ import annotations

import json
import pickle
from functools import partial

import numpy as np
import pytest
import torch
from helpers import python, torchrun

from ddp_seq.builders import build_seq_model
from ddp_seq.config import DistributedConfig, load_config
from ddp_seq.data.collate import IGNORE_INDEX, collate, collate_dp, fetch
from ddp_seq.data.loader import build_loader
from ddp_seq.data.readers.synthetic import SequenceData, make_synthetic, num_outputs
from ddp_seq.data.sampler import Share
from ddp_seq.parallel.process_group import DistInfo
from ddp_seq.train.evaluation import evaluate
from ddp_seq.train.loaders import make_sampler

SINGLE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)


def ragged(lengths, features: int | None, per_step: bool, seed: int = 0) -> SequenceData:
    """Sequences whose values are never 0 (padding is recognisable), per-sequence or per-step int targets."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(lengths.sum())
    values = (rng.integers(1, 10, size=total).astype(np.int64) if features is None
              else (rng.random((total, features)) + 0.5).astype(np.float32))
    targets = rng.integers(0, 2, size=total if per_step else len(lengths)).astype(np.int64)
    return SequenceData(values, offsets, targets, per_step)


@pytest.mark.parametrize("features", [3, None], ids=["features", "token-ids"])
@pytest.mark.parametrize("per_step", [False, True], ids=["per-sequence", "per-step"])
@pytest.mark.parametrize(("multiple", "steps"), [(1, 7), (4, 8), (7, 7), (8, 8), (16, 16)])
def test_collate_pads_time_up_to_a_multiple(features, per_step, multiple, steps):
    data = ragged([4, 1, 7, 2, 5, 3], features, per_step)
    indices = np.array([3, 0, 2, 5])
    share = Share(indices, True, global_count=9, global_tokens=40)
    plain = collate(fetch(data, share))
    batch = collate(fetch(data, share), pad_to_multiple_of=multiple)

    assert tuple(batch.inputs.shape[:2]) == (4, steps) and batch.inputs.shape[2:] == plain.inputs.shape[2:]
    assert tuple(batch.mask.shape) == (4, steps)
    assert torch.equal(batch.lengths, plain.lengths) and torch.equal(batch.indices, plain.indices)
    assert torch.equal(batch.weights, plain.weights)
    assert (batch.global_count, batch.global_tokens, batch.position) == (9, 40, plain.position)
    # The real steps are the unpadded batch's; everything past it is padding (0, masked, ignored).
    assert torch.equal(batch.inputs[:, :7], plain.inputs) and torch.all(batch.inputs[:, 7:] == 0)
    assert torch.equal(batch.mask[:, :7], plain.mask) and not batch.mask[:, 7:].any()
    assert batch.mask.sum(1).tolist() == batch.lengths.tolist()
    if per_step:
        assert tuple(batch.targets.shape) == (4, steps)
        assert torch.equal(batch.targets[:, :7], plain.targets) and torch.all(batch.targets[:, 7:] == IGNORE_INDEX)
    else:
        assert torch.equal(batch.targets, plain.targets)
    assert batch.real_tokens == plain.real_tokens == int(data.lengths[indices].sum())
    assert batch.padded_tokens == 4 * steps  # the telemetry counts the extra padding

    dp = collate_dp(fetch(data, share), pad_to_multiple_of=multiple)
    assert tuple(dp.inputs.shape[:2]) == (4, steps) and torch.equal(dp.scatter_lengths, dp.lengths)


def test_collate_default_and_bad_multiples():
    data = ragged([3, 5], 2, per_step=False)
    items = [data[0], data[1]]
    assert collate(items).inputs.shape[1] == 5, "collate() itself keeps padding to the longest"
    assert collate(items, 0.0, 4).inputs.shape[1] == 8
    for bad in (0, -8, 2.5):
        with pytest.raises(ValueError, match="pad_to_multiple_of"):
            collate(items, pad_to_multiple_of=bad)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_partial_collate_pads_in_dataloader_workers(workers):
    cfg = load_config(overrides=["data.num_val=40", "data.length_median=9", "data.max_length=30",
                                 "batching.eval_batch_size=16"])
    data = make_synthetic(cfg.data, "val")
    collate_fn = partial(collate, pad_to_multiple_of=8)
    pickle.loads(pickle.dumps(collate_fn))  # what DataLoader workers get under the spawn start method
    padded = list(build_loader(data, make_sampler(data, cfg, SINGLE, train=False), collate_fn, num_workers=workers))
    plain = list(build_loader(data, make_sampler(data, cfg, SINGLE, train=False)))
    assert [b.inputs.shape[1] for b in plain] == [int(b.lengths.max()) for b in plain]
    assert [b.inputs.shape[1] for b in padded] == [-(-int(b.lengths.max()) // 8) * 8 for b in plain]
    assert [b.indices.tolist() for b in padded] == [b.indices.tolist() for b in plain]


@pytest.mark.parametrize("execution", ["packed", "padded"])
@pytest.mark.parametrize(("task", "cell", "bidirectional", "pooling"),
                         [("classify", "lstm", False, "last"), ("classify", "gru", True, "max"),
                          ("tag", "lstm", True, "last"), ("regress", "lstm", False, "mean")])
def test_metrics_unchanged_by_padding_to_a_multiple(task, cell, bidirectional, pooling, execution):
    common = [f"data.task={task}", "data.num_val=53", "data.length_median=9", "data.max_length=40",
              "model.hidden=16", "model.embedding_dim=8", "model.layers=2", f"model.cell={cell}",
              f"model.bidirectional={str(bidirectional).lower()}", f"model.pooling={pooling}",
              f"model.execution={execution}", "batching.eval_batch_size=16", "training.monitor=val_loss"]
    cfg = load_config(overrides=common)
    data = make_synthetic(cfg.data, "val")
    torch.manual_seed(5)
    model = build_seq_model(task, data.num_features, num_outputs(cfg.data), cfg.model)
    results = {}
    for multiple in (1, 16):
        loader = build_loader(data, make_sampler(data, cfg, SINGLE, train=False),
                              partial(collate, pad_to_multiple_of=multiple))
        results[multiple] = evaluate(model, data, cfg, SINGLE, loader=loader)
    plain, padded = results[1], results[16]
    assert set(plain) == set(padded)
    for key in plain:
        if key not in ("loss", "mse", "mae"):  # counts and what derives from them (f1, confusion): exact
            assert padded[key] == plain[key]
        else:  # equal here but for one case: packed + mean pooling sums over a longer T (float32, last bit)
            assert padded[key] == pytest.approx(plain[key], rel=1e-6, abs=0), (key, plain, padded)


# -- the default: a bounded oneDNN primitive cache --------------------------------------------------

#: Runs setup() once per case, in one process (a process start costs seconds; setup reads the
#: environment at each call): argv[1] is a JSON list of [capacity, environment] pairs.
_PROBE = """
import json, os, sys
from ddp_seq.config import DistributedConfig
from ddp_seq.parallel.process_group import setup
NAMES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")
for capacity, env in json.loads(sys.argv[1]):
    for name in NAMES:
        os.environ[name] = env.get(name, "")
    setup(DistributedConfig(onednn_cache_capacity=capacity))
    print(json.dumps({k: os.environ.get(k) for k in NAMES}))
"""

CACHE_CASES = {  # name: (distributed.onednn_cache_capacity, environment before setup, the value oneDNN then reads)
    "default": (8, {}, "8"),  # unset: the configured default
    "empty": (8, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": ""}, "8"),  # empty counts as unset
    "configured": (32, {}, "32"),
    "off": (0, {}, ""),  # 0: left alone (oneDNN's own default)
    "user-onednn": (8, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}, "1024"),  # the user's setting wins
    "user-dnnl": (8, {"DNNL_PRIMITIVE_CACHE_CAPACITY": "1024"}, ""),  # so does the legacy name (oneDNN reads both)
}


def test_setup_sets_the_cache_capacity_unless_the_user_did():
    cases = [(capacity, env) for capacity, env, _ in CACHE_CASES.values()]
    out = python("-c", _PROBE, json.dumps(cases), ONEDNN_PRIMITIVE_CACHE_CAPACITY="",
                 DNNL_PRIMITIVE_CACHE_CAPACITY="").check().stdout.splitlines()
    results = [json.loads(line) for line in out if line.startswith("{")]
    assert len(results) == len(CACHE_CASES)
    for (name, (_, env, want)), got in zip(CACHE_CASES.items(), results):
        assert got["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == want, name
        assert got["DNNL_PRIMITIVE_CACHE_CAPACITY"] == env.get("DNNL_PRIMITIVE_CACHE_CAPACITY", ""), name


def test_cache_capacity_default_and_bounds():
    assert DistributedConfig().onednn_cache_capacity == 8
    assert load_config(overrides=["distributed.onednn_cache_capacity=0"]).distributed.onednn_cache_capacity == 0
    with pytest.raises(Exception, match="onednn_cache_capacity"):
        load_config(overrides=["distributed.onednn_cache_capacity=-1"])


#: 2 ranks, 6 epochs of 2,000 sequences (lengths lognormal, median 45, up to 400) in batches of 64 cut
#: from pools of 20 batches: the shares' (B, T) shapes differ from epoch to epoch.
MEMORY_JOB = ["data.num_train=2000", "data.num_val=200", "batching.pool=20", "training.epochs=6",
              "checkpoint.save=false", "logging.progress=none", "logging.name=run", "distributed.backend=gloo"]

#: Peak RSS is a high-water mark, so even a bounded cache raises it whenever a larger set of shapes
#: happens to be cached at once; what the bound removes is the rise with every new shape. Growth
#: after epoch 2 (max of epochs 3-6 over epoch 2, per rank) measured on this job: bounded +2.5% to
#: +4.4% here and +11% once in CI (538 -> 587 -> 597 MB, a machine with a higher baseline); unbounded
#: (distributed.onednn_cache_capacity=0) +28% to +55%, and +44% or more on the worse rank of each of
#: 3 runs. The limit sits between the two.
MAX_GROWTH = 0.25


def peak_rss_by_epoch(root) -> list[list[float]]:
    """``[epoch][rank]`` peak RSS in MiB from the run's metrics.jsonl."""
    lines = (root / "run" / "metrics.jsonl").read_text().splitlines()
    return [r["peak_rss_mb"] for r in map(json.loads, lines) if r.get("kind") == "epoch"]


@pytest.mark.slow
def test_peak_rss_is_flat_after_epoch_2(tmp_path):
    torchrun("train.py", "--config", "configs/default.yaml", *MEMORY_JOB, f"logging.root={tmp_path}",
             ONEDNN_PRIMITIVE_CACHE_CAPACITY="", DNNL_PRIMITIVE_CACHE_CAPACITY="", timeout=180).check()
    rss = peak_rss_by_epoch(tmp_path)
    assert len(rss) == 6 and all(len(r) == 2 for r in rss), rss
    for rank in (0, 1):
        second, later = rss[1][rank], max(r[rank] for r in rss[2:])
        assert later <= (1 + MAX_GROWTH) * second, \
            f"rank {rank}: peak RSS per epoch {[round(r[rank]) for r in rss]} MiB"
