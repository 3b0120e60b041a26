"""Where the daemon's log lines go: stderr, syslog, or a file that SIGHUP reopens.

* In the foreground: stderr, unless ``--log-file`` is given.
* Daemonized: ``--log-file`` if given, else syslog through ``/dev/log``; where there is no
  ``/dev/log`` (containers), a file in the daemon's runtime directory (``$RUNTIME_DIRECTORY``
  under systemd, else the socket's directory), named after the socket: ``SOCKET.log``. A
  daemon never logs to nowhere.

A log file is opened with ``O_APPEND | O_CREAT | O_NOFOLLOW`` (mode 0640): a symlink planted
at its path is refused, never followed. It must be a regular file or a character device, and
a first line is written at once, so a path that cannot take log lines (a directory, a
missing directory, ``/proc/version``) is one clear start-up error instead of a traceback
later. :meth:`LogTarget.reopen` (the daemon calls it on SIGHUP) opens the path again, as
logrotate expects after renaming the file; if that fails, logging continues to the old file
and the failure is logged.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import stat
import sys
from dataclasses import dataclass
from typing import TextIO

__all__ = ["LogSetupError", "LogTarget", "configure_logging", "fallback_log_path"]

_FILE_FORMAT = "%(asctime)s ivshmemd[%(process)d]: %(message)s"
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


class LogSetupError(Exception):
    """The log destination cannot be used (the message says why)."""


def _open_log_file(path: str, *, probe: bool = False) -> TextIO:
    try:
        fd = os.open(path, _FLAGS, 0o640)
    except OSError as exc:
        reason = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
        raise LogSetupError(f"cannot open log file {path}: {reason}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISCHR(mode)):
            raise LogSetupError(f"cannot log to {path}: not a regular file")
        if probe:  # a file that opens but cannot be written fails now, not later
            try:
                os.write(fd, f"ivshmemd[{os.getpid()}]: logging to {path}\n".encode())
            except OSError as exc:
                raise LogSetupError(f"cannot write to log file {path}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    # "w" on an O_APPEND fd appends and, unlike "a", does not seek (/proc files refuse that)
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8", errors="replace")


class _FileHandler(logging.StreamHandler[TextIO]):
    """A stream handler on a file we opened safely, which :meth:`reopen` replaces."""

    def __init__(self, path: str) -> None:
        super().__init__(_open_log_file(path, probe=True))
        self.path = path

    def reopen(self) -> None:
        """Open the path afresh (after logrotate renamed it); raises LogSetupError."""
        stream = _open_log_file(self.path)
        self.acquire()
        try:
            old = self.setStream(stream)
        finally:
            self.release()
        if old is not None:
            old.close()

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            super().close()


@dataclass
class LogTarget:
    """The configured destination: a description for humans, and the file (if any)."""

    description: str
    handler: logging.Handler

    @property
    def path(self) -> str | None:
        """The log file, when logging to one."""
        return self.handler.path if isinstance(self.handler, _FileHandler) else None

    def reopen(self) -> str:
        """Reopen the log file (SIGHUP); returns what happened, for the log."""
        if not isinstance(self.handler, _FileHandler):
            return f"nothing to reopen (logging to {self.description})"
        self.handler.reopen()
        return f"log file {self.handler.path} reopened"


def fallback_log_path(socket_path: str) -> str:
    """The log file of a daemon with neither --log-file nor /dev/log."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    directory = runtime or os.path.dirname(os.path.abspath(socket_path))
    return os.path.join(directory, os.path.basename(socket_path) + ".log")


def configure_logging(
    logger: logging.Logger,
    *,
    verbose: bool,
    log_file: str | None,
    daemonized: bool,
    socket_path: str,
    syslog_path: str = "/dev/log",
) -> LogTarget:
    """Send ``logger``'s lines where the module docstring says; raises LogSetupError."""
    handler: logging.Handler
    if log_file:
        handler = _FileHandler(log_file)
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        target = LogTarget(log_file, handler)
    elif daemonized and os.path.exists(syslog_path):
        handler = logging.handlers.SysLogHandler(address=syslog_path)
        handler.setFormatter(logging.Formatter("ivshmemd[%(process)d]: %(message)s"))
        target = LogTarget(f"syslog ({syslog_path})", handler)
    elif daemonized:
        path = fallback_log_path(socket_path)
        handler = _FileHandler(path)
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        target = LogTarget(path, handler)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ivshmemd: %(message)s"))
        target = LogTarget("stderr", handler)
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    return target
