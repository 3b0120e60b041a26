"""One line per error for the command-line tools, whatever trio wrapped it in.

trio runs every task in a nursery and reports a task's failure as an ``ExceptionGroup``
(``strict_exception_groups``), so ``except SomeError`` around ``trio.run`` never fires for an
error raised inside a task: the caller sees "ExceptionGroup: Exceptions from Trio nursery (1
sub-exception)". :func:`unwrap` finds the exception a user should hear about, and
:func:`one_line` renders it. ``ivshmemd``, ``ivshmemctl`` and ``ivshmem-peer`` all report
through these two functions.
"""

from __future__ import annotations

__all__ = ["leaves", "one_line", "unwrap"]


def leaves(exc: BaseException) -> list[BaseException]:
    """Every non-group exception inside ``exc`` (``[exc]`` itself when it is not a group)."""
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    found: list[BaseException] = []
    for inner in exc.exceptions:
        found.extend(leaves(inner))
    return found


def _is_cancellation(exc: BaseException) -> bool:
    # trio.Cancelled without importing trio: the tools that never use trio stay light
    return type(exc).__name__ == "Cancelled" and type(exc).__module__.startswith("trio")


def unwrap(exc: BaseException) -> BaseException:
    """The exception behind ``exc``: itself, or the first leaf of a group that is not a
    trio cancellation (a group of only cancellations gives its first leaf)."""
    found = leaves(exc)
    for leaf in found:
        if not _is_cancellation(leaf):
            return leaf
    return found[0] if found else exc


def one_line(exc: BaseException) -> str:
    """``exc`` (unwrapped) as one line: its message, or its type name when it has none."""
    leaf = unwrap(exc)
    text = " ".join(str(leaf).split())
    if isinstance(leaf, OSError) and leaf.strerror:
        where = f" ({leaf.filename})" if leaf.filename else ""
        text = f"{leaf.strerror}{where}"
    return text or type(leaf).__name__
