"""argparse value types shared by the commands and benchmarks: bad values become one clear
usage error instead of a traceback deep inside."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["int_in", "non_negative_seconds", "positive_float", "positive_int"]


def positive_int(text: str) -> int:
    """An integer > 0 (any base Python accepts: 10, 0x10, 0o10)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for integers in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}: {text!r}")
        return value

    return parse


def positive_float(text: str) -> float:
    """A number > 0 (seconds, for instance)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def non_negative_seconds(text: str) -> float:
    """A finite number of seconds >= 0 (``nan``, ``inf`` and negatives are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0: {text!r}")
    return value
