"""A config as text: the YAML a run stores and prints (:func:`dump_yaml`, with or without the keys
nothing reads, :func:`unused_keys`) and the Markdown table of every key (:func:`reference_markdown`,
docs/config.md). Apart from :mod:`ddp_seq.config`, the schema, so that stays under its size; no
torch here either.
"""

from __future__ import annotations

from dataclasses import fields

import yaml

from ddp_seq.config import Config, to_dict
from ddp_seq.config_fields import TEXT_FORMATS, field_specs

#: Keys only the synthetic task reads.
_SYNTHETIC_ONLY = ("num_train", "num_val", "features", "num_classes", "length_median", "length_sigma", "min_length",
                   "noise")
#: Keys only data files are read with (each format's own are refined in :func:`unused_keys`).
_FILES_ONLY = ("train_path", "val_path", "val_fraction", "header", "input_column", "target_column", "tokenizer",
               "min_freq", "truncate", "empty", "missing")


def unused_keys(cfg: Config) -> dict[str, tuple[str, list[str]]]:
    """The keys this config sets that nothing reads, by section: ``{section: (why, [keys])}``.

    Synthetic-only keys with a data file or ``data.target``, file keys with the synthetic task, a
    format's own keys with another format, ``data.val_fraction`` beside a ``data.val_path`` or
    folds, ``training.momentum`` without SGD, the worker keys without workers. Used to print a
    config without them (:func:`dump_yaml` ``used_only``); the stored config keeps every key.
    """
    d, out = cfg.data, {}
    data: list[str] = []
    if d.target:
        why = "data.target is set"
        data = ["format", "train_path", *_FILES_ONLY[1:], *_SYNTHETIC_ONLY]
    elif d.format == "synthetic":
        why, data = "data.format=synthetic", list(_FILES_ONLY)
    else:
        why = f"data.format={d.format}"
        data = [*_SYNTHETIC_ONLY, *(["header"] if d.format != "tsv" else []),
                *(["input_column", "target_column"] if d.format not in ("parquet", "hf") else []),
                *(["tokenizer"] if d.format not in TEXT_FORMATS else []),
                *(["min_freq"] if d.format in ("npz", "ts") else []), *(["missing"] if d.format != "ts" else []),
                *(["val_fraction"] if d.val_path or d.folds else [])]
    if not d.num_workers:
        data += ["prefetch_factor", "persistent_workers"]
        why += ", data.num_workers=0"
    if data:
        out["data"] = (why, data)
    if cfg.training.optimizer != "sgd":
        out["training"] = (f"training.optimizer={cfg.training.optimizer}", ["momentum"])
    return out


def dump_yaml(cfg: Config, used_only: bool = False) -> str:
    """The resolved config as YAML text, in field order.

    ``used_only``: without the keys :func:`unused_keys` names, each section's left-out keys said in a
    comment line at its end (what ``check-config`` and a run's log show; ``config.yaml`` keeps all).
    """
    tree = to_dict(cfg)
    if not used_only:
        return yaml.safe_dump(tree, sort_keys=False)
    unused, parts = unused_keys(cfg), []
    for name, section in tree.items():
        why, keys = unused.get(name, ("", []))
        parts.append(yaml.safe_dump({name: {k: v for k, v in section.items() if k not in keys}}, sort_keys=False))
        if keys:
            parts.append(f"  # not used ({why}), left out: {', '.join(keys)}\n")
    return "".join(parts)


def reference_markdown() -> str:
    """A Markdown table of every key, its default and its doc, generated from the dataclasses."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for section_name, section in ((f.name, getattr(Config(), f.name)) for f in fields(Config)):
        for name, spec in field_specs(type(section)).items():
            meta = spec.meta
            allowed = " \\| ".join(spec.choices) if spec.choices else ""
            bounds = [f"{op} {meta[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<=")) if meta[k] is not None]
            allowed = allowed or ", ".join(bounds) or meta["allowed"]
            lines.append(f"| `{section_name}.{name}` | `{getattr(section, name)!r}` | {allowed} | {meta['doc']} |")
    return "\n".join(lines)
