"""The trio server: accepts clients, queues the protocol's messages, sends them, drops peers.

All protocol decisions come from :mod:`ivshmemd.protocol`; this module only does the I/O:

* one task per connection waits for readability (any data or EOF means the client is gone);
* one task per connection drains that client's own outbox, so a client that does not read
  never delays the others (no head-of-line blocking) and no message is ever dropped: a client
  that makes no progress for ``send_timeout`` seconds is disconnected and the others are told;
* eventfds travel as reference-counted handles, so a queued message keeps its fd valid even
  after the peer it belongs to has left;
* running out of fds refuses the newcomer (with a log line) and keeps serving everyone else.

Shutdown (cancel :meth:`IvshmemServer.serve`) frees every peer in connection order, telling
the remaining ones as QEMU's server does, flushes what the sockets take without blocking,
and closes every fd.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import wire
from .protocol import Message, join_messages, leave_messages
from .registry import IdAllocator, Peer, Registry, RegistryFull, SharedFd
from .shm import SharedMemoryRegion

__all__ = [
    "Connection",
    "IvshmemServer",
    "ServerConfig",
    "ServerStats",
    "fd_limit",
    "peer_credentials",
]

log = logging.getLogger("ivshmemd")

_UCRED = struct.Struct("3i")
_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE)

EventListener = Callable[[str, dict[str, Any]], None]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


@dataclass
class ServerConfig:
    """What the server needs beyond its socket and shm."""

    n_vectors: int = 1
    max_peers: int = 4096
    #: the ids this daemon hands out (a federation gives each daemon its own range)
    peer_ids: tuple[int, int] = (0, 0xFFFF)
    send_timeout: float = 5.0
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()


@dataclass
class ServerStats:
    """Counters for the control plane and the logs."""

    joins: int = 0
    leaves: int = 0
    refusals: int = 0
    messages_sent: int = 0
    slow_disconnects: int = 0
    protocol_violations: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dict(self.__dict__)


@dataclass(eq=False)
class Connection:
    """One client socket, its peer and its own outbox of not-yet-sent messages."""

    sock: socket.socket
    peer: Peer
    #: (encoded 8-byte message, fd handle or None), oldest first
    outbox: deque[tuple[bytes, SharedFd | None]] = field(default_factory=deque)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: bool = False

    stats: ServerStats = field(default_factory=lambda: ServerStats())
    broken: OSError | None = None

    def enqueue(self, messages: list[Message[SharedFd]]) -> None:
        """Append messages (taking a reference on each fd) and send what the socket takes.

        Sending happens right here, without a task switch, whenever the socket has room;
        only a full socket wakes the connection's sender task, which waits for room (and
        disconnects the client if it takes too long). Order is kept: the outbox is a FIFO.
        """
        was_idle = not self.outbox
        encode = wire.encode
        for message in messages:
            shared = message.fd
            self.outbox.append(
                (encode(message.value), None if shared is None else shared.acquire())
            )
        if was_idle and not self.dropped:
            self.flush_nowait()
            if self.outbox:
                self.lot.unpark_all()

    def release_outbox(self) -> None:
        """Forget unsent messages, releasing their fd references."""
        while self.outbox:
            _value, shared = self.outbox.popleft()
            if shared is not None:
                shared.release()

    def flush_nowait(self) -> None:
        """Send what the socket takes without blocking (errors are kept in ``broken``)."""
        outbox, sendmsg = self.outbox, self.sock.sendmsg
        while outbox:
            data, shared = outbox[0]
            try:
                # one message, one sendmsg: a unix stream socket takes all 8 bytes or none
                if shared is None:
                    sendmsg((data,))
                else:
                    sendmsg((data,), shared.ancillary)
            except BlockingIOError:
                return
            except OSError as exc:
                self.broken = exc
                return
            outbox.popleft()
            if shared is not None:
                shared.release()
            self.stats.messages_sent += 1


class IvshmemServer:
    """Serves the ivshmem protocol on a listening socket (see the module docstring)."""

    def __init__(
        self, listen_sock: socket.socket, shm: SharedMemoryRegion, config: ServerConfig
    ) -> None:
        self.listen_sock = listen_sock
        self.shm = shm
        self.config = config
        self.registry = Registry(config.n_vectors, config.max_peers, IdAllocator(*config.peer_ids))
        self.stats = ServerStats()
        self.connections: dict[int, Connection] = {}
        self.listeners: list[EventListener] = []
        self.started_at = time.time()
        self._shm_fd = SharedFd(os.dup(shm.fd))
        self._nursery: trio.Nursery | None = None
        self._reserve_fd: int | None = self._open_reserve()

    # -- lifecycle -------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve clients until cancelled; then free every peer and close fds."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept_loop)
                task_status.started()
        finally:
            self._nursery = None
            self.shutdown_peers("server shutting down")
            self._shm_fd.release()
            if self._reserve_fd is not None:
                os.close(self._reserve_fd)
                self._reserve_fd = None

    def shutdown_peers(self, reason: str) -> None:
        """Free every peer in connection order, telling the rest (as QEMU's server does)."""
        for conn in [self.connections[pid] for pid in self.registry.ids()]:
            self.drop(conn, reason)

    # -- admission ------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.listen_sock)
            while True:
                try:
                    sock, _addr = self.listen_sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _FD_EXHAUSTED:
                        await self._refuse_without_fds()
                        continue
                    if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                        continue
                    raise
                self.admit(sock)
                await trio.lowlevel.checkpoint()

    @staticmethod
    def _open_reserve() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    async def _refuse_without_fds(self) -> None:
        """accept() failed with EMFILE: use the reserve fd to accept and close the newcomer."""
        self.stats.refusals += 1
        limit = fd_limit()
        if self._reserve_fd is None:
            log.error("refused a connection: out of file descriptors (limit %s)", limit)
            await trio.sleep(0.05)  # nothing to accept with; avoid spinning on the backlog
            self._reserve_fd = self._open_reserve()
            return
        os.close(self._reserve_fd)
        self._reserve_fd = None
        try:
            sock, _addr = self.listen_sock.accept()
            sock.close()
        except OSError:
            pass
        log.error("refused a connection: out of file descriptors (limit %s)", limit)
        self._reserve_fd = self._open_reserve()

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.stats.refusals += 1
        log.warning("refused a connection: %s", why)
        sock.close()

    def allowed(self, uid: int, gid: int, pid: int) -> str | None:
        """None if the credentials may connect, else why not."""
        cfg = self.config
        if not cfg.allow_uids and not cfg.allow_gids:
            return None
        if uid in cfg.allow_uids or gid in cfg.allow_gids:
            return None
        if cfg.allow_gids and _supplementary_gids(pid) & cfg.allow_gids:
            return None
        return f"pid {pid} uid {uid} gid {gid} is not allowed"

    def admit(self, sock: socket.socket) -> None:
        """Register a newly accepted client, or refuse it with a logged reason."""
        sock.setblocking(False)
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError as exc:
            self._refuse(sock, f"cannot read its credentials: {exc.strerror}")
            return
        denial = self.allowed(uid, gid, pid)
        if denial is not None:
            self._refuse(sock, denial)
            return
        try:
            peer_id = self.registry.reserve_id()
        except RegistryFull as exc:
            self._refuse(sock, f"pid {pid}: {exc}")
            return
        try:
            vectors = self.registry.create_vectors()
        except OSError as exc:
            if exc.errno in _FD_EXHAUSTED:
                self._refuse(
                    sock,
                    f"pid {pid}: out of file descriptors (limit {fd_limit()}) "
                    f"creating {self.config.n_vectors} eventfds",
                )
            else:
                self._refuse(sock, f"pid {pid}: cannot create eventfds: {exc.strerror}")
            return
        peer = Peer(
            peer_id,
            vectors,
            info={"pid": pid, "uid": uid, "gid": gid, "connected_at": time.time()},
        )
        conn = Connection(sock, peer, stats=self.stats)
        existing = [p.as_protocol() for p in self.registry]
        for recipient, messages in join_messages(peer.as_protocol(), existing, self._shm_fd):
            (conn if recipient == peer_id else self.connections[recipient]).enqueue(messages)
        self.registry.add(peer)
        self.connections[peer_id] = conn
        self.stats.joins += 1
        log.info("peer %d joined", peer_id)
        log.debug("peer %d: pid %d uid %d gid %d, %d vectors", peer_id, pid, uid, gid, len(vectors))
        self._emit("peer-joined", peer)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_connection, conn)

    # -- per-connection tasks ------------------------------------------------------------

    async def _run_connection(self, conn: Connection) -> None:
        if conn.dropped:  # dropped before its tasks ever ran: its socket is closed
            return
        with conn.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_client, conn)
                nursery.start_soon(self._send_loop, conn)

    # Both tasks begin with a cancellation check: if the other one dropped the peer (and
    # closed its socket) before this one first ran, it must not touch the closed fd.

    async def _watch_client(self, conn: Connection) -> None:
        """Any readability means the client is gone: EOF, an error, or forbidden data."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            await trio.lowlevel.wait_readable(conn.sock)
            try:
                data = conn.sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:  # a spurious wake-up: keep watching
                continue
            except OSError as exc:
                self.drop(conn, f"connection error: {exc.strerror}")
                return
            if data:
                self.stats.protocol_violations += 1
                self.drop(conn, f"it wrote {len(data)} bytes (clients must not write)")
            else:
                self.drop(conn, None)
            return

    async def _send_loop(self, conn: Connection) -> None:
        """Wait for room whenever the client's socket is full; drop it if none comes."""
        await trio.lowlevel.checkpoint_if_cancelled()
        outbox = conn.outbox
        while True:
            if not outbox:
                await conn.lot.park()
                continue
            conn.flush_nowait()
            if conn.broken is not None:
                self.drop(conn, f"send failed: {conn.broken.strerror}")
                return
            if not outbox:
                continue
            with trio.move_on_after(self.config.send_timeout) as waited:
                await trio.lowlevel.wait_writable(conn.sock)
            if waited.cancelled_caught:
                self.stats.slow_disconnects += 1
                self.drop(
                    conn,
                    f"too slow: {len(outbox)} messages unread for {self.config.send_timeout:g} s",
                )
                return

    # -- leaving --------------------------------------------------------------------------

    def drop(self, conn: Connection, reason: str | None) -> None:
        """Unregister a peer, queue its leave notice to every remaining peer and close its
        connection (once). By the time its "left" is logged or announced, its fds are gone."""
        if conn.dropped:
            return
        conn.dropped = True
        conn.scope.cancel()
        peer_id = conn.peer.peer_id
        registered = self.connections.get(peer_id) is conn
        if registered:
            del self.connections[peer_id]
            self.registry.remove(peer_id)
            notices: list[tuple[int, list[Message[SharedFd]]]] = leave_messages(
                peer_id, self.registry.ids()
            )
            for recipient, messages in notices:
                self.connections[recipient].enqueue(messages)
        self._close(conn)
        if registered:
            self.stats.leaves += 1
            if reason is None:
                log.info("peer %d left", peer_id)
            else:
                log.info("peer %d left: %s", peer_id, reason)
            self._emit("peer-left", conn.peer, reason)

    def _close(self, conn: Connection) -> None:
        """Push out what the socket takes now, free the rest, close the socket. Its tasks
        were cancelled first, so none is left waiting on the fd when it goes."""
        conn.flush_nowait()
        conn.release_outbox()
        trio.lowlevel.notify_closing(conn.sock)
        conn.sock.close()

    def kick(self, peer_id: int, reason: str = "kicked") -> bool:
        """Disconnect a peer on request (the others are told); False if unknown."""
        conn = self.connections.get(peer_id)
        if conn is None:
            return False
        self.drop(conn, reason)
        return True

    def _emit(self, kind: str, peer: Peer, reason: str | None = None) -> None:
        if not self.listeners:
            return
        event = {"peer_id": peer.peer_id, "vectors": len(peer.vectors), **peer.info}
        if reason is not None:
            event["reason"] = reason
        for listener in self.listeners:
            try:
                listener(kind, event)
            except Exception:  # a broken observer must never break the server
                log.exception("event listener failed on %s", kind)


def fd_limit() -> int:
    """The soft limit on open fds (what runs out first with many peers)."""
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _supplementary_gids(pid: int) -> frozenset[int]:
    """The supplementary groups of a process, from /proc (empty if unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()
