"""Size arguments as QEMU parses them (``qemu_strtosz``), and power-of-two rounding.

``-l`` takes a byte count with an optional suffix B, K, M, G, T, P or E (powers of 1024,
either case); a fraction is allowed with a suffix other than B (``1.5M``). The result is then
rounded up to a power of two, as QEMU's ivshmem-server does, and to our 4 KiB minimum (the
smallest BAR2 a QEMU ivshmem device accepts).
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["SizeError", "parse_size", "round_shm_size"]

_SUFFIXES = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_RE = re.compile(r"\s*(\d+)(?:\.(\d*))?\s*([A-Za-z]?)\s*")


class SizeError(ValueError):
    """The text is not a size QEMU would accept."""


def parse_size(text: str) -> int:
    """Parse ``text`` as QEMU's option parser does; return bytes (below 2**64)."""
    match = _SIZE_RE.fullmatch(text)
    if not match:
        raise SizeError(f"invalid size {text!r}")
    whole, frac, suffix = match.groups()
    if suffix and suffix.upper() not in _SUFFIXES:
        raise SizeError(f"invalid size {text!r}: unknown suffix {suffix!r}")
    shift = _SUFFIXES[suffix.upper()] if suffix else 0
    if frac is not None and shift == 0:
        raise SizeError(f"invalid size {text!r}: a fraction needs a suffix K, M, G, T, P or E")
    value = Fraction(int(whole)) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
    result = int(value * (1 << shift))
    if result >= 1 << 64:
        raise SizeError(f"invalid size {text!r}: it must be below 2^64")
    return result


def round_shm_size(size: int, minimum: int = 4096) -> int:
    """Round up to a power of two, and to ``minimum``."""
    size = max(size, minimum, 1)
    return 1 << (size - 1).bit_length()
