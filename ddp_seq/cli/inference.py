"""``ddp-seq evaluate`` and ``ddp-seq predict``: a trained checkpoint applied to data.

Both run as one process or under torchrun. The checkpoint holds everything they need: the
weights, the config (``section.key=value`` overrides go on top, e.g. ``data.val_path=...``), and
the encoding -- vocabulary and classes -- so a new file is encoded exactly as training encoded
its data, without the training file.

* ``evaluate`` counts every sample exactly once whatever the world size: each rank evaluates its
  shares of length-sorted global batches, and sums and counts are all-reduced
  (:func:`ddp_seq.train.evaluation.evaluate`).
* ``predict`` writes one JSON line per input sample, in input order although batches are sorted
  by length: each rank predicts its shares, rank 0 gathers the rows, orders them by their position
  in the input and writes a temporary file that is renamed over ``--output`` only when complete.
  A row of a sample that ``data.max_length`` cut names the input steps the model saw
  (``"steps": [start, end]``, 0-based, end exclusive) and ``"truncated": "pre"`` or ``"post"``;
  a ``tag`` row has one tag per step seen. Rows of samples not cut have neither field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ddp_seq.builders import (
    encoding_of,
    is_library_checkpoint,
    require_named_data,
    restore_model,
    trusted_config,
)
from ddp_seq.config import Config
from ddp_seq.data.readers.encoding import Encoding
from ddp_seq.data.readers.sequences import SequenceData
from ddp_seq.errors import UserError
from ddp_seq.fileio import json_text
from ddp_seq.train.checkpoint import check_finite, load_checkpoint, trained_at


def _read(checkpoint: str, overrides: list[str], trust_target: bool,
          data_file: str | None = None) -> tuple[dict[str, Any], Config, Encoding]:
    """The checkpoint's state, its config with ``overrides``, and its encoding.

    ``data_file``: the file the command reads (predict's input), for a library Trainer's
    checkpoint named in another ``data.format``: the config wants a training file for any file
    format, and this one stands in for it (nothing is trained, so nothing reads it as such).
    """
    state = load_checkpoint(checkpoint)
    check_finite(state, checkpoint)  # a diverged run's weights: NaN predictions and metrics
    given = {item.partition("=")[0].strip(): item.partition("=")[2] for item in overrides}
    stand_in = data_file or given.get("data.val_path")
    if is_library_checkpoint(state) and "data.format" in given and "data.train_path" not in given and stand_in:
        overrides = [*overrides, f"data.train_path={stand_in}"]
    cfg = trusted_config(state, overrides, checkpoint, trust_target)
    # One model per process, never wrapped: evaluation needs no gradient synchronisation.
    cfg.training.mode = "ddp"
    return state, cfg, encoding_of(state, cfg)


def _trained_at(state: dict[str, Any]) -> str:
    at = trained_at(state)
    return f"epoch {at['epoch']}, step {at['step']}"


def evaluate_command(checkpoint: str, overrides: list[str], output: str | None = None,
                     trust_target: bool = False) -> dict[str, Any]:
    """Metrics of ``checkpoint`` on its validation data (or ``data.val_path``); rank 0 prints them.

    Classify and tag also print a per-class table (precision, recall, F1, support) and the confusion
    matrix (up to ``report.MAX_PRINTED_CONFUSION`` classes); the JSON line of ``output`` has the
    per-class lists, the matrix and ``classes`` (the names by class id) whatever their number.
    """
    from ddp_seq.data.readers.sources import load_eval_data
    from ddp_seq.parallel.process_group import distributed
    from ddp_seq.train.evaluation import evaluate

    state, cfg, encoding = _read(checkpoint, overrides, trust_target)
    require_named_data(state, overrides, checkpoint)
    with distributed(cfg.distributed) as info:
        model = restore_model(state, cfg, checkpoint, info.device).eval()
        if cfg.data.target:  # the user's own data function gives the validation set
            from ddp_seq.builders import build_data

            data, notes = build_data(cfg).val, []
        else:
            data, notes = load_eval_data(cfg.data, encoding, (state.get("extra") or {}).get("fold"))
        metrics = evaluate(model, data, cfg, info)
        source = getattr(data, "source", cfg.data.target)
        result = {"checkpoint": checkpoint, "data": source, "samples": len(data), **metrics}
        if "f1" in metrics and encoding.classes is not None:
            result["classes"] = list(encoding.classes)  # the names of the per-class lists' entries
        if info.is_main:
            from ddp_seq.loggers.report import class_report

            for note in notes:
                print(note)
            print(f"evaluated {checkpoint} ({_trained_at(state)}) on {len(data):,} samples of {source}")
            print("  ".join(f"{name} {value:.4f}" for name, value in metrics.items() if isinstance(value, float)))
            for line in class_report(metrics, encoding.classes):  # none for regress
                print(line)
            print(end="", flush=True)
            if output:
                _write_lines(output, [json_text(result)])
    return result


def _coverage(data: SequenceData, index: int, truncate: str) -> dict[str, Any]:
    """``steps`` and ``truncated`` of sample ``index`` if ``data.max_length`` cut it, else nothing.

    ``pre`` kept the last steps, ``post`` the first (``sources.apply_length_policies``).
    """
    kept = int(data.lengths[index])
    full = kept if data.input_lengths is None else int(data.input_lengths[index])
    if kept == full:
        return {}
    start = full - kept if truncate == "pre" else 0
    return {"steps": [start, start + kept], "truncated": truncate}


@torch.no_grad()
def _predict_rows(model: torch.nn.Module, data: SequenceData, cfg: Config, encoding: Encoding,
                  info) -> list[tuple[int, dict[str, Any]]]:
    """``(input position, output row)`` of this rank's samples (its shares of the sorted global batches)."""
    from ddp_seq.train.amp import autocast, resolve_amp
    from ddp_seq.train.loaders import make_loader, make_sampler

    task, classes, truncate, rows = cfg.data.task, encoding.classes, cfg.data.truncate, []
    amp = resolve_amp(cfg.training.amp, info.device)  # once, not per batch
    for batch in make_loader(data, make_sampler(data, cfg, info, train=False), cfg):
        if not bool(batch.weights[0] > 0):  # a filler sample of an empty share: another rank predicts it
            continue
        batch = batch.to(info.device)
        with autocast(info.device, amp):
            outputs = model(batch.inputs, batch.lengths).float()
        if task == "classify":
            probabilities = torch.softmax(outputs, dim=-1).cpu()
            for row, index in enumerate(batch.indices.tolist()):
                p = probabilities[row].tolist()
                best = max(range(len(p)), key=p.__getitem__)
                rows.append((int(data.positions[index]), {
                    "prediction": classes[best],
                    "probabilities": {str(c): round(q, 6) for c, q in zip(classes, p)},
                    **_coverage(data, index, truncate)}))
        elif task == "regress":
            for value, index in zip(outputs.cpu().tolist(), batch.indices.tolist()):
                rows.append((int(data.positions[index]), {"prediction": value, **_coverage(data, index, truncate)}))
        else:
            tags = outputs.argmax(-1).cpu()
            for row, (index, length) in enumerate(zip(batch.indices.tolist(), batch.lengths.tolist())):
                rows.append((int(data.positions[index]),
                             {"prediction": [classes[t] for t in tags[row, :length].tolist()],
                              **_coverage(data, index, truncate)}))
    return rows


def predict_command(checkpoint: str, input_path: str, output: str, overrides: list[str],
                    trust_target: bool = False) -> int:
    """Write ``checkpoint``'s predictions for ``input_path`` to ``output`` (JSON lines, input order)."""
    import torch.distributed as dist

    from ddp_seq.data.readers.sources import load_inputs
    from ddp_seq.parallel.process_group import distributed

    _check_output(output)
    state, cfg, encoding = _read(checkpoint, overrides, trust_target, data_file=input_path)
    if cfg.data.target:
        raise UserError(f"data.target: predict reads files of data.format; the checkpoint was trained on "
                        f"{cfg.data.target}'s datasets -- apply the model with your own code, or give "
                        "data.target= and data.format=FORMAT to read a file")
    if cfg.data.format == "synthetic":
        trained_on = "your own datasets (the library Trainer)" if is_library_checkpoint(state) else "synthetic data"
        raise UserError(f"data.format: the checkpoint was trained on {trained_on}; give the input's format "
                        "(data.format=jsonl with 'tokens' or 'features' per line, npz, tsv, ts, parquet or hf)")
    with distributed(cfg.distributed) as info:
        model = restore_model(state, cfg, checkpoint, info.device).eval()
        data, count, notes = load_inputs(cfg.data, encoding, input_path)
        # An empty input (or one whose every sample data.empty=drop dropped) predicts nothing: an
        # empty output, as any other number of lines gives that many predictions.
        rows = _predict_rows(model, data, cfg, encoding, info) if len(data) else []
        if info.distributed:  # rank 0 collects every rank's rows
            gathered: list | None = [None] * info.world_size if info.is_main else None
            dist.gather_object(rows, gathered, dst=0)
            rows = [row for part in gathered or [] for row in part]
        if not info.is_main:
            return count
        by_position = dict(rows)
        lines = [json_text({"index": i, **by_position[i]}, ensure_ascii=False) if i in by_position else
                 json_text({"index": i, "prediction": None, "skipped": "empty sequence (data.empty=drop)"})
                 for i in range(count)]
        _write_lines(output, lines)
        for note in notes:
            print(note)
        print(f"predicted {len(by_position):,} of {count:,} samples of {input_path} with {checkpoint} "
              f"({_trained_at(state)}); wrote {output}", flush=True)
    return count


def _check_output(output: str) -> None:
    """Refuse an output path that cannot be written, before any work is done."""
    path = Path(output)
    if path.is_dir():
        raise UserError(f"--output {output}: is a directory; give a file name such as predictions.jsonl")
    if not path.parent.is_dir():
        raise UserError(f"--output {output}: directory {path.parent} does not exist")


def _write_lines(path: str, lines: list[str]) -> None:
    from ddp_seq.fileio import write_bytes_atomic

    write_bytes_atomic(path, "".join(line + "\n" for line in lines).encode("utf-8"))
