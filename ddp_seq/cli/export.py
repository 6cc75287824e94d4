"""``ddp-seq export``: a trained checkpoint as an ONNX model that runs without ddp_seq or torch.

The graph has two inputs and one output, with dynamic ``batch`` and ``time`` axes:

* ``inputs``: ``[batch, time]`` int64 token ids (0 pads, 1 is the unknown token) or
  ``[batch, time, features]`` float32 features, padded after each sequence's end;
* ``lengths``: ``[batch]`` int64 valid lengths, each in ``[1, time]``;
* ``outputs``: classify ``[batch, classes]`` logits, regress ``[batch]``, tag ``[batch, time, classes]``
  logits (steps at or past a sequence's length are meaningless: mask them out).

Which path is exported: the recurrent layers' ``padded`` path (:mod:`ddp_seq.nn.rnn`), whatever
``model.execution`` the checkpoint was trained with. It is the fused LSTM/GRU on the padded tensor,
each sequence reversed within its length for a backward direction -- plain tensor operations that
become ONNX ``LSTM``/``GRU`` nodes over a dynamic time axis -- whereas ``pack_padded_sequence`` builds
a ``PackedSequence`` whose shape depends on the lengths' values, which the exporter cannot trace.
The two paths compute the same outputs, and every export is checked against the model as trained.

The encoding travels in the model's ``metadata_props`` (JSON text): the vocabulary (token id ->
token), the classes (class id -> label) and, for a model trained on text, the tokenizer that cut it
(its name; a ``tokenizer.json`` text or a sentencepiece model in base64), so a user without ddp_seq can
turn text into ids and logits into labels (:func:`tokenizer_metadata`).

Before anything is written the ONNX model runs in ``onnxruntime`` on a random batch of another size
and another time length than the export's example, lengths from 1 to the longest, and must match the
PyTorch model (valid steps only for tag) within ``ATOL + RTOL * |expected|``; otherwise nothing is
written. The file is written to a temporary name and renamed, so ``--output`` is whole or untouched.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddp_seq.config_fields import TEXT_FORMATS
from ddp_seq.errors import UserError, first_line
from ddp_seq.train.checkpoint import trained_at

FORMATS = ("onnx",)
#: The ONNX opset the model is written with (torch 2.13's default, pinned so a torch upgrade does not change it).
OPSET = 20
INSTALL = "pip install 'ddp-seq[onnx]'"
INPUT_NAMES, OUTPUT_NAME = ("inputs", "lengths"), "outputs"
#: Agreement required between onnxruntime and PyTorch (float32): |onnx - torch| <= ATOL + RTOL * |torch|.
ATOL, RTOL = 1e-5, 1e-4
#: The example batch the graph is traced with; the check uses other sizes (see check_onnx).
EXAMPLE_BATCH, EXAMPLE_TIME = 3, 7


@dataclass
class ExportResult:
    """What :func:`export_command` wrote: the file, the opset and the check's largest difference."""

    path: str
    opset: int
    max_abs_diff: float


def require_onnx() -> None:
    """Raise a one-line :class:`UserError` naming the pip extra when onnx, onnxscript or onnxruntime is missing."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format onnx needs the {', '.join(missing)} package{'s' if len(missing) > 1 else ''}: "
                        f"{INSTALL}")


def padded_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every :class:`~ddp_seq.nn.rnn.PackedLSTM` / ``PackedGRU`` on
    the ``padded`` path (``model`` itself is left as it is)."""
    from ddp_seq.nn.rnn import _PackedMixin
    from ddp_seq.nn.seq_model import SeqModel

    exported = copy.deepcopy(model).eval()
    for module in exported.modules():
        if isinstance(module, (_PackedMixin, SeqModel)):
            module.execution = "padded"
    return exported


def example_batch(vocab_size: int, num_inputs: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(inputs, lengths)`` of random sequences of ``lengths``, zero-padded to the longest.

    Token ids are drawn from ``[1, vocab_size)`` (``vocab_size`` > 0), else float32 features of width
    ``num_inputs``; ``lengths`` is int64 ``[B]``.
    """
    generator = torch.Generator().manual_seed(seed)
    size, time = len(lengths), max(lengths)
    if vocab_size > 0:
        inputs = torch.randint(1, max(vocab_size, 2), (size, time), generator=generator)
    else:
        inputs = torch.randn(size, time, num_inputs, generator=generator)
    for row, length in enumerate(lengths):
        inputs[row, length:] = 0
    return inputs, torch.tensor(lengths, dtype=torch.int64)


@contextlib.contextmanager
def _quiet_export():
    """Silence the exporter's warnings and log lines (torch internals, nothing a user can act on), and
    trace LSTM/GRU with torch's ``while_loop`` decompositions throughout: torch.onnx applies them only
    while capturing the graph, and its later decomposition pass unrolls the RNN over the example's time
    length, which leaves that length fixed in the output's declared shape (onnxruntime then warns at
    every call). The ONNX graph keeps native LSTM/GRU nodes either way."""
    try:
        from torch.export._patches import register_gru_while_loop_decomposition, register_lstm_while_loop_decomposition
        patches: list[Any] = [register_lstm_while_loop_decomposition(), register_gru_while_loop_decomposition()]
    except ImportError:  # a private torch module: without it the check below still guards the result
        patches = []
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        for patch in patches:
            stack.enter_context(patch)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def to_onnx(model: nn.Module, vocab_size: int, num_inputs: int, metadata: dict[str, str] | None = None,
            name: str = "model: the built-in SeqModel") -> bytes:
    """``model`` (on the CPU, forward ``(inputs, lengths)``) as a serialized ONNX model (see the module doc).

    Args:
        model: exported as it is: pass :func:`padded_copy` of a ddp_seq model.
        vocab_size: > 0 for token-id inputs ``[B, T]`` int64, else 0 and float32 ``[B, T, num_inputs]``.
        metadata: written into the model's ``metadata_props``.
        name: the model as the error names it (``model.target: path/to/file.py:Name``).

    Raises:
        UserError: the exporter failed; one line with its innermost error's first line.
    """
    require_onnx()
    inputs, lengths = example_batch(vocab_size, num_inputs, [EXAMPLE_TIME, 4, 2][:EXAMPLE_BATCH])
    # min=2: torch's while_loop decomposition specializes a size of 1 (it guards batch != 1 and time != 1).
    # The ONNX graph itself takes a batch of 1 and a time of 1: check_onnx runs both.
    batch, time = torch.export.Dim("batch", min=2), torch.export.Dim("time", min=2)
    try:
        with _quiet_export(), torch.no_grad():
            program = torch.onnx.export(
                model, (inputs, lengths), None, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                opset_version=OPSET, dynamo=True, verbose=False, external_data=False,
                dynamic_shapes={"inputs": {0: batch, 1: time}, "lengths": {0: batch}})
    except Exception as e:  # noqa: BLE001 -- the exporter raises many types; the user gets one line
        root = e
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        raise UserError(f"{name} does not export to ONNX ({type(root).__name__}: {first_line(root)}); the "
                        "forward must be traceable by torch.export (no pack_padded_sequence, no Python values "
                        "read from tensors)") from None
    for name, value in (metadata or {}).items():
        program.model.metadata_props[name] = value
    import onnx_ir

    return onnx_ir.serde.serialize_model(program.model).SerializeToString()


def check_onnx(onnx_bytes: bytes, model: nn.Module, task: str, vocab_size: int, num_inputs: int) -> float:
    """The largest ``|onnxruntime - PyTorch|`` over two random batches: 5 sequences of lengths 1 to
    ``EXAMPLE_TIME + 4`` (neither the example's batch size nor its time length) and one sequence of 1
    step. For ``tag`` only valid steps are compared. ``model`` is the reference (the checkpoint's own
    execution path).

    Raises:
        UserError: a difference beyond ``ATOL + RTOL * |expected|``, or a shape that differs.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    longest, worst = EXAMPLE_TIME + 4, 0.0
    for lengths in ([longest, 1, 5, 3, longest], [1]):
        inputs, lengths_t = example_batch(vocab_size, num_inputs, lengths, seed=len(lengths))
        with torch.no_grad():
            expected = model.eval()(inputs, lengths_t).float().numpy()
        got = session.run([OUTPUT_NAME], {"inputs": inputs.numpy(), "lengths": lengths_t.numpy()})[0]
        if got.shape != expected.shape:
            raise UserError(f"onnxruntime's output has shape {list(got.shape)}, the model's {list(expected.shape)} "
                            f"(batch {len(lengths)}, time {max(lengths)}); nothing written")
        if task == "tag" and expected.ndim >= 2:
            valid = np.arange(expected.shape[1])[None, :] < lengths_t.numpy()[:, None]
            got, expected = got[valid], expected[valid]
        worst = max(worst, float(np.abs(got - expected).max(initial=0.0)))
        if not np.allclose(got, expected, atol=ATOL, rtol=RTOL):
            raise UserError(f"onnxruntime's outputs differ from the model's by up to {worst:.3g} (allowed "
                            f"{ATOL:g} + {RTOL:g} x |value|) on a batch of lengths {lengths}; nothing written")
    return worst


#: Of the text formats (``config_fields.TEXT_FORMATS``), those that cut text only from a column of strings
#: (a column of token lists is used as it is, and the checkpoint does not record which it was).
TEXT_IF_STRINGS = ("parquet", "hf")


def _symbols_fit(tokenizer: str, vocab: list) -> bool:
    """Whether ``vocab``'s tokens (past ``<pad>``, ``<unk>``) can be what ``tokenizer`` cuts: subword ids are
    integers, ``char`` single characters, ``whitespace`` strings without whitespace. False proves the input
    was token lists (e.g. a Parquet column of integer ids), never cut from text."""
    from ddp_seq.data.readers.tokenizers import is_subword

    tokens = vocab[2:]
    if is_subword(tokenizer):
        return all(isinstance(t, int) for t in tokens)
    if tokenizer == "char":
        return all(isinstance(t, str) and len(t) == 1 for t in tokens)
    return all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in tokens)


def tokenizer_metadata(cfg, encoding) -> dict[str, str]:
    """The tokenizer keys of the metadata, only for a model whose input was text that ``data.tokenizer`` cut.

    None for features, ``data.target`` data, and formats that never read text (jsonl, npz, ts, synthetic:
    their tokens were given as lists), so that no user splits text with a tokenizer the model never saw.
    tsv: ``ddp_seq.tokenizer`` (and ``tokenizer_kind`` / ``tokenizer_data`` for a subword tokenizer).
    parquet / hf: the same plus ``ddp_seq.tokenizer_applies_to = "string input columns"`` -- the reader cut
    a column of strings but took a column of token lists as it was, and the checkpoint does not say which
    it read -- unless the vocabulary's tokens show they were not cut by that tokenizer (:func:`_symbols_fit`).
    """
    fmt, name = cfg.data.format, cfg.data.tokenizer
    if (cfg.data.target or encoding.vocab is None or fmt not in TEXT_FORMATS
            or not _symbols_fit(name, encoding.vocab)):
        return {}
    props = {"ddp_seq.tokenizer": name}
    if fmt in TEXT_IF_STRINGS:
        props["ddp_seq.tokenizer_applies_to"] = "string input columns"
    tokenizer = getattr(encoding, "tokenizer", None)
    if isinstance(tokenizer, dict) and tokenizer.get("data"):
        data = tokenizer["data"]
        props["ddp_seq.tokenizer_kind"] = str(tokenizer.get("kind"))
        props["ddp_seq.tokenizer_data"] = data if isinstance(data, str) else base64.b64encode(bytes(data)).decode()
    return props


def metadata_of(state: dict[str, Any], cfg, encoding) -> dict[str, str]:
    """The ``metadata_props`` of an exported checkpoint: task, inputs, vocabulary, classes, the tokenizer where
    one cut the training text (:func:`tokenizer_metadata`); values are JSON text, or plain strings where
    docs/export.md says so."""
    extra = state.get("extra") or {}
    vocab_size = extra.get("vocab_size", encoding.vocab_size)
    return {
        "ddp_seq.task": cfg.data.task,
        "ddp_seq.inputs": "tokens" if vocab_size > 0 else "features",
        "ddp_seq.num_features": json.dumps(0 if vocab_size > 0 else extra.get("num_inputs", encoding.num_features)),
        "ddp_seq.vocab": json.dumps(encoding.vocab, ensure_ascii=False),
        "ddp_seq.classes": json.dumps(encoding.classes, ensure_ascii=False),
        **tokenizer_metadata(cfg, encoding),
        "ddp_seq.trained": json.dumps(trained_at(state)),
    }


def export_command(checkpoint: str, output: str, fmt: str = "onnx", overrides: list[str] | tuple[str, ...] = (),
                   trust_target: bool = False) -> ExportResult:
    """Write ``checkpoint``'s model to ``output`` as ONNX, checked against PyTorch first (module doc).

    The checkpoint is read as ``evaluate`` and ``predict`` read it (``weights_only``, overrides on top of
    its config, a ``model.target`` imported only with ``--trust-target`` or the key given). Every
    problem is a one-line :class:`UserError`: unknown format, unwritable output, missing packages,
    unreadable checkpoint, a model that does not export, or a mismatch.
    """
    from ddp_seq.builders import restore_model
    from ddp_seq.cli.inference import _check_output, _read
    from ddp_seq.fileio import write_bytes_atomic

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown; the formats are {', '.join(FORMATS)}")
    if Path(output).is_dir():
        raise UserError(f"--output {output}: is a directory; give a file name such as model.onnx")
    _check_output(output)  # as predict: the directory must exist; an existing file is replaced whole
    require_onnx()
    state, cfg, encoding = _read(checkpoint, list(overrides), trust_target)
    model = restore_model(state, cfg, checkpoint, torch.device("cpu")).eval()
    extra = state.get("extra") or {}
    vocab_size = int(extra.get("vocab_size", encoding.vocab_size))
    num_inputs = int(extra.get("num_inputs", encoding.num_features))
    name = f"model.target: {cfg.model.target}" if cfg.model.target else "model: the built-in SeqModel"
    onnx_bytes = to_onnx(padded_copy(model), vocab_size, num_inputs, metadata_of(state, cfg, encoding), name)
    worst = check_onnx(onnx_bytes, model, cfg.data.task, vocab_size, num_inputs)
    write_bytes_atomic(output, onnx_bytes)
    print(f"exported {checkpoint} to {output} (ONNX opset {OPSET}, {len(onnx_bytes):,} bytes); onnxruntime "
          f"matches PyTorch to {worst:.2g} (max abs diff, batches of new sizes)", flush=True)
    return ExportResult(output, OPSET, worst)
