"""A throttle for repeated warnings: a refused daemon retries every few seconds, and a
hostile one may send junk in a loop; the log should say so once in a while, not each time."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Final

__all__ = ["WARN_EVERY", "Throttle"]

#: Seconds between two loud logs of the same thing.
WARN_EVERY: Final = 30.0


class Throttle:
    """``allow(key, now)`` is True at most once per ``every`` seconds for each key. Memory
    stays bounded: past ``max_keys`` keys it forgets them all (and may log again)."""

    def __init__(self, every: float = WARN_EVERY, max_keys: int = 1024) -> None:
        self.every = every
        self.max_keys = max_keys
        self._last: dict[Hashable, float] = {}

    def allow(self, key: Hashable, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            return False
        if len(self._last) >= self.max_keys:
            self._last.clear()
        self._last[key] = now
        return True
