"""``ivshmemctl``: ask a running ivshmemd how it is doing, and tell it what to do.

    ivshmemctl [-S SOCK | --control ENDPOINT] status | peers | kick ID | stats | watch
               | ring PEER [VECTOR] | dump

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

from ivshmemd import __version__
from ivshmemd.argtypes import int_in, positive_int, seconds
from ivshmemd.control.client import (
    DEFAULT_TIMEOUT,
    ControlClient,
    EventSubscription,
    NoDaemonError,
    StreamNotice,
)
from ivshmemd.control.schema import (
    ControlError,
    Event,
    SchemaError,
    SequenceTracker,
    default_control_endpoint,
    default_events_endpoint,
    events_endpoint_for,
)
from ivshmemd.curve import ClientCurve, KeyFileError, client_keys, keygen
from ivshmemd.errors import unwrap
from ivshmemd.exitcodes import EXIT_FAILED, EXIT_NO_DAEMON, EXIT_OK, signal_exit
from ivshmemd.protocol import DEFAULT_SOCKET, MAX_PEER_ID, MAX_VECTORS
from ivshmemd.wording import human_bytes, plural

__all__ = [
    "COMMANDS_GROUP",
    "build_parser",
    "main",
    "register_control_commands",
    "resolve_endpoints",
]

#: Entry-point group of subcommand providers: each names a function called as
#: ``function(subparsers, common)`` that adds its subcommands; a subcommand sets
#: ``run=callable(args) -> int`` with set_defaults.
COMMANDS_GROUP: Final = "ivshmemctl.commands"

if TYPE_CHECKING:  # not subscriptable at run time on 3.11
    SubParsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


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
    federation = rest.pop("federation", None)
    pairs.extend((str(key), _cell(value)) for key, value in rest.items())
    _key_values(pairs, out)
    if isinstance(federation, Mapping):
        format_federation(federation, out)


def _ids(id_range: Any) -> str:
    if isinstance(id_range, list | tuple) and len(id_range) == 2:
        return f"{id_range[0]}-{id_range[1]}"
    return _cell(id_range)


def _ago(stamp: Any, now: float) -> str:
    if not isinstance(stamp, int | float) or isinstance(stamp, bool):
        return "never"
    return f"{max(0.0, now - stamp):.1f} s ago"


def _rtt(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"


def format_federation(federation: Mapping[str, Any], out: TextIO) -> None:
    """The federation part of ``status``: this daemon as a member, then one row per other
    member (endpoint, ids, state, last heard, round trip, peers, why it is not up), then
    the members that refused us and why."""
    if not federation.get("running"):
        print(f"federation: not running (listen {federation.get('listen', '?')})", file=out)
        return
    members = [m for m in federation.get("members", []) if isinstance(m, Mapping)]
    process = federation.get("process", {})
    restarts = process.get("restarts", 0) if isinstance(process, Mapping) else 0
    identity, endpoint = federation.get("identity", "?"), federation.get("endpoint", "?")
    print(
        f"federation: {identity}{'' if identity == endpoint else f' on {endpoint}'}"
        f" (ids {_ids(federation.get('id_range'))}"
        f"{', CURVE' if federation.get('secure') else ''}), "
        f"{plural(len(members), 'member')}, "
        f"{plural(int(federation.get('remote_peers', 0)), 'remote peer')}"
        + (f", process restarted {plural(restarts, 'time')}" if restarts else ""),
        file=out,
    )
    now = time.time()
    if members:
        rows = [
            [
                _cell(m.get("member")),
                _cell(m.get("endpoint")),
                _ids(m.get("id_range")),
                _cell(m.get("state")),
                _ago(m.get("last_heard"), now),
                _rtt(m.get("rtt")),
                _cell(m.get("peers")),
                m.get("reason") or "",
            ]
            for m in sorted(members, key=lambda m: str(m.get("member")))
        ]
        _table(["  MEMBER", "ENDPOINT", "IDS", "STATE", "LAST HEARD", "RTT", "PEERS", "WHY"],
               [["  " + row[0], *row[1:]] for row in rows], out)  # fmt: skip
    refused_by = federation.get("refused_by", {})
    if isinstance(refused_by, Mapping):
        for identity, reason in sorted(refused_by.items()):
            print(f"  refused by {identity}: {reason}", file=out)
    probing = federation.get("probing", [])
    if isinstance(probing, list) and probing:
        print(f"  probing: {', '.join(map(str, probing))}", file=out)
    memory = federation.get("memory")
    if isinstance(memory, Mapping):
        print(format_memory(memory), file=out)
    elif federation.get("running"):
        print("  memory: not replicated (--federation-memory off)", file=out)


def format_memory(memory: Mapping[str, Any]) -> str:
    """One line on the replicated memory: whether this daemon holds the region, what it
    sent and applied, rings held for other hosts' diffs, who reports written pages."""
    logged = memory.get("logged_peers", [])
    count = len(logged) if isinstance(logged, list) else 0

    def num(key: str) -> int:
        value = memory.get(key, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    holder = "holds the region" if memory.get("holder") else "waits for the region"
    return (
        f"  memory: replicated, {holder}; sent {plural(num('diffs_sent'), 'diff')} "
        f"({human_bytes(num('bytes_sent'))}), applied {plural(num('diffs_applied'), 'diff')} "
        f"({human_bytes(num('bytes_applied'))}), {plural(num('regions_applied'), 'region')} "
        f"received, {plural(num('rings_held'), 'ring')} held for other hosts' diffs, "
        f"{plural(count, 'peer')} reporting written pages"
    )


PEER_COLUMNS: Final = ("id", "member", "pid", "uid", "gid", "vectors", "connected_at")


def _peer_cell(peer: Mapping[str, Any], column: str) -> str:
    value = peer.get(column)
    if column == "connected_at":
        return _human_time(value)
    if column == "member" and value is None:
        return "(local)"  # a federation member's peer names its member
    return _cell(value)


def format_peers(peers: Sequence[Mapping[str, Any]], out: TextIO) -> None:
    if not peers:
        print("no peers connected", file=out)
        return
    extra = sorted({k for p in peers for k in p} - set(PEER_COLUMNS))
    columns = [c for c in PEER_COLUMNS if any(c in p for p in peers)] + extra
    headers = ["CONNECTED" if c == "connected_at" else c.upper() for c in columns]
    rows = [
        [_peer_cell(p, c) for c in columns]
        for p in sorted(peers, key=lambda p: (p.get("id") is None, p.get("id", 0)))
    ]
    _table(headers, rows, out)


def format_stats(stats: Mapping[str, Any], out: TextIO) -> None:
    _key_values(((str(k).replace("_", " "), _cell(v)) for k, v in stats.items()), out)


def format_event(event: Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time))
    millis = int((event.time % 1) * 1000)
    if event.peer_id is None:  # a federation member
        what = f"member {event.member} ({event.endpoint}, ids {_ids(event.id_range)})"
    else:
        what = f"peer {event.peer_id} ({plural(event.vectors, 'vector')}"
        what += f", member {event.member})" if event.member else ")"
    line = f"{stamp}.{millis:03d}  #{event.seq:<6d} {event.kind:<11s} {what}"
    if event.reason:
        line += f", {event.reason}"
    return line


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
    except KeyFileError as exc:
        raise NoDaemonError(str(exc)) from None


def _ask(args: argparse.Namespace, cmd: str, params: Mapping[str, Any] | None = None) -> Any:
    """One request to the daemon (the client closed after it); its result."""
    control, _ = resolve_endpoints(args)
    with ControlClient(control, args.timeout, _curve(args)) as client:
        return client.request(cmd, params)


def _show(args: argparse.Namespace, result: Any, human: Callable[[Any, TextIO], None]) -> int:
    """A result as JSON under ``--json``, else as ``human`` writes it."""
    if args.json:
        _print_json(result, sys.stdout)
    else:
        human(result, sys.stdout)
    return EXIT_OK


def _simple(
    cmd: str, formatter: Callable[[Any, TextIO], None]
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return _show(args, _ask(args, cmd), formatter)

    return run


def _run_peers(args: argparse.Namespace) -> int:
    result = _ask(args, "peers")
    peers = result.get("peers", []) if isinstance(result, Mapping) else []
    return _show(args, peers, format_peers)


def _run_kick(args: argparse.Namespace) -> int:
    result = _ask(args, "kick", {"id": args.peer_id})
    return _show(args, result, lambda _, out: print(f"peer {args.peer_id} kicked", file=out))


#: how long ``ivshmemctl upgrade`` waits for the daemon to serve again
UPGRADE_TIMEOUT: Final = 300.0


def _run_upgrade(args: argparse.Namespace) -> int:
    """Ask for an upgrade in place, then follow ``status`` until it is done or refused."""
    control, _ = resolve_endpoints(args)
    client = ControlClient(control, args.timeout, _curve(args))
    try:
        before = client.request("upgrade")
        deadline = time.monotonic() + UPGRADE_TIMEOUT
        while True:
            try:
                now = client.request("status")
            except NoDaemonError:  # the new image is starting: requests wait for it
                now = {}
            state = now.get("upgrades", {}) if isinstance(now, Mapping) else {}
            if state.get("done", 0) > before["done"] or state.get("failed", 0) > before["failed"]:
                break
            if time.monotonic() > deadline:
                print(f"ivshmemctl: no upgrade result after {UPGRADE_TIMEOUT:g} s", file=sys.stderr)
                return EXIT_FAILED
            time.sleep(0.1)
    finally:
        client.close()
    if args.json:
        _print_json(state, sys.stdout)
    upgraded = state["done"] > before["done"]
    if not upgraded:
        print(f"ivshmemctl: upgrade not done: {state.get('last_error')}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        print(f"upgraded in place (pid {now.get('pid')}, {now.get('peers')} peers kept)")
    return EXIT_OK


def _notice(args: argparse.Namespace, kind: str, text: str, **fields: Any) -> None:
    """A notice about the stream (not an event) on stderr: a line, or JSON with --json."""
    if args.json:
        print(json.dumps({"notice": kind, "message": text, **fields}), file=sys.stderr, flush=True)
    else:
        print(f"ivshmemctl: {text}", file=sys.stderr, flush=True)


def _missed(first: int, last: int) -> str:
    return f"{plural(last - first + 1, 'event')} missed (seq {first}..{last})"


def _stream_back(args: argparse.Namespace, tracker: SequenceTracker) -> None:
    """The event stream is back: ask the daemon which instance it is, to tell a restart
    (and the events the new instance published meanwhile) from a reconnection."""
    try:
        status = _ask(args, "status")
    except (NoDaemonError, ControlError, SchemaError):
        status = {}
    boot = status.get("boot") if isinstance(status, Mapping) else None
    seq = status.get("events_seq") if isinstance(status, Mapping) else None
    if not isinstance(boot, str) or not isinstance(seq, int) or boot == tracker.boot:
        _notice(args, "stream-back", f"the event stream is back ({args.events_endpoint})")
        return
    text = "the daemon restarted (a new instance)"
    if tracker.last_seq is not None:
        text += f"; its predecessor's events after #{tracker.last_seq} are unknown"
    fields: dict[str, Any] = {"boot": boot, "previous_last_seq": tracker.last_seq}
    if seq > 0:
        text += f"; the new instance's {_missed(1, seq)} while we were away"
        fields["missed"] = [1, seq]
    _notice(args, "daemon-restarted", text, **fields)
    tracker.restart(boot, seq)


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
    args.events_endpoint = events_endpoint
    subscription = EventSubscription(events_endpoint, args.timeout, _curve(args))
    tracker = SequenceTracker()
    seen = 0
    try:
        print(f"watching events on {events_endpoint} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        while args.count is None or seen < args.count:
            try:
                item = subscription.receive()
            except SchemaError as exc:
                print(f"ivshmemctl: ignoring a malformed event: {exc}", file=sys.stderr)
                continue
            if item is StreamNotice.LOST:
                _notice(
                    args, "daemon-stopped",
                    f"the daemon stopped or went silent (its event stream closed at "
                    f"{time.strftime('%H:%M:%S')}); waiting for it to come back",
                )  # fmt: skip
                continue
            if item is StreamNotice.BACK:
                _stream_back(args, tracker)
                continue
            assert isinstance(item, Event)  # no timeout given
            boot = tracker.boot
            gap = tracker.observe(item.seq, item.boot)
            if boot is not None and tracker.boot != boot:
                _notice(args, "daemon-restarted", "the daemon restarted (a new instance)",
                        boot=tracker.boot)  # fmt: skip
            if gap is not None:
                _notice(args, "gap", f"gap in the event sequence: {_missed(*gap)}",
                        missed=list(gap))  # fmt: skip
            if args.json:
                print(json.dumps(item.to_dict()), flush=True)
            else:
                print(format_event(item), flush=True)
            seen += 1
    finally:
        subscription.close()
    return EXIT_OK


def _run_ring(args: argparse.Namespace) -> int:
    result = _ask(args, "ring", {"id": args.peer_id, "vector": args.vector})
    said = f"rang peer {args.peer_id}, vector {args.vector}"
    return _show(args, result, lambda _, out: print(said, file=out))


def format_dump(dump: Mapping[str, Any], out: TextIO) -> None:
    """The fds as the daemon holds them, in the order a joining peer receives them."""
    shm = dump.get("shm", {})
    shm = shm if isinstance(shm, Mapping) else {}
    where = shm.get("path") or shm.get("name") or "?"
    print(f"shm: fd {shm.get('fd')}, {_human_size(shm.get('size'))} ({where})", file=out)
    peers = dump.get("peers", [])
    if not peers:
        print("no peers connected", file=out)
        return
    rows = []
    for peer in peers:
        fds = peer.get("eventfds", [])
        rows.append([str(peer.get("id")), str(len(fds)), " ".join(f"{v}:{fd}" for v, fd in
                                                                 enumerate(fds))])  # fmt: skip
    _table(["PEER", "VECTORS", "EVENTFDS (vector:fd)"], rows, out)


def _peer_id(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a peer id: {text!r}") from None
    if not 0 <= value <= MAX_PEER_ID:
        raise argparse.ArgumentTypeError(f"a peer id is in 0..{MAX_PEER_ID}, not {value}")
    return value


def register_control_commands(subparsers: SubParsers, common: argparse.ArgumentParser) -> None:
    """Add ``status``, ``peers``, ``kick``, ``stats``, ``watch``, ``ring`` and ``dump``."""
    p = subparsers.add_parser("status", parents=[common], help="daemon version, shm, peers")
    p.set_defaults(run=_simple("status", format_status))
    p = subparsers.add_parser("peers", parents=[common], help="the connected peers")
    p.set_defaults(run=_run_peers)
    p = subparsers.add_parser(
        "kick", parents=[common], help="disconnect a peer (daemon's uid or root only)"
    )
    p.add_argument("peer_id", metavar="ID", type=_peer_id, help="the peer id to disconnect")
    p.set_defaults(run=_run_kick)
    p = subparsers.add_parser(
        "upgrade", parents=[common],
        help="re-execute the daemon in place, keeping every peer (daemon's uid or root only)",
    )  # fmt: skip
    p.set_defaults(run=_run_upgrade)
    p = subparsers.add_parser("stats", parents=[common], help="counters since start-up")
    p.set_defaults(run=_simple("stats", format_stats))
    p = subparsers.add_parser(
        "watch",
        parents=[common],
        help="print peer-joined/peer-left (and federation member) events as they happen",
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
        "ring",
        parents=[common],
        help="ring a peer's doorbell (write its eventfd; daemon's uid or root only)",
    )
    p.add_argument("peer_id", metavar="PEER", type=_peer_id, help="the peer id to ring")
    p.add_argument(
        "vector", metavar="VECTOR", type=int_in(0, MAX_VECTORS - 1), nargs="?", default=0,
        help="which of its vectors (default 0)",
    )  # fmt: skip
    p.set_defaults(run=_run_ring)
    p = subparsers.add_parser(
        "dump", parents=[common], help="the fds as the daemon holds them (shm, eventfds)"
    )
    p.set_defaults(run=_simple("dump", format_dump))
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


def _error(args: argparse.Namespace, code: str, text: str) -> None:
    """One line on stderr; JSON (``{"error": {"code", "message"}}``) with --json."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": text}}), file=sys.stderr)
    else:
        print(f"ivshmemctl: {text}", file=sys.stderr)


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
        _error(args, "no-daemon", str(exc))
        return EXIT_NO_DAEMON
    except ControlError as exc:
        _error(args, exc.code, f"the daemon refused: {exc.message} ({exc.code})")
        return EXIT_FAILED
    except SchemaError as exc:
        _error(args, "bad-reply", f"unexpected answer from the daemon: {exc}")
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
