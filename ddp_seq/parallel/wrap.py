"""How ``training.mode`` wraps the model: DDP (``ddp``), ``nn.DataParallel`` (``dp``) or nothing (``single``).

``dp`` is the legacy single-process mode, kept for comparison: one process drives every visible
GPU, and DataParallel splits each global batch along dim 0 across them (its scatter), runs one
replica of the module per GPU in threads, and concatenates the outputs on the first GPU (its
gather). :class:`SplitReplicas` computes the same thing on one device, for the parity check and
the tests on machines without several GPUs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_seq.parallel.process_group import DistInfo


def wrap_model(module: nn.Module, mode: str, info: DistInfo, log: Any,
               find_unused_parameters: bool = False) -> nn.Module:
    """The module the trainer calls for ``training.mode``; ``module`` itself stays the unwrapped one.
    ``find_unused_parameters``: DDP's, for parameters that some steps give no gradient.

    ``dp`` logs once (through ``log.info``: rank 0's logger, and dp has only rank 0) how many GPUs
    DataParallel splits over -- on a machine without GPUs DataParallel only calls the module.
    """
    if mode == "dp":
        wrapped = nn.DataParallel(module)  # every visible GPU; the module is already on the first
        gpus = len(wrapped.device_ids)
        if gpus == 0:
            log.info("training.mode=dp: no GPU is visible, so nn.DataParallel only calls the module on the CPU "
                     "(nothing is split); the dp data path runs all the same (the whole global batch sorted by "
                     "length, its lengths as a tensor that travels with it)")
        else:
            log.info(f"training.mode=dp: nn.DataParallel over {gpus} GPU(s) {wrapped.device_ids}; each global batch "
                     f"is split along dim 0 and the outputs are gathered on cuda:{wrapped.output_device}")
        return wrapped
    if mode == "ddp" and info.distributed:
        return DDP(module, device_ids=[info.device] if info.device.type == "cuda" else None,
                   find_unused_parameters=find_unused_parameters)
    return module


class SplitReplicas(nn.Module):
    """What ``nn.DataParallel`` computes over ``chunks`` devices, on one device.

    DataParallel's scatter cuts every tensor argument with ``tensor.chunk(n, dim=0)`` (what
    ``torch.cuda.comm.scatter`` does without chunk sizes), each replica -- a copy of the module
    sharing its parameters -- runs on one chunk, and the gather concatenates the outputs along
    dim 0; the backward pass sums the replicas' gradients into the module's parameters. Here the
    replicas are the module itself, called once per chunk, which gives the same sums.
    """

    def __init__(self, module: nn.Module, chunks: int) -> None:
        super().__init__()
        self.module, self.chunks = module, chunks

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        pieces = zip(*(t.chunk(self.chunks, dim=0) for t in inputs))  # fewer than `chunks` for tiny batches
        return torch.cat([self.module(*piece) for piece in pieces], dim=0)
