"""``ivshmem-peer``: one peer process running a plugin as its guest software.

    ivshmem-peer -S SOCK --plugin NAME [--vectors N] [--wait SECONDS] [--reconnect]
                 [--fast-path | --trio] [--report human|json] [plugin options]

It connects to the daemon (retrying with backoff until it is up, for ``--wait`` seconds),
builds the VM with the ivshmem device on the shared memory, runs the plugin, and exits when
the plugin finishes (0, or 1 if it failed), on SIGTERM/SIGINT (0), or when the daemon goes
away (1, with a message; ``--reconnect`` reconnects instead). Usage errors (an unknown
plugin, bad plugin options) exit 2 with one clear line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from ivshmemd.argtypes import non_negative_seconds
from ivshmemd.errors import unwrap

from .client import ClientError, ServerGone, connect_with_retry
from .plugin import Plugin, PluginError, available_plugins, load_plugin

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\nTry '{self.prog} --help'.\n")


def _size(text: str) -> int:
    from ivshmemd.sizes import SizeError, parse_size

    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(plugin: type[Plugin] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``plugin``, its options are added in their own group."""
    p = _Parser(
        prog="ivshmem-peer",
        description="Run one emulated ivshmem peer: a VMM model with the ivshmem-doorbell "
        "device, whose guest software is a plugin.",
        epilog="Plugins come from the entry-point group 'ivshmem.peers'; "
        "--list-plugins shows them. 'ivshmem-peer --plugin NAME --help' shows NAME's options.",
    )
    p.add_argument(
        "-S",
        "--socket",
        metavar="PATH",
        default="/tmp/ivshmem_socket",
        help="the daemon's unix socket (default /tmp/ivshmem_socket)",
    )
    p.add_argument("--plugin", metavar="NAME", help="the guest software to run")
    p.add_argument("--list-plugins", action="store_true", help="list the plugins and exit")
    p.add_argument(
        "--vectors",
        type=int,
        metavar="N",
        default=None,
        help="the device's MSI-X vectors (default: as many as the daemon hands out)",
    )
    p.add_argument(
        "--ram", type=_size, metavar="SIZE", default=16 << 20, help="guest RAM (default 16M)"
    )
    p.add_argument(
        "--wait",
        type=non_negative_seconds,
        metavar="SECONDS",
        default=10.0,
        help="keep retrying the connection this long while the daemon is not up (default 10)",
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
    if plugin is not None:
        group = p.add_argument_group(f"options of the {plugin.name or 'selected'} plugin")
        plugin.add_arguments(group)
    return p


class Reporter:
    """Status lines: human text on stderr (summary on stdout), or JSON lines on stdout."""

    def __init__(self, mode: str) -> None:
        self.json = mode == "json"
        self.peer_id: int | None = None

    def __call__(self, **fields: Any) -> None:
        if self.json:
            sys.stdout.write(json.dumps(fields) + "\n")
            sys.stdout.flush()

    def log(self, message: str) -> None:
        who = f"peer {self.peer_id}" if self.peer_id is not None else "ivshmem-peer"
        if self.json:
            self(event="log", message=message)
        else:
            print(f"{who}: {message}", file=sys.stderr, flush=True)

    def summary(self, text: str, ok: bool) -> None:
        if self.json:
            self(event="finished", ok=ok, summary=text)
        else:
            print(text, file=sys.stdout if ok else sys.stderr, flush=True)


async def _connect(args: argparse.Namespace) -> Any:
    # --vectors is the device's count; given, it is also what to expect from the daemon
    return await connect_with_retry(args.socket, vectors=args.vectors, timeout=args.wait)


def _run_once(args: argparse.Namespace, plugin_cls: type[Plugin], reporter: Reporter) -> int:
    # the VMM model (numpy and friends) is imported only when a peer really runs, so that
    # argument checking (the launcher validates up front) stays quick
    from .loops import Stopped, run_blocking, run_trio
    from .runtime import PeerMachine

    client = trio.run(_connect, args)
    reporter.peer_id = client.peer_id
    plugin = plugin_cls(args)
    try:
        machine = PeerMachine(
            client, plugin, vectors=args.vectors, report=reporter, log=reporter.log
        )
    except BaseException:
        client.close()
        raise
    fast = plugin_cls.prefers_fast_path if args.fast_path is None else args.fast_path

    def ready() -> None:  # called once SIGTERM/SIGINT are handled by the loop
        reporter(event="running", peer_id=client.peer_id, pid=os.getpid(),
                 shm_size=client.shm_size, vectors=machine.vectors,
                 peers=sorted(p for p in machine.peer_fds if p != client.peer_id),
                 loop="fast-path" if fast else "trio")  # fmt: skip
        reporter.log(
            f"running plugin {args.plugin} (id {client.peer_id}, shm {client.shm_size} "
            f"bytes, {machine.vectors} vectors, {'fast-path' if fast else 'trio'} loop)"
        )

    try:
        if fast:
            spin = plugin_cls.default_spin_us if args.spin_us is None else args.spin_us
            run_blocking(machine, ready, spin_us=spin)
        else:
            trio.run(run_trio, machine, ready)
    except Stopped as stop:
        reporter.log(f"{stop} received, stopping")
        reporter(event="stopped", signal=stop.args[0])
        return EXIT_OK
    finally:
        machine.stop()
    outcome = machine.outcome
    assert outcome is not None
    if outcome.summary:
        reporter.summary(outcome.summary, outcome.ok)
    elif reporter.json:
        reporter(event="finished", ok=outcome.ok, summary=None)
    return EXIT_OK if outcome.ok else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ivshmem-peer`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _rest = build_parser().parse_known_args(argv)
    if first.list_plugins:
        for name, ep in sorted(available_plugins().items()):
            try:
                description = ep.load().description
            except Exception as exc:  # a broken third-party plugin must not break the list
                description = f"(fails to load: {exc})"
            print(f"{name:12} {description}")
        return EXIT_OK
    if not first.plugin:
        build_parser().error("--plugin NAME is required (see --list-plugins)")
    try:
        plugin_cls = load_plugin(first.plugin)
    except PluginError as exc:
        print(f"ivshmem-peer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser = build_parser(plugin_cls)
    args = parser.parse_args(argv)
    problem = plugin_cls.check_options(args)
    if problem:
        parser.error(f"plugin {first.plugin}: {problem}")
    reporter = Reporter(args.report)
    while True:
        try:
            return _run_once(args, plugin_cls, reporter)
        except BaseException as raised:  # trio may wrap what a task raised: unwrap it
            error = unwrap(raised)
            if isinstance(error, ServerGone):
                if not args.reconnect:
                    reporter.log(f"the daemon went away ({error}); exiting")
                    reporter(event="server-gone", message=str(error))
                    return EXIT_FAILED
                reporter.log(f"the daemon went away ({error}); reconnecting")
                reporter(event="reconnecting")
                time.sleep(0.05)
            elif isinstance(error, ClientError):
                reporter.log(str(error))
                reporter(event="error", message=str(error))
                return EXIT_FAILED
            elif isinstance(error, KeyboardInterrupt):
                return EXIT_OK
            else:
                raise
