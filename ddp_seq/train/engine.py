"""The pieces a training loop is made of: optimizer, LR schedule, autocast, samplers, exact evaluation."""

from __future__ import annotations

import contextlib
import math

import torch
from torch.utils.data import DataLoader

from ddp_seq.config import Config
from ddp_seq.data.collate import collate_for
from ddp_seq.data.loader import build_loader
from ddp_seq.data.sampler import BucketBatchSampler
from ddp_seq.parallel.process_group import DistInfo, all_reduce_sum
from ddp_seq.train.objective import Objective, TaskObjective
from ddp_seq.train.steptime import StepTimer


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


def native_bf16(device: torch.device) -> str | None:
    """Why ``device`` computes in bf16 natively (e.g. ``"avx512_bf16"``), or None when it does not."""
    if device.type == "cuda":
        return "CUDA bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    checks = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, check in checks:  # torch.cpu's probes of the CPU's instruction sets (private, hence getattr)
        probe = getattr(torch.cpu, check, None)
        if probe is not None and probe():
            return name
    return None


def resolve_amp(amp: str, device: torch.device) -> str:
    """``training.amp`` with ``auto`` decided for ``device``: bf16 where it is native, else none."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "none"


def autocast(device: torch.device, amp: str):
    """The autocast context for ``training.amp`` (a no-op context for ``none``; ``auto`` resolved)."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def backward_global_mean(model: torch.nn.Module, module: torch.nn.Module, objective: Objective, batches,
                         scaler: torch.amp.GradScaler, info: DistInfo, amp: str,
                         timer: StepTimer | None = None) -> tuple[torch.Tensor, float]:
    """Backward over this rank's shares of one or more global batches (gradient accumulation), so
    that after DDP's all-reduce the gradients are those of the mean loss over the whole global batch.

    ``model`` is what the trainer calls (DDP-wrapped, or not), ``module`` the unwrapped one. Returns
    the detached local loss *sum* on the device (reading it would wait for the device) and the
    global count N. ``timer`` (optional) times the forward, backward and sync phases.
    """
    timer = timer or StepTimer(enabled=False)
    # Loss normalisation. N = global count of the whole accumulated batch (sequences, or real
    # tokens for tag); S_r = this rank's loss sum over its shares; W = world size. DDP averages
    # gradients over ranks:
    #     g = (1/W) * sum_r grad(L_r)
    # so with L_r = W * S_r / N:
    #     g = grad(sum_r S_r / N) = grad(mean loss over the whole accumulated global batch),
    # the same for any split and any W. (A mean of per-rank means is not.) The built-in
    # objectives know N from the global batch plan before backward; for a user's loss function
    # N = sum_r n_r is all-reduced after backward and the gradients are scaled by W / N then,
    # which gives the same g (as fairseq scales by its all-reduced sample size).
    known = [objective.global_count(b) for b in batches]
    count = sum(known) if None not in known else None
    scale = info.world_size / count if count is not None else 1.0
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    local_count = torch.zeros((), dtype=torch.float64)
    for k, batch in enumerate(batches):
        # Gradients are all-reduced only after the last micro-batch of the step.
        sync = k == len(batches) - 1 or not info.distributed
        with contextlib.nullcontext() if sync else model.no_sync():
            with autocast(info.device, amp):
                outputs = model(batch.inputs, batch.model_lengths)
            local_sum, n = objective.loss(outputs, batch)
            timer.mark("forward")
            scaler.scale(local_sum * scale).backward()
            timer.backward_done()  # the wait for DDP's all-reduce after the last gradient is "sync"
        total += local_sum.detach().double()
        if count is None:
            local_count += torch.as_tensor(n, dtype=torch.float64).cpu()
    if count is None:
        count = float(all_reduce_sum(local_count, info))
        for param in module.parameters():
            if param.grad is not None:
                param.grad.mul_(info.world_size / max(count, 1e-12))
        timer.mark("sync")
    return total, count


def make_sampler(data, cfg: Config, info: DistInfo, train: bool) -> BucketBatchSampler:
    """Training: the configured strategy, shuffled from (seed, epoch). Evaluation: length-sorted.

    ``data``: a lengths array or a dataset (see :func:`~ddp_seq.data.sampler.lengths_of`).
    """
    b = cfg.batching
    return BucketBatchSampler(data, batch_size=b.batch_size if train else b.eval_batch_size,
                              max_tokens=b.max_tokens if train else 0, num_replicas=info.world_size,
                              rank=info.rank, shuffle=train, seed=cfg.training.seed, strategy=b.strategy,
                              pool=b.pool, padding_noise=b.padding_noise)


def make_loader(data, sampler: BucketBatchSampler, cfg: Config) -> DataLoader:
    """The DataLoader of ``data`` over ``sampler``'s shares with the collate of ``training.mode`` and
    the ``data.num_workers`` / ``prefetch_factor`` / ``persistent_workers`` settings."""
    d = cfg.data
    return build_loader(data, sampler, collate_for(cfg.training.mode), num_workers=d.num_workers,
                        persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor)


@torch.no_grad()
def evaluate(module: torch.nn.Module, data, cfg: Config, info: DistInfo, objective: Objective | None = None,
             loader: DataLoader | None = None) -> dict[str, float | list]:
    """Metrics over every sample of ``data`` exactly once, whatever the world size.

    ``{metric: float}`` for the objective's metrics; the built-in classify and tag objectives add
    per-class lists (``objective.PER_CLASS``: precision, recall, f1, support by class id, and the
    confusion matrix), all from one all-reduce.

    Each rank evaluates its shares of length-sorted global batches (filler samples weigh 0);
    the sums and counts are all-reduced and divided once. Under DDP, pass the unwrapped module:
    evaluation needs no gradient synchronisation, and ranks may see different numbers of real
    samples. In dp mode the DataParallel wrapper may be passed (batches come from ``collate_dp``).
    ``objective``: default the built-in one of ``data.task``; ``loader``: one made by
    :func:`make_loader` over an evaluation sampler (made here when not given).
    """
    objective = objective or TaskObjective(cfg.data.task)
    loader = loader or make_loader(data, make_sampler(data, cfg, info, train=False), cfg)
    amp = resolve_amp(cfg.training.amp, info.device)  # once, not per batch
    was_training = module.training
    module.eval()
    sums = None
    for batch in loader:
        batch = batch.to(info.device)
        with autocast(info.device, amp):
            outputs = module(batch.inputs, batch.model_lengths)
        part = objective.metric_sums(outputs, batch)  # stays on the device: no sync per batch
        sums = part if sums is None else sums + part
    module.train(was_training)
    return objective.finalize(all_reduce_sum(sums, info))
