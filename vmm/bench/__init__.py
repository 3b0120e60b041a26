"""Benchmarks of the VMM model, modelled on KVM's selftests (figures printed, nothing asserted).

``python -m vmm.bench pagetable``  kvm_page_table_test: CREATE / UPDATE / ADJUST stage times.
``python -m vmm.bench dirty-log``  dirty_log_perf_test: populate, per-iteration dirty / get /
clear times, and the per-page walker comparison on a fully mapped range.
"""

from __future__ import annotations

import os

__all__ = ["check_host_memory", "parse_size"]


def check_host_memory(size: int) -> None:
    """Refuse (clearly) a benchmark whose pre-faulted memory would not fit in free RAM."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if size > free * 0.9:
        raise ValueError(
            f"{size / (1 << 30):.1f} GiB of guest memory does not fit in the host's "
            f"{free / (1 << 30):.1f} GiB of free memory"
        )


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``"1G"`` -> 1073741824 (K, M, G, T suffixes, optional ``iB``/``B``)."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = raw, ""
    if raw and raw[-1] in _UNITS:
        num, unit = raw[:-1], raw[-1]
    try:
        value = int(num, 0) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(
            f"bad size {text!r}: use a number with an optional K/M/G/T suffix"
        ) from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value
