"""What a config key changed since a checkpoint does when the run resumes: it takes effect, or the
resume is refused naming it -- never a change that is logged but silently overridden by the state
the checkpoint restores (issue 26, row 1; pytorch/examples#816, composer#3154).

The restored state holds values that came from the config: the optimizer's param groups (``lr``,
``weight_decay``, ``momentum``, Adam's ``decoupled_weight_decay`` ...), the scheduler's base LRs,
the grad scaler's enablement, the sampler's plan. ``Optimizer.load_state_dict`` puts the *saved*
ones back, so a plain resume trains on with the old values whatever the config says now.
:func:`reapply` writes the current config's values over them after loading; :func:`refused` names
the keys no resume can honour. :data:`RULES` decides every key of the config tree (a test checks
that none is missing, so a new key cannot be added without deciding).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from ddp_seq.config import Config, to_dict
from ddp_seq.errors import UserError

#: Nothing the checkpoint restores holds the value: the new one is used from the first resumed step.
APPLIES = "applies"
#: The restored optimizer / scheduler holds the old value; :func:`reapply` overwrites it with the new one.
REAPPLIED = "reapplied"
#: It cuts the epoch into other batches: refused mid-epoch (``resume.check_plan``), applies from an epoch end.
EPOCH_END = "epoch end"
#: It shapes the weights: a change that alters a weight's shape is refused (``checkpoint.check_shapes``).
WEIGHTS = "weights"
#: No resume can continue under another value (see :data:`WHY_REFUSED`).
REFUSED = "refused"
#: It chooses which run to resume or where it writes: not a change of the run.
RUN = "run"

_SAMPLED = {"batch_size", "max_tokens", "strategy", "pool", "padding_noise"}
_DATA_APPLIES = {"val_path", "val_fraction", "num_val", "num_workers", "prefetch_factor", "persistent_workers",
                 "folds"}
RULES: dict[str, str] = {
    **{f"data.{k}": (REFUSED if k == "task" else APPLIES if k in _DATA_APPLIES else EPOCH_END)
       for k in ("task", "format", "target", "args", "train_path", "val_path", "val_fraction", "header", "input_column",
                 "target_column", "tokenizer", "min_freq", "max_length", "truncate", "empty", "missing", "folds",
                 "num_train", "num_val", "features", "num_classes", "length_median", "length_sigma",
                 "min_length", "noise", "seed", "num_workers", "prefetch_factor", "persistent_workers")},
    **{f"batching.{k}": EPOCH_END if k in _SAMPLED else APPLIES for k in (*_SAMPLED, "eval_batch_size")},
    **{f"model.{k}": WEIGHTS for k in ("cell", "hidden", "layers", "bidirectional", "embedding_dim", "target", "args")},
    **{f"model.{k}": APPLIES for k in ("dropout", "pooling", "execution")},
    "training.epochs": APPLIES, "training.optimizer": REAPPLIED, "training.lr": REAPPLIED,
    "training.weight_decay": REAPPLIED, "training.momentum": REAPPLIED, "training.warmup_steps": APPLIES,
    "training.min_lr_ratio": APPLIES, "training.grad_accum": APPLIES, "training.mode": APPLIES,
    "training.grad_clip": APPLIES, "training.amp": APPLIES, "training.seed": EPOCH_END,
    "training.monitor": REFUSED, "training.patience": APPLIES, "training.log_every": APPLIES,
    **{f"checkpoint.{k}": APPLIES for k in ("save", "every_steps", "keep_last", "signal_check_steps")},
    "checkpoint.resume": RUN, "logging.root": RUN, "logging.name": RUN,
    **{f"logging.{k}": APPLIES for k in ("progress", "tensorboard")},
    **{f"wandb.{k}": APPLIES for k in ("mode", "project", "entity", "group", "name", "tags", "per_rank",
                                       "init_timeout_s")},
    **{f"distributed.{k}": APPLIES for k in ("backend", "timeout_s", "threads_per_rank", "flush_denormal",
                                             "onednn_cache_capacity", "find_unused_parameters")},
}

#: Why a :data:`REFUSED` key cannot change at a resume.
WHY_REFUSED = {
    "data.task": "the weights and the best-so-far were trained for the other objective",
    "training.monitor": "the best checkpoint and training.patience's count were judged by the old metric",
}


def config_keys(cfg: Config | None = None) -> list[str]:
    """Every ``section.key`` of the config tree, in declaration order."""
    cfg = cfg or Config()
    return [f"{section.name}.{f.name}" for section in fields(cfg) for f in fields(getattr(cfg, section.name))]


def changed_keys(saved: dict[str, dict[str, Any]], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (saved value, current value)}`` of every key whose value differs from the
    checkpoint's config (``saved``, as :func:`~ddp_seq.config.to_dict` wrote it). A key the saved
    config lacks (written by an older ddp_seq) counts as unchanged: its old default is not known."""
    now = to_dict(cfg)
    changed = {}
    for key in config_keys(cfg):
        section, name = key.split(".")
        old = saved.get(section, {})
        if name in old and old[name] != now[section][name]:
            changed[key] = (old[name], now[section][name])
    return changed


def _optimizer_kind(optimizer_state: dict[str, Any]) -> str:
    """What kind of per-parameter state the saved optimizer keeps: ``adam`` (exp_avg ...), ``sgd``
    (momentum_buffer, or none) -- Adam and AdamW keep the same moments, so either continues the other."""
    for param_state in optimizer_state.get("state", {}).values():
        if "exp_avg" in param_state:
            return "adam"
        if "momentum_buffer" in param_state:
            return "sgd"
    groups = optimizer_state.get("param_groups") or [{}]
    return "adam" if "betas" in groups[0] else "sgd"


def refused(state: dict[str, Any], cfg: Config, source: str, library: bool = False) -> None:
    """Raise :class:`UserError` (one line, naming the keys) when the config changed a key since the
    checkpoint ``state`` that no resume can honour; return quietly otherwise. Called before anything
    is loaded. ``library``: the Trainer was handed ``resume_from`` (the message names that, and
    ``run_dir``, instead of the command line's ``checkpoint.resume`` and ``logging.name``)."""
    changed = changed_keys(state.get("config") or {}, cfg)
    problems = []
    for key, (old, new) in changed.items():
        if RULES.get(key) == REFUSED and (key != "training.monitor" or state["train_state"].get("history")):
            problems.append(f"{key} {old!r} -> {new!r} ({WHY_REFUSED[key]})")
    if "training.optimizer" in changed:
        old, new = changed["training.optimizer"]
        kind = _optimizer_kind(state["optimizer"])
        if kind != ("sgd" if new == "sgd" else "adam"):
            problems.append(f"training.optimizer {old!r} -> {new!r} (the checkpoint's optimizer state is "
                            f"{'Adam moments' if kind == 'adam' else 'SGD momentum buffers'}, which {new} cannot "
                            "continue)")
    if problems:
        key, fresh = ("Trainer: resume_from", "run_dir") if library else ("checkpoint.resume", "logging.name")
        raise UserError(f"{key}: {source} cannot resume with " + "; ".join(problems)
                        + f". Resume with the saved values, or start a new run (another {fresh})")


def weights_keys(state: dict[str, Any], cfg: Config) -> list[str]:
    """The changed :data:`WEIGHTS` keys, to name when the checkpoint's weights do not fit the model."""
    changed = changed_keys(state.get("config") or {}, cfg)
    return [f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items() if RULES.get(k) == WEIGHTS]


def reapply(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
            fresh_groups: list[dict[str, Any]]) -> None:
    """After ``load_state_dict``: give the optimizer the hyperparameters the *current* config built it
    with (``fresh_groups``: its param groups before loading, without ``params``), and the scheduler
    the current peak LRs, and set each group's LR to what the current schedule says at the restored
    step. The per-parameter state (moments, momentum buffers) and the step count stay restored.

    LR at step s = lr * factor(s), with lr and factor (warmup, decay, total steps) from the current config.
    """
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        for key, value in fresh.items():
            if key not in ("params", "initial_lr", "lr"):
                group[key] = value
        group["initial_lr"] = fresh.get("initial_lr", fresh["lr"])
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    factors = getattr(scheduler, "lr_lambdas", None)
    if factors is None:
        raise TypeError(f"reapply: no closed form for {type(scheduler).__name__}; use a LambdaLR")
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, factors):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
