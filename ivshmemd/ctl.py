"""``ivshmemctl``: ask a running ivshmemd how it is doing, and tell it what to do.

    ivshmemctl [-S SOCK | --control ENDPOINT] status | peers | kick ID | stats | watch

The daemon is found from its unix socket path (``-S``, the same path given to ``ivshmemd``),
next to which it serves ``SOCK.ctl`` (requests) and ``SOCK.events`` (the event stream), or
from an explicit zmq endpoint (``--control``, and ``--events`` for ``watch``). Every command
takes ``--json`` for machine-readable output; the default is a table for people.

Exit status: 0 success, 1 the daemon answered with an error (e.g. no such peer, permission
denied, or it refused the connection: not on its allow-list, or a CURVE key it does not
accept), 2 bad usage, 3 no daemon answered in time. No traceback for any of them.

A daemon reached over tcp speaks only CURVE: give ``--curve-key`` (your ``*.key_secret``)
and ``--curve-server-key`` (the daemon's public ``*.key``); see :mod:`ivshmemd.curve`.

The command set is open: besides its own commands (:func:`register_control_commands`),
``ivshmemctl`` calls every function registered in the entry-point group
:data:`COMMANDS_GROUP` (``ivshmemctl.commands``) to add more; ``up`` comes from the
``peers`` package that way, so this module never names the packages built on it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Final, TextIO, TypeAlias

import zmq

from ivshmemd import __version__
from ivshmemd.argtypes import positive_int, seconds
from ivshmemd.control import (
    EVENTS_WELCOME,
    ControlError,
    Event,
    ProtocolError,
    SequenceTracker,
    decode_event,
    decode_reply,
    default_control_endpoint,
    default_events_endpoint,
    encode_request,
    events_endpoint_for,
)
from ivshmemd.curve import ClientCurve, CurveKeyError, client_keys
from ivshmemd.errors import unwrap
from ivshmemd.exitcodes import EXIT_FAILED, EXIT_NO_DAEMON, EXIT_OK, signal_exit
from ivshmemd.federation.keys import KeyFileError, keygen
from ivshmemd.protocol import DEFAULT_SOCKET, MAX_PEER_ID

__all__ = [
    "COMMANDS_GROUP",
    "ControlClient",
    "NoDaemonError",
    "build_parser",
    "main",
    "register_control_commands",
    "resolve_endpoints",
]

DEFAULT_TIMEOUT: Final = 2.0

#: Entry-point group of subcommand providers: each names a function called as
#: ``function(subparsers, common)`` that adds its subcommands; a subcommand sets
#: ``run=callable(args) -> int`` with set_defaults.
COMMANDS_GROUP: Final = "ivshmemctl.commands"

if TYPE_CHECKING:  # not subscriptable at run time on 3.11
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


class NoDaemonError(Exception):
    """No daemon answered (not running, wrong path, no permission, timeout)."""


# ---------------------------------------------------------------------------------------------
# Talking to the daemon
# ---------------------------------------------------------------------------------------------


def _check_ipc_path(endpoint: str, what: str) -> None:
    """Turn the common ipc failures into clear messages before waiting for a timeout."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint[len("ipc://") :]
    if not os.path.exists(path):
        raise NoDaemonError(
            f"no daemon: {path} does not exist (is ivshmemd running, and with this -S?)"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        st = os.stat(path)
        raise NoDaemonError(
            f"permission denied on {what} socket {path} (mode {st.st_mode & 0o777:04o}, "
            f"owner uid {st.st_uid}); run as the daemon's user or root"
        )


#: the handshake outcomes that mean the daemon turned this connection away
_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_REFUSAL = (
    "the daemon refused the connection: this user is not on its allow-list, or (over "
    "tcp) the CURVE keys do not match"
)
#: the ZAP status of a refusal for now (the daemon has all the connections it takes)
_ZAP_BUSY = 300
_BUSY = "the daemon has all the control connections it takes; try again"


def _connect(sock: zmq.Socket[bytes], endpoint: str, curve: ClientCurve | None) -> None:
    if endpoint.startswith("tcp://"):
        if curve is None:
            raise NoDaemonError(
                f"{endpoint} is tcp: the daemon serves tcp only with CURVE; give --curve-key "
                "and --curve-server-key"
            )
        curve.apply(sock)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise NoDaemonError(f"cannot connect to {endpoint}: {exc}") from None


def _wait_readable(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes], timeout: float) -> bool:
    """Wait for ``sock`` to have a message; raise a permission error if the daemon turned
    the connection away during the handshake (seen on ``monitor``)."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        ready = dict(poller.poll(int(remaining * 1000) + 1))
        if sock in ready:
            return True
        if monitor in ready:
            from zmq.utils.monitor import recv_monitor_message

            event = recv_monitor_message(monitor)
            if event["event"] & _REFUSED and event.get("value") == _ZAP_BUSY:
                raise ControlError("busy", _BUSY)
            if event["event"] & _REFUSED:
                raise ControlError("permission-denied", _REFUSAL)
    return False


class ControlClient:
    """A blocking request/reply client: one zmq REQ socket per request, so that a request
    that timed out never confuses the next one."""

    def __init__(
        self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, curve: ClientCurve | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.curve = curve
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def request(self, cmd: str, args: Mapping[str, Any] | None = None) -> Any:
        """Send one request; return its result. Raises :class:`NoDaemonError` when nothing
        answers within the timeout and :class:`ControlError` for an error reply (or a
        connection the daemon refused)."""
        _check_ipc_path(self.endpoint, "control")
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(_REFUSED)
        try:
            _connect(sock, self.endpoint, self.curve)
            sock.send(encode_request(cmd, args))
            if not _wait_readable(sock, monitor, self.timeout):
                raise NoDaemonError(
                    f"no daemon answered on {self.endpoint} within {self.timeout:g} s"
                )
            return decode_reply(sock.recv())
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def close(self) -> None:
        self._ctx.destroy(linger=0)


def resolve_endpoints(args: argparse.Namespace) -> tuple[str, str]:
    """(control, events) endpoints from ``--control``/``--events`` or ``-S``."""
    control = getattr(args, "control", None)
    events = getattr(args, "events", None)
    if control:
        if not events:
            try:
                events = events_endpoint_for(control)
            except ValueError as exc:
                raise NoDaemonError(f"{exc} (with --events)") from None
        return control, events
    socket_path = getattr(args, "socket", None) or DEFAULT_SOCKET
    return (
        default_control_endpoint(socket_path),
        events or default_events_endpoint(socket_path),
    )


# ---------------------------------------------------------------------------------------------
# Human output
# ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(_jsonable(value), indent=2, sort_keys=True), file=out)


def _human_size(size: Any) -> str:
    if not isinstance(size, int) or isinstance(size, bool):
        return str(size)
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def _human_duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return str(seconds)
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{seconds:.1f}s"


def _human_time(stamp: Any) -> str:
    if not isinstance(stamp, int | float) or isinstance(stamp, bool):
        return str(stamp)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _cell(value: Any) -> str:
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "-"
    return str(value)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], out: TextIO) -> None:
    rows = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    for row in [list(headers), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _key_values(pairs: Iterable[tuple[str, str]], out: TextIO) -> None:
    pairs = list(pairs)
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key.ljust(width)}  {value}", file=out)


def format_status(status: Mapping[str, Any], out: TextIO) -> None:
    rest = dict(status)
    version = rest.pop("version", "?")
    uptime = rest.pop("uptime", None)
    print(
        f"ivshmemd {version}" + (f", up {_human_duration(uptime)}" if uptime is not None else ""),
        file=out,
    )
    pairs: list[tuple[str, str]] = []
    shm = rest.pop("shm", None)
    if isinstance(shm, Mapping):
        where = shm.get("path") or shm.get("name") or "?"
        name = shm.get("name")
        label = f"{name} ({where})" if name and name != where else str(where)
        pairs.append(("shm", f"{label}, {_human_size(shm.get('size'))}"))
    elif shm is not None:
        pairs.append(("shm", _cell(shm)))
    for key in ("vectors", "peers"):
        if key in rest:
            pairs.append((key, _cell(rest.pop(key))))
    pairs.extend((str(key), _cell(value)) for key, value in rest.items())
    _key_values(pairs, out)


PEER_COLUMNS: Final = ("id", "pid", "uid", "gid", "vectors", "connected_at")


def format_peers(peers: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    if not peers:
        print("no peers connected", file=out)
        return
    extra = sorted({k for p in peers for k in p} - set(PEER_COLUMNS))
    columns = [c for c in PEER_COLUMNS if any(c in p for p in peers)] + extra
    headers = ["CONNECTED" if c == "connected_at" else c.upper() for c in columns]
    rows = [
        [_human_time(p.get(c)) if c == "connected_at" else _cell(p.get(c)) for c in columns]
        for p in sorted(peers, key=lambda p: (p.get("id") is None, p.get("id", 0)))
    ]
    _table(headers, rows, out)


def format_stats(stats: Mapping[str, Any], out: TextIO) -> None:
    _key_values(((str(k).replace("_", " "), _cell(v)) for k, v in stats.items()), out)


def format_event(event: Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
    millis = int((event.time % 1) * 1000)
    line = (
        f"{stamp}.{millis:03d}  #{event.seq:<6d} {event.kind:<11s} "
        f"peer {event.peer_id} ({event.vectors} vector{'s' if event.vectors != 1 else ''})"
    )
    if event.reason:
        line += f", {event.reason}"
    return line


def event_json(event: Event) -> dict[str, Any]:
    body: dict[str, Any] = {
        "seq": event.seq,
        "event": event.kind,
        "peer_id": event.peer_id,
        "vectors": event.vectors,
        "time": event.time,
    }
    if event.reason is not None:
        body["reason"] = event.reason
    return body


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def _curve(args: argparse.Namespace) -> ClientCurve | None:
    key, server = getattr(args, "curve_key", None), getattr(args, "curve_server_key", None)
    if not key and not server:
        return None
    if not (key and server):
        raise NoDaemonError("--curve-key and --curve-server-key go together")
    try:
        return client_keys(key, server)
    except CurveKeyError as exc:
        raise NoDaemonError(str(exc)) from None


def _client(args: argparse.Namespace) -> ControlClient:
    control, _ = resolve_endpoints(args)
    return ControlClient(control, args.timeout, _curve(args))


def _simple(
    cmd: str, formatter: Callable[[Any, TextIO], None]
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        client = _client(args)
        try:
            result = client.request(cmd)
        finally:
            client.close()
        if args.json:
            _print_json(result, sys.stdout)
        else:
            formatter(result, sys.stdout)
        return EXIT_OK

    return run


def _run_peers(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        result = client.request("peers")
    finally:
        client.close()
    peers = result.get("peers", []) if isinstance(result, Mapping) else []
    if args.json:
        _print_json(peers, sys.stdout)
    else:
        format_peers(peers, sys.stdout)
    return EXIT_OK


def _run_kick(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        result = client.request("kick", {"id": args.peer_id})
    finally:
        client.close()
    if args.json:
        _print_json(result, sys.stdout)
    else:
        print(f"peer {args.peer_id} kicked", file=sys.stdout)
    return EXIT_OK


def _run_keygen(args: argparse.Namespace) -> int:
    """``keygen DIR NAME``: a CURVE certificate pair for a federated daemon."""
    try:
        public, secret = keygen(args.directory, args.name)
    except KeyFileError as exc:
        print(f"ivshmemctl keygen: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {public} (public: put it in the others' --federation-allow directory) "
          f"and {secret} (this daemon's --federation-key)")  # fmt: skip
    return EXIT_OK


def _run_watch(args: argparse.Namespace) -> int:
    _, events_endpoint = resolve_endpoints(args)
    _check_ipc_path(events_endpoint, "events")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)  # never drop on our side: the daemon's queue is the limit
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    monitor = sub.get_monitor_socket(_REFUSED)
    tracker = SequenceTracker()
    seen = 0
    try:
        _connect(sub, events_endpoint, _curve(args))
        if not _wait_readable(sub, monitor, args.timeout):
            raise NoDaemonError(
                f"no daemon answered on {events_endpoint} within {args.timeout:g} s"
            )
        sub.disable_monitor()
        print(f"watching events on {events_endpoint} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        while args.count is None or seen < args.count:
            frames = sub.recv_multipart()
            if frames == [EVENTS_WELCOME]:
                continue
            try:
                event = decode_event(frames)
            except ProtocolError as exc:
                print(f"ivshmemctl: ignoring a malformed event: {exc}", file=sys.stderr)
                continue
            gap = tracker.observe(event.seq)
            if gap is not None:
                first, last = gap
                count = last - first + 1
                print(
                    f"ivshmemctl: gap in the event sequence: {count} event"
                    f"{'s' if count != 1 else ''} missed (seq {first}..{last})",
                    file=sys.stderr,
                    flush=True,
                )
            if args.json:
                print(json.dumps(event_json(event)), flush=True)
            else:
                print(format_event(event), flush=True)
            seen += 1
    finally:
        monitor.close(linger=0)
        sub.close(linger=0)
        ctx.term()
    return EXIT_OK


def _peer_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a peer id: {text!r}") from None
    if not 0 <= value <= MAX_PEER_ID:
        raise argparse.ArgumentTypeError(f"a peer id is in 0..{MAX_PEER_ID}, not {value}")
    return value


def register_control_commands(subparsers: SubParsers, common: argparse.ArgumentParser) -> None:
    """Add ``status``, ``peers``, ``kick``, ``stats`` and ``watch``."""
    p = subparsers.add_parser("status", parents=[common], help="daemon version, shm, peers")
    p.set_defaults(run=_simple("status", format_status))
    p = subparsers.add_parser("peers", parents=[common], help="the connected peers")
    p.set_defaults(run=_run_peers)
    p = subparsers.add_parser(
        "kick", parents=[common], help="disconnect a peer (daemon's uid or root only)"
    )
    p.add_argument("peer_id", metavar="ID", type=_peer_id, help="the peer id to disconnect")
    p.set_defaults(run=_run_kick)
    p = subparsers.add_parser("stats", parents=[common], help="counters since start-up")
    p.set_defaults(run=_simple("stats", format_stats))
    p = subparsers.add_parser(
        "watch", parents=[common], help="print peer-joined/peer-left events as they happen"
    )
    p.add_argument(
        "--events",
        metavar="ENDPOINT",
        default=argparse.SUPPRESS,
        help="events endpoint (default: derived from -S or --control)",
    )
    p.add_argument("--count", type=positive_int, default=None, help="exit after N events")
    p.set_defaults(run=_run_watch)
    p = subparsers.add_parser(
        "keygen", parents=[common], help="write a CURVE certificate pair for a federated daemon"
    )
    p.add_argument("directory", metavar="DIR", help="where to write (created if missing)")
    p.add_argument("name", metavar="NAME", help="NAME.key (public) and NAME.key_secret")
    p.set_defaults(run=_run_keygen)


# ---------------------------------------------------------------------------------------------
# Parser and entry point
# ---------------------------------------------------------------------------------------------


def _add_target_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """-S/--control/--timeout/--json, accepted before and after the subcommand. On the
    subcommand parsers the defaults are suppressed so they do not undo a value given first."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "-S",
        "--socket",
        metavar="SOCK",
        default=default(None),
        help=f"the daemon's unix socket path, as given to ivshmemd -S (default {DEFAULT_SOCKET})",
    )
    target.add_argument(
        "--control",
        metavar="ENDPOINT",
        default=default(None),
        help="the control endpoint, e.g. ipc:///run/ivshmem/ivshmem.sock.ctl or tcp://h:p",
    )
    parser.add_argument(
        "--timeout",
        type=seconds(),
        metavar="SECONDS",
        default=default(DEFAULT_TIMEOUT),
        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable output"
    )
    parser.add_argument(
        "--curve-key",
        metavar="FILE",
        default=default(None),
        help="your CURVE key pair (a zmq.auth *.key_secret file), for a daemon reached over tcp",
    )
    parser.add_argument(
        "--curve-server-key",
        metavar="FILE",
        default=default(None),
        help="the daemon's public CURVE certificate (its *.key file)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``ivshmemctl`` parser: its own subcommands, then those of :data:`COMMANDS_GROUP`."""
    parser = argparse.ArgumentParser(
        prog="ivshmemctl",
        description="Control and observe a running ivshmemd.",
        epilog="exit status: 0 ok, 1 error reply from the daemon, 2 bad usage, "
        "3 no daemon answered",
    )
    _add_target_options(parser, suppress=False)
    parser.add_argument("--version", action="version", version=f"ivshmemctl {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    _add_target_options(common, suppress=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_control_commands(subparsers, common)
    for provider in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name):
        try:
            register = provider.load()
        except (ImportError, AttributeError) as exc:
            # One broken provider must not take the other commands down with it.
            print(f"ivshmemctl: commands of {provider.value} unavailable: {exc}", file=sys.stderr)
            continue
        register(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            status: int = args.run(args)
            return status
        except BaseExceptionGroup as group:  # a subcommand running trio: its error, unwrapped
            raise unwrap(group) from None
    except NoDaemonError as exc:
        print(f"ivshmemctl: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    except ControlError as exc:
        print(f"ivshmemctl: the daemon refused: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_FAILED
    except ProtocolError as exc:
        print(f"ivshmemctl: unexpected answer from the daemon: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return signal_exit(signal.SIGINT)
    except BrokenPipeError:
        # `ivshmemctl watch | head`: the reader went away; leave quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    # Run the imported module, not __main__: subcommand providers may import ivshmemd.ctl,
    # and its exception classes must be the ones main() catches.
    from ivshmemd.ctl import main as _main

    sys.exit(_main())
