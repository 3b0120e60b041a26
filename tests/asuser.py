"""Run test code as another user without re-executing Python.

``setpriv --reuid=65534 python ...`` needs the other user to reach this checkout's venv and
its Python, which it cannot when the checkout lives in a private directory (a ``mktemp -d``
clone, a 0700 home). So the test process forks, the child drops its privileges (no
supplementary groups, then the gid, then the uid) and runs a function that is already
imported, and reports through a pipe; nothing is read from disk after the drop.

:func:`run_as` returns the child's exit status and what it wrote on stdout and stderr.
:func:`daemon_as` is a ``daemon_process(wrapper=...)`` prefix that runs ``ivshmemd`` the
same way (imported first, privileges dropped, then its ``main``).
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["NOBODY", "daemon_as", "run_as"]

NOBODY = 65534
TIMEOUT = 30.0


def _preload() -> None:
    """Modules Python imports lazily (codecs), loaded while the files are still readable."""
    for codec in ("ascii", "utf_8", "latin_1", "idna"):
        __import__(f"encodings.{codec}")


def _drop(uid: int, gid: int) -> None:
    _preload()
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def run_as(uid: int, fn: Callable[..., int], *args: Any, gid: int | None = None,
           timeout: float = TIMEOUT) -> tuple[int, str]:  # fmt: skip
    """Fork, become ``uid`` (and ``gid``, default the same number), run ``fn(*args)`` and
    exit with what it returns. Returns ``(status, stdout + stderr)``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        status = 1
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
            sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
            _drop(uid, uid if gid is None else gid)
            status = int(fn(*args))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # report anything else to the parent
            print(f"run_as child failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    chunks = []
    deadline = timeout
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], deadline)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the child running as uid {uid} did not finish")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _pid, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), b"".join(chunks).decode(errors="replace")


def daemon_as(uid: int, gid: int | None = None) -> list[str]:
    """A ``wrapper`` for :func:`ivshmemd.supervise.daemon_process`: the daemon runs as ``uid``.
    (``python -m tests.asuser UID GID`` then the daemon's own argv.)"""
    return [sys.executable, "-m", "tests.asuser", str(uid), str(uid if gid is None else gid)]


def _main(argv: list[str]) -> int:
    """``python -m tests.asuser UID GID PYTHON -m ivshmemd ARGS...``."""
    uid, gid, rest = int(argv[0]), int(argv[1]), argv[2:]
    if rest[1:3] != ["-m", "ivshmemd"]:
        print(f"tests.asuser: expected PYTHON -m ivshmemd ..., got {rest}", file=sys.stderr)
        return 2
    from ivshmemd import cli  # everything the daemon runs is imported before the drop

    _drop(uid, gid)
    return cli.main(rest[3:])


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
