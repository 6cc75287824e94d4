"""The classic ``nn.DataParallel`` recipe for variable-length sequences, next to the same model
trained with ddp_seq's sampler + collate + ``PackedLSTM`` under DDP.

    torchrun --standalone --nproc_per_node=2 examples/dataparallel_vs_ddp.py   # DP on rank 0, then DDP on 2 ranks
    python examples/dataparallel_vs_ddp.py                                      # both in one process
    python examples/dataparallel_vs_ddp.py --tiny                               # a few seconds (the tests)

Same data (own_model.py's noisy sines), same initial weights, same batch size, optimizer and epochs.

DataParallel is one process that splits every batch along dim 0 over the visible GPUs, runs a replica
of the module on each chunk in threads and concatenates the outputs. Hence the recipe: sort and pad
the whole batch, pass the lengths as a tensor (split with the inputs; a list would reach every replica
whole) and pack *inside* ``forward`` (a PackedSequence handed to DataParallel is split field by field
into nonsense), then unpack to the whole batch's length so the replicas' outputs line up.

DDP is one process per rank; ddp_seq gives each rank its own share of every global batch, which it
pads (and packs) itself -- nothing is split after the fact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from own_model import NoisySines, make_datasets  # the sibling example's Dataset: plain torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence
from torch.utils.data import DataLoader

from ddp_seq import BucketBatchSampler, PackedLSTM, ShareDataset, collate

SEED, BATCH_SIZE, LR, HIDDEN = 0, 32, 0.01, 32
SIZES = {"full": {"num_train": 3000, "num_val": 600, "epochs": 4},
         "tiny": {"num_train": 256, "num_val": 128, "epochs": 1}}


# -- 1. The classic DataParallel recipe ------------------------------------------------------------

def sort_pad_collate(items):
    """Sort longest first (``pack_padded_sequence``'s default ``enforce_sorted=True`` wants it, and
    every chunk of a sorted batch is sorted too), pad, and return the lengths as a 1-D tensor."""
    items = sorted(items, key=lambda item: len(item[0]), reverse=True)
    sequences = [x for x, _ in items]
    lengths = torch.tensor([len(x) for x in sequences])
    return pad_sequence(sequences, batch_first=True), lengths, torch.tensor([y for _, y in items])


class ClassicLSTM(nn.Module):
    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.rnn = nn.LSTM(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, NoisySines.num_outputs)

    def forward(self, padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # Each replica packs its own chunk; packing wants the lengths on the CPU.
        packed = pack_padded_sequence(padded, lengths.cpu(), batch_first=True)
        out, _ = self.rnn(packed)
        # total_length: the replica's output keeps the *whole* batch's T, not its chunk's longest,
        # so DataParallel can concatenate the replicas' outputs (it matters whenever per-step
        # outputs leave forward; here they are pooled to the last valid step right away).
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=padded.shape[1])
        last = out[torch.arange(len(lengths), device=out.device), lengths.to(out.device) - 1]
        return self.head(last)


def train_dataparallel(model: nn.Module, train, val, epochs: int) -> tuple[float, float]:
    """DataParallel over every visible GPU (none: it just calls the module). Returns (val accuracy, padding eff)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dp = nn.DataParallel(model.to(device))
    if not dp.device_ids:
        print("DataParallel: no GPU visible, so nn.DataParallel just calls the module on the CPU (nothing is "
              "split); the recipe runs all the same", flush=True)
    optimizer = torch.optim.Adam(dp.parameters(), lr=LR)
    loader = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, collate_fn=sort_pad_collate,
                        generator=torch.Generator().manual_seed(SEED))
    real = padded_tokens = 0
    for _ in range(epochs):
        for padded, lengths, targets in loader:
            # One process sees the whole batch: the plain mean is the global batch's mean.
            loss = F.cross_entropy(dp(padded, lengths), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            real, padded_tokens = real + int(lengths.sum()), padded_tokens + padded.shape[0] * padded.shape[1]
    correct = 0
    dp.eval()
    with torch.no_grad():
        for padded, lengths, targets in DataLoader(val, batch_size=128, collate_fn=sort_pad_collate):
            correct += int((dp(padded, lengths).argmax(-1).cpu() == targets).sum())
    return correct / len(val), real / padded_tokens


# -- 2. The same model with ddp_seq under DDP ------------------------------------------------------

class PackedModel(nn.Module):
    """ClassicLSTM's layers and parameter names, with PackedLSTM doing the (un)packing."""

    def __init__(self, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.rnn = PackedLSTM(1, hidden)
        self.head = nn.Linear(hidden, NoisySines.num_outputs)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, last = self.rnn(inputs, lengths)  # each sequence's state at its own last step
        return self.head(last)


def train_ddp(model: nn.Module, train, val, epochs: int, world_size: int, rank: int,
              device: torch.device) -> tuple[float, float]:
    """DDP with ddp_seq's sampler and collate (own_loop.py shows every detail): (val accuracy, padding eff)."""
    model = model.to(device)
    ddp = DDP(model, device_ids=[device] if device.type == "cuda" else None) if world_size > 1 else model
    optimizer = torch.optim.Adam(ddp.parameters(), lr=LR)

    def loader(data, batch_size, shuffle):
        sampler = BucketBatchSampler(data, batch_size, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=SEED)
        return DataLoader(ShareDataset(data), batch_sampler=sampler, collate_fn=collate)

    train_loader, tokens = loader(train, BATCH_SIZE, True), torch.zeros(2, dtype=torch.float64)
    for epoch in range(epochs):
        train_loader.batch_sampler.set_epoch(epoch)
        for batch in train_loader:
            batch = batch.to(device)
            per_sample = F.cross_entropy(ddp(batch.inputs, batch.lengths), batch.targets, reduction="none")
            # Sum over this rank's samples x W / N: DDP's average over ranks makes it the global batch's mean.
            loss = (per_sample * batch.weights).sum() * world_size / batch.global_count
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tokens += torch.tensor([batch.real_tokens, batch.padded_tokens], dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.float64)  # [correct, samples] of this rank, all-reduced below
    model.eval()
    with torch.no_grad():
        for batch in loader(val, 128, False):
            batch = batch.to(device)
            hits = (model(batch.inputs, batch.lengths).argmax(-1) == batch.targets).double()
            counts += torch.stack([(hits * batch.weights).sum().cpu(), batch.weights.double().sum().cpu()])
    totals = torch.cat([counts, tokens])
    if world_size > 1:  # NCCL reduces device tensors only; gloo takes CPU ones
        totals = totals.to(device)
        dist.all_reduce(totals)
    correct, samples, real, padded = totals.tolist()
    return correct / samples, real / padded


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description="nn.DataParallel's recipe next to ddp_seq under DDP")
    parser.add_argument("--tiny", action="store_true", help="a few hundred sequences, 1 epoch (for tests)")
    size = SIZES["tiny" if parser.parse_args(argv).tiny else "full"]

    # One thread per process: this model's matrices are too small for a second thread to pay off, and
    # on a shared machine (others' jobs on the cores) OpenMP threads waiting on each other made a
    # one-process run 10-15x slower. torchrun already sets OMP_NUM_THREADS=1 for its workers.
    torch.set_num_threads(1)
    world_size, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world_size > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")

    train, val = make_datasets(seed=SEED, num_train=size["num_train"], num_val=size["num_val"])
    torch.manual_seed(SEED)
    classic = ClassicLSTM()
    packed = PackedModel()
    packed.load_state_dict(classic.state_dict())  # the same initial weights on both sides

    if rank == 0:  # DataParallel is a single-process recipe: rank 0 runs it, the other ranks wait
        start = time.perf_counter()
        dp_accuracy, dp_padding = train_dataparallel(classic, train, val, size["epochs"])
        print(f"nn.DataParallel    1 process   val_accuracy {dp_accuracy:.4f}  padding efficiency "
              f"{dp_padding:.3f}  {time.perf_counter() - start:.1f}s", flush=True)
    if world_size > 1:
        dist.barrier()

    start = time.perf_counter()
    accuracy, padding = train_ddp(packed, train, val, size["epochs"], world_size, rank, device)
    if rank == 0:
        print(f"ddp_seq + DDP      {world_size} rank(s)   val_accuracy {accuracy:.4f}  padding efficiency "
              f"{padding:.3f}  {time.perf_counter() - start:.1f}s", flush=True)
        print(f"val_accuracy {accuracy:.4f}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()
        # Skip interpreter finalisation: torch 2.13 + gloo sometimes aborts there (see own_loop.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return accuracy


if __name__ == "__main__":
    main()
