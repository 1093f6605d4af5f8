"""Exceptions in one line, for reports that carry many of them (rank failures, benchmark rows)."""
from __future__ import annotations


def error_line(err: BaseException) -> str:
    """'TypeName: first line of the message' (torch's and gloo's messages run to many lines)."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
