"""A plain PyTorch DDP loop that borrows four pieces of ddp_seq and nothing else:
``BucketBatchSampler``, ``ShareDataset``, ``collate`` and ``PackedLSTM``.

    torchrun --standalone --nproc_per_node=2 examples/own_loop.py     # 2 ranks (gloo on CPU)
    python examples/own_loop.py                                        # one process, no process group
    python examples/own_loop.py --tiny                                 # a few seconds (the tests)

The data is own_model.py's ``NoisySines`` (a plain torch Dataset: which of three frequencies a noisy
sine has, 5 to 60 steps). Everything else -- process group, DDP, optimizer, loss, evaluation -- is
written out here, so you can see what each borrowed piece is for:

- ``BucketBatchSampler`` draws the epoch's *global* batches of similar lengths from (seed, epoch)
  alone and gives this rank its share of each: every rank runs the same number of steps.
- ``ShareDataset`` + ``collate`` pad only this rank's share, and tell the loss how many sequences
  the whole global batch has (``batch.global_count``) without any communication.
- ``PackedLSTM`` is an ``nn.LSTM`` that takes ``(padded, lengths)`` and returns outputs and each
  sequence's last state, exactly as packing would.

``--grad-out FILE`` writes the first step's (all-reduced) gradients and the samples each rank
trained on to FILE; tests/test_user_examples.py checks them against one process that takes the
same step on the whole global batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from own_model import NoisySines, make_datasets  # the sibling example's Dataset: plain torch, no ddp_seq
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ddp_seq import BucketBatchSampler, PackedLSTM, ShareDataset, collate

SEED = 0
BATCH_SIZE = 32  # sequences per *global* batch, over all ranks
EVAL_BATCH_SIZE = 128
LR = 0.01
SIZES = {"full": {"num_train": 3000, "num_val": 600, "epochs": 5},
         "tiny": {"num_train": 256, "num_val": 128, "epochs": 1}}


class LastStateLSTM(nn.Module):
    """A PackedLSTM's state at each sequence's own last step, then a linear head: ``[B, classes]``."""

    def __init__(self, num_inputs: int, num_outputs: int, hidden: int = 32) -> None:
        super().__init__()
        self.rnn = PackedLSTM(num_inputs, hidden)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, last = self.rnn(inputs, lengths)
        return self.head(last)


def build_model(seed: int = SEED) -> LastStateLSTM:
    """The model with the initial weights of ``seed`` (every rank builds the same ones)."""
    torch.manual_seed(seed)
    return LastStateLSTM(1, NoisySines.num_outputs)


def make_loader(dataset, batch_size: int, world_size: int, rank: int, shuffle: bool) -> DataLoader:
    """This rank's loader: shares of length-bucketed global batches (``shuffle=False``: sorted, for evaluation)."""
    sampler = BucketBatchSampler(dataset, batch_size, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=SEED)
    # ShareDataset hands collate the sampler's Share, so the Batch knows the global batch's count.
    return DataLoader(ShareDataset(dataset), batch_sampler=sampler, collate_fn=collate)


def step_loss(model: nn.Module, batch, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(the loss to backpropagate, the unscaled loss sum over this rank's samples)``.

    N = ``batch.global_count``, the sequences of the whole global batch over all ranks; S_r = this
    rank's sum of per-sample losses (a filler sample -- a rank whose share of a tiny global batch
    would be empty -- has weight 0); W = the world size. DDP *averages* the gradients over ranks:

        g = (1/W) * sum_r grad(L_r)

    so with L_r = S_r * W / N:

        g = (1/W) * sum_r grad(S_r) * W / N = grad(sum_r S_r / N) = grad(mean loss over the global batch)

    -- exactly the gradient of one process on the whole global batch, however the batch is split.
    (A per-rank mean, DDP's usual recipe, weights each sample by 1 / (W * n_r) instead: wrong as soon as
    the shares differ in size, which they do -- shares are cut to equal padded *tokens*, not sequences.)
    """
    logits = model(batch.inputs, batch.lengths)
    local_sum = (F.cross_entropy(logits, batch.targets, reduction="none") * batch.weights).sum()
    return local_sum * world_size / batch.global_count, local_sum.detach()


def all_reduce(values: list[float], world_size: int) -> torch.Tensor:
    """Sum a few numbers over the ranks (float64 on the CPU, as gloo wants)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, world_size: int) -> float:
    """Accuracy over every validation sample exactly once: each rank counts its shares' real samples
    (filler samples weigh 0), the sums and counts are all-reduced, then divided once."""
    model.eval()
    correct = count = 0.0
    for batch in loader:
        hits = (model(batch.inputs, batch.lengths).argmax(-1) == batch.targets).double()
        correct += float((hits * batch.weights).sum())
        count += float(batch.weights.sum())
    model.train()
    correct_all, count_all = all_reduce([correct, count], world_size).tolist()
    return correct_all / count_all


def save_first_step(path: str, model: nn.Module, batch, rank: int, world_size: int) -> None:
    """Rank 0 writes the all-reduced gradients (the same on every rank after DDP's backward) and the
    dataset indices of every rank's share of the first global batch."""
    shares = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(shares, batch.indices[batch.weights > 0].tolist())
    else:
        shares = [batch.indices.tolist()]
    if rank == 0:
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        torch.save({"grads": grads, "shares": shares, "global_count": batch.global_count}, path)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description="a plain DDP loop over ddp_seq's sampler, collate and PackedLSTM")
    parser.add_argument("--tiny", action="store_true", help="a few hundred sequences, 1 epoch (for tests)")
    parser.add_argument("--grad-out", metavar="FILE", help="write the first step's gradients to FILE")
    args = parser.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "full"]

    # One thread per process: this model's matrices are too small for a second thread to pay off, and
    # on a shared machine (others' jobs on the cores) OpenMP threads waiting on each other made a
    # one-process run 10-15x slower. torchrun already sets OMP_NUM_THREADS=1 for its workers.
    torch.set_num_threads(1)
    # torchrun sets WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT; without it this is one process.
    # CPU only, to keep it short; on GPUs: "nccl", DDP(model, device_ids=[device]), batch.to(device),
    # and all_reduce on device tensors (dataparallel_vs_ddp.py does it).
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world_size > 1 else 0

    train, val = make_datasets(seed=SEED, num_train=size["num_train"], num_val=size["num_val"])
    model = build_model()
    ddp_model = DDP(model) if world_size > 1 else model  # DDP also broadcasts rank 0's weights
    optimizer = torch.optim.Adam(ddp_model.parameters(), lr=LR)
    train_loader = make_loader(train, BATCH_SIZE, world_size, rank, shuffle=True)
    val_loader = make_loader(val, EVAL_BATCH_SIZE, world_size, rank, shuffle=False)
    if rank == 0:
        print(f"world size {world_size}: {len(train)} training sequences, {len(train_loader)} steps per epoch "
              f"on every rank, {torch.get_num_threads()} thread(s) per rank", flush=True)

    accuracy = 0.0
    for epoch in range(size["epochs"]):
        start = time.perf_counter()
        train_loader.batch_sampler.set_epoch(epoch)  # a new plan of global batches each epoch
        loss_sum = 0.0
        for step, batch in enumerate(train_loader):
            loss, local_sum = step_loss(ddp_model, batch, world_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            if args.grad_out and epoch == 0 and step == 0:
                save_first_step(args.grad_out, model, batch, rank, world_size)
            optimizer.step()
            loss_sum += float(local_sum)
        train_loss = float(all_reduce([loss_sum], world_size)[0]) / len(train)
        accuracy = evaluate(model, val_loader, world_size)  # the unwrapped module: no gradient sync needed
        if rank == 0:
            print(f"epoch {epoch + 1}/{size['epochs']}  train_loss {train_loss:.4f}  val_accuracy {accuracy:.4f}  "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    if rank == 0:
        print(f"val_accuracy {accuracy:.4f}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()
        # torch 2.13 + gloo: interpreter finalisation of a worker sometimes aborts (SIGABRT from a
        # C++ thread still joinable at exit), turning a finished run into a failed one. Nothing is
        # left to do, so skip it (ddp_seq.parallel.process_group.exit_worker does the same).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return accuracy


if __name__ == "__main__":
    main()
