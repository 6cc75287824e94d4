"""SeqModel: input layer -> LSTM/GRU over the packed batch -> task head.

``forward`` packs its own batch. Lengths stay on the CPU (``pack_padded_sequence`` requires it),
so each process -- whatever its device -- packs exactly the sequences it was given.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig

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
    """

    def __init__(self, task: str, num_inputs: int, num_outputs: int, cfg: ModelConfig, vocab_size: int = 0):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.task, self.pooling = task, cfg.pooling
        if vocab_size > 0:
            self.input_layer: nn.Module = nn.Embedding(vocab_size, cfg.embedding_dim, padding_idx=0)
        else:
            self.input_layer = nn.Linear(num_inputs, cfg.embedding_dim)
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cfg.cell]
        self.rnn = rnn_cls(cfg.embedding_dim, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                           bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.directions = 2 if cfg.bidirectional else 1
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden * self.directions, num_outputs)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run on a padded batch.

        Args:
            inputs: ``[B, T, F]`` features or ``[B, T]`` token ids, padded after each sequence's end.
            lengths: ``[B]`` int64 valid lengths (moved to the CPU here if needed).

        Returns:
            classify ``[B, C]`` logits; regress ``[B]``; tag ``[B, T, C]`` logits (zeros' logits at
            padded steps -- mask them out).
        """
        total_length = inputs.shape[1]
        x = self.input_layer(inputs)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, state = self.rnn(packed)
        if self.task == "tag":
            # total_length keeps the time dimension equal to the input's, whatever the longest.
            out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=total_length)
            return self.head(self.dropout(out))
        if self.pooling == "last":
            # h_n holds each sequence's state at its own last valid step (the backward direction's
            # final state is at step 0), already restored to the input order.
            h_n = state[0] if isinstance(state, tuple) else state
            pooled = torch.cat(list(h_n[-self.directions:]), dim=-1)
        else:
            out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=total_length)
            valid = (torch.arange(total_length, device=out.device)[None, :]
                     < lengths.to(out.device)[:, None]).unsqueeze(-1)
            if self.pooling == "mean":
                pooled = (out * valid).sum(1) / lengths.to(out.device, out.dtype)[:, None]
            else:
                pooled = out.masked_fill(~valid, float("-inf")).amax(1)
        y = self.head(self.dropout(pooled))
        return y.squeeze(-1) if self.task == "regress" else y


def build_model(task: str, num_inputs: int, num_outputs: int, cfg: ModelConfig, vocab_size: int = 0) -> SeqModel:
    """Construct a :class:`SeqModel` (the initial weights follow torch's global seed)."""
    return SeqModel(task, num_inputs, num_outputs, cfg, vocab_size)
