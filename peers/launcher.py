"""``ivshmemctl up``: one command that runs a daemon and N peers, and stops them all cleanly.

    ivshmemctl up --peers N --plugin NAME [--vectors V] [--size S] [--socket PATH]
                  [--shm-name NAME] [--keep] [--no-fork-server] [-v]
                  [plugin options] [-- plugin options]

What it does, in order:

1. validates everything up front (the plugin exists and accepts the plugin options, exactly
   as ``ivshmem-peer`` would parse them); a mistake exits 2 before anything is started;
2. starts ``ivshmemd`` in the foreground as a child, on a unique socket in a private
   temporary directory and a unique POSIX shm name (unless ``--socket``/``--shm-name``),
   and waits for its ``READY=1`` (a supervised child, :mod:`ivshmemd.supervise`);
3. starts the N peers at once (``ivshmem-peer --report json``) and follows each one's
   events (:mod:`peers.report`) through its state machine (:mod:`peers.peerstate`):
   running, finished (with the plugin's summary), failed, and the last thing it
   said; prints ``all N peers running after X ms`` (counted from the command's start) once
   every peer is up. Peers are forked from a fork server (:mod:`peers.forkserver`) that has
   imported the runtime once, started alongside the daemon, so N peers do not pay N
   interpreter start-ups; ``--no-fork-server`` execs each one instead;
4. shows what is happening: a live progress line on a terminal, plain lines otherwise;
5. ends when every peer has exited, when a peer fails (the others are stopped), when the
   daemon dies, or on SIGINT/SIGTERM (a second one kills instead of waiting). Stopping is
   always the same: SIGTERM to the live peers, reap them (SIGKILL after a grace period),
   SIGTERM to the daemon, reap it, remove the private socket directory and unlink the shm.
   With ``--keep`` the daemon stays up after the peers are done, until Ctrl-C. Should the
   launcher itself be killed outright, the fork server notices and stops the peers and the
   daemon, and removes the socket directory and the shm.

Output: progress and per-peer lines on stderr; on stdout the ``all N peers running`` line
and, at the very end, every plugin's summary line in peer-id order (so ``ivshmemctl up
--peers 2 --plugin ping`` ends with the ping latency line). Exit status: 0 when every peer
finished ok, 1 when a peer (or the daemon) failed (each failed peer is named with its id,
pid, exit status and last error line), 2 on bad usage, 130/143 when stopped by
SIGINT/SIGTERM with no failure (0 with ``--keep`` once every peer had finished ok).

Children run in their own process groups, so a Ctrl-C on the terminal reaches only the
launcher, which then stops them in the right order (peers before the daemon, so that no
peer mistakes the shutdown for a lost daemon). Nothing here sleeps to synchronise: every
wait is on a child's output, its exit, or a signal.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio

from ivshmemd.argtypes import int_in, size
from ivshmemd.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_USAGE, signal_exit
from ivshmemd.protocol import MAX_VECTORS
from ivshmemd.shm import unlink_posix_shm
from ivshmemd.supervise import (
    STOP_GRACE,
    Child,
    ChildError,
    DaemonProcess,
    Supervisor,
    daemon_command,
    exit_text,
    open_supervisor,
    unique_name,
)

from . import report
from .display import Display
from .forkserver import ForkServer, ForkServerError
from .harness import PEER_MODULE, peer_command
from .peerstate import Peer, PeerState
from .plugin import Plugin, PluginError, load_plugin

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UpConfig",
    "add_up_arguments",
    "main",
    "parse_up_config",
    "register_up_command",
    "run_up",
]

#: How long the daemon (and the fork server) may take to be ready.
DAEMON_READY_TIMEOUT: Final = 30.0
MAX_PEERS: Final = 4096
PROG: Final = "ivshmemctl up"


def _process_started() -> float:
    """When this process started, on the ``time.monotonic()`` clock (10 ms resolution):
    the start-up figure counts from the command's start, interpreter and imports included.
    Falls back to now where /proc is not available."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as uptime:
            since_boot = float(uptime.read().split()[0])
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return now
    return now - max(0.0, since_boot - started)


_STARTED: Final = _process_started()


class UsageError(Exception):
    """Bad command-line input (exit 2, one clear line)."""


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _add_launcher_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The launcher's own options. With ``suppress`` no defaults are set, so a second parse
    (of what follows ``--plugin NAME``) only overrides what was given again."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--peers",
        type=int_in(1, MAX_PEERS),
        metavar="N",
        default=default(None),
        help="how many peer processes to run (required)",
    )
    parser.add_argument(
        "--vectors",
        type=int_in(0, MAX_VECTORS),
        metavar="V",
        default=default(1),
        help="interrupt vectors per peer, the daemon's -n (default 1)",
    )
    parser.add_argument(
        "--size",
        type=size,
        metavar="S",
        default=default(None),
        help="shared memory size, the daemon's -l (default: the daemon's, 4M)",
    )
    parser.add_argument(
        "-S",
        "--socket",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the daemon's socket (default: a unique one in a private temporary directory)",
    )
    parser.add_argument(
        "--shm-name",
        metavar="NAME",
        default=default(None),
        help="the POSIX shm name (default: a unique one)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        default=default(False),
        help="keep the daemon running after the peers are done, until Ctrl-C",
    )
    parser.add_argument(
        "--no-fork-server",
        dest="fork_server",
        action="store_false",
        default=default(True),
        help="start every peer as a fresh interpreter instead of forking it from one that "
        "has already imported the peer runtime (slower start-up)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default(False),
        help="also show the daemon's log and every peer's log lines",
    )


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``up`` options to ``parser`` (a subcommand parser of ``ivshmemctl``).

    ``--plugin NAME`` takes everything after it: the launcher picks its own options out of
    that and hands the rest to the plugin; after a ``--`` everything goes to the plugin
    (for a plugin option that has the same name as a launcher option).
    """
    parser.usage = (
        f"{parser.prog} --peers N [--vectors V] [--size S] [-S PATH] [--shm-name NAME] "
        "[--keep] [--no-fork-server] [-v] --plugin NAME [PLUGIN OPTIONS] [-- PLUGIN OPTIONS]"
    )
    _add_launcher_options(parser, suppress=False)
    parser.add_argument("--plugin", dest="plugin_argv", nargs=argparse.REMAINDER,
                        help="NAME [PLUGIN OPTIONS]: the plugin every peer runs, then its "
                        "options ('--plugin NAME --help' lists them)")  # fmt: skip
    parser.add_argument("plugin_extra", nargs="*", help=argparse.SUPPRESS)


def register_up_command(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """``ivshmemctl`` subcommand provider, registered in the entry-point group
    ``ivshmemctl.commands`` (see ``ivshmemd.ctl.COMMANDS_GROUP``)."""
    del common  # -S means the socket to create here, not one to talk to
    parser = subparsers.add_parser(
        "up",
        help="run a daemon and N peers running a plugin; stop them all on Ctrl-C",
        description="Start an ivshmemd and N peer processes running a plugin, show their "
        "progress, print each plugin's summary, and stop everything cleanly when the "
        "plugins finish or on Ctrl-C.",
        epilog="Plugin options follow --plugin NAME; after '--' every argument goes to the "
        "plugin. Exit status: 0 all peers ok, 1 a peer or the daemon failed, 2 bad usage, "
        "130/143 stopped by SIGINT/SIGTERM.",
    )
    add_up_arguments(parser)
    parser.set_defaults(run=run_up)


@dataclass(frozen=True)
class UpConfig:
    """Everything ``up`` needs, validated."""

    peers: int
    plugin: str
    plugin_args: tuple[str, ...]
    vectors: int = 1
    size: int | None = None
    socket: str | None = None
    shm_name: str | None = None
    keep: bool = False
    verbose: bool = False
    fork_server: bool = True


def _help_parser(plugin_cls: type[Plugin] | None, name: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, add_help=False, description="Run a daemon and N peers running a plugin."
    )
    _add_launcher_options(parser, suppress=False)
    parser.add_argument("--plugin", metavar="NAME", help="the plugin every peer runs")
    if plugin_cls is not None:
        plugin_cls.add_arguments(parser.add_argument_group(f"options of the {name} plugin"))
    return parser


def _validate_plugin_options(name: str, plugin_cls: type[Plugin], args: Sequence[str]) -> None:
    """Parse ``args`` exactly as every peer will (``ivshmem-peer``'s parser)."""
    from .cli import build_parser

    parser = build_parser(plugin_cls)
    parser.prog = f"{PROG} --plugin {name}"
    try:
        options = parser.parse_args(["-S", "unused", "--plugin", name, *args])
    except SystemExit as exc:  # the parser printed its one-line error
        raise UsageError("") from exc
    problem = plugin_cls.check_options(options)
    if problem:
        raise UsageError(f"plugin {name}: {problem}")


def parse_up_config(args: argparse.Namespace) -> UpConfig | None:
    """Turn what :func:`add_up_arguments` parsed into an :class:`UpConfig`.

    Returns None when help was asked for (and printed); raises :class:`UsageError`.
    """
    plugin_argv = list(getattr(args, "plugin_argv", None) or [])
    extra = list(getattr(args, "plugin_extra", None) or [])
    if "--" in plugin_argv:  # `python -m peers.launcher up`: argparse kept it in REMAINDER
        cut = plugin_argv.index("--")
        plugin_argv, extra = plugin_argv[:cut], plugin_argv[cut + 1 :] + extra
    if not plugin_argv:
        raise UsageError("--plugin NAME is required (ivshmem-peer --list-plugins lists them)")
    name, rest = plugin_argv[0], plugin_argv[1:]
    if name.startswith("-"):
        raise UsageError(f"--plugin needs a plugin name first, not {name!r}")
    try:
        plugin_cls = load_plugin(name)
    except PluginError as exc:
        raise UsageError(str(exc)) from None
    if "-h" in rest or "--help" in rest:
        _help_parser(plugin_cls, name).print_help()
        return None
    again = argparse.ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    _add_launcher_options(again, suppress=True)
    values = argparse.Namespace(**vars(args))
    try:
        values, plugin_args = again.parse_known_args(rest, values)
    except SystemExit as exc:
        raise UsageError("") from exc
    plugin_args += extra
    if values.peers is None:
        raise UsageError("--peers N is required")
    _validate_plugin_options(name, plugin_cls, plugin_args)
    return UpConfig(
        peers=values.peers,
        plugin=name,
        plugin_args=tuple(plugin_args),
        vectors=values.vectors,
        size=values.size,
        socket=getattr(values, "socket", None),
        shm_name=values.shm_name,
        keep=values.keep,
        verbose=values.verbose,
        fork_server=values.fork_server,
    )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Launcher:
    """Runs one ``up``: the daemon, the peers, the display, the shutdown."""

    def __init__(self, config: UpConfig, display: Display) -> None:
        self.config = config
        self.display = display
        self.t0 = _STARTED
        self.own_dir: str | None = None
        self.socket_path = config.socket or ""
        self.shm_name = config.shm_name or unique_name("ivshmem-up")
        self.supervisor: Supervisor | None = None
        self.daemon: DaemonProcess | None = None
        self.forkserver: ForkServer | None = None
        self.kept = False  # --keep: the peers are done, the daemon stays up until a signal
        self.peers: list[Peer] = []
        self.failed: list[Peer] = []  # in the order they failed: the first is the cause
        self.all_running_ms: float | None = None
        self.stopping = False
        self.stop_signal: int | None = None
        self.kill_now = False
        self.daemon_failed: str | None = None
        self._changed = trio.lowlevel.ParkingLot()
        self._run_scope = trio.CancelScope()

    # -- helpers ----------------------------------------------------------------------------

    def _ms(self) -> float:
        return (time.monotonic() - self.t0) * 1000

    def _notify(self) -> None:
        self._changed.unpark_all()
        self._refresh()

    def _refresh(self) -> None:
        states = [p.state for p in self.peers]
        running = sum(1 for p in self.peers if p.peer_id is not None and p.alive)
        finished, failed = states.count(PeerState.FINISHED), states.count(PeerState.FAILED)
        text = f"up: {running}/{self.config.peers} running, {finished} finished, {failed} failed"
        last = next((p.summary for p in reversed(self.peers) if p.summary and p.ok), None)
        if last:
            text += f" | {last}"
        self.display.status(text)

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Each peer is single-threaded: numpy's BLAS thread pools only cost start-up time.
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, "1")
        return env

    def _verbose(self, who: Callable[[], str]) -> Callable[[str], None] | None:
        """With -v, a printer of ``who()``'s log lines."""
        if not self.config.verbose:
            return None
        return lambda line: self.display.line(f"{who()}: {line}")

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.park()

    # -- the daemon -------------------------------------------------------------------------

    async def _start_daemon(self, supervisor: Supervisor) -> DaemonProcess:
        argv = daemon_command(self.socket_path, self.shm_name, self.config.vectors,
                              self.config.size)  # fmt: skip
        daemon = DaemonProcess(argv, self.socket_path, self.shm_name, self.config.vectors)
        daemon.on_log = self._verbose(lambda: "daemon")
        await supervisor.start(daemon, env=self._child_env(), notify=True, process_group=True)
        return daemon

    def _daemon_failure(self, daemon: DaemonProcess) -> str:
        if daemon.alive:
            return f"not listening after {DAEMON_READY_TIMEOUT:g} s"
        last = next((x for x in reversed(daemon.log) if x.strip()), "no message")
        return f"{exit_text(daemon.returncode)}: {last.strip()}"

    async def _watch_daemon(self, daemon: DaemonProcess) -> None:
        await daemon.wait_exit(math.inf)
        if not self.stopping and self.daemon_failed is None:
            self.daemon_failed = self._daemon_failure(daemon)
            self._begin_stop()
        self._notify()

    # -- the peers --------------------------------------------------------------------------

    def peer_argv(self) -> list[str]:
        """Every peer's argv (its device gets exactly the daemon's vectors)."""
        return peer_command(self.socket_path, self.config.plugin, self.config.plugin_args,
                            vectors=self.config.vectors)  # fmt: skip

    async def _start_peer(self, index: int, supervisor: Supervisor, nursery: trio.Nursery) -> None:
        peer = Peer(self.peer_argv(), index)
        peer.on_event = lambda event: self._on_peer_event(peer, event)
        peer.on_log = self._verbose(lambda: peer.name)
        started = False
        if self.forkserver is not None:
            try:  # what follows "python -m peers"
                pid, stdout, stderr = await self.forkserver.spawn(peer.argv[1 + len(PEER_MODULE) :])
            except ForkServerError as exc:
                self.display.line(f"fork server: {exc}; starting the peer with exec")
            else:
                supervisor.adopt(peer, pid, stdout, stderr)
                self.forkserver.register(peer)
                started = True
        if not started:
            await supervisor.start(peer, env=self._child_env(), events=True, process_group=True)
        if self.stopping:
            peer.stopping()
        self.peers.append(peer)
        nursery.start_soon(self._watch_peer, peer)
        self._notify()

    def _on_peer_event(self, peer: Peer, line: dict[str, Any]) -> None:
        try:
            event = report.decode(line)
        except report.ReportError:  # not the schema: keep it as something it said
            event = report.PluginEvent("stdout", {"text": json.dumps(line)})
        peer.reported(event)
        verbose = self.config.verbose
        match event:
            case report.Running():
                if not self.display.live or verbose:  # the progress line says it
                    self.display.line(f"{peer.name} running (pid {peer.pid})")
                self._count_running()
            case report.Finished():
                text = f": {peer.summary}" if peer.summary else ""
                self.display.line(f"{peer.name} {'finished' if peer.ok else 'failed'}{text}")
            case report.Log(message=message) if verbose:
                self.display.line(f"{peer.name}: {message}")
            case report.PeerJoined(peer_id=other) | report.PeerLeft(peer_id=other) if verbose:
                self.display.line(f"{peer.name}: {type(event).KIND} {other}")
        self._notify()

    def _count_running(self) -> None:
        running = sum(1 for p in self.peers if p.peer_id is not None)
        if running == self.config.peers and self.all_running_ms is None:
            self.all_running_ms = self._ms()
            self.display.result(
                f"all {self.config.peers} peers running after {self.all_running_ms:.0f} ms"
            )

    async def _watch_peer(self, peer: Peer) -> None:
        await peer.wait_exit(math.inf)
        self._settle(peer)

    def _settle(self, peer: Peer) -> None:
        """It has exited: decide its end state (once); a failure stops the run."""
        if peer.state.ended:
            return
        if peer.exited() is PeerState.FAILED:
            self.failed.append(peer)
            self.display.line(
                f"{peer.name} (pid {peer.pid}) failed, {exit_text(peer.returncode)}: "
                f"{peer.reason()}"
            )
            self._begin_stop()
        self._notify()

    # -- signals ----------------------------------------------------------------------------

    async def _watch_signals(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if self.stop_signal is None:
                    self.stop_signal = signum
                    self._begin_stop()
                    self._run_scope.cancel()
                    self.display.line(
                        f"{signal.Signals(signum).name} received, stopping (again to kill at once)"
                    )
                else:
                    self.kill_now = True
                    for child in self._children():
                        child.kill()
                self._notify()

    def _begin_stop(self) -> None:
        """From now on a peer that goes down is a consequence of stopping, not a failure."""
        self.stopping = True
        for peer in self.peers:
            peer.stopping()

    def _children(self) -> list[Child]:
        return [*self.peers, *([self.daemon] if self.daemon else [])]

    # -- the whole run ----------------------------------------------------------------------

    def _should_stop(self) -> bool:
        if self.stopping:
            return True
        return len(self.peers) == self.config.peers and all(p.state.ended for p in self.peers)

    async def _stop_all(self) -> None:
        self._begin_stop()
        grace = 0 if self.kill_now else STOP_GRACE
        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                nursery.start_soon(peer.stop, grace)
        if self.forkserver is not None:
            await self.forkserver.aclose()
        if self.daemon is not None:
            await self.daemon.stop(grace)

    async def run(self) -> int:
        """Run to the end; return the exit status."""
        async with open_supervisor() as supervisor, trio.open_nursery() as nursery:
            await nursery.start(self._watch_signals)
            try:
                with self._run_scope:
                    await self._run(supervisor, nursery)
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_all()
                    self._cleanup_files()
                    with trio.move_on_after(STOP_GRACE):  # their last words, then settle
                        await self._wait_until(lambda: all(p.silent for p in self.peers))
                    for peer in self.peers:
                        self._settle(peer)
                nursery.cancel_scope.cancel()
        return self._finish()

    async def _run(self, supervisor: Supervisor, nursery: trio.Nursery) -> None:
        config = self.config
        if not self.socket_path:
            self.own_dir = tempfile.mkdtemp(prefix="ivshmem-up-")
            self.socket_path = os.path.join(self.own_dir, "ivshmem.sock")
        if config.fork_server:  # its imports overlap with the daemon's start-up
            self.forkserver = await ForkServer.start(supervisor, config.plugin, self._child_env())
            nursery.start_soon(self.forkserver.run)
        self.daemon = daemon = await self._start_daemon(supervisor)
        nursery.start_soon(self._watch_daemon, daemon)
        if self.forkserver is not None:  # should we die, it stops the daemon and cleans up
            await self.forkserver.send(
                {"guard": daemon.pid, "dir": self.own_dir, "shm": self.shm_name}
            )
        try:
            await daemon.wait_ready(DAEMON_READY_TIMEOUT)
        except ChildError:
            self.daemon_failed = self.daemon_failed or self._daemon_failure(daemon)
            return
        size = f", {config.size} bytes" if config.size else ""
        self.display.line(
            f"daemon (pid {daemon.pid}) listening on {self.socket_path} "
            f"(shm {self.shm_name}{size}, {config.vectors} vectors) after {self._ms():.0f} ms; "
            f"starting {config.peers} peers running {config.plugin}"
        )
        if self.forkserver is not None:
            await self._wait_fork_server()
        async with trio.open_nursery() as starting:
            for index in range(config.peers):
                starting.start_soon(self._start_peer, index, supervisor, nursery)
        await self._wait_until(self._should_stop)
        if config.keep and not self.stopping:
            self.kept = True
            self._report_peers_done()
            self.display.line(
                f"--keep: the daemon stays up on {self.socket_path} (shm {self.shm_name}); "
                "Ctrl-C to stop it"
            )
            await self._wait_until(lambda: self.daemon_failed is not None)

    async def _wait_fork_server(self) -> None:
        assert self.forkserver is not None
        with trio.move_on_after(DAEMON_READY_TIMEOUT):
            await self.forkserver.ready.wait()
        if self.forkserver.gone or not self.forkserver.ready.is_set():
            why = next(reversed(self.forkserver.child.log), "no message")
            self.display.line(f"the fork server did not start ({why}); starting peers with exec")
            await self.forkserver.aclose()
            self.forkserver = None
        elif not self.display.live or self.config.verbose:
            self.display.line(
                f"fork server (pid {self.forkserver.child.pid}) ready after {self._ms():.0f} ms"
            )

    def _report_peers_done(self) -> None:
        ok = sum(1 for p in self.peers if p.state is PeerState.FINISHED)
        self.display.line(f"{ok} of {self.config.peers} peers finished ok")

    def _finish(self) -> int:
        self.display.close()
        for peer in self.failed:
            self.display.line(
                f"FAILED: {peer.name} (pid {peer.pid}), {exit_text(peer.returncode)}: "
                f"{peer.reason()}"
            )
        if self.daemon_failed is not None:
            self.display.line(f"FAILED: the daemon stopped unexpectedly, {self.daemon_failed}")
        summaries = sorted(
            (p for p in self.peers if p.summary and p.ok),
            key=lambda p: (p.peer_id is None, p.peer_id or 0, p.index),
        )
        elapsed = self._ms() / 1000
        if self.failed or self.daemon_failed is not None:
            status = EXIT_FAILED
            self.display.line(f"stopped after {elapsed:.2f} s with failures")
        elif self.stop_signal is not None and not self.kept:
            status = signal_exit(self.stop_signal)
            self.display.line(
                f"stopped by {signal.Signals(self.stop_signal).name} after {elapsed:.2f} s"
            )
        else:
            status = EXIT_OK
            if not self.config.keep:
                self._report_peers_done()
            self.display.line(f"done in {elapsed:.2f} s; daemon stopped, shm unlinked")
        for peer in summaries:
            assert peer.summary is not None
            self.display.result(peer.summary)
        return status

    def _cleanup_files(self) -> None:
        """Remove what a killed daemon may have left: the socket (directory) and the shm."""
        if self.own_dir is not None:
            shutil.rmtree(self.own_dir, ignore_errors=True)
        elif self.socket_path:
            for path in (self.socket_path, self.socket_path + ".ctl", self.socket_path + ".events"):
                try:
                    if not os.path.isdir(path):
                        os.unlink(path)
                except FileNotFoundError:
                    pass
        unlink_posix_shm(self.shm_name)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_up(args: argparse.Namespace) -> int:
    """Run ``up`` with the options :func:`add_up_arguments` parsed; return the exit status."""
    try:
        config = parse_up_config(args)
    except UsageError as exc:
        if str(exc):
            print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if config is None:
        return EXIT_OK
    display = Display(sys.stdout, sys.stderr)
    launcher = Launcher(config, display)
    try:
        return trio.run(launcher.run)
    except KeyboardInterrupt:  # a SIGINT before the signal receiver was installed
        return signal_exit(signal.SIGINT)
    except (OSError, BaseExceptionGroup) as exc:  # the children are stopped by now
        problem = _os_error(exc)
        if problem is None:
            raise
        display.line(f"FAILED: {problem}")
        return EXIT_FAILED
    finally:
        display.close()


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (e.g. a process that could not be started), if that is
    what it is: one clear line for the user rather than a traceback."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m peers.launcher up ...``: the same as ``ivshmemctl up ...``."""
    parser = argparse.ArgumentParser(prog="python -m peers.launcher")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_up_command(subparsers, argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
