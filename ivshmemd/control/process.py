"""The control plane in a process of its own, so that nothing it does can take the daemon down.

libzmq aborts the whole process when it runs out of file descriptors while accepting a
connection (``ipc_listener.cpp``: an assertion that tolerates ``ENFILE`` but not
``EMFILE``), and a flood of clients can make it do so: no amount of headroom in a shared fd
table makes a daemon safe from *any number* of control clients. So the daemon never runs
libzmq itself. :class:`ControlProcess` starts ``python -m ivshmemd.control.process`` (the
*control process*), which serves :func:`ivshmemd.control.server.serve_control` with its own fd
table, at a lower CPU priority (``nice`` 10: the peers' protocol path comes first), and
relays over one unix socket pair (the *link*):

* each request, with the client's credentials, to the daemon, which answers it from its
  registry (:func:`ivshmemd.control.schema.handle_request`) one at a time, between its other work;
* the daemon's stamped peer events to the events socket;
* its log lines (and anything it prints on stderr) to the daemon's log.

If the control process dies (an abort, a kill), the daemon logs how and starts a new one
(after a short, growing delay); peers never notice. It ignores the signals a terminal or a
process group sends (the daemon decides when it stops): it exits when the link closes, which
the daemon does at shutdown (and the kernel does if the daemon dies), removing its ipc socket
files first; the daemon waits for that, and removes any it left behind.

Link messages are msgpack arrays, streamed::

    daemon -> control process   ["config", {...}]  ["reply", id, bytes]  ["events", [[...], ...]]
    control process -> daemon   ["ready", {...}]  ["failed", text]  ["request", id, uid, bytes]
                                ["log", level, text]
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgpack
import trio

from ivshmemd.access import AllowList
from ivshmemd.childlink import AdoptedProcess, ChildLinkEntry
from ivshmemd.curve import CurveKeys
from ivshmemd.errors import one_line, unwrap
from ivshmemd.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ivshmemd.metrics import DEFAULT_MAX_LABELLED_PEERS, MetricsServer
from ivshmemd.ratelimit import LogLimiter
from ivshmemd.sockpath import unlink_if_ours
from ivshmemd.telemetry import Aggregator, TelemetryEndpoints
from ivshmemd.telemetryserve import MAX_TELEMETRY_CLIENTS, TelemetryService

from .schema import (
    MAX_REQUEST_BYTES,
    ControlView,
    Credentials,
    Event,
    decode_reply,
    encode_request,
    handle_request,
)
from .server import (
    ControlAccess,
    ControlEndpoints,
    ControlLimits,
    ControlSetupError,
    EventPublisher,
    serve_control,
)

__all__ = ["ControlConfig", "ControlProcess", "main"]

log = logging.getLogger("ivshmemd")

#: how long the control process may take to start serving, and to stop
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
#: delays before restarting a control process that died: from, to (doubling)
RESTART_DELAYS = (0.1, 10.0)
#: a control process that served this long has its restart delay reset
STABLE_AFTER = 30.0
#: largest link message (a peers reply for 65,536 peers fits)
MAX_LINK_MESSAGE = 64 << 20
_NICENESS = 10
_IGNORED_SIGNALS = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2,
)  # fmt: skip
#: a control process this image started, or one an earlier image did (after a re-exec)
_Process = trio.Process | AdoptedProcess


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """What the control process serves, and for whom."""

    control: str
    events: str
    socket_mode: int = 0o600
    socket_gid: int | None = None
    allow: AllowList = dataclasses.field(default_factory=AllowList)
    curve: CurveKeys | None = None
    verbose: bool = False
    #: where peers report telemetry (None: nowhere), Prometheus (host, port) (None: off)
    telemetry: TelemetryEndpoints | None = None
    metrics: tuple[str, int] | None = None
    metrics_max_peers: int = DEFAULT_MAX_LABELLED_PEERS

    def to_wire(self) -> dict[str, Any]:
        curve = self.curve
        telemetry = self.telemetry
        return {
            "telemetry": None if telemetry is None else [telemetry.reports, telemetry.ticks],
            "metrics": None if self.metrics is None else list(self.metrics),
            "metrics_max_peers": self.metrics_max_peers,
            "control": self.control,
            "events": self.events,
            "socket_mode": self.socket_mode,
            "socket_gid": self.socket_gid,
            "allow_uids": sorted(self.allow.uids),
            "allow_gids": sorted(self.allow.gids),
            "curve": None if curve is None else [curve.public, curve.secret, sorted(curve.clients)],
            "verbose": self.verbose,
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ControlConfig:
        curve = raw["curve"]
        return cls(
            control=raw["control"],
            events=raw["events"],
            socket_mode=raw["socket_mode"],
            socket_gid=raw["socket_gid"],
            allow=AllowList(frozenset(raw["allow_uids"]), frozenset(raw["allow_gids"])),
            curve=None if curve is None else CurveKeys(curve[0], curve[1], frozenset(curve[2])),
            verbose=raw["verbose"],
            telemetry=None if raw["telemetry"] is None else TelemetryEndpoints(*raw["telemetry"]),
            metrics=None if raw["metrics"] is None else (raw["metrics"][0], raw["metrics"][1]),
            metrics_max_peers=raw["metrics_max_peers"],
        )


class _Link:
    """One end of the link: msgpack arrays over a unix stream socket, one sender at a time.

    It keeps the bytes received and not yet handled (:meth:`pending`: from the start of the
    message in hand, if any), so that a re-exec hands them to the next image."""

    def __init__(self, sock: socket.socket, pending: bytes = b"") -> None:
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_LINK_MESSAGE)
        self._send_lock = trio.Lock()
        self._fed = bytearray(pending)
        self._base = 0
        self._in_hand: int | None = None
        self._unpacker.feed(pending)

    def fileno(self) -> int:
        return self.stream.socket.fileno()

    def pending(self) -> bytes:
        """Received bytes not handled yet (the message in hand, and all after it)."""
        start = self._unpacker.tell() if self._in_hand is None else self._in_hand
        return bytes(self._fed[start - self._base :])

    async def send(self, *message: Any) -> None:
        data = msgpack.packb(list(message), use_bin_type=True)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def __aiter__(self) -> AsyncIterator[list[Any]]:
        unpacker = self._unpacker
        while True:
            while True:
                start = unpacker.tell()
                try:
                    message = next(unpacker)
                except StopIteration:
                    break
                if isinstance(message, list) and message and isinstance(message[0], str):
                    self._in_hand = start
                    yield message
                    self._in_hand = None
            consumed = unpacker.tell() - self._base
            del self._fed[:consumed]
            self._base += consumed
            try:
                data = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self._fed += data
            unpacker.feed(data)

    async def aclose(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.aclose()


# ---------------------------------------------------------------------------------------------
# The daemon's side
# ---------------------------------------------------------------------------------------------


def _exit_text(returncode: int | None) -> str:
    if returncode is None:
        return "its link closed"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class ControlProcess:
    """The daemon's handle on its control process (see the module docstring)."""

    name = "control plane"

    def __init__(self, config: ControlConfig, view: ControlView, publisher: EventPublisher) -> None:
        self.config = config
        self.view = view
        self.publisher = publisher
        self.restarts = 0
        self.pid: int | None = None
        self._files: list[tuple[str, tuple[int, int]]] = []
        self._chatter = LogLimiter(log)
        #: held while a request is handled or events are sent, and by a handover
        self._turn = trio.Lock()
        self._live: tuple[_Process, _Link, ControlEndpoints] | None = None
        self._adopted: ChildLinkEntry | None = None

    # -- handover (ivshmemd.handover) ----------------------------------------------------

    async def hold(self) -> None:
        """Wait until no request is being handled and nothing is being sent on the link,
        and keep it so (for a handover) until :meth:`release`."""
        await self._turn.acquire()

    def release(self) -> None:
        """Let requests and events flow again (the handover did not happen)."""
        self._turn.release()

    def export(self) -> ChildLinkEntry | None:
        """This child's entry in the handover state (under :meth:`hold`); None while no
        control process runs (the next image starts one). A process caught starting or
        stopping has an entry without a link: the next image reaps it."""
        if self._live is None:
            return None if self.pid is None else {"kind": "control", "pid": self.pid, "link": None}
        process, link, endpoints = self._live
        stderr = process.stderr
        return {
            "kind": "control", "pid": process.pid, "link": link.fileno(),
            "stderr": stderr.fileno() if isinstance(stderr, trio.lowlevel.FdStream) else None,
            "pending": link.pending(), "endpoints": [endpoints.control, endpoints.events],
            "files": [[path, *ident] for path, ident in self._files],
            "restarts": self.restarts,
        }  # fmt: skip

    def adopt(self, entry: ChildLinkEntry) -> None:
        """Serve on with the control process an earlier image of this process started
        (:meth:`run` then adopts it instead of starting one)."""
        self._adopted = entry
        self.restarts = int(entry.get("restarts", 0))
        self._files = [(str(p), (int(d), int(i))) for p, d, i in entry["files"]]

    async def run(self, *, task_status: trio.TaskStatus[ControlEndpoints]) -> None:
        """Start the control process (``nursery.start`` returns the bound endpoints or
        raises :class:`ControlSetupError`) and keep one running until cancelled."""
        delay = RESTART_DELAYS[0]
        first = True
        try:
            while True:
                started = trio.current_time()
                try:
                    outcome = await self._one_life(task_status if first else None)
                except Exception as exc:  # trio may have wrapped it in a group: look inside
                    failure = unwrap(exc)
                    if not isinstance(failure, ControlSetupError):
                        raise
                    if first:  # the daemon's start-up reports it
                        raise failure from None
                    outcome = str(failure)  # later: an outage of the control plane only
                first = False
                if trio.current_time() - started > STABLE_AFTER:
                    delay = RESTART_DELAYS[0]
                log.error("control plane process stopped (%s); restarting in %g s", outcome,
                          delay)  # fmt: skip
                await trio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAYS[1])
                self.restarts += 1
        finally:
            for path, ident in self._files:
                unlink_if_ours(path, ident)

    async def _one_life(self, task_status: trio.TaskStatus[ControlEndpoints] | None) -> str:
        """Run one control process until it ends; returns how it ended."""
        if self._adopted is not None:
            return await self._adopted_life(self._adopted, task_status)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "ivshmemd.control.process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            theirs.close()
            raise ControlSetupError(f"cannot start the control plane process: {exc}") from None
        theirs.close()
        return await self._life(process, _Link(ours), None, task_status)

    async def _adopted_life(
        self, entry: ChildLinkEntry, task_status: trio.TaskStatus[ControlEndpoints] | None
    ) -> str:
        self._adopted = None
        process = AdoptedProcess(int(entry["pid"]), entry["stderr"])
        link = _Link(socket.socket(fileno=int(entry["link"])), bytes(entry["pending"]))
        endpoints = ControlEndpoints(control=entry["endpoints"][0], events=entry["endpoints"][1])
        return await self._life(process, link, endpoints, task_status)

    async def _life(
        self,
        process: _Process,
        link: _Link,
        endpoints: ControlEndpoints | None,
        task_status: trio.TaskStatus[ControlEndpoints] | None,
    ) -> str:
        """Serve through one control process (``endpoints`` known: adopted, no handshake)."""
        self.pid = process.pid
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay_stderr, process)
                if endpoints is None:
                    endpoints = await self._handshake(link, process)
                    if task_status is None:
                        log.info("control plane process restarted (pid %d)", process.pid)
                if task_status is not None:
                    task_status.started(endpoints)
                self._live = (process, link, endpoints)
                nursery.start_soon(self._pump_events, link)
                await self._serve(link)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # a start-up failure (e.g. a control process killed by a flood while it binds)
            # is a ControlSetupError for run(), which restarts; never a group that would
            # end the daemon
            setup, rest = group.split(ControlSetupError)
            if setup is not None and rest is None:
                raise unwrap(setup) from None
            raise
        finally:
            self._live = None
            with trio.CancelScope(shield=True):
                await link.aclose()  # EOF: the control process cleans up and exits
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                self.pid = None
        return _exit_text(process.returncode)

    async def _handshake(self, link: _Link, process: _Process) -> ControlEndpoints:
        await link.send("config", self.config.to_wire())
        with trio.move_on_after(START_TIMEOUT):
            async for message in link:
                if message[0] == "log":
                    self._log(message)
                elif message[0] == "failed":
                    raise ControlSetupError(str(message[1]))
                elif message[0] == "ready":
                    info = message[1]
                    self._files = [(str(p), (int(d), int(i))) for p, d, i in info["files"]]
                    return ControlEndpoints(control=info["control"], events=info["events"])
            await process.wait()
            raise ControlSetupError(
                f"the control plane process ended during start-up "
                f"({_exit_text(process.returncode)})"
            )
        raise ControlSetupError(f"the control plane process did not start in {START_TIMEOUT:g} s")

    async def _serve(self, link: _Link) -> None:
        """Answer requests one at a time, letting the peers' tasks run between two."""
        async for message in link:
            if message[0] == "request" and len(message) == 4:
                _tag, request_id, uid, raw = message
                if not isinstance(raw, bytes) or len(raw) > MAX_REQUEST_BYTES:
                    raw = b""
                requester = uid if isinstance(uid, int) and not isinstance(uid, bool) else None
                async with self._turn:
                    reply = handle_request(raw, self.view, requester)
                    await link.send("reply", request_id, reply)
                await trio.lowlevel.checkpoint()
            elif message[0] == "log":
                self._log(message)

    async def _pump_events(self, link: _Link) -> None:
        publisher = self.publisher
        while True:
            await publisher.wait_pending()
            async with self._turn:
                batch = [dataclasses.astuple(event) for event in publisher.take_pending()]
                if batch:
                    await link.send("events", batch)

    async def _relay_stderr(self, process: _Process) -> None:
        assert process.stderr is not None
        buffer = b""
        async for chunk in process.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                if text:
                    self._chatter.log("stderr", logging.WARNING, "control plane: %s", text)
            buffer = buffer[-4096:]

    def _log(self, message: list[Any]) -> None:
        if len(message) == 3 and isinstance(message[1], int):
            level, text = message[1], str(message[2])
            self._chatter.log(text[:60], level, "%s", text)


# ---------------------------------------------------------------------------------------------
# The control process's side
# ---------------------------------------------------------------------------------------------


class _LinkLog(logging.Handler):
    """Queues this process's log records for the daemon (a bounded queue: a flood of log
    lines loses the oldest, never blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: deque[tuple[int, str]] = deque(maxlen=256)
        self.wakeup = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pending.append((record.levelno, self.format(record)))
            self.wakeup.set()
        except Exception:
            self.handleError(record)


def _spare_fds() -> int:
    """The fds this process can give to connections (its soft limit raised to the hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if (hard != resource.RLIM_INFINITY and hard > soft) or hard == resource.RLIM_INFINITY:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return max(4, soft - len(os.listdir("/proc/self/fd")) - 32)


def _limits(spare: int) -> ControlLimits:
    """Connection caps that fit ``spare`` fds (each connection is one fd)."""
    defaults = ControlLimits()
    return ControlLimits(
        max_clients=min(defaults.max_clients, max(2, spare * 2 // 3)),
        max_subscribers=min(defaults.max_subscribers, max(2, spare // 3)),
    )


async def _serve_link(link_fd: int) -> None:
    link = _Link(socket.socket(fileno=link_fd))
    messages = link.__aiter__()
    first = await anext(messages, None)
    if first is None or first[0] != "config":
        return
    config = ControlConfig.from_wire(first[1])
    handler = _LinkLog()
    handler.setFormatter(logging.Formatter("control plane: %(message)s"))
    logger = logging.getLogger("ivshmemd")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if config.verbose else logging.INFO)
    logger.propagate = False
    publisher = EventPublisher()
    replies: trio.MemorySendChannel[tuple[int, bytes]]
    replies, incoming = trio.open_memory_channel(1)
    counter = 0
    one_at_a_time = trio.Lock()  # the control socket's and the telemetry's requests

    async def forward(raw: bytes, creds: Credentials | None) -> bytes:
        nonlocal counter
        async with one_at_a_time:
            counter += 1
            await link.send("request", counter, None if creds is None else creds.uid, raw)
            while True:
                request_id, reply = await incoming.receive()
                if request_id == counter:
                    return bytes(reply)

    async def ask(cmd: str) -> Any:
        """A request of our own to the daemon (the telemetry's view of its registry)."""
        return decode_reply(await forward(encode_request(cmd), None))

    async def ship_logs() -> None:
        while True:
            await handler.wakeup.wait()
            handler.wakeup = trio.Event()
            while handler.pending:
                level, text = handler.pending.popleft()
                await link.send("log", level, text)

    def allow(creds: Credentials) -> str | None:
        return config.allow.check(creds.uid, creds.gid, creds.pid)

    access = ControlAccess(allow=allow, curve=config.curve)
    # the fds: the control plane's sockets share them with the telemetry's (a peer that
    # reports holds two connections: reports and ticks)
    spare = _spare_fds()
    telemetry_share = spare // 2 if config.telemetry is not None else 0
    limits = _limits(spare - telemetry_share)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ship_logs)
        try:
            bound = await nursery.start(
                lambda task_status: serve_control(
                    None, config.control, config.events, publisher,
                    socket_mode=config.socket_mode, socket_gid=config.socket_gid,
                    access=access, limits=limits, handler=forward, task_status=task_status,
                )
            )  # fmt: skip
        except ControlSetupError as exc:
            await link.send("failed", str(exc))
            nursery.cancel_scope.cancel()
            return
        metrics = None
        if config.telemetry is not None:
            service = TelemetryService(
                config.telemetry, ask, Aggregator(),
                max_clients=min(MAX_TELEMETRY_CLIENTS, max(2, telemetry_share // 2)),
            )  # fmt: skip
            try:
                await nursery.start(
                    lambda task_status: service.serve(
                        access=access, socket_mode=config.socket_mode,
                        socket_gid=config.socket_gid, task_status=task_status,
                    )
                )  # fmt: skip
                if config.metrics is not None:
                    metrics = _start_metrics(config, service)
            except (ControlSetupError, OSError) as exc:
                await link.send("failed", str(exc))
                nursery.cancel_scope.cancel()
                return
        files = [[path, *ident] for path, ident in _created_files(config)]
        await link.send("ready", {"control": bound.control, "events": bound.events,
                                  "files": files})  # fmt: skip
        try:
            async for message in messages:
                if message[0] == "reply" and len(message) == 3:
                    await replies.send((int(message[1]), bytes(message[2])))
                elif message[0] == "events":
                    for fields in message[1]:
                        with contextlib.suppress(TypeError, ValueError):
                            publisher.forward(Event(*fields))
        finally:
            if metrics is not None:
                await trio.to_thread.run_sync(metrics.close)
        nursery.cancel_scope.cancel()  # the daemon closed the link: stop serving


def _start_metrics(config: ControlConfig, service: TelemetryService) -> MetricsServer:
    """Prometheus over HTTP, each scrape a fresh snapshot (and a lease on the peers'
    reports); :class:`OSError` if the address cannot be bound."""
    from ivshmemd.metrics import SCRAPE_INTERVAL, SCRAPE_LEASE

    assert config.metrics is not None
    host, port = config.metrics

    def take() -> dict[str, Any]:
        return service.snapshot_from_thread("prometheus", SCRAPE_INTERVAL, SCRAPE_LEASE)

    server = MetricsServer(host, port, take, config.metrics_max_peers)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, server.port)
    return server


def _created_files(config: ControlConfig) -> list[tuple[str, tuple[int, int]]]:
    """The ipc socket files now serving (so that the daemon can remove them if we die)."""
    found = []
    telemetry = config.telemetry
    extra = () if telemetry is None else (telemetry.reports, telemetry.ticks)
    for endpoint in (config.control, config.events, *extra):
        if endpoint.startswith("ipc://") and not endpoint.startswith("ipc://@"):
            path = endpoint[len("ipc://") :]
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                found.append((path, (st.st_dev, st.st_ino)))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ivshmemd.control.process LINK_FD``: the control process (started by the
    daemon, not by people)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or not args[0].isdigit():
        print("ivshmemd.control.process: started by ivshmemd, not by hand", file=sys.stderr)
        return EXIT_USAGE
    for signum in _IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(_NICENESS)
    try:
        trio.run(_serve_link, int(args[0]))
    except BaseException as exc:  # one line on stderr, which the daemon logs
        print(f"fatal: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
