"""The Trainer: DDP training over per-rank shares of global batches, resumable at any step.

``training.mode`` changes only how the model is wrapped (``parallel.wrap_model``) and which
collate prepares a batch (``collate_for``); loss normalisation, metrics, checkpoints (the
unwrapped module's state) and resuming are the same code for ``ddp``, ``dp`` and ``single``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import objective
from .checkpoint import check_encoding, check_shapes, link_latest, load_checkpoint, save_atomic
from .config import Config, check_mode, to_dict
from .data.batching import Step, straggler_ratio
from .data.collate import Batch, collate_for
from .data.sources import Splits, describe, load_splits
from .engine import autocast, build_optimizer, build_scheduler, evaluate, make_sampler
from .errors import UserError
from .model import build_model
from .parallel import wrap_model
from .process_group import DistInfo, all_reduce_sum, peak_rss_mb, per_rank
from .report import summary_lines, table_columns
from .resume import Preempted, StopFlag, capture_rng, prune, restore_rng, step_path
from .runlog import NullLogger, format_table

__all__ = ["Trainer", "evaluate"]


@dataclass
class EpochProgress:
    """Global totals of the epoch in progress, carried through a mid-epoch checkpoint."""

    loss_sum: float = 0.0  # summed over every rank
    count: float = 0.0  # the global count the loss is divided by
    real_tokens: float = 0.0
    padded_tokens: float = 0.0  # over all ranks, filler steps included
    seconds: float = 0.0


class Trainer:
    """Builds data, model, optimizer and samplers from the config; ``fit()`` runs the job.

    Where training stands is ``(epoch, position)``: the next global batch to train is
    ``position`` in epoch ``epoch``'s list, which depends on (seed, epoch) only -- so a checkpoint
    taken with one world size resumes exactly under another.
    """

    def __init__(self, cfg: Config, info: DistInfo, logger: NullLogger, run_dir: Path | None,
                 resume_from: Path | None = None, splits: Splits | None = None, fold: int | None = None) -> None:
        self.cfg, self.info, self.log, self.run_dir = cfg, info, logger, run_dir
        self.task, self.mode = cfg.data.task, cfg.training.mode
        check_mode(self.mode, info.world_size)
        if cfg.training.amp == "fp16" and info.device.type != "cuda":
            raise UserError("training.amp: fp16 needs a CUDA device; use bf16 or none on CPU")
        # The CLI reads the data before it creates the run directory (and k-fold jobs once per job).
        self.splits, self.fold = splits or load_splits(cfg.data), fold
        self.train_data, self.val_data, self.encoding = self.splits.train, self.splits.val, self.splits.encoding
        if info.world_size > len(self.train_data):
            raise UserError(f"data: {len(self.train_data)} training sequences cannot feed {info.world_size} ranks; "
                            "use at least one per rank (data.num_train, or a bigger data.train_path)")
        self.num_outputs = self.encoding.num_outputs(self.task)
        # The same seed on every rank gives identical initial weights; DDP also broadcasts
        # rank 0's parameters when it wraps the module.
        torch.manual_seed(cfg.training.seed)
        self.module = build_model(self.task, self.encoding.num_features, self.num_outputs, cfg.model,
                                  vocab_size=self.encoding.vocab_size, device=info.device)
        state = load_checkpoint(resume_from) if resume_from is not None else None
        if state is not None:  # weights go in before DDP wraps the module (and broadcasts rank 0's)
            check_encoding(state, self.encoding, str(resume_from))
            check_shapes(state["model"], self.module, str(resume_from))
            self.module.load_state_dict(state["model"])
        self.model = wrap_model(self.module, self.mode, info, logger)
        self.collate = collate_for(self.mode)
        self.sampler = make_sampler(self.train_data, cfg, info, train=True)
        self.optimizer = build_optimizer(self.model.parameters(), cfg)
        self.total_steps = self._count_steps()
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.training.amp == "fp16")
        self.step = self.epoch = self.position = 0
        self.progress = EpochProgress()
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.stale = 0  # epochs since the monitored metric last improved
        self.finished = False
        self.last_grad_norm: torch.Tensor | None = None  # read when logging only
        self.saved_step = -1  # the step of the newest checkpoint this process took part in
        self.checkpoint_s = 0.0  # rank 0's time in mid-epoch checkpoints this epoch (gather + write)
        self.saves: list[float] = []  # rank 0's seconds per checkpoint of this process
        self.stop = StopFlag()
        if state is not None:
            self._restore(state, resume_from)

    def _count_steps(self) -> int:
        """Optimizer steps of the whole job (for the LR schedule): global batches summed over epochs."""
        accum = self.cfg.training.grad_accum
        total = sum(-(-self._batches_in(epoch) // accum) for epoch in range(self.cfg.training.epochs))
        self.sampler.set_epoch(0)
        return total

    def _batches_in(self, epoch: int) -> int:
        """Global batches of ``epoch`` (a function of seed and epoch only)."""
        self.sampler.set_epoch(epoch)
        return len(self.sampler)

    def _checkpoint_path(self, name: str) -> Path | None:
        """``checkpoints/<name>`` of this run, or None when checkpoints are off."""
        return self.run_dir / "checkpoints" / name if self.run_dir and self.cfg.checkpoint.save else None

    # -- checkpoints ----------------------------------------------------------------------------

    def _restore(self, state: dict[str, Any], source: Path) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.progress = EpochProgress(**state["progress"])
        self.history, self.best, self.stale = state["history"], state["best"], state["stale"]
        self.finished = state["finished"]
        self.saved_step = self.step
        # Ranks that did not exist in the saved job (resumed on more ranks) take rank 0's states.
        rng = state["rng"]
        restore_rng(rng[self.info.rank] if self.info.rank < len(rng) else rng[0])
        saved_cfg, now = state["config"], to_dict(self.cfg)
        changed = [f"{s}.{k} {saved_cfg[s].get(k)!r} -> {v!r}" for s in ("data", "batching", "model", "training")
                   for k, v in now[s].items() if saved_cfg.get(s, {}).get(k) != v]
        where = "the run had finished" if self.finished else \
            f"epoch {self.epoch + 1}, global batch {self.position}/{self._batches_in(self.epoch)}"
        self.log.info(f"resuming from {source}: {where}, step {self.step}, saved with world size {len(rng)}"
                      + (f"; config changed since: {', '.join(changed)}" if changed else ""))

    def _progress_now(self, tokens: torch.Tensor, segment_start: float) -> tuple[EpochProgress, list[int]]:
        """The epoch's global totals so far (carried ones plus this segment's), and this segment's
        padded tokens per rank. A collective: every rank calls it at the same step."""
        tokens = all_reduce_sum(tokens, self.info)
        p = self.progress
        totals = EpochProgress(p.loss_sum, p.count, p.real_tokens + float(tokens[0]),
                               p.padded_tokens + float(tokens[1:].sum()),
                               p.seconds + time.perf_counter() - segment_start)
        return totals, [int(t) for t in tokens[1:]]

    def _save(self, progress: EpochProgress, best: bool = False) -> Path | None:
        """Every rank calls this at the same step; rank 0 writes ``step-<N>.pt`` and updates ``last.pt``."""
        cfg, info = self.cfg.checkpoint, self.info
        if not cfg.save or self.run_dir is None:
            return None
        start = time.perf_counter()
        rng = [capture_rng()]
        if info.distributed:  # RNG states differ per rank (e.g. dropout): keep every rank's
            rng = [None] * info.world_size
            dist.all_gather_object(rng, capture_rng())
        self.saved_step = self.step
        if not info.is_main:
            return None
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "config": to_dict(self.cfg), "num_inputs": self.encoding.num_features,
                 "num_outputs": self.num_outputs, "encoding": self.encoding.to_state(), "fold": self.fold,
                 "step": self.step, "epoch": self.epoch,
                 "position": self.position, "progress": asdict(progress), "history": self.history,
                 "best": self.best, "stale": self.stale, "finished": self.finished, "rng": rng,
                 "metrics": self.history[-1] if self.history else {}}
        directory = self.run_dir / "checkpoints"
        path = save_atomic(state, step_path(directory, self.step))
        link_latest(path, directory / "last.pt")
        if best:
            link_latest(path, directory / "best.pt")
        prune(directory, cfg.keep_last)
        seconds = time.perf_counter() - start
        self.checkpoint_s += seconds
        self.saves.append(seconds)
        return path

    def _preempted(self, where: str) -> Preempted:
        """Log where SIGTERM stopped the run (its checkpoint is written) and build the exception."""
        path = self._checkpoint_path("last.pt")
        self.log.info(f"SIGTERM: stopped {where}; " + (f"checkpoint {path}. Run the same command again to resume."
                                                        if path else "checkpoint.save=false: nothing saved."))
        return Preempted(path)

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM. Every rank asks at the same steps, so they stop together."""
        flag = torch.tensor([1.0 if self.stop.signal is not None else 0.0])
        return bool(all_reduce_sum(flag, self.info)[0] > 0)

    # -- training -------------------------------------------------------------------------------

    def train_step(self, *batches: Batch) -> torch.Tensor:
        """One optimizer step over one or more global batches' shares (gradient accumulation).

        Returns the detached local loss *sum* over all of them, on the device (reading it would
        wait for the device; the caller reads it only when it logs).
        """
        cfg, info = self.cfg, self.info
        # Loss normalisation. N = global count of the whole accumulated batch (sequences, or real
        # tokens for tag), known to every rank from the global batch plan; S_r = this rank's loss
        # sum over its shares; W = world size. DDP averages gradients over ranks:
        #     g = (1/W) * sum_r grad(L_r)
        # so with L_r = W * S_r / N:
        #     g = grad(sum_r S_r / N) = grad(mean loss over the whole accumulated global batch),
        # the same for any split and any W. (A mean of per-rank means is not.)
        scale = info.world_size / sum(objective.global_count(self.task, b) for b in batches)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=info.device)
        for k, batch in enumerate(batches):
            # Gradients are all-reduced only after the last micro-batch of the step.
            sync = k == len(batches) - 1 or not info.distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(info.device, cfg.training.amp):
                    outputs = self.model(batch.inputs, batch.model_lengths)
                local_sum = objective.loss_sum(self.task, outputs, batch)
                self.scaler.scale(local_sum * scale).backward()
            total += local_sum.detach().double()
        if cfg.training.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.training.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return total

    def _step_groups(self, start: int) -> list[list[Step]]:
        """This rank's steps from global batch ``start`` on, grouped by ``training.grad_accum``."""
        steps, accum = list(self.sampler.iter_from(start)), self.cfg.training.grad_accum
        return [steps[i:i + accum] for i in range(0, len(steps), accum)]

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train epoch ``epoch`` from ``self.position`` to its end; raises :class:`Preempted` on SIGTERM."""
        cfg, info, log = self.cfg, self.info, self.log
        self.model.train()
        self.sampler.set_epoch(epoch)
        num_batches, start_position = len(self.sampler), self.position
        groups = self._step_groups(start_position)
        done = -(-start_position // cfg.training.grad_accum)  # groups finished before this segment
        total_groups = done + len(groups)
        log.start_progress(len(groups), f"epoch {epoch + 1}/{cfg.training.epochs}")
        # Since the last flush: the local loss sum (on the device) and the global count.
        window_loss, window_count = torch.zeros(1, dtype=torch.float64, device=info.device), 0
        # [real tokens, padded tokens computed by each rank ...] of this segment (filler steps included).
        tokens = torch.zeros(1 + info.world_size, dtype=torch.float64)
        step_times: list[float] = []
        self.checkpoint_s = 0.0
        check_every = cfg.checkpoint.signal_check_steps if info.distributed else 1
        start = last = time.perf_counter()
        logged = 0  # steps already shown on the progress bar
        # Throughput of the logging window: global sequences, and the token counters at its start.
        window_seqs, tokens_at_log = 0, tokens.clone()

        def flush() -> float:
            """All-reduce the loss window into the epoch totals; returns the window's mean loss."""
            nonlocal window_count
            loss_sum = float(all_reduce_sum(window_loss, info)[0])
            mean = loss_sum / max(window_count, 1)
            self.progress.loss_sum += loss_sum
            self.progress.count += window_count
            window_loss.zero_()
            window_count = 0
            return mean

        for i, group in enumerate(groups):
            step_start = time.perf_counter()
            batches = [self.collate(self.train_data, step).to(info.device) for step in group]
            local = self.train_step(*batches)
            step_times.append(time.perf_counter() - step_start)
            self.step += 1
            self.position = min(num_batches, self.position + len(group))
            window_loss += local
            window_count += sum(objective.global_count(self.task, b) for b in batches)
            window_seqs += sum(b.global_count for b in batches)
            tokens[0] += sum(b.real_tokens for b in batches)
            tokens[1 + info.rank] += sum(b.padded_tokens for b in batches)
            last_group = i + 1 == len(groups)
            # Every rank evaluates these conditions identically, so the collectives below line up.
            if (i + 1) % cfg.training.log_every == 0 or last_group:
                train_loss = flush()
                since_log = tokens - tokens_at_log
                real, padded = all_reduce_sum(torch.stack([since_log[0], since_log[1:].sum()]), info).tolist()
                now = time.perf_counter()
                seconds = max(now - last, 1e-9)
                lr = self.optimizer.param_groups[0]["lr"]
                log.record({"kind": "train", "epoch": epoch + 1, "step": self.step, "train_loss": train_loss,
                            "lr": lr, "elapsed_s": self.progress.seconds + now - start,
                            "grad_norm": None if self.last_grad_norm is None else float(self.last_grad_norm),
                            "seq_per_s": window_seqs / seconds, "tokens_per_s": real / seconds,
                            "padding_efficiency": real / max(padded, 1)})
                window_seqs, tokens_at_log = 0, tokens.clone()
                log.progress(i + 1 - logged, f"loss {train_loss:.4f}, {real / seconds:,.0f} tok/s",
                             f"epoch {epoch + 1} step {done + i + 1}/{total_groups} loss {train_loss:.4f} "
                             f"lr {lr:.2e} ({now - last:.1f}s)")
                logged, last = i + 1, now
            if last_group:
                break  # the epoch-end checkpoint follows evaluation
            every = cfg.checkpoint.every_steps
            if every and self.step % every == 0:
                flush()
                self._save(self._progress_now(tokens, start)[0])
            if (i + 1) % check_every == 0 and self._stop_requested():
                flush()
                if self.saved_step != self.step:
                    self._save(self._progress_now(tokens, start)[0])
                log.end_progress()
                raise self._preempted(f"at epoch {epoch + 1}, step {self.step}")
        log.end_progress()
        totals, padded_per_rank = self._progress_now(tokens, start)
        times = np.sort(np.asarray(step_times)) if step_times else np.zeros(1)
        return {"epoch": epoch + 1, "train_loss": totals.loss_sum / max(totals.count, 1),
                "train_s": totals.seconds, "seq_per_s": len(self.train_data) / totals.seconds,
                "tokens_per_s": totals.real_tokens / totals.seconds,
                "padding_efficiency": totals.real_tokens / max(totals.padded_tokens, 1),
                "real_tokens": int(totals.real_tokens), "padded_tokens_per_rank": padded_per_rank,
                "straggler_ratio": straggler_ratio(self.sampler.batches(), self.train_data.lengths, info.world_size),
                "step_s_p50": float(np.percentile(times, 50)), "step_s_p90": float(np.percentile(times, 90)),
                "step_s_max": float(times[-1]), "checkpoint_s": self.checkpoint_s,
                "peak_rss_mb": per_rank(peak_rss_mb(), info)}

    # -- the job --------------------------------------------------------------------------------

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        metric = self.cfg.training.monitor.removeprefix("val_")
        better = value > self.best["value"] if objective.HIGHER_IS_BETTER[metric] else value < self.best["value"]
        return better

    def _end_epoch(self, epoch: int) -> Path | None:
        """Evaluate, record, decide best and early stopping, checkpoint; returns the checkpoint path."""
        cfg, log, monitor = self.cfg, self.log, self.cfg.training.monitor
        row = self.train_epoch(epoch)
        # ddp: the unwrapped module (no gradients to synchronise); dp: the DataParallel wrapper,
        # so evaluation is split over the GPUs like training.
        val = evaluate(self.model if self.mode == "dp" else self.module, self.val_data, cfg, self.info)
        metrics = {f"val_{k}": v for k, v in val.items()}
        row.update(metrics)
        self.history.append(row)
        log.record({"kind": "epoch", "step": self.step, **row})
        log.info(f"epoch {epoch + 1}/{cfg.training.epochs}  train_loss {row['train_loss']:.4f}  "
                 + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                 + f"  {row['tokens_per_s']:,.0f} tok/s  padding eff {row['padding_efficiency']:.3f}"
                 f"  straggler {row['straggler_ratio']:.3f}  {row['train_s']:.1f}s")
        improved = self._improved(metrics[monitor])
        if improved:
            best_path = self._checkpoint_path("best.pt")
            self.best = {"epoch": epoch + 1, "value": metrics[monitor], "metrics": metrics,
                         "path": str(best_path) if best_path else None}
            self.stale = 0
        else:
            self.stale += 1
        patience = cfg.training.patience
        stopping = bool(patience and self.stale >= patience)
        self.epoch, self.position, self.progress = epoch + 1, 0, EpochProgress()
        self.finished = stopping or self.epoch >= cfg.training.epochs
        path = self._save(self.progress, best=improved)
        if stopping:
            log.info(f"early stopping: {monitor} did not improve for {patience} epoch(s)")
        return path

    def fit(self) -> dict[str, Any]:
        """Train from where the run stands to the configured epochs; return the summary."""
        log, monitor = self.log, self.cfg.training.monitor
        params = sum(p.numel() for p in self.module.parameters())
        log.info(f"training {self.task} on {len(self.train_data)} sequences ({int(self.train_data.lengths.sum()):,} "
                 f"steps), {params:,} parameters, mode {self.mode}, world size {self.info.world_size}, "
                 f"device {self.info.device}, {torch.get_num_threads()} thread(s) per rank, {self.total_steps} steps")
        for line in describe(self.splits, self.task):
            log.info(line)
        if self.finished:
            log.info("this run has already finished; nothing to train")
        job_start = time.perf_counter()
        with self.stop:
            while not self.finished:
                self._end_epoch(self.epoch)
                if not self.finished and self._stop_requested():
                    raise self._preempted(f"after epoch {self.epoch}, step {self.step}")
        wall = time.perf_counter() - job_start
        last = self._checkpoint_path("last.pt")
        summary = {"best_epoch": self.best["epoch"], f"best_{monitor}": self.best["value"],
                   "best_checkpoint": self.best["path"], "last_checkpoint": str(last) if last else None,
                   "wall_s": wall, "checkpoints": len(self.saves), "checkpoint_s": sum(self.saves),
                   "tokens_per_s": sum(r["tokens_per_s"] for r in self.history) / len(self.history),
                   "seq_per_s": sum(r["seq_per_s"] for r in self.history) / len(self.history)}
        log.record({"kind": "summary", **summary})
        # The same table and lines as `ddp-seq report` prints from metrics.jsonl later.
        log.info("\n" + format_table(self.history, table_columns(self.task)))
        log.info("\n".join(summary_lines(summary, monitor)))
        return {**summary, "best_metrics": self.best["metrics"]}  # every val metric at the best epoch (k-fold)
