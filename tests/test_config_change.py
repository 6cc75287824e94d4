"""A config changed at resume takes effect or is refused naming the key -- never logged and then
silently overridden by the restored optimizer, scheduler or scaler (issue 26, row 1).

The checkpoint is written once per module by a short one-process run (``ddp_seq.cli.main`` in this
process); each case builds the resumed Trainer with the changed config and compares its optimizer
with the one a *fresh* Trainer of the changed config has, stepped to the same step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ddp_seq.builders import build_trainer
from ddp_seq.cli import main
from ddp_seq.config import Config, load_config
from ddp_seq.errors import UserError
from ddp_seq.parallel.process_group import current_info
from ddp_seq.train.config_change import APPLIES, EPOCH_END, REAPPLIED, REFUSED, RULES, RUN, WEIGHTS, config_keys

SMALL = ["data.num_train=96", "data.num_val=16", "data.length_median=6", "data.max_length=12",
         "model.hidden=8", "model.embedding_dim=8", "model.layers=1", "batching.batch_size=16",
         "batching.strategy=random", "training.epochs=3", "training.warmup_steps=4", "training.log_every=1",
         "checkpoint.every_steps=1", "checkpoint.keep_last=100", "logging.progress=none",
         "training.weight_decay=0.0", "training.lr=0.01"]
STEP = 8  # mid-epoch 2 (6 steps per epoch)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("change")
    assert main(["train", *SMALL, f"logging.root={root}", "logging.name=first"]) == 0
    return root


def checkpoint(run: Path, step: int = STEP) -> Path:
    return run / "first" / "checkpoints" / f"step-{step:08d}.pt"


def resumed(run: Path, *changes: str, step: int = STEP):
    cfg = load_config(None, [*SMALL, *changes, f"logging.root={run}"])
    return build_trainer(cfg, current_info(), None, None, resume_from=checkpoint(run, step))


def fresh(run: Path, *changes: str):
    return build_trainer(load_config(None, [*SMALL, *changes, f"logging.root={run}"]), current_info(), None, None)


def lr_at(trainer, step: int) -> float:
    """The current config's schedule: lr * factor(step) (the scheduler's own lambda)."""
    return trainer.scheduler.base_lrs[0] * trainer.scheduler.lr_lambdas[0](step)


def hyperparameters(optimizer) -> dict:
    return {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "lr")}


def test_every_config_key_has_a_resume_rule():
    keys = config_keys(Config())
    assert sorted(RULES) == sorted(keys)
    assert set(RULES.values()) <= {APPLIES, REAPPLIED, EPOCH_END, WEIGHTS, REFUSED, RUN}


@pytest.mark.parametrize("changes", [
    ("training.lr=0.001",),
    ("training.weight_decay=0.1",),
    ("training.lr=0.001", "training.weight_decay=0.1"),
    ("training.optimizer=adamw",),  # Adam's moments continue as AdamW's, with decoupled decay now
    ("training.warmup_steps=20",),
    ("training.min_lr_ratio=0.5",),
    ("training.epochs=6",),  # a longer schedule
    ("training.grad_accum=2",),
])
def test_optimizer_and_schedule_keys_take_effect_at_resume(run, changes):
    trainer, reference = resumed(run, *changes), fresh(run, *changes)
    assert hyperparameters(trainer.optimizer) == hyperparameters(reference.optimizer)
    # The LR the first resumed step uses is the new schedule's at the restored step, not the old one's.
    assert trainer.scheduler.last_epoch == STEP
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(reference, STEP), rel=1e-12)
    assert trainer.scheduler.get_last_lr() == [trainer.optimizer.param_groups[0]["lr"]]
    old = resumed(run)  # unchanged config: exactly the saved schedule
    assert old.optimizer.param_groups[0]["lr"] == pytest.approx(lr_at(fresh(run), STEP), rel=1e-12)
    # the per-parameter state (Adam's moments and step counts) stays restored
    saved_state = old.optimizer.state_dict()["state"]
    for i, entry in trainer.optimizer.state_dict()["state"].items():
        assert float(entry["step"]) == float(saved_state[i]["step"]) == STEP


def test_sgd_momentum_takes_effect_at_resume(tmp_path):
    args = [*SMALL, "training.optimizer=sgd", "training.momentum=0.9", f"logging.root={tmp_path}", "logging.name=s"]
    assert main(["train", *args, "training.epochs=1"]) == 0
    cfg = load_config(None, [*args, "training.momentum=0.5", "training.lr=0.002"])
    ck = tmp_path / "s" / "checkpoints" / "step-00000003.pt"
    trainer = build_trainer(cfg, current_info(), None, None, resume_from=ck)
    group = trainer.optimizer.param_groups[0]
    assert group["momentum"] == 0.5 and group["lr"] == pytest.approx(0.002 * trainer.scheduler.lr_lambdas[0](3))
    assert all("momentum_buffer" in s for s in trainer.optimizer.state.values())  # buffers kept


@pytest.mark.parametrize("changes, words", [
    (("training.optimizer=sgd",), "training.optimizer 'adam' -> 'sgd' (the checkpoint's optimizer state is Adam"),
    (("training.monitor=val_loss",), "training.monitor 'val_accuracy' -> 'val_loss'"),
    (("data.task=regress", "training.monitor=val_loss"), "data.task 'classify' -> 'regress'"),
    (("model.hidden=16",), "model.hidden 8 -> 16"),
    (("model.cell=gru",), "model.cell 'lstm' -> 'gru'"),
])
def test_a_change_no_resume_can_honour_is_refused_naming_the_key(run, changes, words):
    with pytest.raises(UserError) as e:
        resumed(run, *changes)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_issue_reproduction_end_to_end(run, capsys):
    """lr 0.01 -> 0.001 and weight_decay 0.0 -> 0.1 at a mid-epoch resume: the log names both, and
    every LR the resumed run records is the new schedule's (a run trained with 0.001 from the start)."""
    new = ["training.lr=0.001", "training.weight_decay=0.1"]
    capsys.readouterr()
    assert main(["train", *SMALL, *new, f"logging.root={run}", "logging.name=resumed",
                 f"checkpoint.resume={checkpoint(run)}"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "resuming from" in x)
    assert line.endswith("config changed since, in effect from here: training.lr 0.01 -> 0.001, "
                         "training.weight_decay 0.0 -> 0.1")
    assert main(["train", *SMALL, *new, f"logging.root={run}", "logging.name=fromscratch"]) == 0

    def lrs(name):
        rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}

    got, want = lrs("resumed"), lrs("fromscratch")
    assert min(got) == STEP + 1 and len(got) == 18 - STEP
    for step, lr in got.items():
        assert lr == pytest.approx(want[step], rel=1e-9), step
    warmup, total = 4, 18  # the recorded LR after step s is the one step s + 1 uses
    cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (STEP + 1 - warmup) / (total - warmup)))
    assert got[STEP + 1] == pytest.approx(0.001 * cosine, rel=1e-9)


def test_the_command_line_refuses_before_writing(run, capsys):
    before = sorted(p.name for p in (run / "first").rglob("*"))
    code = main(["train", *SMALL, "training.optimizer=sgd", f"logging.root={run}", "logging.name=first",
                 f"checkpoint.resume={checkpoint(run)}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "training.optimizer 'adam' -> 'sgd'" in err[0]
    assert sorted(p.name for p in (run / "first").rglob("*")) == before


def test_the_library_path_names_its_own_arguments(run):
    """A Trainer handed resume_from is told about resume_from and run_dir, not the command line's keys."""
    from ddp_seq import Trainer
    from ddp_seq.builders import build_parts

    cfg = load_config(None, [*SMALL, "training.optimizer=sgd"])
    parts = build_parts(cfg, current_info())
    with pytest.raises(UserError) as e:
        Trainer(parts.model, parts.data.train, parts.data.val, cfg, resume_from=checkpoint(run))
    text = str(e.value)
    assert text.startswith("Trainer: resume_from: ") and "(another run_dir)" in text and "logging.name" not in text
