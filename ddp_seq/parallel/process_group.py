"""Torchrun's environment, read once into :class:`DistInfo`, and the process-group lifecycle."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ddp_seq.config import DistributedConfig
from ddp_seq.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job. Built once; never re-read from the environment."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only process with side effects (printing, files, checkpoints)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _pick_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise UserError("distributed.backend: nccl needs CUDA GPUs; none is visible (use auto or gloo)")
    return requested


def rank_device(local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` (modulo the visible GPUs) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup(cfg: DistributedConfig) -> DistInfo:
    """Read torchrun's variables, pick device and backend, set threads, join the process group."""
    # oneDNN (CPU) caches the primitives of every distinct LSTM/GRU input shape, 1024 by default, each
    # holding memory that grows with its shape; variable-length shares bring new (batch, time) shapes
    # every epoch, and peak RSS grew every epoch (default job: 1,068 -> 1,710 MB in 5 epochs). oneDNN
    # reads the capacity once, at its first primitive, so it is set here, before any, unless the user
    # set it. Measured with 8: flat (541 MB), 0.98x tokens/s on 2 ranks (0.92x on one process),
    # bit-identical losses (docs/batching.md "Memory").
    capacity_vars = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")  # oneDNN reads both
    if cfg.onednn_cache_capacity > 0 and not any(os.environ.get(name) for name in capacity_vars):
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(cfg.onednn_cache_capacity)
    rank = env_int("RANK", 0)
    world_size = env_int("WORLD_SIZE", 1)
    local_rank = env_int("LOCAL_RANK", 0)
    local_world_size = env_int("LOCAL_WORLD_SIZE", world_size)
    backend = _pick_backend(cfg.backend) if world_size > 1 else None

    device = rank_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # Ranks on one machine share its cores; oversubscribing them makes every rank slower
    # than running fewer threads each (2 cores, 2 ranks -> 1 thread per rank).
    threads = cfg.threads_per_rank or max(1, usable_cores() // max(1, local_world_size))
    torch.set_num_threads(threads)
    # Denormals (|x| < 1.2e-38) appear in LSTM gates and Adam's moments early in training and make
    # CPU kernels several times slower per operation; flushing them to zero changes no result
    # that matters. Measured: the first ~40 steps of the default job ran 1.6x faster per token.
    torch.set_flush_denormal(cfg.flush_denormal)

    if backend is not None:
        kwargs: dict = {"device_id": device} if backend == "nccl" else {}
        store = _restart_scoped_store(cfg.timeout_s, world_size)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.timeout_s), **kwargs)
    return DistInfo(rank, local_rank, world_size, local_world_size, device, backend)


def _restart_scoped_store(timeout_s: int, world_size: int) -> dist.Store | None:
    """The agent's store, with keys scoped to this restart, when torchrun shares its store.

    torchrun's c10d rendezvous hands its own TCPStore to the workers and does not separate one
    restart's keys from the next (pytorch/pytorch#135712): after ``--max-restarts`` restarts a
    group, a rank can read the previous attempt's gloo/NCCL addresses and fail with "Connection
    refused". Prefixing the keys with the restart count (the same on every rank of a restart)
    keeps attempts apart. None outside torchrun, or when torchrun does not share its store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], env_int("MASTER_PORT", 29500), world_size,
                          is_master=False, timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"ddp_seq/restart-{env_int('TORCHELASTIC_RESTART_COUNT', 0)}", store)


def teardown() -> None:
    """Destroy the process group if one exists (safe to call twice, and after errors)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(cfg: DistributedConfig | None = None) -> Iterator[DistInfo]:
    """``with distributed(cfg) as info:`` -- the process group lives exactly as long as the block.

    Reads torchrun's variables (one process without them), picks the device (``cuda:LOCAL_RANK``
    or the CPU) and the backend (NCCL or gloo), sets threads per rank; ``cfg`` default
    ``DistributedConfig()``."""
    info = setup(cfg or DistributedConfig())
    try:
        yield info
        # Ranks reach the end at different times; a barrier lines them up before the group is
        # destroyed, so none tears down while a peer still talks to it. Skipped after an error:
        # a peer may be gone. (The gloo abort at interpreter exit is handled by exit_worker.)
        if info.distributed:
            dist.barrier()
    finally:
        teardown()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over all ranks (identity for a single process). Returns a new CPU float64 tensor."""
    # copy=True: all_reduce works in place, and the caller's tensor must keep its local values
    # (the epoch's token counters are reduced at every checkpoint and again at the epoch end).
    out = values.detach().to(torch.float64, copy=True)
    if info.distributed:
        # NCCL reduces device tensors only; gloo takes CPU tensors.
        out = out.to(info.device)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def per_rank(value: float | list[float], info: DistInfo) -> list:
    """``value`` of every rank, in rank order: a number per rank, or a list per rank when ``value``
    is a list of the same length on every rank (one-hot rows all-reduced: no gather needed)."""
    mine = torch.as_tensor(value, dtype=torch.float64)
    slots = torch.zeros(info.world_size, *mine.shape, dtype=torch.float64)
    slots[info.rank] = mine
    return all_reduce_sum(slots, info).tolist()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=info.device if info.backend == "nccl" else None)
    return box[0]


def first_error(error: str, info: DistInfo) -> str:
    """The first non-empty error message over the ranks (by rank), the same on every rank."""
    if not info.distributed:
        return error
    errors: list = [None] * info.world_size
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e), "")


def exit_worker(code: int) -> None:
    """End a torchrun worker right away, once its process group is destroyed and its files closed.

    With torch 2.13 + gloo, interpreter finalisation of a worker sometimes aborts (SIGABRT,
    "terminate called without an active exception": a C++ thread still joinable at static
    destruction), about 1 run in 12 on a loaded 2-core machine, turning a finished run into a failed
    one. Nothing is left to do at that point, so skip finalisation. Single processes exit normally.
    """
    if env_int("WORLD_SIZE", 1) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def on_rank0(info: DistInfo, decide):
    """``decide()`` on rank 0 -- a decision about files, which one process makes -- and its result
    on every rank; a :class:`UserError` it raises is raised on every rank alike."""
    result, error = None, ""
    if info.is_main:
        try:
            result = decide()
        except UserError as e:
            error = str(e)
    result, error = broadcast_object((result, error), info)
    if error:
        raise UserError(error)
    return result


def refuse_ungrouped(who: str) -> None:
    """Refuse to go on as one process where torchrun started several (``WORLD_SIZE`` > 1) but no
    process group is initialised: each rank would train alone on all the data, silently.

    Raises:
        UserError: naming ``who`` and what to do.
    """
    world_size = env_int("WORLD_SIZE", 1)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise UserError(f"{who}: torchrun started {world_size} processes (WORLD_SIZE={world_size}) but no process "
                        "group is initialized, so each rank would train alone on all the data; build it inside "
                        "`with ddp_seq.distributed(cfg.distributed) as info:` (or call "
                        "torch.distributed.init_process_group first)")


def current_info() -> DistInfo:
    """:class:`DistInfo` of a process group the caller already started (``dist.init_process_group``),
    or of one process when there is none: the device is ``cuda:LOCAL_RANK`` with GPUs, else the CPU."""
    grouped = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    local_rank = env_int("LOCAL_RANK", 0) if grouped else 0
    local_world_size = env_int("LOCAL_WORLD_SIZE", world_size) if grouped else 1
    return DistInfo(rank, local_rank, world_size, local_world_size, rank_device(local_rank),
                    dist.get_backend() if grouped else None)
