"""The Trainer: DDP training of a model it is handed, over per-rank shares of global batches,
resumable at any step.

It takes parts -- any ``nn.Module`` whose ``forward(inputs, lengths)`` gives what the objective
reads, the train and val datasets of ``(sequence, target)`` items, an objective -- and the config
for everything else; it never reads a file or builds a model (``ddp_seq.builders`` does that for
the config path). ``training.mode`` changes only how the model is wrapped (``parallel.wrap_model``)
and which collate prepares a batch (``collate_for``); loss normalisation, metrics, checkpoints (the
unwrapped module's state) and resuming are the same code for ``ddp``, ``dp`` and ``single``.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddp_seq.config import Config, check_mode
from ddp_seq.data.collate import Batch
from ddp_seq.data.sampler import straggler_ratio
from ddp_seq.errors import UserError
from ddp_seq.loggers.report import breakdown_table, columns_with, summary_lines
from ddp_seq.loggers.runlog import NullLogger, default_logger, format_table
from ddp_seq.parallel.process_group import (
    DistInfo,
    all_reduce_sum,
    current_info,
    peak_rss_mb,
    per_rank,
    refuse_ungrouped,
)
from ddp_seq.parallel.wrap import wrap_model
from ddp_seq.train.amp import native_bf16, resolve_amp
from ddp_seq.train.checkpoint import check_encoding, check_finite, check_shapes, load_checkpoint
from ddp_seq.train.checkpointing import CheckpointMixin
from ddp_seq.train.config_change import refused, weights_keys
from ddp_seq.train.contract import check_item, check_parts, dataset_lengths, needs_every_gradient
from ddp_seq.train.divergence import NonFiniteWatch, finite, gradient_norm
from ddp_seq.train.evaluation import evaluate
from ddp_seq.train.loaders import make_loader, make_sampler
from ddp_seq.train.objective import Objective, as_objective
from ddp_seq.train.optim import build_optimizer, build_scheduler
from ddp_seq.train.resume import StopFlag, stop_reason
from ddp_seq.train.run_dir import claim, is_held, release_run_dir
from ddp_seq.train.state import EpochCounters, EpochProgress, TrainState, epoch_record
from ddp_seq.train.step import backward_global_mean
from ddp_seq.train.steptime import PHASES, StepTimer, advice, breakdown_record

__all__ = ["Trainer", "evaluate"]


class Trainer(CheckpointMixin):
    """Trains ``model`` on ``train_data``, validating on ``val_data`` after every epoch; ``fit()`` runs the job.

    Args:
        model: any ``nn.Module`` with ``forward(inputs, lengths)`` (``inputs`` ``[B, T, F]`` float32
            or ``[B, T]`` int64, ``lengths`` ``[B]`` int64 on the CPU -- or, in dp mode, on the
            device); built with the same seed on every rank or not (DDP broadcasts rank 0's
            weights). Moved to ``info.device`` here.
        train_data, val_data: map-style datasets of ``(sequence, target)`` items (see
            :func:`~ddp_seq.data.collate.collate`); a ``lengths`` attribute saves one pass over each.
        cfg: everything else (batching, training, checkpoint, logging, distributed); default ``Config()``.
        objective: a task name (``classify``, ``regress``, ``tag``), an :class:`~ddp_seq.train.objective.Objective`,
            or a loss function ``(outputs, batch) -> (loss_sum, count)``; default ``cfg.data.task``.
        info: this process's place in the job; default the current process group (or one process).
        logger: what rank 0 prints and records (``runlog.make_logger``); default: rank 0 prints the
            progress and epoch lines (``logging.progress``) and, with ``run_dir``, writes
            ``train.log`` and ``metrics.jsonl`` there (and ``tensorboard/`` event files with
            ``logging.tensorboard``); the other ranks stay silent. A logger of your own gets wandb
            and TensorBoard from ``make_logger(..., tracker=tracking.start_tracking(...))``.
        run_dir: where checkpoints (``checkpoints/``) and the default logger's files go, created if
            missing; None = no checkpoints, no files. A directory that holds an earlier run
            (checkpoints or metrics) is refused unless ``resume_from`` or ``overwrite`` says what
            to do with it.
        resume_from: a checkpoint of this trainer's kind to continue from, or ``"last"``: the newest
            valid step checkpoint of ``run_dir`` (a new run when there is none yet), as Lightning's
            ``ckpt_path="last"``.
        overwrite: start a new run in a ``run_dir`` that holds an earlier one, removing that run's
            checkpoints, metrics, logs and tracker files first (rank 0); nothing else there is touched.
        claimed: the caller has already decided who owns ``run_dir`` and what to resume (the
            config path does, by ``logging.name`` and ``checkpoint.resume``): take it as it is.
        checkpoint_extra: plain values stored in every checkpoint, as its ``extra`` part (the
            builders store the data's encoding and the model's inputs and outputs there, to rebuild
            it for ``predict``).
        notes: lines to log at the start (what the data readers did, say).

    Where training stands is ``(epoch, position)``: the next global batch to train is ``position``
    in epoch ``epoch``'s list, which depends on (seed, epoch) only -- so a checkpoint taken with one
    world size resumes exactly under another.

    Raises:
        UserError: before anything is written: a config that cannot work with these parts (fp16 on
            CPU, fewer training samples than ranks, a monitored metric the objective does not
            produce); items that are not ``(sequence, target)`` pairs of numbers, a model whose
            forward fails or returns no single tensor, a class id the model's outputs cannot score
            (:mod:`ddp_seq.train.contract`); a ``run_dir`` holding an earlier run without
            ``resume_from`` / ``overwrite``; a checkpoint that does not fit the model; or -- without
            ``info`` -- torchrun's processes without a process group (each would train alone).
    """

    def __init__(self, model: nn.Module, train_data, val_data, cfg: Config | None = None,
                 objective: str | Objective | Callable | None = None, *, info: DistInfo | None = None,
                 logger: NullLogger | None = None, run_dir: Path | str | None = None,
                 resume_from: Path | str | None = None, overwrite: bool = False, claimed: bool = False,
                 checkpoint_extra: dict[str, Any] | None = None, notes: list[str] | tuple[str, ...] = ()) -> None:
        self.cfg = cfg = cfg or Config()
        if info is None:
            refuse_ungrouped("Trainer")
        self.info = info = info or current_info()
        self.objective = as_objective(cfg.data.task if objective is None else objective)
        self.mode, self.notes, self.extra = cfg.training.mode, list(notes), dict(checkpoint_extra or {})
        check_mode(self.mode, info.world_size)
        if cfg.training.amp == "fp16" and info.device.type != "cuda":
            raise UserError("training.amp: fp16 needs a CUDA device; use bf16 or none on CPU")
        monitored = cfg.training.monitor.removeprefix("val_")
        if monitored not in self.objective.metrics:
            raise UserError(f"training.monitor: {cfg.training.monitor} is not among the metrics of objective "
                            f"{self.objective.name} ({', '.join('val_' + m for m in self.objective.metrics)})")
        self.train_data, self.val_data = train_data, val_data
        for data, which in ((train_data, "train"), (val_data, "val")):
            check_item(data, which)  # before anything reads an item's fields
        train_lengths, val_lengths = dataset_lengths(train_data, "train"), dataset_lengths(val_data, "val")
        if info.world_size > len(train_lengths):
            raise UserError(f"data: {len(train_lengths)} training sequences cannot feed {info.world_size} ranks; "
                            "use at least one per rank (data.num_train, or a bigger data.train_path)")
        self.module = model.to(info.device)
        # the model and the objective fit the items; what rebuilds the model goes into `extra`
        find_unused = cfg.distributed.find_unused_parameters
        self.extra = check_parts(self.module, train_data, val_data, self.objective, self.mode, info.device, self.extra,
                                 needs_every_gradient(self.mode, info.world_size, find_unused))
        # Everything above can refuse the parts; nothing is written before this point.
        self.run_dir, self.claimed = (Path(run_dir) if run_dir is not None else None), claimed
        # rank 0 locks run_dir in claim() until fit() ends, unless the caller claimed it (and holds it)
        self._release = not claimed and self.run_dir is not None and info.is_main and not is_held(self.run_dir)
        if not claimed:
            resume_from, claim_notes = claim(self.run_dir, resume_from, overwrite, info)
            self.notes += claim_notes
        self._owns_log = logger is None  # closed at the end of fit()
        self.log = logger or default_logger(self.run_dir, cfg.logging.progress, cfg.logging.tensorboard,
                                            info.is_main)
        state = load_checkpoint(resume_from) if resume_from is not None else None
        if state is not None:  # weights go in before DDP wraps the module (and broadcasts rank 0's)
            refused(state, cfg, str(resume_from), library=not claimed)  # a changed key no resume can honour
            check_finite(state, str(resume_from))
            if "encoding" in self.extra:
                check_encoding(state, self.extra["encoding"], str(resume_from))
            check_shapes(state["model"], self.module, str(resume_from), weights_keys(state, cfg),
                         "logging.name" if claimed else "run_dir")
            self.module.load_state_dict(state["model"])
        self.model = wrap_model(self.module, self.mode, info, self.log, find_unused)
        self.sampler = make_sampler(train_lengths, cfg, info, train=True)
        self.loader = make_loader(train_data, self.sampler, cfg)
        self.val_loader = make_loader(val_data, make_sampler(val_lengths, cfg, info, train=False), cfg)
        self.optimizer = build_optimizer(self.model.parameters(), cfg)
        # the LR schedule's length: every epoch's global batches (a function of seed and epoch only)
        self.total_steps = self.sampler.total_steps(cfg.training.epochs, cfg.training.grad_accum)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        # training.amp=auto decided once for this device, not at every autocast of every step
        self.amp = resolve_amp(cfg.training.amp, info.device)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.training.amp == "fp16")
        self.state = TrainState()
        self.last_grad_norm: torch.Tensor | None = None  # read when logging only
        self.watch = NonFiniteWatch(info.device)  # the first non-finite gradient norm, kept on the device
        self.saved_step = -1  # the step of the newest checkpoint this process took part in
        self.checkpoint_s = 0.0  # rank 0's time in mid-epoch checkpoints this epoch (gather + write)
        self.saves: list[float] = []  # rank 0's seconds per checkpoint of this process
        self.stop = StopFlag()
        self.stop_reason: str | None = None  # why a resumed run trains no further
        self.advice: str | None = None  # what the first epoch's step breakdown says would help
        if state is not None:
            self.load_state_dict(state, resume_from)

    def _progress_now(self, counters: EpochCounters, segment_start: float) -> EpochProgress:
        """The epoch's global totals as of the counters' last reduce (carried ones plus this segment's)."""
        p = self.state.progress
        return EpochProgress(p.loss_sum, p.count, p.real_tokens + counters.real_tokens,
                             p.padded_tokens + sum(counters.padded_per_rank),
                             p.seconds + time.perf_counter() - segment_start)

    # -- training -------------------------------------------------------------------------------

    def train_step(self, *batches: Batch, timer: StepTimer | None = None) -> tuple[torch.Tensor, float]:
        """One optimizer step over one or more global batches' shares (gradient accumulation).

        Returns the detached local loss *sum* over all of them, on the device (reading it would
        wait for the device; the caller reads it only when it logs), and the global count N.
        ``timer``: where the step's phases are timed (the loop's :class:`~ddp_seq.train.steptime.StepTimer`).
        """
        cfg, timer = self.cfg, timer or StepTimer(enabled=False)
        self.optimizer.zero_grad(set_to_none=True)
        total, count = backward_global_mean(self.model, self.module, self.objective, batches, self.scaler,
                                            self.info, self.amp, timer)
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16
        self.last_grad_norm = gradient_norm(self.model.parameters(), cfg.training.grad_clip)
        if self.amp != "fp16":  # the same global norm on every rank; read at the loop's next sync
            self.watch.note(self.last_grad_norm, self.state.step + 1)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        timer.mark("optimizer")
        return total, count

    def _step_groups(self, epoch: int, start: int) -> Iterator[list[Batch]]:
        """This rank's batches from global batch ``start`` of ``epoch`` on, in groups of ``training.grad_accum``."""
        self.sampler.load_state_dict({"version": 1, "epoch": epoch, "position": start})
        batches = iter(self.loader)
        while group := list(itertools.islice(batches, self.cfg.training.grad_accum)):
            yield group

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` from ``state.position`` to its end; raises :class:`Preempted` on SIGTERM."""
        timer = StepTimer(self.module, self.info.device)
        try:
            return self._train_epoch(epoch, timer)
        finally:
            timer.close()

    def _train_epoch(self, epoch: int, timer: StepTimer) -> dict[str, Any]:
        cfg, info, log, st = self.cfg, self.info, self.log, self.state
        accum = cfg.training.grad_accum
        self.model.train()
        self.sampler.set_epoch(epoch)
        num_batches, start_position = len(self.sampler), st.position
        num_groups = -(-(num_batches - start_position) // accum)
        done = -(-start_position // accum)  # groups finished before this segment
        total_groups = done + num_groups
        log.start_progress(num_groups, f"epoch {epoch + 1}/{cfg.training.epochs}")
        counters = EpochCounters(info.world_size, info.rank, info.device)
        step_times: list[float] = []
        self.checkpoint_s = 0.0
        check_every = cfg.checkpoint.signal_check_steps if info.distributed else 1
        every = cfg.checkpoint.every_steps
        start = last = time.perf_counter()
        logged = 0  # steps already shown on the progress bar
        reduce = functools.partial(all_reduce_sum, info=info)
        step_start = time.perf_counter()  # a step's time includes waiting for its batches
        timer.start()
        for i, group in enumerate(self._step_groups(epoch, start_position)):
            batches = [b.to(info.device) for b in group]
            timer.mark("data")
            local, count = self.train_step(*batches, timer=timer)
            step_times.append(time.perf_counter() - step_start)
            st.step += 1
            st.position = min(num_batches, st.position + len(group))
            counters.add(local, count, batches)
            last_group = i + 1 == num_groups
            # Every rank evaluates these conditions identically, so the collective below lines up.
            log_now = (i + 1) % cfg.training.log_every == 0 or last_group
            save_now = not last_group and bool(every) and st.step % every == 0
            check_now = not last_group and (i + 1) % check_every == 0
            stopping = False
            if log_now or save_now or check_now:
                timer.mark("other")
                # The loss window, token counters and SIGTERM flag, merged into one all-reduce.
                stopping = counters.reduce(st.progress, reduce, stop=self.stop.signal is not None) and not last_group
                timer.mark("sync")
                if (bad := self.watch.seen()) is not None:  # a non-finite norm since the last sync point
                    raise self._diverged("gradient norm", bad[1], bad[0])
            if log_now:
                train_loss, real, padded, sequences = counters.take_window()
                now = time.perf_counter()
                seconds = max(now - last, 1e-9)
                if not finite(train_loss):  # the window's loss is global: every rank stops here
                    raise self._diverged("training loss", train_loss)
                lr = self.optimizer.param_groups[0]["lr"]
                log.record({"kind": "train", "epoch": epoch + 1, "step": st.step, "train_loss": train_loss,
                            "lr": lr, "elapsed_s": st.progress.seconds + now - start,
                            "grad_norm": None if self.last_grad_norm is None else float(self.last_grad_norm),
                            "seq_per_s": sequences / seconds, "tokens_per_s": real / seconds,
                            "padding_efficiency": real / max(padded, 1)})
                log.progress(i + 1 - logged, f"loss {train_loss:.4f}, {real / seconds:,.0f} tok/s",
                             f"epoch {epoch + 1} step {done + i + 1}/{total_groups} loss {train_loss:.4f} "
                             f"lr {lr:.2e} ({now - last:.1f}s)")
                logged, last = i + 1, now
            if last_group:
                timer.end()
                break  # the epoch-end checkpoint follows evaluation
            if save_now or (stopping and self.saved_step != st.step):
                self._save(self._progress_now(counters, start))
            if stopping:  # any rank got SIGTERM: all stop here, at the same step
                log.end_progress()
                raise self._preempted(f"at epoch {epoch + 1}, step {st.step}")
            timer.end()
            step_start = time.perf_counter()
            timer.start()
        log.end_progress()
        ms = timer.ms_per_step()
        # One all-reduce for every per-rank figure of the epoch: peak memory and the step breakdown.
        ranks = per_rank([peak_rss_mb(), ms["step"], *(ms[p] for p in PHASES)], info)
        straggler = straggler_ratio(self.sampler.batches(), self.sampler.lengths, info.world_size)
        return {**epoch_record(epoch, self._progress_now(counters, start), counters.padded_per_rank, step_times,
                               len(self.sampler.lengths), straggler, self.checkpoint_s, [r[0] for r in ranks]),
                **breakdown_record([dict(zip(("step", *PHASES), r[1:])) for r in ranks])}

    def validate(self) -> dict[str, Any]:
        """``{"val_<metric>": value}`` over every validation sample exactly once.

        Scalars (the objective's metrics) are floats; the built-in classify and tag objectives add
        per-class lists indexed by class id (``val_precision``, ``val_recall``, ``val_f1``,
        ``val_support``, ``val_confusion``) and, when the data's encoding is known (the config
        path), ``val_classes``: the class names in that order.
        """
        # ddp: the unwrapped module (no gradients to synchronise); dp: the DataParallel wrapper,
        # so evaluation is split over the GPUs like training.
        module = self.model if self.mode == "dp" else self.module
        val = {f"val_{k}": v for k, v in
               evaluate(module, self.val_data, self.cfg, self.info, self.objective, self.val_loader).items()}
        classes = (self.extra.get("encoding") or {}).get("classes")
        if "val_f1" in val and classes is not None and len(classes) == len(val["val_f1"]):
            val["val_classes"] = list(classes)
        return val

    # -- the job --------------------------------------------------------------------------------

    def _end_epoch(self, row: dict[str, Any], metrics: dict[str, Any]) -> bool:
        """Record the finished epoch, decide best and early stopping; returns whether it is the best so far."""
        cfg, log, monitor, st = self.cfg, self.log, self.cfg.training.monitor, self.state
        row.update(metrics)
        st.history.append(row)
        log.record({"kind": "epoch", "step": st.step, **row})
        log.info(f"epoch {row['epoch']}/{cfg.training.epochs}  train_loss {row['train_loss']:.4f}  "
                 + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                 + f"  {row['tokens_per_s']:,.0f} tok/s  padding eff {row['padding_efficiency']:.3f}"
                 f"  straggler {row['straggler_ratio']:.3f}  {row['train_s']:.1f}s")
        value = metrics[monitor]
        higher = self.objective.higher_is_better(monitor.removeprefix("val_"))
        improved = st.best is None or (value > st.best["value"] if higher else value < st.best["value"])
        if improved:
            best_path = self._checkpoint_path("best.pt")
            st.best = {"epoch": row["epoch"], "value": value, "metrics": metrics,
                       "path": str(best_path) if best_path else None}
        st.stale = 0 if improved else st.stale + 1
        patience = cfg.training.patience
        stopping = bool(patience and st.stale >= patience)
        st.epoch, st.position, st.progress = row["epoch"], 0, EpochProgress()
        # The same rule a resume applies (resume.stop_reason): epochs reached, or patience run out.
        st.finished = stop_reason(st.epoch, st.stale, cfg.training.epochs, patience, monitor) is not None
        if stopping:
            log.info(f"early stopping: {monitor} did not improve for {patience} epoch(s)")
        return improved

    def fit(self) -> dict[str, Any]:
        """Train from where the run stands to the configured epochs; return the summary."""
        try:
            return self._fit()
        finally:
            if self._owns_log:
                self.log.close()
            if self._release:
                release_run_dir(self.run_dir)

    def _fit(self) -> dict[str, Any]:
        log, monitor, st = self.log, self.cfg.training.monitor, self.state
        params = sum(p.numel() for p in self.module.parameters())
        log.info(f"training {self.objective.name} on {len(self.sampler.lengths)} sequences "
                 f"({int(self.sampler.lengths.sum()):,} steps), {params:,} parameters, mode {self.mode}, "
                 f"world size {self.info.world_size}, device {self.info.device}, "
                 f"{torch.get_num_threads()} thread(s) per rank, {self.total_steps} steps")
        if self.cfg.training.amp == "auto":
            native = native_bf16(self.info.device)
            log.info("training.amp=auto: " + (f"bf16 autocast ({native} on {self.info.device.type})" if native else
                                               f"fp32 ({self.info.device.type} has no native bf16)"))
        for line in self.notes:
            log.info(line)
        if st.finished:
            log.info(self.stop_reason or "this run has already finished; nothing to train")
        job_start, trained = time.perf_counter(), 0
        with self.stop:
            while not st.finished:
                row = self.train_epoch(st.epoch)
                improved = self._end_epoch(row, self.validate())
                if trained == 0:  # what the first epoch's breakdown says would make the job faster
                    self.advice = advice(row, self.info.world_size)
                    if self.advice and not st.finished:  # the summary at the end says it once more
                        log.info(self.advice)
                trained += 1
                self._save(st.progress, best=improved)
                if not st.finished and self._stop_requested():
                    raise self._preempted(f"after epoch {st.epoch}, step {st.step}")
        wall = time.perf_counter() - job_start
        last = self._checkpoint_path("last.pt")
        summary = {"best_epoch": st.best["epoch"], f"best_{monitor}": st.best["value"],
                   "best_checkpoint": st.best["path"], "last_checkpoint": str(last) if last else None,
                   "wall_s": wall, "checkpoints": len(self.saves), "checkpoint_s": sum(self.saves),
                   "tokens_per_s": sum(r["tokens_per_s"] for r in st.history) / len(st.history),
                   "seq_per_s": sum(r["seq_per_s"] for r in st.history) / len(st.history), "advice": self.advice}
        log.record({"kind": "summary", **summary})
        # The same table and lines as `ddp-seq report` prints from metrics.jsonl later.
        log.info("\n" + format_table(st.history, columns_with([f"val_{m}" for m in self.objective.metrics])))
        breakdown = breakdown_table(st.history)
        if breakdown:
            log.info(breakdown)
        log.info("\n".join(summary_lines(summary, monitor)))
        return {**summary, "best_metrics": st.best["metrics"]}  # every val metric at the best epoch (k-fold)
