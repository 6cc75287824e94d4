"""Off the paved road: what a new user's own Dataset, model and loop get on 2 real ranks.

One torchrun launch of ``tests/workers/off_road.py`` (a token dataset and an LSTM model of the
user's, not SeqModel nor the built-in readers) runs every scenario; each test reads what both
ranks saw. Every way to train the wrong thing silently either trains the right thing or is refused
before the first step with one line, with nothing of an earlier run changed.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import REPO, torchrun

from ddp_seq.cli import main

pytestmark = pytest.mark.slow
WORKER = REPO / "tests" / "workers" / "off_road.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("off_road")
    proc = torchrun(WORKER, out, nproc=2, timeout=240)
    found = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in found:
        assert "crash" not in r, r.get("crash", "") + proc.report()
    proc.check()
    for r in found:
        r["out"] = out
    return found


def one_line(text: str) -> str:
    assert text and "\n" not in text, text
    return text


def test_the_trainer_under_torchrun_without_a_process_group_refuses(ranks):
    for r in ranks:
        line = one_line(r["no_group"])
        assert line.startswith("UserError: Trainer: torchrun started 2 processes") and "ddp_seq.distributed" in line
        assert "init_process_group" in line and not r["no_group_dir_made"]


def test_an_own_loop_without_share_dataset_fails_at_the_first_batch(ranks):
    for r in ranks:
        line = one_line(r["loop_without_share"])
        assert re.match(r"ValueError: collate: \d+ items came without their Share on a job of 2 ranks", line), line
        assert "ShareDataset(dataset)" in line
        # in a DataLoader worker process too (torch re-raises it with the worker's traceback)
        assert "without their Share on a job of 2 ranks" in r["loop_without_share_workers"]


def test_an_own_loop_with_share_dataset_gets_the_global_counts(ranks):
    for r in ranks:
        counts = r["loop_with_share"]
        # the global batch's size (12 of 32 and the remainder of 400), not this rank's share of it
        assert sorted(counts) == [16] + [32] * 12, counts
    assert ranks[0]["loop_with_share"] == ranks[1]["loop_with_share"]
    assert [r["evaluated_samples"] for r in ranks] == [257.0, 257.0]  # the filler of the short batch weighs 0


def test_a_used_run_directory_is_refused_unless_resumed_or_overwritten(ranks):
    for r in ranks:
        line = one_line(r["again"])
        assert "holds an earlier run" in line and "resume_from='last'" in line and "overwrite=True" in line
        assert not r["again_changed"], "a refused start changed the earlier run's files"
        assert r["last_without_more_epochs"] == r["first"]  # resumed a finished run: nothing trained
        assert r["resumed"]["best_epoch"] in (1, 2, 3)
        assert "contradict" in one_line(r["both"])
    out = ranks[0]["out"] / "runs" / "mine"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summaries = [rec for rec in records if rec["kind"] == "summary"]
    # overwrite=True removed the earlier run: one run's records, its own checkpoints only
    assert len(summaries) == 1 and [rec["epoch"] for rec in records if rec["kind"] == "epoch"] == [1, 2]
    assert summaries[0]["best_epoch"] == ranks[0]["overwritten"]["best_epoch"]
    assert "resume_from" not in (out / "train.log").read_text()


@pytest.mark.parametrize("case, words", [
    ("dict_items", "train data: item 0 is a dict (keys 'input_ids', 'label'); ddp_seq datasets return (sequence, "
                   "target) pairs"),
    ("string_labels", "train data: item 0's target is 'eggs', not a number"),
    ("label_out_of_range", "val data: item 200 has target 6, outside the model's 6 outputs (class ids 0..5)"),
    ("tuple_output", "model: forward(inputs, lengths) returned a tuple, not a tensor"),
])
def test_the_contract_is_checked_before_the_first_step(ranks, case, words):
    name = {"dict_items": "dicts", "string_labels": "strings", "label_out_of_range": "range",
            "tuple_output": "tuple"}[case]
    for r in ranks:
        line = one_line(r[case])
        assert line.startswith("UserError: " + words), line
        assert not r[f"{name}_dir_made"], "a refused start left a run directory behind"


def test_evaluate_and_predict_serve_a_library_checkpoint(ranks, capsys, tmp_path):
    best = ranks[0]["out"] / "runs" / "mine" / "checkpoints" / "best.pt"
    assert main(["evaluate", "--checkpoint", str(best)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.target=path/to/file.py:ReviewModel" in err, err
    target = f"model.target={WORKER}:ReviewModel"
    assert main(["evaluate", "--checkpoint", str(best), target]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.target=" in err, err
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(best), target, f"data.target={WORKER}:make_data",
                 "--output", str(report)]) == 0
    metrics = json.loads(report.read_text())
    assert metrics["samples"] == 257 and metrics["accuracy"] == pytest.approx(ranks[0]["overwritten"]["best"])
    inputs = tmp_path / "new.jsonl"
    inputs.write_text('{"tokens": [1, 2, 3, 4]}\n')
    assert main(["predict", "--checkpoint", str(best), target, "--input", str(inputs), "--output",
                 str(tmp_path / "x.jsonl")]) == 2  # the format is the user's to name: it was no file
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "trained on your own datasets" in err and "data.format=jsonl" in err, err
    inputs.write_text('{"tokens": [1, 2, 3, 4], "label": 0}\n{"tokens": [41, 42, 43], "label": 5}\n')
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--checkpoint", str(best), target, "data.format=jsonl", "--input", str(inputs),
                 "--output", str(out)]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and all(0 <= r["prediction"] < 6 for r in rows)
