"""The benchmark's "user model": the default network written as a user would, outside ddp_seq's
``SeqModel``, on the public :class:`~ddp_seq.nn.rnn.PackedLSTM` -- trained through ``model.target``,
so the row measures what the library path costs against the built-in one.

Linear input layer -> ``PackedLSTM`` -> the last valid step's state -> linear head: the same
layers, sizes and order as ``SeqModel`` with the default model config (classify, pooling last).
"""

from __future__ import annotations

import torch
from torch import nn

from ddp_seq.nn.rnn import PackedLSTM


class UserLSTM(nn.Module):
    """``forward(inputs [B, T, F] float32, lengths [B] int64) -> logits [B, num_outputs]``."""

    def __init__(self, num_inputs: int, num_outputs: int, embedding_dim: int = 64, hidden: int = 128,
                 layers: int = 2) -> None:
        super().__init__()
        self.input_layer = nn.Linear(num_inputs, embedding_dim)
        self.rnn = PackedLSTM(embedding_dim, hidden, num_layers=layers)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, last = self.rnn(self.input_layer(inputs), lengths)  # last: [B, H] at each sequence's own end
        return self.head(last)
