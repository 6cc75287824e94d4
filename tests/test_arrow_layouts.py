"""Every Arrow layout of an accepted logical type reads as that type (issue 26, row 7).

Arrow writes one logical type in several layouts: strings as ``string``, ``large_string``,
``string_view`` (Polars) or dictionary-encoded (pandas ``category``, Polars ``Categorical``); lists
as ``list``, ``large_list``, ``fixed_size_list``, ``list_view`` and ``large_list_view`` (Polars);
integers and floats in every width; columns in several chunks (record batches, row groups). Each
test writes the same rows in every layout of one family with pyarrow, as Parquet and as an Arrow
file, in two record batches, and asserts that each reads exactly as the plain layout does. Bytes
(``binary`` and its layouts) are not text: refused in one line that says so.
"""

from __future__ import annotations

import decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ddp_seq.data.readers.columnar import read_columnar
from ddp_seq.errors import UserError

FORMATS = ("parquet", "hf")
LISTS = {"list": pa.list_, "large_list": pa.large_list, "list_view": pa.list_view,
         "large_list_view": pa.large_list_view}


def write(tmp_path: Path, fmt: str, columns: dict[str, pa.Array]) -> str:
    """``columns`` as a Parquet or Arrow file of two record batches (row groups): rows split 2 + rest."""
    table = pa.table(columns)
    two = pa.Table.from_batches(table.slice(0, 2).to_batches() + table.slice(2).to_batches(), table.schema)
    if fmt == "parquet":
        path = tmp_path / "data.parquet"
        pq.write_table(two, path, row_group_size=2)
    else:
        path = tmp_path / "data.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, two.schema) as writer:
            writer.write_table(two)
    return str(path)


def read(tmp_path: Path, fmt: str, columns: dict[str, pa.Array], task: str = "classify", **kwargs) -> tuple:
    """``(samples, targets)`` as Python lists: symbols of each sample's steps (or its feature rows), and
    each sample's label(s) by name, or its float target."""
    parsed = read_columnar(fmt, write(tmp_path, fmt, columns), task=task, **kwargs)
    data = parsed.data
    steps = [data[i][0] for i in range(len(data))]
    samples = [[parsed.token_symbols[k] for k in s] for s in steps] if parsed.token_symbols is not None else \
        [s.tolist() for s in steps]
    if parsed.label_symbols is None:
        return samples, data.targets.tolist()
    if data.per_step:
        return samples, [[parsed.label_symbols[k] for k in data.targets[s:s + n]]
                         for s, n in zip(data.starts, data.lengths)]
    return samples, [parsed.label_symbols[k] for k in data.targets]


TEXTS = ["ab", "c", "ba", "cab"]
NAMES = ["pos", "neg", "pos", "neutral"]


def strings(kind: str, values: list[str]) -> pa.Array:
    """``values`` in the string layout ``kind``."""
    if kind.startswith("dictionary"):  # pandas 'category' writes int8 indices, Polars uint32 ones
        value_type = {"dictionary": pa.string(), "dictionary_large": pa.large_string(),
                      "dictionary_view": pa.string_view()}[kind]
        index_type = pa.int8() if kind == "dictionary" else pa.uint32()
        distinct = list(dict.fromkeys(values))
        return pa.DictionaryArray.from_arrays(pa.array([distinct.index(v) for v in values], index_type),
                                              pa.array(distinct, value_type))
    return pa.array(values, {"string": pa.string(), "large_string": pa.large_string(),
                             "string_view": pa.string_view()}[kind])


STRING_KINDS = ["string", "large_string", "string_view", "dictionary", "dictionary_large", "dictionary_view"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", STRING_KINDS)
def test_every_string_layout_reads_as_strings_for_text_and_labels(tmp_path, fmt, kind):
    if fmt == "parquet" and kind == "dictionary_view":
        pytest.skip("Parquet cannot write a dictionary of string_view (pyarrow: unsupported cast)")
    samples, targets = read(tmp_path, fmt, {"text": strings(kind, TEXTS), "label": strings(kind, NAMES)})
    assert samples == [list(t) for t in TEXTS] and targets == NAMES


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("outer", list(LISTS) + ["fixed_size_list"])
@pytest.mark.parametrize("inner", ["string", "string_view", "dictionary", "int32", "uint8"])
def test_every_list_layout_reads_tokens_and_tags(tmp_path, fmt, outer, inner):
    tokens = [["a", "b"], ["c", "a"], ["b", "b"], ["a", "c"]]  # two per row: fixed_size_list takes them too
    tags = [["X", "Y"], ["Y", "X"], ["X", "X"], ["Y", "Y"]]
    if inner in ("int32", "uint8"):  # token ids and tag ids: integers of any width
        tokens = [[ord(t) for t in row] for row in tokens]
        tags = [[ord(t) - ord("X") for t in row] for row in tags]

    def column(rows: list[list]) -> pa.Array:
        flat = [v for row in rows for v in row]
        values = strings(inner, flat) if inner in STRING_KINDS else pa.array(flat, getattr(pa, inner)())
        if outer == "fixed_size_list":
            return pa.FixedSizeListArray.from_arrays(values, 2)
        offsets = pa.array(range(0, len(flat) + 1, 2), pa.int64() if "large" in outer else pa.int32())
        if "view" in outer:  # a view per row: its offset and size
            view = pa.LargeListViewArray if "large" in outer else pa.ListViewArray
            return view.from_arrays(offsets[:-1], pa.array([2] * len(rows), offsets.type), values)
        return (pa.LargeListArray if "large" in outer else pa.ListArray).from_arrays(offsets, values)

    samples, targets = read(tmp_path, fmt, {"tokens": column(tokens), "tags": column(tags)}, "tag")
    assert samples == tokens and targets == tags


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_list_view_in_any_order_reads_in_its_logical_order(tmp_path, fmt):
    """A list_view's offsets may run backwards and overlap: each row is read where its view points."""
    values = pa.array(["a", "b", "c", "d"])
    tokens = pa.ListViewArray.from_arrays(pa.array([2, 0, 1, 3], pa.int32()), pa.array([2, 2, 3, 1], pa.int32()),
                                          values)
    assert tokens.to_pylist() == [["c", "d"], ["a", "b"], ["b", "c", "d"], ["d"]]
    samples, targets = read(tmp_path, fmt, {"tokens": tokens, "label": NAMES})
    assert samples == tokens.to_pylist() and targets == NAMES


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("outer", list(LISTS) + ["fixed_size_list"])
@pytest.mark.parametrize("number", ["float16", "float32", "float64", "int16"])
def test_every_list_layout_and_number_width_reads_as_features(tmp_path, fmt, outer, number):
    rows = [[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]], [[0.5, -1.0], [2.0, 3.0]], [[1.0, 1.0], [0.0, 0.0]]]
    step = pa.list_(getattr(pa, number)(), 2) if outer == "fixed_size_list" else LISTS[outer](getattr(pa, number)())
    row = pa.list_(step, 2) if outer == "fixed_size_list" else LISTS[outer](step)
    column = pa.array(rows if number.startswith("float") else [[[int(v) for v in s] for s in r] for r in rows], row)
    samples, targets = read(tmp_path, fmt, {"features": column, "target": [0.5, 1.0, 1.5, 2.0]}, "regress")
    expected = rows if number.startswith("float") else [[[float(int(v)) for v in s] for s in r] for r in rows]
    assert samples == expected and targets == [0.5, 1.0, 1.5, 2.0]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("width", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
def test_integer_labels_of_every_width_are_class_indices(tmp_path, fmt, width):
    samples, targets = read(tmp_path, fmt, {"text": TEXTS, "label": pa.array([2, 0, 1, 2], getattr(pa, width)())})
    assert targets == [2, 0, 1, 2] and all(type(t) is int for t in targets)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["int8", "uint32", "int64", "float16", "float32", "float64", "decimal"])
def test_regress_targets_of_every_number_type(tmp_path, fmt, kind):
    values = [1, 2, -3, 4] if kind.startswith("int") else [1, 2, 3, 4] if kind.startswith("uint") else \
        [0.5, 2.0, -3.25, 4.0]
    column = pa.array([decimal.Decimal(str(v)) for v in values], pa.decimal128(6, 2)) if kind == "decimal" else \
        pa.array(values, getattr(pa, kind)())
    samples, targets = read(tmp_path, fmt, {"text": TEXTS, "target": column}, "regress")
    assert targets == [float(v) for v in values]
    assert np.asarray(targets).dtype == np.float64  # float32 values, as Python floats


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["binary", "large_binary", "binary_view", "fixed_size_binary", "list<binary>"])
def test_bytes_are_refused_as_not_text(tmp_path, fmt, kind):
    raw = [b"ab", b"cd", b"ba", b"dc"]
    column = pa.array([[b] for b in raw], pa.list_(pa.binary())) if kind == "list<binary>" else \
        pa.array(raw, pa.binary(2) if kind == "fixed_size_binary" else getattr(pa, kind)())
    path = write(tmp_path, fmt, {"tokens": column, "label": NAMES})
    with pytest.raises(UserError) as err:
        read_columnar(fmt, path, task="classify")
    holds = "list<" if kind.startswith("list") else f"{column.type}:"  # Parquet names the list's item 'element'
    assert str(err.value).startswith(f"{path} column 'tokens': holds {holds}")
    assert str(err.value).endswith(": bytes, not text; write the column as strings (UTF-8), e.g. pandas "
                                   ".str.decode('utf-8') or Polars .cast(pl.String)")
