"""``ddp-seq plan``: its figures against an obvious computation over every rank's shares, the lengths it
reads against the training data the job builds, its output, and its bad-input line.

The reference builds one ``BucketBatchSampler`` per rank -- what each rank of a real job builds --
walks its shares and sums what each rank would compute, share by share, as the Trainer's counters do
(a filler share is one sequence at weight 0: padded tokens, no real ones). In-process, no launch.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.distributed as dist

from ddp_seq.cli import main
from ddp_seq.cli import plan as plan_module
from ddp_seq.cli.plan import epoch_figures, plan, render, training_lengths, variants
from ddp_seq.config import load_config
from ddp_seq.data.readers.sources import load_splits
from ddp_seq.data.sampler import BucketBatchSampler, straggler_ratio

WORKER = "tests/workers/user_parts.py"


def slow_plan(lengths: np.ndarray, world_size: int, epoch: int, **options) -> dict:
    """The figures of ``epoch_figures``, from each rank's own sampler, share by share."""
    samplers = [BucketBatchSampler(lengths, num_replicas=world_size, rank=r, **options) for r in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    steps = [list(sampler) for sampler in samplers]
    assert len({len(s) for s in steps}) == 1  # the same number of steps on every rank
    seqs, padded, costs_per_step, real, fillers, largest = [], [], [], 0, 0, (0, 0, 0)
    for position in range(len(steps[0])):
        costs = []
        for rank in range(world_size):
            share = steps[rank][position]
            longest = max(int(lengths[i]) for i in share)
            cost = len(share) * longest
            padded.append(cost)
            if share.real:
                seqs.append(len(share))
                real += sum(int(lengths[i]) for i in share)
                costs.append(cost)
                largest = max(largest, (cost, len(share), longest))
            else:
                seqs.append(0)
                fillers += 1
                costs.append(0)  # a filler costs nothing in straggler_ratio's terms
        costs_per_step.append(costs)
    slowest = sum(max(c) for c in costs_per_step)
    mean = sum(sum(c) / world_size for c in costs_per_step)
    return {"steps": len(steps[0]), "sequences": sum(seqs), "real_tokens": real, "padded_tokens": sum(padded),
            "sequences_per_step_mean": np.mean(seqs), "sequences_per_step_max": max(seqs),
            "padded_per_step_mean": np.mean(padded), "padded_per_step_max": largest[0],
            "largest_share": largest[1:], "filler_steps": fillers,
            "padding_efficiency": real / sum(padded), "straggler_ratio": slowest / mean,
            "batches": samplers[0].batches()}


def lognormal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.lognormal(np.log(12), 0.8, size=n)), 1, 90).astype(np.int64)


GRID = [  # (world size, batch size, max_tokens, strategy, epoch)
    (1, 16, 0, "bucket", 0), (3, 16, 0, "bucket", 1), (8, 16, 0, "random", 0), (3, 20, 300, "bucket", 2),
    (8, 32, 400, "random", 1), (8, 5, 0, "bucket", 0),  # batches of 5 on 8 ranks: fillers in every step
    (4, 64, 0, "bucket", 0)]


@pytest.mark.parametrize("world_size,batch_size,max_tokens,strategy,epoch", GRID)
@pytest.mark.parametrize("cells", [plan_module.CELLS, 20])  # 20: blocks of a few batches, the last one short
def test_the_figures_match_every_ranks_shares(monkeypatch, world_size, batch_size, max_tokens, strategy, epoch, cells):
    monkeypatch.setattr(plan_module, "CELLS", cells)
    lengths = lognormal(301, seed=world_size)
    options = dict(batch_size=batch_size, max_tokens=max_tokens, strategy=strategy, pool=4, seed=7)
    fast = epoch_figures(lengths.astype(np.int16), world_size, epoch=epoch, **options)  # as plan() narrows them
    slow = slow_plan(lengths, world_size, epoch, **options)
    assert (fast.world_size, fast.epoch) == (world_size, epoch)
    for key in ("steps", "sequences", "real_tokens", "padded_tokens", "sequences_per_step_max", "padded_per_step_max",
                "filler_steps"):
        assert getattr(fast, key) == slow[key], key
    assert tuple(fast.largest_share) == slow["largest_share"]
    for key in ("sequences_per_step_mean", "padded_per_step_mean", "padding_efficiency", "straggler_ratio"):
        assert getattr(fast, key) == pytest.approx(slow[key], rel=1e-12), key
    # The straggler ratio is the one the epoch record prints.
    assert fast.straggler_ratio == pytest.approx(straggler_ratio(slow["batches"], lengths, world_size), rel=1e-12)
    assert fast.real_tokens == lengths.sum() and fast.sequences == len(lengths)
    if batch_size < world_size:
        assert fast.filler_steps >= fast.steps * (world_size - batch_size)


def test_one_rank_pads_more_than_eight_and_balance_is_perfect_alone():
    """The figures move the way the design says: one rank's straggler ratio is 1 by definition, and
    splitting a batch into contiguous length-sorted shares pads less than the whole batch."""
    lengths = lognormal(2000)
    options = dict(batch_size=64, strategy="random", seed=1)
    one, eight = epoch_figures(lengths, 1, **options), epoch_figures(lengths, 8, **options)
    assert one.straggler_ratio == 1.0 and one.filler_steps == 0
    assert eight.padding_efficiency > one.padding_efficiency
    assert one.steps == eight.steps and eight.padded_per_step_max < one.padded_per_step_max


def test_variants_halve_and_double_what_is_set():
    options = dict(batch_size=64, max_tokens=0, strategy="bucket", pool=50, padding_noise=0.0, seed=0)
    assert [label for label, _ in variants(options)] == ["this config", "batching.batch_size=32",
                                                         "batching.batch_size=128"]
    rows = variants({**options, "max_tokens": 5000})
    assert [label for label, _ in rows][3:] == ["batching.max_tokens=2500", "batching.max_tokens=10000"]
    assert rows[3][1] == {**options, "max_tokens": 2500}


SYNTH = ["data.num_train=400", "data.length_median=20", "data.max_length=120", "batching.batch_size=24"]


@pytest.mark.parametrize("extra", [[], ["data.folds=3"], ["data.task=tag", "data.val_fraction=0.3"]])
def test_synthetic_lengths_are_the_training_splits(extra):
    cfg = load_config(overrides=SYNTH + extra)
    lengths, source = training_lengths(cfg)
    expected = load_splits(cfg.data, 0 if cfg.data.folds else None).train.lengths
    assert np.array_equal(lengths, expected)
    assert ("fold 1" in source) == bool(cfg.data.folds)


def tsv(tmp_path, n: int = 150):
    rng = np.random.default_rng(3)
    lines = [f"{'pos' if i % 3 else 'neg'}\t{' '.join('w' + str(j % 7) for j in range(int(k)))}"
             for i, k in enumerate(rng.integers(0, 40, size=n))]  # a few empty lines of text: dropped
    path = tmp_path / "d.tsv"
    path.write_text("\n".join(lines) + "\n")
    return ["data.format=tsv", f"data.train_path={path}", "data.tokenizer=whitespace", "data.empty=drop",
            "data.max_length=30", "data.truncate=post"]


@pytest.mark.parametrize("extra", [[], ["data.folds=4"]])
def test_file_lengths_are_the_training_splits_after_the_length_policies(tmp_path, extra):
    cfg = load_config(overrides=tsv(tmp_path) + extra)
    lengths, source = training_lengths(cfg)
    expected = load_splits(cfg.data, 0 if cfg.data.folds else None).train.lengths
    assert np.array_equal(lengths, expected) and lengths.max() == 30 and lengths.min() >= 1
    assert source.startswith(cfg.data.train_path)


def test_target_lengths_are_its_training_dataset():
    from ddp_seq.builders import build_data
    from ddp_seq.data.sampler import lengths_of

    cfg = load_config(overrides=[f"data.target={WORKER}:make_datasets"])
    lengths, source = training_lengths(cfg)
    assert np.array_equal(lengths, lengths_of(build_data(cfg).train)) and source == cfg.data.target


def test_the_command_prints_the_plan_and_its_json(capsys):
    args = ["plan", "--world-size", "3", *SYNTH, "batching.max_tokens=900"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    cfg = load_config(overrides=SYNTH + ["batching.max_tokens=900"])
    lengths, _ = training_lengths(cfg)
    slow = slow_plan(lengths, 3, 0, batch_size=24, max_tokens=900, strategy="bucket", seed=cfg.training.seed)
    p = result["plan"]
    assert p["steps"] == slow["steps"] and p["padded_per_step_max"] == slow["padded_per_step_max"]
    assert p["padding_efficiency"] == pytest.approx(slow["padding_efficiency"])
    assert [v["setting"] for v in result["variants"]] == ["batching.batch_size=12", "batching.batch_size=48",
                                                          "batching.max_tokens=450", "batching.max_tokens=1800"]
    assert f"steps per epoch              {slow['steps']:,}, the same on every rank" in text
    assert f"padding efficiency           {slow['padding_efficiency']:.3f}" in text
    assert f"largest share                {slow['padded_per_step_max']:,} padded tokens" in text
    halved = next(v for v in result["variants"] if v["setting"] == "batching.max_tokens=450")
    row = next(line for line in text.splitlines() if line.startswith("batching.max_tokens=450 "))
    assert row.split()[1] == f"{halved['steps']:,}" and row.split()[4] == f"{halved['padded_per_step_max']:,}"
    assert halved["steps"] > p["steps"]  # a smaller budget cuts more batches
    assert not (dist.is_available() and dist.is_initialized())  # planned in one process, no group
    # render() of the JSON gives the same text (the planning time apart).
    assert render(result).splitlines()[:-1] == text.splitlines()[:-1]


def test_plan_reports_grad_accum_optimizer_steps():
    result = plan(load_config(overrides=SYNTH + ["training.grad_accum=4"]), 2)
    steps = result["plan"]["steps"]
    assert f"{-(-steps // 4):,} optimizer steps (training.grad_accum=4)" in render(result)


@pytest.mark.parametrize("args,words", [
    (["--world-size", "0"], "--world-size must be >= 1; got 0"),
    ([], "the following arguments are required: --world-size"),
    (["--world-size", "two"], "invalid int value: 'two'"),
    (["--world-size", "2", "--epoch", "-1"], "--epoch must be >= 0"),
    (["--world-size", "2", "batching.batch_size=0"], "batching.batch_size: must be >= 1"),
    (["--world-size", "2", "--config", "no/such.yaml"], "no/such.yaml: cannot read config file"),
    (["--world-size", "2", "data.format=tsv", "data.train_path=no/such.tsv"], "no/such.tsv"),
    (["--world-size", "2", "data.target=no/such.py:load"], "data.target"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, words):
    assert main(["plan", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("ddp-seq: error: ") and err.count("\n") == 1 and words in err, err
