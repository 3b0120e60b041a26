"""``SIGUSR2`` / ``ivshmemctl upgrade``: check the new executable, then re-execute in place.

An upgrade never leaves users without a daemon:

1. **Pre-flight.** The new image runs first as a subprocess, ``PROGRAM -m ivshmemd
   --check-upgrade ARGV`` with a snapshot of the state (:mod:`ivshmemd.handover`): it
   imports everything, parses the same command line and reads the state (its format
   version included), and exits 0 only if it can take over. Meanwhile the daemon serves on.
   If it fails (exit status, a timeout, a missing program), the daemon logs why in one line
   and goes on serving.
2. **Quiesce.** Wait until no child link is in the middle of a request or a message (each
   link is then at a message boundary), holding them so.
3. **Re-exec.** Snapshot again, at a point where no other task can run until the process
   is replaced (every peer's queue is at a message boundary: a message is one ``sendmsg``),
   and ``execve``. If ``execve`` itself fails, everything is put back and the daemon serves
   on, with a log line.

Under systemd the daemon says ``RELOADING=1`` just before the ``execve``, and the new
image ``READY=1`` once it serves.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from . import __version__
from .childlink import LinkedChild
from .handover import (
    STATE_FD_ENV,
    HandoverError,
    encode,
    execute,
    new_image_command,
    to_memfd,
)
from .resources import DaemonResources
from .sdnotify import SystemdNotifier
from .server import IvshmemServer

__all__ = ["Upgrader", "check_upgrade"]

log = logging.getLogger("ivshmemd")

PREFLIGHT_TIMEOUT: Final = 60.0
QUIESCE_TIMEOUT: Final = 5.0


@dataclass
class Upgrader:
    """What an upgrade carries: the command line, the server, the resources, the child
    processes (the control process, the federation process: held in this order, each
    exporting its entry of the state's ``children`` list)."""

    argv: Sequence[str]
    server: IvshmemServer
    held: DaemonResources
    notifier: SystemdNotifier
    children: list[LinkedChild] = field(default_factory=list)
    #: more state to carry, by key (e.g. the event stream's sequence number)
    extras: dict[str, Callable[[], Any]] = field(default_factory=dict)
    busy: bool = False
    #: upgrades done in this process's life (carried), failed in this image, and why
    done: int = 0
    failed: int = 0
    last_error: str | None = None
    #: where :meth:`request` starts upgrades (the daemon's nursery)
    nursery: trio.Nursery | None = None

    def status(self) -> dict[str, Any]:
        """How upgrades stand (``ivshmemctl status``, ``ivshmemctl upgrade``)."""
        return {"running": self.busy, "done": self.done, "failed": self.failed,
                "last_error": self.last_error}  # fmt: skip

    def request(self) -> dict[str, Any]:
        """``ivshmemctl upgrade``: start one (unless one runs); how upgrades stand."""
        if not self.busy and self.nursery is not None:
            self.busy = True  # at once: a second request sees it running
            self.nursery.start_soon(self._requested)
        return self.status()

    async def _requested(self) -> None:
        self.busy = False
        await self.upgrade()

    def snapshot(self, signalled_at: float) -> tuple[dict[str, Any], list[int]]:
        """The state and the fds it names (see :mod:`ivshmemd.handover`)."""
        children = []
        fds = [*self.held.fds(), *self.server.carried_fds()]
        for child in self.children:
            entry = child.export()
            if entry is not None:
                children.append(entry)
        for entry in children:
            fds.extend(fd for fd in (entry["link"], entry.get("stderr")) if fd is not None)
        state = {
            "pid": os.getpid(),
            "version": __version__,
            "argv": list(self.argv),
            "signalled_at": signalled_at,
            "resources": self.held.export(),
            "server": self.server.export(),
            "children": children,
            "upgrades_done": self.done,
            **{key: get() for key, get in self.extras.items()},
        }
        return state, fds

    async def upgrade(self, signalled_at: float | None = None) -> str:
        """Upgrade; returns only if it did not happen, with why (logged already)."""
        if self.busy:
            return "an upgrade is already in progress"
        self.busy = True
        try:
            signalled_at = time.monotonic() if signalled_at is None else signalled_at
            problem = await self._preflight(signalled_at)
            checked_at = time.monotonic()
            if problem is not None:
                return self._refused(problem)
            held: list[LinkedChild] = []
            with trio.move_on_after(QUIESCE_TIMEOUT):
                for child in self.children:
                    await child.hold()
                    held.append(child)
            if len(held) < len(self.children):
                for child in reversed(held):
                    child.release()
                busy = self.children[len(held)].name
                return self._refused(f"the {busy} stayed busy; try again")
            try:
                self.notifier.reloading("upgrading")
                self.server.close_lingering()
                state, fds = self.snapshot(signalled_at)
                state["checked_at"] = checked_at
                state["exec_at"] = time.monotonic()
                execute(new_image_command(self.argv), state, fds)
            except OSError as exc:
                for child in reversed(held):
                    child.release()
                self.notifier.ready(f"{len(self.server.connections)} peers connected")
                return self._refused(f"cannot execute the new ivshmemd: {exc}")
        finally:
            self.busy = False

    def _refused(self, why: str) -> str:
        log.error("upgrade not done: %s; still serving", why)
        self.failed += 1
        self.last_error = why
        return why

    async def _preflight(self, signalled_at: float) -> str | None:
        """Run the new image's ``--check-upgrade``; None if it may take over."""
        state, _fds = self.snapshot(signalled_at)
        command = new_image_command(self.argv, check=True)
        fd = to_memfd(encode(state))
        try:
            with trio.move_on_after(PREFLIGHT_TIMEOUT):
                result = await trio.run_process(
                    command, pass_fds=(fd,), env={**os.environ, STATE_FD_ENV: str(fd)},
                    capture_stdout=True, capture_stderr=True, check=False,
                    stdin=subprocess.DEVNULL,
                )  # fmt: skip
                if result.returncode == 0:
                    return None
                lines = result.stderr.decode(errors="replace").strip().splitlines()
                said = lines[-1] if lines else "(it said nothing)"
                return f"the new ivshmemd failed its check ({_status(result.returncode)}): {said}"
            return f"the new ivshmemd's check did not finish in {PREFLIGHT_TIMEOUT:g} s"
        except OSError as exc:
            return f"cannot run the new ivshmemd ({command[0]}): {exc.strerror or exc}"
        finally:
            os.close(fd)


def _status(returncode: int) -> str:
    return f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"


def check_upgrade(state: dict[str, Any], n_vectors: int) -> str:
    """The pre-flight's verdict on a state this image was handed: a line to print on
    success; :class:`HandoverError` if it cannot take over."""
    server = state.get("server")
    if not isinstance(server, dict) or not isinstance(server.get("peers"), list):
        raise HandoverError("the handover state has no server part")
    if server.get("n_vectors") != n_vectors:
        raise HandoverError(
            f"the running peers have {server.get('n_vectors')} vectors; this command line "
            f"says -n {n_vectors}"
        )
    return (
        f"ivshmemd {__version__} can take over from pid {state.get('pid')} (ivshmemd "
        f"{state.get('version')}, {len(server['peers'])} peers)"
    )
