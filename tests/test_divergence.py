"""Training stops at the first non-finite gradient norm or loss, on every rank at the same step, and
never writes a checkpoint, a metrics line or a prediction that holds NaN (issue 26, row 2).

The reproduction of the bug report: regress with SGD at ``training.lr=10`` (100 here: it diverges
sooner) and no clipping, which trained on through NaN (exit 0, every weight of ``last.pt``
non-finite, ``"prediction": NaN`` in the predictions, a rerun resuming from the NaN checkpoint).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import torchrun

from ddp_seq.cli import main
from ddp_seq.fileio import json_text
from ddp_seq.train.checkpoint import load_checkpoint, nonfinite_parameter, save_atomic
from ddp_seq.train.divergence import EXIT_DIVERGED, finite, gradient_norm

SMALL = ["data.task=regress", "data.num_train=64", "data.num_val=16", "data.length_median=6", "data.max_length=12",
         "model.hidden=8", "model.embedding_dim=8", "model.layers=1", "batching.batch_size=16",
         "training.epochs=4", "training.warmup_steps=0", "training.log_every=1", "checkpoint.every_steps=1",
         "checkpoint.keep_last=100", "logging.progress=lines", "training.optimizer=sgd", "training.momentum=0.9",
         "training.monitor=val_loss"]
DIVERGE = ["training.lr=100", "training.grad_clip=0"]


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity, as every parser but Python's does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


def test_json_text_writes_strict_json():
    value = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "NaN", "e": 2}
    text = json_text(value)
    assert strict_json(text) == {"a": None, "b": [1.0, None, {"c": None}], "d": "NaN", "e": 2}


def every_checkpoint_is_finite(run: Path) -> list[Path]:
    paths = sorted((run / "checkpoints").glob("step-*.pt"))
    for path in paths:
        assert nonfinite_parameter(load_checkpoint(path)["model"]) is None, path
    return paths


def diverging_step(records: list[dict]) -> int:
    return max(r["step"] for r in records if r["kind"] == "train") + 1


@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_the_gradient_norm_is_non_finite_with_or_without_clipping(clip, bad):
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(4, 3)).sum().backward()
    assert finite(gradient_norm(layer.parameters(), clip))
    layer.weight.grad[0, 0] = bad
    assert not finite(gradient_norm(layer.parameters(), clip))


def test_a_diverging_run_stops_at_the_first_non_finite_norm(tmp_path, capsys):
    args = [*SMALL, *DIVERGE, f"logging.root={tmp_path}", "logging.name=nan"]
    assert main(["train", *args]) == EXIT_DIVERGED
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "training diverged" in x]
    assert len(lines) == 1 and "non-finite gradient norm" in lines[0] and "Traceback" not in out
    run = tmp_path / "nan"
    records = [strict_json(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step = diverging_step(records)
    assert f"at step {step}," in lines[0]
    # every logged loss and norm before the stop is finite: it stopped at the first non-finite one
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["grad_norm"]) for r in records
               if r["kind"] == "train")
    paths = every_checkpoint_is_finite(run)
    assert paths and f"the newest checkpoint, {paths[-1]}, is finite" in lines[0]
    assert "the best epoch's is " in lines[0] and str(run / "checkpoints" / "best.pt") in lines[0]
    assert load_checkpoint(paths[-1])["train_state"]["step"] == step - 1


def test_a_lower_lr_resumes_from_a_finite_checkpoint(tmp_path, capsys):
    """What the stop line advises works: the same command diverges again at the same step; a lower LR
    from an earlier checkpoint (row 1 makes the new LR take effect) trains to the end, finite."""
    base = [*SMALL, "training.grad_clip=0", f"logging.root={tmp_path}", "logging.name=run"]
    assert main(["train", *base, "training.lr=100"]) == EXIT_DIVERGED
    first = capsys.readouterr().out
    assert main(["train", *base, "training.lr=100"]) == EXIT_DIVERGED
    again = capsys.readouterr().out
    stop = [x.split("training diverged: ")[1] for x in (first + again).splitlines() if "training diverged" in x]
    assert len(stop) == 2 and stop[0].split(";")[0] == stop[1].split(";")[0]
    early = tmp_path / "run" / "checkpoints" / "step-00000002.pt"
    assert main(["train", *base, "training.lr=0.001", f"checkpoint.resume={early}", "logging.name=rescued"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {early}" in out and "training.lr 100.0 -> 0.001" in out
    assert len(every_checkpoint_is_finite(tmp_path / "rescued")) == 16 - 2


def nan_checkpoint(tmp_path: Path) -> Path:
    """A finished run's checkpoint with one weight set to NaN: what a ddp_seq before the stop wrote."""
    assert main(["train", *SMALL, "training.epochs=1", "training.lr=0.01", f"logging.root={tmp_path}",
                 "logging.name=ok"]) == 0
    path = tmp_path / "ok" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    name = next(iter(state["model"]))
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    bad = tmp_path / "bad.pt"
    save_atomic({k: v for k, v in state.items() if k != "format_version"}, bad)
    return bad


def test_a_nan_checkpoint_is_refused_by_predict_evaluate_and_resume(tmp_path, capsys):
    bad = nan_checkpoint(tmp_path)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"features": [[0.5, 1.0, 0, 0, 0, 0, 0, 0]]}\n')
    capsys.readouterr()
    for command in (["predict", "--checkpoint", str(bad), "--input", str(inputs), "--output",
                     str(tmp_path / "p.jsonl"), "data.format=jsonl"],
                    ["evaluate", "--checkpoint", str(bad)],
                    ["train", *SMALL, f"checkpoint.resume={bad}", f"logging.root={tmp_path}", "logging.name=r"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds NaN or infinity" in err[0] and str(bad) in err[0], err
    assert not (tmp_path / "p.jsonl").exists()


def test_resume_auto_skips_a_non_finite_step_checkpoint(tmp_path, capsys):
    args = [*SMALL, "training.epochs=1", "training.lr=0.01", f"logging.root={tmp_path}", "logging.name=run"]
    assert main(["train", *args]) == 0
    paths = sorted((tmp_path / "run" / "checkpoints").glob("step-*.pt"))
    newest = load_checkpoint(paths[-1])
    newest["model"] = {k: v * float("inf") for k, v in newest["model"].items()}
    save_atomic({k: v for k, v in newest.items() if k != "format_version"}, paths[-1])
    capsys.readouterr()
    assert main(["train", *args, "training.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert f"skipping {paths[-1]}: its weights hold NaN or infinity" in out
    assert f"resuming from {paths[-2]}" in out


@pytest.mark.slow
def test_every_rank_stops_at_the_same_step_under_torchrun(tmp_path):
    proc = torchrun("train.py", *SMALL, *DIVERGE, f"logging.root={tmp_path}", "logging.name=ddp",
                    "distributed.backend=gloo", nproc=2)
    assert proc.returncode != 0, proc.report()
    assert proc.stdout.count("training diverged: non-finite gradient norm") == 1, proc.report()
    assert "exitcode  : 3" in proc.stderr or "exit code 3" in proc.stderr or "exitcode: 3" in proc.stderr, \
        proc.report()
    assert "Traceback" not in proc.stdout
    every_checkpoint_is_finite(tmp_path / "ddp")


def test_the_watch_keeps_the_first_non_finite_norm_on_the_device():
    from ddp_seq.train.divergence import NonFiniteWatch

    watch = NonFiniteWatch(torch.device("cpu"))
    watch.note(torch.tensor(3.0), 1)
    assert watch.seen() is None
    watch.note(torch.tensor(float("inf")), 2)
    watch.note(torch.tensor(float("nan")), 3)  # a later one does not replace the first
    watch.note(torch.tensor(1.0), 4)
    assert watch.seen() == (2, float("inf"))
