"""Columnar files: Parquet (``data.format=parquet``) and Hugging Face ``datasets`` / Arrow (``data.format=hf``).

A table becomes a :class:`~ddp_seq.data.readers.encoding.Parsed`, as the text readers' lines do: one row is one
sample, ``lines`` holds its 1-based row number (``SequenceData.unit`` is ``"row"``, so messages say
``path row 7``), tokens and labels get file-local ids, features are float32 rows. Two columns are read:

* the input (``data.input_column``; empty = the first of ``tokens``, ``text``, ``features`` the table
  has): a list of strings or integers (tokens: token ids are integers), a string (cut by
  ``data.tokenizer``), a list of floats (one feature per step) or a list of lists of numbers (a feature
  vector per step, one width throughout);
* the target (``data.target_column``; empty = ``label`` / ``target`` / ``tags`` by task): integers
  (class indices) or strings (class names) for classify, numbers for regress, a list per row with one
  tag per step for tag. ``labelled=False`` (``predict`` input): optional and not read. A Hugging Face
  ``ClassLabel`` column (or a list of ``ClassLabel``, e.g. CoNLL ``ner_tags``) is read as its *names*
  (:mod:`~ddp_seq.data.readers.classlabel`), so the classes are the sorted names, not ``ClassLabel``'s ids.

"A string" and "a list" mean every Arrow layout of one: ``string``, ``large_string``, ``string_view``
and dictionary-encoded strings (pandas ``category``, Polars ``Categorical``); ``list``, ``large_list``,
``fixed_size_list``, ``list_view``, ``large_list_view`` (Polars writes the views); integers and floats
of every width, and decimals for regress targets. Bytes (``binary`` and its layouts) are refused:
they need not be text.

Lists are flattened with Arrow (offsets and child arrays), never row by row in Python. Feature values
of an Arrow file (``hf``) stay views of its memory map when the column is float32 and either one
record batch, or record batches whose value buffers lie whole rows apart in the file (always for one
or two features per step, as Arrow pads buffers to 8 bytes) and the task is not tag: every rank of a
node then shares the file's pages, as with NPZ. Otherwise -- and always for Parquet, whose pages are
encoded and compressed -- the decoded values are the process's own memory.

Every problem is a :class:`UserError` of one line naming the file and, where one is at fault, the row
and the column: ``path row 7 column 'tokens': ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ddp_seq.data.readers.arrow_features import locate as _locate
from ddp_seq.data.readers.arrow_features import read_features
from ddp_seq.data.readers.classlabel import class_names, schema_class_names
from ddp_seq.data.readers.encoding import Parsed, _shown
from ddp_seq.data.readers.sequences import SequenceData
from ddp_seq.data.readers.text import _F32_MAX, TASKS, int_ids, offsets_of, tokenize_texts
from ddp_seq.errors import UserError, first_line

INPUTS = ("tokens", "text", "features")  # data.input_column's automatic choice, in this order
TARGETS = {"classify": "label", "regress": "target", "tag": "tags"}  # data.target_column's default by task
INSTALL = {"parquet": "pip install 'ddp-seq[parquet]'", "hf": "pip install 'ddp-seq[hf]'"}


def _import(fmt: str, package: str) -> Any:
    """``pyarrow`` (with ``pyarrow.parquet`` / ``pyarrow.compute``) or ``datasets``; a missing one is one line."""
    try:
        if package == "datasets":
            import datasets as module
        else:
            import pyarrow as module
            import pyarrow.compute  # noqa: F401 -- used through module.compute
            import pyarrow.parquet  # noqa: F401 -- used through module.parquet
    except ImportError:
        raise UserError(f"data.format={fmt} needs the {package} package, which is not installed: "
                        f"{INSTALL[fmt]}") from None
    return module


def _exists(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    return p


def _names(table: Any) -> str:
    return ", ".join(table.column_names) or "none"


def _columns(path: str, names: list[str], task: str, input_column: str, target_column: str,
             labelled: bool) -> tuple[str, str | None]:
    """The input and target column names (target None when not read); refuse missing ones, listing the present."""
    present = ", ".join(names) or "none"
    if input_column:
        if input_column not in names:
            raise UserError(f"{path}: no column {input_column!r} (data.input_column; the columns are: {present})")
        source = input_column
    else:
        source = next((c for c in INPUTS if c in names), None)
        if source is None:
            raise UserError(f"{path}: no input column: none of {', '.join(INPUTS)} is present (the columns are: "
                            f"{present}); name one with data.input_column")
    if not labelled:
        return source, None
    target = target_column or TARGETS[task]
    if target not in names:
        key = "data.target_column" if target_column else f"task {task} reads it by default; set data.target_column"
        raise UserError(f"{path}: no column {target!r} ({key}; the columns are: {present})")
    if target == source:
        raise UserError(f"{path}: column {target!r} is both the input and the target; set data.input_column or "
                        "data.target_column")
    return source, target


def read_parquet(path: str, *, task: str, input_column: str = "", target_column: str = "",
                 tokenizer: Any = "char", labelled: bool = True) -> Parsed:
    """Read a Parquet file (``pyarrow.parquet.read_table(memory_map=True)``, only the two columns needed).

    Parquet pages are encoded and compressed, so the decoded columns are this process's memory, not
    shared pages. Raises :class:`UserError` for a missing or unreadable file and for bad rows.
    """
    pa = _import("parquet", "pyarrow")
    p = _exists(path)
    if not p.is_file():
        raise UserError(f"{path}: a folder, not a Parquet file; give one .parquet file")
    try:
        schema = pa.parquet.read_schema(path, memory_map=True)
    except Exception as e:  # noqa: BLE001 -- ArrowInvalid (not Parquet, truncated), OSError, ...
        raise UserError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    source, target = _columns(path, schema.names, task, input_column, target_column, labelled)
    try:
        table = pa.parquet.read_table(path, columns=[c for c in (source, target) if c], memory_map=True)
    except Exception as e:  # noqa: BLE001 -- a corrupt page or column chunk
        raise UserError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    return parse_table(table, path, task=task, input_column=source, target_column=target or "",
                       tokenizer=tokenizer, labelled=labelled, label_names=schema_class_names(schema, target or ""))


def _arrow_file(pa: Any, path: str) -> Any:
    """A ``.arrow`` file (IPC file or stream format) read from a memory map: zero-copy buffers."""
    try:
        source = pa.memory_map(path)
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:  # not the file format: datasets writes the stream format
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()
    except Exception as e:  # noqa: BLE001 -- not Arrow at all, truncated, unreadable
        raise UserError(f"{path}: not a readable Arrow file ({first_line(e)})") from None


def _dataset_folder(path: str, p: Path) -> tuple[Any, Any]:
    """The table and features of a ``Dataset.save_to_disk`` folder (``datasets.load_from_disk`` maps its
    Arrow files)."""
    splits_file = p / "dataset_dict.json"
    if splits_file.is_file():
        try:
            splits = ", ".join(json.loads(splits_file.read_text(encoding="utf-8"))["splits"])
        except Exception:  # noqa: BLE001 -- the advice holds without the names
            splits = "see dataset_dict.json"
        raise UserError(f"{path}: a DatasetDict folder (splits: {splits}); point data.train_path, data.val_path "
                        f"or --input at one split's folder, e.g. {Path(path) / splits.split(', ')[0]}")
    datasets = _import("hf", "datasets")
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as e:  # noqa: BLE001 -- not a save_to_disk folder, damaged files
        raise UserError(f"{path}: not a readable datasets folder (written by Dataset.save_to_disk): "
                        f"{first_line(e)}") from None
    if not isinstance(loaded, datasets.Dataset):
        raise UserError(f"{path}: a DatasetDict folder (splits: {', '.join(loaded)}); point at one split's folder")
    # save_to_disk writes flattened rows, so no indices mapping is left; select() results would have one.
    table = loaded.data.table if getattr(loaded, "_indices", None) is None else loaded.with_format("arrow")[:]
    return table, loaded.features


def read_hf(path: str, *, task: str, input_column: str = "", target_column: str = "",
            tokenizer: Any = "char", labelled: bool = True) -> Parsed:
    """Read a ``datasets.Dataset.save_to_disk`` folder or a single ``.arrow`` file (IPC file or stream).

    Both are memory-mapped; float32 feature values stay views of the map where the layout allows (see
    the module). A ``DatasetDict`` folder is refused with the names of its splits. A ``ClassLabel``
    target (the folder's features, or the ``.arrow`` file's ``huggingface`` schema metadata) is read as
    its names.
    """
    pa = _import("hf", "pyarrow")
    p = _exists(path)
    target = (target_column or TARGETS.get(task, "")) if labelled else ""
    if p.is_dir():
        table, features = _dataset_folder(path, p)
        names = class_names(features.get(target)) if target else None
    else:
        table = _arrow_file(pa, path)
        names = schema_class_names(table.schema, target)
    return parse_table(table, path, task=task, input_column=input_column, target_column=target_column,
                       tokenizer=tokenizer, labelled=labelled, label_names=names)


def read_columnar(fmt: str, path: str, *, task: str, input_column: str = "", target_column: str = "",
                  tokenizer: Any = "char", labelled: bool = True) -> Parsed:
    """:func:`read_parquet` (``fmt`` ``parquet``) or :func:`read_hf` (``hf``)."""
    reader = read_parquet if fmt == "parquet" else read_hf
    return reader(path, task=task, input_column=input_column, target_column=target_column, tokenizer=tokenizer,
                  labelled=labelled)


class _Table:
    """One table being parsed: the path and column names for messages, Arrow's modules."""

    def __init__(self, pa: Any, path: str) -> None:
        self.pa, self.pc, self.path = pa, pa.compute, path

    def at(self, row: int, column: str) -> str:
        """``path row R column 'c'`` for 0-based ``row``."""
        return f"{self.path} row {row + 1} column {column!r}"

    def plain(self, column: Any) -> Any:
        """``column`` (a ChunkedArray) without extension or dictionary types: their storage or decoded values.

        Dictionary-encoded columns are what pandas' ``category`` and Polars' ``Categorical`` /
        ``Enum`` write; they are decoded chunk by chunk (each record batch may carry its own
        dictionary), also inside lists (:meth:`lists` passes the flat values through here).
        ``string_view`` (Polars' strings) becomes ``large_string``: Arrow's kernels do not all take
        views yet (``take`` does not in pyarrow 26), and the strings are copied into Python anyway.
        """
        pa = self.pa
        if isinstance(column.type, pa.ExtensionType):
            column = pa.chunked_array([c.storage for c in column.chunks], type=column.type.storage_type)
        if pa.types.is_dictionary(column.type):
            value_type = self._unviewed(column.type.value_type)
            column = pa.chunked_array([pa.DictionaryArray.from_arrays(c.indices, c.dictionary.cast(value_type))
                                       .dictionary_decode() for c in column.chunks], type=value_type)
        if pa.types.is_string_view(column.type):
            column = column.cast(pa.large_string())
        return column

    def _unviewed(self, t: Any) -> Any:
        return self.pa.large_string() if self.pa.types.is_string_view(t) else t

    def no_null_rows(self, column: Any, name: str, what: str) -> None:
        if column.null_count:
            row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            raise UserError(f"{self.at(row, name)}: null (every row needs {what})")

    # Arrow has several layouts of one logical type; every one of them is accepted, as pandas, Polars
    # (views: string_view, list_view), datasets and pyarrow each write another. Reading goes through
    # list_value_length / flatten / dictionary_encode / to_pylist, which take every layout, never
    # through offsets buffers (a list_view's offsets may be out of order or overlap).
    def is_list(self, t: Any) -> bool:
        """list, large_list, fixed_size_list, list_view, large_list_view."""
        types = self.pa.types
        return types.is_list(t) or types.is_large_list(t) or types.is_fixed_size_list(t) or \
            types.is_list_view(t) or types.is_large_list_view(t)

    def is_string(self, t: Any) -> bool:
        """string, large_string, string_view (dictionary-encoded strings are decoded by :meth:`plain`)."""
        types = self.pa.types
        return types.is_string(t) or types.is_large_string(t) or types.is_string_view(t)

    def is_binary(self, t: Any) -> bool:
        """Bytes (binary, large_binary, binary_view, fixed_size_binary): refused, they need not be text."""
        types = self.pa.types
        return types.is_binary(t) or types.is_large_binary(t) or types.is_binary_view(t) or \
            types.is_fixed_size_binary(t)

    def refuse_binary(self, t: Any, name: str) -> None:
        """Bytes are not text: say so (and how to fix it) instead of listing what the column may hold."""
        if self.is_binary(t) or (self.is_list(t) and self.is_binary(t.value_type)):
            raise UserError(f"{self.path} column {name!r}: holds {t}: bytes, not text; write the column as "
                            "strings (UTF-8), e.g. pandas .str.decode('utf-8') or Polars .cast(pl.String)")

    def is_number(self, t: Any) -> bool:
        return self.pa.types.is_integer(t) or self.pa.types.is_floating(t)

    def lists(self, column: Any, name: str) -> tuple[np.ndarray, Any]:
        """``(lengths, flat)`` of a list column with no null rows: int64 per row, and the child values
        (a ChunkedArray, a chunk per record batch) with a null entry reported by row and step."""
        lengths = np.concatenate([self.pc.list_value_length(c).to_numpy(zero_copy_only=False)
                                  for c in column.chunks] or [np.zeros(0)]).astype(np.int64)
        flat = self.plain(self.pa.chunked_array([c.flatten() for c in column.chunks], type=column.type.value_type))
        if flat.null_count:
            row, step = _locate(offsets_of(lengths), int(np.argmax(flat.is_null().to_numpy(zero_copy_only=False))))
            raise UserError(f"{self.at(row, name)}: step {step} is null (lists must hold no nulls)")
        return lengths, flat


    def symbols(self, flat: Any, name: str, lengths: np.ndarray, what: str,
                names: list[str] | None = None) -> tuple[np.ndarray, list]:
        """File-local ``(ids, symbols)`` of flat strings or integers (tokens, tags, labels).

        Strings: Arrow's ``dictionary_encode`` (ids in order of first occurrence, as ``intern_all``);
        integers: :func:`~ddp_seq.data.readers.text.int_ids` (ascending). Negative integer labels and tags are
        refused (they are class indices); ``lengths`` locates the row of a value (None: one per row).
        ``names``: a ``ClassLabel``'s names; integers are then its ids, the symbols are the names, and an
        id outside ``0..len(names)-1`` (Hugging Face's -1 = no label) is refused.
        """
        t = flat.type
        self.refuse_binary(t, name)
        if self.is_string(t):
            encoded = self.pc.dictionary_encode(flat.combine_chunks() if flat.num_chunks else
                                                self.pa.array([], type=t))
            ids = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            return ids, encoded.dictionary.to_pylist()
        if not self.pa.types.is_integer(t):
            raise UserError(f"{self.path} column {name!r}: holds {t}; {what} must be strings or integers")
        codes = flat.to_numpy() if flat.num_chunks else np.zeros(0, dtype=np.int64)
        if codes.dtype == np.uint64 and len(codes) and codes.max() > np.iinfo(np.int64).max:
            raise UserError(f"{self.path} column {name!r}: a value is beyond the 64-bit integer range")
        codes = codes.astype(np.int64, copy=False)
        bad = None if what == "tokens" or not len(codes) else \
            (codes < 0) if names is None else (codes < 0) | (codes >= len(names))
        if bad is not None and bad.any():
            at = int(np.argmax(bad))  # the first
            row, step = _locate(offsets_of(lengths), at) if lengths is not None else (at, None)
            where = f"{self.at(row, name)}: {'' if step is None else f'step {step} is '}{codes[at]}"
            if names is None:
                raise UserError(f"{where}; integer {what} are class indices (>= 0)")
            raise UserError(f"{where}, not an id of the column's ClassLabel (0..{len(names) - 1}: {_shown(names)}); "
                            f"Hugging Face uses -1 for 'no label', but every {what[:-1]} needs a class")
        ids, distinct = int_ids(codes)
        if names is not None:  # the names of the ids present, through an array: no loop over rows
            return ids, np.asarray(names, dtype=object)[distinct].tolist()
        return ids, distinct.tolist()


def parse_table(table: Any, path: str, *, task: str, input_column: str = "", target_column: str = "",
                tokenizer: Any = "char", labelled: bool = True, label_names: list[str] | None = None) -> Parsed:
    """A ``pyarrow.Table`` (one sample per row) as :class:`Parsed` data; ``path`` names it in messages.

    ``values``: int64 file-local token ids ``[total_steps]`` or float32 features ``[steps, width]``;
    ``targets``: int64 label ids (classify: per row; tag: per step) or float32 values (regress).
    ``label_names``: the target column's ``ClassLabel`` names (see :meth:`_Table.symbols`), or None.
    """
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401 -- pa.compute

    if task not in TASKS:
        raise UserError(f"{path}: unknown task {task!r} (expected one of {', '.join(TASKS)})")
    source, target = _columns(path, table.column_names, task, input_column, target_column, labelled)
    if table.num_rows == 0:
        raise UserError(f"{path}: the table has no rows")
    t = _Table(pa, path)
    column = t.plain(table.column(source))
    t.no_null_rows(column, source, "an input")
    t.refuse_binary(column.type, source)
    token_symbols: list | None = None
    feature_view: tuple[np.ndarray, np.ndarray] | None = None
    if t.is_string(column.type):
        texts = column.to_pylist()
        values, token_symbols, lengths = tokenize_texts(path, texts, tokenizer)
        lengths = np.asarray(lengths, dtype=np.int64)
    elif t.is_list(column.type) and (t.is_list(column.type.value_type) or
                                     pa.types.is_floating(column.type.value_type)):
        lengths, values, feature_view = read_features(t, column, source, shared=task != "tag")
    elif t.is_list(column.type):
        lengths, flat = t.lists(column, source)
        values, token_symbols = t.symbols(flat, source, lengths, "tokens")
    else:
        raise UserError(f"{path} column {source!r}: holds {column.type}; the input must be a list of tokens "
                        "(strings or integer ids), a string, or a list of features (floats, or a list of numbers per "
                        "step)")
    offsets = offsets_of(lengths)
    n, total = table.num_rows, int(offsets[-1])
    label_symbols = None
    if not labelled:
        targets = np.zeros(total if task == "tag" else n, dtype=np.float32 if task == "regress" else np.int64)
    else:
        targets, label_symbols = _targets(t, t.plain(table.column(target)), target, task, lengths, source,
                                          label_names)
    lines = np.arange(1, n + 1, dtype=np.int64)
    if feature_view is not None:  # the features are rows of a mapped region, at these starts
        values, starts = feature_view
        data = SequenceData(values, None, targets, task == "tag", starts, lengths, lines=lines, source=path,
                            unit="row")
    else:
        data = SequenceData(values, offsets, targets, task == "tag", lines=lines, source=path, unit="row")
    return Parsed(data, token_symbols, label_symbols, labelled)


def _targets(t: _Table, column: Any, name: str, task: str, lengths: np.ndarray, source: str,
             names: list[str] | None = None) -> tuple[np.ndarray, list | None]:
    """``(targets, label_symbols)`` of the target column (see :func:`parse_table`; ``names``: its ClassLabel's)."""
    t.no_null_rows(column, name, "a target")
    t.refuse_binary(column.type, name)
    kind = column.type
    if task == "regress":
        if t.pa.types.is_decimal(kind):  # exact decimals (pandas' Decimal objects, SQL exports): values are floats
            column, kind = column.cast(t.pa.float64()), t.pa.float64()
        if not t.is_number(kind):
            raise UserError(f"{t.path} column {name!r}: holds {kind}; task regress needs numbers")
        raw = column.to_numpy().astype(np.float64)
        bad = ~np.isfinite(raw) | (np.abs(raw) > _F32_MAX)
        if bad.any():
            row = int(np.argmax(bad))
            raise UserError(f"{t.at(row, name)}: target {float(raw[row])} is not a finite number within float32 range")
        return raw.astype(np.float32), None
    if task == "classify":
        if t.is_list(kind) or not (t.is_string(kind) or t.pa.types.is_integer(kind)):
            raise UserError(f"{t.path} column {name!r}: holds {kind}; task classify needs a label per row: "
                            "an integer (class index) or a string (class name)")
        return t.symbols(column, name, None, "labels", names)
    if not t.is_list(kind):
        raise UserError(f"{t.path} column {name!r}: holds {kind}; task tag needs a list per row, one tag per step")
    counts, flat = t.lists(column, name)
    if not np.array_equal(counts, lengths):
        row = int(np.argmax(counts != lengths))
        raise UserError(f"{t.at(row, name)}: {counts[row]} tags, but column {source!r} has {lengths[row]} steps; "
                        "give one tag per step")
    return t.symbols(flat, name, counts, "tags", names)
