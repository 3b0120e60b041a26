"""Benchmarks of the VMM model, modelled on KVM's selftests (figures printed, nothing asserted).

``python -m vmm.bench pagetable``  kvm_page_table_test: CREATE / UPDATE / ADJUST stage times.
``python -m vmm.bench dirty-log``  dirty_log_perf_test: populate, per-iteration dirty / get /
clear times, and the per-page walker comparison on a fully mapped range.
``python -m vmm.bench access``     the per-access path (TLB hit, TLB miss, first touch) against
``struct.pack_into`` on a bytearray, measured in the same run.
"""

from __future__ import annotations

import os

from ..sizes import parse_positive_size as parse_size

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
