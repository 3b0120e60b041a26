"""The daemon's side of its federation process (:mod:`ivshmemd.federation.process`).

The daemon never runs libzmq (see :mod:`ivshmemd.control.process`), so the federation runs in a
process of its own, a sibling of the control process, started and restarted by the daemon
and linked to it by one :class:`~ivshmemd.fdlink.FdLink` (a plain child process and a unix
socket pair, nothing else: a handover can carry both). The daemon keeps the registry and
the protocol:

* a local peer admitted or gone is passed on at once (:class:`ivshmemd.server.
  FederationSeam`), with its eventfds, from the server's own synchronous step;
* a remote peer announced by the federation is registered here
  (:meth:`ivshmemd.server.IvshmemServer.add_remote`: eventfds made by the registry, join
  notices queued) and its eventfds are handed back (``remote-ok``), which is what lets the
  federation deliver that member's rings; a remote leave is announced the same way;
* members' events go to the event stream, and the federation's status (kept fresh by the
  process) to ``ivshmemctl status``.

If the process dies, the daemon logs how, announces every remote peer as left (their
eventfds were only watched over there), and starts a new one after a short, growing delay;
it sends it every local peer before it starts, so members see a restarted incarnation and
local peers see only leave and join notices.

Across an upgrade in place (:mod:`ivshmemd.upgrade`) the process runs on: the old image
exports its pid and link (:meth:`FederationProcess.export`, once nothing is queued on the
link), the new one adopts them before it serves (:meth:`FederationProcess.adopt`), and the
remote peers stay registered (:meth:`ivshmemd.server.IvshmemServer.export`). After a crash
under systemd the remote peers are restored from the fd store (:mod:`ivshmemd.crashsafe`);
the new process's members announce them again, and each is kept as it was (``remote-ok``
with its eventfds, no notice to local peers); those not announced within
``--federation-timeout`` leave.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any, Final

import trio

from .childlink import AdoptedProcess, ChildLinkEntry
from .errors import unwrap
from .fdlink import FdLink, LinkClosed, LinkError, link_pair
from .federation.config import FederationConfig
from .federation.process import config_to_wire
from .ratelimit import LogLimiter
from .registry import Peer
from .server import IvshmemServer
from .supervise.record import exit_text

__all__ = ["FederationProcess", "FederationSetupError"]

log = logging.getLogger("ivshmemd")

#: how long the federation process may take to start serving, and to stop
START_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 5.0
#: delays before restarting a process that died: from, to (doubling)
RESTART_DELAYS: Final = (0.1, 5.0)
#: a process that served this long has its restart delay reset
STABLE_AFTER: Final = 30.0

MemberListener = Callable[[str, Mapping[str, Any]], None]
#: a federation process this image started, or one an earlier image did (after a re-exec)
_Process = trio.Process | AdoptedProcess


class FederationSetupError(Exception):
    """The federation could not start (the message says why)."""


class FederationProcess:
    """The daemon's handle on its federation process (see the module docstring)."""

    name = "federation process"

    def __init__(
        self, config: FederationConfig, server: IvshmemServer, *, verbose: bool = False
    ) -> None:
        self.config = config
        self.server = server
        self.verbose = verbose
        self.restarts = 0
        self.pid: int | None = None
        #: where members reach us, and who we are (set once the first process is ready)
        self.endpoint: str | None = None
        self.identity: str | None = None
        #: called with (kind, info) for member-joined, member-left, member-refused
        self.member_listeners: list[MemberListener] = []
        self._status: dict[str, Any] = {}
        self._link: FdLink | None = None
        self._process: _Process | None = None
        self._chatter = LogLimiter(log)
        self._adopted: tuple[AdoptedProcess, FdLink] | None = None
        #: remote peers restored after a crash (:mod:`ivshmemd.crashsafe`), each kept as
        #: its member announces it again, announced as left if it does not in time
        self._restored: set[int] = set()

    # -- handover (ivshmemd.handover): the process runs on across an execve --------------

    async def hold(self) -> None:
        """Wait until every message queued for the process is on the link (each link
        message is one packet and is handled in one synchronous step, so the link is then
        at a message boundary both ways). Nothing queues again before the ``execve`` (no
        checkpoint in between), so :meth:`release` has nothing to undo."""
        link = self._link
        while link is not None and link.queued:
            await trio.sleep(0.001)
            link = self._link

    def release(self) -> None:
        """The handover did not happen: nothing was stopped (see :meth:`hold`)."""

    def export(self) -> ChildLinkEntry | None:
        """This child's entry in the handover state (after :meth:`hold`); None while no
        federation process runs (the next image starts one). A process caught starting or
        stopping has an entry without a link: the next image reaps it."""
        process, link = self._process, self._link
        if process is None:
            return None
        if link is None or link.queued:
            return {"kind": "federation", "pid": process.pid, "link": None}
        stderr = process.stderr
        return {
            "kind": "federation", "pid": process.pid, "link": link.fileno(),
            "stderr": stderr.fileno() if isinstance(stderr, trio.lowlevel.FdStream) else None,
            "endpoint": self.endpoint, "identity": self.identity, "status": self._status,
            "restarts": self.restarts,
        }  # fmt: skip

    def adopt(self, entry: ChildLinkEntry) -> None:
        """Serve on with the federation process an earlier image of this process started
        (:meth:`run` then serves through it instead of starting one: members see nothing).
        Call it before the server serves: local joins and leaves go to it from then on."""
        process = AdoptedProcess(int(entry["pid"]), entry["stderr"])
        self._link = FdLink(socket.socket(fileno=int(entry["link"])))
        self._adopted = (process, self._link)
        self.endpoint, self.identity = entry["endpoint"], entry["identity"]
        self._status = dict(entry.get("status") or {})
        self.restarts = int(entry.get("restarts", 0))
        self.server.federation = self

    # -- the server's seam (synchronous, never raises) -----------------------------------

    def local_peer_joined(self, peer: Peer) -> None:
        self._send("local-joined", peer.peer_id, _pid(peer), fds=[v.fd for v in peer.vectors])

    def local_peer_left(self, peer_id: int) -> None:
        self._send("local-left", peer_id)

    def _send(self, *message: Any, fds: list[int] | None = None) -> None:
        link = self._link
        if link is None:  # between two processes: the next one gets the whole table
            return
        try:
            link.send(*message, fds=fds or ())
        except (LinkError, OSError) as exc:
            log.error("federation process: %s; restarting it", exc)
            self._stop_process()

    def _stop_process(self) -> None:
        self._link = None
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    # -- for the control plane -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The federation for ``ivshmemctl status``: the process's last report (members,
        refusals, counters) and the process itself."""
        status = dict(self._status) or {"running": False, "listen": self.config.listen}
        status.update(
            process={"pid": self.pid, "restarts": self.restarts},
            remote_peers=len(self.server.remote),
        )
        if self._link is None:
            status["running"] = False
        return status

    def state_lines(self) -> list[str]:
        """The federation in a few log lines (SIGUSR1)."""
        status = self.status()
        process = status["process"]
        lines = [
            f"state: federation process: pid {process['pid']}, {process['restarts']} restarts; "
            f"{status['remote_peers']} remote peers"
        ]
        for member in status.get("members", []):
            rtt = member.get("rtt")
            lines.append(
                f"state: member {member['member']} ({member['endpoint']}): {member['state']}, "
                f"ids {member['id_range'][0]}-{member['id_range'][1]}, {member['peers']} peers"
                + ("" if rtt is None else f", rtt {rtt * 1e6:.0f} us")
                + ("" if not member.get("reason") else f" ({member['reason']})")
            )
        return lines

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the federation process (``nursery.start`` returns the endpoint it listens
        on, or raises :class:`FederationSetupError`) and keep one running until cancelled."""
        self.server.federation = self
        if self._adopted is None:
            self._restored = set(self.server.remote)
        delay = RESTART_DELAYS[0]
        first = True
        try:
            while True:
                started = trio.current_time()
                try:
                    outcome = await self._one_life(task_status if first else None)
                except Exception as exc:  # trio may have wrapped it in a group: look inside
                    failure = unwrap(exc)
                    if not isinstance(failure, FederationSetupError):
                        raise
                    if first:  # the daemon's start-up reports it
                        raise failure from None
                    outcome = str(failure)  # later: an outage of the federation only
                first = False
                if trio.current_time() - started > STABLE_AFTER:
                    delay = RESTART_DELAYS[0]
                log.error("federation process stopped (%s); restarting in %g s", outcome, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAYS[1])
                self.restarts += 1
        finally:
            self.server.federation = None

    async def _one_life(self, task_status: trio.TaskStatus[str] | None) -> str:
        """Run one federation process until it ends; returns how it ended."""
        adopted, self._adopted = self._adopted, None
        if adopted is not None:
            return await self._life(*adopted, self.endpoint, task_status)
        ours, theirs = link_pair()
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "ivshmemd.federation.process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            theirs.close()
            raise FederationSetupError(f"cannot start the federation process: {exc}") from None
        theirs.close()
        return await self._life(process, FdLink(ours), None, task_status)

    async def _life(
        self,
        process: _Process,
        link: FdLink,
        endpoint: str | None,
        task_status: trio.TaskStatus[str] | None,
    ) -> str:
        """Serve through one federation process (``endpoint`` known: adopted, no handshake)."""
        self.pid, self._process = process.pid, process
        try:
            if endpoint is None:
                self._introduce(link)
            # from here on, local peers' joins and leaves go to this process (queued until
            # it reads them): one that comes during its start-up is not lost
            self._link = link
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay_stderr, process)
                nursery.start_soon(link.flush)
                if endpoint is None:
                    endpoint = await self._handshake(link, process)
                if self._restored:
                    nursery.start_soon(self._expire_restored)
                if task_status is not None:
                    task_status.started(endpoint)
                else:
                    log.info("federation process restarted (pid %d)", process.pid)
                await self._serve(link)
                nursery.cancel_scope.cancel()
        except LinkError as exc:
            log.error("federation process: %s", exc)
        finally:
            self._link = None
            self._admit()
            self._forget_remote_peers()
            with trio.CancelScope(shield=True):
                link.close()  # EOF: the process says bye to its members and exits
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                self.pid, self._process = None, None
                self._status = {}
        return exit_text(process.returncode)

    def _introduce(self, link: FdLink) -> None:
        """The config, the shm and every local peer, then ``start`` (one synchronous step:
        no peer comes or goes in between)."""
        server = self.server
        extras = {"verbose": self.verbose}
        link.send("config", config_to_wire(self.config), extras, fds=[server.shm.fd])
        for peer_id, conn in server.connections.items():
            link.send(
                "local-joined", peer_id, _pid(conn.peer), fds=[v.fd for v in conn.peer.vectors]
            )
        link.send("start")

    async def _handshake(self, link: FdLink, process: _Process) -> str:
        with trio.move_on_after(START_TIMEOUT):
            while True:
                try:
                    message, fds = await link.receive()
                except LinkClosed:
                    await process.wait()
                    raise FederationSetupError(
                        "the federation process ended during start-up "
                        f"({exit_text(process.returncode)})"
                    ) from None
                _close_all(fds)
                if message[0] == "log" and len(message) == 3:
                    self._log(message[1], message[2])
                elif message[0] == "failed" and len(message) == 2:
                    raise FederationSetupError(str(message[1]))
                elif message[0] == "ready" and len(message) == 2:
                    info = message[1]
                    self.endpoint = str(info["endpoint"])
                    self.identity = str(info["identity"])
                    return self.endpoint
        raise FederationSetupError(f"the federation process did not start in {START_TIMEOUT:g} s")

    async def _serve(self, link: FdLink) -> None:
        """Carry out the process's messages until its link closes."""
        while True:
            try:
                message, fds = await link.receive()
            except LinkClosed:
                return
            _close_all(fds)  # it sends none
            try:
                self._handle(link, message)
            except (ValueError, TypeError, IndexError, KeyError) as exc:
                log.error("federation process: bad link message %.80r: %s", message, exc)

    def _handle(self, link: FdLink, message: list[Any]) -> None:
        kind = message[0]
        server = self.server
        if kind == "remote-joined":
            _, member, peer_id, vectors = message
            peer_id = int(peer_id)
            kept = server.registry.get(peer_id)
            if peer_id in self._restored and kept and server.remote[peer_id] == str(member):
                self._restored.discard(peer_id)  # the same peer, still there: no notice
                link.send("remote-ok", peer_id, fds=[v.fd for v in kept.vectors])
                return
            try:
                if int(vectors) != server.config.n_vectors:
                    raise ValueError(
                        f"it has {vectors} vectors, peers here have {server.config.n_vectors}"
                    )
                made = server.add_remote(str(member), peer_id)
            except (ValueError, OSError) as exc:
                log.warning("cannot register peer %d of member %s: %s", peer_id, member, exc)
                link.send("remote-refused", peer_id, str(exc))
                return
            link.send("remote-ok", peer_id, fds=[v.fd for v in made])
        elif kind == "remote-left":
            _, _member, peer_id = message
            server.remove_remote(int(peer_id))
        elif kind == "member":
            _, what, info = message
            for listener in self.member_listeners:
                try:
                    listener(str(what), info)
                except Exception:
                    log.exception("member event listener failed on %s", what)
        elif kind == "status":
            self._status = dict(message[1])
        elif kind == "memory-ready":
            self._admit()
        elif kind == "log":
            self._log(message[1], message[2])
        else:
            raise ValueError(f"unknown message {kind!r}")

    def _admit(self) -> None:
        """The server may admit local peers (the region is in, or the federation process
        that was to bring it is gone: a daemon never waits on it for ever)."""
        if self.server.admission is not None:
            self.server.admission.set()

    async def _expire_restored(self) -> None:
        """The remote peers restored after a crash that no member announced again within
        ``--federation-timeout`` of the process serving are gone: they leave."""
        await trio.sleep(self.config.timeout)
        expired, self._restored = sorted(self._restored), set()
        for peer_id in expired:
            self.server.remove_remote(peer_id)
        if expired:
            log.warning("%d remote peers restored after a crash were not announced again: "
                        "announced as left", len(expired))  # fmt: skip

    def _forget_remote_peers(self) -> None:
        """The process is gone, and with it the watch on remote peers: they leave."""
        self._restored = set()
        server = self.server
        gone = list(server.remote)
        for peer_id in gone:
            server.remove_remote(peer_id)
        if gone:
            log.warning("federation process gone: %d remote peers announced as left", len(gone))

    async def _relay_stderr(self, process: _Process) -> None:
        assert process.stderr is not None
        buffer = b""
        async for chunk in process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                if text:
                    self._chatter.log("stderr", logging.WARNING, "federation process: %s", text)
            buffer = buffer[-4096:]

    def _log(self, level: Any, text: Any) -> None:
        """A line the process logged (it throttles its own repeats: a flapping member's
        lines must all be seen)."""
        if isinstance(level, int):
            log.log(level, "%s", text)


def _pid(peer: Peer) -> int:
    pid = peer.info.get("pid", 0)
    return pid if isinstance(pid, int) else 0


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
