"""How things are said to the user, in one place: plurals, and an exception in one line.

Every command (``ivshmemd``, ``ivshmemctl``, ``peers``) reports a failure as one line
(``TYPE: message``, and where it was raised); the traceback is for ``-v``. trio wraps what
a task raised in ``ExceptionGroup``\\ s: :func:`ivshmemd.errors.unwrap` finds the exception
that matters inside.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from .errors import unwrap

__all__ = ["exception_line", "human_bytes", "plural", "traceback_lines"]


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 vector``, ``2 vectors``, ``1 vCPU``; ``many`` for an irregular plural."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def human_bytes(count: int) -> str:
    """``512 bytes``, ``4.0 KiB``, ``1.5 MiB``: a byte count as a person reads it."""
    if count < 1024:
        return plural(count, "byte")
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def exception_line(exc: BaseException) -> str:
    """``TYPE: message (file.py:LINE in FUNCTION)``: where it was raised, in one line."""
    exc = unwrap(exc)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" ({Path(last.filename).name}:{last.lineno} in {last.name})"
    return text


def traceback_lines(exc: BaseException) -> list[str]:
    """The traceback of the exception that matters (see :func:`unwrap`), line by line."""
    exc = unwrap(exc)
    return "".join(traceback.format_exception(exc)).rstrip("\n").splitlines()
