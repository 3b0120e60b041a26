"""The trio server: accepts clients, queues the protocol's messages, sends them, drops peers.

All protocol decisions come from :mod:`ivshmemd.protocol` (what to send) and
:mod:`ivshmemd.outbox` (what a queue may drop and hold); this module only does the I/O:

* one task per connection waits for readability (any data or EOF means the client is gone);
* one task per connection drains that client's own outbox, so a client that does not read
  never delays the others (no head-of-line blocking) and no message is ever dropped: a client
  that makes no progress for ``send_timeout`` seconds is disconnected and the others are told;
* eventfds travel as reference-counted handles, so a queued message keeps its fd valid even
  after the peer it belongs to has left;

and it keeps every resource a client can make it spend bounded:

* **Queues.** A leave withdraws the still-unsent part of the leaver's join notice from every
  queue (releasing those fds at once), so queues hold fds of live peers only; a queue beyond
  :func:`ivshmemd.outbox.limits` drops its client as too slow.
* **File descriptors.** A newcomer is admitted only if its socket and eventfds fit below the
  fd limit with :attr:`ServerConfig.fd_reserve` to spare (what the daemon needs for its
  control plane and itself); beyond, it is refused with a (rate-limited) log line. If the
  table does run out, the reserve fd accepts and closes the newcomer.
* **Fds in flight** (non-root daemons, :mod:`ivshmemd.inflight`): each client's socket
  buffer holds a bounded window, the daemon counts what every client has not read yet
  (``SIOCOUTQ``), and sends no fd beyond the user's budget: a client waits for room instead
  of the kernel refusing fd passing for everyone. A dropped client that still has fds it has
  not read stays open (counted) until it reads or closes them, since the kernel keeps
  charging them to the daemon's user until then.

Shutdown (cancel :meth:`IvshmemServer.serve`) frees every peer in connection order, telling
the remaining ones as QEMU's server does, flushes what the sockets take without blocking,
and closes every fd.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from . import wire
from .access import AllowList
from .inflight import FlightBudget, Ledger, unread_bytes, unread_messages
from .outbox import Outbox, limits
from .protocol import Delivery, Message, join_messages, leave_messages
from .ratelimit import LogLimiter
from .registry import IdAllocator, Peer, Registry, RegistryFull, SharedFd
from .shm import SharedMemoryRegion

__all__ = [
    "Connection",
    "FederationSeam",
    "IvshmemServer",
    "Journal",
    "ServerConfig",
    "ServerStats",
    "fd_limit",
    "peer_credentials",
]

log = logging.getLogger("ivshmemd")

_UCRED = struct.Struct("3i")
_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE)
#: how often blocked senders and lingering connections are re-checked (seconds)
_FLIGHT_TICK = 0.05
_LINGER_TICK = 0.5
#: stands for the already-sent head of a restored queue run (never sent again)
PLACEHOLDER = -2

EventListener = Callable[[str, dict[str, Any]], None]


class FederationSeam(Protocol):
    """What the server tells its federation (:class:`ivshmemd.fedproc.FederationProcess`):
    a local peer was admitted (called *before* its handshake is sent, so that the
    federation knows it before it can ring anyone) or has left (after its socket closed,
    so that every ring it sent is in the eventfds). Neither may block or raise."""

    def local_peer_joined(self, peer: Peer) -> None: ...

    def local_peer_left(self, peer_id: int) -> None: ...


class Journal(Protocol):
    """Who keeps a record of the peers outside the process (:mod:`ivshmemd.crashsafe`):
    told of a join before any of its messages goes out (``joining``) and once they are
    queued (``joined``), of a remote peer registered (``remote_joined``), of a leave once
    its notices are queued, and when a queue that had messages waiting has drained."""

    def joining(self, conn: Connection) -> None: ...

    def joined(self, conn: Connection, *, sending: bool = False) -> None: ...

    def remote_joined(self, peer: Peer) -> None: ...

    def left(self, peer: Peer) -> None: ...

    def drained(self, conn: Connection) -> None: ...


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def fd_limit() -> int:
    """The soft limit on open fds (what runs out first with many peers)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_fd_count() -> int:
    """How many fds this process has open (from /proc)."""
    return len(os.listdir("/proc/self/fd"))


@dataclass
class ServerConfig:
    """What the server needs beyond its socket and shm."""

    n_vectors: int = 1
    max_peers: int = 4096
    #: the ids this daemon hands out (a federation gives each daemon its own range)
    peer_ids: tuple[int, int] = (0, 0xFFFF)
    send_timeout: float = 5.0
    allow: AllowList = field(default_factory=AllowList)
    #: fds kept free for the daemon itself and its control plane: newcomers are refused
    #: before the table gets this full
    fd_reserve: int = 16
    #: the in-flight budget of a daemon without CAP_SYS_RESOURCE/CAP_SYS_ADMIN, or None
    flight: FlightBudget | None = None


@dataclass
class ServerStats:
    """Counters for the control plane and the logs."""

    joins: int = 0
    leaves: int = 0
    refusals: int = 0
    messages_sent: int = 0
    slow_disconnects: int = 0
    protocol_violations: int = 0
    #: join notices that never had to be sent: their peer left before its turn came
    notices_withdrawn: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dict(self.__dict__)


@dataclass(eq=False)
class Connection:
    """One client socket, its peer and its own outbox of not-yet-sent messages."""

    sock: socket.socket
    peer: Peer
    outbox: Outbox[SharedFd] = field(default_factory=Outbox)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    dropped: bool = False

    stats: ServerStats = field(default_factory=lambda: ServerStats())
    broken: OSError | None = None
    #: in-flight accounting (None for a daemon without an in-flight limit)
    flight: FlightBudget | None = None
    ledger: Ledger | None = None
    #: set when a send stopped because the in-flight budget is spent
    blocked: bool = False

    def enqueue(self, messages: Sequence[Message[SharedFd]], announces: int | None = None) -> None:
        """Send what the socket takes now, and queue the rest (taking a reference on each
        queued fd; ``announces`` as in :meth:`ivshmemd.outbox.Outbox.push`).

        Sending happens right here, without a task switch, whenever nothing is queued
        before and the socket has room (the common case: nothing is queued at all); only
        a full socket wakes the connection's sender task, which waits for room (and
        disconnects the client if it takes too long). Order is kept: the outbox is a FIFO.
        """
        outbox = self.outbox
        start = 0
        if outbox.messages == 0 and not self.dropped:
            if self.flight is not None:
                self.settle()
            send = self._send
            for message in messages:
                if not send(message):
                    break
                start += 1
            if start == len(messages):
                return
        for message in messages[start:]:
            if message.fd is not None:
                message.fd.acquire()
        outbox.push(messages, announces, start)
        if not self.dropped:
            self.lot.unpark_all()

    def release_outbox(self) -> None:
        """Forget unsent messages, releasing their fd references."""
        for shared in self.outbox.clear():
            shared.release()

    def settle(self) -> None:
        """Forget the sent messages the client has read (in-flight accounting)."""
        if self.ledger is None or self.flight is None or not self.ledger.sent:
            return
        try:
            unread = unread_messages(self.sock, self.flight.truesize)
        except OSError:
            unread = 0
        self.flight.total -= self.ledger.settle(unread)

    def _send(self, message: Message[SharedFd]) -> bool:
        """Send one message now; False if it must wait (the socket is full, the in-flight
        budget is spent, or the connection broke: see ``blocked`` and ``broken``)."""
        shared, flight = message.fd, self.flight
        if shared is not None and flight is not None and flight.total >= flight.limit:
            self.blocked = True
            return False
        try:
            # one message, one sendmsg: a unix stream socket takes all 8 bytes or none
            if shared is None:
                self.sock.sendmsg((wire.encode(message.value),))
            else:
                self.sock.sendmsg((wire.encode(message.value),), shared.ancillary)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.ETOOMANYREFS:  # the user's budget, spent elsewhere
                self.blocked = True
            else:
                self.broken = exc
            return False
        if flight is not None and self.ledger is not None:
            self.ledger.record(shared is not None)
            flight.total += shared is not None
        self.stats.messages_sent += 1
        return True

    def _send_queued(self, message: Message[SharedFd]) -> bool:
        """:meth:`_send` for a queued message, whose fd reference goes once it is sent."""
        if not self._send(message):
            return False
        if message.fd is not None:
            message.fd.release()
        return True

    def flush_nowait(self) -> None:
        """Send what the socket takes of the queue without blocking (errors are kept in
        ``broken``)."""
        if self.flight is not None:
            self.settle()
        self.outbox.drain(self._send_queued)


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
        #: peers of other daemons of a federation, by id: their members (their eventfds
        #: are in the registry, watched by the federation process; no socket)
        self.remote: dict[int, str] = {}
        self.federation: FederationSeam | None = None
        #: while set and not yet set off, no client is accepted (a daemon joining a federation
        #: that replicates memory admits local peers once the region is in)
        self.admission: trio.Event | None = None
        self.listeners: list[EventListener] = []
        self.started_at = time.time()
        self.limits = limits(config.n_vectors, config.max_peers)
        self.refusal_log = LogLimiter(log)
        self._shm_fd = SharedFd(os.dup(shm.fd))
        self._nursery: trio.Nursery | None = None
        self._reserve_fd: int | None = self._open_reserve()
        #: fds open besides the peers' (measured when serving starts)
        self._base_fds = 0
        #: dropped connections whose client still holds fds it has not read (in flight)
        self._lingering: list[Connection] = []
        self._flight_lot = trio.lowlevel.ParkingLot()
        self._ticking = False
        #: the record kept outside the process (systemd's fd store, the state file), if any
        self.journal: Journal | None = None
        #: connections restored from a previous image, whose tasks start with serve()
        self._adopted: list[Connection] = []
        #: peers restored without a live connection: their leave is announced at serve()
        self._departed: list[tuple[int, str]] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve clients until cancelled; then free every peer and close fds."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                held = sum(len(peer.vectors) for peer in self.registry) + len(self.connections)
                self._base_fds = open_fd_count() - held
                for adopted in self._adopted:
                    nursery.start_soon(self._run_connection, adopted)
                self._adopted = []
                for peer_id, reason in self._departed:
                    gone = self.connections.get(peer_id)
                    if gone is not None:
                        self.drop(gone, reason, linger=False)
                    else:
                        self.forget(peer_id, reason)
                self._departed = []
                nursery.start_soon(self._accept_loop)
                task_status.started()
        finally:
            self._nursery = None
            self.shutdown_peers("server shutting down")
            for conn in self._lingering:
                self._close_socket(conn)
            self._lingering.clear()
            self._shm_fd.release()
            if self._reserve_fd is not None:
                os.close(self._reserve_fd)
                self._reserve_fd = None

    def shutdown_peers(self, reason: str) -> None:
        """Free every peer in connection order, telling the rest (as QEMU's server does);
        remote peers are forgotten first (without notices: nobody is left to tell)."""
        for peer_id in list(self.remote):
            self.remove_remote(peer_id, notify=False)
        for conn in [self.connections[pid] for pid in self.registry.ids()]:
            self.drop(conn, reason, linger=False)

    @property
    def lingering(self) -> list[Connection]:
        """Dropped connections whose client has not read everything it was sent yet."""
        return self._lingering

    def fds_in_use(self) -> int:
        """The daemon's open fds as it accounts them: its own, and per peer its socket and
        eventfds (after coalescing, queues hold fds of live peers only), and lingerers."""
        per_peer = 1 + self.config.n_vectors
        remote = self.config.n_vectors * len(self.remote)
        return self._base_fds + per_peer * len(self.connections) + remote + len(self._lingering)

    # -- handover (ivshmemd.handover): the whole state, as plain data with fd numbers ------

    def export(self) -> dict[str, Any]:
        """Everything to serve on from another image of the daemon: the registry in
        connection order (ids, vector fds, credentials, connect times), each connection's
        socket fd, its unsent messages (each queue is at a message boundary: a message is
        one sendmsg) and in-flight ledger, the allocator, counters. Call it where no task
        can run before the process is replaced (no checkpoint in between), after
        :meth:`close_lingering`."""
        peers: list[dict[str, Any]] = []
        for peer_id in self.registry.ids():
            conn = self.connections.get(peer_id)
            if conn is None:  # a remote peer: its eventfds, no connection, its member
                remote = self.registry.get(peer_id)
                assert remote is not None
                peers.append({
                    "id": peer_id, "vectors": [shared.fd for shared in remote.vectors],
                    "info": remote.info, "conn": None, "member": self.remote[peer_id],
                })  # fmt: skip
                continue
            peer = conn.peer
            peers.append({
                "id": peer_id,
                "vectors": [shared.fd for shared in peer.vectors],
                "info": peer.info,
                "conn": conn.sock.fileno(),
                "outbox": [
                    [announces, cursor, [[m.value, None if m.fd is None else m.fd.fd]
                                         for m in unsent]]
                    for announces, cursor, unsent in conn.outbox.pending_runs()
                ],
                "ledger": None if conn.ledger is None else list(conn.ledger.sent),
            })  # fmt: skip
        flight = self.config.flight
        return {
            "next_id": self.registry.allocator.next_id,
            "n_vectors": self.config.n_vectors,
            "shm_fd": self._shm_fd.fd,
            "started_at": self.started_at,
            "stats": self.stats.as_dict(),
            "flight_total": None if flight is None else flight.total,
            "peers": peers,
        }

    def close_lingering(self) -> None:
        """Close the dropped connections still lingering (their leaves went out already;
        what they had not read is theirs to lose): a handover does not carry them."""
        for conn in self._lingering:
            self._close_socket(conn)
        self._lingering = []

    def carried_fds(self) -> list[int]:
        """The fds :meth:`export` names (to carry across ``execve``)."""
        fds = [self._shm_fd.fd, *(conn.sock.fileno() for conn in self.connections.values())]
        for peer in self.registry:
            fds.extend(shared.fd for shared in peer.vectors)
        return fds

    def adopt(self, state: dict[str, Any], gone: dict[int, str] | None = None) -> None:
        """Take over what :meth:`export` described (before :meth:`serve`). The peers in
        ``gone`` (id: why) are restored and then announced as left once serving starts:
        after a crash, their connection hung up or was never stored. An entry with a
        ``member`` is a remote peer (no connection) and stays one."""
        if state["n_vectors"] != self.config.n_vectors:
            raise ValueError(
                f"the running peers have {state['n_vectors']} vectors, the configuration "
                f"{self.config.n_vectors}"
            )
        if state["shm_fd"] is not None:
            self._shm_fd.release()
            self._shm_fd = SharedFd(state["shm_fd"])
        handles: dict[int, SharedFd] = {self._shm_fd.fd: self._shm_fd}
        flight = self.config.flight
        gone = gone or {}
        peers = []
        for entry in state["peers"]:
            vectors = tuple(SharedFd(fd) for fd in entry["vectors"])
            handles.update((shared.fd, shared) for shared in vectors)
            peers.append((entry, Peer(entry["id"], vectors, info=dict(entry["info"]))))
        for entry, peer in peers:
            self.registry.add(peer)
            if entry.get("member") is not None:  # a remote peer: the federation watches it
                self.remote[peer.peer_id] = str(entry["member"])
                continue
            if entry["conn"] is None:
                self._departed.append((peer.peer_id, gone.get(peer.peer_id, "gone")))
                continue
            sock = socket.socket(fileno=entry["conn"])
            sock.setblocking(False)
            conn = Connection(sock, peer, stats=self.stats)
            if flight is not None:
                conn.flight, conn.ledger = flight, Ledger()
                for carries in entry.get("ledger") or ():
                    conn.ledger.record(bool(carries))
            for announces, cursor, unsent in entry["outbox"]:
                sent: list[Message[SharedFd]] = [Message(PLACEHOLDER)] * min(cursor, 1)
                run = sent + [Message(value, None if fd is None else handles[fd].acquire())
                              for value, fd in unsent]  # fmt: skip
                conn.outbox.push(run, announces, len(sent))
            self.connections[peer.peer_id] = conn
            self._adopted.append(conn)
            if peer.peer_id in gone:
                self._departed.append((peer.peer_id, gone[peer.peer_id]))
        self.registry.allocator.next_id = state["next_id"]
        self.started_at = state.get("started_at", self.started_at)
        for key, value in (state.get("stats") or {}).items():
            if hasattr(self.stats, key):
                setattr(self.stats, key, value)
        if flight is not None and state.get("flight_total") is not None:
            flight.total = state["flight_total"]

    # -- admission ------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        if self.admission is not None:  # a joining federation member: the region first
            await self.admission.wait()
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
        if self._reserve_fd is None:
            self._log_refusal("fds", f"out of file descriptors (limit {fd_limit()})")
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
        self._log_refusal("fds", f"out of file descriptors (limit {fd_limit()})")
        self._reserve_fd = self._open_reserve()

    def _log_refusal(self, kind: str, why: str) -> None:
        # one line per kind of refusal per second: a flood must not flood the log
        self.refusal_log.log(kind, logging.WARNING, "refused a connection: %s", why)

    def _refuse(self, sock: socket.socket, kind: str, why: str) -> None:
        self.stats.refusals += 1
        self._log_refusal(kind, why)
        sock.close()

    def allowed(self, uid: int, gid: int, pid: int) -> str | None:
        """None if the credentials may connect, else why not."""
        return self.config.allow.check(uid, gid, pid)

    def _lacks_room(self) -> str | None:
        """Why a newcomer cannot be served now (fds, in-flight budget), or None."""
        cfg = self.config
        needed = self.fds_in_use() + 1 + cfg.n_vectors + cfg.fd_reserve
        if needed > fd_limit():
            return (
                f"out of file descriptors (limit {fd_limit()}, {self.fds_in_use()} in use, "
                f"{cfg.fd_reserve} kept for the control plane)"
            )
        flight = cfg.flight
        if flight is not None and flight.room() <= 0:
            self._settle_all()
            if flight.room() <= 0:
                return (
                    f"{flight.total} fds in flight to clients that have not read them "
                    f"(the limit for this user is {flight.limit})"
                )
        return None

    def admit(self, sock: socket.socket) -> None:
        """Register a newly accepted client, or refuse it with a logged reason."""
        sock.setblocking(False)
        try:
            pid, uid, gid = peer_credentials(sock)
        except OSError as exc:
            self._refuse(sock, "credentials", f"cannot read its credentials: {exc.strerror}")
            return
        denial = self.allowed(uid, gid, pid)
        if denial is not None:
            self._refuse(sock, "not allowed", denial)
            return
        lack = self._lacks_room()
        if lack is not None:
            self._refuse(sock, "no room", lack)
            return
        try:
            peer_id = self.registry.reserve_id()
        except RegistryFull as exc:
            self._refuse(sock, "full", str(exc))
            return
        try:
            vectors = self.registry.create_vectors()
        except OSError as exc:
            if exc.errno in _FD_EXHAUSTED:
                self._refuse(sock, "fds", f"out of file descriptors (limit {fd_limit()}) "
                             "creating eventfds")  # fmt: skip
            else:
                self._refuse(sock, "eventfds", f"cannot create eventfds: {exc.strerror}")
            return
        peer = Peer(
            peer_id,
            vectors,
            info={"pid": pid, "uid": uid, "gid": gid, "connected_at": time.time()},
        )
        conn = Connection(sock, peer, stats=self.stats)
        flight = self.config.flight
        if flight is not None:
            conn.flight, conn.ledger = flight, Ledger()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, flight.sndbuf())
        if self.federation is not None:  # before its handshake: before it can ring
            self.federation.local_peer_joined(peer)
        if self.journal is not None:
            self.journal.joining(conn)
        existing = [p.as_protocol() for p in self.registry]
        connections = self.connections
        self.registry.add(peer)
        self.connections[peer_id] = conn
        self.stats.joins += 1
        if self.journal is not None:  # before a byte of its handshake leaves: a crash in
            self.journal.joined(conn, sending=True)  # between never loses its record
        crowded: list[Connection] = []
        for recipient, messages, announces in join_messages(
            peer.as_protocol(), existing, self._shm_fd
        ):
            if recipient == peer_id:
                target = conn
            else:
                other = connections.get(recipient)
                if other is None:  # a remote peer: its daemon tells it
                    continue
                target = other
            target.enqueue(messages, announces)
            if target is not conn and target.outbox.exceeds(self.limits):
                crowded.append(target)
        if self.journal is not None and not conn.outbox:
            self.journal.drained(conn)  # the whole handshake went at once: settled
        log.info("peer %d joined", peer_id)
        log.debug("peer %d: pid %d uid %d gid %d, %d vectors", peer_id, pid, uid, gid, len(vectors))
        self._emit("peer-joined", peer)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_connection, conn)
        for slow in crowded:
            self._too_slow(slow)

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
                if self.journal is not None:
                    self.journal.drained(conn)
                continue
            if conn.blocked:  # not this client's fault: wait for the budget, no timeout
                conn.blocked = False
                await self._wait_for_flight_room()
                continue
            # The kernel says "writable" only once the client has read all but a quarter of
            # its socket buffer: a client that reads, but less than that, is not stuck. So
            # what counts as progress is the buffer getting emptier (SIOCOUTQ).
            unread = unread_bytes(conn.sock)
            with trio.move_on_after(self.config.send_timeout) as waited:
                await trio.lowlevel.wait_writable(conn.sock)
            if waited.cancelled_caught and unread_bytes(conn.sock) < unread:
                continue
            if waited.cancelled_caught:
                self.stats.slow_disconnects += 1
                self.drop(
                    conn,
                    f"too slow: {len(outbox)} messages unread for {self.config.send_timeout:g} s",
                )
                return

    def _too_slow(self, conn: Connection) -> None:
        self.stats.slow_disconnects += 1
        self.drop(
            conn,
            f"too slow: {conn.outbox.messages} messages ({conn.outbox.fds} fds) queued, more "
            "than a peer that reads can have",
        )

    # -- fds in flight -------------------------------------------------------------------

    def _settle_all(self) -> None:
        for conn in self.connections.values():
            conn.settle()
        for conn in self._lingering:
            conn.settle()

    async def _wait_for_flight_room(self) -> None:
        """Park until the ticker finds room in the in-flight budget."""
        self._start_ticker()
        await self._flight_lot.park()

    def _start_ticker(self) -> None:
        if not self._ticking and self._nursery is not None:
            self._ticking = True
            self._nursery.start_soon(self._flight_ticker)

    async def _flight_ticker(self) -> None:
        """While senders wait for budget or dropped clients still hold unread fds: re-read
        what every client has read, wake the waiting senders, close drained lingerers."""
        try:
            while self._flight_lot or self._lingering:
                await trio.sleep(_FLIGHT_TICK if self._flight_lot else _LINGER_TICK)
                self._settle_all()
                self._close_drained_lingerers()
                flight = self.config.flight
                if flight is None or flight.room() > 0:
                    self._flight_lot.unpark_all()
        finally:
            self._ticking = False

    def _close_drained_lingerers(self) -> None:
        keep = []
        for conn in self._lingering:
            if conn.ledger is not None and conn.ledger.sent:
                keep.append(conn)
            else:
                self._close_socket(conn)
        self._lingering = keep

    # -- leaving --------------------------------------------------------------------------

    def drop(self, conn: Connection, reason: str | None, *, linger: bool = True) -> None:
        """Unregister a peer, withdraw what is still queued of its join notice (or queue
        its leave notice) for every remaining peer, and close its connection (once). By the
        time its "left" is logged or announced, its fds are gone."""
        if conn.dropped:
            return
        conn.dropped = True
        conn.scope.cancel()
        peer_id = conn.peer.peer_id
        registered = self.connections.get(peer_id) is conn
        if registered:
            del self.connections[peer_id]
            self._unregister(peer_id)
        self._close(conn, linger)
        if registered:
            if self.federation is not None:  # its rings are in the eventfds now
                self.federation.local_peer_left(peer_id)
            self._departed_log(conn.peer, reason)

    def forget(self, peer_id: int, reason: str) -> None:
        """A registered local peer without a connection (restored after a crash, its socket
        gone): unregister it and tell the others, as for a leave."""
        peer = self.registry.get(peer_id)
        if peer is None or peer_id in self.connections or peer_id in self.remote:
            return
        self._unregister(peer_id)
        if self.federation is not None and "member" not in peer.info:
            self.federation.local_peer_left(peer_id)
        self._departed_log(peer, reason)

    def _unregister(self, peer_id: int) -> None:
        self.registry.remove(peer_id)
        self._announce_leave(peer_id)

    def _departed_log(self, peer: Peer, reason: str | None) -> None:
        self.stats.leaves += 1
        if reason is None:
            log.info("peer %d left", peer.peer_id)
        else:
            log.info("peer %d left: %s", peer.peer_id, reason)
        if self.journal is not None:
            self.journal.left(peer)
        self._emit("peer-left", peer, reason)

    def _announce_leave(self, peer_id: int) -> None:
        """Queue ``peer_id``'s leave for every local peer (withdrawing what is unsent of
        its join notice instead, where that is all they would hear of it)."""
        connections = self.connections
        notices: list[Delivery[SharedFd]] = leave_messages(peer_id, list(connections))
        for recipient, messages, _ in notices:
            other = connections[recipient]
            withdrawn, needed = other.outbox.withdraw_announcement(peer_id)
            for shared in withdrawn:
                shared.release()
            if withdrawn and not needed:
                self.stats.notices_withdrawn += 1
            if needed:
                other.enqueue(messages)

    # -- remote peers (a federation) ------------------------------------------------------

    def add_remote(self, member: str, peer_id: int) -> tuple[SharedFd, ...]:
        """Register ``member``'s peer ``peer_id``: make its eventfds, queue its join notice
        for every local peer (as for a local newcomer, in connection order), and return the
        eventfds (the registry keeps its reference; the caller hands them to the federation,
        which watches them). Raises ValueError or OSError (out of fds) to refuse."""
        if peer_id in self.registry:
            raise ValueError(f"peer id {peer_id} is already registered")
        lo, hi = self.config.peer_ids
        if lo <= peer_id <= hi:
            raise ValueError(f"peer id {peer_id} is in this daemon's own range {lo}-{hi}")
        cfg = self.config
        if self.fds_in_use() + cfg.n_vectors + cfg.fd_reserve > fd_limit():
            raise OSError(errno.EMFILE, f"out of file descriptors (limit {fd_limit()})")
        vectors = self.registry.create_vectors()
        peer = Peer(peer_id, vectors, info={"member": member, "connected_at": time.time()})
        crowded: list[Connection] = []
        notice = peer.as_protocol().announcement  # what join_messages sends existing peers
        if notice:
            for conn in self.connections.values():
                conn.enqueue(notice, peer_id)
                if conn.outbox.exceeds(self.limits):
                    crowded.append(conn)
        self.registry.add(peer)
        self.remote[peer_id] = member
        if self.journal is not None:
            self.journal.remote_joined(peer)
        self.stats.joins += 1
        log.info("peer %d of member %s joined", peer_id, member)
        self._emit("peer-joined", peer)
        for slow in crowded:
            self._too_slow(slow)
        return vectors

    def remove_remote(self, peer_id: int, *, notify: bool = True) -> bool:
        """Unregister a remote peer and queue its leave for local peers; False if unknown."""
        member = self.remote.pop(peer_id, None)
        if member is None:
            return False
        peer = self.registry.remove(peer_id)
        self.stats.leaves += 1
        if notify:
            self._announce_leave(peer_id)
            log.info("peer %d of member %s left", peer_id, member)
            self._emit("peer-left", peer)
        if self.journal is not None:
            self.journal.left(peer)
        return True

    def _close(self, conn: Connection, linger: bool) -> None:
        """Push out what the socket takes now, free the rest, close the socket. Its tasks
        were cancelled first, so none is left waiting on the fd when it goes. A client
        still holding unread fds that count against the in-flight budget lingers (shut
        down for writing, counted) until it reads or closes them."""
        conn.flush_nowait()
        conn.release_outbox()
        conn.settle()
        if linger and conn.ledger is not None and conn.ledger.fds:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._lingering.append(conn)
            self._start_ticker()
            return
        self._close_socket(conn)

    def _close_socket(self, conn: Connection) -> None:
        if conn.flight is not None and conn.ledger is not None:
            conn.flight.total -= conn.ledger.fds
            conn.ledger.settle(0)
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
