"""The backward pass of one optimizer step, with the loss normalised so that the gradients are
those of the mean loss over the whole global batch on any world size (the equation is in
:func:`backward_global_mean`)."""

from __future__ import annotations

import contextlib

import torch

from ddp_seq.parallel.process_group import DistInfo, all_reduce_sum
from ddp_seq.train.amp import autocast
from ddp_seq.train.objective import Objective
from ddp_seq.train.steptime import StepTimer


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
