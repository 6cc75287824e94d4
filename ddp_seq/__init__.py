"""ddp_seq: train LSTM/GRU models on variable-length sequences with torchrun + DDP.

Each rank pads and packs only its own share of every global batch, so nothing is ever
scattered across devices (the root of DataParallel's PackedSequence problem).
"""

__version__ = "0.1.0"
