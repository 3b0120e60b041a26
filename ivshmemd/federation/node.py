"""The :class:`Federation` object: what a daemon owns to join a federation (the seam).

It ties the pieces together: the membership state machine decides, the transport carries
frames, the doorbell relay reads and writes eventfds, and the *host* (the daemon's server,
behind :class:`FederationHost`) registers remote peers and announces them to local peers.
See the package docstring for the integration contract.

Resources and errors: :meth:`Federation.run` owns a zmq context, the sockets, the ZAP
handler and the relay's epoll set, and releases them all when cancelled, after a best-effort
bye to every member (so they announce our peers as left at once rather than after their
timeout) and after telling the host that every remote peer left. A host callback that
raises is logged and never stops the federation; so is an internal error while handling one
member's frame (that member's frames are the only thing affected).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt
import trio
import zmq

from ivshmemd.curve import CurveKeyPair, load_allowed_keys, load_secret_key
from ivshmemd.registry import Peer, SharedFd

from .config import FLUSH_SCAN_BYTES, FederationConfig, endpoint_refusal
from .membership import (
    Action,
    Close,
    Deliver,
    Dial,
    LocalMember,
    MemberEvent,
    Membership,
    Memory,
    RemoteJoined,
    RemoteLeft,
    Reset,
    Send,
    Stream,
)
from .memlogs import MemoryLogs
from .relay import DoorbellRelay
from .replica import Replica
from .replication import Replication
from .transport import DEFAULT_MAX_BACKLOG_BYTES, Transport
from .twin import PAGE_SIZE, Twin
from .zap import ZapAuthenticator

__all__ = ["Federation", "FederationHost"]

log = logging.getLogger(__name__)

#: Seconds given to the byes to leave on the way out.
BYE_GRACE: Final = 0.5
#: The background flush scans this much of the region at a time (a ring relayed meanwhile
#: waits for one slice's scan, not for the round's).
FLUSH_SLICE_BYTES: Final = 4 << 20


class FederationHost(Protocol):
    """What the daemon's server does for the federation. Every method is called from the
    trio thread between two awaits and must not block.

    - ``remote_peer_joined(member, peer_id, vectors)``: register ``member``'s peer
      ``peer_id`` as a peer whose eventfds nobody local owns: create its ``vectors``
      eventfds with the registry (:meth:`ivshmemd.registry.Registry.create_vectors`), add
      it to the registry (``Peer.info["member"] = member`` for ``ivshmemctl peers``), queue
      its join notices to local peers exactly as for a local newcomer, and return the
      eventfds (the federation takes its own reference on each and watches them). Raise
      (OSError when out of fds) to refuse: the remote peer then stays invisible here.
      A host that registers elsewhere (the daemon, seen from the federation process)
      returns None and later calls :meth:`Federation.remote_registered` with the eventfds
      or :meth:`Federation.remote_refused`, in the order of the joins; until it has, rings
      from members are held (a local peer hears of a remote peer before its first ring).
    - ``remote_peer_left(member, peer_id)``: unregister it and queue its leave notices.
    - ``member_event(kind, info)``: ``member-joined``, ``member-left`` or ``member-refused``
      for the event stream (``info`` has ``member``, ``endpoint``, ``id_range``, ...).
    """

    def remote_peer_joined(
        self, member: str, peer_id: int, vectors: int
    ) -> Sequence[SharedFd] | None: ...

    def remote_peer_left(self, member: str, peer_id: int) -> None: ...

    def member_event(self, kind: str, info: Mapping[str, Any]) -> None: ...


class Federation:
    """One daemon's membership in a federation (see the package docstring).

    Construction checks the configuration and loads the keys (raising
    :class:`~ivshmemd.federation.config.FederationConfigError` or
    :class:`~ivshmemd.curve.KeyFileError`), so a bad setting stops the daemon at
    start with one clear line. Nothing touches the network before :meth:`run`.
    """

    def __init__(
        self,
        config: FederationConfig,
        host: FederationHost,
        region: npt.NDArray[np.uint8] | None = None,
    ) -> None:
        config.check()
        if config.memory and region is None:
            raise ValueError("a federation that replicates memory needs the region")
        self.config = config
        self.host = host
        self.keys: CurveKeyPair | None = None
        self.allowed: dict[str, str] = {}
        if config.key_file is not None and config.allow_dir is not None:
            self.keys = load_secret_key(config.key_file)
            self.allowed = load_allowed_keys(config.allow_dir)
        self.incarnation = config.make_incarnation()
        self.relay = DoorbellRelay()
        self.membership: Membership | None = None
        #: the listening endpoint as bound (set once :meth:`run` has started)
        self.endpoint: str | None = None
        self._transport: Transport | None = None
        self._overflowed: list[int] = []
        #: remote peers whose registration the host has not confirmed yet, and their members
        self._awaiting: dict[int, str] = {}
        #: confirmations still to come (one per join handed to an asynchronous host)
        self._unconfirmed = 0
        #: what waits behind an unconfirmed join, in arrival order: rings to deliver,
        #: remote joins and leaves to pass on
        self._held: deque[Deliver | RemoteJoined | RemoteLeft] = deque()
        #: fds the data path also waits on, and what to call when one is readable (before
        #: frames and rings are handled: the federation process reads its daemon's link)
        self.wakeups: list[tuple[int, Callable[[], None]]] = []
        # -- memory replication (issue 13; None with --federation-memory off)
        self.region = region if config.memory else None
        self.replica: Replica[Deliver] | None = None
        self.replication: Replication | None = None
        self.memlogs: MemoryLogs | None = None
        #: local peers' pids (a memory log counts only from the peer's own process)
        self._pids: dict[int, int] = {}
        #: set once this host holds the region (at once unless it joins a federation)
        self.memory_ready = trio.Event()
        self._scan_from = 0

    # -- the server's calls ----------------------------------------------------------------

    def local_peer_joined(self, peer: Peer) -> None:
        """A local peer was registered. Call it in the same synchronous step as the
        registration (before the peer can ring anyone), for every local peer, including
        those registered before :meth:`run`."""
        lo, hi = self.config.id_range
        if not lo <= peer.peer_id <= hi:  # members would drop us for it
            raise ValueError(f"local peer {peer.peer_id} is outside our id range {lo}-{hi}")
        self.relay.add_local(peer.peer_id, peer.vectors)
        pid = peer.info.get("pid")
        if isinstance(pid, int):
            self._pids[peer.peer_id] = pid
            if self.memlogs is not None:
                self.memlogs.pids[peer.peer_id] = pid
        if self.membership is not None:
            self._apply(self.membership.local_peer_joined(peer.peer_id, len(peer.vectors)))

    def local_peer_left(self, peer_id: int) -> None:
        """A local peer left (call it after its connection is gone, so that every ring it
        sent is in the eventfds): its rings to remote peers are relayed first, then its
        leave is announced to every member."""
        if self.membership is not None and self._transport is not None:
            self._relay_rings()
            self._apply(self.membership.local_peer_left(peer_id))
        self.relay.remove_local(peer_id)
        self._pids.pop(peer_id, None)
        if self.memlogs is not None:
            self.memlogs.peer_left(peer_id)

    def remote_registered(self, peer_id: int, vectors: Sequence[SharedFd]) -> None:
        """An asynchronous host registered remote peer ``peer_id`` (see
        :class:`FederationHost`): watch its ``vectors`` (the relay takes its own
        references) and deliver what waited for it. A peer that left meanwhile is not
        watched (the host heard of its leave after its join, and unregisters it)."""
        self._confirmed()
        member = self._awaiting.pop(peer_id, None)
        if member is not None:
            self._watch(member, peer_id, vectors)
        self._release_held()

    def remote_refused(self, peer_id: int) -> None:
        """An asynchronous host could not register remote peer ``peer_id``: it stays
        invisible here."""
        self._confirmed()
        self._awaiting.pop(peer_id, None)
        self._release_held()

    def _confirmed(self) -> None:
        if self._unconfirmed <= 0:
            raise ValueError("a registration was confirmed that was never asked for")
        self._unconfirmed -= 1

    def remote_peers(self) -> dict[int, str]:
        """Remote peers registered here, and their members (for ``ivshmemctl peers``)."""
        return self.relay.remote_peers()

    def status(self) -> dict[str, Any]:
        """The federation for ``ivshmemctl status``: us, our members (endpoint, id range,
        state, last heard as unix time, round-trip time), probes, counters."""
        secure = self.keys is not None
        if self.membership is None:
            return {"running": False, "listen": self.config.listen, "secure": secure}
        now = trio.current_time()
        wall = time.time()
        status = self.membership.status(now)
        for member in status["members"]:
            ago = member.pop("last_heard")
            member["last_heard"] = None if ago is None else wall - ago
        status.update(
            running=True,
            secure=secure,
            remote_peers=len(self.relay.remote_peers()),
            rings=self.relay.stats.as_dict(),
        )
        replica = self.replica
        if replica is not None:
            status["memory"] = {
                **replica.stats,
                "holder": replica.holder,
                "clock": replica.clock,
                "diffs": replica.seq,
                "held_now": replica.held(),
                "reports": 0 if self.memlogs is None else self.memlogs.reports,
                "logged_peers": sorted(self.memlogs.logged) if self.memlogs else [],
            }
        return status

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, contact the configured members and serve until cancelled (once: a
        Federation is not restarted, a new one is made). Start it with
        ``await nursery.start(federation.run)``, which returns the bound endpoint, or raises
        :class:`~ivshmemd.federation.transport.TransportError` (not wrapped in an exception
        group) if it cannot listen."""
        config = self.config
        context: zmq.Context[Any] = zmq.Context()
        transport = Transport(
            context,
            keys=self.keys,
            timeout=config.timeout,
            max_backlog=config.max_backlog,
            # a region transfer to one member is queued whole
            max_backlog_bytes=max(DEFAULT_MAX_BACKLOG_BYTES, 2 * config.shm_size),
        )
        zap: ZapAuthenticator | None = None
        try:
            if self.keys is not None:
                zap = ZapAuthenticator(context, self.allowed)  # before the CURVE server binds
            bound = transport.bind(config.listen)
            advertise = config.advertise or bound
            local = LocalMember(
                config.identity or advertise,
                self.incarnation,
                advertise,
                config.id_range,
                config.shm_size,
                config.vectors,
            )
            machine = Membership(
                local,
                seeds=config.peers,
                timeout=config.timeout,
                own_key=self.keys.public if self.keys else "",
                probe_keys=tuple(self.allowed),
                endpoint_policy=functools.partial(
                    endpoint_refusal, secure=self.keys is not None, insecure=config.insecure
                ),
                max_members=config.max_members,
                memory=config.memory,
            )
            for peer_id, vectors in self.relay.local_peers().items():
                machine.local_peer_joined(peer_id, vectors)
            self._start_memory(machine)
            async with trio.open_nursery() as nursery:
                if zap is not None:
                    nursery.start_soon(zap.serve)
                await nursery.start(transport.run)
                self.membership, self._transport, self.endpoint = machine, transport, bound
                log.info(
                    "federation: %s listening on %s%s",
                    local.identity,
                    bound,
                    " (CURVE)" if self.keys else "",
                )
                self._apply(machine.start(trio.current_time()))
                nursery.start_soon(self._pump, machine, transport)
                nursery.start_soon(self._tick_loop, machine)
                if self.replica is not None:
                    nursery.start_soon(self._flush_loop)
                    if not self.replica.holder:
                        nursery.start_soon(self._await_region, machine)
                task_status.started(bound)
                try:
                    await trio.sleep_forever()
                finally:
                    with trio.CancelScope(shield=True):
                        self._apply(machine.shutdown())
                        await transport.flush(BYE_GRACE)
        finally:
            self._transport = None
            self.membership = None
            transport.close()
            if zap is not None:
                zap.close()
            context.term()
            self._forget_remote_peers()
            self.relay.close()
            if self.memlogs is not None:
                self.memlogs.close()
                self.memlogs = None

    async def _pump(self, machine: Membership, transport: Transport) -> None:
        """The data path, in one task waiting on one fd: frames from members and rings on
        the watched eventfds, each handled as soon as it is there, without a task switch
        between receiving a frame and writing the eventfd it rings."""

        def handle(origin: bytes, raw: bytes | None, key: str) -> None:
            now = trio.current_time()
            try:
                if raw is None:
                    problem = "a federation message must be exactly one frame"
                    actions = machine.receive_malformed(now, origin, problem)
                else:
                    actions = machine.receive(now, origin, raw, key)
            except Exception:
                log.exception("federation: internal error on a frame from %s", origin.hex())
                return
            self._apply(actions)

        relay = self.relay
        incoming = transport.incoming_fd()
        extra = [fd for fd, _ in self.wakeups]
        callbacks = [callback for _, callback in self.wakeups]
        for fd in (incoming, *extra):
            relay.add_wakeup_fd(fd)
        try:
            while True:
                for callback in callbacks:
                    callback()
                more = transport.receive_ready(handle)
                self._relay_rings()
                if more:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(relay.fileno())
        finally:
            for fd in (incoming, *extra):
                relay.remove_wakeup_fd(fd)

    async def _tick_loop(self, machine: Membership) -> None:
        while True:
            await trio.sleep(machine.heartbeat / 2)
            self._apply(machine.tick(trio.current_time()))

    # -- carrying out actions --------------------------------------------------------------

    def _relay_rings(self) -> None:
        """Send every ring the watched eventfds hold now to the members that own them."""
        machine, transport = self.membership, self._transport
        if machine is None or transport is None:
            return
        rings = self.relay.drain()
        replication = self.replication
        if replication is not None and rings:
            if self.memlogs is not None:  # a report queued before a ring just drained
                self.memlogs.read()
            self._flush(None, everything=True)  # what was written before the rings first
        for member, peer_id, vector, count in rings:
            if replication is not None:
                self._apply(replication.before_ring(member))
            frame = machine.ring(member, peer_id, vector, count)
            if frame is not None and not transport.send(frame.link, frame.data):
                self._overflowed.append(frame.link)
        if self._overflowed:
            self._apply([])

    def _apply(self, actions: list[Action]) -> None:
        transport, machine = self._transport, self.membership
        if transport is None or machine is None:
            return
        while True:
            for action in actions:
                kind = type(action)
                if kind is Send:
                    assert isinstance(action, Send)
                    if not transport.send(action.link, action.data):
                        self._overflowed.append(action.link)
                elif kind is Deliver:
                    assert isinstance(action, Deliver)
                    replica = self.replica
                    if replica is not None and not replica.admit(
                        action.member, action, trio.current_time()
                    ):
                        continue  # it waits for diffs from a third host
                    self._deliver(action)
                elif kind is Memory:
                    assert isinstance(action, Memory)
                    self._on_memory(action)
                elif kind is Stream:
                    assert isinstance(action, Stream)
                    self._on_stream(action)
                elif isinstance(action, RemoteJoined | RemoteLeft):
                    if self._held:
                        self._held.append(action)
                    elif isinstance(action, RemoteJoined):
                        self._remote_joined(action)
                    else:
                        self._remote_left(action.member, action.peer_id)
                elif isinstance(action, Dial):
                    transport.dial(
                        action.link, action.endpoint, action.server_key, action.routing_id
                    )
                elif isinstance(action, Close):
                    transport.close_link(action.link)
                elif isinstance(action, Reset):
                    transport.reset(action.link)
                elif isinstance(action, MemberEvent):
                    self._member_event(action)
            if not self._overflowed:
                return
            link = self._overflowed.pop(0)
            self._overflowed = [other for other in self._overflowed if other != link]
            log.warning(
                "federation: link to %s: more than %d frames queued",
                transport.link_endpoint(link),
                self.config.max_backlog,
            )
            actions = machine.link_overflow(trio.current_time(), link)

    # -- memory replication ----------------------------------------------------------------

    def _start_memory(self, machine: Membership) -> None:
        config, region = self.config, self.region
        if region is None:
            self.memory_ready.set()
            return
        holder = config.holder if config.holder is not None else not config.peers
        self.replica = Replica(machine.local.identity, Twin(region), holder=holder)
        self.replication = Replication(machine, self.replica)
        if config.memlog is not None:
            memlogs = MemoryLogs(
                config.memlog, config.memlog_mode, config.memlog_gid, len(region) // PAGE_SIZE
            )
            memlogs.pids.update(self._pids)
            memlogs.on_local_range = self.replica.add_local
            self.memlogs = memlogs
            self.wakeups.append((memlogs.fileno(), memlogs.read))
        if holder:
            self.memory_ready.set()

    def _flush(self, scan: tuple[int, int] | None, *, everything: bool = False) -> None:
        """Send this host's changes to every member (see :meth:`_pages`)."""
        replication = self.replication
        if replication is None or self.membership is None:
            return
        self._apply(replication.flush(self._pages(scan, everything), trio.current_time()))

    def _pages(
        self, scan: tuple[int, int] | None, everything: bool = False
    ) -> npt.NDArray[np.int64] | None:
        """The pages to diff: those our peers logged, plus the pages ``[first, stop)`` of
        ``scan`` (the background flush's round); or, with ``everything`` while a local peer
        does not log its writes, None: a scan of the whole region (the QEMU path, before a
        ring leaves)."""
        memlogs, replica = self.memlogs, self.replica
        if replica is None:
            return None
        unlogged = memlogs is None or memlogs.unlogged(self.relay.local_peers())
        pages = memlogs.take() if memlogs is not None else np.zeros(0, dtype=np.int64)
        if everything and unlogged:
            return None
        if scan is not None:
            pages = np.union1d(pages, replica.twin.changed_pages(*scan))
        return pages

    async def _flush_loop(self) -> None:
        """The background flush: what was written without a doorbell reaches the other
        hosts within ``flush`` seconds times the rounds a full scan takes. A round scans
        its share in slices, and the data path runs between two (a ring does not wait for
        the whole round)."""
        replica = self.replica
        assert replica is not None
        npages = replica.twin.npages
        step = max(1, FLUSH_SCAN_BYTES // PAGE_SIZE)
        piece = max(1, FLUSH_SLICE_BYTES // PAGE_SIZE)
        while True:
            await trio.sleep(self.config.flush)
            first = self._scan_from
            stop = min(npages, first + step)
            self._scan_from = 0 if stop >= npages else stop
            for lo in range(first, stop, piece):
                self._flush((lo, min(stop, lo + piece)))
                await trio.lowlevel.checkpoint()
            if replica.held():
                for deliver in replica.expire(trio.current_time(), 2 * self.config.timeout):
                    self._deliver(deliver)

    def _on_memory(self, action: Memory) -> None:
        replication = self.replication
        if replication is None:  # the machine drops a member that sends these
            return
        actions, released = replication.on_memory(
            action, trio.current_time(), functools.partial(self._pages, None, True)
        )
        self._apply(actions)
        for deliver in released:
            self._deliver(deliver)
        if replication.replica.holder and not self.memory_ready.is_set():
            self.memory_ready.set()

    def _on_stream(self, action: Stream) -> None:
        replication = self.replication
        if replication is None:
            return
        actions, released = replication.on_stream(action)
        self._apply(actions)
        for deliver in released:
            self._deliver(deliver)

    async def _await_region(self, machine: Membership) -> None:
        """A joining daemon waits for a member's region; once no member that is up can give
        one (none is up after the timeout, or all answered that they hold none), it starts
        with its own."""
        await trio.sleep(self.config.timeout)
        replication = self.replication
        assert replication is not None
        replica = replication.replica
        while not replica.holder:
            up = {m.identity for m in machine.members.values() if m.state.value == "up"}
            if not up - replication.no_region:
                log.info(
                    "federation: no member holds the region%s; this daemon starts with its own",
                    "" if up else " (none is up)",
                )
                replica.holder = True
                self.memory_ready.set()
                return
            await trio.sleep(machine.heartbeat)

    def _deliver(self, action: Deliver) -> None:
        """Deliver a member's ring now, or behind the registrations not confirmed yet (a
        local peer hears of a remote peer before its first ring)."""
        if self._unconfirmed or self._held:
            self._held.append(action)
        else:
            self.relay.deliver(action.peer_id, action.vector, action.count)

    def _release_held(self) -> None:
        """Pass on what waited behind confirmations, in order, up to the first ring that
        must still wait (joins and leaves go on: the host handles them in order)."""
        held, relay = self._held, self.relay
        while held:
            action = held[0]
            if isinstance(action, Deliver):
                if self._unconfirmed:
                    return
                relay.deliver(action.peer_id, action.vector, action.count)
            elif isinstance(action, RemoteJoined):
                self._remote_joined(action)
            else:
                self._remote_left(action.member, action.peer_id)
            held.popleft()

    def _remote_joined(self, action: RemoteJoined) -> None:
        try:
            vectors = self.host.remote_peer_joined(action.member, action.peer_id, action.vectors)
        except Exception as exc:
            log.error(
                "federation: could not register %s's peer %d: %s",
                action.member,
                action.peer_id,
                exc,
            )
            return
        if vectors is None:  # the host confirms later
            self._unconfirmed += 1
            self._awaiting[action.peer_id] = action.member
            return
        self._watch(action.member, action.peer_id, vectors)

    def _watch(self, member: str, peer_id: int, vectors: Sequence[SharedFd]) -> None:
        try:
            self.relay.watch(member, peer_id, vectors)
        except (OSError, ValueError) as exc:
            log.error("federation: cannot watch %s's peer %d: %s", member, peer_id, exc)
            self._call_host_left(member, peer_id)

    def _remote_left(self, member: str, peer_id: int) -> None:
        if self._awaiting.pop(peer_id, None) is not None or self.relay.unwatch(peer_id) is not None:
            self._call_host_left(member, peer_id)

    def _call_host_left(self, member: str, peer_id: int) -> None:
        try:
            self.host.remote_peer_left(member, peer_id)
        except Exception:
            log.exception("federation: the host failed to unregister %s's peer %d", member, peer_id)

    def _member_event(self, event: MemberEvent) -> None:
        try:
            self.host.member_event(event.kind, event.info)
        except Exception:
            log.exception("federation: the host failed on event %s", event.kind)

    def _forget_remote_peers(self) -> None:
        self._held.clear()
        for peer_id, member in [*self.relay.remote_peers().items(), *self._awaiting.items()]:
            self._remote_left(member, peer_id)
