"""The error a user can fix: one line, exit code 2, no traceback (the CLI prints it)."""

from __future__ import annotations

import re


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's text as one short plain line, for one-line messages: its first non-empty line,
    without terminal escapes or control characters (torch's and wandb's messages carry both), or
    the exception's type name when it has no text."""
    for raw in str(error).splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m|[\x00-\x1f\x7f]", "", raw).strip()
        if line:
            return line[:limit]
    return type(error).__name__
