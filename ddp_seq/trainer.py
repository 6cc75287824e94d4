"""The Trainer: DDP training over per-rank shares of global batches, exact evaluation, checkpoints."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import objective
from .checkpoint import save_atomic
from .config import Config, UserError, to_dict
from .data.batching import ShardedBatchSampler, Step, straggler_ratio
from .data.collate import Batch, collate
from .data.synthetic import SequenceData, make_synthetic, num_outputs
from .dist import DistInfo, all_reduce_sum
from .model import SeqModel, build_model
from .runlog import NullLogger, format_table


def build_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int):
    """Linear warmup to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    warmup, floor = cfg.training.warmup_steps, cfg.training.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(device: torch.device, amp: str):
    """The autocast context for ``training.amp`` (a no-op context for ``none``)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def make_sampler(data: SequenceData, cfg: Config, info: DistInfo, train: bool) -> ShardedBatchSampler:
    """Training: the configured strategy, shuffled from (seed, epoch). Evaluation: length-sorted."""
    b = cfg.batching
    return ShardedBatchSampler(data.lengths, rank=info.rank, world_size=info.world_size,
                               batch_size=b.batch_size if train else b.eval_batch_size,
                               max_tokens=b.max_tokens if train else 0, strategy=b.strategy, pool=b.pool,
                               padding_noise=b.padding_noise, seed=cfg.training.seed, shuffle=train)


@torch.no_grad()
def evaluate(module: SeqModel, data: SequenceData, cfg: Config, info: DistInfo) -> dict[str, float]:
    """Metrics over every sample of ``data`` exactly once, whatever the world size.

    Each rank evaluates its shares of length-sorted global batches (filler samples weigh 0);
    the sums and counts are all-reduced and divided once. Uses the unwrapped module: evaluation
    needs no gradient synchronisation, and ranks may see different numbers of real samples.
    """
    was_training = module.training
    module.eval()
    sums = None
    for step in make_sampler(data, cfg, info, train=False):
        batch = collate(data, step).to(info.device)
        with autocast(info.device, cfg.training.amp):
            outputs = module(batch.inputs, batch.lengths)
        part = objective.metric_sums(cfg.data.task, outputs, batch)  # stays on the device: no sync per batch
        sums = part if sums is None else sums + part
    module.train(was_training)
    return objective.finalize(cfg.data.task, all_reduce_sum(sums, info))


class Trainer:
    """Builds data, model, optimizer and samplers from the config; ``fit()`` runs the job."""

    def __init__(self, cfg: Config, info: DistInfo, logger: NullLogger, run_dir: Path | None) -> None:
        self.cfg, self.info, self.log, self.run_dir = cfg, info, logger, run_dir
        self.task = cfg.data.task
        if cfg.training.amp == "fp16" and info.device.type != "cuda":
            raise UserError("training.amp: fp16 needs a CUDA device; use bf16 or none on CPU")
        self.train_data = make_synthetic(cfg.data, "train")
        self.val_data = make_synthetic(cfg.data, "val")
        if info.world_size > len(self.train_data):
            raise UserError(f"data.num_train: {len(self.train_data)} sequences cannot feed "
                            f"{info.world_size} ranks; use at least one per rank")
        # The same seed on every rank gives identical initial weights; DDP also broadcasts
        # rank 0's parameters when it wraps the module.
        torch.manual_seed(cfg.training.seed)
        self.module = build_model(self.task, self.train_data.num_features, num_outputs(cfg.data), cfg.model,
                                  device=info.device)
        if info.distributed:
            self.model = DDP(self.module, device_ids=[info.device] if info.device.type == "cuda" else None)
        else:
            self.model = self.module
        self.sampler = make_sampler(self.train_data, cfg, info, train=True)
        self.optimizer = build_optimizer(self.model.parameters(), cfg)
        self.total_steps = self._count_steps()
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.training.amp == "fp16")
        self.step = 0
        self.last_grad_norm: torch.Tensor | None = None  # read when logging only
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def _count_steps(self) -> int:
        """Optimizer steps of the whole job (for the LR schedule): global batches summed over epochs."""
        accum, total = self.cfg.training.grad_accum, 0
        for epoch in range(self.cfg.training.epochs):
            self.sampler.set_epoch(epoch)
            total += -(-len(self.sampler) // accum)
        self.sampler.set_epoch(0)
        return total

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
                    outputs = self.model(batch.inputs, batch.lengths)
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

    def _step_groups(self) -> list[list[Step]]:
        """This rank's steps of the epoch, grouped by ``training.grad_accum`` global batches."""
        steps, accum = list(self.sampler), self.cfg.training.grad_accum
        return [steps[i:i + accum] for i in range(0, len(steps), accum)]

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg, info, log = self.cfg, self.info, self.log
        self.model.train()
        self.sampler.set_epoch(epoch)
        groups = self._step_groups()
        log.start_progress(len(groups), f"epoch {epoch + 1}/{cfg.training.epochs}")
        # Since the last log line: the local loss sum (on the device) and the global count.
        window_loss, window_count = torch.zeros(1, dtype=torch.float64, device=info.device), 0
        epoch_loss = epoch_count = 0.0
        # [real tokens, padded tokens computed by each rank ...]: padded includes filler steps.
        tokens = torch.zeros(1 + info.world_size, dtype=torch.float64)
        step_times: list[float] = []
        start = last = time.perf_counter()
        logged = 0  # steps already shown on the progress bar
        for i, group in enumerate(groups):
            step_start = time.perf_counter()
            batches = [collate(self.train_data, step).to(info.device) for step in group]
            local = self.train_step(*batches)
            step_times.append(time.perf_counter() - step_start)
            self.step += 1
            window_loss += local
            window_count += sum(objective.global_count(self.task, b) for b in batches)
            tokens[0] += sum(b.real_tokens for b in batches)
            tokens[1 + info.rank] += sum(b.padded_tokens for b in batches)
            if (i + 1) % cfg.training.log_every == 0 or i + 1 == len(groups):
                # Every rank reaches this line on the same steps, so the all-reduce is safe.
                loss_sum = float(all_reduce_sum(window_loss, info)[0])
                train_loss = loss_sum / max(window_count, 1)
                epoch_loss, epoch_count = epoch_loss + loss_sum, epoch_count + window_count
                now = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                log.record({"kind": "train", "epoch": epoch + 1, "step": self.step, "train_loss": train_loss,
                            "lr": lr, "elapsed_s": now - start,
                            "grad_norm": None if self.last_grad_norm is None else float(self.last_grad_norm)})
                log.progress(i + 1 - logged, f"loss {train_loss:.4f}",
                             f"epoch {epoch + 1} step {i + 1}/{len(groups)} loss {train_loss:.4f} lr {lr:.2e} "
                             f"({now - last:.1f}s)")
                logged = i + 1
                window_loss.zero_()
                window_count = 0
                last = now
        log.end_progress()
        seconds = time.perf_counter() - start
        tokens = all_reduce_sum(tokens, info)
        per_rank = [int(t) for t in tokens[1:]]
        times = np.sort(np.asarray(step_times))
        return {"epoch": epoch + 1, "train_loss": epoch_loss / max(epoch_count, 1),
                "train_s": seconds, "seq_per_s": len(self.train_data) / seconds,
                "tokens_per_s": float(tokens[0]) / seconds,
                "padding_efficiency": float(tokens[0]) / max(sum(per_rank), 1),
                "padded_tokens_per_rank": per_rank,
                "straggler_ratio": straggler_ratio(self.sampler.batches(), self.train_data.lengths, info.world_size),
                "step_s_p50": float(np.percentile(times, 50)), "step_s_p90": float(np.percentile(times, 90)),
                "step_s_max": float(times[-1])}

    # -- the job --------------------------------------------------------------------------------

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        metric = self.cfg.training.monitor.removeprefix("val_")
        better = value > self.best["value"] if objective.HIGHER_IS_BETTER[metric] else value < self.best["value"]
        return better

    def _checkpoint_state(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "config": to_dict(self.cfg), "epoch": epoch, "step": self.step, "metrics": metrics,
                "num_inputs": self.train_data.num_features}

    def _save(self, name: str, epoch: int, metrics: dict[str, float]) -> Path | None:
        """Rank 0 writes ``checkpoints/<name>.pt`` atomically; other ranks return None."""
        if not (self.info.is_main and self.cfg.checkpoint.save and self.run_dir is not None):
            return None
        return save_atomic(self._checkpoint_state(epoch, metrics), self.run_dir / "checkpoints" / f"{name}.pt")

    def fit(self) -> dict[str, Any]:
        """Train for the configured epochs with evaluation after each; return the summary."""
        cfg, log = self.cfg, self.log
        monitor, patience = cfg.training.monitor, cfg.training.patience
        params = sum(p.numel() for p in self.module.parameters())
        log.info(f"training {self.task} on {len(self.train_data)} sequences ({int(self.train_data.lengths.sum()):,} "
                 f"steps), {params:,} parameters, world size {self.info.world_size}, device {self.info.device}, "
                 f"{torch.get_num_threads()} thread(s) per rank, {self.total_steps} steps")
        job_start, stale = time.perf_counter(), 0
        for epoch in range(cfg.training.epochs):
            row = self.train_epoch(epoch)
            val = evaluate(self.module, self.val_data, cfg, self.info)
            row.update({f"val_{k}": v for k, v in val.items()})
            self.history.append(row)
            log.record({"kind": "epoch", "step": self.step, **row})
            metrics = {f"val_{k}": v for k, v in val.items()}
            log.info(f"epoch {epoch + 1}/{cfg.training.epochs}  train_loss {row['train_loss']:.4f}  "
                     + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                     + f"  {row['tokens_per_s']:,.0f} tok/s  padding eff {row['padding_efficiency']:.3f}"
                     f"  straggler {row['straggler_ratio']:.3f}  {row['train_s']:.1f}s")
            if self._improved(metrics[monitor]):
                self.best = {"epoch": epoch + 1, "value": metrics[monitor], "metrics": metrics,
                             "path": self._save("best", epoch + 1, metrics)}
                stale = 0
            else:
                stale += 1
            last_path = self._save("last", epoch + 1, metrics)
            if patience and stale >= patience:
                log.info(f"early stopping: {monitor} did not improve for {patience} epoch(s)")
                break
        wall = time.perf_counter() - job_start
        summary = {"best_epoch": self.best["epoch"], f"best_{monitor}": self.best["value"],
                   "best_checkpoint": str(self.best["path"]) if self.best["path"] else None,
                   "last_checkpoint": str(last_path) if last_path else None, "wall_s": wall,
                   "tokens_per_s": sum(r["tokens_per_s"] for r in self.history) / len(self.history),
                   "seq_per_s": sum(r["seq_per_s"] for r in self.history) / len(self.history)}
        log.record({"kind": "summary", **summary})
        columns = ["epoch", "train_loss", *[f"val_{k}" for k in objective.METRICS[self.task]],
                   "seq_per_s", "tokens_per_s", "padding_efficiency", "straggler_ratio", "train_s"]
        log.info("\n" + format_table(self.history, columns))
        log.info(f"best {monitor} {self.best['value']:.4f} at epoch {self.best['epoch']}; "
                 f"{summary['seq_per_s']:,.0f} sequences/s, {summary['tokens_per_s']:,.0f} real tokens/s; "
                 f"wall time {wall:.1f}s")
        if summary["best_checkpoint"]:
            log.info(f"best checkpoint: {summary['best_checkpoint']}\nlast checkpoint: {summary['last_checkpoint']}")
        return summary
