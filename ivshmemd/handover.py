"""In-place re-execution: the daemon's whole state handed to a new image of itself, same PID.

On ``SIGUSR2`` (or ``ivshmemctl upgrade``) the daemon serialises everything it serves with
into a memfd and ``execve``s whatever ``ivshmemd`` is installed now, with its original
argv and ``IVSHMEMD_HANDOVER_FD`` naming the memfd. The fds it holds stay open across the
``execve`` (close-on-exec is cleared on exactly those: the listening socket, every peer's
connection and eventfds, the shm and its lock, the liveness lock, the pid file, the child
processes' links), so no peer sees anything: no EOF, no join, no leave. The new image
restores and serves (:func:`inherited` reads the state back) and sets close-on-exec on them
again.

The state is msgpack, a map with ``magic``, ``format`` (:data:`FORMAT_VERSION`) and:

``pid``         the process's pid (a state is only ever restored in the same process)
``version``     the ``ivshmemd`` version that wrote it (for the log)
``argv``        the command line, as given
``resources``   :meth:`ivshmemd.resources.DaemonResources.export`
``server``      :meth:`ivshmemd.server.IvshmemServer.export` (registry, queues, counters)
``children``    one entry per child process link (``kind``: ``control``, and any sibling
                such as a federation process), each adopted by the new image
``events``      the event sequence number and the events not yet passed on
``carried``     every fd number carried

An image that does not know the format refuses it with one line. That is checked *before*
the old image is gone: the new executable first runs as ``ivshmemd --check-upgrade ARGV``
with the state, and only if that exits 0 does the daemon ``execve`` (see
:mod:`ivshmemd.upgrade`).

Signals: the ones the daemon handles are blocked across the ``execve`` (the new image
unblocks them once its handlers are in place), so a ``SIGTERM`` or another ``SIGUSR2``
arriving meanwhile is delivered then, not acted on by the default disposition.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Final, NoReturn

import msgpack

from . import __version__, signals

__all__ = [
    "EXECUTABLE_ENV",
    "FORMAT_VERSION",
    "STATE_FD_ENV",
    "HandoverError",
    "decode",
    "encode",
    "execute",
    "inherited",
    "new_image_command",
    "to_memfd",
]

log = logging.getLogger("ivshmemd")

FORMAT_VERSION: Final = 1
MAGIC: Final = "ivshmemd-handover"
#: names the memfd holding the state, in the new image's environment
STATE_FD_ENV: Final = "IVSHMEMD_HANDOVER_FD"
#: the program an upgrade runs instead of ``sys.executable`` (``PROGRAM -m ivshmemd ARGV``):
#: a wrapper, another venv's interpreter; documented for tests and unusual installs
EXECUTABLE_ENV: Final = "IVSHMEMD_UPGRADE_EXECUTABLE"
MAX_STATE_BYTES: Final = 256 << 20


class HandoverError(Exception):
    """The state cannot be used by this image (the message says why, in one line)."""


def encode(state: Mapping[str, Any]) -> bytes:
    """The state as bytes, with the magic and the format version."""
    data: bytes = msgpack.packb(
        {"magic": MAGIC, "format": FORMAT_VERSION, **state}, use_bin_type=True
    )
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Bytes back to the state; :class:`HandoverError` for anything but our format."""
    try:
        state = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:
        raise HandoverError(f"the handover state is not readable: {exc}") from None
    if not isinstance(state, dict) or state.get("magic") != MAGIC:
        raise HandoverError("the handover state is not an ivshmemd state")
    found = state.get("format")
    if found != FORMAT_VERSION:
        writer = state.get("version", "?")
        raise HandoverError(
            f"the running ivshmemd ({writer}) hands over its state in format {found!r}; "
            f"this ivshmemd ({__version__}) reads format {FORMAT_VERSION} only"
        )
    return state


def to_memfd(data: bytes) -> int:
    """A memfd (close-on-exec until :func:`execute` clears it) holding ``data``."""
    fd = os.memfd_create("ivshmemd-handover", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    if size > MAX_STATE_BYTES:
        raise HandoverError(f"the handover state is too large ({size} bytes)")
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def inherited(
    environ: MutableMapping[str, str] | None = None, *, same_process: bool = True
) -> dict[str, Any] | None:
    """The state handed to this image, or None when started afresh. The variable is
    removed and the memfd closed; ``same_process`` checks that the state is this pid's
    (the pre-flight check reads another's). Raises :class:`HandoverError`."""
    env = os.environ if environ is None else environ
    text = env.pop(STATE_FD_ENV, None)
    if text is None:
        return None
    if not text.isdigit():
        raise HandoverError(f"{STATE_FD_ENV}={text!r} is not an fd")
    fd = int(text)
    try:
        data = _read_all(fd)
    except OSError as exc:
        raise HandoverError(f"cannot read the handover state (fd {fd}): {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    state = decode(data)
    if same_process:
        if state.get("pid") != os.getpid():
            raise HandoverError(
                f"the handover state belongs to pid {state.get('pid')}, not to this one "
                f"({os.getpid()})"
            )
        set_inheritable(state.get("carried", ()), False)
    return state


def new_image_command(argv: Sequence[str], *, check: bool = False) -> list[str]:
    """``PROGRAM -m ivshmemd [--check-upgrade] ARGV``: the new image (``PROGRAM`` is
    ``$IVSHMEMD_UPGRADE_EXECUTABLE`` or this interpreter)."""
    program = os.environ.get(EXECUTABLE_ENV) or sys.executable
    return [program, "-m", "ivshmemd", *(["--check-upgrade"] if check else []), *argv]


def set_inheritable(fds: Iterable[int], inheritable: bool) -> None:
    """Clear (or set again) close-on-exec on each fd."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, inheritable)


def unblock_signals() -> None:
    """Deliver the signals blocked across the ``execve`` (once their handlers are set)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.HANDLED)


def execute(command: Sequence[str], state: Mapping[str, Any], fds: Sequence[int]) -> NoReturn:
    """Replace this process with ``command``, carrying ``fds`` and the state.

    Returns only by raising: :class:`OSError` if the ``execve`` failed, after putting
    everything back (close-on-exec, the signal mask), so the caller serves on.
    """
    carried = sorted(set(fds))
    state_fd = to_memfd(encode({**state, "carried": carried}))
    env = dict(os.environ)
    env[STATE_FD_ENV] = str(state_fd)
    for handler in logging.getLogger("ivshmemd").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    set_inheritable([*carried, state_fd], True)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals.HANDLED)
    try:
        os.execve(shutil.which(command[0]) or command[0], list(command), env)
    except OSError:
        unblock_signals()
        set_inheritable(carried, False)
        os.close(state_fd)
        raise
    raise AssertionError("unreachable")  # pragma: no cover
