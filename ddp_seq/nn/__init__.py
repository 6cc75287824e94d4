"""Recurrent layers (``PackedLSTM``, ``PackedGRU``) and the built-in ``SeqModel``: plain PyTorch
modules, no config (see README.md)."""
