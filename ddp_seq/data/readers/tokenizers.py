"""Subword tokenizers for text (``data.tokenizer``): a Hugging Face ``tokenizers`` file or a sentencepiece model.

Both are read from a local path -- nothing is ever downloaded -- and travel with the checkpoint: the
:class:`~ddp_seq.data.readers.encoding.Encoding` stores :meth:`SubwordTokenizer.state_dict` (the tokenizer's
own serialization: ``Tokenizer.to_str()`` text, or the sentencepiece model's protobuf bytes, both of
which ``torch.load(weights_only=True)`` reads back), so ``evaluate`` and ``predict`` cut new text
exactly as training did even when the file is gone or has changed.

The tokens a subword tokenizer yields are its own integer ids. They are the file-local symbols of the
readers, so the model's vocabulary is built from them as from characters or words: ``<pad>``,
``<unk>``, then the ids seen in the training split at least ``data.min_freq`` times, most frequent
first. No special tokens are added (``add_special_tokens=False``; sentencepiece's BOS/EOS are off by
default), and a ``tokenizer.json``'s own padding and truncation settings are switched off:
``data.max_length`` and ``data.truncate`` decide lengths, as for every other input.

The libraries are optional (``pip install 'ddp-seq[tokenizers]'``); one is imported only when a file
of its kind is used.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from ddp_seq.config_fields import TOKENIZER_FILE_ENDINGS
from ddp_seq.errors import UserError, first_line
from ddp_seq.fileio import read_bytes

KEY = "data.tokenizer"
INSTALL = "pip install 'ddp-seq[tokenizers]'"
#: kind -> the file name ending that selects it (``config_fields.check_tokenizer`` accepts these).
KINDS = {"tokenizers": ".json", "sentencepiece": ".model"}
_CHUNK = 8192  # texts per library call: bounds the per-text objects alive at once (HF Encoding objects)


def is_subword(name: str) -> bool:
    """Whether a ``data.tokenizer`` value names a tokenizer file (rather than ``char`` or ``whitespace``)."""
    return name.endswith(TOKENIZER_FILE_ENDINGS)


def _import(kind: str, where: str) -> Any:
    """The library of ``kind``; a missing one is a one-line :class:`UserError` naming the pip extra."""
    package = "tokenizers" if kind == "tokenizers" else "sentencepiece"
    try:
        if kind == "tokenizers":
            import tokenizers as module
        else:
            import sentencepiece as module
    except ImportError:
        raise UserError(f"{where}: reading a {kind} file needs the {package} package: {INSTALL}") from None
    return module


def _not_tokenizers_json(data: str) -> str | None:
    """Why valid JSON is not a ``tokenizers`` file (it lacks ``model``), or None when it is not JSON at all."""
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    if isinstance(obj, dict) and "model" in obj:
        return None
    return ("a JSON file, but not a Hugging Face tokenizers file (no \"model\" key; give the tokenizer.json that "
            "tokenizers' Tokenizer.save writes, not tokenizer_config.json or vocab.json)")


class SubwordTokenizer:
    """A loaded subword tokenizer: ``kind`` ``"tokenizers"`` (``data`` is ``Tokenizer.to_str()`` text) or
    ``"sentencepiece"`` (``data`` is the serialized model, bytes).

    ``where`` names the tokenizer in error messages (``data.tokenizer: path`` or the checkpoint).
    Construction raises a one-line :class:`UserError` for content that does not load as ``kind``.
    """

    def __init__(self, kind: str, data: str | bytes, where: str = "the stored tokenizer") -> None:
        if kind not in KINDS:
            raise UserError(f"{where}: unknown tokenizer kind {kind!r} (expected {' or '.join(KINDS)})")
        if not data:
            raise UserError(f"{where}: the file is empty, not a {kind} file")
        self.kind, self.where = kind, where
        library = _import(kind, where)
        if kind == "tokenizers":
            try:
                tokenizer = library.Tokenizer.from_str(data)
            except Exception as e:  # noqa: BLE001 -- the library raises a bare Exception for any bad file
                why = _not_tokenizers_json(data) or f"not a Hugging Face tokenizers file ({first_line(e)})"
                raise UserError(f"{where}: {why}") from None
            # data.max_length / data.truncate decide lengths; the file's own padding would add steps.
            tokenizer.no_padding()
            tokenizer.no_truncation()
            self._tokenizer = tokenizer
            self.data: str | bytes = tokenizer.to_str()  # canonical: a re-indented file is the same tokenizer
            self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        else:
            try:
                processor = library.SentencePieceProcessor(model_proto=bytes(data))
            except Exception as e:  # noqa: BLE001 -- RuntimeError or OSError, by version
                raise UserError(f"{where}: not a sentencepiece model ({first_line(e)})") from None
            self._tokenizer = processor
            self.data = processor.serialized_model_proto()
            self.vocab_size = processor.get_piece_size()
            if not self.vocab_size:
                raise UserError(f"{where}: not a sentencepiece model (it holds no pieces)")

    @classmethod
    def from_file(cls, path: str | Path) -> SubwordTokenizer:
        """Load ``path``: ``*.json`` as a Hugging Face ``tokenizers`` file, ``*.model`` as sentencepiece.

        Raises a one-line :class:`UserError` naming ``data.tokenizer`` and the file when it is missing,
        unreadable or does not load (with the library's own first line), or when the library is not
        installed.
        """
        where = f"{KEY}: {path}"
        kind = next((k for k, ending in KINDS.items() if str(path).endswith(ending)), None)
        if kind is None:
            raise UserError(f"{where}: expected a .json (Hugging Face tokenizers) or .model (sentencepiece) file")
        raw = read_bytes(path, where)
        if kind == "tokenizers":
            try:
                return cls(kind, raw.decode("utf-8"), where)
            except UnicodeDecodeError:
                raise UserError(f"{where}: not a Hugging Face tokenizers file (not UTF-8 JSON text)") from None
        return cls(kind, raw, where)

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, lengths)``: the token ids of all ``texts`` concatenated (int64) and the number of
        tokens of each text (int64, ``len(texts)``). No special tokens are added; a text may have none."""
        ids: list[np.ndarray] = []
        lengths = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(texts), _CHUNK):
            chunk = texts[start:start + _CHUNK]
            if self.kind == "tokenizers":
                # encode_batch_fast (tokenizers >= 0.20) skips the character offsets nobody here reads.
                encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
                rows = [e.ids for e in encode(chunk, add_special_tokens=False)]
            else:
                rows = self._tokenizer.encode(chunk, out_type=int)
            counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
            lengths[start:start + len(rows)] = counts
            ids.append(np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(counts.sum())))
        return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)), lengths

    def describe(self) -> str:
        """``tokenizers file (N tokens)`` / ``sentencepiece model (N pieces)``, for log lines."""
        return (f"Hugging Face tokenizers file ({self.vocab_size} tokens)" if self.kind == "tokenizers"
                else f"sentencepiece model ({self.vocab_size} pieces)")

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": str, "data": str | bytes}``: plain values that a ``weights_only`` checkpoint takes;
        equal for the same tokenizer whatever file it was read from."""
        return {"kind": self.kind, "data": self.data}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], where: str = "the stored tokenizer") -> SubwordTokenizer:
        return cls(state["kind"], state["data"], where)


_LOADED: dict[tuple[str, int, int], SubwordTokenizer] = {}


def load_tokenizer(path: str) -> SubwordTokenizer:
    """:meth:`SubwordTokenizer.from_file`, once per process for a file (keyed by its resolved path, size
    and modification time, so a file rewritten in place is read again)."""
    p = Path(path)
    try:
        stat = p.stat()
        key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return SubwordTokenizer.from_file(path)  # raises the one-line error for the missing file
    if key not in _LOADED:
        _LOADED[key] = SubwordTokenizer.from_file(path)
    return _LOADED[key]


def text_tokenizer(name: str) -> str | SubwordTokenizer:
    """What :func:`~ddp_seq.data.readers.text.tokenize_texts` takes for ``data.tokenizer`` = ``name`` in training:
    ``char`` / ``whitespace`` as they are, a file loaded (:func:`load_tokenizer`)."""
    return load_tokenizer(name) if is_subword(name) else name


def trained_tokenizer(name: str, stored: dict[str, Any] | None) -> str | SubwordTokenizer:
    """The tokenizer that cut a trained model's text, for ``evaluate`` and ``predict``.

    ``stored``: the model's ``Encoding.tokenizer`` (from its checkpoint). When set, it is the
    tokenizer and ``name``'s file is not read, so new text is cut as training cut it even if the
    file is gone or changed (``name`` ``char`` or ``whitespace``, an override, is refused). When None
    the model was trained on ``char`` or ``whitespace`` tokens:
    ``name`` is used as before, and a tokenizer file is refused (the vocabulary holds characters or
    words, so every subword id would be ``<unk>``).
    """
    if stored is not None:
        if not is_subword(name):  # an override to char/whitespace would be ignored: say so rather than guess
            raise UserError(f"{KEY}={name}: the model was trained with a subword tokenizer, stored in its checkpoint "
                            "and always used by evaluate and predict; remove the data.tokenizer override")
        return SubwordTokenizer.from_state_dict(stored, "the checkpoint's stored tokenizer")
    if is_subword(name):
        raise UserError(f"{KEY}: {name}: the model was trained without a subword tokenizer (its vocabulary holds "
                        "characters or words); give data.tokenizer as in training (char or whitespace)")
    return name
