"""What ``ivshmemctl up`` shows: a live progress line on a terminal, plain status lines
otherwise, and result lines on stdout."""

from __future__ import annotations

import os
import shutil
from typing import TextIO

__all__ = ["Display"]


class Display:
    """Status output on ``err``: a live progress line on a terminal, plain lines otherwise.
    Results (the running-time line, the summaries) go to ``out``. A stream whose reader has
    gone (``ivshmemctl up ... | head -1``) is dropped quietly: the run itself goes on and
    ends cleanly."""

    def __init__(self, out: TextIO, err: TextIO, *, live: bool | None = None) -> None:
        self.out = out
        self.err = err
        self.live = err.isatty() if live is None else live
        self._status = ""
        self._gone: set[int] = set()

    def _write(self, stream: TextIO, text: str) -> None:
        if id(stream) in self._gone:
            return
        try:
            stream.write(text)
            stream.flush()
        except BrokenPipeError:
            self._gone.add(id(stream))
            devnull = os.open(os.devnull, os.O_WRONLY)  # so that the flush at exit is quiet
            try:
                os.dup2(devnull, stream.fileno())
            except (OSError, ValueError):
                pass
            finally:
                os.close(devnull)

    def _clear(self) -> None:
        if self.live and self._status:
            self._write(self.err, "\r\x1b[K")

    def _draw(self) -> None:
        if self.live and self._status:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            self._write(self.err, self._status[:width])

    def status(self, text: str) -> None:
        """Replace the progress line (terminal only)."""
        if not self.live or text == self._status:
            return
        self._clear()
        self._status = text
        self._draw()

    def line(self, text: str) -> None:
        """A status line on stderr (above the progress line on a terminal)."""
        self._clear()
        self._write(self.err, f"up: {text}\n")
        self._draw()

    def result(self, text: str) -> None:
        """A result line on stdout."""
        self._clear()
        self._write(self.out, text + "\n")
        self._draw()

    def write_held(self, results: str, lines: str) -> None:
        """What was held back while a full-screen view had the terminal, written now."""
        if results:
            self._write(self.out, results)
        if lines:
            self._write(self.err, lines)

    def close(self) -> None:
        self._clear()
        self._status = ""
