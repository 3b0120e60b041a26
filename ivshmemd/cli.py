"""``ivshmemd``: the command line, start-up, signal handling and clean shutdown.

The short flags, defaults and validation are QEMU's ivshmem-server's (``-S -M -m -l -n -F -p
-v -h``), so a script written for it works unchanged; every flag also has a long form, and
there are a few more options for what the C server cannot do. Errors a user can hit print one
clear line and exit 1 (as QEMU's server does), never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import logging
import logging.handlers
import os
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from . import __version__
from .activation import ActivationError, adopt_unix_listener
from .argtypes import positive_float, positive_int, size
from .control import (
    ControlSetupError,
    Credentials,
    EventPublisher,
    default_control_endpoint,
    default_events_endpoint,
    events_endpoint_for,
    serve_control,
)
from .controlview import DaemonControlView
from .daemon import daemonize, write_pidfile
from .listener import Listener, ListenerError, bind_listener, parse_group
from .protocol import DEFAULT_SOCKET, MAX_PEER_ID, MAX_VECTORS
from .sdnotify import SystemdNotifier
from .server import IvshmemServer, ServerConfig
from .shm import (
    MIN_SHM_SIZE,
    SharedMemoryError,
    SharedMemoryRegion,
    open_posix_shm,
    open_shm_in_dir,
    unlink_posix_shm,
)
from .sizes import round_shm_size

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

EPILOG = """\
sizes:
  SIZE is a byte count with an optional suffix K, M, G, T, P or E (powers of 1024), e.g.
  4096, 1M, 1.5G. It is rounded up to a power of two (and to at least 4 KiB, the smallest
  BAR a QEMU ivshmem device accepts). Sizes above 4 GiB are fine.

examples:
  ivshmemd -F -S /run/ivshmem.sock -M myshm -l 16M -n 2
      serve in the foreground; QEMU then uses
      -chardev socket,id=iv,path=/run/ivshmem.sock -device ivshmem-doorbell,chardev=iv,vectors=2
  ivshmemd -S /run/ivshmem.sock -p /run/ivshmemd.pid -m /dev/hugepages -l 1G
      daemonize (returns once the socket is listening), memory from hugetlbfs

signals:
  SIGTERM and SIGINT free every peer (the others are told), remove the socket and, with -M,
  unlink the shared memory unless --keep-shm is given.

exit status:
  0 after a clean shutdown, 1 on bad arguments or a start-up failure (one line says why).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors look like QEMU's server's: a line, a hint, exit status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"{self.prog}: {message}\nTry '{self.prog} -h' for more information.\n")


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
        type=size,
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
        type=positive_float,
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
        "tcp://HOST:PORT to reach it from elsewhere)",
    )
    more.add_argument(
        "--events",
        metavar="ENDPOINT",
        default=None,
        help="zmq endpoint of the event stream (default: beside --control)",
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
        help="append log lines to FILE (default: stderr, or syslog when daemonized)",
    )
    more.add_argument("--version", action="version", version=f"ivshmemd {__version__}")
    p.set_defaults(shm=_ShmChoice("posix", DEFAULT_SHM_NAME))
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line (exits 1 with a message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.socket_group is not None:
        try:
            args.socket_group_id = parse_group(args.socket_group)
        except ListenerError as exc:
            parser.error(str(exc))
    else:
        args.socket_group_id = None
    return args


def _configure_logging(args: argparse.Namespace, daemonized: bool) -> None:
    level = logging.DEBUG if args.verbose else logging.INFO
    handler: logging.Handler
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s ivshmemd[%(process)d]: %(message)s"))
    elif daemonized and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("ivshmemd[%(process)d]: %(message)s"))
    elif daemonized:
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ivshmemd: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _raise_fd_limit() -> None:
    """Lift the soft fd limit to the hard one: each peer costs 1 + vectors fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def _open_shm(args: argparse.Namespace, size: int) -> SharedMemoryRegion:
    if args.shm.kind == "dir":
        return open_shm_in_dir(args.shm.value, size)
    return open_posix_shm(args.shm.value, size)


def _control_endpoints(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """Where the control plane listens: beside the socket, an explicit endpoint, or nowhere."""
    if args.no_control:
        return None, None
    if args.control:
        return args.control, args.events or events_endpoint_for(args.control)
    return default_control_endpoint(args.socket), default_events_endpoint(args.socket)


async def _run(
    server: IvshmemServer,
    describe: str,
    report: Callable[[str | None], None] | None,
    args: argparse.Namespace,
) -> None:
    notifier = SystemdNotifier()
    publisher = EventPublisher()
    server.listeners.append(publisher.on_server_event)

    def report_peer_count(kind: str, event: dict[str, Any]) -> None:
        notifier.status(f"{len(server.connections)} peers connected")

    server.listeners.append(report_peer_count)

    def authorize(creds: Credentials | None) -> str | None:
        if creds is None:  # tcp: no credentials; kick is refused there anyway
            return None
        return server.allowed(creds.uid, creds.gid, creds.pid)

    control, events = _control_endpoints(args)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            if control is not None and events is not None:
                await nursery.start(
                    functools.partial(
                        serve_control,
                        DaemonControlView(server, args.socket),
                        control,
                        events,
                        publisher,
                        socket_mode=args.socket_mode,
                        socket_gid=args.socket_group_id,
                        authorize=authorize,
                    )
                )
                log.debug("control plane on %s, events on %s", control, events)
            log.info("%s", describe)
            notifier.ready("0 peers connected")
            if report is not None:
                report(None)
            async for signum in signals:
                log.info("%s received, shutting down", signal.Signals(signum).name)
                notifier.stopping()
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ivshmemd`` console script."""
    args = parse_args(argv)
    daemonized = not args.foreground
    _configure_logging(args, daemonized=False)
    _raise_fd_limit()
    size = round_shm_size(args.size, MIN_SHM_SIZE)
    if size != args.size:
        log.debug("size %d rounded up to %d", args.size, size)
    shm: SharedMemoryRegion | None = None
    listener: Listener | None = None
    try:
        shm = _open_shm(args, size)
        adopted = adopt_unix_listener()
        if adopted is not None:
            listener = Listener(adopted, None)
        else:
            listener = bind_listener(args.socket, args.socket_mode, args.socket_group_id)
    except (SharedMemoryError, ListenerError, ActivationError) as exc:
        log.error("%s", exc)
        _cleanup(args, shm, listener, remove_pidfile=False)
        return 1

    report = None
    if daemonized:
        log_fd = None
        report = daemonize(log_fd)
        _configure_logging(args, daemonized=True)
        try:
            write_pidfile(args.pidfile)
        except OSError as exc:
            report(f"cannot write pid file {args.pidfile}: {exc.strerror}")
            _cleanup(args, shm, listener, remove_pidfile=False)
            return 1

    config = ServerConfig(
        n_vectors=args.vectors,
        max_peers=args.max_peers,
        peer_ids=args.peer_ids,
        send_timeout=args.send_timeout,
        allow_uids=frozenset(args.allow_uid),
        allow_gids=frozenset(args.allow_gid),
    )
    server = IvshmemServer(listener.sock, shm, config)
    where = shm.path if shm.name is None else f"{shm.name!r}"
    describe = (
        f"listening on {args.socket} (shm {where}, {shm.size} bytes, "
        f"{args.vectors} vectors per peer)"
    )
    try:
        trio.run(_run, server, describe, report, args)
    except ControlSetupError as exc:
        log.error("%s", exc)
        if report is not None:
            report(str(exc))
        return 1
    except Exception as exc:  # an unexpected failure: say it in one line, still clean up
        log.error("fatal: %s: %s", type(exc).__name__, exc)
        if report is not None:
            report(f"fatal: {exc}")
        return 1
    finally:
        _cleanup(args, shm, listener, remove_pidfile=daemonized)
    log.info("shut down")
    return 0


def _cleanup(
    args: argparse.Namespace,
    shm: SharedMemoryRegion | None,
    listener: Listener | None,
    remove_pidfile: bool,
) -> None:
    if listener is not None:
        listener.close()
    if shm is not None:
        shm.close()
        if shm.name is not None and not args.keep_shm:
            unlink_posix_shm(shm.name)
    if remove_pidfile:
        try:
            os.unlink(args.pidfile)
        except OSError:
            pass
