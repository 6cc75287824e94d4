"""PackedLSTM / PackedGRU: ``nn.LSTM`` / ``nn.GRU`` over a padded batch and its lengths, exactly.

Each is a subclass of the torch module it is named after: the same constructor (but ``batch_first``
defaults to True) and the same parameters and ``state_dict``, so weights move freely between them
and plain ``nn.LSTM``/``nn.GRU``. ``forward(padded, lengths)`` returns every step's output (zeros at
padded steps) and each sequence's state at its own last valid step, by one of two exact paths:

- ``packed``: ``torch.nn.utils.rnn.pack_padded_sequence(..., enforce_sorted=False)``, the RNN, then
  ``pad_packed_sequence(..., total_length=T)`` -- torch's own recipe for variable-length batches.
  Lengths go to the CPU, as packing requires, whatever the batch's device.
- ``padded``: the RNN runs on the padded tensor, which on CPU uses one fused kernel instead of
  stepping through time with shrinking batches (3-7x faster on 2 cores; pytorch/pytorch#149194).
  Exact because padding comes *after* each sequence: a forward direction never sees padding before
  a valid step (a step's output depends only on the steps before it). A backward direction would,
  so it runs on each sequence reversed within its own length and its outputs are reversed back,
  layer by layer, with the very parameters of the bidirectional module. Outputs at padded steps
  are junk computed from the padding, and are replaced by zeros.

``auto`` picks ``padded`` on CPU (measured faster there) and ``packed`` on CUDA (cuDNN's packed
kernels), at each call, from the input's device.

Both paths serve ``nn.DataParallel``: the lengths are a tensor (DataParallel splits it along dim 0
with the inputs), each replica's chunk of it is moved where it is needed, and the output keeps the
whole batch's time dimension ``T = padded.shape[1]`` whatever the longest sequence of the chunk, so
DataParallel can gather the replicas' outputs.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

#: The two execution paths; ``auto`` (accepted by the modules) resolves to one of them per call.
EXECUTIONS = ("packed", "padded")
# torch.compiler.is_exporting is missing from older torch (setup.cfg allows torch >= 2.1): never exporting there.
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


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


class _PackedMixin:
    """The shared ``forward`` of :class:`PackedLSTM` and :class:`PackedGRU`; comes first in their MRO."""

    _cell: type[nn.RNNBase]
    # set by nn.RNNBase.__init__
    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    dropout: float
    bidirectional: bool
    proj_size: int
    training: bool

    def _setup(self, execution: str) -> None:
        if execution not in (*EXECUTIONS, "auto"):
            raise ValueError(f"execution must be one of {(*EXECUTIONS, 'auto')}, got {execution!r}")
        self.execution = execution
        self.directions = 2 if self.bidirectional else 1
        self._templates: tuple[nn.RNNBase, ...] = ()
        if self.bidirectional:
            # Single-direction, single-layer templates run by functional_call with one direction's
            # parameters of this module. Kept in a tuple so they are not submodules: they own no
            # state (not in state_dict, not moved by .to()); only their structure is used. On the
            # meta device they take no memory and draw nothing from torch's RNG, so a seed gives the
            # same initial weights to whatever is built after this module.
            extra = {"proj_size": self.proj_size} if self.proj_size else {}
            out_size = self.directions * (self.proj_size or self.hidden_size)
            self._templates = tuple(
                self._cell(size, self.hidden_size, bias=self.bias, batch_first=True, device="meta", **extra)
                for size in (self.input_size, out_size)[:min(self.num_layers, 2)])

    def forward(self, padded: torch.Tensor,
                lengths: torch.Tensor | list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Run on a padded batch.

        Args:
            padded: ``[B, T, input_size]`` floating point (the module's dtype), padded after each
                sequence's end. The padding is never read into a valid step's output; keep it finite
                (on the padded path a NaN there would reach the gradients through ``0 * NaN``).
                ``B`` may be 0 (empty outputs, on both paths).
            lengths: ``[B]`` valid lengths in ``[1, T]``, whatever ``pack_padded_sequence`` accepts:
                a tensor on any device (moved to the CPU for packing, to ``padded``'s device for the
                padded path), a list of ints or a NumPy array.

        Returns:
            ``(output, last)``: ``output`` ``[B, T, D*H_out]`` every step's top-layer output (both
            directions concatenated, forward first; zeros at padded steps), ``T`` always
            ``padded.shape[1]``; ``last`` ``[B, D*H_out]`` the top layer's state at each sequence's
            own last valid step: the forward direction's at step ``length - 1``, the backward
            direction's at step 0. ``D`` is 2 if bidirectional else 1, ``H_out`` is ``proj_size``
            if set else ``hidden_size``; both on ``padded``'s device and dtype.

            Per-layer ``h_n``/``c_n`` are not returned: the fused padded path runs past each
            sequence's end, so its final states belong to the padding, not to the sequences.

        Raises:
            ValueError: ``padded`` is not 3-D, ``lengths`` is not ``[B]``, or (checked only when
                ``lengths`` is on the CPU, to spare a device sync) a length is outside ``[1, T]``.
        """
        if padded.dim() != 3:
            raise ValueError(f"padded must be [B, T, input_size], got shape {tuple(padded.shape)}")
        if not isinstance(lengths, torch.Tensor):  # a list or an array, as pack_padded_sequence takes
            lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64).reshape(-1) if len(lengths) else [],
                                      dtype=torch.int64)
        if lengths.shape != padded.shape[:1]:
            raise ValueError(f"lengths must be [B] = [{padded.shape[0]}], got shape {tuple(lengths.shape)}")
        total_length = padded.shape[1]
        if padded.shape[0] == 0:  # packing refuses an empty batch; the padded path needs no special case
            width = self.directions * (self.proj_size or self.hidden_size)
            return padded.new_zeros(0, total_length, width), padded.new_zeros(0, width)
        # Not while exporting (ddp-seq export): a check on the lengths' values cannot be traced.
        if lengths.device.type == "cpu" and lengths.numel() and not _is_exporting():
            low, high = int(lengths.min()), int(lengths.max())
            if low < 1 or high > total_length:
                raise ValueError(f"lengths must lie in [1, {total_length}], got min {low}, max {high}")
        if resolve_execution(self.execution, padded.device) == "padded":
            return self._run_padded(padded, lengths.to(padded.device, torch.int64))
        return self._run_packed(padded, lengths, total_length)

    def _run_packed(self, x: torch.Tensor, lengths: torch.Tensor,
                    total_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, state = super().forward(packed)  # type: ignore[misc]
        # total_length keeps the time dimension equal to the input's, whatever the longest.
        out, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=total_length)
        # h_n holds each sequence's state at its own last valid step (the backward direction's
        # final state is at step 0), already restored to the input order.
        h_n = state[0] if isinstance(state, tuple) else state
        return out, torch.cat(list(h_n[-self.directions:]), dim=-1)

    def _run_padded(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as :meth:`_run_packed`, on the padded tensor (``lengths`` on ``x``'s device)."""
        rows = torch.arange(x.shape[0], device=x.device)
        valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[..., None]
        if self.directions == 1:
            out, _ = super().forward(x)  # type: ignore[misc]
            return out.masked_fill(~valid, 0.0), out[rows, lengths - 1]
        reverse = reverse_within_lengths(lengths, x.shape[1])
        layer_in = x
        for layer in range(self.num_layers):
            forward_out = self._one_direction(layer_in, layer, "")
            backward_out = _gather_time(self._one_direction(_gather_time(layer_in, reverse), layer, "_reverse"),
                                        reverse)
            layer_in = torch.cat([forward_out, backward_out], dim=-1)
            # nn.LSTM/nn.GRU's dropout: on each layer's output but the last's, in training only.
            if layer + 1 < self.num_layers and self.dropout > 0:
                layer_in = F.dropout(layer_in, self.dropout, self.training)
        last = torch.cat([forward_out[rows, lengths - 1], backward_out[:, 0]], dim=-1)
        return layer_in.masked_fill(~valid, 0.0), last

    def _one_direction(self, x: torch.Tensor, layer: int, suffix: str) -> torch.Tensor:
        template = self._templates[min(layer, 1)]
        params = {name: getattr(self, f"{name[:-len('_l0')]}_l{layer}{suffix}")
                  for name in template._flat_weights_names}
        with _TEMPLATE_LOCK:
            return functional_call(template, params, (x,))[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, execution={self.execution!r}"  # type: ignore[misc]


def _check_layout(batch_first: bool) -> None:
    if not batch_first:
        raise ValueError("batch_first=False is not supported: inputs are padded [B, T, F] batches")


class PackedLSTM(_PackedMixin, nn.LSTM):
    """``nn.LSTM`` whose ``forward(padded, lengths)`` handles variable lengths exactly (see the module doc).

    Args:
        input_size, hidden_size, num_layers, bias, dropout, bidirectional, proj_size, device, dtype:
            as for ``nn.LSTM``; the parameters and ``state_dict`` keys are ``nn.LSTM``'s
            (``weight_ih_l0``, ``weight_hh_l0_reverse``, ...), so ``state_dict``s load either way.
        batch_first: must be True (the default here, unlike ``nn.LSTM``).
        execution: ``packed``, ``padded`` or ``auto`` (``padded`` on CPU, ``packed`` on CUDA,
            decided at each call from the input's device).

    Raises:
        ValueError: ``batch_first=False`` or an unknown ``execution``; ``nn.LSTM``'s own errors.
    """

    _cell = nn.LSTM

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 *, execution: str = "auto") -> None:
        _check_layout(batch_first)
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=True, dropout=dropout,
                         bidirectional=bidirectional, proj_size=proj_size, device=device, dtype=dtype)
        self._setup(execution)


class PackedGRU(_PackedMixin, nn.GRU):
    """``nn.GRU`` whose ``forward(padded, lengths)`` handles variable lengths exactly (see the module doc).

    Args:
        input_size, hidden_size, num_layers, bias, dropout, bidirectional, device, dtype: as for
            ``nn.GRU``; the parameters and ``state_dict`` keys are ``nn.GRU``'s.
        batch_first: must be True (the default here, unlike ``nn.GRU``).
        execution: ``packed``, ``padded`` or ``auto`` (``padded`` on CPU, ``packed`` on CUDA,
            decided at each call from the input's device).

    Raises:
        ValueError: ``batch_first=False`` or an unknown ``execution``; ``nn.GRU``'s own errors.
    """

    _cell = nn.GRU

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = True, dropout: float = 0.0, bidirectional: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 *, execution: str = "auto") -> None:
        _check_layout(batch_first)
        super().__init__(input_size, hidden_size, num_layers, bias=bias, batch_first=True, dropout=dropout,
                         bidirectional=bidirectional, device=device, dtype=dtype)
        self._setup(execution)
