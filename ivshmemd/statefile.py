"""The daemon's state file: what systemd's fd store cannot say, kept current on disk.

After a crash, systemd hands back the daemon's fds by name (:mod:`ivshmemd.fdstore`); what
they do not carry is in this small file: the peers in connection order with their
credentials and connect times, the id allocator's position, and which peers still had
messages queued (a crash lost those messages: such a peer is dropped at restart, its
leave announced, rather than left with a stream that misses part of the protocol).

It lives in ``$RUNTIME_DIRECTORY`` (``RuntimeDirectoryPreserve=restart`` keeps it across a
restart) as ``<socket name>.state``, or beside the socket without one. Keeping it current
must cost the join path little, so it is a *snapshot* followed by *records*: a join or a
leave appends one small record (one ``write``, whatever the number of peers), and once the
records outnumber the peers the file is compacted: a new snapshot is written to a fresh
temporary file (``O_CREAT|O_EXCL``, so never through a symlink) and renamed over the old one.
A crash at any point leaves a snapshot and the records that were complete (a torn last
record is ignored). msgpack, with a format version in the snapshot: a file in a format this
version does not know is ignored with a log line (its peers are then announced as left,
since nothing can be said about them). What the records mean is the writer's business
(:mod:`ivshmemd.crashsafe`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
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
    """One state file path: :meth:`write` a snapshot (atomic), :meth:`append` a record,
    :meth:`read` both back, :meth:`remove`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ident: tuple[int, int] | None = None
        self._fd = -1
        #: records appended since the last snapshot
        self.records = 0

    def write(self, state: Mapping[str, Any]) -> None:
        """Replace the file with the snapshot ``state`` (plus the format); raises OSError."""
        data = msgpack.packb({"format": FORMAT, **state}, use_bin_type=True)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.", dir=directory)
        try:
            os.write(fd, data)
            os.rename(tmp, self.path)  # replaces a planted symlink, never follows it
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            os.close(fd)
            raise
        self._close()
        self._fd, self._ident, self.records = fd, identity(os.fstat(fd)), 0

    def append(self, record: Sequence[Any]) -> None:
        """Add a record after the snapshot (one ``write``); raises OSError. Without a
        snapshot written by this process, there is nothing to append to: a no-op."""
        if self._fd < 0:
            return
        os.write(self._fd, msgpack.packb(record, use_bin_type=True))
        self.records += 1

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

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
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=MAX_BYTES)
        unpacker.feed(data)
        try:
            state = next(unpacker)
        except Exception as exc:
            raise StateFileError(f"state file {self.path} is not readable: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            raise StateFileError(
                f"state file {self.path} has format {found!r}; this ivshmemd reads format {FORMAT}"
            )
        records: list[Any] = []
        with contextlib.suppress(Exception):  # a torn or garbled tail ends the records
            records.extend(record for record in unpacker if isinstance(record, list))
        state["records"] = records
        return state

    def remove(self) -> None:
        """Remove the file if it is the one this process wrote last."""
        if self._ident is not None and still_names(self.path, self._ident):
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self._ident = None
        self._close()
