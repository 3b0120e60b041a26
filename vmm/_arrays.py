"""Small numpy helpers shared by the bulk paths (sorted fast paths avoid hashing)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["unique_first", "unique_sorted"]


def unique_first(x: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
    """Distinct values of ``x`` in order of first occurrence, and where each first occurs."""
    n = x.shape[0]
    if n == 0:
        return x.copy(), np.empty(0, dtype=np.int64)
    if n == 1 or bool(np.all(x[1:] >= x[:-1])):
        keep = np.empty(n, dtype=np.bool_)
        keep[0] = True
        np.not_equal(x[1:], x[:-1], out=keep[1:])
        pos = np.flatnonzero(keep)
        return x[pos], pos
    order = np.argsort(x, kind="stable")
    xs = x[order]
    keep = np.empty(n, dtype=np.bool_)
    keep[0] = True
    np.not_equal(xs[1:], xs[:-1], out=keep[1:])
    firsts = order[keep]
    firsts.sort()
    return x[firsts], firsts.astype(np.int64)


def unique_sorted(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Distinct values of ``x``, ascending."""
    n = x.shape[0]
    if n <= 1:
        return x.copy()
    xs = x if bool(np.all(x[1:] >= x[:-1])) else np.sort(x)
    keep = np.empty(n, dtype=np.bool_)
    keep[0] = True
    np.not_equal(xs[1:], xs[:-1], out=keep[1:])
    return xs[keep]
