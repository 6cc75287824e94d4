"""How the :class:`~ddp_seq.train.trainer.Trainer` saves and resumes: its ``state_dict``, the collective
checkpoint write, and what it logs when SIGTERM or SIGINT stops it. A mixin of the Trainer (it reads the
trainer's model, optimizer, scheduler, sampler, state and logger), kept apart so each file stays short.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ddp_seq.config import to_dict
from ddp_seq.parallel.process_group import all_reduce_sum
from ddp_seq.train.checkpoint import link_latest, nonfinite_parameter, save_atomic
from ddp_seq.train.config_change import RULES, RUN, changed_keys, reapply
from ddp_seq.train.divergence import Diverged
from ddp_seq.train.resume import Preempted, capture_rng, check_plan, prune, restore_rng, step_path, stop_reason
from ddp_seq.train.state import EpochProgress


class CheckpointMixin:
    """Checkpoints of a Trainer: every rank takes part in a save (RNG states are gathered); rank 0 writes."""

    def _checkpoint_path(self, name: str) -> Path | None:
        """``checkpoints/<name>`` of this run, or None when checkpoints are off."""
        return self.run_dir / "checkpoints" / name if self.run_dir and self.cfg.checkpoint.save else None

    def state_dict(self) -> dict[str, Any]:
        """Every part a resume needs but the RNG states (a collective, see :meth:`_save`), each under
        its key of :data:`~ddp_seq.train.checkpoint.PARTS` as its own ``state_dict()`` returns it:
        the unwrapped model, optimizer, LR scheduler, grad scaler, the sampler's position (the next
        global batch, ``(epoch, position)``, and the plan it indexes), the loop's
        :class:`~ddp_seq.train.state.TrainState`, the config, and ``checkpoint_extra``."""
        st = self.state
        # The loop's (epoch, position) is the next global batch, the next epoch's after an epoch end:
        # the sampler's state with that epoch (its plan does not depend on the epoch).
        sampler = {**self.sampler.state_dict(position=st.position), "epoch": st.epoch}
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "sampler": sampler, "train_state": st.state_dict(),
                "config": to_dict(self.cfg), "extra": dict(self.extra)}

    def load_state_dict(self, state: dict[str, Any], source: Path | str = "checkpoint") -> None:
        """Undo :meth:`state_dict` (the model's weights were loaded before DDP wrapped it).

        The optimizer's hyperparameters and the LR schedule are the current config's afterwards,
        not the saved ones (:func:`~ddp_seq.train.config_change.reapply`); the keys no resume can
        change were refused before (:func:`~ddp_seq.train.config_change.refused`)."""
        check_plan(state, self.sampler.plan_key(), str(source))
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        reapply(self.optimizer, self.scheduler, fresh)
        if state["scaler"]:  # empty when saved without fp16: a scaler enabled now starts afresh
            self.scaler.load_state_dict(state["scaler"])
        st, t = self.state, self.cfg.training
        st.load_state_dict(state["train_state"])
        # The data position is the sampler's: the trainer's loop loads it into the sampler at every
        # epoch it starts (``_step_groups``), from (epoch, position).
        st.epoch, st.position = state["sampler"]["epoch"], state["sampler"]["position"]
        self.stop_reason = stop_reason(st.epoch, st.stale, t.epochs, t.patience, t.monitor)
        st.finished = self.stop_reason is not None
        self.saved_step = st.step
        # Ranks that did not exist in the saved job (resumed on more ranks) take rank 0's states.
        rng = state["rng"]
        restore_rng(rng[self.info.rank] if self.info.rank < len(rng) else rng[0])
        # Every change listed here is in effect: the others were refused before anything loaded.
        changed = [f"{k} {old!r} -> {new!r}" for k, (old, new) in changed_keys(state["config"], self.cfg).items()
                   if RULES.get(k) != RUN]
        where = "the run had finished" if st.finished else \
            f"epoch {st.epoch + 1}, global batch {st.position}/{self.sampler.steps_per_epoch(st.epoch)}"
        self.log.info(f"resuming from {source}: {where}, step {st.step}, saved with world size {len(rng)}"
                      + (f"; config changed since, in effect from here: {', '.join(changed)}" if changed else ""))

    def _save(self, progress: EpochProgress, best: bool = False) -> Path | None:
        """Every rank calls this at the same step; rank 0 writes ``step-<N>.pt`` and updates ``last.pt``."""
        cfg, info = self.cfg.checkpoint, self.info
        if not cfg.save or self.run_dir is None:
            return None
        if (seen := self.watch.seen()) is not None:  # never a checkpoint after a non-finite step
            raise self._diverged("gradient norm", seen[1], seen[0])
        bad = nonfinite_parameter(self.module.state_dict())  # the same weights on every rank
        if bad is not None:
            raise self._diverged(f"weights ({bad})", float("nan"), self.state.step)
        start = time.perf_counter()
        rng = [capture_rng()]
        if info.distributed:  # RNG states differ per rank (e.g. dropout): keep every rank's
            rng = [None] * info.world_size
            dist.all_gather_object(rng, capture_rng())
        self.saved_step = self.state.step
        if not info.is_main:
            return None
        state = {**self.state_dict(), "rng": rng}
        state["train_state"]["progress"] = asdict(progress)
        directory = self.run_dir / "checkpoints"
        path = save_atomic(state, step_path(directory, self.state.step))
        link_latest(path, directory / "last.pt")
        if best:
            link_latest(path, directory / "best.pt")
        prune(directory, cfg.keep_last)
        seconds = time.perf_counter() - start
        self.checkpoint_s += seconds
        self.saves.append(seconds)
        return path

    def _diverged(self, what: str, value: torch.Tensor | float, step: int | None = None) -> Diverged:
        """Log that training produced a NaN or infinity at optimizer step ``step`` (default: the one in
        progress) on rank 0, and build the exception every rank raises."""
        last = self._checkpoint_path("last.pt")
        newest = step_path(last.parent, self.saved_step) if last is not None else None
        newest = newest if newest is not None and newest.exists() else None
        best = self.state.best
        shown = (f"{best['path']} (epoch {best['epoch']}, {self.cfg.training.monitor} {best['value']:.4g})"
                 if best and best.get("path") else "")
        error = Diverged(what, float(value), step or self.state.step + 1, self.state.epoch + 1, newest, shown)
        self.log.info(str(error))
        return error

    def _preempted(self, where: str) -> Preempted:
        """Log where a stop signal stopped the run (its checkpoint is written) and build the exception.
        A rank that did not get the signal itself (another rank did) stops as if on SIGTERM."""
        path = self._checkpoint_path("last.pt")
        signum = self.stop.signal or signal.SIGTERM
        # The command line resumes by itself (checkpoint.resume=auto); a Trainer of the user's is told how.
        again = "Run the same command again to resume." if self.claimed else \
            "Resume with Trainer(..., resume_from='last')."
        self.log.info(f"{signal.Signals(signum).name}: stopped {where}; " +
                      (f"checkpoint {path}. {again}" if path else "checkpoint.save=false: nothing saved."))
        return Preempted(path, signum)

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal. Every rank asks at the same steps, so they stop together."""
        flag = torch.tensor([1.0 if self.stop.signal is not None else 0.0])
        return bool(all_reduce_sum(flag, self.info)[0] > 0)
