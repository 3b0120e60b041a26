"""What a supervised child said and did, as pure data: its log, its events, its
notifications and its exit status (sans-I/O; the drivers feed it)."""

from __future__ import annotations

import json
import re
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

__all__ = ["ChildError", "ChildRecord", "LineBuffer", "exit_text", "parse_event", "parse_notify"]

#: Lines of the log and events shown in a failure message.
DESCRIBE_LOG_LINES: Final = 20
DESCRIBE_EVENTS: Final = 30


class ChildError(Exception):
    """A child did not do what was waited for: it ended first, or the wait timed out."""


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def exit_text(returncode: int | None) -> str:
    """``exit code 1``, ``killed by SIGKILL``, or ``still running``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def parse_notify(data: bytes) -> dict[str, str]:
    """The ``KEY=VALUE`` assignments of one sd_notify datagram (lines without ``=`` are
    ignored, as systemd does)."""
    fields: dict[str, str] = {}
    for line in data.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


def parse_event(line: str) -> dict[str, Any] | None:
    """One stdout line of an event stream: its JSON object, a ``stdout`` event for any other
    text, None for a blank line."""
    text = line.strip()
    if not text:
        return None
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        return {"event": "stdout", "text": text}
    return event


class LineBuffer:
    """Splits a byte stream into text lines (without their newlines)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        """The lines ``chunk`` completes."""
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        return [line.decode(errors="replace") for line in lines]

    def close(self) -> list[str]:
        """The unterminated last line, if any."""
        rest, self._pending = self._pending, b""
        return [rest.decode(errors="replace")] if rest else []


# ---------------------------------------------------------------------------------------------
# The record: what a child said and did (sans-I/O)
# ---------------------------------------------------------------------------------------------


class ChildRecord:
    """What a child process said and did: log lines, events, notifications, exit status.

    The drivers feed it (:meth:`feed_log`, :meth:`feed_events`, :meth:`feed_notify`,
    :meth:`streams_closed`, :meth:`set_exited`); callers read :attr:`log`, :attr:`events`,
    :attr:`notified`, :attr:`returncode` and ask :meth:`matching` / :meth:`log_matching`;
    :attr:`first_of` keeps the first event of each kind however many are kept
    (``event_limit``), and :attr:`signals_sent` what the supervisor sent it.
    ``on_event`` and ``on_log`` (set before the start) see each event and log line as it
    arrives.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_limit: int | None = None,
        event_limit: int | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log: deque[str] = deque(maxlen=log_limit)
        self.events: deque[dict[str, Any]] = deque(maxlen=event_limit)
        self.first_of: dict[str, dict[str, Any]] = {}  # the first event of each kind
        self.notified: dict[str, str] = {}
        self.signals_sent: set[int] = set()
        self.returncode: int | None = None
        self.pid = 0
        self.on_event: Callable[[dict[str, Any]], None] | None = None
        self.on_log: Callable[[str], None] | None = None
        self._open_streams = 0
        self._log_lines = LineBuffer()
        self._event_lines = LineBuffer()

    # -- fed by the drivers -----------------------------------------------------------------

    def feed_log(self, chunk: bytes) -> None:
        """Bytes of stderr (``b""`` at EOF)."""
        lines = self._log_lines.feed(chunk) if chunk else self._log_lines.close()
        for line in lines:
            self.log.append(line)
            if self.on_log is not None:
                self.on_log(line)

    def feed_events(self, chunk: bytes) -> None:
        """Bytes of stdout, an event stream (``b""`` at EOF)."""
        lines = self._event_lines.feed(chunk) if chunk else self._event_lines.close()
        for line in lines:
            event = parse_event(line)
            if event is None:
                continue
            self.events.append(event)
            kind = event.get("event")
            if isinstance(kind, str):
                self.first_of.setdefault(kind, event)
            if self.on_event is not None:
                self.on_event(event)

    def feed_notify(self, datagram: bytes) -> None:
        """One sd_notify datagram."""
        self.notified.update(parse_notify(datagram))

    def streams_opened(self, count: int) -> None:
        self._open_streams += count

    def streams_closed(self) -> None:
        """One output stream reached EOF."""
        self._open_streams -= 1

    def set_exited(self, returncode: int) -> None:
        """The child has exited (the first report wins)."""
        if self.returncode is None:
            self.returncode = returncode

    # -- questions --------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Not known to have exited."""
        return self.returncode is None

    @property
    def ready(self) -> bool:
        """It sent ``READY=1``."""
        return self.notified.get("READY") == "1"

    @property
    def silent(self) -> bool:
        """Nothing more can come: it has exited and its output is read to the end."""
        return self.returncode is not None and self._open_streams <= 0

    def matching(self, **fields: Any) -> list[dict[str, Any]]:
        """The events so far whose fields have these values."""
        return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]

    def log_matching(self, pattern: str) -> list[str]:
        """The log lines so far that match the regular expression."""
        rx = re.compile(pattern)
        return [line for line in self.log if rx.search(line)]

    def count(self, pattern: str) -> int:
        """How many log lines so far match the regular expression."""
        return len(self.log_matching(pattern))

    def describe(self) -> str:
        """Who it is, how it ended, its last events and log lines: for failure messages."""
        events = "\n".join(json.dumps(e) for e in list(self.events)[-DESCRIBE_EVENTS:])
        log = "\n".join(list(self.log)[-DESCRIBE_LOG_LINES:])
        text = f"{self.argv[:6]} (pid {self.pid}, {exit_text(self.returncode)})"
        if events:
            text += f"; last events:\n{events}"
        return text + f"\nlast log lines:\n{log or '(none)'}"

    # -- conditions the drivers wait on: None until met ---------------------------------------

    def _events_found(self, count: int, fields: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        found = self.matching(**fields)
        return found[:count] if len(found) >= count else None

    def _log_found(self, pattern: str, count: int) -> list[str] | None:
        found = self.log_matching(pattern)
        return found[:count] if len(found) >= count else None

    def _ready_found(self) -> bool | None:
        return True if self.ready else None

    # -- signals (each driver sends them its way) ----------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Signal it unless it is known to have exited (so its pid cannot be reused)."""
        raise NotImplementedError

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def error(self, what: str, timeout: float) -> ChildError:
        """The error for a wait that failed; subclasses may raise their own kind."""
        why = "ended" if self.silent else f"did not within {timeout:g} s"
        return ChildError(f"expected {what}; the child {why}: {self.describe()}")
