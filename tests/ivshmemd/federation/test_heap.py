"""The federation process keeps freed heap blocks: a diff's blocks (its snapshot, masks and
copies, up to a MiB each) are reused by the next diff instead of being faulted in anew.
Measured in a child process (the allocator's settings are the whole process's), as minor
page faults per diff of 1 MiB."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import resource, sys
import numpy as np
from ivshmemd.federation.heap import keep_freed_blocks
from ivshmemd.federation.twin import Twin
tuned = sys.argv[1] == "tuned" and keep_freed_blocks()
region = np.zeros(4 << 20, dtype=np.uint8)
twin = Twin(region)
pages = region.reshape(-1, 4096)
diffs = []
for i in range(33):
    if i == 3:  # the first diffs fault their blocks in either way
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    first = (300 * i) % (twin.npages - 256)
    written = np.arange(first, first + 256, dtype=np.int64)
    pages[written] ^= 0xFF
    diffs = [twin.collect(written)]  # held until the next one, as frames are
print(int(tuned), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 30)
"""


def _faults_per_diff(mode: str) -> tuple[bool, int]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    tuned, faults = done.stdout.split()
    return tuned == "1", int(faults)


def test_a_diffs_blocks_are_reused_not_faulted_in_anew() -> None:
    tuned, faults = _faults_per_diff("tuned")
    if not tuned:  # not glibc: nothing is tuned
        return
    assert faults < 128, f"{faults} page faults per diff of 256 pages"
    _, untuned = _faults_per_diff("untuned")
    assert untuned > 256, f"glibc kept the blocks by itself ({untuned} faults per diff)"
