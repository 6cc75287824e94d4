"""Command line: ``ddp-seq train|evaluate|predict|export|check-config|config-reference|make-data|bench|parity|report``
and ``plan``.

``train.py`` calls ``train``.

User errors (config, data, checkpoints) are one line on stderr and exit code 2, never a traceback.
Under torchrun every rank hits the same error; only global rank 0 prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from ddp_seq.config import Config, check_mode, load_config
from ddp_seq.config_text import dump_yaml, reference_markdown
from ddp_seq.errors import UserError, first_line

EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 1  # a collective failed: another rank died or hung past the timeout
PEER_ERROR_GRACE_S = 2.0  # how long ranks other than 0 wait before exiting on a user error
COMMANDS = ("train", "check-config", "config-reference", "bench", "parity", "report", "evaluate", "predict",
            "export", "make-data", "plan")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddp-seq", description="Train recurrent models on variable-length "
                                     "sequences with torchrun + DistributedDataParallel.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train a model (run under torchrun for several ranks)"),
                       ("check-config", "load and validate a config, print it resolved, start nothing")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    text = "metrics of a trained checkpoint on its validation data, or on data.val_path=FILE"
    ev = sub.add_parser("evaluate", help=text, description=text + " (one process or under torchrun)")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint written by training (e.g. best.pt)")
    ev.add_argument("--output", default=None, help="also write the metrics as JSON to this file")
    trust = ("import the model.target / data.target the checkpoint's config names (code runs from it); "
             "without this, name the key on the command line yourself")
    ev.add_argument("--trust-target", action="store_true", help=trust)
    ev.add_argument("overrides", nargs="*", metavar="section.key=value", help="over the checkpoint's config")
    text = "predictions of a trained checkpoint for a file, one JSON line per sample in input order"
    pr = sub.add_parser("predict", help=text, description=text + " (one process or under torchrun)")
    pr.add_argument("--checkpoint", required=True, help="a checkpoint written by training (e.g. best.pt)")
    pr.add_argument("--input", required=True, help="a file in the checkpoint's data.format (labels optional)")
    pr.add_argument("--output", required=True, help="where to write the predictions (JSON lines)")
    pr.add_argument("--trust-target", action="store_true", help=trust)
    pr.add_argument("overrides", nargs="*", metavar="section.key=value", help="over the checkpoint's config")
    text = "write a trained checkpoint as an ONNX model (dynamic batch and time; checked with onnxruntime)"
    ex = sub.add_parser("export", help=text, description=text)
    ex.add_argument("--checkpoint", required=True, help="a checkpoint written by training (e.g. best.pt)")
    ex.add_argument("--format", default="onnx", help="onnx (the only format)")
    ex.add_argument("--output", required=True, help="the model file to write (e.g. model.onnx)")
    ex.add_argument("--trust-target", action="store_true", help=trust)
    ex.add_argument("overrides", nargs="*", metavar="section.key=value", help="over the checkpoint's config")
    # Dispatched by main() before this parser runs (each parses its own arguments); listed for --help.
    for name, text in (("report", "the end-of-run tables of a run directory again, from its metrics.jsonl"),
                       ("make-data", "write the sample files (samples) or the stdlib corpus (stdlib)"),
                       ("bench", "the benchmark suite: reference vs ddp_seq vs Lightning, side by side"),
                       ("parity", "single vs dp vs ddp on a fixed batch: same loss and gradients (under torchrun)"),
                       ("plan", "what the batching does per epoch on --world-size N ranks, before booking them")):
        sub.add_parser(name, help=text, add_help=False).add_argument("args", nargs=argparse.REMAINDER)
    ref = sub.add_parser("config-reference", help="print every config key as a Markdown table")
    ref.add_argument("--update", metavar="FILE", help="rewrite the table between the config-reference "
                     "markers of this Markdown file instead of printing it")
    return parser


def train(cfg: Config) -> dict:
    """Run one training job in this process (one rank of it under torchrun); return the summary
    (for a k-fold job: the folds' summaries and their mean and std)."""
    from ddp_seq.builders import build_parts
    from ddp_seq.cli.rundir import prepare_run
    from ddp_seq.data.readers.sources import load_splits
    from ddp_seq.parallel.process_group import distributed
    from ddp_seq.train.run_dir import release_run_dir

    with distributed(cfg.distributed) as info, contextlib.ExitStack() as held:
        held.callback(release_run_dir)  # the run directory this job's rank 0 locked, on every way out
        if cfg.data.folds:
            from ddp_seq.cli.folds import target_folds, train_folds

            if cfg.data.target:
                return target_folds(cfg, info, lambda fold_cfg, run_dir: _start_logger(fold_cfg, info, run_dir, []))
            return train_folds(cfg, info, _train_run)
        # Data and model first: a bad file or target is reported before a run directory is created for it.
        parts = build_parts(cfg, info, None if cfg.data.target else load_splits(cfg.data))
        run_dir, resume_from, notes = prepare_run(cfg, info)
        return _train_run(cfg, info, run_dir, resume_from, notes, parts=parts)


def _train_run(cfg: Config, info, run_dir: Path, resume_from: Path | None, notes: list[str], splits=None,
               fold: int | None = None, parts=None) -> dict:
    """Train one run (one fold of a k-fold job) in ``run_dir`` with its own logger and tracker."""
    from ddp_seq.builders import build_trainer

    logger = _start_logger(cfg, info, run_dir, notes)
    exit_code = 1
    try:
        summary = build_trainer(cfg, info, logger, run_dir, resume_from, splits, fold, parts).fit()
        exit_code = 0
        return summary
    finally:
        logger.close(exit_code)


def _start_logger(cfg: Config, info, run_dir: Path, notes: list[str]):
    """One run's logger (rank 0's files and trackers, silence elsewhere), which has logged where the
    run goes, its resolved config and ``notes``."""
    from ddp_seq.loggers.runlog import make_logger

    run_dir.mkdir(parents=True, exist_ok=True)
    logger = make_logger(info.is_main, run_dir, cfg.logging.progress, _start_tracking(cfg, run_dir, info))
    logger.info(f"run directory: {run_dir}\n--- resolved config ---\n{dump_yaml(cfg, used_only=True).rstrip()}\n---")
    for note in notes:
        logger.info(note)
    return logger


def _start_tracking(cfg: Config, run_dir: Path, info):
    """This rank's trackers: TensorBoard on rank 0, the wandb run (or None). A failure on any rank
    (online without a server, the tensorboard package missing on rank 0) is every rank's error: the
    others would otherwise wait for it at the first collective."""
    from ddp_seq.loggers.tracking import start_tracking
    from ddp_seq.parallel.process_group import first_error

    tracker, error = None, ""
    try:
        tracker = start_tracking(cfg, run_dir, info.rank, info.is_main)
    except UserError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 -- reported on every rank below rather than leaving peers waiting
        error = f"wandb: could not start a run ({type(e).__name__}: {first_line(e)})"
    error = first_error(error, info)
    if error:
        if tracker is not None:
            tracker.finish(1)
        raise UserError(error)
    return tracker


START_MARK, END_MARK = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def update_reference(readme: Path) -> None:
    """Replace the text between the config-reference markers of ``readme`` with the current table."""
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{readme}: cannot read ({e.strerror or e})") from None
    if text.count(START_MARK) != 1 or text.count(END_MARK) != 1 or text.index(START_MARK) > text.index(END_MARK):
        raise UserError(f"{readme}: needs exactly one {START_MARK} followed by one {END_MARK}; nothing written")
    head, _, rest = text.partition(START_MARK)
    _, _, tail = rest.partition(END_MARK)
    readme.write_text(f"{head}{START_MARK}\n{reference_markdown()}\n{END_MARK}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ddp-seq`` console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from ddp_seq.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["report"]:
        from ddp_seq.cli.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["parity"]:
        from ddp_seq.cli.parity import main as parity_main

        return parity_main(argv[1:])
    if argv[:1] == ["plan"]:
        from ddp_seq.cli.plan import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["make-data"]:
        from ddp_seq.data.readers.corpus import main as make_data_main

        return make_data_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "config-reference":
            if args.update:
                update_reference(Path(args.update))
            else:
                print(reference_markdown())
            return 0
        if args.command in ("evaluate", "predict"):
            from ddp_seq.cli import inference

            if args.command == "evaluate":
                return _run_and_exit(lambda: inference.evaluate_command(args.checkpoint, args.overrides, args.output,
                                                                                 args.trust_target))
            return _run_and_exit(lambda: inference.predict_command(args.checkpoint, args.input, args.output,
                                                                   args.overrides, args.trust_target))
        if args.command == "export":
            from ddp_seq.cli.export import export_command

            export_command(args.checkpoint, args.output, args.format, args.overrides, args.trust_target)
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "check-config":
            print(dump_yaml(cfg, used_only=True), end="")
            return 0
        # dp and single are one process: refused under torchrun before torch is even imported.
        check_mode(cfg.training.mode, _env_world_size())
        return _run_and_exit(lambda: train(cfg), cfg.distributed.timeout_s)
    except UserError as e:
        # Every rank meets the same error; only global rank 0 reports it. RANK is read here
        # directly because importing ddp_seq.parallel.process_group would load torch, and config errors must be fast.
        if os.environ.get("RANK", "0") in ("", "0"):
            print(f"ddp-seq: error: {e}", file=sys.stderr, flush=True)
        elif _env_world_size() > 1:
            # torchrun stops every worker as soon as one exits != 0: a moment's grace lets rank 0,
            # which meets the same error (maybe a little later), print it before being stopped.
            time.sleep(PEER_ERROR_GRACE_S)
        if _env_world_size() > 1:  # only torchrun workers need it; it imports torch
            from ddp_seq.parallel.process_group import exit_worker

            exit_worker(EXIT_USER_ERROR)
        return EXIT_USER_ERROR


def _lost_peers(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank died or hung."""
    text = str(error)
    return type(error).__name__ in ("DistBackendError", "DistNetworkError") or any(
        marker in text for marker in ("Timed out waiting", "Connection reset by peer", "Connection closed by peer",
                                      "NCCL communicator was aborted", "Broken pipe"))


def _run_and_exit(job, timeout_s: int | None = None) -> int:
    """Run ``job()`` (training, evaluation, prediction); map preemption and lost peers to their exit
    codes (each with one line, no traceback). ``timeout_s``: the collective timeout, for the message."""
    from ddp_seq.parallel.process_group import exit_worker
    from ddp_seq.train.divergence import EXIT_DIVERGED, Diverged
    from ddp_seq.train.resume import Preempted, exit_code

    try:
        job()
    except Preempted as stopped:  # SIGTERM (143) or Ctrl-C's SIGINT (130), after the checkpoint
        code = exit_code(stopped.signum)
        exit_worker(code)
        return code
    except Diverged:  # every rank at the same step; rank 0 has logged the line
        exit_worker(EXIT_DIVERGED)
        return EXIT_DIVERGED
    except RuntimeError as e:
        if not _lost_peers(e):
            raise
        # Every surviving rank says it: the one that could print may be the one that died.
        rank = os.environ.get("RANK", "0")
        limit = f"distributed.timeout_s={timeout_s}" if timeout_s else "distributed.timeout_s"
        print(f"ddp-seq: error: rank {rank} lost contact with the other ranks ({first_line(e, 300)}); one of them died "
              f"or hung for longer than {limit}", file=sys.stderr, flush=True)
        exit_worker(EXIT_PEER_LOST)
        return EXIT_PEER_LOST
    exit_worker(0)
    return 0


def _env_world_size() -> int:
    """torchrun's WORLD_SIZE (1 without torchrun; a malformed value counts as 1 here, dist.setup names it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def train_main() -> int:
    """``train.py`` / ``python -m ddp_seq``: ``train`` is implied."""
    argv = sys.argv[1:]
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]
    return main(argv)
