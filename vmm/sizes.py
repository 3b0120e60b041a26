"""The project's one size grammar: byte counts as users type them (``64K``, ``1.5M``, ``2GiB``).

It is a superset of QEMU's ``qemu_strtosz`` (util/cutils.c), so every size QEMU's tools
accept means the same number of bytes here:

* a decimal integer, optionally with a decimal fraction (``1.5``), then an optional suffix
  ``B``, ``K``, ``M``, ``G``, ``T``, ``P`` or ``E`` in either case, each a power of 1024;
  a fraction needs a suffix other than ``B`` and is truncated to whole bytes (as QEMU does);
  a zero fraction needs no suffix (``1.``, ``1.0``);
* a hexadecimal count ``0x...``, no fraction; QEMU 7.2 still takes a suffix after it
  (``0x10K``, deprecated there): so does this grammar. ``B`` and ``E`` are hex digits there;
* beyond QEMU: ``iB`` after the suffix (``64KiB``, ``1GiB``) and surrounding whitespace.

Results are checked against the 64-bit limit (a size is at most ``2**64 - 1``). Every
refusal is a :class:`SizeError` (a ``ValueError``) whose message names the text and says
what is wrong, so a command line can print it as its one error line.

This module imports nothing of the project and nothing heavy: the daemon, the launcher and
the benchmarks all parse sizes with it, and every command line takes sizes through its
argparse types (:func:`size_argument`, :func:`positive_size_argument`; ``ivshmemd.argtypes``
offers them as ``size`` and ``positive_size``).
"""

from __future__ import annotations

import argparse
import re
from typing import Final

__all__ = [
    "SIZE_LIMIT",
    "SUFFIXES",
    "SizeError",
    "parse_positive_size",
    "parse_size",
    "positive_size_argument",
    "size_argument",
]

#: Suffix letter -> its power of 1024 as a shift (``B`` is bytes).
SUFFIXES: Final[dict[str, int]] = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
#: The largest size: what fits an unsigned 64-bit integer.
SIZE_LIMIT: Final = (1 << 64) - 1

_DECIMAL: Final = re.compile(r"(\d+)(?:\.(\d*))?(?:([A-Za-z])(iB|ib|IB|Ib)?)?")
_HEX: Final = re.compile(r"0[xX]([0-9A-Fa-f]+)(?:([KkMmGgTtPp])(iB|ib|IB|Ib)?)?")


class SizeError(ValueError):
    """A size the grammar does not accept; the message says why."""


def parse_size(text: str) -> int:
    """The number of bytes ``text`` means (see the module docstring for the grammar)."""
    if not isinstance(text, str):
        raise SizeError(f"a size must be text, got {text!r}")
    body = text.strip()
    if not body:
        raise SizeError("empty size: expected a number such as 4096, 64K or 1.5G")
    hexa = _HEX.fullmatch(body)
    if hexa is not None:
        shift = SUFFIXES[hexa[2].upper()] if hexa[2] else 0
        return _checked(text, int(hexa[1], 16) << shift)
    match = _DECIMAL.fullmatch(body)
    if match is None:
        raise SizeError(
            f"invalid size {text!r}: expected digits with an optional fraction and a "
            "suffix B, K, M, G, T, P or E (optionally followed by iB), or 0x-hex bytes"
        )
    whole, frac, suffix, ib = match.groups()
    if suffix is None:
        shift = 0
    else:
        found = SUFFIXES.get(suffix.upper())
        if found is None:
            raise SizeError(
                f"invalid size {text!r}: unknown suffix {suffix!r} (use B, K, M, G, T, P or E)"
            )
        if ib is not None and found == 0:
            raise SizeError(f"invalid size {text!r}: 'iB' belongs after K, M, G, T, P or E")
        shift = found
    if frac and int(frac) and shift == 0:
        raise SizeError(
            f"invalid size {text!r}: a fraction needs a suffix K, M, G, T, P or E "
            "(sizes are whole bytes)"
        )
    value = int(whole) << shift
    if frac:
        value += (int(frac) << shift) // 10 ** len(frac)
    return _checked(text, value)


def _checked(text: str, value: int) -> int:
    if value > SIZE_LIMIT:
        raise SizeError(f"size {text!r} is too large: the limit is 2^64 - 1 bytes (16 EiB)")
    return value


def parse_positive_size(text: str) -> int:
    """A :func:`parse_size` of at least one byte."""
    value = parse_size(text)
    if value < 1:
        raise SizeError(f"size must be positive (at least 1 byte), got {text!r}")
    return value


def size_argument(text: str) -> int:
    """argparse type: a byte count in this grammar; the grammar's message is the usage
    error (one line, no traceback)."""
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_size_argument(text: str) -> int:
    """argparse type: a :func:`size_argument` of at least one byte."""
    try:
        return parse_positive_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
