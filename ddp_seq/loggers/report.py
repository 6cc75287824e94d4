"""The end-of-run report: the epoch table, the step-time breakdown, the summary lines and the
per-class table, printed by ``Trainer.fit`` and rebuilt from a run's ``metrics.jsonl`` by
:func:`report` (``ddp-seq report RUN_DIR ...``).

The table and the summary lines are the ones ``Trainer.fit`` prints when the run ends, so a run
whose output scrolled away (or was never seen: a Slurm job) can be read again. A run without a
summary record (preempted, failed or still running) is said to be unfinished, with the epochs it
finished so far. A resumed run appends to the same file, so an epoch may appear more than once:
the last record of each epoch wins (the resumed attempt's, which the checkpointed history agrees with).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ddp_seq.errors import UserError
from ddp_seq.loggers.records import METRICS, PHASES
from ddp_seq.loggers.runlog import format_table

#: Summary keys that start with ``best_`` but are not the monitored metric.
_BEST_OTHER = ("best_epoch", "best_checkpoint")


def table_columns(task: str) -> list[str]:
    """The columns of the end-of-run table for ``task`` (what ``Trainer.fit`` prints)."""
    return columns_with([f"val_{k}" for k in METRICS[task]])


def columns_with(val_columns: list[str]) -> list[str]:
    """The columns of the end-of-run table with these ``val_*`` columns."""
    return ["epoch", "train_loss", *val_columns, "seq_per_s", "tokens_per_s", "padding_efficiency",
            "straggler_ratio", "train_s"]


def _read_config(run_dir: Path) -> dict[str, Any]:
    """``config.yaml`` of the run as a dict, or {} when it is missing or unreadable (then columns are inferred)."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-blank line of ``metrics.jsonl``; a bad line is a UserError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (not a run directory, or training never started)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    records = []
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not a JSON record ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
            raise UserError(f"{where}: not a metrics record (a JSON object with a \"kind\")")
        kind = record["kind"]
        if kind == "epoch" and not (isinstance(record.get("epoch"), int) and not isinstance(record["epoch"], bool)
                                    and record["epoch"] >= 1):
            raise UserError(f"{where}: epoch record without a positive integer \"epoch\"")
        if kind == "summary":
            needed = ("best_epoch", "wall_s", "seq_per_s", "tokens_per_s")
            missing = [k for k in needed if not _is_number(record.get(k))]
            if missing or _monitor_key(record) is None:
                what = ", ".join(missing) if missing else "best_<metric>"
                raise UserError(f"{where}: summary record without a number for {what}")
        records.append((number, record))
    if not records:
        raise UserError(f"{path}: empty (training recorded nothing yet)")
    return records


def _monitor_key(summary: dict[str, Any], monitor: Any = None) -> str | None:
    """``best_<monitor>``: the config's monitor when the summary has it, else its first ``best_*`` number."""
    if isinstance(monitor, str) and _is_number(summary.get(f"best_{monitor}")):
        return f"best_{monitor}"
    keys = [k for k, v in summary.items() if k.startswith("best_") and k not in _BEST_OTHER and _is_number(v)]
    return keys[0] if keys else None


def summary_lines(summary: dict[str, Any], monitor: Any = None) -> list[str]:
    """The lines ``Trainer.fit`` prints after the table, from the run's summary record."""
    key = _monitor_key(summary, monitor)
    wall = summary["wall_s"]
    lines = [f"best {key.removeprefix('best_')} {summary[key]:.4f} at epoch {summary['best_epoch']}; "
             f"{summary['seq_per_s']:,.0f} sequences/s, {summary['tokens_per_s']:,.0f} real tokens/s; "
             f"wall time {wall:.1f}s"]
    count, seconds = summary.get("checkpoints"), summary.get("checkpoint_s")
    if _is_number(count) and count > 0 and _is_number(seconds):
        written = f"{count} checkpoint{'s' if count != 1 else ''} written"
        lines.append(f"{written} in {seconds:.2f}s ({1000 * seconds / count:.0f} ms each, "
                     f"{100 * seconds / max(wall, 1e-9):.2f}% of the wall time)")
    if isinstance(summary.get("advice"), str):
        lines.append(summary["advice"])
    if summary.get("best_checkpoint"):
        lines.append(f"best checkpoint: {summary['best_checkpoint']}")
        lines.append(f"last checkpoint: {summary.get('last_checkpoint')}")
    return lines


def breakdown_table(epochs: list[dict[str, Any]]) -> str | None:
    """Where each epoch's step time went: ms per step per phase (mean over ranks) and the share of
    synchronisation; None when the records carry no breakdown (runs from before it existed)."""
    rows = []
    for r in epochs:
        if not isinstance(r.get("step_ms"), list) or not r["step_ms"]:
            continue
        mean = {k: sum(r[f"step_ms_{k}"]) / len(r[f"step_ms_{k}"]) for k in PHASES if r.get(f"step_ms_{k}")}
        rows.append({"epoch": r["epoch"], "step_ms": sum(r["step_ms"]) / len(r["step_ms"]),
                     **{f"{k}_ms": v for k, v in mean.items()}, "sync_share": r.get("sync_share")})
    if not rows:
        return None
    return ("where a step's time goes (ms per step, mean over ranks; per rank in metrics.jsonl):\n"
            + format_table(rows, ["epoch", "step_ms", *(f"{k}_ms" for k in PHASES), "sync_share"]))


#: ``ddp-seq evaluate`` prints the confusion matrix up to this many classes (its JSON output always has it).
MAX_PRINTED_CONFUSION = 20


def class_report(metrics: dict[str, Any], classes: list | None = None) -> list[str]:
    """Lines for the per-class results of ``metrics`` (what :func:`ddp_seq.train.evaluation.evaluate`
    returns for classify or tag): a table of class, precision, recall, F1 and support, then the
    confusion matrix (rows = true class, columns = predicted) when there are at most
    :data:`MAX_PRINTED_CONFUSION` classes. ``classes``: the names by class id (the encoding's); None
    or a list of another length = the ids. No lines when ``metrics`` has no per-class results
    (regress, a user objective)."""
    if not isinstance(metrics.get("f1"), list):
        return []
    count = len(metrics["f1"])
    names = [str(c) for c in classes] if classes is not None and len(classes) == count else \
        [str(i) for i in range(count)]
    rows = [{"class": name, **{k: metrics[k][i] for k in ("precision", "recall", "f1", "support")}}
            for i, name in enumerate(names)]
    lines = format_table(rows, ["class", "precision", "recall", "f1", "support"]).splitlines()
    if count > MAX_PRINTED_CONFUSION:
        lines.append(f"confusion matrix not printed ({count} classes, more than {MAX_PRINTED_CONFUSION}); "
                     "--output writes it")
    else:
        corner = "true \\ predicted"
        matrix = [{corner: name, **dict(zip(names, row))} for name, row in zip(names, metrics["confusion"])]
        lines += ["confusion matrix (rows = true class, columns = predicted):",
                  *format_table(matrix, [corner, *names]).splitlines()]
    return lines


def _infer_val_columns(epochs: list[dict[str, Any]]) -> list[str]:
    """``val_*`` keys of the epoch records, in the order they first appear (the task's METRICS order)."""
    seen: dict[str, None] = {}
    for row in epochs:
        seen.update((k, None) for k in row if k.startswith("val_"))
    return list(seen)


def report(run_dir: Path) -> str:
    """The end-of-run table and summary lines of ``run_dir``, as ``Trainer.fit`` prints them.

    Raises :class:`UserError` (one line naming the file, and the line for a malformed record) when
    ``run_dir`` or its ``metrics.jsonl`` is missing, empty or malformed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    records = read_records(run_dir / "metrics.jsonl")
    cfg = _read_config(run_dir)
    data, training = cfg.get("data"), cfg.get("training")
    task = data.get("task") if isinstance(data, dict) else None
    monitor = training.get("monitor") if isinstance(training, dict) else None
    planned = training.get("epochs") if isinstance(training, dict) else None

    by_epoch: dict[int, dict[str, Any]] = {}
    last_epoch_at = summary_at = -1
    summary: dict[str, Any] | None = None
    last_train: dict[str, Any] | None = None
    for index, (_, record) in enumerate(records):
        if record["kind"] == "epoch":
            by_epoch[record["epoch"]] = record  # a resumed run's record replaces the dead attempt's
            last_epoch_at = index
        elif record["kind"] == "summary":
            summary, summary_at = record, index
        elif record["kind"] == "train":
            last_train = record
    epochs = [by_epoch[e] for e in sorted(by_epoch)]
    # A summary followed by more epochs belongs to an earlier end, not to where the run stands now.
    finished = summary is not None and summary_at > last_epoch_at

    try:
        columns = table_columns(task) if isinstance(task, str) else None
    except KeyError:
        columns = None
    columns = columns or columns_with(_infer_val_columns(epochs))

    lines: list[str] = []
    if not finished:
        of = f" of {planned}" if _is_number(planned) else ""
        where = ""
        if last_train is not None and _is_number(last_train.get("step")):
            where = f"; last logged step {last_train['step']}"
            if _is_number(last_train.get("epoch")):
                where += f" in epoch {last_train['epoch']}"
        lines.append(f"unfinished run (no summary record: preempted, failed or still running): "
                     f"{len(epochs)}{of} epoch(s) finished{where}")
    if epochs:
        lines.append(format_table(epochs, columns))
        breakdown = breakdown_table(epochs)
        if breakdown:
            lines.append(breakdown)
    if finished:
        lines += summary_lines(summary, monitor)
    return "\n".join(lines)


__all__ = ["breakdown_table", "class_report", "report", "summary_lines", "table_columns"]
