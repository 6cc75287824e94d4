"""One typed config tree: dataclass defaults < YAML file < ``section.key=value`` overrides.

Every field carries a one-line doc (used for ``ddp-seq config-reference`` and docs/config.md) and,
where it matters, the values it accepts: a choice field's ``Literal[...]`` annotation is the one
place its choices are written, bounds sit in :func:`opt`. Every section dataclass checks its own
fields when it is constructed (``ModelConfig(hidden=-1)`` raises), and :func:`validate` checks the
whole tree again plus the rules that span fields. Every problem is raised as :class:`ConfigError`
with a message that names the key to fix; the CLI turns it into one line and exit code 2.
The field machinery that serves every section (:func:`opt`, reading a field's choices and bounds
back, coercing and checking values) lives in :mod:`ddp_seq.config_fields`; this module is the schema.

This module imports neither torch nor numpy, so a config can be checked in a fraction of a second
before any process is launched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ddp_seq.config_fields import (
    NOT_PLAIN,
    TARGET_ALLOWED,
    TEXT_FORMATS,
    TOKENIZER_FILE_ENDINGS,
    ConfigError,
    FieldSpec,
    Section,
    check_section,
    check_target,
    check_tokenizer,
    coerce,
    field_specs,
    name_sections,
    opt,
    plain_scalar,
    yaml_entries,
)
from ddp_seq.config_fields import choices_of as choices_of  # re-exported: importers take it from here
from ddp_seq.errors import UserError as UserError  # re-exported: importers take it from here


@dataclass
class DataConfig(Section):
    task: Literal["classify", "regress", "tag"] = opt(
        "classify", "classify: one label per sequence; regress: one value; tag: one label per step")
    format: Literal["synthetic", "npz", "tsv", "jsonl", "ts", "parquet", "hf"] = opt(
        "synthetic", "synthetic: the embedded generated task; npz: ragged numeric arrays; tsv: label<TAB>text lines; "
        "jsonl: one JSON object per line; ts: UEA/UCR time-series archive; parquet: a Parquet file (pyarrow); "
        "hf: a Hugging Face datasets folder (save_to_disk) or .arrow file")
    target: str = opt("", "your data: package.module:function or path/to/file.py:function returning (train_dataset, "
                      "val_dataset); called with the keyword arguments it accepts among task, seed and data.args; "
                      "empty = data.format (when set, data.format and data.train_path are ignored)",
                      check=check_target, allowed=TARGET_ALLOWED)
    args: dict[str, Any] = opt({}, "keyword arguments for data.target (a YAML mapping; override one with "
                               "data.args.NAME=value)", allowed="a mapping")
    train_path: str = opt("", "training file (every format but synthetic)")
    val_path: str = opt("", "validation file; empty = hold out val_fraction of train_path")
    val_fraction: float = opt(0.1, "without val_path: fraction of train_path held out (fixed by data.seed)",
                              gt=0, le=0.5)
    header: Literal["auto", "true", "false"] = opt(
        "auto", "tsv: is the first line a header (label<TAB>text)? true: skip it; false: a sample; auto: skipped when "
        "its label names a column (label, class, text, ...) and is no label of another line, refused naming line 1 "
        "when it looks like neither (docs/data.md)")
    input_column: str = opt("", "parquet/hf: the column of inputs (token lists, strings or per-step feature lists); "
                            "empty = the first of tokens, text, features that the file has")
    target_column: str = opt("", "parquet/hf: the column of targets; empty = label (classify), target (regress), "
                             "tags (tag)")
    tokenizer: str = opt(
        "char", "tsv and string columns: how text becomes tokens: char (every character), whitespace (words), or a "
        "local subword tokenizer file: tokenizer.json (Hugging Face tokenizers) or *.model (sentencepiece)",
        check=check_tokenizer, allowed="char, whitespace, `path/tokenizer.json`, `path/file.model`")
    min_freq: int = opt(1, "tokens seen fewer times in the training split become <unk>", ge=1)
    max_length: int = opt(0, "longest sequence; 0 = no limit. Files: longer samples follow data.truncate; "
                          "synthetic: lengths are clipped to it", ge=0)
    truncate: Literal["error", "pre", "post"] = opt(
        "error", "samples longer than max_length: error (names the longest); pre: keep the last max_length steps; "
        "post: keep the first")
    empty: Literal["error", "drop"] = opt(
        "error", "samples of length 0 (pack_padded_sequence rejects them): error, or drop them")
    missing: Literal["error", "zero", "ffill"] = opt(
        "error", "ts: missing values '?': error (names the line); zero; ffill: the last value seen "
        "(0 before the first)")
    folds: int = opt(0, "k-fold cross-validation: train k models in turn, fold i validating on the i-th part of "
                     "the training data; 0 = off", ge=0)
    num_train: int = opt(20000, "synthetic: number of training sequences", ge=1)
    num_val: int = opt(1000, "synthetic: number of validation sequences", ge=1)
    features: int = opt(8, "synthetic: feature channels per time step (>= number of classes for classify)", ge=2)
    num_classes: int = opt(4, "synthetic: classes for classify (tag always uses 2: running parity)", ge=2)
    length_median: float = opt(45.0, "synthetic: median sequence length (lognormal)", gt=0)
    length_sigma: float = opt(0.8, "synthetic: lognormal sigma of the length distribution (skew)", ge=0)
    min_length: int = opt(1, "synthetic: shortest sequence (lengths are clipped to [min_length, max_length])", ge=1)
    noise: float = opt(0.1, "synthetic: std of the Gaussian noise added to every feature", ge=0)
    seed: int = opt(1234, "seed of the synthetic data, of the val_fraction split and of the folds (every rank)")
    num_workers: int = opt(0, "DataLoader worker processes per rank that collate batches (0 = in the training "
                           "process)", ge=0)
    prefetch_factor: int = opt(2, "batches each worker prepares ahead (num_workers > 0)", ge=1)
    persistent_workers: bool = opt(True, "keep the workers alive between epochs (num_workers > 0)")


@dataclass
class BatchingConfig(Section):
    strategy: Literal["random", "bucket"] = opt(
        "bucket", "random: plain shuffled batches; bucket: length-sorted within pools")
    batch_size: int = opt(64, "sequences per global batch (split across all ranks)", ge=1)
    max_tokens: int = opt(0, "padded-token budget per global batch (batch x longest); 0 = off", ge=0)
    pool: int = opt(50, "bucket: sort by length inside pools of this many batches", ge=1)
    padding_noise: float = opt(0.0, "bucket: sort by length x U(1-noise, 1+noise): more randomness, more padding",
                               ge=0, le=1)
    eval_batch_size: int = opt(256, "sequences per global batch in evaluation", ge=1)


@dataclass
class ModelConfig(Section):
    cell: Literal["lstm", "gru"] = opt("lstm", "recurrent cell")
    hidden: int = opt(128, "hidden units per direction", ge=1)
    layers: int = opt(2, "stacked recurrent layers", ge=1)
    bidirectional: bool = opt(False, "run a second RNN over each sequence backwards")
    dropout: float = opt(0.0, "dropout between recurrent layers and before the head", ge=0, le=1)
    pooling: Literal["last", "mean", "max"] = opt(
        "last", "classify/regress: how a sequence becomes one vector (valid steps only)")
    embedding_dim: int = opt(64, "width of the input layer (Linear for features, Embedding for token ids)", ge=1)
    execution: Literal["auto", "packed", "padded"] = opt(
        "auto", "packed: pack_padded_sequence; padded: fused kernel on the padded tensor, exact (auto: padded on CPU, "
        "packed on CUDA)")
    target: str = opt("", "your model class: package.module:Class or path/to/file.py:Class, called with the keyword "
                      "arguments it accepts among task, num_inputs, num_outputs, vocab_size, plus model.args; "
                      "empty = the built-in SeqModel", check=check_target, allowed=TARGET_ALLOWED)
    args: dict[str, Any] = opt({}, "keyword arguments for model.target (a YAML mapping; override one with "
                               "model.args.NAME=value)", allowed="a mapping")


@dataclass
class TrainingConfig(Section):
    epochs: int = opt(5, "passes over the training set", ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = opt("adam", "optimizer")
    lr: float = opt(1e-2, "peak learning rate", gt=0)
    weight_decay: float = opt(0.0, "weight decay", ge=0)
    momentum: float = opt(0.9, "SGD momentum", ge=0, le=1)
    warmup_steps: int = opt(50, "linear warmup steps before the cosine decay", ge=0)
    min_lr_ratio: float = opt(0.05, "final learning rate as a fraction of lr", ge=0, le=1)
    grad_accum: int = opt(1, "global batches accumulated into one optimizer step (DDP no_sync between)", ge=1)
    mode: Literal["ddp", "dp", "single"] = opt(
        "ddp", "ddp: DistributedDataParallel, one process per rank (torchrun) or one process; dp: legacy "
        "nn.DataParallel over the visible GPUs, one process; single: one process, one device")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = off", ge=0)
    amp: Literal["none", "bf16", "fp16", "auto"] = opt(
        "none", "mixed precision (fp16 needs CUDA); auto: bf16 where the device computes in bf16 natively "
        "(CUDA compute capability 8+, a CPU with AVX512-BF16 or AMX), none elsewhere")
    seed: int = opt(0, "seed of model init and batch order")
    monitor: Literal["val_loss", "val_accuracy", "val_f1_macro", "val_mse", "val_mae"] = opt(
        "val_accuracy", "metric that picks the best checkpoint and early stopping; val_f1_macro (classify, tag): "
        "the unweighted mean F1 over all classes")
    patience: int = opt(0, "stop after this many epochs without improvement; 0 = never", ge=0)
    log_every: int = opt(50, "print and record train metrics every this many steps", ge=1)


@dataclass
class CheckpointConfig(Section):
    save: bool = opt(True, "write checkpoints into runs/<name>/checkpoints/ (step-<N>.pt and best.pt)")
    every_steps: int = opt(100, "also checkpoint every this many optimizer steps mid-epoch; 0 = epoch ends only",
                           ge=0)
    keep_last: int = opt(2, "step checkpoints kept (oldest deleted first); best.pt is kept apart", ge=1)
    resume: str = opt("auto", "auto: newest valid checkpoint of this run's directory, if any; none: never "
                      "(refuse a used directory); or a checkpoint path")
    signal_check_steps: int = opt(10, "steps between checks whether any rank got SIGTERM (one tiny all-reduce)",
                                  ge=1)


@dataclass
class LoggingConfig(Section):
    root: str = opt("runs", "directory that holds one sub-directory per run")
    name: str = opt("", "run name; empty = '<task>-<date>-<time>' chosen by rank 0")
    progress: Literal["auto", "bar", "lines", "none"] = opt("auto", "auto: a bar on a terminal, plain lines otherwise")
    tensorboard: bool = opt(False, "also write TensorBoard event files into runs/<name>/tensorboard/ from rank 0 "
                            "(the records of metrics.jsonl; needs the tensorboard package)")


@dataclass
class WandbConfig(Section):
    mode: Literal["disabled", "offline", "online"] = opt(
        "disabled", "disabled; offline: files under the run directory (`wandb sync` later); online. WANDB_MODE in the "
        "environment wins")
    project: str = opt("ddp_seq", "wandb project")
    entity: str = opt("", "wandb entity (team or user); empty = your default")
    group: str = opt("", "wandb group; empty = none, or the run name with per_rank")
    name: str = opt("", "wandb run name; empty = the run directory's name")
    tags: str = opt("", "comma-separated wandb tags")
    per_rank: bool = opt(False, "one wandb run per rank, in one group, instead of one run from rank 0")
    init_timeout_s: int = opt(20, "online: give up reaching the server after this many seconds (one clear line)",
                              ge=1)


@dataclass
class DistributedConfig(Section):
    backend: Literal["auto", "nccl", "gloo"] = opt("auto", "auto: nccl with GPUs, gloo on CPU")
    timeout_s: int = opt(600, "collective timeout in seconds (a dead rank fails the others then)", ge=1)
    threads_per_rank: int = opt(0, "torch threads per rank; 0 = usable cores / local ranks", ge=0)
    flush_denormal: bool = opt(True, "CPU: treat denormal floats as zero (early LSTM training makes many, "
                                     "and they slow CPU kernels); off = IEEE denormals")
    onednn_cache_capacity: int = opt(8, "CPU: oneDNN primitive cache capacity, set as ONEDNN_PRIMITIVE_CACHE_CAPACITY "
                                        "unless the environment sets it (oneDNN's 1024 let peak memory grow every "
                                        "epoch with variable lengths); 0 = leave oneDNN's default", ge=0)
    find_unused_parameters: bool = opt(False, "DDP's find_unused_parameters: for a model with parameters that some "
                                              "steps give no gradient (costs a pass over the graph every step)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


name_sections(Config)  # the section classes take their key prefixes from the field names above


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _set(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.key`` (coerced to its kind, not yet range-checked), or one entry of a mapping
    key, ``section.key.NAME``."""
    section_name, _, key = dotted.partition(".")
    sections = _sections(cfg)
    if section_name not in sections or not key:
        raise ConfigError(f"{dotted}: unknown key (sections: {', '.join(sections)})")
    section = sections[section_name]
    specs = field_specs(type(section))
    name, _, entry = key.partition(".")
    if name not in specs or (entry and specs[name].kind is not dict):
        raise ConfigError(f"{dotted}: unknown key (known in {section_name}: {', '.join(specs)})")
    if entry:
        if not entry.isidentifier():
            raise ConfigError(f"{dotted}: {section_name}.{name}.NAME=value needs a keyword-argument name; "
                              f"got {entry!r}")
        value = {**getattr(section, name), entry: value}
    setattr(section, name, coerce(f"{section_name}.{name}", value, specs[name].kind))


def _spec_of(cfg: Config, dotted: str) -> FieldSpec | None:
    section_name, _, key = dotted.partition(".")
    section = _sections(cfg).get(section_name)
    return None if section is None else field_specs(type(section)).get(key)


def _is_string_key(cfg: Config, dotted: str) -> bool:
    """Whether ``dotted`` names a string field: its override text is taken literally ('007' stays '007')."""
    spec = _spec_of(cfg, dotted)
    return spec is not None and spec.kind is str


def _parse_scalar(raw: str) -> Any:
    """An override's text read as a YAML scalar (``true``, ``3``, ``3e-3``); unparsable text stays text."""
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _override_value(cfg: Config, dotted: str, raw: str) -> Any:
    """The value of ``dotted=raw``: text for a string key, else YAML. An entry of a mapping key
    (``model.args.NAME=...``) whose YAML is no plain value (a date: 2024-01-05) stays text."""
    if _is_string_key(cfg, dotted):
        return raw
    value = _parse_scalar(raw)
    section_key, _, entry = dotted.rpartition(".")
    spec = _spec_of(cfg, section_key) if entry and section_key.count(".") == 1 else None
    if spec is not None and spec.kind is dict and not isinstance(value, (Mapping, list)) \
            and plain_scalar(value) is NOT_PLAIN:
        return raw
    return value


def validate(cfg: Config) -> Config:
    """Check every field (as construction does: values assigned since are checked too) and the
    cross-field rules; return ``cfg``."""
    for section_name, section in _sections(cfg).items():
        check_section(section, section_name)
    d = cfg.data
    if d.max_length and d.min_length > d.max_length:
        raise ConfigError(f"data.min_length: must be <= data.max_length ({d.max_length}); got {d.min_length}")
    if d.folds == 1:
        raise ConfigError("data.folds: k-fold cross-validation needs at least 2 folds; 0 turns it off")
    if d.folds and d.val_path:
        raise ConfigError("data.val_path: not used with data.folds (each fold validates on its held-out part of "
                          "data.train_path); remove one of them")
    if d.args and not d.target:
        raise ConfigError("data.args: only used with data.target; set data.target or remove data.args")
    if cfg.model.args and not cfg.model.target:
        raise ConfigError("model.args: only used with model.target; set model.target or remove model.args")
    if not d.target and d.task == "tag" and d.format in ("tsv", "ts"):
        raise ConfigError(f"data.task: tag needs a label per step, which data.format={d.format} files do not hold; "
                          "use jsonl (\"tags\") or npz (tags)")
    if not d.target and d.format not in TEXT_FORMATS and d.tokenizer.endswith(TOKENIZER_FILE_ENDINGS):
        raise ConfigError(f"data.tokenizer: {d.tokenizer} cuts text, which data.format={d.format} does not hold "
                          "(tsv, parquet and hf text columns do); leave data.tokenizer at char")
    if d.header != "auto" and (d.target or d.format != "tsv"):
        used = f"data.target={d.target} is set" if d.target else f"data.format is {d.format}"
        raise ConfigError(f"data.header: only read from tsv files, but {used}; remove data.header")
    for key in ("input_column", "target_column"):
        if getattr(d, key) and (d.target or d.format not in ("parquet", "hf")):
            used = f"data.target={d.target} is set" if d.target else f"data.format is {d.format}"
            raise ConfigError(f"data.{key}: only read from parquet and hf tables, but {used}; remove data.{key}")
    if not d.target and d.format == "synthetic" and d.task == "classify" and d.features < d.num_classes:
        raise ConfigError(f"data.features: classify needs >= data.num_classes ({d.num_classes}); got {d.features}")
    if d.task == "regress" and cfg.training.monitor in ("val_accuracy", "val_f1_macro"):
        raise ConfigError(f"training.monitor: regress has no {cfg.training.monitor[4:]}; use val_mse, val_mae or "
                          "val_loss")
    if d.task != "regress" and cfg.training.monitor in ("val_mse", "val_mae"):
        raise ConfigError(f"training.monitor: {cfg.training.monitor} is only for data.task=regress")
    if not d.target and d.format != "synthetic" and not d.train_path:
        raise ConfigError(f"data.train_path: data.format={d.format} needs a training file")
    if d.folds and cfg.checkpoint.resume not in ("auto", "none"):
        raise ConfigError("checkpoint.resume: a k-fold job (data.folds) resumes each fold from its own directory; "
                          "use auto or none")
    name = cfg.logging.name
    if name and (name in (".", "..") or "/" in name or "\\" in name):
        raise ConfigError(f"logging.name: must be a plain directory name; got {name!r}")
    return cfg


def check_mode(mode: str, world_size: int) -> None:
    """Refuse a one-process ``training.mode`` (``dp``, ``single``) in a job of several processes."""
    if mode != "ddp" and world_size > 1:
        raise ConfigError(f"training.mode: {mode} runs in one process, but this is one of {world_size} "
                          f"(WORLD_SIZE={world_size}, set by torchrun); run it as `python train.py ...`, "
                          "or use training.mode=ddp for several processes")


def _yaml_line(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f" line {mark.line + 1}" if mark is not None else ""


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build the config: defaults, then the YAML file at ``path``, then ``section.key=value`` overrides."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror or e})") from None
        try:
            entries = yaml_entries(path, text, lambda dotted: _is_string_key(cfg, dotted))
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}{_yaml_line(e)}: invalid YAML ({problem})") from None
        for dotted, value, line in entries:
            try:
                _set(cfg, dotted, value)
            except ConfigError as e:
                raise ConfigError(f"{path} line {line}: {e}") from None
    return validate(apply_overrides(cfg, overrides))


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Set ``section.key=value`` overrides on ``cfg`` (in place; returned for chaining). Not validated.

    A mapping key takes a YAML flow mapping as a whole (``model.args={hidden: 64}``, ``model.args={}``)
    or one entry at a time (``model.args.hidden=64``, the value read as YAML)."""
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"{item}: overrides are written section.key=value")
        dotted = dotted.strip()
        _set(cfg, dotted, _override_value(cfg, dotted, raw))
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts (YAML, JSON and ``weights_only`` checkpoints take it)."""
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, dict[str, Any]], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Rebuild a validated config from :func:`to_dict` output (e.g. read from a checkpoint), then
    apply ``section.key=value`` overrides."""
    cfg = Config()
    for section_name, section in tree.items():
        for key, value in section.items():
            _set(cfg, f"{section_name}.{key}", value)
    return validate(apply_overrides(cfg, overrides))
