"""A new user's own parts, off the config's paved road: a token Dataset of their own, an LSTM model
of their own (not SeqModel), their own loop with ddp_seq's sampler, the library Trainer
(tests/test_off_road.py).

``torchrun --nproc_per_node=2 tests/workers/off_road.py OUT_DIR`` runs every scenario in one launch,
in order, and each rank writes ``OUT_DIR/rank<R>.json``: what happened in each (a result, or the
error's text). The first scenarios run before any process group exists; the rest inside one.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddp_seq import BucketBatchSampler, PackedLSTM, ShareDataset, Trainer, collate, load_config
from ddp_seq.parallel.process_group import current_info, exit_worker

CLASSES = 6
VOCAB = 50
OVERRIDES = ["batching.batch_size=32", "batching.eval_batch_size=64", "training.epochs=2", "training.lr=0.02",
             "training.warmup_steps=2", "training.log_every=5", "training.seed=1", "checkpoint.every_steps=4",
             "logging.progress=none", "distributed.backend=gloo"]


class Reviews(Dataset):
    """Token sequences (median ~18 ids, a few up to ~120) of 6 classes; the class sets the id range
    most tokens come from. No ``lengths`` attribute: ddp_seq reads the lengths from the items."""

    def __init__(self, n: int, seed: int, bad_label_at: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            label = int(rng.integers(CLASSES))
            length = int(min(120, max(1, rng.lognormal(np.log(18), 0.6))))
            ids = rng.integers(1, VOCAB, size=length)
            hits = rng.random(length) < 0.5
            ids[hits] = 1 + label * 8 + rng.integers(0, 8, size=int(hits.sum()))
            self.items.append((torch.from_numpy(ids.astype(np.int64)), CLASSES if i == bad_label_at else label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def make_data():
    """``data.target``: (train, val) -- 257 validation items, so the last evaluation batch is short."""
    return Reviews(400, 0), Reviews(257, 1)


class AsDicts(Dataset):
    def __init__(self, base) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        tokens, label = self.base[i]
        return {"input_ids": tokens, "label": label}


class StringLabels(AsDicts):
    def __getitem__(self, i: int):
        tokens, label = self.base[i]
        return tokens, ["neg", "pos", "mixed", "spam", "ham", "eggs"][label]


class ReviewModel(nn.Module):
    """Embedding -> PackedLSTM -> the state at each sequence's last step -> linear head."""

    def __init__(self, vocab_size: int, num_outputs: int, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 12, padding_idx=0)
        self.rnn = PackedLSTM(12, hidden)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, inputs, lengths):
        _, last = self.rnn(self.embed(inputs), lengths)  # [B, hidden]
        return self.head(last)


class TupleModel(ReviewModel):
    def forward(self, inputs, lengths):
        return super().forward(inputs, lengths), lengths


def model(num_outputs: int = CLASSES, cls=ReviewModel) -> nn.Module:
    torch.manual_seed(0)
    return cls(VOCAB, num_outputs)


def error_of(fn) -> str:
    """The text of what ``fn()`` raised ('' when it returned)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the test reads which error, and that it is one line
        return f"{type(e).__name__}: {e}"
    return ""


def files_of(directory: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file below ``directory``: a refused start must change none."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def own_loop(train, share: bool, workers: int = 0) -> list[int]:
    """The global counts of the first epoch's batches through a plain DataLoader over the sampler."""
    sampler = BucketBatchSampler(train, batch_size=32, seed=0)
    loader = DataLoader(ShareDataset(train) if share else train, batch_sampler=sampler, collate_fn=collate,
                        num_workers=workers)
    return [batch.global_count for batch in loader]


def evaluated_samples(val) -> float:
    """Samples counted by an evaluation through the sampler (fillers weigh 0), over all ranks."""
    sampler = BucketBatchSampler(val, batch_size=64, shuffle=False)
    loader = DataLoader(ShareDataset(val), batch_sampler=sampler, collate_fn=collate)
    total = torch.tensor([sum(float(b.weights.sum()) for b in loader)], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def main(out: Path) -> dict:
    train, val = make_data()
    cfg = load_config(overrides=OVERRIDES)
    runs = out / "runs"
    results: dict = {}
    # -- before any process group: the Trainer refuses to let each rank train alone ------------------
    results["no_group"] = error_of(lambda: Trainer(model(), train, val, cfg, objective="classify",
                                                   run_dir=runs / "alone"))
    results["no_group_dir_made"] = (runs / "alone").exists()
    dist.init_process_group("gloo")
    info = current_info()
    # -- the user's own loop -----------------------------------------------------------------------
    results["loop_without_share"] = error_of(lambda: own_loop(train, share=False))
    results["loop_without_share_workers"] = error_of(lambda: own_loop(train, share=False, workers=1))
    results["loop_with_share"] = own_loop(train, share=True)
    results["evaluated_samples"] = evaluated_samples(val)

    # -- the library Trainer and its run directory ---------------------------------------------------
    def fit(**kwargs) -> dict:
        summary = Trainer(model(), train, val, cfg, objective="classify", info=info, **kwargs).fit()
        return {"best_epoch": summary["best_epoch"], "best": summary["best_val_accuracy"]}

    run = runs / "mine"
    results["first"] = fit(run_dir=run)
    dist.barrier()  # rank 0 may still be writing the first run's last records
    before = files_of(run)
    results["again"] = error_of(lambda: fit(run_dir=run))
    dist.barrier()
    results["again_changed"] = files_of(run) != before
    results["last_without_more_epochs"] = fit(run_dir=run, resume_from="last")  # finished: trains nothing
    more = load_config(overrides=[*OVERRIDES, "training.epochs=3"])
    results["resumed"] = {"best_epoch": Trainer(model(), train, val, more, objective="classify", info=info,
                                                run_dir=run, resume_from="last").fit()["best_epoch"]}
    results["overwritten"] = fit(run_dir=run, overwrite=True)
    results["both"] = error_of(lambda: fit(run_dir=run, overwrite=True, resume_from="last"))

    # -- the contract, before the first step and before any file ---------------------------------------
    def refused(name: str, *parts) -> str:
        text = error_of(lambda: Trainer(*parts, cfg, objective="classify", info=info, run_dir=runs / name))
        dist.barrier()
        results[f"{name}_dir_made"] = (runs / name).exists()
        return text

    results["dict_items"] = refused("dicts", model(), AsDicts(train), val)
    results["string_labels"] = refused("strings", model(), StringLabels(train), val)
    results["label_out_of_range"] = refused("range", model(), train, Reviews(257, 1, bad_label_at=200))
    results["tuple_output"] = refused("tuple", model(cls=TupleModel), train, val)
    return results


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    try:
        found = main(out_dir)
        code = 0
    except Exception:  # noqa: BLE001 -- the test shows it
        found, code = {"crash": traceback.format_exc()}, 1
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(found, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    exit_worker(code)

