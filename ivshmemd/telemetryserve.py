"""The telemetry sockets of the control process: peers' reports in, ticks and snapshots out.

Two zmq sockets, next to the control plane's and guarded the same way (the ZAP handler of
:mod:`ivshmemd.zap`: the allow-list over ipc, CURVE over tcp, a cap on live connections):

* a ROUTER (``SOCK.telemetry``) where our peers send ``report`` requests (no reply) and
  watchers (``ivshmemctl top``, the Prometheus collector) send ``watch`` requests, answered
  with a snapshot (:meth:`ivshmemd.telemetry.Aggregator.snapshot`) in the control plane's
  reply schema; a ``watch`` is also a *lease*: ticks go out for a few seconds after it;
* a PUB (``SOCK.ticks``) on which a tick goes out every interval while a lease is live,
  and nothing otherwise: peers report only when asked, so nobody watching costs nothing.

Our peers connect to these sockets only once someone watches (until then they only count):
while a lease is live the service keeps the flag file ``SOCK.telemetry.watched`` fresh (a
peer starting then connects at once) and, each tick, knocks (:data:`KNOCK_SIGNAL`, ignored
by default) on every registry peer that does not report yet.

Peers are clients like any other: a report is checked against the schema and against the
sender (over ipc its pid must be the SO_PEERCRED pid of its connection, so no peer speaks
for another), each connection gets a token bucket (a peer that floods loses its excess
reports, counted and logged at most once a second), and queues are bounded by high-water
marks: a flood costs the flooder, never the daemon or the other peers.

The daemon's side of a snapshot (its registry and counters) comes through ``ask``, a
coroutine that sends a control request over the control process's link to the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgpack
import trio
import zmq

from .control.schema import ErrorCode, _ok, error_reply, parse_peer_address
from .control.server import (
    ControlAccess,
    ControlLimits,
    ControlSetupError,
    _bind,
    _secure,
    _split_envelope,
    _zap_policy,
    tcp_needs_curve,
)
from .ratelimit import LogLimiter
from .telemetry import (
    KNOCK_SIGNAL,
    LEASE_SECONDS,
    MAX_REPORT_BYTES,
    TICK_TOPIC,
    Aggregator,
    ReportError,
    TelemetryEndpoints,
    validate_report,
    watched_flag,
)
from .zap import ConnectionCounter, ZapHandler, watch_connections
from .zap import monitor as zap_monitor
from .zmqtrio import TrioSocket

__all__ = ["Ask", "TelemetryService"]

log = logging.getLogger("ivshmemd")

#: a daemon request from here: ``await ask("peers")`` -> its result
Ask = Callable[[str], Awaitable[Any]]

_REPORTS_DOMAIN: Final = b"ivshmemd-telemetry"
_TICKS_DOMAIN: Final = b"ivshmemd-ticks"
#: reports a connection may send in a burst, and per second after it
BUCKET_BURST: Final = 8.0
BUCKET_RATE: Final = 12.0
#: connections remembered for their buckets (the oldest are forgotten past this)
MAX_BUCKETS: Final = 8192
#: live connections to each telemetry socket (fewer if the fd table is smaller)
MAX_TELEMETRY_CLIENTS: Final = 4096
QUEUE_HWM: Final = 256
#: a peer that does not report is knocked on again after this long
KNOCK_AGAIN: Final = 2.0
#: the flag file is touched at most this often
FLAG_EVERY: Final = 1.0
#: the longest lease one watch request may take
MAX_LEASE_SECONDS: Final = 600.0


class _Buckets:
    """One token bucket per connection (routing id)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._state: dict[bytes, tuple[float, float]] = {}

    def take(self, who: bytes) -> bool:
        now = self._clock()
        tokens, at = self._state.pop(who, (BUCKET_BURST, now))
        tokens = min(BUCKET_BURST, tokens + (now - at) * BUCKET_RATE)
        allowed = tokens >= 1.0
        self._state[who] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._state) > MAX_BUCKETS:
            del self._state[next(iter(self._state))]
        return allowed


class TelemetryService:
    """Serves the telemetry sockets (see the module docstring) until cancelled."""

    def __init__(
        self,
        endpoints: TelemetryEndpoints,
        ask: Ask,
        aggregator: Aggregator,
        max_clients: int = MAX_TELEMETRY_CLIENTS,
    ) -> None:
        self.endpoints = endpoints
        self.max_clients = max_clients
        self.ask = ask
        self.aggregator = aggregator
        self.flooded = 0
        self._chatter = LogLimiter(log)
        self._buckets = _Buckets(trio.current_time)
        self._watched = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._knocked: dict[int, float] = {}
        self._flag: tuple[str, tuple[int, int]] | None = None
        self._flag_at = -FLAG_EVERY
        self.knocks = 0

    # -- what watchers get ----------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """The snapshot as of now, with the daemon's registry, status and counters."""
        registry = (await self.ask("peers")).get("peers", [])
        status = await self.ask("status")
        self.aggregator.add_daemon_stats(await self.ask("stats"))
        snap = self.aggregator.snapshot(registry, status)
        snap["telemetry"]["flooded"] = self.flooded
        snap["telemetry"]["knocks"] = self.knocks
        return snap

    def watch(self, who: str, interval: float, seconds: float | None = None) -> None:
        """``who`` watches (a lease): ticks start now if nobody did."""
        if seconds is None:
            self.aggregator.watch(who, interval)
        else:
            self.aggregator.watch(who, interval, seconds)
        self._watched.set()

    def snapshot_from_thread(self, who: str, interval: float, seconds: float) -> dict[str, Any]:
        """For another thread (the Prometheus server): lease and snapshot, run in trio."""
        if self._token is None:
            raise RuntimeError("the telemetry service is not running")

        async def lease_and_snapshot() -> dict[str, Any]:
            self.watch(who, interval, seconds)
            return await self.snapshot()

        return trio.from_thread.run(lease_and_snapshot, trio_token=self._token)

    # -- serving --------------------------------------------------------------------------

    async def serve(
        self,
        *,
        access: ControlAccess | None = None,
        socket_mode: int = 0o600,
        socket_gid: int | None = None,
        task_status: trio.TaskStatus[TelemetryEndpoints] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bind both sockets, report the bound endpoints, and serve until cancelled; the
        ipc socket files are removed on the way out."""
        access = access or ControlAccess()
        eps = self.endpoints
        problem = tcp_needs_curve((eps.reports, eps.ticks), access)
        if problem is not None:
            raise ControlSetupError(problem)
        self._token = trio.lowlevel.current_trio_token()
        ctx: zmq.Context[Any] = zmq.Context()
        created: dict[str, tuple[int, int]] = {}
        sockets: list[TrioSocket] = []
        zap: ZapHandler | None = None
        try:
            counters = {
                _REPORTS_DOMAIN: ConnectionCounter("telemetry", self.max_clients),
                _TICKS_DOMAIN: ConnectionCounter("ticks", self.max_clients),
            }
            # bound before any socket that needs it
            zap = ZapHandler(ctx, _zap_policy(access, counters), "telemetry")
            router = TrioSocket(ctx.socket(zmq.ROUTER))
            sockets.append(router)
            pub = TrioSocket(ctx.socket(zmq.PUB))
            sockets.append(pub)
            for raw in (router.socket, pub.socket):
                raw.setsockopt(zmq.LINGER, 0)
                raw.setsockopt(zmq.SNDHWM, ControlLimits().reply_hwm)
                raw.setsockopt(zmq.RCVHWM, QUEUE_HWM)
            router.socket.setsockopt(zmq.MAXMSGSIZE, MAX_REPORT_BYTES)
            pub.socket.setsockopt(zmq.MAXMSGSIZE, 4096)
            monitors = {}
            for sock, domain in ((router, _REPORTS_DOMAIN), (pub, _TICKS_DOMAIN)):
                monitors[domain] = zap_monitor(sock.socket)
                sockets.append(monitors[domain])
            _secure(router.socket, eps.reports, _REPORTS_DOMAIN, access)
            _secure(pub.socket, eps.ticks, _TICKS_DOMAIN, access)
            bound = TelemetryEndpoints(
                reports=_bind(router.socket, eps.reports, socket_mode, socket_gid, created),
                ticks=_bind(pub.socket, eps.ticks, socket_mode, socket_gid, created),
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(zap.serve)
                for domain, monitor_sock in monitors.items():
                    nursery.start_soon(watch_connections, monitor_sock, counters[domain])
                nursery.start_soon(self._serve_requests, router, eps.reports.startswith("ipc://"))
                nursery.start_soon(self._tick, pub)
                task_status.started(bound)
        finally:
            self._token = None
            for sock in reversed(sockets):
                sock.close()
            if zap is not None:
                zap.close()
            ctx.term()
            from .sockpath import unlink_if_ours

            for path, ident in created.items():
                unlink_if_ours(path, ident)

    async def _tick(self, pub: TrioSocket) -> None:
        """A tick every interval while someone watches (with the flag kept fresh and the
        knocks); asleep otherwise."""
        try:
            while True:
                interval = self.aggregator.interval()
                if interval is None:
                    self._lower_flag()
                    self._watched = trio.Event()
                    await self._watched.wait()
                    continue
                self._raise_flag()
                tick = msgpack.packb({"interval": interval}, use_bin_type=True)
                pub.try_send_multipart([TICK_TOPIC, tick])
                await self._knock()
                await trio.sleep(interval)
        finally:
            self._lower_flag()

    def _raise_flag(self) -> None:
        """Create or touch ``SOCK.telemetry.watched`` (at most once a second)."""
        path = watched_flag(self.endpoints)
        now = time.monotonic()
        if path is None or now - self._flag_at < FLAG_EVERY:
            return
        self._flag_at = now
        try:
            if self._flag is None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                self._flag = (path, (st.st_dev, st.st_ino))
            else:
                os.utime(self._flag[0], follow_symlinks=False)
        except OSError as exc:  # a file we did not create, or no room: peers wait for a knock
            self._chatter.log("flag", logging.INFO, "telemetry: no flag file %s: %s", path,
                              exc.strerror or exc)  # fmt: skip

    def _lower_flag(self) -> None:
        if self._flag is not None:
            from .sockpath import unlink_if_ours

            unlink_if_ours(*self._flag)
            self._flag = None
            self._flag_at = -FLAG_EVERY

    async def _knock(self) -> None:
        """Knock on the registry peers that do not report yet (again every few seconds)."""
        try:
            registry = (await self.ask("peers")).get("peers", [])
        except Exception:
            return
        now = time.monotonic()
        reporting = self.aggregator.reporting_pids()
        pids = {p.get("pid") for p in registry if isinstance(p, dict)}
        self._knocked = {pid: at for pid, at in self._knocked.items() if pid in pids}
        for pid in pids:
            if not isinstance(pid, int) or pid <= 1 or pid == os.getpid() or pid in reporting:
                continue
            if now - self._knocked.get(pid, -KNOCK_AGAIN) < KNOCK_AGAIN:
                continue
            self._knocked[pid] = now
            with contextlib.suppress(OSError):
                os.kill(pid, KNOCK_SIGNAL)
                self.knocks += 1

    async def _serve_requests(self, router: TrioSocket, ipc: bool) -> None:
        while True:
            envelope, body = _split_envelope(await router.recv_frames())
            if len(body) != 1:
                continue
            reply = await self._handle(envelope[0], body[0], ipc)
            if reply is not None and not router.try_send_multipart([*envelope, reply]):
                self._chatter.log("reply", logging.INFO, "telemetry reply dropped: client gone")

    async def _handle(self, who: bytes, frame: zmq.Frame, ipc: bool) -> bytes | None:
        try:
            request = msgpack.unpackb(frame.bytes, raw=False)
        except Exception:
            return error_reply(ErrorCode.BAD_MSGPACK, "request is not valid msgpack")
        if not isinstance(request, dict) or request.get("v") != 1:
            return error_reply(ErrorCode.BAD_REQUEST, "request must be a schema-1 map")
        cmd, args = request.get("cmd"), request.get("args") or {}
        if cmd == "report":
            self._report(who, frame, args, ipc)
            return None
        if cmd == "watch":
            if not isinstance(args, dict):
                return error_reply(ErrorCode.BAD_ARGS, "'args' must be a map")
            interval, lease = args.get("interval", 0.25), args.get("seconds", LEASE_SECONDS)
            for value in (interval, lease):
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    problem = "args.interval and args.seconds must be positive numbers"
                    return error_reply(ErrorCode.BAD_ARGS, problem)
            self.watch(who.hex(), float(interval), min(float(lease), MAX_LEASE_SECONDS))
            try:
                return _ok(await self.snapshot())
            except Exception as exc:  # the daemon's link broke: say so, keep serving
                return error_reply(ErrorCode.INTERNAL, f"cannot reach the daemon: {exc}")
        return error_reply(
            ErrorCode.UNKNOWN_COMMAND, f"unknown command {cmd!r:.40} (report, watch)"
        )

    def _report(self, who: bytes, frame: zmq.Frame, args: Any, ipc: bool) -> None:
        if not self._buckets.take(who):
            self.flooded += 1
            self._chatter.log("flood", logging.WARNING,
                              "telemetry: a client sends reports faster than it is asked; "
                              "the excess is dropped")  # fmt: skip
            return
        try:
            report = validate_report(args)
        except ReportError as exc:
            self.aggregator.rejected += 1
            self._chatter.log("bad", logging.WARNING, "telemetry: bad report: %s", exc)
            return
        if ipc:
            creds = None
            with contextlib.suppress(zmq.ZMQError):
                creds = parse_peer_address(str(frame.get("Peer-Address")))
            if creds is None or creds.pid != report.pid:
                self.aggregator.rejected += 1
                self._chatter.log("pid", logging.WARNING,
                                  "telemetry: a report for pid %d came from another process",
                                  report.pid)  # fmt: skip
                return
        self.aggregator.add_report(report)
