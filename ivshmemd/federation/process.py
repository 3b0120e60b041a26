"""The federation process: a daemon's :class:`~ivshmemd.federation.Federation`, run beside it.

libzmq aborts its whole process on some resource errors (see :mod:`ivshmemd.control.process`),
so the daemon never runs it: ``ivshmemd`` starts ``python -m ivshmemd.federation.process
LINK_FD`` (:class:`ivshmemd.fedproc.FederationProcess`), a sibling of its control process,
not niced (it is on the doorbell path), and talks to it over one :class:`~ivshmemd.fdlink.
FdLink`. The daemon keeps the registry and the protocol; this process keeps what the
federation needs: the local peers' eventfds (to deliver members' rings), the remote peers'
eventfds (to watch them), the shm fd (for part 2).

Link messages (msgpack arrays; fds attached where named)::

    daemon -> here   ["config", {...}] + [shm]           first, once
                     ["local-joined", peer_id, pid] + vectors  a local peer was admitted
                     ["local-left", peer_id]              its socket is closed
                     ["remote-ok", peer_id] + vectors     the daemon registered a remote peer
                     ["remote-refused", peer_id, reason]  it could not
    here -> daemon   ["ready", {"endpoint", "identity"}]  or ["failed", text]
                     ["memory-ready"]                     this host holds the region (admit)
                     ["remote-joined", member, peer_id, vectors]
                     ["remote-left", member, peer_id]
                     ["member", kind, info]               member-joined/-left/-refused
                     ["status", {...}]                    Federation.status(), kept fresh
                     ["log", level, text]

Ordering, end to end:

* The daemon writes ``local-joined`` before the newcomer's handshake, and this process
  reads every waiting link message before it relays rings (the link is a wake-up of the
  data path), so a new local peer's rings never overtake its join on a member's stream.
* Members' rings are held from the moment a remote join is passed to the daemon until it
  answers (``remote-ok``: the join notices are queued for every local peer), so a local peer
  hears of a remote peer before the remote peer's first ring (see
  :meth:`Federation.remote_registered`).
* ``local-left`` comes after the leaver's socket closed: its rings are in the eventfds,
  and :meth:`Federation.local_peer_left` relays them before announcing the leave.

The process ignores the signals a terminal sends to its group (the daemon decides); it says
bye to its members and exits when the link closes (the daemon stopping, or dying: the
kernel closes the link then). A new process (after a crash) is a new incarnation: members
announce the old one's peers as left, and the new one's as joined.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import trio

from ivshmemd.errors import one_line
from ivshmemd.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ivshmemd.fdlink import FdLink, LinkClosed, LinkError
from ivshmemd.registry import Peer, SharedFd

from .config import DEFAULT_FLUSH, FederationConfig
from .heap import keep_freed_blocks
from .node import Federation

__all__ = ["config_from_wire", "config_to_wire", "main"]

log = logging.getLogger("ivshmemd.federation")

#: how often the status the daemon shows (last heard, round trips) is refreshed (seconds)
STATUS_EVERY: Final = 0.5
_IGNORED_SIGNALS: Final = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2,
)  # fmt: skip


def config_to_wire(config: FederationConfig) -> dict[str, Any]:
    """The config as the link carries it."""
    return {
        "listen": config.listen,
        "id_range": list(config.id_range),
        "shm_size": config.shm_size,
        "vectors": config.vectors,
        "peers": list(config.peers),
        "timeout": config.timeout,
        "key_file": None if config.key_file is None else str(config.key_file),
        "allow_dir": None if config.allow_dir is None else str(config.allow_dir),
        "insecure": config.insecure,
        "identity": config.identity,
        "advertise": config.advertise,
        "memory": config.memory,
        "flush": config.flush,
        "memlog": config.memlog,
        "memlog_mode": config.memlog_mode,
        "memlog_gid": config.memlog_gid,
        "holder": config.holder,
    }


def config_from_wire(raw: Mapping[str, Any]) -> FederationConfig:
    """:func:`config_to_wire` undone."""
    return FederationConfig(
        listen=str(raw["listen"]),
        id_range=(int(raw["id_range"][0]), int(raw["id_range"][1])),
        shm_size=int(raw["shm_size"]),
        vectors=int(raw["vectors"]),
        peers=tuple(str(p) for p in raw["peers"]),
        timeout=float(raw["timeout"]),
        key_file=None if raw["key_file"] is None else Path(raw["key_file"]),
        allow_dir=None if raw["allow_dir"] is None else Path(raw["allow_dir"]),
        insecure=bool(raw["insecure"]),
        identity=raw.get("identity"),
        advertise=raw.get("advertise"),
        memory=bool(raw.get("memory", False)),
        flush=float(raw.get("flush", DEFAULT_FLUSH)),
        memlog=raw.get("memlog"),
        memlog_mode=int(raw.get("memlog_mode", 0o600)),
        memlog_gid=raw.get("memlog_gid"),
        holder=raw.get("holder"),
    )


class _LinkLog(logging.Handler):
    """This process's log lines, for the daemon's log (bounded: a flood loses the oldest)."""

    def __init__(self, link: FdLink) -> None:
        super().__init__()
        self.link = link
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(LinkError):
            self.link.send("log", record.levelno, self.format(record))


class _DaemonHost:
    """The daemon, seen from here (the :class:`~ivshmemd.federation.FederationHost`): it
    registers remote peers asynchronously, over the link."""

    def __init__(self, link: FdLink) -> None:
        self.link = link
        self.federation: Federation | None = None

    def remote_peer_joined(self, member: str, peer_id: int, vectors: int) -> None:
        self.link.send("remote-joined", member, peer_id, vectors)

    def remote_peer_left(self, member: str, peer_id: int) -> None:
        self.link.send("remote-left", member, peer_id)

    def member_event(self, kind: str, info: Mapping[str, Any]) -> None:
        self.link.send("member", kind, dict(info))
        if self.federation is not None:
            self.link.send("status", self.federation.status())


def _adopt(fds: Sequence[int]) -> list[SharedFd]:
    return [SharedFd(fd) for fd in fds]


def _release(shared: Sequence[SharedFd]) -> None:
    for handle in shared:
        handle.release()


class _Daemon:
    """Carries out the daemon's link messages (called from the data path's loop)."""

    def __init__(self, link: FdLink, federation: Federation) -> None:
        self.link = link
        self.federation = federation
        self.closed = trio.Event()

    def read(self) -> None:
        """Handle every message waiting on the link, without waiting."""
        if self.closed.is_set():
            return
        link = self.link
        try:
            while True:
                got = link.receive_nowait()
                if got is None:
                    return
                self.handle(*got)
        except LinkClosed:
            self.closed.set()
        except LinkError as exc:
            log.error("federation process: %s; stopping", exc)
            self.closed.set()

    def handle(self, message: list[Any], fds: list[int]) -> None:
        kind, federation = message[0], self.federation
        shared = _adopt(fds)
        try:
            if kind == "local-joined" and len(message) in (2, 3):
                info = {"pid": int(message[2])} if len(message) == 3 else {}
                federation.local_peer_joined(Peer(int(message[1]), tuple(shared), info))
            elif kind == "local-left" and len(message) == 2:
                federation.local_peer_left(int(message[1]))
            elif kind == "remote-ok" and len(message) == 2:
                federation.remote_registered(int(message[1]), shared)
            elif kind == "remote-refused" and len(message) == 3:
                log.warning("federation: the daemon refused remote peer %s: %s", *message[1:])
                federation.remote_refused(int(message[1]))
            else:
                log.error("federation process: unexpected link message %.80r", message)
        except (ValueError, TypeError) as exc:
            log.error("federation process: link message %.80r: %s", message, exc)
        finally:
            _release(shared)


async def _serve(link_fd: int) -> None:
    link = FdLink(socket.socket(fileno=link_fd))
    handler = _LinkLog(link)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("ivshmemd")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        message, fds = await link.receive()
    except LinkClosed:
        return
    for fd in fds[1:]:
        os.close(fd)
    shm_fd = fds[0] if fds else None
    try:
        if message[0] != "config" or len(message) != 3:
            raise LinkError(f"expected the config, got {message[0]!r}")
        logger.setLevel(logging.DEBUG if message[2].get("verbose") else logging.INFO)
        host = _DaemonHost(link)
        try:
            config = config_from_wire(message[1])
            region = _map_region(shm_fd, config.shm_size) if config.memory else None
            if region is not None:
                keep_freed_blocks()  # every diff's blocks: reused, not faulted in anew
            federation = Federation(config, host, region)
        except Exception as exc:
            link.send("failed", one_line(exc))
            return
        host.federation = federation
        daemon = _Daemon(link, federation)
        # the daemon's local peers, sent before we start: known before the first hello
        while True:
            got = await link.receive()
            if got[0][0] == "start":
                break
            daemon.handle(*got)
        federation.wakeups.append((link.fileno(), daemon.read))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.flush)
            try:
                endpoint = await nursery.start(federation.run)
            except Exception as exc:
                link.send("failed", one_line(exc))
                await _drain(link)
                return
            status = federation.status()
            link.send("ready", {"endpoint": endpoint, "identity": status.get("identity")})
            nursery.start_soon(_report_status, link, federation)
            nursery.start_soon(_report_memory_ready, link, federation)
            await daemon.closed.wait()
            nursery.cancel_scope.cancel()  # byes to every member, then out
    finally:
        if shm_fd is not None:
            os.close(shm_fd)
        link.close()


async def _drain(link: FdLink) -> None:
    """Let the daemon read our last words before we close the link."""
    with trio.move_on_after(1.0):
        while link.queued:
            await trio.sleep(0.01)


def _map_region(shm_fd: int | None, size: int) -> npt.NDArray[np.uint8]:
    """The daemon's shm, mapped shared (the region replication reads and writes)."""
    if shm_fd is None:
        raise ValueError("the daemon sent no shared memory")
    mapping = mmap.mmap(shm_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(mapping, dtype=np.uint8)


async def _report_memory_ready(link: FdLink, federation: Federation) -> None:
    """Tell the daemon once this host holds the region: it admits local peers from then on."""
    await federation.memory_ready.wait()
    link.send("memory-ready")


async def _report_status(link: FdLink, federation: Federation) -> None:
    while True:
        link.send("status", federation.status())
        await trio.sleep(STATUS_EVERY)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ivshmemd.federation.process LINK_FD`` (started by ivshmemd, not by people)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("ivshmemd.federation.process: started by ivshmemd, not by hand", file=sys.stderr)
        return EXIT_USAGE
    for signum in _IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    try:
        trio.run(_serve, int(args[0]))
    except BaseException as exc:  # one line on stderr, which the daemon logs
        print(f"fatal: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
