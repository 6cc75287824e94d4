"""SeqModel: input layer -> LSTM/GRU over each rank's own batch -> task head.

The recurrent layer is :class:`~ddp_seq.nn.rnn.PackedLSTM` / :class:`~ddp_seq.nn.rnn.PackedGRU`, whose two
exact execution paths (``packed``: ``pack_padded_sequence``; ``padded``: the fused kernel on the
padded tensor) give the same outputs and gradients; see :mod:`ddp_seq.nn.rnn`. Their parameters are
those of ``nn.LSTM``/``nn.GRU`` under ``rnn.``, so checkpoints are interchangeable between paths.

Both paths also serve the legacy ``training.mode=dp``: ``forward`` takes the lengths as a tensor
(DataParallel splits it along dim 0 with the inputs), moves each replica's chunk of it where it is
needed, and returns the whole batch's time dimension ``T = inputs.shape[1]`` whatever the longest
sequence of the chunk, so DataParallel can gather ``tag`` outputs of the replicas.
"""

from __future__ import annotations

import torch
from torch import nn

from ddp_seq.config import ModelConfig
from ddp_seq.nn.rnn import EXECUTIONS, PackedGRU, PackedLSTM, resolve_execution, reverse_within_lengths

__all__ = ["EXECUTIONS", "TASKS", "SeqModel", "build_model", "resolve_execution", "reverse_within_lengths"]

TASKS = ("classify", "regress", "tag")


class SeqModel(nn.Module):
    """A recurrent sequence model for classify (one label per sequence), regress (one value per
    sequence) and tag (one label per time step).

    Args:
        task: ``classify``, ``regress`` or ``tag``.
        num_inputs: feature channels per step; ignored when ``vocab_size`` > 0.
        num_outputs: classes (classify, tag) or 1 (regress).
        cfg: the model section of the config.
        vocab_size: > 0 when the inputs are token ids (an Embedding replaces the input Linear).
        execution: ``packed`` or ``padded`` (see the module doc); resolve ``auto`` first.
    """

    def __init__(self, task: str, num_inputs: int, num_outputs: int, cfg: ModelConfig, vocab_size: int = 0,
                 execution: str = "packed"):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        self.task, self.pooling, self.execution = task, cfg.pooling, execution
        if vocab_size > 0:
            self.input_layer: nn.Module = nn.Embedding(vocab_size, cfg.embedding_dim, padding_idx=0)
        else:
            self.input_layer = nn.Linear(num_inputs, cfg.embedding_dim)
        rnn_cls = {"lstm": PackedLSTM, "gru": PackedGRU}[cfg.cell]
        self.rnn: PackedLSTM | PackedGRU = rnn_cls(
            cfg.embedding_dim, cfg.hidden, num_layers=cfg.layers, bidirectional=cfg.bidirectional,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0, execution=execution)
        self.directions = 2 if cfg.bidirectional else 1
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden * self.directions, num_outputs)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run on a padded batch.

        Args:
            inputs: ``[B, T, F]`` features or ``[B, T]`` token ids, padded after each sequence's end.
            lengths: ``[B]`` int64 valid lengths, on any device (moved to the CPU here for packing).

        Returns:
            classify ``[B, C]`` logits; regress ``[B]``; tag ``[B, T, C]`` logits (zeros' logits at
            padded steps -- mask them out).
        """
        total_length = inputs.shape[1]
        out, last = self.rnn(self.input_layer(inputs), lengths)
        if self.task == "tag":
            return self.head(self.dropout(out))
        if self.pooling == "last":
            pooled = last
        else:
            valid = (torch.arange(total_length, device=out.device)[None, :]
                     < lengths.to(out.device)[:, None]).unsqueeze(-1)
            if self.pooling == "mean":
                pooled = (out * valid).sum(1) / lengths.to(out.device, out.dtype)[:, None]
            else:
                pooled = out.masked_fill(~valid, float("-inf")).amax(1)
        y = self.head(self.dropout(pooled))
        return y.squeeze(-1) if self.task == "regress" else y


def build_model(task: str, num_inputs: int, num_outputs: int, cfg: ModelConfig, vocab_size: int = 0,
                device: torch.device | None = None) -> SeqModel:
    """Construct a :class:`SeqModel` for ``device`` (the initial weights follow torch's global seed)."""
    device = device or torch.device("cpu")
    execution = resolve_execution(cfg.execution, device)
    return SeqModel(task, num_inputs, num_outputs, cfg, vocab_size, execution).to(device)
