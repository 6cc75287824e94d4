"""SeqModel: input layer -> LSTM/GRU over each rank's own batch -> task head.

Two execution paths give the same outputs and gradients:

- ``packed``: ``forward`` packs its own batch (``pack_padded_sequence``, ``enforce_sorted=False``).
  Lengths stay on the CPU, as packing requires, whatever the batch's device.
- ``padded``: the RNN runs on the padded tensor, which on CPU uses one fused kernel instead of
  stepping through time with shrinking batches (3-7x faster on 2 cores; pytorch/pytorch#149194).
  Exact because padding comes *after* each sequence: a forward direction never sees padding before
  a valid step. A backward direction would, so it runs on each sequence reversed within its own
  length and its outputs are reversed back, layer by layer, with the very parameters of the
  bidirectional ``nn.LSTM``/``nn.GRU`` (checkpoints are interchangeable between paths).

Both paths also serve the legacy ``training.mode=dp``: ``forward`` takes the lengths as a tensor
(DataParallel splits it along dim 0 with the inputs), moves each replica's chunk of it where it is
needed, and returns the whole batch's time dimension ``T = inputs.shape[1]`` whatever the longest
sequence of the chunk, so DataParallel can gather ``tag`` outputs of the replicas.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .config import ModelConfig

TASKS = ("classify", "regress", "tag")
EXECUTIONS = ("packed", "padded")


def resolve_execution(execution: str, device: torch.device) -> str:
    """``auto`` -> ``padded`` on CPU (measured faster there), ``packed`` on CUDA (cuDNN's packed kernels)."""
    if execution != "auto":
        return execution
    return "packed" if device.type == "cuda" else "padded"


def reverse_within_lengths(lengths: torch.Tensor, total_length: int) -> torch.Tensor:
    """``[B, T]`` time indices that reverse each row's first ``length`` steps and keep its padding.

    Applying the gather twice is the identity, so the same index reverses outputs back.
    """
    steps = torch.arange(total_length, device=lengths.device)[None, :]
    lengths = lengths[:, None]
    return torch.where(steps < lengths, lengths - 1 - steps, steps)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


# functional_call swaps parameters into the template module for the duration of the call, and
# DataParallel's replicas share the templates (replicate() copies __dict__) while they run in
# threads: without this lock one replica can run with another's weights. On a GPU the lock is held
# while kernels are queued, not while they run, so the replicas still overlap.
_TEMPLATE_LOCK = threading.Lock()


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
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[cfg.cell]
        self.rnn = rnn_cls(cfg.embedding_dim, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                           bidirectional=cfg.bidirectional, dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.directions = 2 if cfg.bidirectional else 1
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden * self.directions, num_outputs)
        if cfg.bidirectional:
            # Single-direction, single-layer templates run by functional_call with one direction's
            # parameters of self.rnn. Kept in a tuple so they are not submodules: they own no state.
            self._templates = tuple(rnn_cls(size, cfg.hidden, batch_first=True)
                                    for size in (cfg.embedding_dim, 2 * cfg.hidden))

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
        x = self.input_layer(inputs)
        if self.execution == "padded":
            out, last = self._run_padded(x, lengths.to(x.device))
        else:
            out, last = self._run_packed(x, lengths, total_length)
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

    def _run_packed(self, x: torch.Tensor, lengths: torch.Tensor, total_length: int):
        """``(outputs [B, T, D*H], state after each sequence's last valid step [B, D*H])``."""
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, state = self.rnn(packed)
        # total_length keeps the time dimension equal to the input's, whatever the longest.
        out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=total_length)
        # h_n holds each sequence's state at its own last valid step (the backward direction's
        # final state is at step 0), already restored to the input order.
        h_n = state[0] if isinstance(state, tuple) else state
        return out, torch.cat(list(h_n[-self.directions:]), dim=-1)

    def _run_padded(self, x: torch.Tensor, lengths: torch.Tensor):
        """The same as :meth:`_run_packed`, on the padded tensor (outputs past a length are junk)."""
        rows = torch.arange(x.shape[0], device=x.device)
        if self.directions == 1:
            out, _ = self.rnn(x)
            return out, out[rows, lengths - 1]
        reverse = reverse_within_lengths(lengths, x.shape[1])
        layer_in = x
        for layer in range(self.rnn.num_layers):
            forward_out = self._one_direction(layer_in, layer, "")
            backward_out = _gather_time(self._one_direction(_gather_time(layer_in, reverse), layer, "_reverse"),
                                        reverse)
            layer_in = torch.cat([forward_out, backward_out], dim=-1)
            if layer + 1 < self.rnn.num_layers and self.rnn.dropout > 0:
                layer_in = F.dropout(layer_in, self.rnn.dropout, self.training)
        return layer_in, torch.cat([forward_out[rows, lengths - 1], backward_out[:, 0]], dim=-1)

    def _one_direction(self, x: torch.Tensor, layer: int, suffix: str) -> torch.Tensor:
        template = self._templates[min(layer, 1)]
        params = {f"{name}_l0": getattr(self.rnn, f"{name}_l{layer}{suffix}")
                  for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        with _TEMPLATE_LOCK:
            return functional_call(template, params, (x,))[0]


def build_model(task: str, num_inputs: int, num_outputs: int, cfg: ModelConfig, vocab_size: int = 0,
                device: torch.device | None = None) -> SeqModel:
    """Construct a :class:`SeqModel` for ``device`` (the initial weights follow torch's global seed)."""
    device = device or torch.device("cpu")
    execution = resolve_execution(cfg.execution, device)
    return SeqModel(task, num_inputs, num_outputs, cfg, vocab_size, execution).to(device)
