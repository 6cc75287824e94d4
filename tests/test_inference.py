"""``evaluate``, ``predict`` and k-fold cross-validation, end to end: one process and 2 gloo ranks.

A tiny text model is trained once on a TSV file; the training files are then moved away, so that
``predict`` proves the checkpoint holds everything it needs (vocabulary and classes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import torchrun

from ddp_seq.builders import encoding_of, model_from_checkpoint
from ddp_seq.cli import main
from ddp_seq.data.readers.corpus import write_samples
from ddp_seq.data.readers.sources import load_inputs

pytestmark = pytest.mark.slow

SMALL = ["model.hidden=16", "model.embedding_dim=8", "model.layers=1", "batching.batch_size=32",
         "training.warmup_steps=5", "logging.progress=none"]


@dataclass
class TextRun:
    root: Path
    samples: Path

    @property
    def best(self) -> Path:
        return self.root / "runs" / "text" / "checkpoints" / "best.pt"

    def epochs(self) -> list[dict]:
        lines = (self.root / "runs" / "text" / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> TextRun:
    root = tmp_path_factory.mktemp("inference")
    samples = root / "samples"
    write_samples(samples)
    code = main(["train", "data.format=tsv", f"data.train_path={samples}/reviews.tsv",
                 f"data.val_path={samples}/reviews-val.tsv", "data.tokenizer=whitespace", "training.epochs=2",
                 *SMALL, f"logging.root={root}/runs", "logging.name=text"])
    assert code == 0
    return TextRun(root, samples)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_evaluate_reproduces_training_and_is_exact_under_two_ranks(text_run, capsys):
    out1, out2 = text_run.root / "eval1.json", text_run.root / "eval2.json"
    assert main(["evaluate", "--checkpoint", str(text_run.best), "--output", str(out1)]) == 0
    printed = capsys.readouterr().out.splitlines()
    torchrun("train.py", "evaluate", "--checkpoint", text_run.best, "--output", out2).check()
    one, two = json.loads(out1.read_text()), json.loads(out2.read_text())
    best = max(text_run.epochs(), key=lambda r: r["val_accuracy"])
    assert one["samples"] == two["samples"] == 150  # every validation sample exactly once
    for metric in ("loss", "accuracy"):
        assert one[metric] == pytest.approx(best[f"val_{metric}"], abs=1e-7)
        assert two[metric] == pytest.approx(one[metric], abs=1e-6)
    # macro-F1, per class and the confusion matrix: counts, hence exact across world sizes and
    # equal to what training logged (with the class names of the encoding)
    assert one["classes"] == two["classes"] == best["val_classes"] == ["neg", "pos"]
    for key in ("f1_macro", "precision", "recall", "f1", "support", "confusion"):
        assert one[key] == two[key] == best[f"val_{key}"], key
    assert sum(one["support"]) == 150
    # what it printed: the scalars, then one row per class, then the matrix
    f1_line = next(line for line in printed if line.startswith("loss "))
    assert f"f1_macro {one['f1_macro']:.4f}" in f1_line
    header = printed.index(next(line for line in printed if line.split()[:2] == ["class", "precision"]))
    for i, name in enumerate(one["classes"]):
        assert printed[header + 1 + i].split() == [name, *(f"{one[k][i]:.4f}" for k in ("precision", "recall", "f1")),
                                                   str(one["support"][i])]
    assert printed[header + 3].startswith("confusion matrix (rows = true class")
    assert [line.split()[1:] for line in printed[header + 5:header + 7]] == \
        [[str(n) for n in row] for row in one["confusion"]]
    # scikit-learn on the model's own predictions (predict) of the same file
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    val = text_run.samples / "reviews-val.tsv"
    rows = text_run.root / "val-predictions.jsonl"
    assert main(["predict", "--checkpoint", str(text_run.best), "--input", str(val), "--output", str(rows)]) == 0
    truth = [line.split("\t", 1)[0] for line in val.read_text(encoding="utf-8").splitlines()]
    predicted = [r["prediction"] for r in read_rows(rows)]
    labels = one["classes"]
    assert one["f1_macro"] == pytest.approx(
        sklearn_metrics.f1_score(truth, predicted, average="macro", labels=labels), abs=1e-12)
    assert one["confusion"] == sklearn_metrics.confusion_matrix(truth, predicted, labels=labels).tolist()


def test_predict_keeps_input_order_under_two_ranks_without_the_training_files(text_run):
    # An input in its own order: val lines shuffled, some without their label column.
    rng = np.random.default_rng(0)
    lines = (text_run.samples / "reviews-val.tsv").read_text(encoding="utf-8").splitlines()
    lines = [lines[i] for i in rng.permutation(len(lines))][:101]
    lines = [line.split("\t", 1)[1] if i % 3 == 0 else line for i, line in enumerate(lines)]
    inputs = text_run.root / "new.tsv"
    inputs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    moved = text_run.samples.with_name("moved")
    text_run.samples.rename(moved)  # predict must need nothing but the checkpoint
    try:
        one, two = text_run.root / "p1.jsonl", text_run.root / "p2.jsonl"
        assert main(["predict", "--checkpoint", str(text_run.best), "--input", str(inputs),
                     "--output", str(one)]) == 0
        torchrun("train.py", "predict", "--checkpoint", text_run.best, "--input", inputs, "--output", two).check()
    finally:
        moved.rename(text_run.samples)
    rows1, rows2 = read_rows(one), read_rows(two)
    assert [r["index"] for r in rows1] == [r["index"] for r in rows2] == list(range(101))
    assert [r["prediction"] for r in rows1] == [r["prediction"] for r in rows2]
    for a, b in zip(rows1, rows2):
        assert set(a["probabilities"]) == {"neg", "pos"}
        assert sum(a["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        for label, p in a["probabilities"].items():
            assert b["probabilities"][label] == pytest.approx(p, abs=1e-5)
    # Row i is the model's answer for input line i alone: the order is the input's, not the batches'.
    model, cfg, state = model_from_checkpoint(text_run.best)
    encoding = encoding_of(state, cfg)
    data = load_inputs(cfg.data, encoding, str(inputs))[0]
    for i in (0, 1, 2, 50, 100):
        steps = torch.from_numpy(data[i][0])[None]
        with torch.no_grad():
            probs = torch.softmax(model.eval()(steps, torch.tensor([steps.shape[1]])), -1)[0]
        assert rows1[i]["probabilities"]["pos"] == pytest.approx(float(probs[encoding.classes.index("pos")]),
                                                                  abs=1e-5)


def test_predict_writes_tags_values_and_skipped_empty_samples(text_run, tmp_path):
    samples = text_run.samples
    assert main(["train", "data.task=tag", "data.format=jsonl", f"data.train_path={samples}/tags.jsonl",
                 f"data.val_path={samples}/tags-val.jsonl", "training.epochs=1", *SMALL,
                 f"logging.root={tmp_path}", "logging.name=tag"]) == 0
    out = tmp_path / "tags.jsonl"
    assert main(["predict", "--checkpoint", str(tmp_path / "tag/checkpoints/last.pt"), "--input",
                 str(samples / "tags-val.jsonl"), "--output", str(out)]) == 0
    given = read_rows(samples / "tags-val.jsonl")
    rows = read_rows(out)
    assert len(rows) == len(given)
    for row, sample in zip(rows, given):
        assert len(row["prediction"]) == len(sample["features"]) and set(row["prediction"]) <= {"on", "off"}
    # regress, with an empty sample dropped (data.empty=drop): its row says so, the others keep their place
    regress = tmp_path / "r.jsonl"
    regress.write_text("".join(json.dumps({"features": [[i, 1.0]] * (1 + i % 4), "target": i / 10}) + "\n"
                               for i in range(40)), encoding="utf-8")
    assert main(["train", "data.task=regress", "data.format=jsonl", f"data.train_path={regress}",
                 "training.monitor=val_mse", "training.epochs=1", *SMALL, f"logging.root={tmp_path}",
                 "logging.name=reg"]) == 0
    new = tmp_path / "new.jsonl"
    new.write_text('{"features": [[1, 1]]}\n{"features": []}\n{"features": [[2, 1], [3, 1]]}\n', encoding="utf-8")
    out = tmp_path / "values.jsonl"
    assert main(["predict", "--checkpoint", str(tmp_path / "reg/checkpoints/last.pt"), "--input", str(new),
                 "--output", str(out), "data.empty=drop"]) == 0
    rows = read_rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert isinstance(rows[0]["prediction"], float) and isinstance(rows[2]["prediction"], float)
    assert rows[1] == {"index": 1, "prediction": None, "skipped": "empty sequence (data.empty=drop)"}


def fold_rows(run: Path) -> dict:
    return json.loads((run / "folds.json").read_text())


def test_kfold_trains_each_fold_the_same_on_one_and_two_ranks_and_resumes(text_run, tmp_path, capsys):
    args = ["train", "data.format=ts", f"data.train_path={text_run.samples}/motions.ts", "data.folds=3",
            "training.epochs=2", *SMALL, f"logging.root={tmp_path}"]
    assert main([*args, "logging.name=one"]) == 0
    printed = capsys.readouterr().out
    assert "cross-validation, 3 folds" in printed and "mean +- std over folds" in printed
    torchrun("train.py", *args[1:], "logging.name=two").check()
    one, two = fold_rows(tmp_path / "one"), fold_rows(tmp_path / "two")
    assert [r["fold"] for r in one["folds"]] == [1, 2, 3]
    for a, b in zip(one["folds"], two["folds"]):  # world-size invariant, fold by fold
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    accuracies = [r["val_accuracy"] for r in one["folds"]]
    assert one["mean"]["val_accuracy"] == pytest.approx(np.mean(accuracies))
    assert one["std"]["val_accuracy"] == pytest.approx(np.std(accuracies))
    # each fold is a run of its own; its checkpoint knows its fold, so evaluate re-derives its val part
    fold2 = tmp_path / "one" / "fold-2" / "checkpoints" / "best.pt"
    assert torch.load(fold2, weights_only=True)["extra"]["fold"] == 1
    out = tmp_path / "fold2.json"
    assert main(["evaluate", "--checkpoint", str(fold2), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["accuracy"] == pytest.approx(one["folds"][1]["val_accuracy"], abs=1e-7)
    # the same command again resumes every fold: nothing is trained twice, the summary is the same
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "one").glob("fold-*/checkpoints/step-*.pt")}
    assert main([*args, "logging.name=one"]) == 0
    assert capsys.readouterr().out.count("this run has already trained its 2 epochs") == 3
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert fold_rows(tmp_path / "one") == one
    shutil.rmtree(tmp_path / "two")


def letters(path: Path, samples: int = 48) -> Path:
    """``tokens`` of a..e, 1 to 6 steps; ``tags``: each letter in capitals; ``label``: whether an 'a' occurs."""
    rng = np.random.default_rng(1)
    lines = []
    for _ in range(samples):
        tokens = [str(t) for t in rng.choice(list("abcde"), size=int(rng.integers(1, 7)))]
        lines.append(json.dumps({"tokens": tokens, "tags": [t.upper() for t in tokens],
                                 "label": "yes" if "a" in tokens else "no"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Input 0 and 4 are longer than data.max_length=3, 1 shorter, 3 exactly as long, 2 empty (dropped).
CUT_INPUTS = [list("abcde"), list("ab"), [], list("abc"), list("edcba")]


class Alone:
    """A checkpoint's model applied to one sample alone: what a prediction row must match."""

    def __init__(self, checkpoint: Path) -> None:
        model, cfg, state = model_from_checkpoint(checkpoint)
        self.model, self.encoding = model.eval(), encoding_of(state, cfg)

    def outputs(self, tokens: list[str]) -> torch.Tensor:
        vocab = self.encoding.vocab
        ids = torch.tensor([[vocab.index(t) if t in vocab else 1 for t in tokens]])  # 1: <unk>
        with torch.no_grad():
            return self.model(ids, torch.tensor([len(tokens)]))[0]

    def tags(self, tokens: list[str]) -> list[str]:
        return [self.encoding.classes[k] for k in self.outputs(tokens).argmax(-1).tolist()]


def predict_cut(checkpoint: Path, tmp_path: Path, truncate: str) -> list[dict]:
    new = tmp_path / "cut.jsonl"
    new.write_text("".join(json.dumps({"tokens": t}) + "\n" for t in CUT_INPUTS), encoding="utf-8")
    out = tmp_path / f"cut-{truncate}.jsonl"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(new), "--output", str(out),
                 f"data.truncate={truncate}", "data.empty=drop"]) == 0
    rows = read_rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]  # the input's positions, the empty one included
    assert rows[2] == {"index": 2, "prediction": None, "skipped": "empty sequence (data.empty=drop)"}
    return rows


def test_predict_tag_rows_of_truncated_inputs_name_the_steps_they_cover(tmp_path):
    # The report: a tag model trained with data.max_length=3 data.truncate=pre, then predict on a
    # 5-step input wrote three tags (for c, d, e) with nothing to say so.
    assert main(["train", "data.task=tag", "data.format=jsonl", f"data.train_path={letters(tmp_path / 'l.jsonl')}",
                 "data.max_length=3", "data.truncate=pre", "training.epochs=4", *SMALL,
                 f"logging.root={tmp_path}", "logging.name=tag"]) == 0
    checkpoint = tmp_path / "tag/checkpoints/last.pt"
    tags = Alone(checkpoint).tags
    for truncate, (start, end) in (("pre", (2, 5)), ("post", (0, 3))):  # post: the same model, overridden
        rows = predict_cut(checkpoint, tmp_path, truncate)
        for i in (0, 4):
            assert set(rows[i]) == {"index", "prediction", "steps", "truncated"}
            assert rows[i]["steps"] == [start, end] and rows[i]["truncated"] == truncate
            assert len(rows[i]["prediction"]) == end - start  # one tag per step the model saw
            assert rows[i]["prediction"] == tags(CUT_INPUTS[i][start:end])  # ... and those are the steps
        # inputs not cut (shorter than max_length, or exactly as long) keep the plain row
        assert rows[1] == {"index": 1, "prediction": tags(CUT_INPUTS[1])}
        assert rows[3] == {"index": 3, "prediction": tags(CUT_INPUTS[3])}


def test_predict_classify_rows_of_truncated_inputs_name_the_steps_they_cover(tmp_path):
    assert main(["train", "data.format=jsonl", f"data.train_path={letters(tmp_path / 'l.jsonl')}",
                 "data.max_length=3", "data.truncate=post", "training.epochs=1", *SMALL,
                 f"logging.root={tmp_path}", "logging.name=cls"]) == 0
    checkpoint = tmp_path / "cls/checkpoints/last.pt"
    alone = Alone(checkpoint)
    rows = predict_cut(checkpoint, tmp_path, "post")
    for i in (0, 4):
        assert set(rows[i]) == {"index", "prediction", "probabilities", "steps", "truncated"}
        assert rows[i]["steps"] == [0, 3] and rows[i]["truncated"] == "post"
        probs = torch.softmax(alone.outputs(CUT_INPUTS[i][:3]), -1)
        for c, p in zip(alone.encoding.classes, probs.tolist()):
            assert rows[i]["probabilities"][str(c)] == pytest.approx(p, abs=1e-5)
    for i in (1, 3):
        assert set(rows[i]) == {"index", "prediction", "probabilities"}
