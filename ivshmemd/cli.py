"""``ivshmemd``: the command line, start-up, signal handling and clean shutdown.

The short flags, defaults and validation are QEMU's ivshmem-server's (``-S -M -m -l -n -F -p
-v -h``), so a script written for it works unchanged; every flag also has a long form, and
there are a few more options for what the C server cannot do. Errors a user can hit print one
clear line and exit 1 (as QEMU's server does), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio

from . import __version__, signals
from .access import AllowList
from .activation import ActivationError, listen_fds
from .argtypes import metrics_address, positive_int, seconds, size
from .childlink import LinkedChild, reap
from .control.process import ControlConfig, ControlProcess
from .control.schema import (
    default_control_endpoint,
    default_events_endpoint,
    events_endpoint_for,
)
from .control.server import ControlAccess, ControlSetupError, EventPublisher, tcp_needs_curve
from .control.view import DaemonControlView, state_lines
from .crashsafe import CrashJournal, recover
from .curve import KeyFileError, load_allowed_keys, load_secret_key, server_keys
from .daemon import PidFileError, daemonize
from .daemonlog import LogSetupError, LogTarget, configure_logging
from .errors import one_line, unwrap
from .exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE_QEMU
from .fdstore import LISTEN, SHM, FdStore, StoredFds, classify
from .federation.config import (
    DEFAULT_FLUSH,
    FLUSH_SCAN_BYTES,
    FederationConfig,
    FederationConfigError,
)
from .federation.membership import DEFAULT_TIMEOUT as DEFAULT_FEDERATION_TIMEOUT
from .fedproc import FederationProcess, FederationSetupError
from .handover import STATE_FD_ENV, HandoverError, inherited, unblock_signals
from .inflight import budget_for
from .listener import ListenerError, parse_group
from .memlog import memlog_path
from .metrics import DEFAULT_MAX_LABELLED_PEERS
from .protocol import DEFAULT_SOCKET, MAX_PEER_ID, MAX_VECTORS
from .resources import DaemonResources, StartupError
from .sdnotify import SystemdNotifier
from .server import IvshmemServer, ServerConfig, fd_limit
from .shm import MAX_SHM_SIZE, MIN_SHM_SIZE, SharedMemoryError, SharedMemoryRegion
from .sizes import round_shm_size
from .statefile import StateFile, StateFileError, state_path
from .telemetry import (
    TelemetryEndpoints,
    default_telemetry_endpoints,
    telemetry_endpoints_for,
)
from .upgrade import Upgrader, check_upgrade
from .wording import plural

__all__ = ["main", "parse_args"]

log = logging.getLogger("ivshmemd")

DEFAULT_SHM_NAME = "ivshmem"
DEFAULT_SIZE = 4 << 20
DEFAULT_VECTORS = 1
DEFAULT_PIDFILE = "/var/run/ivshmem-server.pid"
DEFAULT_MAX_PEERS = 4096
DEFAULT_SEND_TIMEOUT = 5.0

DESCRIPTION = """\
A drop-in replacement for QEMU's ivshmem-server. It owns a shared-memory region and hands
it, with one eventfd per interrupt vector per peer, to every QEMU VM (-device
ivshmem-doorbell,chardev=...) or emulated peer that connects to its unix socket, and tells
every peer when another joins or leaves, so that they can ring each other's doorbells.
"""

EPILOG = f"""\
sizes:
  SIZE is a byte count with an optional suffix K, M, G, T, P or E (powers of 1024), e.g.
  4096, 1M, 1.5G. It is rounded up to a power of two (and to at least 4 KiB, the smallest
  BAR a QEMU ivshmem device accepts). Sizes above 4 GiB are fine, up to 4E. The memory is
  reserved at start-up (see --sparse): a daemon that starts has all of it.

examples:
  ivshmemd -F -S /run/ivshmem.sock -M myshm -l 16M -n 2
      serve in the foreground; QEMU then uses
      -chardev socket,id=iv,path=/run/ivshmem.sock -device ivshmem-doorbell,chardev=iv,vectors=2
  ivshmemd -S /run/ivshmem.sock -p /run/ivshmemd.pid -m /dev/hugepages -l 1G
      daemonize (returns once the socket is listening), memory from hugetlbfs

signals:
{signals.describe()}
exit status:
  0 after a clean shutdown, 1 on bad arguments or a start-up failure (one line says why).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors look like QEMU's server's: a line, a hint, exit status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(
            EXIT_USAGE_QEMU, f"{self.prog}: {message}\nTry '{self.prog} -h' for more information.\n"
        )


@dataclass
class _ShmChoice:
    kind: str  # "posix" or "dir"
    value: str


class _ShmAction(argparse.Action):
    """-M and -m share one setting, the last one wins (as with QEMU's getopt loop)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[object] | None,
        option_string: str | None = None,
    ) -> None:
        kind = "dir" if option_string in ("-m", "--shm-dir") else "posix"
        namespace.shm = _ShmChoice(kind, str(values))


def _vectors(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot parse n_vectors {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot parse n_vectors {text!r}")
    if value > MAX_VECTORS:
        raise argparse.ArgumentTypeError(f"too many requested vectors (max is {MAX_VECTORS})")
    return value


def _shm_size(text: str) -> int:
    """A :func:`~ivshmemd.argtypes.size` whose power-of-two rounding still fits a file
    offset (``-l 8E`` would otherwise overflow deep inside, after creating the object)."""
    value = size(text)
    if round_shm_size(value, MIN_SHM_SIZE) > MAX_SHM_SIZE:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is too large: it rounds up to a power of two above 4E "
            f"({MAX_SHM_SIZE} bytes), the largest a file offset can hold"
        )
    return value


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid socket mode {text!r} (octal, e.g. 0660)"
        ) from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid socket mode {text!r} (octal, e.g. 0660)")
    return value


def _id_range(text: str) -> tuple[int, int]:
    first, sep, last = text.partition("-")
    if not (sep and first.isdigit() and last.isdigit()):
        raise argparse.ArgumentTypeError(f"invalid peer id range {text!r} (FIRST-LAST)")
    low, high = int(first), int(last)
    if not low <= high <= MAX_PEER_ID:
        raise argparse.ArgumentTypeError(
            f"invalid peer id range {text!r}: need FIRST <= LAST <= {MAX_PEER_ID}"
        )
    return low, high


def _id_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise argparse.ArgumentTypeError(f"not a numeric id: {part!r}")
        out.append(int(part))
    return out


def _group_list(text: str) -> list[int]:
    try:
        return [parse_group(part.strip()) for part in text.split(",")]
    except ListenerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render --help)."""
    p = _Parser(
        prog="ivshmemd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    qemu = p.add_argument_group("options of QEMU's ivshmem-server")
    qemu.add_argument("-h", "--help", action="help", help="show this help and exit")
    qemu.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log more detail (peer credentials, vectors, slow peers)",
    )
    qemu.add_argument(
        "-F",
        "--foreground",
        action="store_true",
        help="stay in the foreground (default: daemonize)",
    )
    qemu.add_argument(
        "-p",
        "--pidfile",
        metavar="FILE",
        default=DEFAULT_PIDFILE,
        help=f"pid file, written in daemon mode (default {DEFAULT_PIDFILE})",
    )
    qemu.add_argument(
        "-S",
        "--socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help=f"unix socket to listen on (default {DEFAULT_SOCKET})",
    )
    qemu.add_argument(
        "-M",
        "--shm-name",
        metavar="NAME",
        dest="shm",
        action=_ShmAction,
        help=f"POSIX shared-memory object to use, created or reused (default {DEFAULT_SHM_NAME})",
    )
    qemu.add_argument(
        "-m",
        "--shm-dir",
        metavar="DIR",
        dest="shm",
        action=_ShmAction,
        help="create the memory as a file in DIR (e.g. a hugetlbfs mount), unlinked at once",
    )
    qemu.add_argument(
        "-l",
        "--size",
        metavar="SIZE",
        type=_shm_size,
        default=DEFAULT_SIZE,
        help="size of the shared memory (default 4M); see 'sizes' below",
    )
    qemu.add_argument(
        "-n",
        "--vectors",
        metavar="N",
        type=_vectors,
        default=DEFAULT_VECTORS,
        help=f"interrupt vectors (eventfds) per peer, 0..{MAX_VECTORS} (default 1)",
    )
    more = p.add_argument_group("more options")
    more.add_argument(
        "--keep-shm", action="store_true", help="do not unlink the -M shared memory on shutdown"
    )
    more.add_argument(
        "--sparse",
        action="store_true",
        help="do not reserve the shared memory at start-up (default: reserve it with "
        "posix_fallocate and refuse to start if it cannot be had); for huge, mostly "
        "untouched regions, at a risk: if the filesystem fills up, a peer dies of SIGBUS "
        "when it touches a page that cannot be had",
    )
    more.add_argument(
        "--max-peers",
        metavar="N",
        type=positive_int,
        default=DEFAULT_MAX_PEERS,
        help=f"refuse newcomers beyond N peers (default {DEFAULT_MAX_PEERS})",
    )
    more.add_argument(
        "--peer-ids",
        metavar="FIRST-LAST",
        type=_id_range,
        default=(0, MAX_PEER_ID),
        help="hand out peer ids from this range only (default 0-65535), e.g. to give "
        "daemons that will federate disjoint ranges",
    )
    more.add_argument(
        "--send-timeout",
        metavar="SECONDS",
        type=seconds(),
        default=DEFAULT_SEND_TIMEOUT,
        help="disconnect a peer that reads none of its pending messages for this "
        f"long (default {DEFAULT_SEND_TIMEOUT:g})",
    )
    more.add_argument(
        "--socket-mode",
        metavar="MODE",
        type=_mode,
        default=0o600,
        help="file mode of the socket, octal (default 0600)",
    )
    more.add_argument(
        "--socket-group",
        metavar="GROUP",
        default=None,
        help="group owning the socket (name or gid)",
    )
    more.add_argument(
        "--allow-uid",
        metavar="UID[,UID...]",
        type=_id_list,
        action="extend",
        default=[],
        help="accept only clients with one of these uids (or an "
        "--allow-gid group), checked with SO_PEERCRED",
    )
    more.add_argument(
        "--allow-gid",
        metavar="GID[,GID...]",
        type=_group_list,
        action="extend",
        default=[],
        help="accept clients in one of these groups",
    )
    more.add_argument(
        "--control",
        metavar="ENDPOINT",
        default=None,
        help="zmq endpoint of the control plane (default ipc://SOCKET.ctl beside the socket; "
        "tcp://HOST:PORT to reach it from elsewhere, with CURVE keys)",
    )
    more.add_argument(
        "--events",
        metavar="ENDPOINT",
        default=None,
        help="zmq endpoint of the event stream (default: beside the control endpoint; "
        "without --control, requests stay at ipc://SOCKET.ctl and only the events move)",
    )
    more.add_argument(
        "--curve-secret-key",
        metavar="FILE",
        default=None,
        help="the daemon's CURVE key pair (a zmq.auth *.key_secret file); tcp control and "
        "events endpoints are served only with CURVE",
    )
    more.add_argument(
        "--curve-clients",
        metavar="DIR",
        default=None,
        help="directory of the public CURVE certificates (*.key) of the clients allowed over tcp",
    )
    more.add_argument(
        "--telemetry",
        metavar="ENDPOINT",
        default=None,
        help="zmq endpoint where our peers report their counts when someone watches "
        "(default ipc://SOCKET.telemetry, ticks on ipc://SOCKET.ticks; ivshmemctl top)",
    )
    more.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        type=metrics_address,
        default=None,
        help="serve Prometheus metrics over HTTP at HOST:PORT (off by default; ':PORT' "
        "binds localhost)",
    )
    more.add_argument(
        "--metrics-max-peers",
        metavar="N",
        type=positive_int,
        default=DEFAULT_MAX_LABELLED_PEERS,
        help="label at most N peers in the metrics; the others are summed as "
        f'"other" (default {DEFAULT_MAX_LABELLED_PEERS})',
    )
    more.add_argument(
        "--no-control",
        action="store_true",
        help="serve no control plane (ivshmemctl status and friends will not answer)",
    )
    more.add_argument(
        "--log-file",
        metavar="FILE",
        default=None,
        help="append log lines to FILE, reopened on SIGHUP (default: stderr; daemonized: "
        "syslog, or SOCKET.log in the runtime directory where there is no /dev/log)",
    )
    more.add_argument(
        "--check-upgrade",
        action="store_true",
        help="used by upgrades (SIGUSR2, ivshmemctl upgrade): check that this ivshmemd can "
        "take over from the running one with this command line and its state "
        f"(${STATE_FD_ENV}), then exit 0, or 1 with why",
    )
    fed = p.add_argument_group(
        "federation (daemons on several hosts as one fabric; see docs/federation.md)"
    )
    fed.add_argument(
        "--federation-listen",
        metavar="ENDPOINT",
        default=None,
        help="join a federation: accept other daemons at this zmq endpoint "
        "(tcp://ADDRESS:PORT or ipc://PATH); give this daemon its own --peer-ids",
    )
    fed.add_argument(
        "--federation-peer",
        metavar="ENDPOINT",
        action="append",
        default=[],
        help="a daemon of the federation to contact (repeatable; one is enough: "
        "membership spreads)",
    )
    fed.add_argument(
        "--federation-timeout",
        metavar="SECONDS",
        type=seconds(),
        default=DEFAULT_FEDERATION_TIMEOUT,
        help="a member silent this long is dead: its peers are announced as left "
        f"(default {DEFAULT_FEDERATION_TIMEOUT:g})",
    )
    fed.add_argument(
        "--federation-advertise",
        metavar="ENDPOINT",
        default=None,
        help="the endpoint other daemons dial to reach this one, when it is not "
        "--federation-listen (a NAT, a proxy, a listen on every address)",
    )
    fed.add_argument(
        "--federation-key",
        metavar="FILE",
        default=None,
        help="this daemon's CURVE certificate (NAME.key_secret, from ivshmemctl keygen): "
        "links are encrypted and authenticated",
    )
    fed.add_argument(
        "--federation-allow",
        metavar="DIR",
        default=None,
        help="directory of the public certificates (*.key) of the daemons allowed to join",
    )
    fed.add_argument(
        "--federation-memory",
        choices=("on", "off"),
        default="on",
        help="replicate the shared memory across the federation, release-consistent at "
        "doorbells (default on; off: doorbells only, each host's memory its own; see "
        "docs/federation-memory.md)",
    )
    fed.add_argument(
        "--federation-flush",
        metavar="SECONDS",
        type=seconds(),
        default=DEFAULT_FLUSH,
        help="memory written without a doorbell reaches the other hosts within about this "
        f"period per {FLUSH_SCAN_BYTES >> 20} MiB of shared memory (default {DEFAULT_FLUSH:g})",
    )
    fed.add_argument(
        "--federation-insecure",
        action="store_true",
        help="allow a federation without keys on endpoints other than ipc:// and loopback "
        "(links unencrypted and unauthenticated)",
    )
    more.add_argument("--version", action="version", version=f"ivshmemd {__version__}")
    p.set_defaults(shm=_ShmChoice("posix", DEFAULT_SHM_NAME))
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (exits 1 with a message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.no_control and (args.control or args.events):
        parser.error("--no-control contradicts --control/--events")
    args.curve_keys = None
    if bool(args.curve_secret_key) != bool(args.curve_clients):
        parser.error("--curve-secret-key and --curve-clients go together")
    if args.curve_secret_key:
        try:
            args.curve_keys = server_keys(args.curve_secret_key, args.curve_clients)
        except KeyFileError as exc:
            parser.error(str(exc))
    try:
        endpoints = [ep for ep in _control_endpoints(args) if ep is not None]
    except ValueError as exc:  # no events endpoint can be derived from --control
        parser.error(f"{exc} (--events ENDPOINT)")
    if args.telemetry:
        if args.no_control:
            parser.error("--no-control contradicts --telemetry")
        try:
            endpoints += list(dataclasses.astuple(telemetry_endpoints_for(args.telemetry)))
        except ValueError as exc:
            parser.error(f"--telemetry: {exc}")
    if args.metrics and args.no_control:
        parser.error("--no-control contradicts --metrics (the control process serves them)")
    problem = tcp_needs_curve(endpoints, ControlAccess(curve=args.curve_keys))
    if problem is not None:
        parser.error(problem)
    if args.socket_group is not None:
        try:
            args.socket_group_id = parse_group(args.socket_group)
        except ListenerError as exc:
            parser.error(str(exc))
    else:
        args.socket_group_id = None
    try:
        args.federation = _federation_config(args)
    except (FederationConfigError, KeyFileError) as exc:
        parser.error(str(exc))
    return args


def _federation_config(args: argparse.Namespace) -> FederationConfig | None:
    """The federation settings from the flags (None without --federation-listen); the
    keys are loaded once here so that a bad one stops the daemon before it starts."""
    listen = args.federation_listen
    others = (args.federation_peer, args.federation_key, args.federation_allow,
              args.federation_insecure, args.federation_advertise)  # fmt: skip
    if listen is None:
        if any(others):
            raise FederationConfigError(
                "the --federation-* options need --federation-listen ENDPOINT"
            )
        return None
    config = FederationConfig(
        listen=listen,
        id_range=args.peer_ids,
        shm_size=round_shm_size(args.size, MIN_SHM_SIZE),
        vectors=args.vectors,
        peers=tuple(args.federation_peer),
        timeout=args.federation_timeout,
        key_file=None if args.federation_key is None else Path(args.federation_key),
        allow_dir=None if args.federation_allow is None else Path(args.federation_allow),
        insecure=args.federation_insecure,
        advertise=args.federation_advertise,
        memory=args.federation_memory == "on",
        flush=args.federation_flush,
        memlog=memlog_path(args.socket) if args.federation_memory == "on" else None,
        memlog_mode=args.socket_mode,
        memlog_gid=args.socket_group_id,
    )
    config.check()
    if config.key_file is not None and config.allow_dir is not None:
        load_secret_key(config.key_file)
        load_allowed_keys(config.allow_dir)
    return config


def _raise_fd_limit() -> None:
    """Lift the soft fd limit to the hard one: each peer costs 1 + vectors fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _control_endpoints(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Where the control plane listens: beside the socket, an explicit endpoint, or nowhere.
    ``--events`` alone moves only the event stream (requests stay beside the socket)."""
    if args.no_control:
        return None, None
    if args.control:
        return args.control, args.events or events_endpoint_for(args.control)
    return default_control_endpoint(args.socket), args.events or default_events_endpoint(
        args.socket
    )


def _telemetry_endpoints(args: argparse.Namespace) -> TelemetryEndpoints:
    """Where peers report: ``--telemetry``, or beside the socket."""
    if args.telemetry:
        return telemetry_endpoints_for(args.telemetry)
    return default_telemetry_endpoints(args.socket)


@dataclass
class _Launch:
    """How this process came to serve: afresh, from an earlier image (``inherited``, an
    in-place re-exec) or after a crash (``journal`` with ``recovered``: systemd's fd store)."""

    argv: list[str]
    held: DaemonResources
    notifier: SystemdNotifier
    report: Callable[[str | None], None] | None = None
    inherited: dict[str, Any] | None = None
    journal: CrashJournal | None = None
    recovered: bool = False


async def _run(server: IvshmemServer, describe: str, launch: _Launch, args: argparse.Namespace,
               logs: LogTarget) -> None:  # fmt: skip
    notifier = launch.notifier
    publisher = EventPublisher()
    server.listeners.append(publisher.on_server_event)

    def report_peer_count(kind: str, event: dict[str, Any]) -> None:
        notifier.status(f"{plural(len(server.connections), 'peer')} connected")

    server.listeners.append(report_peer_count)
    control, events = _control_endpoints(args)
    inherited = launch.inherited
    with trio.open_signal_receiver(*signals.HANDLED) as received:
        unblock_signals()  # blocked across a re-exec: delivered now that we handle them
        async with trio.open_nursery() as nursery:
            if inherited is not None and inherited.get("events"):
                publisher.resume(inherited["events"])
            federation: FederationProcess | None = None
            if args.federation is not None:
                fed_config = args.federation
                if inherited is not None or server.connections:
                    # serving on (an upgrade, or peers systemd kept): the region is ours
                    fed_config = dataclasses.replace(fed_config, holder=True)
                elif fed_config.memory and fed_config.peers:
                    server.admission = trio.Event()  # admit once the region is in
                federation = FederationProcess(fed_config, server, verbose=args.verbose)
                federation.member_listeners.append(publisher.on_member_event)
            process: ControlProcess | None = None
            if control is not None and events is not None:
                config = ControlConfig(
                    control=control, events=events, socket_mode=args.socket_mode,
                    socket_gid=args.socket_group_id, allow=server.config.allow,
                    curve=args.curve_keys, verbose=args.verbose,
                    telemetry=_telemetry_endpoints(args), metrics=args.metrics,
                    metrics_max_peers=args.metrics_max_peers,
                )  # fmt: skip
                view = DaemonControlView(server, args.socket, publisher, federation)
                process = ControlProcess(config, view, publisher)
            if inherited is not None:
                _adopt_children(inherited, nursery, control=process, federation=federation)
            await nursery.start(server.serve)
            if launch.journal is not None:
                launch.journal.write()
            if process is not None:
                bound = await nursery.start(process.run)
                control, events = bound.control, bound.events
            if federation is not None:
                await nursery.start(federation.run)
            children: list[LinkedChild] = [c for c in (process, federation) if c is not None]
            upgrader = Upgrader(launch.argv, server, launch.held, notifier, children)
            upgrader.extras["events"] = publisher.export
            upgrader.nursery = nursery
            if inherited is not None:
                upgrader.done = int(inherited.get("upgrades_done", 0)) + 1
            if process is not None:
                assert isinstance(process.view, DaemonControlView)
                process.view.upgrader = upgrader
            if inherited is None:
                log.info("%s", describe)
            else:
                now = time.monotonic()
                log.info(
                    "upgraded in place from ivshmemd %s: %d peers carried over, serving again "
                    "%.1f ms after the signal (pre-flight check %.1f ms, then %.1f ms not "
                    "accepting)", inherited.get("version"), len(server.connections),
                    (now - inherited["signalled_at"]) * 1000,
                    (inherited["checked_at"] - inherited["signalled_at"]) * 1000,
                    (now - inherited["checked_at"]) * 1000,
                )  # fmt: skip
            if control is not None:
                explicit = args.control is not None or args.events is not None
                log.log(
                    logging.INFO if explicit else logging.DEBUG,
                    "control plane on %s, events on %s", control, events,
                )  # fmt: skip
            notifier.ready(f"{len(server.connections)} peers connected")
            if launch.report is not None:
                launch.report(None)
            async for signum in received:
                if signum in signals.STOP:
                    log.info("%s received, shutting down", signals.name(signum))
                    notifier.stopping()
                    if launch.journal is not None:
                        launch.journal.closing()
                    nursery.cancel_scope.cancel()
                    break
                if signum == signals.UPGRADE:
                    log.info("SIGUSR2: upgrading in place")
                    nursery.start_soon(upgrader.upgrade, time.monotonic())
                    continue
                _on_signal(signum, server, process, logs)


#: how long a child an earlier image did not hand over has to exit before it is killed
STRAY_GRACE: Final = 5.0


def _adopt_children(
    inherited: dict[str, Any],
    nursery: trio.Nursery,
    *,
    control: ControlProcess | None,
    federation: FederationProcess | None,
) -> None:
    """Serve on with the child processes the earlier image handed over (the federation's
    before the server serves: it hears of every local join and leave); reap the rest (a
    child caught starting or stopping, or of a kind this command line no longer runs)."""
    handles: dict[str, ControlProcess | FederationProcess | None] = {
        "control": control, "federation": federation,
    }  # fmt: skip
    for entry in inherited.get("children", []):
        handle = handles.get(str(entry.get("kind")))
        if handle is not None and entry.get("link") is not None:
            handle.adopt(entry)
            continue
        for fd in (entry.get("link"), entry.get("stderr")):
            if fd is not None:
                os.close(fd)
        nursery.start_soon(reap, int(entry["pid"]), STRAY_GRACE)


def _on_signal(
    signum: int, server: IvshmemServer, process: ControlProcess | None, logs: LogTarget
) -> None:
    """SIGHUP, SIGUSR1: see ivshmemd.signals."""
    if signum == signal.SIGHUP:
        try:
            log.info("SIGHUP: %s", logs.reopen())
        except LogSetupError as exc:
            log.error("SIGHUP: %s; still logging to the old file", exc)
    elif signum == signal.SIGUSR1:
        pid, restarts = (None, 0) if process is None else (process.pid, process.restarts)
        for line in state_lines(server, pid, restarts):
            log.info("%s", line)
        if isinstance(server.federation, FederationProcess):
            for line in server.federation.state_lines():
                log.info("%s", line)


#: fds a daemon holds before its first peer (stdio, lock, shm, socket, pid file, log,
#: trio, the control plane's link), measured, with room to spare
BASE_FDS = 32
#: fds kept free while serving, for the daemon's own needs (restarting its control plane)
FD_RESERVE = 16


def minimum_fds(vectors: int) -> int:
    """The smallest RLIMIT_NOFILE with which the daemon can serve one peer."""
    return BASE_FDS + FD_RESERVE + 1 + vectors


def _check_fd_limit(vectors: int) -> str | None:
    needed, limit = minimum_fds(vectors), fd_limit()
    if limit >= needed:
        return None
    return (
        f"too few file descriptors: with -n {vectors} the daemon needs at least {needed} "
        f"(RLIMIT_NOFILE is {limit}); raise it (ulimit -n, LimitNOFILE=) or use fewer vectors"
    )


def _start(args: argparse.Namespace, held: DaemonResources, size: int) -> StoredFds:
    """Take the lock, the shm and the socket, in that order (see ivshmemd.resources); the
    shm and the socket systemd's fd store kept, if it passed them back (after a crash).
    Returns the stored fds (the peers' are for :func:`ivshmemd.crashsafe.recover`)."""
    held.take_lock(args.socket)
    stored = classify(listen_fds())
    for item in stored.unknown:
        os.close(item.fd)
    if stored.shm is not None:
        try:
            held.adopt_shm(args.shm.kind, args.shm.value, stored.shm, size)
        except SharedMemoryError as exc:
            log.warning("not serving on with the fds systemd kept: %s", exc)
            stored = stored.discard()
    elif stored.peers:
        log.warning("not serving on with the fds systemd kept: the shm was not among them")
        stored = stored.discard()
    if held.shm is None:
        held.open_shm(args.shm.kind, args.shm.value, size, sparse=args.sparse)
    held.listen(
        args.socket, args.socket_mode, args.socket_group_id, passed=stored.others,
        stored=stored.listen,
    )  # fmt: skip
    return stored


def _journal(
    server: IvshmemServer, args: argparse.Namespace, launch: _Launch, stored: StoredFds | None
) -> None:
    """Crash survival (:mod:`ivshmemd.crashsafe`) when systemd keeps an fd store: restore
    what it passed back, or store what a fresh daemon holds."""
    store = FdStore(launch.notifier)
    if stored is not None and stored.discarded:
        store.remove(stored.discarded)
    if not store.enabled:
        if stored is not None and stored.peers:
            for fd in stored.all_fds():
                if fd not in (stored.listen, stored.shm):
                    os.close(fd)
        return
    statefile = StateFile(state_path(args.socket))
    journal = launch.journal = CrashJournal(server, store, statefile)
    server.journal = journal
    if launch.inherited is not None:
        return
    if stored is not None and (stored.peers or stored.shm is not None):
        try:
            state = statefile.read()
        except StateFileError as exc:
            log.warning("%s", exc)
            state = None
        server_state, gone = recover(stored, state, args.vectors)
        server.adopt(server_state, gone)
        launch.recovered = True
        log.info(
            "restarted with the fds systemd kept: %d peers served on, %d announced as left",
            len(server.connections) - len([i for i in gone if i in server.connections]),
            len(gone),
        )  # fmt: skip
        return
    held = launch.held
    assert held.shm is not None and held.listener is not None
    if held.listener.path is not None and (stored is None or stored.listen is None):
        store.push(LISTEN, held.listener.sock.fileno())  # not an ivshmemd.socket's: ours
    store.push(SHM, held.shm.fd)


def _describe(args: argparse.Namespace, shm: SharedMemoryRegion) -> str:
    where = shm.path if shm.name is None else f"{shm.name!r}"
    reserved = "sparse" if args.sparse else "reserved"
    return (
        f"listening on {args.socket} (shm {where}, {shm.size} bytes {reserved}, "
        f"{plural(args.vectors, 'vector')} per peer)"
    )


def _check_upgrade(args: argparse.Namespace) -> int:
    """``--check-upgrade``: can this image take over from the running one? (One line.)"""
    try:
        state = inherited(same_process=False)
        if state is None:
            raise HandoverError(f"--check-upgrade needs a state (${STATE_FD_ENV})")
        print(check_upgrade(state, args.vectors))
    except HandoverError as exc:
        print(f"ivshmemd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ivshmemd`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.check_upgrade:
        return _check_upgrade(args)
    daemonized = not args.foreground
    try:
        state = inherited()
    except HandoverError as exc:
        print(f"ivshmemd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        target = configure_logging(
            log, verbose=args.verbose, log_file=args.log_file,
            daemonized=daemonized and state is not None and not args.log_file,
            socket_path=args.socket,
        )  # fmt: skip
    except LogSetupError as exc:
        print(f"ivshmemd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _raise_fd_limit()
    problem = _check_fd_limit(args.vectors)
    if problem is not None:
        log.error("%s", problem)
        return EXIT_FAILED
    size = round_shm_size(args.size, MIN_SHM_SIZE)
    if size != args.size:
        log.debug("size %d rounded up to %d", args.size, size)
    if args.sparse and state is None:
        log.warning(
            "--sparse: the shared memory is not reserved; if its filesystem fills up, "
            "peers die of SIGBUS when they touch a page that cannot be had"
        )
    launch = _Launch(argv, DaemonResources(), SystemdNotifier(), inherited=state)
    held = launch.held
    stored: StoredFds | None = None
    if state is not None:
        held = launch.held = DaemonResources.adopt(state["resources"])
    else:
        try:
            stored = _start(args, held, size)
            if daemonized:
                launch.report = daemonize(None)
                if not args.log_file:
                    target = configure_logging(
                        log, verbose=args.verbose, log_file=None, daemonized=True,
                        socket_path=args.socket,
                    )  # fmt: skip
                held.write_pidfile(args.pidfile)
        except (
            StartupError, SharedMemoryError, ListenerError, ActivationError, LogSetupError,
            PidFileError,
        ) as exc:  # fmt: skip
            log.error("%s", exc)
            # release first: the waiting parent exits on the report, and nothing we made may
            # outlive the error it prints
            held.release(keep_shm=args.keep_shm)
            if launch.report is not None:
                launch.report(str(exc))
            return EXIT_FAILED
    assert held.shm is not None and held.listener is not None
    log.debug("logging to %s", target.description)
    config = ServerConfig(
        n_vectors=args.vectors,
        max_peers=args.max_peers,
        peer_ids=args.peer_ids,
        send_timeout=args.send_timeout,
        allow=AllowList(frozenset(args.allow_uid), frozenset(args.allow_gid)),
        fd_reserve=FD_RESERVE,
        flight=budget_for(fd_limit(), args.vectors),
    )
    server = IvshmemServer(held.listener.sock, held.shm, config)
    held.serving = True
    try:
        if state is not None:
            server.adopt(state["server"])
        _journal(server, args, launch, stored)
        trio.run(_run, server, _describe(args, held.shm), launch, args, target)
    except BaseException as exc:  # one line, whatever trio wrapped it in; still clean up
        leaf = unwrap(exc)
        if isinstance(leaf, KeyboardInterrupt):
            log.info("interrupted, shutting down")
        else:
            message = one_line(leaf)
            if not isinstance(leaf, ControlSetupError | FederationSetupError):
                message = f"fatal: {type(leaf).__name__}: {message}"
            log.error("%s", message)
            held.release(keep_shm=args.keep_shm)
            if launch.report is not None:
                launch.report(message)
            return EXIT_FAILED
    finally:
        held.release(keep_shm=args.keep_shm)
    log.info("shut down")
    return EXIT_OK
