"""Rate-limited log lines: a flood of identical refusals costs one line per interval.

A hostile or broken client can make the daemon refuse thousands of connections a second;
logging each one would fill the disk (and cost more than the refusal). :class:`LogLimiter`
lets the first line of each kind through, then at most one per ``interval`` seconds, which
says how many were suppressed since the last one. Its memory is bounded: past ``max_keys``
kinds (a flood of distinct refused keys or addresses), it forgets them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LogLimiter"]

DEFAULT_INTERVAL = 1.0
DEFAULT_MAX_KEYS = 1024


class LogLimiter:
    """``limiter.log(key, level, fmt, *args)``: at most one line per key per interval."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self.max_keys = max_keys
        #: key -> (time of the last line, lines suppressed since)
        self._state: dict[str, tuple[float, int]] = {}

    def log(self, key: str, level: int, fmt: str, *args: object) -> bool:
        """Log (or count) one line of kind ``key``; True if it was written."""
        now = self._clock()
        last, suppressed = self._state.get(key, (None, 0))
        if last is not None and now - last < self.interval:
            self._state[key] = (last, suppressed + 1)
            return False
        if suppressed and last is not None:
            fmt += " (and %d more like it in the last %.0f s)"
            args = (*args, suppressed, now - last)
        if key not in self._state and len(self._state) >= self.max_keys:
            self._state.clear()
        self._state[key] = (now, 0)
        self.logger.log(level, fmt, *args)
        return True
