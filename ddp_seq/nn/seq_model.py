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

from ddp_seq.nn.rnn import EXECUTIONS, PackedGRU, PackedLSTM, resolve_execution, reverse_within_lengths

__all__ = ["CELLS", "EXECUTIONS", "POOLINGS", "TASKS", "SeqModel", "resolve_execution", "reverse_within_lengths"]

TASKS = ("classify", "regress", "tag")
CELLS = ("lstm", "gru")
POOLINGS = ("last", "mean", "max")


class SeqModel(nn.Module):
    """A recurrent sequence model for classify (one label per sequence), regress (one value per
    sequence) and tag (one label per time step): input layer -> :class:`PackedLSTM` /
    :class:`PackedGRU` -> dropout -> linear head.

    Args:
        task: ``classify``, ``regress`` or ``tag``.
        num_inputs: feature channels per step; ignored when ``vocab_size`` > 0.
        num_outputs: classes (classify, tag) or 1 (regress).
        vocab_size: > 0 when the inputs are token ids (an Embedding, row 0 for padding, replaces the
            input Linear).
        embedding_dim: width of the input layer.
        hidden: hidden units per direction.
        layers: stacked recurrent layers.
        cell: ``lstm`` or ``gru``.
        bidirectional: run a second RNN over each sequence backwards.
        dropout: between recurrent layers (when ``layers`` > 1) and before the head.
        pooling: classify/regress: ``last`` (each sequence's own last valid state), ``mean`` or
            ``max`` over its valid steps.
        execution: ``packed`` or ``padded`` (see the module doc); resolve ``auto`` first
            (:func:`resolve_execution`).

    Raises:
        ValueError: an unknown ``task``, ``cell``, ``pooling`` or ``execution``.
    """

    def __init__(self, task: str, num_inputs: int, num_outputs: int, *, vocab_size: int = 0,
                 embedding_dim: int = 64, hidden: int = 128, layers: int = 2, cell: str = "lstm",
                 bidirectional: bool = False, dropout: float = 0.0, pooling: str = "last",
                 execution: str = "packed"):
        super().__init__()
        for name, value, allowed in (("task", task, TASKS), ("cell", cell, CELLS), ("pooling", pooling, POOLINGS),
                                     ("execution", execution, EXECUTIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.task, self.pooling, self.execution = task, pooling, execution
        if vocab_size > 0:
            self.input_layer: nn.Module = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        else:
            self.input_layer = nn.Linear(num_inputs, embedding_dim)
        rnn_cls = {"lstm": PackedLSTM, "gru": PackedGRU}[cell]
        self.rnn: PackedLSTM | PackedGRU = rnn_cls(
            embedding_dim, hidden, num_layers=layers, bidirectional=bidirectional,
            dropout=dropout if layers > 1 else 0.0, execution=execution)
        self.directions = 2 if bidirectional else 1
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden * self.directions, num_outputs)

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

