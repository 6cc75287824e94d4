"""Bad data files and data commands: one line naming the file and line (or the key), exit code 2.

The rule of ``tests/test_bad_input.py``, for the file formats and the ``evaluate``/``predict``
commands. These run the CLI's ``main`` in this process (each case takes milliseconds, not a
torch start-up); ``test_bad_input.py`` shows the same handler end to end in real processes. Every
case also checks that nothing was created under the runs root (a bad file is reported before a
run directory exists), that its input files are unchanged, and that an existing ``--output`` file
survives a failed ``predict`` byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO

from ddp_seq.cli import main

ERROR_PREFIX = "ddp-seq: error:"
TABLE_START, TABLE_END = "<!-- bad-input:start -->", "<!-- bad-input:end -->"
TABLE_DOC = REPO / "docs" / "fault-tolerance.md"  # where the bad-input table lives
TINY = ["model.hidden=8", "model.embedding_dim=8", "model.layers=1", "training.epochs=1", "training.warmup_steps=0",
        "logging.progress=none"]
TS_HEAD = "@problemName p\n@univariate false\n@dimensions 2\n@equalLength false\n@classLabel true a b\n@data\n"


@dataclass
class Setup:
    """``ddp-seq ARGS``; the error line must contain every entry of ``names``."""

    args: list[str]
    names: list[str]
    inputs: list[Path] = field(default_factory=list)
    output: Path | None = None  # an existing file that must survive
    # Resuming compares encodings once the run's directory is decided; it holds no run (not "used").
    run_dir_allowed: bool = False


@dataclass
class Env:
    tmp: Path
    runs: Path
    checkpoint: Path  # a tiny whitespace-token TSV model (classes neg, pos)

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return path

    def train(self, *overrides: str) -> list[str]:
        return ["train", *TINY, f"logging.root={self.runs}", *overrides]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("model")
    (base / "t.tsv").write_text("".join(f"{'pos' if i % 2 else 'neg'}\tgood {'nice' if i % 2 else 'bad'} day\n"
                                        for i in range(20)), encoding="utf-8")
    assert main(["train", *TINY, "data.format=tsv", "data.tokenizer=whitespace", f"data.train_path={base}/t.tsv",
                 f"logging.root={base}", "logging.name=m"]) == 0
    return base / "m" / "checkpoints" / "last.pt"


def tsv(env: Env, name: str, body: str, *overrides: str, names: list[str]) -> Setup:
    path = env.write(name, body)
    return Setup(env.train("data.format=tsv", f"data.train_path={path}", *overrides), [str(path), *names], [path])


def jsonl(env: Env, body: str, names: list[str]) -> Setup:
    path = env.write("d.jsonl", body)
    return Setup(env.train("data.format=jsonl", f"data.train_path={path}"), [str(path), *names], [path])


def ts(env: Env, body: str, *overrides: str, names: list[str]) -> Setup:
    path = env.write("d.ts", body)
    return Setup(env.train("data.format=ts", f"data.train_path={path}", *overrides), [str(path), *names], [path])


def val_label_unseen(env: Env) -> Setup:
    train = env.write("train.tsv", "yes\tgood\nno\tbad\nyes\tfine\n")
    val = env.write("val.tsv", "yes\tgood\nmaybe\tso-so\n")
    return Setup(env.train("data.format=tsv", f"data.train_path={train}", f"data.val_path={val}"),
                 [f"{val} line 2", "label 'maybe'", "training data does not have"], [train, val])


def npz_offsets(env: Env) -> Setup:
    path = env.tmp / "d.npz"
    np.savez(path, data=np.zeros((10, 2), np.float32), offsets=np.array([0, 4, 12]), labels=np.array([0, 1]))
    return Setup(env.train("data.format=npz", f"data.train_path={path}"), [str(path), "'offsets' ends at 12",
                                                                            "10 steps"], [path])


def predict_setup(env: Env, input_path: Path, names: list[str], *overrides: str) -> Setup:
    output = env.write("out.jsonl", '{"index": 0, "prediction": "earlier"}\n')
    return Setup(["predict", "--checkpoint", str(env.checkpoint), "--input", str(input_path), "--output",
                  str(output), *overrides], names, [input_path], output)


def predict_bad_line(env: Env) -> Setup:
    path = env.write("in.tsv", b"nice day\n\xff\n")
    return predict_setup(env, path, [f"{path} line 2", "UTF-8"])


def predict_wrong_kind(env: Env) -> Setup:
    path = env.write("in.jsonl", '{"features": [[1.0, 2.0]]}\n')
    return predict_setup(env, path, [str(path), "feature vectors", "tokens"], "data.format=jsonl")


def predict_no_output_dir(env: Env) -> Setup:
    path = env.write("in.tsv", "nice day\n")
    missing = env.tmp / "absent" / "out.jsonl"
    return Setup(["predict", "--checkpoint", str(env.checkpoint), "--input", str(path), "--output", str(missing)],
                 ["--output", str(missing.parent), "does not exist"], [path])


def evaluate_unseen(env: Env) -> Setup:
    path = env.write("v.tsv", "pos\tnice day\nmeh\tday\n")
    return Setup(["evaluate", "--checkpoint", str(env.checkpoint), f"data.val_path={path}"],
                 [f"{path} line 2", "label 'meh'"], [path])


def empty_val(env: Env, fmt: str) -> Setup:
    train = env.write(f"t.{fmt}", "pos\tnice day\nneg\tbad day\n" * 4 if fmt == "tsv" else
                      '{"tokens": ["a", "b"], "label": "x"}\n{"tokens": ["c"], "label": "y"}\n' * 4)
    val = env.write(f"v.{fmt}", "")
    return Setup(env.train(f"data.format={fmt}", f"data.train_path={train}", f"data.val_path={val}"),
                 [f"data.val_path: {val} holds no samples"], [train, val])


def resume_changed_file(env: Env) -> Setup:
    path = env.write("t.tsv", "pos\tsomething else entirely\nneg\tanother text\n" * 5)
    return Setup(env.train("data.format=tsv", "data.tokenizer=whitespace", f"data.train_path={path}",
                           f"checkpoint.resume={env.checkpoint}"),
                 [str(env.checkpoint), "vocabulary", "differs from the checkpoint's"], [path], run_dir_allowed=True)


def parquet(env: Env, table: dict, names: list[str], *overrides: str) -> Setup:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = env.tmp / "d.parquet"
    pq.write_table(pa.table(table), path)
    return Setup(env.train("data.format=parquet", f"data.train_path={path}", *overrides), [str(path), *names],
                 [path])


def hf_dataset_dict(env: Env) -> Setup:
    import datasets

    rows = {"tokens": [["a", "b"], ["c"]], "label": ["x", "y"]}
    folder = env.tmp / "imdb"
    datasets.disable_progress_bars()  # save_to_disk's bar goes to stderr, which must hold the error line alone
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(rows)}).save_to_disk(str(folder))
    return Setup(env.train("data.format=hf", f"data.train_path={folder}"),
                 [str(folder), "a DatasetDict folder", "train", f"{folder}/train"], [folder / "dataset_dict.json"])


def hf_no_label(env: Env) -> Setup:
    import datasets

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "label": datasets.ClassLabel(names=["pos", "neg", "neutral"])})
    rows = {"tokens": [["a", "b"], ["c"], ["d", "e"]], "label": [0, 1, -1]}
    folder = env.tmp / "train"
    datasets.disable_progress_bars()  # save_to_disk's bar goes to stderr, which must hold the error line alone
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(folder))
    return Setup(env.train("data.format=hf", f"data.train_path={folder}"),
                 [f"{folder} row 3 column 'label'", "-1", "ClassLabel"], [folder / "dataset_info.json"])


def tokenizer_file(env: Env, name: str, content: str, names: list[str]) -> Setup:
    data = env.write("d.tsv", "pos\tgood day\nneg\tbad day\n" * 3)
    path = env.write(name, content) if content else env.tmp / name
    return Setup(env.train("data.format=tsv", f"data.train_path={data}", f"data.tokenizer={path}"),
                 ["data.tokenizer", str(path), *names], [data, *([path] if content else [])])


@dataclass(frozen=True)
class Case:
    name: str
    fragment: str  # the command fragment, as the bad-input table shows it
    build: Callable[[Env], Setup]


CASES = [
    Case("text-empty-sequence", "data.format=tsv data.train_path=d.tsv (line 3: a label, a tab, no text)",
         lambda e: tsv(e, "d.tsv", "pos\tab\nneg\tcd\nneg\t\n", names=["line 3 is empty", "data.empty=drop"])),
    Case("text-line-without-tab", "data.format=tsv data.train_path=d.tsv (line 2 has no tab)",
         lambda e: tsv(e, "d.tsv", "pos\tab\njust text\n", names=["line 2", "no tab"])),
    Case("text-invalid-utf8", "data.format=tsv data.train_path=d.tsv (a 0xff byte on line 2)",
         lambda e: tsv(e, "d.tsv", b"pos\tab\nneg\tc\xffd\n", names=["line 2", "not valid UTF-8"])),
    Case("text-missing-file", "data.format=tsv data.train_path=absent.tsv",
         lambda e: Setup(e.train("data.format=tsv", f"data.train_path={e.tmp}/absent.tsv"),
                         [f"{e.tmp}/absent.tsv", "no such file"])),
    Case("sample-longer-than-max-length", "data.format=tsv data.max_length=4 (line 2 is longer)",
         lambda e: tsv(e, "d.tsv", "pos\tab\nneg\tabcdefg\nneg\tabcde\n", "data.max_length=4",
                       names=["line 2 has 7 steps", "data.max_length=4", "data.truncate=pre"])),
    Case("val-label-never-seen-in-training", "data.val_path=val.tsv (label maybe on line 2)", val_label_unseen),
    Case("json-malformed-line", "data.format=jsonl data.train_path=d.jsonl (line 2 cut short)",
         lambda e: jsonl(e, '{"tokens": ["a"], "label": "x"}\n{"tokens": ["a"], "lab\n', ["line 2", "invalid JSON"])),
    Case("json-nan-feature", "data.format=jsonl data.train_path=d.jsonl (line 2: NaN in features)",
         lambda e: jsonl(e, '{"features": [[1, 2]], "label": "x"}\n{"features": [[1, NaN]], "label": "y"}\n',
                         ["line 2", "step 0 feature 1 is NaN"])),
    Case("json-infinite-feature", "data.format=jsonl data.train_path=d.jsonl (line 1: Infinity in features)",
         lambda e: jsonl(e, '{"features": [[1, Infinity]], "label": "x"}\n', ["line 1", "is Infinity"])),
    Case("json-feature-widths-differ", "data.format=jsonl data.train_path=d.jsonl (line 2: 3 features, line 1: 2)",
         lambda e: jsonl(e, '{"features": [[1, 2]], "label": "x"}\n{"features": [[1, 2, 3]], "label": "y"}\n',
                         ["line 2", "3 features", "2"])),
    Case("npz-offsets-do-not-match-data", "data.format=npz data.train_path=d.npz (offsets end at 12, data has 10 rows)",
         npz_offsets),
    Case("ts-bad-header", "data.format=ts data.train_path=d.ts (@colour on line 2)",
         lambda e: ts(e, "@problemName p\n@colour blue\n@data\n", names=["line 2", "@colour"])),
    Case("ts-missing-value", "data.format=ts data.train_path=d.ts (? on line 8)",
         lambda e: ts(e, TS_HEAD + "1,2:3,4:a\n1,?:3,4:b\n", names=["line 8", "missing", "data.missing=zero"])),
    Case("ts-infinite-value", "data.format=ts data.train_path=d.ts data.missing=zero (inf on line 7)",
         lambda e: ts(e, TS_HEAD + "1,inf:3,4:a\n", "data.missing=zero", names=["line 7", "'inf'"])),
    Case("parquet-missing-target-column", "data.format=parquet data.train_path=d.parquet (columns tokens, y)",
         lambda e: parquet(e, {"tokens": [["a", "b"], ["c"]], "y": ["x", "z"]},
                           ["no column 'label'", "data.target_column", "tokens, y"])),
    Case("parquet-null-label", "data.format=parquet data.train_path=d.parquet (row 2: label null)",
         lambda e: parquet(e, {"tokens": [["a", "b"], ["c"]], "label": ["x", None]},
                           ["row 2 column 'label'", "null"])),
    Case("parquet-tags-do-not-match-steps", "data.format=parquet data.task=tag (row 2: 1 tag for 2 tokens)",
         lambda e: parquet(e, {"tokens": [["a"], ["b", "c"]], "tags": [["X"], ["Y"]]},
                           ["row 2 column 'tags'", "1 tags", "2 steps"], "data.task=tag")),
    Case("hf-dataset-dict-folder", "data.format=hf data.train_path=imdb (a DatasetDict: train, test)",
         hf_dataset_dict),
    Case("hf-classlabel-without-a-label", "data.format=hf data.train_path=train (row 3: ClassLabel -1, no label)",
         hf_no_label),
    Case("tokenizer-file-missing", "data.tokenizer=tokenizer.json (no such file)",
         lambda e: tokenizer_file(e, "tokenizer.json", "", ["no such file"])),
    Case("tokenizer-file-does-not-load", "data.tokenizer=broken.json (not a tokenizers file)",
         lambda e: tokenizer_file(e, "broken.json", '{"version": "1.0", "trun',
                                  ["not a Hugging Face tokenizers file"])),
    Case("tokenizer-not-sentencepiece", "data.tokenizer=sp.model (not a sentencepiece model)",
         lambda e: tokenizer_file(e, "sp.model", "not a model", ["not a sentencepiece model"])),
    Case("monitor-f1-for-regress", "data.task=regress training.monitor=val_f1_macro",
         lambda e: Setup(e.train("data.task=regress", "training.monitor=val_f1_macro"),
                         ["training.monitor", "regress has no f1_macro"])),
    Case("checkpoint-that-is-not-one", "evaluate --checkpoint train.log (a text file)",
         lambda e: Setup(["evaluate", "--checkpoint", str(e.write("train.log", "12:00:01 epoch 1/2\n"))],
                         ["train.log", "not a checkpoint"], [e.tmp / "train.log"])),
    Case("export-unknown-format", "export --checkpoint last.pt --format tflite --output m.tflite",
         lambda e: Setup(["export", "--checkpoint", str(e.checkpoint), "--format", "tflite", "--output",
                          str(e.tmp / "m.tflite")], ["--format tflite", "onnx"])),
    Case("export-output-directory-missing", "export --checkpoint last.pt --output absent/model.onnx",
         lambda e: Setup(["export", "--checkpoint", str(e.checkpoint), "--output",
                          str(e.tmp / "absent" / "model.onnx")], ["--output", "does not exist"])),
    Case("more-folds-than-samples", "data.folds=5 (3 samples)",
         lambda e: tsv(e, "d.tsv", "pos\tab\nneg\tcd\npos\tef\n", "data.folds=5",
                       names=["data.folds", "5 folds need at least 5 samples", "has 3"])),
    Case("resume-after-the-training-file-changed", "checkpoint.resume=last.pt (another training file)",
         resume_changed_file),
    Case("evaluate-label-never-seen", "evaluate --checkpoint last.pt data.val_path=v.tsv (label meh on line 2)",
         evaluate_unseen),
    Case("predict-bad-input-line", "predict --input in.tsv --output out.jsonl (bad UTF-8 on line 2)", predict_bad_line),
    Case("predict-input-of-another-kind", "predict --input in.jsonl data.format=jsonl (features for a token model)",
         predict_wrong_kind),
    Case("predict-input-of-another-format", "predict --input in.jsonl (a tsv model; data.format not given)",
         lambda e: predict_setup(e, e.write("in.jsonl", '{"tokens": ["nice", "day"]}\n'),
                                 ["in.jsonl", "data.format is tsv", "set data.format=jsonl"])),
    Case("predict-output-directory-missing", "predict --output absent/out.jsonl", predict_no_output_dir),
    Case("text-first-line-neither-header-nor-sample",
         "data.format=tsv data.train_path=d.tsv (line 1: 'stars' tab 'blurb')",
         lambda e: tsv(e, "d.tsv", "stars\tblurb\n" + "".join(f"{'pos' if i % 2 else 'neg'}\tday {i}\n"
                                                              for i in range(10)),
                       names=["line 1", "label 'stars'", "data.header=true"])),
    Case("text-columns-swapped", "data.format=tsv data.train_path=d.tsv (lines: text, tab, label)",
         lambda e: tsv(e, "d.tsv", "".join(f"a day {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(10)),
                       names=["columns look swapped", "label<TAB>text"])),
    Case("val-file-empty", "data.format=tsv data.val_path=v.tsv (an empty file)", lambda e: empty_val(e, "tsv")),
    Case("val-file-empty-jsonl", "data.format=jsonl data.val_path=v.jsonl (an empty file)",
         lambda e: empty_val(e, "jsonl")),
    Case("evaluate-empty-file", "evaluate data.val_path=v.tsv (an empty file)",
         lambda e: Setup(["evaluate", "--checkpoint", str(e.checkpoint), f"data.val_path={e.write('v.tsv', '')}"],
                         ["data.val_path:", "v.tsv holds no samples; nothing to evaluate"], [])),
    Case("predict-tab-inside-a-text", "predict --input in.tsv (line 1: 'good fun' tab 'bad day')",
         lambda e: predict_setup(e, e.write("in.tsv", "good fun\tbad day\n"),
                                 ["in.tsv line 1", "'good fun'", "not a class of the model"])),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_data_gets_one_line_and_creates_nothing(case: Case, model: Path, tmp_path: Path, capsys) -> None:
    env = Env(tmp_path, tmp_path / "runs", model)
    setup = case.build(env)
    inputs = {p: p.read_bytes() for p in setup.inputs}
    output = setup.output.read_bytes() if setup.output else None
    checkpoint = model.read_bytes()
    code = main(setup.args)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert "Traceback" not in captured.out + captured.err
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), captured.err
    for name in setup.names:
        assert name in lines[0], f"the error line must name {name!r}: {lines[0]}"
    if not setup.run_dir_allowed:
        assert not env.runs.exists() or not any(env.runs.iterdir()), "a run directory was created for bad data"
    assert all(p.read_bytes() == data for p, data in inputs.items()), "an input file changed"
    if setup.output:
        assert setup.output.read_bytes() == output, "a failed predict touched the existing output"
        assert [p.name for p in setup.output.parent.iterdir() if p.name.startswith(".out")] == []  # no temp file
    assert model.read_bytes() == checkpoint


def test_docs_list_every_data_case() -> None:
    text = TABLE_DOC.read_text(encoding="utf-8")
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    missing = [c.name for c in CASES if f"`{c.name}`" not in table]
    assert missing == [], f"cases missing from the bad-input table in {TABLE_DOC.name}: {missing}"


def test_case_messages_for_the_docs(model: Path, tmp_path: Path, capsys) -> None:
    """The messages the bad-input table shows are the ones the cases print (paths shortened to file names)."""
    text = TABLE_DOC.read_text(encoding="utf-8")
    for case in CASES:
        env = Env(tmp_path / case.name, tmp_path / case.name / "runs", model)
        env.tmp.mkdir()
        main(case.build(env).args)
        line = capsys.readouterr().err.strip()
        shown = line.replace(f"{env.tmp}/absent/", "absent/").replace(f"{env.tmp}/", "").replace(
            f"{model.parent}/", "")
        assert shown in text, f"the bad-input table in {TABLE_DOC.name} should show, for {case.name}:\n{shown}"


def test_an_empty_predict_input_gives_an_empty_output(model: Path, tmp_path: Path, capsys) -> None:
    """predict on nothing predicts nothing (issue 26, row 6): an empty file writes an empty output; a
    file whose every sample is empty is refused in one line naming it, the output left as it was."""
    empty, out = tmp_path / "in.tsv", tmp_path / "out.jsonl"
    empty.write_text("")
    assert main(["predict", "--checkpoint", str(model), "--input", str(empty), "--output", str(out)]) == 0
    assert out.read_bytes() == b"" and "predicted 0 of 0 samples" in capsys.readouterr().out
    blank = tmp_path / "blank.tsv"
    blank.write_text("\t\n")  # one line, an empty text: an empty sequence
    out.write_text('{"index": 0}\n')
    assert main(["predict", "--checkpoint", str(model), "--input", str(blank), "--output", str(out),
                 "data.empty=drop"]) == 2
    assert capsys.readouterr().err.strip() == f"ddp-seq: error: {blank}: every sample is empty"
    assert json.loads(out.read_text()) == {"index": 0}


def test_the_library_trainer_refuses_an_empty_dataset(tmp_path: Path) -> None:
    import torch

    from ddp_seq import Trainer
    from ddp_seq.errors import UserError

    items = [(torch.ones(3, 2), 0), (torch.ones(2, 2), 1)]
    with pytest.raises(UserError, match=r"^val data: the dataset is empty \(0 items\)"):
        Trainer(torch.nn.Linear(2, 2), items, [], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()
