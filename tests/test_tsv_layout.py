"""The structure of a TSV file, decided for the whole file (issue 26, row 8, and what was found with it):
a header line (``data.header``), whether ``predict`` input carries a label column, swapped columns.

In-process: small files in ``tmp_path`` read through the readers and ``sources`` as a run reads them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ddp_seq.config import ConfigError, DataConfig, load_config
from ddp_seq.data.readers.encoding import Encoding
from ddp_seq.data.readers.sources import load_eval_data, load_inputs, load_splits
from ddp_seq.data.readers.text import read_tsv
from ddp_seq.errors import UserError

ROWS = [("pos", "good fun"), ("neg", "bad"), ("pos", "great"), ("neg", "awful dull"), ("pos", "fine"),
        ("neg", "poor"), ("pos", "nice"), ("neg", "sad"), ("pos", "happy"), ("neg", "bleak"), ("pos", "yes")]


def tsv(path: Path, rows: list[tuple[str, str]], first: str | None = None) -> Path:
    """``label<TAB>text`` lines, after an optional first line ``first``."""
    path.write_text("".join(f"{line}\n" for line in ([first] if first else []) + [f"{a}\t{b}" for a, b in rows]),
                    encoding="utf-8")
    return path


def cfg(train: Path, **kw) -> DataConfig:
    return DataConfig(**{"format": "tsv", "train_path": str(train), "tokenizer": "whitespace", **kw})


def classes_of(path: Path, **kw) -> list:
    return read_tsv(str(path), task="classify", tokenizer="whitespace", **kw).label_symbols


# -- a header line ---------------------------------------------------------------------------------------------

def test_the_reported_header_in_train_and_val_is_skipped_and_said(tmp_path):
    """Row 8: both files start with label<TAB>text; the header was class 'label' (support 1)."""
    train = tsv(tmp_path / "train.tsv", ROWS, "label\ttext")
    val = tsv(tmp_path / "val.tsv", ROWS[:3], "label\ttext")
    splits = load_splits(cfg(train, val_path=str(val)))
    assert splits.encoding.classes == ["neg", "pos"]
    assert (len(splits.train), len(splits.val)) == (len(ROWS), 3)
    assert splits.train.lines.tolist()[0] == 2 and splits.val.lines.tolist() == [2, 3, 4]
    said = [n for n in splits.notes if "is a header" in n]
    assert said == [f"{train}: line 1 is a header ('label'), not a sample: skipped (data.header=auto; set "
                    "data.header=false to read it as a sample)", f"{val}: line 1 is a header ('label'), not a "
                    "sample: skipped (data.header=auto; set data.header=false to read it as a sample)"]
    assert load_eval_data(cfg(train, val_path=str(val)), splits.encoding)[0].lines.tolist() == [2, 3, 4]


@pytest.mark.parametrize("first", ["label\ttext", "Sentiment\treview", "polarity\tx y", "weird\tsentence",
                                   "CATEGORY\tcontent"])
def test_auto_skips_a_first_line_naming_a_column(tmp_path, first):
    assert classes_of(tsv(tmp_path / "t.tsv", ROWS, first)) == ["pos", "neg"]


def test_true_skips_any_first_line_and_false_reads_it(tmp_path):
    path = tsv(tmp_path / "t.tsv", ROWS, "label\ttext")
    assert classes_of(path, header="true") == ["pos", "neg"]
    assert classes_of(path, header="false") == ["label", "pos", "neg"]  # asked for: a sample
    plain = tsv(tmp_path / "p.tsv", ROWS)
    assert classes_of(plain, header="true") == ["neg", "pos"]  # line 1 ('pos' good fun) skipped as told
    assert len(read_tsv(str(plain), task="classify", tokenizer="char", header="true").data) == len(ROWS) - 1


def test_auto_reads_a_first_line_whose_label_other_lines_have(tmp_path):
    rows = [("label", "a"), ("x", "b"), ("label", "c")]  # a class named 'label': it occurs again
    assert classes_of(tsv(tmp_path / "t.tsv", rows)) == ["label", "x"]
    tiny = [("a", "x"), ("b", "y"), ("c", "z")]  # singletons are usual here: line 1 is a sample
    assert classes_of(tsv(tmp_path / "s.tsv", tiny)) == ["a", "b", "c"]


def test_auto_refuses_a_first_line_that_looks_like_neither(tmp_path):
    path = tsv(tmp_path / "t.tsv", ROWS, "stars\tblurb")  # no column word, but its label is alone in the file
    with pytest.raises(UserError) as err:
        classes_of(path)
    assert str(err.value) == (f"{path} line 1: label 'stars' occurs on no other line, while every other label occurs "
                              "at least twice; is line 1 a header? set data.header=true to skip it, or "
                              "data.header=false to read it as a sample")
    assert classes_of(path, header="false")[0] == "stars" and classes_of(path, header="true") == ["pos", "neg"]


def test_a_validation_file_judges_line_1_by_the_training_classes(tmp_path):
    train = tsv(tmp_path / "train.tsv", ROWS)
    val = tsv(tmp_path / "val.tsv", ROWS[:2], "stars\tblurb")
    with pytest.raises(UserError) as err:
        load_splits(cfg(train, val_path=str(val)))
    assert str(err.value) == (f"{val} line 1: label 'stars' is no class of the training data; is line 1 a header? "
                              "set data.header=true to skip it, or data.header=false to read it as a sample")
    small = tsv(tmp_path / "small.tsv", [("neg", "x"), ("pos", "y"), ("pos", "z")])  # 'neg' alone: a class
    assert load_splits(cfg(train, val_path=str(small))).val.targets.tolist() == [0, 1, 1]


def test_regress_skips_a_named_header_and_refuses_another_word(tmp_path):
    rows = [(f"{v:.1f}", "ab") for v in np.linspace(0, 1, 6)]
    parsed = read_tsv(str(tsv(tmp_path / "r.tsv", rows, "score\ttext")), task="regress", tokenizer="char")
    assert len(parsed.data) == 6 and "is a header ('score')" in parsed.notes[0]
    path = tsv(tmp_path / "w.tsv", rows, "stars\tblurb")
    with pytest.raises(UserError, match=r"w\.tsv line 1: label 'stars' is not a number \(task regress needs a numeric "
                                        r"label\); is line 1 a header\? set data\.header=true"):
        read_tsv(str(path), task="regress", tokenizer="char")


def test_data_header_is_a_tsv_key():
    assert load_config(None, ["data.format=tsv", "data.train_path=t.tsv", "data.header=true"]).data.header == "true"
    with pytest.raises(ConfigError, match=r"^data\.header: only read from tsv files, but data\.format is jsonl"):
        load_config(None, ["data.format=jsonl", "data.train_path=t.jsonl", "data.header=false"])
    with pytest.raises(ConfigError, match=r"^data\.header: must be one of auto, true, false; got 'yes'"):
        load_config(None, ["data.format=tsv", "data.train_path=t.tsv", "data.header=yes"])


# -- predict input: a label column or none ---------------------------------------------------------------------

ENCODING = Encoding(vocab=["<pad>", "<unk>", "good", "bad", "fun", "x"], classes=["neg", "pos"])


def predict_texts(tmp_path: Path, text: str, task: str = "classify") -> list[list[str]]:
    """The tokens ``predict`` reads from a file of ``text``, by the model's vocabulary (<unk> for others)."""
    path = tmp_path / "in.tsv"
    path.write_text(text, encoding="utf-8")
    encoding = ENCODING if task == "classify" else Encoding(vocab=ENCODING.vocab)
    data, _, _ = load_inputs(cfg(path, task=task), encoding, str(path))
    return [[ENCODING.vocab[k] for k in data[i][0].tolist()] for i in range(len(data))]


def test_a_tab_inside_a_text_is_refused_not_read_as_a_label(tmp_path):
    """Found by a new user: 'good fun<TAB>bad' predicted on 'bad' alone, silently."""
    path = tmp_path / "in.tsv"
    path.write_text("good fun\tbad\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_inputs(cfg(path), ENCODING, str(path))
    assert str(err.value) == (f"{path} line 1: the text before the tab, 'good fun', is not a class of the model, so "
                              "it is no label column; to predict on a text that holds a tab, start its line with a "
                              "tab (an empty label), or replace the tab")
    assert predict_texts(tmp_path, "\tgood fun\tbad\n") == [["good", "fun", "bad"]]  # the documented way


def test_predict_reads_a_label_the_model_knows_or_none(tmp_path):
    assert predict_texts(tmp_path, "pos\tgood fun\nneg\tbad\n\tx\n") == [["good", "fun"], ["bad"], ["x"]]
    assert predict_texts(tmp_path, "good fun\npos\tbad x\n") == [["good", "fun"], ["bad", "x"]]
    assert predict_texts(tmp_path, "label\ttext\npos\tgood\n") == [["good"]]  # a header, skipped
    assert predict_texts(tmp_path, "0.5\tgood\n-1\tbad\n", "regress") == [["good"], ["bad"]]
    with pytest.raises(UserError, match=r"in\.tsv line 3: the text before the tab, 'maybe', is not a class"):
        predict_texts(tmp_path, "pos\tgood\nbad fun\nmaybe\tfun\n")
    with pytest.raises(UserError, match=r"in\.tsv line 2: the text before the tab, 'fun', is not a number"):
        predict_texts(tmp_path, "0.5\tgood\nfun\tbad\n", "regress")


# -- swapped columns -----------------------------------------------------------------------------------------------

def swapped_rows(n: int = 40) -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog and runs far away from home".split()
    return [(" ".join(rng.choice(words, size=12)), ["pos", "neg", "neutral"][i % 3]) for i in range(n)]


def test_swapped_columns_are_said_in_one_short_line(tmp_path):
    path = tsv(tmp_path / "s.tsv", swapped_rows())
    with pytest.raises(UserError) as err:
        load_splits(cfg(path))
    message = str(err.value)
    assert message.startswith(f"{path}: the columns look swapped: 40 distinct labels in 40 lines (e.g. '")
    assert message.endswith("but the texts hold only 3 distinct values ('pos', 'neg', 'neutral'); lines are "
                            "label<TAB>text")
    assert len(message) < 220 + len(str(path))
    regress = tsv(tmp_path / "r.tsv", [("good fun", "0.5"), ("bad", "1.5")])
    with pytest.raises(UserError, match=r"line 1: label 'good fun' is not a number .*; the text '0\.5' is one: the "
                                        r"columns look swapped"):
        read_tsv(str(regress), task="regress", tokenizer="char", header="false")


def test_a_long_list_of_classes_is_cut_in_messages(tmp_path):
    """Many text-like classes (not swapped: the texts differ too): an unknown val label's line stays short."""
    rows = [(f"a rather long class name number {i} of many", f"text {i}") for i in range(60)]
    train = tsv(tmp_path / "train.tsv", rows[:30] + rows[:30])
    val = tsv(tmp_path / "val.tsv", [rows[0], (f"{'an unseen label ' * 10}", "x")])
    with pytest.raises(UserError) as err:
        load_splits(cfg(train, val_path=str(val)))
    message = str(err.value)
    assert message.startswith(f"{val} line 2 has label 'an unseen label an unseen label an ...', which the "
                              "training data does not have (classes: 'a rather long class name ...', ")
    assert message.endswith(", ... (30 in all); 1 unknown in all)") and len(message) < 320 + len(str(val))
