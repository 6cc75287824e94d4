"""Command line: ``ddp-seq train|check-config|config-reference`` (``train.py`` calls ``train``).

User errors (config, data, checkpoints) are one line on stderr and exit code 2, never a traceback.
Under torchrun every rank hits the same error; only global rank 0 prints it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import Config, UserError, dump_yaml, load_config, reference_markdown

EXIT_USER_ERROR = 2
COMMANDS = ("train", "check-config", "config-reference", "bench")


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


def _run_dir(cfg: Config, info) -> Path:
    """Rank 0 picks and creates ``<root>/<name>/`` and saves the resolved config; all ranks learn it.

    An explicit name whose directory already holds a run is refused rather than overwritten.
    """
    from .dist import broadcast_object

    decision: tuple[str, str] = ("", "")
    if info.is_main:
        root = Path(cfg.logging.root)
        name = cfg.logging.name
        if name:
            if _holds_run(root / name):
                decision = ("", f"logging.name: {root / name} already holds a run; choose another name")
        else:
            name = f"{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}"
            suffix = 1
            while (root / (name if suffix == 1 else f"{name}-{suffix}")).exists():
                suffix += 1
            name = name if suffix == 1 else f"{name}-{suffix}"
        if not decision[1]:
            try:
                (root / name).mkdir(parents=True, exist_ok=True)
                (root / name / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
                decision = (str(root / name), "")
            except OSError as e:
                decision = ("", f"logging.root: cannot create {root / name} ({e.strerror or e})")
    path, error = broadcast_object(decision, info)
    if error:
        raise UserError(error)
    return Path(path)


def train(cfg: Config) -> dict:
    """Run one training job in this process (one rank of it under torchrun); return the summary."""
    from .dist import distributed
    from .runlog import make_logger
    from .trainer import Trainer

    with distributed(cfg.distributed) as info:
        run_dir = _run_dir(cfg, info)
        logger = make_logger(info.is_main, run_dir, cfg.logging.progress)
        try:
            logger.info(f"run directory: {run_dir}\n--- resolved config ---\n{dump_yaml(cfg).rstrip()}\n---")
            return Trainer(cfg, info, logger, run_dir).fit()
        finally:
            logger.close()


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
        train(cfg)
        exit_worker(0)
        return 0
    except UserError as e:
        # Every rank meets the same error; only global rank 0 reports it. RANK is read here
        # directly because importing ddp_seq.dist would load torch, and config errors must be fast.
        if os.environ.get("RANK", "0") in ("", "0"):
            print(f"ddp-seq: error: {e}", file=sys.stderr, flush=True)
        exit_worker(EXIT_USER_ERROR)
        return EXIT_USER_ERROR


def exit_worker(code: int) -> None:
    """End a torchrun worker right away, once its process group is destroyed and its files closed.

    With torch 2.13 + gloo, interpreter finalisation of a worker sometimes aborts (SIGABRT,
    "terminate called without an active exception": a C++ thread still joinable at static
    destruction), about 1 run in 12 on a loaded 2-core machine, turning a finished run into a failed
    one. Nothing is left to do at that point, so skip finalisation. Single processes exit normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def train_main() -> int:
    """``train.py`` / ``python -m ddp_seq``: ``train`` is implied."""
    argv = sys.argv[1:]
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["train", *argv]
    return main(argv)
