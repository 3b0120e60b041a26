"""MMIO dispatch: device regions of the guest-physical space and the handlers behind them.

A device implements :class:`MmioHandler`; :class:`MmioBus` maps non-overlapping GPA ranges
to handlers and finds the one an access falls in (a sorted list and ``bisect``). Accesses are
1, 2, 4 or 8 bytes wide, little-endian, inside one region; anything else is a clear error.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .errors import MmioError

__all__ = ["MMIO_SIZES", "MmioBus", "MmioHandler", "MmioRegion"]

MMIO_SIZES = (1, 2, 4, 8)


@runtime_checkable
class MmioHandler(Protocol):
    """A device's register file, addressed by offset from its region's start."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


@dataclass(frozen=True)
class MmioRegion:
    """A device's range of the guest-physical space."""

    gpa: int
    size: int
    handler: MmioHandler
    end: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "end", self.gpa + self.size)


class MmioBus:
    """The VM's MMIO regions, sorted by GPA."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[MmioRegion] = []

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def overlapping(self, gpa: int, size: int) -> MmioRegion | None:
        i = bisect.bisect_right(self._starts, gpa + size - 1) - 1
        if i >= 0 and self._regions[i].end > gpa:
            return self._regions[i]
        return None

    def add(self, gpa: int, size: int, handler: MmioHandler) -> MmioRegion:
        if size <= 0 or gpa < 0:
            raise MmioError(f"MMIO region at {gpa:#x} needs a positive size, got {size}")
        if not isinstance(handler, MmioHandler):
            raise MmioError(
                f"MMIO handler {handler!r} must provide mmio_read(offset, size) and "
                "mmio_write(offset, size, value)"
            )
        other = self.overlapping(gpa, size)
        if other is not None:
            raise MmioError(
                f"MMIO region [{gpa:#x}, {gpa + size:#x}) overlaps the MMIO region "
                f"[{other.gpa:#x}, {other.end:#x})"
            )
        region = MmioRegion(gpa, size, handler)
        i = bisect.bisect_left(self._starts, gpa)
        self._starts.insert(i, gpa)
        self._regions.insert(i, region)
        return region

    def remove(self, gpa: int) -> MmioRegion:
        i = bisect.bisect_left(self._starts, gpa)
        if i == len(self._starts) or self._starts[i] != gpa:
            raise MmioError(f"no MMIO region starts at GPA {gpa:#x}")
        del self._starts[i]
        return self._regions.pop(i)

    def find(self, gpa: int) -> MmioRegion | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            if gpa < region.end:
                return region
        return None

    def read(self, region: MmioRegion, gpa: int, size: int) -> int:
        self._check(region, gpa, size)
        return int(region.handler.mmio_read(gpa - region.gpa, size)) & ((1 << (8 * size)) - 1)

    def write(self, region: MmioRegion, gpa: int, size: int, value: int) -> None:
        self._check(region, gpa, size)
        region.handler.mmio_write(gpa - region.gpa, size, value & ((1 << (8 * size)) - 1))

    @staticmethod
    def _check(region: MmioRegion, gpa: int, size: int) -> None:
        if size not in MMIO_SIZES:
            raise MmioError(f"MMIO access of {size} bytes at {gpa:#x}: sizes are 1, 2, 4 or 8")
        if gpa + size > region.end:
            raise MmioError(
                f"MMIO access [{gpa:#x}, {gpa + size:#x}) runs past its region's end "
                f"{region.end:#x}"
            )
