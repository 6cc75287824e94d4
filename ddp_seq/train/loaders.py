"""The samplers and DataLoaders of a training job, from the config: training batches shuffled
from (seed, epoch), evaluation batches length-sorted, each rank given its own shares."""

from __future__ import annotations

from torch.utils.data import DataLoader

from ddp_seq.config import Config
from ddp_seq.data.collate import collate_for
from ddp_seq.data.loader import build_loader
from ddp_seq.data.sampler import BucketBatchSampler
from ddp_seq.parallel.process_group import DistInfo


def make_sampler(data, cfg: Config, info: DistInfo, train: bool) -> BucketBatchSampler:
    """Training: the configured strategy, shuffled from (seed, epoch). Evaluation: length-sorted.

    ``data``: a lengths array or a dataset (see :func:`~ddp_seq.data.sampler.lengths_of`).
    """
    b = cfg.batching
    return BucketBatchSampler(data, batch_size=b.batch_size if train else b.eval_batch_size,
                              max_tokens=b.max_tokens if train else 0, num_replicas=info.world_size,
                              rank=info.rank, shuffle=train, seed=cfg.training.seed, strategy=b.strategy,
                              pool=b.pool, padding_noise=b.padding_noise)


def make_loader(data, sampler: BucketBatchSampler, cfg: Config) -> DataLoader:
    """The DataLoader of ``data`` over ``sampler``'s shares with the collate of ``training.mode`` and
    the ``data.num_workers`` / ``prefetch_factor`` / ``persistent_workers`` settings."""
    d = cfg.data
    return build_loader(data, sampler, collate_for(cfg.training.mode), num_workers=d.num_workers,
                        persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor)
