"""What resuming needs besides weights: RNG states, the checkpoint directory's bookkeeping, shape
checks, the job's identity across restarts, and the SIGTERM flag for preemption.

Step checkpoints are ``checkpoints/step-<N>.pt`` (N = optimizer steps taken); ``best.pt`` lives
beside them. ``resume=auto`` takes the newest step checkpoint that loads, skipping a damaged one.
"""

from __future__ import annotations

import os
import random
import re
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddp_seq.errors import UserError
from ddp_seq.train.checkpoint import is_resumable, load_checkpoint, nonfinite_parameter

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
# Exit code of a process that stopped on SIGTERM after checkpointing (128 + SIGTERM, the shell's
# convention for "terminated", so Slurm and shells read it as such). Rerun the command to resume.
EXIT_PREEMPTED = 143
#: The signals that stop training at the next common step with a checkpoint: SIGTERM (Slurm's time
#: limit and preemption, ``kill``) and SIGINT (Ctrl-C, which a terminal sends to every process of
#: the foreground group: torchrun and each of its workers).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """What a process that stopped on ``signum`` exits with: 128 + the signal (143 for SIGTERM, 130
    for SIGINT), the shell's convention for a process ended by that signal."""
    return 128 + int(signum)


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def step_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every step checkpoint in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found)


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (``best.pt`` is never touched)."""
    for _, path in step_checkpoints(directory)[:-keep_last]:
        path.unlink(missing_ok=True)


def remove_partial_writes(directory: Path) -> None:
    """Delete temporary files left by a writer that was killed mid-save (see ``save_atomic``)."""
    if directory.is_dir():
        for path in directory.glob(".*.tmp-*"):
            path.unlink(missing_ok=True)


def newest_valid(directory: Path, warn) -> Path | None:
    """The newest step checkpoint that loads; damaged newer ones are reported through ``warn`` and skipped."""
    for _, path in reversed(step_checkpoints(directory)):
        try:
            state = load_checkpoint(path)
        except UserError as e:
            warn(f"skipping {e}")
            continue
        if not is_resumable(state):
            warn(f"skipping {path}: not a resumable step checkpoint")
        elif nonfinite_parameter(state["model"]) is not None:  # written before the divergence stop existed
            warn(f"skipping {path}: its weights hold NaN or infinity (the run had diverged)")
        else:
            return path
    return None


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as checkpoint-safe values (tensors, ints, tuples; no numpy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def job_identity() -> str:
    """What stays the same when torchrun restarts the workers of one job: its rendezvous id.

    ``torchrun --standalone`` draws a fresh id per launch; the Slurm script passes the job id, which
    a requeued job keeps. Empty outside torchrun and for torchrun's default id ``none``.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return "" if run_id in ("", "none") else run_id


class StopFlag:
    """Records SIGTERM and SIGINT (:data:`STOP_SIGNALS`) instead of dying, so the training loop can
    finish its step, stop with the other ranks at the same step and checkpoint.

    Slurm sends SIGTERM before a time limit or a preemption; torchrun forwards it to its workers
    and waits (30 s by default) before SIGKILL. Ctrl-C in a terminal sends SIGINT to torchrun and
    to every worker at once (torchrun forwards it again): without this flag each worker would die
    in a ``KeyboardInterrupt`` traceback wherever it stood, with the work since the last
    checkpoint lost. The first signal received is kept. Installed for the duration of ``with``.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signum

    def __enter__(self) -> StopFlag:
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave the default behaviour
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class Preempted(SystemExit):
    """Raised by ``Trainer.fit`` on every rank after the checkpoint of a stop signal is written.

    A ``SystemExit`` whose ``code`` is :func:`exit_code` of ``signum`` (143 for SIGTERM, 130 for
    SIGINT): uncaught, the process exits with it and no traceback, as the signal's own default
    would have ended it -- only later, with the work saved. ``except Exception`` does not catch it;
    ``except Preempted`` does (``path``: the checkpoint; ``signum``: the signal).
    """

    def __init__(self, path: Path | None, signum: int = signal.SIGTERM) -> None:
        super().__init__(exit_code(signum))
        self.path, self.signum = path, int(signum)

    def __str__(self) -> str:
        return f"stopped on {signal.Signals(self.signum).name}; checkpoint: {self.path}"


#: What each entry of the sampler's plan key (``BucketBatchSampler.plan_key``) is set by.
PLAN_SOURCES = {"batch_size": "batching.batch_size", "max_tokens": "batching.max_tokens",
                "strategy": "batching.strategy", "pool": "batching.pool", "padding_noise": "batching.padding_noise",
                "seed": "training.seed", "num_samples": "the training data's sequences",
                "total_length": "the training data's steps"}


def check_plan(state: dict[str, Any], plan: dict[str, Any], source: str) -> None:
    """Refuse a mid-epoch resume whose epoch would be cut into other batches than the saved run's.

    ``state``: a loaded checkpoint (its ``sampler``, ``train_state`` and ``config`` parts); ``plan``:
    the current sampler's ``plan_key()``.

    The saved position counts global batches of the epoch's plan; under another plan (another
    batch size, token budget, strategy, seed or data) the batches after it hold other samples, so
    the rest of the epoch would skip some and repeat others. An epoch-end checkpoint (position 0)
    is free to change them: the next epoch is planned anew. World size and ``grad_accum`` never
    change the plan.
    """
    data = state["sampler"]
    if state["train_state"].get("finished") or not data.get("position"):
        return
    saved = data.get("plan")
    if saved is None:  # checkpoints from before the plan was stored: compare the config keys it came from
        old = state["config"]
        saved = {k: old["batching"].get(k) for k in ("batch_size", "max_tokens", "strategy", "pool", "padding_noise")}
        saved["seed"] = old["training"].get("seed")
    changed = [f"{PLAN_SOURCES.get(k, k)} {v!r} -> {plan.get(k)!r}" for k, v in saved.items() if plan.get(k) != v]
    if changed:
        raise UserError(f"checkpoint.resume: {source} stopped in epoch {data['epoch'] + 1} after global batch "
                        f"{data['position']}, and that epoch's batches have changed since ({', '.join(changed)}): "
                        "the rest of the epoch would skip or repeat samples. Resume with the saved values, or "
                        "from a checkpoint taken at an epoch end (checkpoint.resume=PATH)")


def stop_reason(epoch: int, stale: int, epochs: int, patience: int, monitor: str) -> str | None:
    """Why a run that has finished ``epoch`` epochs, ``stale`` of them without improvement, trains no
    further under ``training.epochs`` / ``training.patience`` as they are now; None if it trains on.

    How long a run lasts follows the config it is resumed with, as a higher ``max_epochs`` does in
    Lightning: a finished run given more epochs (or more patience) trains on.
    """
    if epoch > epochs:
        return (f"this run has already trained {epoch} epochs, more than training.epochs={epochs}: "
                "nothing to train (raise training.epochs to train on)")
    if epoch == epochs:
        return f"this run has already trained its {epochs} epochs: nothing to train (raise training.epochs to train on)"
    if patience and stale >= patience:
        return (f"this run stopped early: {monitor} did not improve for {stale} epoch(s), training.patience="
                f"{patience}: nothing to train (raise training.patience, or 0 for none, to train on)")
    return None
