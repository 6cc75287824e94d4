"""``data.format=parquet`` and ``data.format=hf``: columns of tokens, text or features and their targets.

Small Parquet files, Arrow files and ``save_to_disk`` folders are written in ``tmp_path`` with pyarrow and
datasets themselves; everything but the last test runs in this process in milliseconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ddp_seq.config import ConfigError, load_config
from ddp_seq.data.readers.columnar import read_columnar
from ddp_seq.data.readers.sources import load_splits, read_file
from ddp_seq.errors import UserError


def parquet(tmp_path: Path, columns: dict, name: str = "data.parquet") -> str:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return str(path)


def arrow(tmp_path: Path, table: pa.Table, name: str = "data.arrow", stream: bool = False) -> str:
    """``table`` as an Arrow IPC file (or stream, as datasets writes)."""
    path = tmp_path / name
    with pa.OSFile(str(path), "wb") as sink:
        writer = pa.ipc.new_stream(sink, table.schema) if stream else pa.ipc.new_file(sink, table.schema)
        with writer:
            writer.write_table(table)
    return str(path)


def read(path: str, task: str = "classify", fmt: str = "parquet", **kwargs):
    return read_columnar(fmt, path, task=task, **kwargs)


def samples(parsed) -> list:
    """Every sample's steps as symbols (tokens) or float lists (features)."""
    data = parsed.data
    out = []
    for i in range(len(data)):
        steps = data[i][0]
        out.append([parsed.token_symbols[k] for k in steps] if parsed.token_symbols is not None else steps.tolist())
    return out


def labels(parsed) -> list:
    data = parsed.data
    if parsed.label_symbols is None:
        return data.targets.tolist()
    if data.per_step:
        return [[parsed.label_symbols[k] for k in data.targets[s:s + n]] for s, n in zip(data.starts, data.lengths)]
    return [parsed.label_symbols[k] for k in data.targets]


def mapped_file(array: np.ndarray) -> str | None:
    """The file whose memory map holds ``array``'s first byte (``/proc/self/maps``), or None."""
    address = array.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) > 5 else None
    return None


# --- inputs and targets ----------------------------------------------------------------------------------------

def test_token_lists_of_strings_and_integers_with_string_and_integer_labels(tmp_path):
    path = parquet(tmp_path, {"tokens": [["b", "a"], ["c"], []], "label": ["x", "y", "x"]})
    parsed = read(path)
    assert samples(parsed) == [["b", "a"], ["c"], []]
    assert labels(parsed) == ["x", "y", "x"]
    assert parsed.data.lines.tolist() == [1, 2, 3] and parsed.data.unit == "row"
    ids = parquet(tmp_path, {"tokens": pa.array([[7, 3], [3, 9, 7]], pa.list_(pa.int32())), "label": [2, 0]}, "i.pq")
    parsed = read(ids)
    assert samples(parsed) == [[7, 3], [3, 9, 7]]
    assert labels(parsed) == [2, 0] and all(type(s) is int for s in parsed.label_symbols)


def test_string_column_is_cut_by_the_tokenizer(tmp_path):
    path = parquet(tmp_path, {"text": ["ab a", "ba"], "label": ["p", "q"]})
    assert samples(read(path, tokenizer="char")) == [list("ab a"), list("ba")]
    assert samples(read(path, tokenizer="whitespace")) == [["ab", "a"], ["ba"]]


def test_the_first_of_tokens_text_features_is_the_input_unless_named(tmp_path):
    path = parquet(tmp_path, {"features": [[1.0], [2.0]], "text": ["ab", "c"], "label": [0, 1]})
    assert samples(read(path)) == [["a", "b"], ["c"]]  # text comes before features
    assert samples(read(path, input_column="features")) == [[[1.0]], [[2.0]]]


@pytest.mark.parametrize("kind", ["one", "lists", "fixed"])
def test_features_one_per_step_or_vectors_of_one_width(tmp_path, kind):
    rows = [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0]]]
    if kind == "one":
        column = pa.array([[1.5, -2.0], [3.0]], pa.list_(pa.float64()))
        expected = [[[1.5], [-2.0]], [[3.0]]]
    else:
        step = pa.list_(pa.float32(), 3) if kind == "fixed" else pa.list_(pa.float32())
        column, expected = pa.array(rows, pa.list_(step)), rows
    parsed = read(parquet(tmp_path, {"features": column, "target": [0.5, -1.0]}), "regress")
    assert parsed.token_symbols is None and parsed.data.values.dtype == np.float32
    assert samples(parsed) == expected
    assert parsed.data.targets.dtype == np.float32 and labels(parsed) == [0.5, -1.0]


def test_tags_one_per_step_and_a_named_target_column(tmp_path):
    path = parquet(tmp_path, {"words": [["a", "b"], ["c"]], "ner": [["O", "B"], ["B"]], "tags": [[0, 0], [0]]})
    parsed = read(path, "tag", input_column="words", target_column="ner")
    assert parsed.data.per_step and labels(parsed) == [["O", "B"], ["B"]]


def test_predict_input_needs_no_target_column(tmp_path):
    path = parquet(tmp_path, {"tokens": [["a"], ["b", "c"]]})
    for task in ("classify", "regress", "tag"):
        parsed = read(path, task, labelled=False)
        assert not parsed.labelled and samples(parsed) == [["a"], ["b", "c"]]
        assert len(parsed.data.targets) == (3 if task == "tag" else 2)


# --- bad input: one line naming the file, the row and the column ------------------------------------------------

NAN, INF = float("nan"), float("inf")
# case: (columns, reader arguments, the message after the path)
BAD = {
    "no input column": ({"words": [["a"]], "label": [0]}, {},
                        "no input column: none of tokens, text, features is present (the columns are: words, label); "
                        "name one with data.input_column"),
    "named input missing": ({"tokens": [["a"]], "label": [0]}, {"input_column": "toks"},
                            "no column 'toks' (data.input_column; the columns are: tokens, label)"),
    "no target column": ({"tokens": [["a"]], "y": [0]}, {},
                         "no column 'label' (task classify reads it by default; set data.target_column; the columns "
                         "are: tokens, y)"),
    "input of numbers": ({"tokens": [1, 2], "label": [0, 1]}, {},
                         "column 'tokens': holds int64; the input must be a list of tokens (strings or integer ids), "
                         "a string, or a list of features (floats, or a list of numbers per step)"),
    "no rows": ({"tokens": pa.array([], pa.list_(pa.string())), "label": pa.array([], pa.int64())}, {},
                "the table has no rows"),
    "null row": ({"tokens": [["a"], None], "label": [0, 1]}, {},
                 "row 2 column 'tokens': null (every row needs an input)"),
    "null token": ({"tokens": [["a"], ["b", None]], "label": [0, 1]}, {},
                   "row 2 column 'tokens': step 1 is null (lists must hold no nulls)"),
    "null label": ({"tokens": [["a"], ["b"]], "label": ["x", None]}, {},
                   "row 2 column 'label': null (every row needs a target)"),
    "float labels": ({"tokens": [["a"]], "label": [1.0]}, {},
                     "column 'label': holds double; task classify needs a label per row: an integer (class index) or "
                     "a string (class name)"),
    "negative label": ({"tokens": [["a"], ["b"]], "label": [1, -1]}, {},
                       "row 2 column 'label': -1; integer labels are class indices (>= 0)"),
    "nan feature": ({"features": [[1.0], [2.0, NAN]], "label": [0, 1]}, {},
                    "row 2 column 'features': step 1 feature 0 is nan (input values must be finite)"),
    "beyond float32": ({"features": [[[1.0, 1e39]]], "label": [0]}, {},
                       "row 1 column 'features': step 0 feature 1 is beyond float32 range (input values must be "
                       "finite)"),
    "null feature": ({"features": [[[1.0, 2.0]], [[3.0, None]]], "label": [0, 1]}, {},
                     "row 2 column 'features': step 0 feature 1 is null (lists must hold no nulls)"),
    "mixed widths": ({"features": [[[1.0, 2.0]], [[1.0, 2.0], [3.0]]], "label": [0, 1]}, {},
                     "row 2 column 'features': step 1 has 1 features, but the first step (row 1) has 2; every step "
                     "needs the same number of features"),
    "empty step": ({"features": pa.array([[], [[]]], pa.list_(pa.list_(pa.float32()))), "label": [0, 1]}, {},
                   "row 2 column 'features': step 0 is an empty list; a step needs at least one feature"),
    "infinite target": ({"tokens": [["a"], ["b"]], "target": [1.0, INF]}, {"task": "regress"},
                        "row 2 column 'target': target inf is not a finite number within float32 range"),
    "string target": ({"tokens": [["a"]], "target": ["1.5"]}, {"task": "regress"},
                      "column 'target': holds string; task regress needs numbers"),
    "tags count": ({"tokens": [["a", "b"], ["c", "d"]], "tags": [["X", "Y"], ["X"]]}, {"task": "tag"},
                   "row 2 column 'tags': 1 tags, but column 'tokens' has 2 steps; give one tag per step"),
    "negative tag": ({"tokens": [["a", "b"]], "tags": [[0, -2]]}, {"task": "tag"},
                     "row 1 column 'tags': step 1 is -2; integer tags are class indices (>= 0)"),
    "tags not lists": ({"tokens": [["a"]], "tags": ["X"]}, {"task": "tag"},
                       "column 'tags': holds string; task tag needs a list per row, one tag per step"),
}


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_rows_and_columns_are_one_line_naming_file_row_and_column(tmp_path, case, fmt):
    columns, kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    task = kwargs.pop("task", "classify")
    path = parquet(tmp_path, columns) if fmt == "parquet" else arrow(tmp_path, pa.table(columns))
    with pytest.raises(UserError) as err:
        read(path, task, fmt, **kwargs)
    # 'path row R column 'c': ...' or 'path column 'c': ...' where they are at fault, else 'path: ...'
    assert str(err.value) == f"{path}{' ' if message.startswith(('row ', 'column ')) else ': '}{message}"


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match=r"^\S+junk.parquet: not a readable Parquet file \(.+\)$"):
        read(str(junk))
    good = parquet(tmp_path, {"tokens": [["a"] * 50] * 50, "label": [0] * 50})
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(Path(good).read_bytes()[:-40])  # the footer is gone
    with pytest.raises(UserError, match=r"^\S+cut.parquet: not a readable Parquet file \(.+\)$"):
        read(str(cut))
    with pytest.raises(UserError, match=r"^\S+junk.parquet: not a readable Arrow file \(.+\)$"):
        read(str(junk), fmt="hf")
    for fmt in ("parquet", "hf"):
        with pytest.raises(UserError) as err:
            read(str(tmp_path / "gone"), fmt=fmt)
        assert str(err.value) == f"{tmp_path / 'gone'}: no such file or folder"


@pytest.mark.parametrize(("fmt", "module"), [("parquet", "pyarrow"), ("hf", "datasets")])
def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, fmt, module):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    (tmp_path / "ds").mkdir()
    with pytest.raises(UserError) as err:
        read(str(tmp_path / "ds"), fmt=fmt)
    assert str(err.value) == (f"data.format={fmt} needs the {module} package, which is not installed: "
                              f"pip install 'ddp-seq[{fmt}]'")


def test_input_and_target_columns_are_refused_for_other_formats():
    for key in ("input_column", "target_column"):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["data.format=jsonl", "data.train_path=x.jsonl", f"data.{key}=words"])
        assert str(err.value) == (f"data.{key}: only read from parquet and hf tables, but data.format is jsonl; "
                                  f"remove data.{key}")
    cfg = load_config(None, ["data.format=hf", "data.train_path=d", "data.task=tag", "data.input_column=words"])
    assert cfg.data.input_column == "words"


# --- Hugging Face datasets folders and memory mapping ------------------------------------------------------------

def test_save_to_disk_folder_keeps_features_in_the_files_pages(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=int(rng.integers(0, 6))).astype(np.float32) for _ in range(2500)]
    features = datasets.Features({"features": datasets.List(datasets.Value("float32")),
                                  "label": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"features": [r.tolist() for r in rows],
                                     "label": [f"c{len(r) % 3}" for r in rows]}, features=features)
    ds.save_to_disk(str(tmp_path / "train"))  # record batches of 1000 rows
    parsed = read(str(tmp_path / "train"), fmt="hf")
    got = samples(parsed)
    assert all(np.array_equal(np.array(g, np.float32).reshape(-1), r) for g, r in zip(got, rows))
    assert labels(parsed) == [f"c{len(r) % 3}" for r in rows]
    arrow_files = {str(p.resolve()) for p in (tmp_path / "train").glob("*.arrow")}
    assert mapped_file(parsed.data.values) in arrow_files  # the values are the file's mapped pages
    assert mapped_file(np.zeros(10)) not in arrow_files  # ... which an ordinary array is not
    ds.save_to_disk(str(tmp_path / "two"), num_shards=2)  # two files, two maps: one array must be a copy
    parsed = read(str(tmp_path / "two"), fmt="hf")
    assert all(np.array_equal(np.array(g, np.float32).reshape(-1), r) for g, r in zip(samples(parsed), rows))
    shards = {str(p.resolve()) for p in (tmp_path / "two").glob("*.arrow")}
    assert len(shards) == 2 and mapped_file(parsed.data.values) not in shards


@pytest.mark.parametrize("stream", [False, True])
def test_single_arrow_file_of_feature_vectors_is_mapped(tmp_path, stream):
    vectors = [[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0]]]
    table = pa.table({"features": pa.array(vectors, pa.list_(pa.list_(pa.float32(), 3))), "label": [1, 0]})
    path = arrow(tmp_path, table, stream=stream)
    parsed = read(path, fmt="hf")
    assert samples(parsed) == vectors
    assert mapped_file(parsed.data.values) == str(Path(path).resolve())


def test_dataset_dict_folder_is_refused_with_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_dict({"tokens": [["a"]], "label": [0]})
    datasets.DatasetDict({"train": one, "test": one}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError) as err:
        read(str(tmp_path / "dd"), fmt="hf")
    assert str(err.value) == (f"{tmp_path / 'dd'}: a DatasetDict folder (splits: train, test); point "
                              f"data.train_path, data.val_path or --input at one split's folder, e.g. "
                              f"{tmp_path / 'dd' / 'train'}")


def classlabel_dataset(datasets, tags: bool = False, label=(2, 0, 1, 0)):
    """Four rows with ClassLabel labels (or Sequence(ClassLabel) tags, one per token)."""
    names = ["pos", "neg", "neutral"]
    tokens = [["a", "b"], ["c"], ["b", "c", "a"], ["a"]]
    if tags:
        features = {"tokens": datasets.Sequence(datasets.Value("string")),
                    "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"]))}
        rows = {"tokens": tokens, "ner_tags": [[1, 2], [0], [0, 1, -1 if label is None else 0], [2]]}
    else:
        features = {"tokens": datasets.Sequence(datasets.Value("string")), "label": datasets.ClassLabel(names=names)}
        rows = {"tokens": tokens, "label": list(label)}
    return datasets.Dataset.from_dict(rows, features=datasets.Features(features))


def test_classlabel_labels_are_read_as_their_names_and_classes_are_the_sorted_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    classlabel_dataset(datasets).save_to_disk(str(tmp_path / "train"))
    classlabel_dataset(datasets, label=(1, 2, 1, 1)).save_to_disk(str(tmp_path / "val"))
    parsed = read(str(tmp_path / "train"), fmt="hf")
    assert labels(parsed) == ["neutral", "pos", "neg", "pos"]  # ids 2, 0, 1, 0 of ["pos", "neg", "neutral"]
    assert all(type(s) is str for s in parsed.label_symbols)
    cfg = load_config(None, ["data.format=hf", f"data.train_path={tmp_path / 'train'}",
                             f"data.val_path={tmp_path / 'val'}"]).data
    splits = load_splits(cfg)
    assert splits.encoding.classes == ["neg", "neutral", "pos"]  # sorted names, not ClassLabel's id order
    assert splits.train.targets.tolist() == [1, 2, 0, 2]
    assert splits.val.targets.tolist() == [0, 1, 0, 0]  # val's ids 1, 2 are 'neg', 'neutral' there too


def test_sequence_of_classlabel_tags_are_read_as_their_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    classlabel_dataset(datasets, tags=True).save_to_disk(str(tmp_path / "conll"))
    parsed = read(str(tmp_path / "conll"), "tag", "hf", target_column="ner_tags")
    assert labels(parsed) == [["B-PER", "I-PER"], ["O"], ["O", "B-PER", "O"], ["I-PER"]]
    assert parsed.data.per_step and all(type(s) is str for s in parsed.label_symbols)
    assert samples(parsed) == [["a", "b"], ["c"], ["b", "c", "a"], ["a"]]


def test_arrow_and_parquet_files_with_huggingface_metadata_give_the_names(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = classlabel_dataset(datasets)
    names = ["neutral", "pos", "neg", "pos"]
    path = arrow(tmp_path, ds.data.table)  # the schema carries datasets' 'huggingface' metadata
    assert b"huggingface" in ds.data.table.schema.metadata and labels(read(path, fmt="hf")) == names
    ds.save_to_disk(str(tmp_path / "folder"))
    (shard,) = (tmp_path / "folder").glob("*.arrow")  # the folder's own file, in the stream format
    assert labels(read(str(shard), fmt="hf")) == names
    ds.to_parquet(str(tmp_path / "data.parquet"))
    assert labels(read(str(tmp_path / "data.parquet"))) == names
    bare = arrow(tmp_path, ds.data.table.replace_schema_metadata(None), "bare.arrow")
    assert labels(read(bare, fmt="hf")) == [2, 0, 1, 0]  # without the metadata: class indices, as before
    assert labels(read(str(tmp_path / "folder"), fmt="hf", labelled=False)) == [0, 0, 0, 0]  # predict: not read


def test_a_classlabel_id_outside_its_names_is_one_line(tmp_path):
    datasets = pytest.importorskip("datasets")
    classlabel_dataset(datasets, label=(2, 0, -1, 0)).save_to_disk(str(tmp_path / "cls"))
    with pytest.raises(UserError) as err:
        read(str(tmp_path / "cls"), fmt="hf")
    assert str(err.value) == (f"{tmp_path / 'cls'} row 3 column 'label': -1, not an id of the column's ClassLabel "
                              "(0..2: 'pos', 'neg', 'neutral'); Hugging Face uses -1 for 'no label', but every label "
                              "needs a class")
    classlabel_dataset(datasets, tags=True, label=None).save_to_disk(str(tmp_path / "tags"))
    with pytest.raises(UserError) as err:
        read(str(tmp_path / "tags"), "tag", "hf", target_column="ner_tags")
    assert str(err.value).startswith(f"{tmp_path / 'tags'} row 3 column 'ner_tags': step 2 is -1, not an id of "
                                     "the column's ClassLabel (0..2: 'O', 'B-PER', 'I-PER');")
    table = classlabel_dataset(datasets).data.table
    too_big = table.set_column(1, "label", pa.array([0, 3, 1, 0], pa.int64()))  # keeps the schema's metadata
    with pytest.raises(UserError, match=r"row 2 column 'label': 3, not an id of the column's ClassLabel \(0\.\.2"):
        read(arrow(tmp_path, too_big), fmt="hf")


# --- through the data pipeline ---------------------------------------------------------------------------------

def test_length_policies_name_the_row(tmp_path):
    path = parquet(tmp_path, {"tokens": [["a"], ["a", "b", "c"], [], ["b"]], "label": [0, 1, 0, 1]})
    cfg = load_config(None, ["data.format=parquet", f"data.train_path={path}", "data.max_length=2"]).data
    with pytest.raises(UserError) as err:
        read_file(cfg, path)
    assert str(err.value).startswith(f"{path} row 3 is empty (length 0)")
    cfg.empty = "drop"
    with pytest.raises(UserError) as err:
        read_file(cfg, path)
    assert str(err.value).startswith(f"{path} row 2 has 3 steps, more than data.max_length=2")
    cfg.truncate = "pre"
    parsed, notes = read_file(cfg, path)
    assert samples(parsed) == [["a"], ["b", "c"], ["b"]] and parsed.data.lines.tolist() == [1, 2, 4]


def test_load_splits_encodes_a_parquet_file(tmp_path):
    tokens = [["a", "b"], ["b"], ["b", "c", "b"], ["a"], ["c"], ["b", "a"]]
    path = parquet(tmp_path, {"tokens": tokens, "label": ["n", "y", "n", "y", "n", "y"]})
    val = parquet(tmp_path, {"tokens": [["c", "z"]], "label": ["y"]}, "val.parquet")
    cfg = load_config(None, ["data.format=parquet", f"data.train_path={path}", f"data.val_path={val}"]).data
    splits = load_splits(cfg)
    enc = splits.encoding
    assert enc.vocab == ["<pad>", "<unk>", "b", "a", "c"] and enc.classes == ["n", "y"]
    assert splits.train.values[splits.train.starts[2]:][:3].tolist() == [2, 4, 2]
    assert splits.train.targets.tolist() == [0, 1, 0, 1, 0, 1]
    assert splits.val.values.tolist() == [4, 1]  # z is unknown: <unk>
    assert splits.val.where(0) == f"{val} row 1"


@pytest.mark.slow
def test_train_and_predict_on_parquet_keep_the_input_order(tmp_path):
    """One tiny tag model trained in this process on a Parquet file; predict names every row in order."""
    from ddp_seq.builders import encoding_of, model_from_checkpoint
    from ddp_seq.cli import main

    rng = np.random.default_rng(1)
    tokens = [[str(t) for t in rng.choice(list("abcde"), size=int(rng.integers(1, 7)))] for _ in range(48)]
    path = parquet(tmp_path, {"tokens": tokens, "tags": [[t.upper() for t in row] for row in tokens]})
    assert main(["train", "data.task=tag", "data.format=parquet", f"data.train_path={path}", "training.epochs=2",
                 "model.hidden=16", "model.embedding_dim=8", "model.layers=1", "batching.batch_size=32",
                 "training.warmup_steps=5", "logging.progress=none", f"logging.root={tmp_path}",
                 "logging.name=tag"]) == 0
    checkpoint = tmp_path / "tag/checkpoints/last.pt"
    inputs = [list("edcba"), [], list("ab"), list("c"), list("bbbb")]  # lengths differ: batches are sorted
    new = parquet(tmp_path, {"tokens": pa.array(inputs, pa.list_(pa.string()))}, "new.parquet")
    out = tmp_path / "out.jsonl"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", new, "--output", str(out),
                 "data.empty=drop"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1] == {"index": 1, "prediction": None, "skipped": "empty sequence (data.empty=drop)"}
    model, cfg, state = model_from_checkpoint(checkpoint)
    encoding = encoding_of(state, cfg)
    for i in (0, 2, 3, 4):  # each row is the prediction for its own input, applied alone
        ids = torch.tensor([[encoding.vocab.index(t) if t in encoding.vocab else 1 for t in inputs[i]]])
        with torch.no_grad():
            tags = model.eval()(ids, torch.tensor([len(inputs[i])]))[0].argmax(-1).tolist()
        assert rows[i]["prediction"] == [encoding.classes[k] for k in tags]


def test_the_cli_reports_a_bad_table_in_one_line_with_exit_code_2(tmp_path, capsys):
    from ddp_seq.cli import main

    path = parquet(tmp_path, {"tokens": [["a"], ["b"]], "label": ["x", None]})
    code = main(["train", "data.format=parquet", f"data.train_path={path}", f"logging.root={tmp_path}/runs",
                 "logging.progress=none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"ddp-seq: error: {path} row 2 column 'label': null (every row needs a target)"
    assert not (tmp_path / "runs").exists()
