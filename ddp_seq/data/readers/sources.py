"""Where the train and val sequences come from, and how they become model inputs.

A file is read into :class:`Parsed` data (``data.format``: npz, tsv, jsonl, ts, parquet, hf), the length
policies are applied (``data.empty``, ``data.max_length`` with ``data.truncate``), the samples are
split (``val_path``, a ``val_fraction`` hold-out or a cross-validation fold), the
:class:`Encoding` is built from the training samples only, and the whole file is encoded once;
the splits are views of it. Everything here is deterministic from the config, so every rank
builds the same splits and the same vocabulary on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddp_seq.config import DataConfig
from ddp_seq.config_fields import TEXT_FORMATS
from ddp_seq.data.folds import fold_assignment, fold_indices
from ddp_seq.data.readers import synthetic
from ddp_seq.data.readers.encoding import Encoding, Parsed, _is_index, build_encoding, encode
from ddp_seq.data.readers.files import read_npz
from ddp_seq.data.readers.sequences import SequenceData, span_steps
from ddp_seq.data.readers.synthetic import make_synthetic
from ddp_seq.data.readers.tokenizers import SubwordTokenizer, is_subword, text_tokenizer, trained_tokenizer
from ddp_seq.errors import UserError


@dataclass
class Splits:
    """The data of one training job (or one fold of it)."""

    train: SequenceData
    val: SequenceData
    encoding: Encoding
    notes: list[str] = field(default_factory=list)  # what the length policies did, for the log


#: File name endings that say which data.format a file is in (others, e.g. .txt or a folder, say nothing).
SUFFIX_FORMATS = {".tsv": "tsv", ".jsonl": "jsonl", ".npz": "npz", ".ts": "ts", ".parquet": "parquet", ".arrow": "hf"}


def _check_suffix(fmt: str, path: str) -> None:
    """Refuse a file whose ending names another format than ``data.format`` (say, a .tsv given to a
    checkpoint trained on hf data): its reader would fail with a message about the wrong format."""
    named = SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if named is not None and named != fmt:
        raise UserError(f"{path}: a .{Path(path).suffix[1:]} file, but data.format is {fmt}; set data.format={named} "
                        "to read it as such")


def read_raw(cfg: DataConfig, path: str, labelled: bool = True, tokenizer: str | SubwordTokenizer | None = None,
             classes: list | None = None) -> Parsed:
    """One file of ``data.format`` as :class:`Parsed` data, before the length policies.

    ``tokenizer`` cuts text (tsv, string columns): ``char``, ``whitespace`` or a
    :class:`~ddp_seq.data.readers.tokenizers.SubwordTokenizer`; None: ``data.tokenizer`` (a file is loaded once
    per process). ``evaluate`` and ``predict`` pass the checkpoint's (:func:`trained_tokenizer`).
    ``classes``: the training data's, for a file read after them (tsv: is line 1 a header, do predict
    input lines carry a label column; see :mod:`~ddp_seq.data.readers.tsv_layout`).
    """
    _check_suffix(cfg.format, path)
    if tokenizer is None:
        tokenizer = text_tokenizer(cfg.tokenizer) if cfg.format in TEXT_FORMATS else cfg.tokenizer
    # Imported here: each reader is needed only for its own format.
    if cfg.format == "npz":
        return read_npz(path, cfg.task, labelled)
    if cfg.format == "tsv":
        from ddp_seq.data.readers.text import read_tsv

        return read_tsv(path, task=cfg.task, tokenizer=tokenizer, labelled=labelled, header=cfg.header,
                        classes=classes)
    if cfg.format == "jsonl":
        from ddp_seq.data.readers.text import read_jsonl

        return read_jsonl(path, task=cfg.task, labelled=labelled)
    if cfg.format in ("parquet", "hf"):
        from ddp_seq.data.readers.columnar import read_columnar

        return read_columnar(cfg.format, path, task=cfg.task, input_column=cfg.input_column,
                             target_column=cfg.target_column, tokenizer=tokenizer, labelled=labelled)
    if cfg.format == "ts":
        from ddp_seq.data.readers.uea import read_ts

        return read_ts(path, task=cfg.task, missing=cfg.missing, labelled=labelled)
    raise ValueError(f"no reader for data.format={cfg.format}")


def apply_length_policies(parsed: Parsed, cfg: DataConfig) -> tuple[Parsed, list[str]]:
    """``data.empty`` and ``data.max_length``/``data.truncate`` applied to ``parsed``; returns notes to log.

    Both act on the spans only (a dropped sample is left out of the view, a truncated one gets a
    shorter span over the same steps), so nothing is copied.
    """
    data, notes = parsed.data, list(parsed.notes)  # the reader's first (a skipped header line)
    empty = data.lengths == 0
    if empty.any():
        count = int(empty.sum())
        if cfg.empty == "error":
            also = f"; {count} samples are empty" if count > 1 else ""
            raise UserError(f"{data.where(int(np.argmax(empty)))} is empty (length 0){also}: a recurrent net cannot "
                            "read a sequence of no steps; remove such samples or set data.empty=drop")
        data = data.select(np.flatnonzero(~empty))
        notes.append(f"{data.source}: dropped {count} empty sample(s) (data.empty=drop)")
        if len(data) == 0:
            raise UserError(f"{data.source}: every sample is empty")
    limit = cfg.max_length
    if limit and data.lengths.max(initial=0) > limit:
        longer = data.lengths > limit
        if cfg.truncate == "error":
            longest = int(np.argmax(data.lengths))
            raise UserError(f"{data.where(longest)} has {int(data.lengths[longest])} steps, more than "
                            f"data.max_length={limit} (the longest; {int(longer.sum())} sample(s) are longer): "
                            "set data.truncate=pre (keep the last steps) or post (keep the first), "
                            "or raise data.max_length")
        cut = np.minimum(data.lengths, limit)
        # pre keeps the last `limit` steps, as Keras' pad_sequences(truncating="pre") does.
        starts = data.starts + (data.lengths - cut) if cfg.truncate == "pre" else data.starts
        data = data.with_spans(starts, cut)
        notes.append(f"{data.source}: cut {int(longer.sum())} sample(s) to data.max_length={limit} "
                     f"(data.truncate={cfg.truncate})")
    return Parsed(data, parsed.token_symbols, parsed.label_symbols, parsed.labelled), notes


def read_file(cfg: DataConfig, path: str, labelled: bool = True, tokenizer: str | SubwordTokenizer | None = None,
              classes: list | None = None) -> tuple[Parsed, list[str]]:
    """:func:`read_raw` then :func:`apply_length_policies`."""
    return apply_length_policies(read_raw(cfg, path, labelled, tokenizer, classes), cfg)


def require_samples(parsed: Parsed, key: str, path: str, why: str) -> Parsed:
    """Refuse a file that holds no samples (after the length policies) in one line naming ``key`` and
    the file, saying ``why`` it needs some -- before a sampler meets an empty list of lengths."""
    if len(parsed.data) == 0:
        raise UserError(f"{key}: {path} holds no samples; {why}")
    return parsed


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sample indices: ``max(1, round(fraction * n))`` random samples held out for val.

    Fixed by ``seed``; both index arrays are sorted, so each split keeps the file's order.
    """
    n_val = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _synthetic_encoding(cfg: DataConfig) -> Encoding:
    """The synthetic task's fixed encoding: its classes come from the config, present or not."""
    classes = None if cfg.task == "regress" else list(range(synthetic.num_outputs(cfg)))
    return Encoding(None, classes, cfg.features)


def read_training(cfg: DataConfig, tokenizer: str | SubwordTokenizer | None = None) -> tuple[Parsed, list[str]]:
    """The training file (or the synthetic training set), read once: k-fold jobs split it k times.
    ``tokenizer``: as for :func:`read_raw`."""
    if cfg.format == "synthetic":
        return Parsed(make_synthetic(cfg, "train"), None, _synthetic_encoding(cfg).classes), []
    return read_file(cfg, cfg.train_path, tokenizer=tokenizer)


def _source(cfg: DataConfig) -> str:
    return cfg.train_path or "the synthetic training set"


def _strata(cfg: DataConfig, parsed: Parsed) -> np.ndarray | None:
    """The class of each sample when the folds are stratified (labelled classify data), else None."""
    return parsed.data.targets if cfg.task == "classify" and parsed.labelled else None


def _check_fold_count(cfg: DataConfig, n: int) -> None:
    if n < cfg.folds:
        what = f"use at most data.folds={n}, or add samples" if n >= 2 else "add samples"
        raise UserError(f"data.folds: {cfg.folds} folds need at least {cfg.folds} samples; {_source(cfg)} has {n}: "
                        f"{what}")


def _split(cfg: DataConfig, parsed: Parsed, fold: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: fold ``fold`` (stratified for classify), or the ``val_fraction`` hold-out."""
    n, source = len(parsed.data), _source(cfg)
    if fold is not None:
        _check_fold_count(cfg, n)
        return fold_indices(n, cfg.folds, fold, cfg.seed, _strata(cfg, parsed))
    if n < 2:
        raise UserError(f"{source}: {n} sample cannot be split into train and validation "
                        "(data.val_fraction); add samples or set data.val_path")
    return holdout_indices(n, cfg.val_fraction, cfg.seed)


def check_folds(cfg: DataConfig, parsed: Parsed, world_size: int = 1) -> None:
    """Raise a :class:`UserError` if any fold of ``data.folds`` cannot train on its split of ``parsed``.

    Run before the first fold trains (and before any directory exists), so a split that fails at
    fold 3 is not found after folds 1 and 2 have trained. Index arithmetic and label counts only,
    no encoding: the file has at least as many samples as there are folds; every fold's training
    part has a sample per rank and holds every class (tag) its validation part has, the classes
    derived as :func:`build_encoding` derives them from the training part; the file holds two
    classes at least.
    """
    data, k, source = parsed.data, cfg.folds, _source(cfg)
    n = len(data)
    _check_fold_count(cfg, n)
    assigned = fold_assignment(n, k, cfg.seed, _strata(cfg, parsed))
    sizes = np.bincount(assigned, minlength=k)
    largest = int(np.argmax(sizes))  # the fold with the smallest training part
    if n - int(sizes[largest]) < world_size:
        raise UserError(f"{source}: data.folds={k}: fold {largest + 1}'s training part has {n - int(sizes[largest])} "
                        f"samples, too few to feed {world_size} ranks (one per rank at least); add samples or run "
                        "fewer ranks")
    if cfg.format == "synthetic" or cfg.task == "regress" or not parsed.labelled:
        return  # synthetic classes come from the config, present or not
    _check_fold_classes(cfg, parsed, assigned)


def _places(data: SequenceData, samples: np.ndarray, limit: int = 3) -> str:
    """``line 12`` / ``lines 4, 9`` / ``samples 3, 7, 8, ... (5 in all)`` for messages."""
    numbers = data.lines if data.lines is not None else data.positions
    word = data.unit if data.lines is not None else "sample"
    shown = ", ".join(str(int(numbers[i])) for i in samples[:limit])
    more = f", ... ({len(samples)} in all)" if len(samples) > limit else ""
    return f"{word}{'s' if len(samples) > 1 else ''} {shown}{more}"


def _check_fold_classes(cfg: DataConfig, parsed: Parsed, assigned: np.ndarray) -> None:
    """The label part of :func:`check_folds`: per fold, the labels of its validation part that the
    classes of its training part lack (the first, by fold then label, is reported)."""
    data, symbols, k, source = parsed.data, parsed.label_symbols, cfg.folds, _source(cfg)
    kind = "tag" if cfg.task == "tag" else "label"
    n, width = len(data), len(symbols)
    if data.per_step:  # (sample, tag) pairs, each once: a tag counts the samples holding it
        steps = span_steps(data.starts, data.lengths)
        pairs = np.unique(np.repeat(np.arange(n, dtype=np.int64), data.lengths) * width + data.targets[steps])
        sample_of, label_of = pairs // width, pairs % width
    else:
        sample_of, label_of = np.arange(n, dtype=np.int64), np.asarray(data.targets, dtype=np.int64)
    # counts[f, l]: samples with label l in fold f's validation part; the training part has the rest.
    counts = np.bincount(assigned[sample_of] * width + label_of, minlength=k * width).reshape(k, width)
    total = counts.sum(axis=0)
    present = np.flatnonzero(total)
    if len(present) == 1 and not _is_index(symbols[present[0]]):
        raise UserError(f"{source}: data.folds={k}: the file holds only the {kind} {symbols[present[0]]!r} "
                        "(at least two classes are needed)")
    for fold in range(k):
        train = counts[fold] < total  # labels the training part holds
        held = [symbols[j] for j in np.flatnonzero(train)]
        if held and all(_is_index(s) for s in held):  # integer labels are class indices: 0..largest
            top = max(2, int(max(held)) + 1)
            known = np.array([_is_index(s) and 0 <= s < top for s in symbols], dtype=bool)
        else:
            known = train
        lacking = np.flatnonzero((counts[fold] > 0) & ~train & ~known)
        if not len(lacking):
            continue
        label = int(lacking[0])
        where = np.unique(sample_of[(label_of == label) & (assigned[sample_of] == fold)])
        count = int(total[label])
        which = "the only sample" if count == 1 else f"all {count} samples"
        what = "class" if kind == "label" else "tag"
        advice = (f"drop the rare {kind} or merge it into another: k-fold needs at least 2 samples of every {what}"
                  if count == 1 else f"use fewer folds or another data.seed, or drop or merge the rare {kind}")
        raise UserError(f"{source}: data.folds={k}: fold {fold + 1} cannot train: {which} with {kind} "
                        f"{symbols[label]!r} ({_places(data, where)}) {'is' if count == 1 else 'are'} in fold "
                        f"{fold + 1}'s validation part, so its training part (the other folds) lacks that {what}; "
                        f"{advice}")


def load_splits(cfg: DataConfig, fold: int | None = None,
                training: tuple[Parsed, list[str]] | None = None) -> Splits:
    """The train and val data of the config (of fold ``fold`` when ``data.folds`` is set).

    ``training``: the result of :func:`read_training`, when the caller already read it.
    """
    if cfg.format == "synthetic" and fold is None:
        return Splits(make_synthetic(cfg, "train"), make_synthetic(cfg, "val"), _synthetic_encoding(cfg))
    parsed, notes = training or read_training(cfg)
    notes = list(notes)
    if cfg.val_path and fold is None:
        train_idx, val_idx = np.arange(len(parsed.data)), None
    else:
        train_idx, val_idx = _split(cfg, parsed, fold)
    if cfg.format == "synthetic":
        encoding = _synthetic_encoding(cfg)
    else:
        encoding = build_encoding(parsed, train_idx, cfg.task, cfg.min_freq)
        if is_subword(cfg.tokenizer) and encoding.vocab is not None:  # travels with the checkpoint
            subword = text_tokenizer(cfg.tokenizer)
            encoding.tokenizer = subword.state_dict()
            notes.append(f"data.tokenizer: {cfg.tokenizer}: {subword.describe()}, stored in the checkpoints")
    # The whole file is encoded once; train and val are views of it. Held-out labels must be classes
    # (train_folds checks every fold up front, with check_folds; this is the hold-out's check).
    if fold is not None:
        lacking, advice = f"fold {fold + 1}'s training part (the other folds)", ""
    else:
        lacking = f"the training part (all but the data.val_fraction={cfg.val_fraction} hold-out)"
        advice = f"drop or merge the rare {'tag' if cfg.task == 'tag' else 'label'}, change data.seed, or give " \
                 "data.val_path"
    whole = encode(parsed, encoding, cfg.task, check=val_idx, lacking=lacking, advice=advice)
    if val_idx is not None:
        return Splits(whole.select(train_idx), whole.select(val_idx), encoding, notes)
    val_parsed, val_notes = read_file(cfg, cfg.val_path, classes=encoding.classes)
    require_samples(val_parsed, "data.val_path", cfg.val_path, "validation needs at least one (or leave "
                    "data.val_path empty to hold out data.val_fraction of data.train_path)")
    val = encode(val_parsed, encoding, cfg.task, check=np.arange(len(val_parsed.data)))
    return Splits(whole, val, encoding, notes + val_notes)


def training_lengths(cfg: DataConfig, fold: int | None = None) -> np.ndarray:
    """The lengths ``[n]`` int64 of the training split :func:`load_splits` gives (of fold ``fold``), in
    its order, without encoding anything: the synthetic task's lengths are drawn without its steps
    (not for a fold: its split stratifies by the labels, drawn after the steps); a file is parsed and
    its length policies applied (a parser is the only way to its lengths), but no vocabulary or
    classes are built.

    Raises:
        UserError: as :func:`load_splits` does for the file, its length policies or the split (the
            label checks apart: they need the encoding).
    """
    if cfg.format == "synthetic" and fold is None:
        return synthetic.split_lengths(cfg, "train")
    parsed, _ = read_training(cfg)
    if cfg.val_path and fold is None:
        return parsed.data.lengths
    return parsed.data.lengths[_split(cfg, parsed, fold)[0]]


def _trained_tokenizer(cfg: DataConfig, encoding: Encoding) -> str | SubwordTokenizer | None:
    """The tokenizer a trained model's text is cut with (None where the format reads no text)."""
    return trained_tokenizer(cfg.tokenizer, encoding.tokenizer) if cfg.format in TEXT_FORMATS else None


def load_eval_data(cfg: DataConfig, encoding: Encoding, fold: int | None = None) -> tuple[SequenceData, list[str]]:
    """The validation data of a trained model's config, encoded with its ``encoding`` (never rebuilt).

    ``data.val_path`` if set; otherwise the split training used: synthetic val, the fold's part, or
    the ``val_fraction`` hold-out of ``data.train_path``. Text is cut by the encoding's stored tokenizer
    (:func:`trained_tokenizer`), never by a file ``data.tokenizer`` names now.
    """
    tokenizer = _trained_tokenizer(cfg, encoding)
    if cfg.val_path:
        parsed, notes = read_file(cfg, cfg.val_path, tokenizer=tokenizer, classes=encoding.classes)
        require_samples(parsed, "data.val_path", cfg.val_path, "nothing to evaluate")
        return encode(parsed, encoding, cfg.task, check=np.arange(len(parsed.data))), notes
    if cfg.format == "synthetic" and fold is None:
        return make_synthetic(cfg, "val"), []
    parsed, notes = read_training(cfg, tokenizer)
    val_idx = _split(cfg, parsed, fold)[1]
    return encode(parsed, encoding, cfg.task, check=val_idx).select(val_idx), notes


def load_inputs(cfg: DataConfig, encoding: Encoding, path: str) -> tuple[SequenceData, int, list[str]]:
    """``predict`` input: ``path`` in ``data.format``, labels optional and unread; returns the encoded
    data, the number of samples in the file (dropped empty ones included) and notes.

    The data's ``input_lengths`` are the samples' lengths in the file, so that ``predict`` can say
    which steps of a sample ``data.max_length`` cut (its positions index the file's samples). Text is
    cut by the encoding's stored tokenizer, as in :func:`load_eval_data`."""
    raw = read_raw(cfg, path, labelled=False, tokenizer=_trained_tokenizer(cfg, encoding), classes=encoding.classes)
    parsed, notes = apply_length_policies(raw, cfg)
    data = encode(parsed, encoding, cfg.task)
    data.input_lengths = raw.data.lengths[data.positions]
    return data, len(raw.data), notes


def describe(splits: Splits, task: str) -> list[str]:
    """Log lines about the data: sizes, vocabulary and classes, and the majority-class baseline."""
    train, val, enc = splits.train, splits.val, splits.encoding
    parts = [f"data: {len(train)} training samples ({train.total_steps:,} steps) from {train.source}, "
             f"{len(val)} validation samples from {val.source}"]
    if enc.vocab is not None:
        parts.append(f"vocabulary of {enc.vocab_size} tokens (with <pad> and <unk>)")
    if enc.classes is not None:
        parts.append(f"{len(enc.classes)} classes")
    lines = ["; ".join(parts), *splits.notes]
    if task != "regress" and len(val):
        # The accuracy of always answering the most frequent training class: the floor a model must beat.
        train_targets = train.targets[span_steps(train.starts, train.lengths)] if train.per_step else train.targets
        val_targets = val.targets[span_steps(val.starts, val.lengths)] if val.per_step else val.targets
        majority = int(np.argmax(np.bincount(train_targets[train_targets >= 0], minlength=len(enc.classes))))
        lines.append(f"majority-class baseline: always {enc.classes[majority]!r} scores val accuracy "
                     f"{float(np.mean(val_targets == majority)):.4f}")
    return lines
