"""The daemon's state file: what systemd's fd store cannot say, kept current on disk.

After a crash, systemd hands back the daemon's fds by name (:mod:`ivshmemd.fdstore`); what
they do not carry is in this small file: the peers in connection order with their
credentials and connect times, the id allocator's position, and which peers still had
messages queued (a crash lost those messages: such a peer is dropped at restart, its
leave announced, rather than left with a stream that misses part of the protocol).

It lives in ``$RUNTIME_DIRECTORY`` (``RuntimeDirectoryPreserve=restart`` keeps it across a
restart) as ``<socket name>.state``, or beside the socket without one. It is rewritten whole
on every join and leave, atomically: written to a fresh temporary file (``O_CREAT|O_EXCL``,
so never through a symlink), then renamed over the old one, so a crash at any point leaves
either the previous version or the new one, never a torn file. msgpack, with a format
version: a file in a format this version does not know is ignored with a log line (its
peers are then announced as left, since nothing can be said about them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from .lockfile import identity, still_names

__all__ = ["FORMAT", "StateFile", "StateFileError", "state_path"]

log = logging.getLogger("ivshmemd")

FORMAT: Final = 1
#: a state file larger than this is not ours (65,536 peers fit well below)
MAX_BYTES: Final = 16 << 20


class StateFileError(Exception):
    """The state file cannot be read or used (the message says why)."""


def state_path(socket_path: str, environ: Mapping[str, str] | None = None) -> str:
    """``$RUNTIME_DIRECTORY/<socket name>.state``, else ``SOCKET.state``."""
    env = os.environ if environ is None else environ
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return os.path.join(runtime, os.path.basename(socket_path) + ".state")
    return socket_path + ".state"


class StateFile:
    """One state file path: :meth:`write` (atomic), :meth:`read`, :meth:`remove`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ident: tuple[int, int] | None = None

    def write(self, state: Mapping[str, Any]) -> None:
        """Replace the file with ``state`` (plus the format); raises OSError."""
        data = msgpack.packb({"format": FORMAT, **state}, use_bin_type=True)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", dir=directory)
        try:
            os.write(fd, data)
            self._ident = identity(os.fstat(fd))
            os.rename(tmp, self.path)  # replaces a planted symlink, never follows it
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)

    def read(self) -> dict[str, Any] | None:
        """The state, or None when there is no file; raises :class:`StateFileError`."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"cannot read state file {self.path}: {exc.strerror}") from None
        try:
            data = os.read(fd, MAX_BYTES + 1)
            if os.fstat(fd).st_uid != os.geteuid():
                raise StateFileError(f"state file {self.path} is not ours; ignoring it")
        finally:
            os.close(fd)
        if len(data) > MAX_BYTES:
            raise StateFileError(f"state file {self.path} is too large to be ours")
        try:
            state = msgpack.unpackb(data, raw=False, strict_map_key=False)
        except Exception as exc:
            raise StateFileError(f"state file {self.path} is not readable: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            raise StateFileError(
                f"state file {self.path} has format {found!r}; this ivshmemd reads format {FORMAT}"
            )
        return state

    def remove(self) -> None:
        """Remove the file if it is the one this process wrote last."""
        if self._ident is not None and still_names(self.path, self._ident):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._ident = None
