"""The generic machinery of the config fields, apart from the schema in :mod:`ddp_seq.config`.

:func:`opt` declares a field (its one-line doc and bounds), :func:`field_specs` reads what each
field accepts back from its annotation (``Literal[...]`` choices) and metadata, :func:`coerce`
and :func:`check_section` check values against it, and :class:`Section` is the base that makes a
section dataclass check its own fields when it is constructed; :func:`yaml_entries` reads a config
file's keys (string keys keep their text). None of it knows which sections or
keys exist: kept apart so that ``config.py`` holds the schema (every key with its doc), the
cross-field rules and the loading, not the checking that serves all of them. It imports
``config.py`` nowhere (a section learns its name through :func:`name_sections`), and, like it,
neither torch nor numpy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import keyword
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

import yaml

from ddp_seq.errors import UserError


class ConfigError(UserError):
    """A config key with an unknown name, a wrong type or a value out of range."""


def opt(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        check: Callable[[Any], str | None] | None = None, allowed: str = "") -> Any:
    """A config field with its one-line doc and the constraints checked on construction and by
    :func:`ddp_seq.config.validate`.

    A choice field's values are its ``Literal[...]`` annotation, not an argument here. ``check``
    returns the problem with a value (``"must be ...; got ..."``) or None; ``allowed`` is the
    reference table's text for values that neither choices nor bounds describe. A mutable
    ``default`` (``{}``) becomes a ``default_factory``: every instance gets its own copy.
    """
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "check": check, "allowed": allowed}
    if isinstance(default, (dict, list)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=meta)
    return field(default=default, metadata=meta)


def check_target(value: str) -> str | None:
    """The problem with a ``model.target``/``data.target`` value, or None: it must be empty or
    ``package.module:Name`` / ``path/to/file.py:Name`` (syntax only; nothing is imported here)."""
    if not value:
        return None
    where, _, name = value.partition(":")
    if value.count(":") != 1 or not where.strip() or not all(
            part.isidentifier() and not keyword.iskeyword(part) for part in name.split(".")):
        return f"must be package.module:Name or path/to/file.py:Name (one ':', then a Python name); got {value!r}"
    return None


#: The data formats whose readers cut text with ``data.tokenizer`` (tsv lines, string columns of tables).
TEXT_FORMATS = ("tsv", "parquet", "hf")
#: ``data.tokenizer`` values ending so name a tokenizer file: Hugging Face tokenizers, sentencepiece.
TOKENIZER_FILE_ENDINGS = (".json", ".model")


def check_tokenizer(value: str) -> str | None:
    """The problem with a ``data.tokenizer`` value, or None: ``char``, ``whitespace``, or the path of a
    Hugging Face ``tokenizers`` file (``.json``) or a sentencepiece model (``.model``). Syntax only: the
    file is read (and its absence reported) by the data readers."""
    if value in ("char", "whitespace") or value.endswith(TOKENIZER_FILE_ENDINGS):
        return None
    return (f"must be char, whitespace, or the path of a tokenizer.json (Hugging Face tokenizers) or a .model "
            f"(sentencepiece) file; got {value!r}")


#: The reference table's ``allowed`` text for a field checked by :func:`check_target`.
TARGET_ALLOWED = "empty, `module:Name`, `file.py:Name`"


class Section:
    """Base of the section dataclasses: a section checks its own fields when it is constructed."""

    #: The prefix of the keys its errors name (``model`` for ModelConfig and its subclasses), set by
    #: :func:`name_sections` from the config tree; a class outside the tree uses its class name.
    section_name = ""

    def __post_init__(self) -> None:
        check_section(self, type(self).section_name or type(self).__name__)


def name_sections(config_cls: type) -> None:
    """Give each section class of the dataclass ``config_cls`` its field name there as its
    ``section_name``: the field names of the config tree are the one place section names are written."""
    for name, cls in get_type_hints(config_cls).items():
        cls.section_name = name


class FieldSpec(NamedTuple):
    """What a section field accepts: its Python ``kind`` (bool, int, float, str or dict), its
    ``choices`` (from a ``Literal[...]`` annotation, else None) and the :func:`opt` metadata."""

    name: str
    kind: type
    choices: tuple[str, ...] | None
    meta: Mapping[str, Any]


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


@functools.cache
def field_specs(cls: type) -> dict[str, FieldSpec]:
    """The :class:`FieldSpec` of every field of the section dataclass ``cls``, in field order. The
    annotations are strings (``from __future__ import annotations``): resolved once per class."""
    hints = get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        hint, choices = hints[f.name], None
        if get_origin(hint) is Literal:
            choices = get_args(hint)
            kind = type(choices[0])
        else:
            kind = get_origin(hint) or hint
        if kind not in _KINDS:
            raise TypeError(f"{cls.__name__}.{f.name}: config fields are bool, int, float, str, Literal or dict")
        specs[f.name] = FieldSpec(f.name, kind, choices, f.metadata)
    return specs


def choices_of(cls: type, name: str) -> tuple[str, ...] | None:
    """The values the choice field ``cls.name`` accepts (its ``Literal[...]``), or None."""
    return field_specs(cls)[name].choices


NOT_PLAIN = object()  # plain_scalar's answer for a value that is no YAML scalar (None is one)


def _plain(key: str, value: Any, *, top: bool = False) -> Any:
    """``value`` as plain YAML data (scalars, lists, mappings; tuples become lists), copied; else a
    ConfigError naming ``key`` (``model.args.NAME`` for an entry). ``top``: the keys are keyword-argument names."""
    if isinstance(value, Mapping):
        plain = {}
        for k, v in value.items():
            if top and not (isinstance(k, str) and k.isidentifier()):
                raise ConfigError(f"{key}: keys are keyword-argument names; got {k!r}")
            if plain_scalar(k) is NOT_PLAIN:
                raise ConfigError(f"{key}: mapping keys must be YAML scalars; got {k!r}")
            plain[plain_scalar(k)] = _plain(f"{key}.{k}", v)
        return plain
    if isinstance(value, (list, tuple)):
        return [_plain(f"{key}[{i}]", v) for i, v in enumerate(value)]
    scalar = plain_scalar(value)
    if scalar is NOT_PLAIN:
        raise ConfigError(f"{key}: expected a YAML scalar (number, string, boolean, null), list or mapping; "
                          f"got {value!r}")
    return scalar


def plain_scalar(value: Any) -> Any:
    """``value`` as a plain YAML scalar (bool, int, float, str or None), or ``NOT_PLAIN``."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return NOT_PLAIN


def coerce(key: str, value: Any, target: type) -> Any:
    """Return ``value`` as ``target`` or raise a ConfigError naming ``key``."""
    kind = _KINDS[target]
    if target is bool:
        if isinstance(value, bool):
            return value
    elif target is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    elif target is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif target is dict:
        if isinstance(value, Mapping):
            return _plain(key, value, top=True)
        raise ConfigError(f"{key}: expected a mapping (in YAML `{{name: value}}`; one entry: {key}.NAME=value), "
                          f"got {value!r}")
    raise ConfigError(f"{key}: expected {kind}, got {value!r}")


def _check_field(key: str, spec: FieldSpec, value: Any) -> Any:
    """``value`` coerced to the field's kind and checked against its choices, bounds and check;
    else a ConfigError naming ``key``. The one per-field check of construction and
    :func:`ddp_seq.config.validate`."""
    value = coerce(key, value, spec.kind)
    meta = spec.meta
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"{key}: must be one of {', '.join(spec.choices)}; got {value!r}")
    if meta["ge"] is not None and value < meta["ge"]:
        raise ConfigError(f"{key}: must be >= {meta['ge']}; got {value!r}")
    if meta["gt"] is not None and value <= meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}; got {value!r}")
    if meta["le"] is not None and value > meta["le"]:
        raise ConfigError(f"{key}: must be <= {meta['le']}; got {value!r}")
    if meta["check"] is not None and (problem := meta["check"](value)):
        raise ConfigError(f"{key}: {problem}")
    return value


def check_section(section: Any, section_name: str) -> None:
    """Check (and coerce in place: an int given to a float field becomes a float) every field of ``section``."""
    for name, spec in field_specs(type(section)).items():
        setattr(section, name, _check_field(f"{section_name}.{name}", spec, getattr(section, name)))


_NULL = "tag:yaml.org,2002:null"


def yaml_entries(path: str, text: str, is_string_key: Callable[[str], bool]) -> list[tuple[str, Any, int]]:
    """``(section.key, value, line)`` of every key of a config file's text, in file order.

    The value of a string key (``is_string_key(section.key)``: ``logging.name``, ``data.train_path``,
    ...) written as a scalar is the text the user wrote, as on the command line: YAML 1.1 would have
    turned ``1.10`` into 1.1, ``0755`` into 493, ``1_000`` into 1000, ``12:30`` into 750 and
    ``yes``/``off`` into booleans before the schema's type applied (so a rerun with the same value on
    the command line would not find the same run). Every other key gets YAML's value, which its type
    then checks (``0755`` is still 493 for an integer key, as on the command line). ``~``/``null``/
    nothing stays null, which a string key refuses. Merge keys (``<<: *base``) and anchors work as in
    ``yaml.safe_load``. Raises ``yaml.YAMLError`` for bad YAML, :class:`ConfigError` for a file that is
    no mapping of sections.
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return []
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        loader.flatten_mapping(root)
        entries = []
        for name_node, section in root.value:
            section_name = loader.construct_object(name_node, deep=True)
            if not isinstance(section, yaml.MappingNode):
                raise ConfigError(f"{path} line {name_node.start_mark.line + 1}: {section_name}: expected a mapping "
                                  "of keys")
            loader.flatten_mapping(section)
            for key_node, node in section.value:
                dotted = f"{section_name}.{loader.construct_object(key_node, deep=True)}"
                if is_string_key(dotted) and isinstance(node, yaml.ScalarNode) and node.tag != _NULL:
                    value = node.value  # the text as written (a quoted scalar's text without its quotes)
                else:
                    value = loader.construct_object(node, deep=True)
                entries.append((dotted, value, node.start_mark.line + 1))
        return entries
    finally:
        loader.dispose()
