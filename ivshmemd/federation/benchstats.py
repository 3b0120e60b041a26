"""What the federation's two benchmarks share (:mod:`ivshmemd.federation.bench`, the relay
alone; :mod:`ivshmemd.federation.bench_fabric`, real daemons): the CPUs to pin the two sides
to, and a percentile. Its own module, so that neither benchmark imports the other's internals
(``bench`` dispatches ``fabric`` to ``bench_fabric``: the arrow points one way)."""

from __future__ import annotations

import os

__all__ = ["percentile", "two_cpus"]


def two_cpus() -> tuple[int | None, int | None]:
    """Two CPUs this process may run on (one per side of a measurement), or none."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return available[0], available[1]


def percentile(samples: list[float], fraction: float) -> float:
    """The sample at ``fraction`` (0..1) of the sorted samples (nearest rank, no interpolation)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]
