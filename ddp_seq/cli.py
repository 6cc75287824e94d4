"""Command line: ``ddp-seq train|check-config|config-reference|bench|parity|report`` (``train.py`` calls ``train``).

User errors (config, data, checkpoints) are one line on stderr and exit code 2, never a traceback.
Under torchrun every rank hits the same error; only global rank 0 prints it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import Config, UserError, check_mode, dump_yaml, first_line, load_config, reference_markdown

EXIT_USER_ERROR = 2
EXIT_PEER_LOST = 1  # a collective failed: another rank died or hung past the timeout
PEER_ERROR_GRACE_S = 2.0  # how long ranks other than 0 wait before exiting on a user error
COMMANDS = ("train", "check-config", "config-reference", "bench", "parity", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddp-seq", description="Train recurrent models on variable-length "
                                     "sequences with torchrun + DistributedDataParallel.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train a model (run under torchrun for several ranks)"),
                       ("check-config", "load and validate a config, print it resolved, start nothing")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    ref = sub.add_parser("config-reference", help="print every config key as a Markdown table")
    ref.add_argument("--update", metavar="README", help="rewrite the table between the config-reference "
                     "markers of this Markdown file instead of printing it")
    return parser


def _holds_run(directory: Path) -> bool:
    """A run directory counts as used once training recorded something: a checkpoint or a metric.

    A run that failed at startup (bad device setting, say) leaves only its config and empty logs,
    and does not block its name.
    """
    metrics = directory / "metrics.jsonl"
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    checkpoints = directory / "checkpoints"
    return has_metrics or (checkpoints.is_dir() and any(checkpoints.iterdir()))


JOB_FILE = ".job"  # the torchrun rendezvous id of the job that created the run directory


def _find_job_run(root: Path, identity: str) -> str:
    """The run directory created by this same job (an earlier attempt of it), or ''."""
    if not identity or not root.is_dir():
        return ""
    for directory in sorted(root.iterdir()):
        job = directory / JOB_FILE
        if job.is_file() and job.read_text(encoding="utf-8").strip() == identity:
            return directory.name
    return ""


def _decide_run(cfg: Config) -> tuple[Path, Path | None, list[str]]:
    """Rank 0's decision: the run directory, the checkpoint to resume from, and notes to log.

    * ``logging.name`` given: that directory. Empty: the directory an earlier attempt of this job
      created (torchrun restarts and Slurm requeues keep the rendezvous id), else a new
      ``<task>-<date>-<time>``.
    * ``checkpoint.resume``: ``auto`` resumes from the directory's newest valid step checkpoint;
      ``none`` refuses a directory that already holds a run (nothing is overwritten); a path resumes
      from that file (after a torchrun restart: from the run's own newest checkpoint, if any).
    """
    from .checkpoint import load_checkpoint
    from .resume import job_identity, newest_valid, remove_partial_writes

    root, name, resume = Path(cfg.logging.root), cfg.logging.name, cfg.checkpoint.resume
    if resume not in ("auto", "none"):
        load_checkpoint(resume)  # a bad file is reported before anything is created
    identity = job_identity()
    name = name or _find_job_run(root, identity)
    if name:
        if resume == "none" and _holds_run(root / name):
            raise UserError(f"logging.name: {root / name} already holds a run; resume it with checkpoint.resume=auto "
                            "or choose another name")
    else:
        name = stem = f"{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        suffix = 1
        while (root / name).exists():
            suffix += 1
            name = f"{stem}-{suffix}"
    run_dir = root / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():  # a resumed run keeps the config it started with
            (run_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        if identity and not (run_dir / JOB_FILE).exists():
            (run_dir / JOB_FILE).write_text(identity + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"logging.root: cannot create {run_dir} ({e.strerror or e})") from None
    notes: list[str] = []
    if resume == "none":
        return run_dir, None, notes
    remove_partial_writes(run_dir / "checkpoints")
    # A path names where the job starts. When torchrun restarts the job's workers, the run's own
    # newer checkpoints are where it stands now; starting from the path again would redo the work.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    own = newest_valid(run_dir / "checkpoints", notes.append) if resume == "auto" or restarted else None
    if resume == "auto":
        return run_dir, own, notes
    if own is not None:
        notes.append(f"restart: resuming from the run's own {own.name} rather than checkpoint.resume={resume}")
        return run_dir, own, notes
    return run_dir, Path(resume), notes


def _prepare_run(cfg: Config, info) -> tuple[Path, Path | None, list[str]]:
    """:func:`_decide_run` on rank 0; every rank learns the decision (or the error)."""
    from .dist import broadcast_object

    decision: tuple = ("", None, [], "")
    if info.is_main:
        try:
            run_dir, resume_from, notes = _decide_run(cfg)
            decision = (str(run_dir), str(resume_from) if resume_from else None, notes, "")
        except UserError as e:
            decision = ("", None, [], str(e))
    run_dir, resume_from, notes, error = broadcast_object(decision, info)
    if error:
        raise UserError(error)
    return Path(run_dir), Path(resume_from) if resume_from else None, notes


def train(cfg: Config) -> dict:
    """Run one training job in this process (one rank of it under torchrun); return the summary."""
    from .dist import distributed
    from .runlog import make_logger
    from .trainer import Trainer

    with distributed(cfg.distributed) as info:
        run_dir, resume_from, notes = _prepare_run(cfg, info)
        logger = make_logger(info.is_main, run_dir, cfg.logging.progress, _start_tracking(cfg, run_dir, info))
        exit_code = 1
        try:
            logger.info(f"run directory: {run_dir}\n--- resolved config ---\n{dump_yaml(cfg).rstrip()}\n---")
            for note in notes:
                logger.info(note)
            summary = Trainer(cfg, info, logger, run_dir, resume_from).fit()
            exit_code = 0
            return summary
        finally:
            logger.close(exit_code)


def _start_tracking(cfg: Config, run_dir: Path, info):
    """This rank's wandb run (or None). A failure on any rank (online without a server, say) is
    every rank's error: the others would otherwise wait for it at the first collective."""
    from .dist import first_error
    from .tracking import start_wandb

    tracker, error = None, ""
    try:
        tracker = start_wandb(cfg, run_dir, info.rank, info.is_main)
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
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["report"]:
        from .report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["parity"]:
        from .parity import main as parity_main

        return parity_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "config-reference":
            if args.update:
                update_reference(Path(args.update))
            else:
                print(reference_markdown())
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "check-config":
            print(dump_yaml(cfg), end="")
            return 0
        # dp and single are one process: refused under torchrun before torch is even imported.
        check_mode(cfg.training.mode, _env_world_size())
        return _train_and_exit(cfg)
    except UserError as e:
        # Every rank meets the same error; only global rank 0 reports it. RANK is read here
        # directly because importing ddp_seq.dist would load torch, and config errors must be fast.
        if os.environ.get("RANK", "0") in ("", "0"):
            print(f"ddp-seq: error: {e}", file=sys.stderr, flush=True)
        elif _env_world_size() > 1:
            # torchrun stops every worker as soon as one exits != 0: a moment's grace lets rank 0,
            # which meets the same error (maybe a little later), print it before being stopped.
            time.sleep(PEER_ERROR_GRACE_S)
        exit_worker(EXIT_USER_ERROR)
        return EXIT_USER_ERROR


def _lost_peers(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank died or hung."""
    text = str(error)
    return type(error).__name__ in ("DistBackendError", "DistNetworkError") or any(
        marker in text for marker in ("Timed out waiting", "Connection reset by peer", "Connection closed by peer",
                                      "NCCL communicator was aborted", "Broken pipe"))


def _train_and_exit(cfg: Config) -> int:
    """Train; map preemption and lost peers to their exit codes (each with one line, no traceback)."""
    from .resume import EXIT_PREEMPTED, Preempted

    try:
        train(cfg)
    except Preempted:
        exit_worker(EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    except RuntimeError as e:
        if not _lost_peers(e):
            raise
        # Every surviving rank says it: the one that could print may be the one that died.
        rank = os.environ.get("RANK", "0")
        print(f"ddp-seq: error: rank {rank} lost contact with the other ranks ({first_line(e, 300)}); one of them died "
              f"or hung for longer than distributed.timeout_s={cfg.distributed.timeout_s}", file=sys.stderr, flush=True)
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


def exit_worker(code: int) -> None:
    """End a torchrun worker right away, once its process group is destroyed and its files closed.

    With torch 2.13 + gloo, interpreter finalisation of a worker sometimes aborts (SIGABRT,
    "terminate called without an active exception": a C++ thread still joinable at static
    destruction), about 1 run in 12 on a loaded 2-core machine, turning a finished run into a failed
    one. Nothing is left to do at that point, so skip finalisation. Single processes exit normally.
    """
    if _env_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def train_main() -> int:
    """``train.py`` / ``python -m ddp_seq``: ``train`` is implied."""
    argv = sys.argv[1:]
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]
    return main(argv)
