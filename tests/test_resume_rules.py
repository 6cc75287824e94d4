"""What a resume may change: a mid-epoch checkpoint refuses a changed plan of batches (the rest of
its epoch would skip or repeat samples), and how long a run lasts follows the config it is resumed
with (more epochs train on; fewer stop at once with a clear line, never ``epoch 3/2``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import torchrun

from ddp_seq.cli import main
from ddp_seq.data.sampler import BucketBatchSampler
from ddp_seq.errors import UserError
from ddp_seq.train.resume import check_plan, stop_reason

PLAN = BucketBatchSampler([2] * 10, 4, num_replicas=1, rank=0).plan_key()


def saved(position: int, finished: bool = False, **plan) -> dict:
    """The parts of a checkpoint that ``check_plan`` reads."""
    return {"sampler": {"version": 1, "epoch": 0, "position": position, "plan": {**PLAN, **plan}},
            "train_state": {"finished": finished}, "config": {"batching": {}, "training": {}}}


def test_a_changed_plan_is_refused_mid_epoch_only():
    check_plan(saved(3), PLAN, "ck.pt")  # unchanged
    check_plan(saved(0, batch_size=8), PLAN, "ck.pt")  # epoch end: the next epoch is planned anew
    check_plan(saved(3, True, batch_size=8), PLAN, "ck.pt")  # finished
    with pytest.raises(UserError, match=r"batching.batch_size 8 -> 4.*skip or repeat samples"):
        check_plan(saved(3, batch_size=8), PLAN, "ck.pt")
    with pytest.raises(UserError, match=r"training.seed 5 -> 0, the training data's sequences 11 -> 10"):
        check_plan(saved(1, seed=5, num_samples=11), PLAN, "ck.pt")
    # A checkpoint from before the plan was stored: its config's batching keys and seed decide.
    old = {"sampler": {"version": 1, "epoch": 0, "position": 2}, "train_state": {"finished": False},
           "config": {"batching": {"batch_size": 4, "max_tokens": 0, "strategy": "bucket", "pool": 50,
                                   "padding_noise": 0.0}, "training": {"seed": 0}}}
    check_plan(old, PLAN, "ck.pt")
    old["config"]["batching"]["strategy"] = "random"
    with pytest.raises(UserError, match="batching.strategy 'random' -> 'bucket'"):
        check_plan(old, PLAN, "ck.pt")


@pytest.mark.parametrize("epoch, stale, epochs, patience, words", [
    (2, 0, 4, 0, None),  # trains on
    (2, 0, 2, 0, "already trained its 2 epochs"),
    (4, 0, 2, 0, "already trained 4 epochs, more than training.epochs=2"),
    (3, 2, 6, 2, "stopped early"),
    (3, 2, 6, 3, None),  # more patience: trains on
    (3, 2, 6, 0, None),  # no early stopping
])
def test_how_long_a_run_lasts_follows_the_config(epoch, stale, epochs, patience, words):
    reason = stop_reason(epoch, stale, epochs, patience, "val_loss")
    assert (reason is None) if words is None else (words in reason)


# -- the bug reports, end to end -------------------------------------------------------------------
# The one-process runs go through ``ddp_seq.cli.main`` in this process (what ``python train.py``
# calls): a launch would cost seconds of interpreter and torch start-up for a run of a second. Only
# the resume under another world size needs real processes: torchrun with 2 gloo ranks.

TSV = ["data.format=tsv", "data.tokenizer=whitespace", "model.hidden=8", "model.layers=1", "model.embedding_dim=8",
       "batching.strategy=random", "training.warmup_steps=0", "logging.progress=lines", "checkpoint.keep_last=100"]


def tsv(path: Path, lines: int) -> Path:
    path.write_text("".join(f"pos\tgood w{n}\n" if n % 2 else f"neg\tbad w{n}\n" for n in range(1, lines + 1)))
    return path


def epoch_records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "epoch"]


@pytest.mark.slow
def test_a_mid_epoch_resume_trains_each_sample_once_or_refuses(tmp_path, capsys):
    """24 two-token lines, 22 for training (44 tokens): the resumed epoch trains the rest of the
    saved plan, so it counts every training token once; a batch size that re-plans it is refused."""
    data = tsv(tmp_path / "train.tsv", 24)
    common = [*TSV, f"data.train_path={data}", "checkpoint.every_steps=1", "training.epochs=1",
              f"logging.root={tmp_path}"]
    assert main(["train", *common, "batching.batch_size=4", "logging.name=first"]) == 0
    step1 = tmp_path / "first" / "checkpoints" / "step-00000001.pt"
    capsys.readouterr()  # only the refused run's output below
    code = main(["train", *common, "batching.batch_size=8", f"checkpoint.resume={step1}", "logging.name=bigger"])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    err = stderr.strip().splitlines()
    assert len(err) == 1 and "batching.batch_size 4 -> 8" in err[0] and "Traceback" not in stderr
    # What does not re-plan the epoch: another world size, another grad_accum.
    torchrun("train.py", *common, "batching.batch_size=4", "training.grad_accum=2", f"checkpoint.resume={step1}",
             "logging.name=resumed").check()
    assert [e["real_tokens"] for e in epoch_records(tmp_path / "resumed")] == [44]


@pytest.mark.slow
def test_changed_epochs_at_resume_are_honoured(tmp_path, capsys):
    data = tsv(tmp_path / "train.tsv", 8)
    common = [*TSV, f"data.train_path={data}", "data.val_fraction=0.25", "batching.batch_size=4",
              "checkpoint.every_steps=0", f"logging.root={tmp_path}"]
    # (a) the end-of-epoch-2 checkpoint of a 4-epoch run, resumed with training.epochs=2
    assert main(["train", *common, "training.epochs=4", "logging.name=four"]) == 0
    epoch2 = tmp_path / "four" / "checkpoints" / "step-00000004.pt"  # 6 training lines: 2 steps per epoch
    capsys.readouterr()
    assert main(["train", *common, "training.epochs=2", f"checkpoint.resume={epoch2}", "logging.name=two"]) == 0
    fewer = capsys.readouterr().out
    assert "already trained its 2 epochs: nothing to train" in fewer
    assert "epoch 3/2" not in fewer
    # (b) a finished 2-epoch run, run again under its name with training.epochs=4, trains on
    assert main(["train", *common, "training.epochs=2", "logging.name=grow"]) == 0
    capsys.readouterr()
    assert main(["train", *common, "training.epochs=4", "logging.name=grow"]) == 0
    more = capsys.readouterr().out
    assert "nothing to train" not in more and "epoch 3/4" in more and "epoch 4/4" in more
    assert [e["epoch"] for e in epoch_records(tmp_path / "grow")] == [1, 2, 3, 4]
