"""Hugging Face ``ClassLabel`` names of a target column, for :mod:`ddp_seq.data.readers.columnar`.

Hugging Face datasets store labels as ``ClassLabel(names=[...])`` -- int64 in Arrow, the names in the
dataset's features -- and tags as ``Sequence(ClassLabel(...))`` / ``List(ClassLabel(...))``. The names
come from ``Dataset.features`` for a ``save_to_disk`` folder, and from the ``huggingface`` key of the
Arrow schema's metadata (read by ``datasets.Features.from_arrow_schema``) for an ``.arrow`` file or a
Parquet file written by ``Dataset.to_parquet``. Without that metadata, or without ``datasets``
installed, there are no names and the integers are read as class indices, as before.
"""

from __future__ import annotations

from typing import Any


def class_names(feature: Any) -> list[str] | None:
    """The names of ``feature`` when it is a ``ClassLabel`` or a list of one (``Sequence`` / ``List`` /
    ``LargeList``, or ``[ClassLabel]``); None for anything else (including None: no such column).

    The caller's type checks decide whether a row label or a list of tags is expected.
    """
    try:
        import datasets
    except ImportError:
        return None
    inner = feature[0] if isinstance(feature, list) and len(feature) == 1 else getattr(feature, "feature", feature)
    if isinstance(inner, datasets.ClassLabel) and inner.names:
        return [str(n) for n in inner.names]
    return None


def schema_class_names(schema: Any, column: str) -> list[str] | None:
    """:func:`class_names` of ``column`` as the ``huggingface`` metadata of a ``pyarrow.Schema`` describes it.

    None without that metadata (``datasets`` is then not even imported), without ``datasets``, or when
    the metadata does not parse: the column's integers are then read as class indices.
    """
    if not column or not schema.metadata or b"huggingface" not in schema.metadata:
        return None
    try:
        import datasets
    except ImportError:
        return None
    try:
        features = datasets.Features.from_arrow_schema(schema)
    except Exception:  # noqa: BLE001 -- damaged or foreign metadata: the plain reading still holds
        return None
    return class_names(features.get(column))
