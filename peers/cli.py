"""``ivshmem-peer``: one peer process running a plugin as its guest software.

    ivshmem-peer [-S SOCK] [--vectors N] [--wait SECONDS] [--reconnect] [-v]
                 [--fast-path | --trio] [--report human|json] --plugin NAME [PLUGIN OPTIONS]

Everything after ``--plugin NAME`` is the plugin's (:mod:`peers.cmdline`); ``--plugin NAME
--help`` lists the plugin's options. It connects to the daemon (retrying with backoff until
it is up, for ``--wait`` seconds), builds the VM with the ivshmem device on the shared
memory, runs the plugin, and exits when the plugin finishes (0, or 1 if it failed), on
SIGTERM/SIGINT (0), or when the daemon goes away (1, with a message; ``--reconnect``
reconnects instead). Usage errors (an unknown plugin, bad plugin options) exit 2 with one
clear line. A plugin that raises is reported in one line (``TYPE: message`` and where), its
traceback only with ``-v``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from ivshmemd import __version__
from ivshmemd.argtypes import seconds, size
from ivshmemd.control.client import departure_reason
from ivshmemd.control.schema import default_control_endpoint
from ivshmemd.errors import unwrap
from ivshmemd.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ivshmemd.protocol import DEFAULT_SOCKET
from ivshmemd.wording import exception_line, plural, traceback_lines

from . import report
from .client import ClientError, ServerGone, connect_with_retry
from .cmdline import UsageError, format_help, parse_plugin_options, split_at_plugin
from .plugin import Plugin, PluginError, ShmDirectoryError, available_plugins, load_plugin

__all__ = ["main"]

#: Seconds a peer keeps retrying its first connection while the daemon is not up.
DEFAULT_WAIT = 10.0
#: Seconds between losing the daemon and reconnecting (``--reconnect``): a daemon being
#: restarted gets a moment to go away before the retries begin.
RECONNECT_PAUSE = 0.05


PROG = "ivshmem-peer"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\nTry '{self.prog} --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the peer's own options (what comes before ``--plugin NAME``)."""
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [-S PATH] [PEER OPTIONS] --plugin NAME [PLUGIN OPTIONS]",
        description="Run one emulated ivshmem peer: a VMM model with the ivshmem-doorbell "
        "device, whose guest software is a plugin.",
        epilog="Everything after --plugin NAME is the plugin's. Plugins come from the "
        "entry-point group 'ivshmem.peers'; --list-plugins shows them. "
        "'ivshmem-peer --plugin NAME --help' shows NAME's options.",
        allow_abbrev=False,
    )
    p.add_argument(
        "-S",
        "--socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help=f"the daemon's unix socket (default {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--plugin",
        metavar="NAME",
        help="the guest software to run; every option after it is the plugin's",
    )
    p.add_argument("--list-plugins", action="store_true", help="list the plugins and exit")
    p.add_argument(
        "--vectors",
        type=int,
        metavar="N",
        default=None,
        help="the device's MSI-X vectors (default: as many as the daemon hands out)",
    )
    p.add_argument(
        "--ram", type=size, metavar="SIZE", default=16 << 20, help="guest RAM (default 16M)"
    )
    p.add_argument(
        "--wait",
        type=seconds(zero=True),
        metavar="SECONDS",
        default=DEFAULT_WAIT,
        help="keep retrying the connection this long while the daemon is not up "
        f"(default {DEFAULT_WAIT:g})",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="when the daemon goes away, reconnect (a new peer id) instead of exiting",
    )
    loop = p.add_mutually_exclusive_group()
    loop.add_argument(
        "--fast-path",
        dest="fast_path",
        action="store_const",
        const=True,
        default=None,
        help="use the blocking epoll loop (lowest latency)",
    )
    loop.add_argument(
        "--trio",
        dest="fast_path",
        action="store_const",
        const=False,
        help="use the trio event loop",
    )
    p.add_argument(
        "--spin-us",
        type=float,
        metavar="US",
        default=None,
        help="fast path: poll for the next ring this long before sleeping (lower latency, "
        "a busy core meanwhile; default: the plugin's choice, usually 0)",
    )
    p.add_argument(
        "--report",
        choices=("human", "json"),
        default="human",
        help="json: one JSON object per line on stdout (for the launcher)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show a plugin's traceback when it raises (one line without)",
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


class Reporter:
    """Status lines: human text on stderr (summary on stdout), or JSON lines on stdout
    (the events of :mod:`peers.report`)."""

    def __init__(self, mode: str) -> None:
        self.json = mode == "json"
        self.peer_id: int | None = None

    def __call__(self, **fields: Any) -> None:
        """An event as the runtime and plugins report it (``event=KIND``, its fields)."""
        self.emit(report.decode(fields))

    def emit(self, event: report.Event | report.PluginEvent) -> None:
        if self.json:
            sys.stdout.write(report.encode(event) + "\n")
            sys.stdout.flush()

    def log(self, message: str) -> None:
        who = f"peer {self.peer_id}" if self.peer_id is not None else "ivshmem-peer"
        if self.json:
            self.emit(report.Log(message))
        else:
            print(f"{who}: {message}", file=sys.stderr, flush=True)

    def summary(self, text: str, ok: bool) -> None:
        if self.json:
            self.emit(report.Finished(ok, text))
        else:
            print(text, file=sys.stdout if ok else sys.stderr, flush=True)


async def _connect(args: argparse.Namespace) -> Any:
    # --vectors is the device's count; given, it is also what to expect from the daemon
    return await connect_with_retry(args.socket, vectors=args.vectors, timeout=args.wait)


def _run_once(
    args: argparse.Namespace,
    plugin_cls: type[Plugin],
    options: argparse.Namespace,
    reporter: Reporter,
) -> int:
    # the VMM model (numpy and friends) is imported only when a peer really runs, so that
    # argument checking (the launcher validates up front) stays quick
    from .loops import Stopped, run_blocking, run_trio
    from .runtime import PeerMachine

    client = trio.run(_connect, args)
    reporter.peer_id = client.peer_id
    plugin = plugin_cls(options)
    try:
        machine = PeerMachine(
            client, plugin, vectors=args.vectors, report=reporter, log=reporter.log,
            plugin_name=args.plugin,
        )  # fmt: skip
    except BaseException:
        client.close()
        raise
    fast = plugin_cls.prefers_fast_path if args.fast_path is None else args.fast_path

    def ready() -> None:  # called once SIGTERM/SIGINT are handled by the loop
        reporter.emit(report.Running(
            peer_id=client.peer_id, pid=os.getpid(), shm_size=client.shm_size,
            vectors=machine.vectors,
            peers=tuple(sorted(p for p in machine.peer_fds if p != client.peer_id)),
            loop="fast-path" if fast else "trio",
        ))  # fmt: skip
        reporter.log(
            f"running plugin {args.plugin} (id {client.peer_id}, shm {client.shm_size} "
            f"bytes, {plural(machine.vectors, 'vector')}, {'fast-path' if fast else 'trio'} "
            "loop)"
        )

    try:
        if fast:
            spin = plugin_cls.default_spin_us if args.spin_us is None else args.spin_us
            run_blocking(machine, ready, spin_us=spin)
        else:
            trio.run(run_trio, machine, ready)
    except Stopped as stop:
        reporter.log(f"{stop} received, stopping")
        reporter.emit(report.Stopped(signal=stop.args[0]))
        return EXIT_OK
    finally:
        machine.stop()
    outcome = machine.outcome
    assert outcome is not None
    if outcome.summary:
        reporter.summary(outcome.summary, outcome.ok)
    elif reporter.json:
        reporter.emit(report.Finished(outcome.ok, None))
    return EXIT_OK if outcome.ok else EXIT_FAILED


def _list_plugins() -> int:
    for name, ep in sorted(available_plugins().items()):
        try:
            description = ep.load().description
        except Exception as exc:  # a broken third-party plugin must not break the list
            description = f"(fails to load: {exc})"
        print(f"{name:12} {description}")
    return EXIT_OK


def _plugin_failed(exc: BaseException, args: argparse.Namespace, reporter: Reporter) -> int:
    """The plugin raised: one line (its type, message and where), the traceback with -v."""
    if isinstance(exc, ShmDirectoryError):
        text = f"{args.plugin}: {exc}"
    else:
        text = f"plugin {args.plugin} raised {exception_line(exc)}"
    if args.verbose:
        for line in traceback_lines(exc):
            reporter.log(line)
    reporter.log(text)
    reporter.emit(report.Error(text))
    return EXIT_FAILED


def _why_gone(socket_path: str, peer_id: int | None, error: ServerGone) -> str:
    """What to say when the connection closed: the daemon's reason for disconnecting us
    (asked of its control plane, e.g. ``kicked by uid 0 (ivshmemctl kick)``) if it can
    tell, else that it went away."""
    if peer_id is not None:
        reason = departure_reason(default_control_endpoint(socket_path), peer_id, timeout=1.0)
        if reason is not None:
            return f"disconnected by the daemon: {reason}"
    return f"the daemon went away ({error})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ivshmem-peer`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        line = split_at_plugin(argv, parser)
        plugin_cls = load_plugin(line.plugin) if line.plugin else None
    except (UsageError, PluginError) as exc:
        parser.error(str(exc))
    if line.help:
        print(format_help(PROG, parser, line.plugin, plugin_cls), end="")
        return EXIT_OK
    args = parser.parse_args(line.own)
    if args.list_plugins:
        return _list_plugins()
    if plugin_cls is None:
        parser.error("--plugin NAME is required (see --list-plugins)")
    assert plugin_cls is not None
    args.plugin = line.plugin
    try:
        options = parse_plugin_options(PROG, line, plugin_cls, parser)
    except UsageError as exc:
        parser.error(str(exc))
    reporter = Reporter(args.report)
    while True:
        try:
            return _run_once(args, plugin_cls, options, reporter)
        except BaseException as raised:  # trio may wrap what a task raised: unwrap it
            error = unwrap(raised)
            if isinstance(error, ServerGone):
                gone = _why_gone(args.socket, reporter.peer_id, error)
                if not args.reconnect:
                    reporter.log(f"{gone}; exiting")
                    reporter.emit(report.ServerGone(gone))
                    return EXIT_FAILED
                reporter.log(f"{gone}; reconnecting")
                reporter.emit(report.Reconnecting())
                time.sleep(RECONNECT_PAUSE)
            elif isinstance(error, ClientError):
                reporter.log(str(error))
                reporter.emit(report.Error(str(error)))
                return EXIT_FAILED
            elif isinstance(error, KeyboardInterrupt):
                return EXIT_OK
            elif isinstance(error, Exception):
                return _plugin_failed(error, args, reporter)
            else:
                raise
