"""The per-access path a guest feels, against a raw store in the same run.

Three figures, each the median of ``repeats`` timed batches, beside the same batch of
``struct.pack_into("<Q", buf, offset, value)`` stores on a bytearray at the same offsets (the
"raw" store: what a plugin would pay with no VMM in the way), measured in the same run:

* ``tlb_hit``: ``vcpu.write64`` to one page over and over (every access a TLB hit);
* ``tlb_miss``: ``vcpu.write64`` at random 8-byte aligned addresses of a ``span``-byte memslot
  whose pages are all mapped (a TLB of 1024 entries per level misses almost always: the
  access walks the stage-2 table and fills the TLB);
* ``first_touch``: ``vcpu.write64`` once into every 4 KiB page of a fresh memslot: each access
  misses, walks, faults, maps the page and retries.

The backings are pre-faulted (``MAP_POPULATE``): host page faults are not the VMM's cost.
"""

from __future__ import annotations

import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from ..memory import Backing
from ..pte import PAGE_SIZE
from ..vm import Vm

__all__ = ["ACCESS_ROWS", "AccessResult", "run_access_bench"]

#: The rows, in the order the issue's table lists them.
ACCESS_ROWS: Final = ("tlb_hit", "tlb_miss", "first_touch")
ROW_TITLES: Final = {
    "tlb_hit": "vcpu.write64, TLB hit",
    "tlb_miss": "random write64 (TLB miss, walk)",
    "first_touch": "first touch of a 4K page (fault, map)",
}
_GPA: Final = 0x8000_0000


@dataclass
class AccessResult:
    """Per-access nanoseconds of the model and of the raw store, per row."""

    span: int
    count: int
    repeats: int
    ours_ns: dict[str, float] = field(default_factory=dict)
    raw_ns: dict[str, float] = field(default_factory=dict)

    def ratio(self, row: str) -> float:
        return self.ours_ns[row] / self.raw_ns[row]


def _per_access(run: Callable[[], None], count: int) -> float:
    start = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - start) / count


def _raw_batch(buf: bytearray, offsets: list[int]) -> Callable[[], None]:
    pack_into = struct.pack_into

    def run() -> None:
        for off in offsets:
            pack_into("<Q", buf, off, off)

    return run


def _guest_batch(write64: Callable[[int, int], None], gpas: list[int]) -> Callable[[], None]:
    def run() -> None:
        for gpa in gpas:
            write64(gpa, gpa)

    return run


def run_access_bench(
    span: int = 256 << 20, count: int = 20_000, repeats: int = 5, seed: int = 1
) -> AccessResult:
    """Measure the three rows (``count`` accesses per batch, ``repeats`` batches, raw and
    ours interleaved batch by batch)."""
    if span < PAGE_SIZE or span % PAGE_SIZE:
        raise ValueError(f"span must be a positive multiple of 4 KiB, got {span}")
    result = AccessResult(span, count, repeats)
    rng = np.random.default_rng(seed)
    raw_buf = bytearray(span)
    backing = Backing.anonymous(span, populate=True)
    vm = Vm()
    vm.set_user_memory_region(0, 0, _GPA, span, backing)
    vcpu = vm.create_vcpu(0)
    try:
        samples: dict[str, tuple[list[float], list[float]]] = {r: ([], []) for r in ACCESS_ROWS}

        hit_offsets = [8 * (i % 512) for i in range(count)]
        hit_raw = _raw_batch(raw_buf, hit_offsets)
        hit_ours = _guest_batch(vcpu.write64, [_GPA + off for off in hit_offsets])
        vcpu.write64(_GPA, 0)  # map the page, fill the TLB

        miss_offsets = (rng.integers(0, span // 8, count) * 8).tolist()
        miss_raw = _raw_batch(raw_buf, miss_offsets)
        miss_ours = _guest_batch(vcpu.write64, [_GPA + off for off in miss_offsets])
        vcpu.touch(_GPA, span)  # map every page (bulk), so the row measures walks only

        pages = span // PAGE_SIZE
        touch_count = min(count, pages)
        touch_offsets = [i * PAGE_SIZE for i in range(touch_count)]
        touch_raw = _raw_batch(raw_buf, touch_offsets)

        for _ in range(repeats):
            for row, raw, ours in (
                ("tlb_hit", hit_raw, hit_ours),
                ("tlb_miss", miss_raw, miss_ours),
            ):
                samples[row][0].append(_per_access(raw, count))
                samples[row][1].append(_per_access(ours, count))
            samples["first_touch"][0].append(_per_access(touch_raw, touch_count))
            fresh = Vm()
            fresh.set_user_memory_region(0, 0, _GPA, span, backing)
            cpu = fresh.create_vcpu(0)
            touch_ours = _guest_batch(cpu.write64, [_GPA + off for off in touch_offsets])
            samples["first_touch"][1].append(_per_access(touch_ours, touch_count))
            fresh.close()
        for row, (raw_s, ours_s) in samples.items():
            result.raw_ns[row] = statistics.median(raw_s)
            result.ours_ns[row] = statistics.median(ours_s)
        return result
    finally:
        vm.close()
        backing.close()
