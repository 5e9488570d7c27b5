"""The one check of a dataset's columns and captions, shared by data loading, training and evaluation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def check_columns(dataset: Any, columns: Sequence[str | None] | Mapping[str, str | None],
                  source: str = "the dataset") -> None:
    """Raise naming the missing columns, the available ones and the flags that choose them.

    `columns` lists column names, or maps the flag that chooses each (`image_column`, `caption_column`, ...) to the
    column it names; None entries are not used.
    """
    names = getattr(dataset, "column_names", None)
    if names is None:
        raise ValueError(f"{source} must be a datasets.Dataset, got {type(dataset).__name__}.")
    pairs = columns.items() if isinstance(columns, Mapping) else ((None, c) for c in columns)
    missing, flags = [], []
    for flag, column in pairs:
        if column is not None and column not in names and column not in missing:
            missing.append(column)
            if flag is not None:
                flags.append(f"--{flag}")
    if missing:
        hint = f" Pass {' / '.join(flags)} to name the right column." if flags else ""
        raise ValueError(f"Column(s) {missing} not found in {source}; available columns: {names}.{hint}")


def check_captions(captions: Sequence[Any], column: str = "text", source: str = "the dataset") -> list[str]:
    """The captions as a list; raise (naming rows, never caption text) when one is empty or not a string."""
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"{len(bad)} rows of {source} have an empty or non-text caption in column {column!r} (first "
                         f"rows: {bad[:5]}); every image needs a caption (pass --caption_column to choose the column).")
    return list(captions)
