"""``ddp-seq report``: the end-of-run table rebuilt from metrics.jsonl, resumed and unfinished runs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddp_seq.cli import main as ddp_seq_main
from ddp_seq.cli.report import main
from ddp_seq.loggers.report import report, table_columns
from ddp_seq.loggers.runlog import format_table
from ddp_seq.train.objective import METRICS


def epoch_record(epoch: int, loss: float, accuracy: float = 0.5, **extra) -> dict:
    return {"kind": "epoch", "step": 10 * epoch, "epoch": epoch, "train_loss": loss, "train_s": 2.0 + epoch,
            "seq_per_s": 150.0 * epoch, "tokens_per_s": 2000.0 * epoch, "padding_efficiency": 0.9,
            "real_tokens": 1000, "padded_tokens_per_rank": [1100], "straggler_ratio": 1.0,
            "val_loss": loss + 0.1, "val_accuracy": accuracy, "val_f1_macro": accuracy / 2, **extra}


def train_record(epoch: int, step: int) -> dict:
    return {"kind": "train", "epoch": epoch, "step": step, "train_loss": 1.0, "lr": 0.01, "elapsed_s": 0.1,
            "grad_norm": None}


SUMMARY = {"kind": "summary", "best_epoch": 2, "best_val_accuracy": 0.75, "best_checkpoint": "ck/best.pt",
           "last_checkpoint": "ck/last.pt", "wall_s": 12.34, "checkpoints": 4, "checkpoint_s": 0.2,
           "tokens_per_s": 3000.0, "seq_per_s": 250.0}


def write_run(run: Path, records: list, config: str | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if config is not None:
        (run / "config.yaml").write_text(config, encoding="utf-8")
    return run


def test_table_columns_follow_the_task_metrics():
    for task, metrics in METRICS.items():
        columns = table_columns(task)
        assert columns[:2] == ["epoch", "train_loss"]
        assert columns[2:2 + len(metrics)] == [f"val_{m}" for m in metrics]
        assert columns[2 + len(metrics):] == ["seq_per_s", "tokens_per_s", "padding_efficiency", "straggler_ratio",
                                              "train_s"]


def test_report_reproduces_the_end_of_training_output(tiny_yaml: Path, tmp_path: Path, capsys):
    root = tmp_path / "runs"
    # Trained in this process (cli.main, as train.py calls it): what it printed is what capsys holds.
    assert ddp_seq_main(["train", "--config", str(tiny_yaml), f"logging.root={root}", "logging.name=r",
                 "training.epochs=2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(printed) if line.lstrip().startswith("epoch  train_loss"))
    expected = printed[header:]  # the table, the step breakdown, then the summary lines to the end
    assert expected[3].startswith("where a step's time goes") and expected[4].startswith("epoch  step_ms  data_ms")
    assert len(expected) >= 7 + 2 and expected[7].startswith("best val_accuracy "), printed
    assert any(line.startswith("best checkpoint: ") for line in expected)
    assert any(line.startswith("last checkpoint: ") for line in expected)

    assert report(root / "r").splitlines() == expected
    assert main([str(root / "r")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == expected and err == ""


def test_resumed_run_keeps_the_last_record_of_each_epoch(tmp_path: Path):
    dead = epoch_record(2, 9.0, accuracy=0.1)  # written by an attempt that died before its checkpoint
    resumed = epoch_record(2, 0.6, accuracy=0.75)
    run = write_run(tmp_path / "run", [train_record(1, 5), epoch_record(1, 0.9), train_record(2, 15), dead,
                                       train_record(2, 15), resumed, epoch_record(3, 0.5), SUMMARY])
    lines = report(run).splitlines()  # no config.yaml: the val_ columns come from the records
    columns = table_columns("classify")
    assert lines[:4] == format_table([epoch_record(1, 0.9), resumed, epoch_record(3, 0.5)], columns).splitlines()
    assert lines[4:] == ["best val_accuracy 0.7500 at epoch 2; 250 sequences/s, 3,000 real tokens/s; wall time 12.3s",
                         "4 checkpoints written in 0.20s (50 ms each, 1.62% of the wall time)",
                         "best checkpoint: ck/best.pt", "last checkpoint: ck/last.pt"]


def test_columns_come_from_the_configured_task(tmp_path: Path):
    rows = [{**epoch_record(1, 0.9), "val_mse": 0.5, "val_mae": 0.4}, epoch_record(2, 0.8)]
    summary = {**SUMMARY, "best_val_mse": 0.5, "best_epoch": 1}
    del summary["best_val_accuracy"]
    run = write_run(tmp_path / "run", [*rows, summary],
                    config="data:\n  task: regress\ntraining:\n  monitor: val_mse\n  epochs: 2\n")
    lines = report(run).splitlines()
    assert lines[:3] == format_table(rows, table_columns("regress")).splitlines()
    assert "val_accuracy" not in lines[0] and lines[0].split()[2:5] == ["val_loss", "val_mse", "val_mae"]
    assert lines[2].split()[3:5] == ["-", "-"]  # epoch 2 has no mse/mae: shown as missing, as format_table does
    assert lines[3].startswith("best val_mse 0.5000 at epoch 1; ")


def test_unfinished_run_says_so_and_shows_the_finished_epochs(tmp_path: Path):
    config = "data:\n  task: classify\ntraining:\n  epochs: 3\n"
    run = write_run(tmp_path / "run", [train_record(1, 5), epoch_record(1, 0.9), train_record(2, 15)], config)
    lines = report(run).splitlines()
    assert lines[0].startswith("unfinished run") and "1 of 3 epoch(s) finished" in lines[0]
    assert "step 15 in epoch 2" in lines[0]
    assert lines[1:] == format_table([epoch_record(1, 0.9)], table_columns("classify")).splitlines()

    nothing_yet = write_run(tmp_path / "early", [train_record(1, 5)], config)
    assert report(nothing_yet).splitlines() == [report(nothing_yet)]  # one line, no table
    assert "0 of 3 epoch(s) finished" in report(nothing_yet)

    # A summary followed by more epochs is an earlier end: the run stands unfinished again.
    again = write_run(tmp_path / "again", [epoch_record(1, 0.9), SUMMARY, epoch_record(2, 0.8)], config)
    lines = report(again).splitlines()
    assert lines[0].startswith("unfinished run") and "2 of 3" in lines[0]
    assert len(lines) == 1 + 3 and not any(line.startswith("best ") for line in lines)


def _bad_line(tmp_path: Path, line: str) -> tuple[Path, str]:
    run = write_run(tmp_path / "run", [epoch_record(1, 0.9), line, SUMMARY])
    return run, f"{run / 'metrics.jsonl'}:2: "


@pytest.mark.parametrize("case", ["missing_dir", "missing_file", "empty_file", "blank_file", "not_json",
                                  "not_object", "no_kind", "epoch_without_number", "summary_without_wall",
                                  "not_utf8"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path, capsys, case: str):
    run = tmp_path / "run"
    if case == "missing_dir":
        where = f"{run}: "
    elif case in ("missing_file", "empty_file", "blank_file"):
        run.mkdir()
        if case != "missing_file":
            (run / "metrics.jsonl").write_text("" if case == "empty_file" else "\n  \n")
        where = f"{run / 'metrics.jsonl'}: "
    elif case == "not_utf8":
        write_run(run, [epoch_record(1, 0.9)])
        with open(run / "metrics.jsonl", "ab") as f:
            f.write(b'{"kind": "\xff"}\n')
        where = f"{run / 'metrics.jsonl'}:2: "
    else:
        line = {"not_json": '{"kind": "epoch", "epo', "not_object": "[1, 2]", "no_kind": '{"epoch": 1}',
                "epoch_without_number": '{"kind": "epoch", "epoch": "2"}',
                "summary_without_wall": json.dumps({k: v for k, v in SUMMARY.items() if k != "wall_s"})}[case]
        run, where = _bad_line(tmp_path, line)
    assert main([str(run)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"ddp-seq: error: {where}"), err
    assert "Traceback" not in err


def test_several_runs_report_each_and_fail_if_any_fails(tmp_path: Path, capsys):
    good = write_run(tmp_path / "good", [epoch_record(1, 0.9), SUMMARY])
    missing = tmp_path / "missing"
    assert main([str(good), str(missing), str(good)]) == 2
    out, err = capsys.readouterr()
    assert out.count(f"==> {good} <==") == 2 and out.count("best val_accuracy") == 2
    assert err.splitlines() == [f"ddp-seq: error: {missing}: no such run directory"]
