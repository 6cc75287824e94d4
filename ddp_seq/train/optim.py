"""The optimizer and the LR schedule of ``training.*``: Adam / AdamW / SGD, linear warmup then cosine decay."""

from __future__ import annotations

import math

import torch

from ddp_seq.config import Config


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
