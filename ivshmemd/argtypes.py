"""argparse value types shared by the commands and benchmarks: bad values become one clear
usage error instead of a traceback deep inside. Sizes (``size``, ``positive_size``) are the
one grammar's own types, :mod:`vmm.sizes` (the VMM's benchmarks take them from there)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from vmm.sizes import positive_size_argument as positive_size
from vmm.sizes import size_argument as size

__all__ = ["int_in", "metrics_address", "positive_int", "positive_size", "seconds", "size"]


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


def seconds(*, zero: bool = False) -> Callable[[str], float]:
    """An argparse type for a finite number of seconds, > 0 (>= 0 with ``zero``, for a wait
    that may be none); ``nan`` and ``inf`` are refused like any other bad value."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            least = ">= 0" if zero else "> 0"
            raise argparse.ArgumentTypeError(
                f"must be a finite number of seconds {least}: {text!r}"
            )
        return value

    return parse


def metrics_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` to serve metrics at; ``:PORT`` (or ``PORT``) is localhost, ``[::1]:P``
    an IPv6 address; port 0 takes any free port (the daemon logs which)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from None
    if not 0 <= number < 65536:
        raise argparse.ArgumentTypeError(f"port {number} is outside 0..65535")
    return host, number
