"""``ivshmemctl up``: one command that runs daemons and their peers, and stops them all cleanly.

    ivshmemctl up --peers N [--vectors V] [--size S] [-S PATH] [--shm-name NAME]
                  [--keep] [--timeout S] [--no-fork-server] [-v] --plugin NAME [PLUGIN OPTIONS]
    ivshmemctl up -f topology.toml [--keep] [--timeout S] [--no-fork-server] [-v]

Everything after ``--plugin NAME`` is the plugin's (:mod:`peers.cmdline`). The command line
describes one region (a daemon and N peers of one plugin); a topology file describes any
number of regions, each with its groups of peers (:mod:`peers.topology`).

What it does, in order:

1. validates everything up front (the plugins exist and accept their options, exactly as
   ``ivshmem-peer`` would parse them; a plugin that pairs its peers gets an even number
   of them); a mistake exits 2, one line per mistake, before anything is started;
2. starts one ``ivshmemd`` per region in the foreground as a child, on a unique socket in a
   private temporary directory and a unique POSIX shm name (unless given), and waits for
   its ``READY=1`` (a supervised child, :mod:`ivshmemd.supervise`);
3. starts the peers at once (``ivshmem-peer --report json``) and follows each one's events
   (:mod:`peers.report`) through its state machine (:mod:`peers.peerstate`); prints ``all N
   peers running after X ms`` (counted from the command's start) once every peer is up.
   Peers are forked from a fork server (:mod:`peers.forkserver`) that has imported the
   runtime and the plugins once; ``--no-fork-server`` execs each one instead;
4. shows what is happening: a live line on a terminal (peers running, finished, failed, the
   time so far and the work's progress as the plugins report it), plain lines otherwise;
5. ends when every peer has exited, when a peer fails (the others are stopped), when a
   daemon dies, after ``--timeout`` seconds, or on SIGINT/SIGTERM (a second one kills
   instead of waiting). Stopping is always the same: SIGTERM to the live peers, reap them
   (SIGKILL after a grace period), SIGTERM to the daemons, reap them, remove the private
   socket directory and unlink the shm. A stop that finds peers still running names each
   one and what it was waiting for. With ``--keep`` the daemons stay up after the peers are
   done, until Ctrl-C. Should the launcher itself be killed outright, the fork server
   notices and stops the peers and the daemons, and removes the socket directory and the
   shm.

Output: progress and per-peer lines on stderr; on stdout the ``all N peers running`` line
and, at the very end, every plugin's summary line (once each) in peer-id order. Exit status:
0 when every peer finished ok, 1 when a peer (or a daemon) failed or the timeout passed
(each failed peer is named with its id, pid, exit status and last error line), 2 on bad
usage, 130/143 when stopped by SIGINT/SIGTERM with no failure (0 with ``--keep`` once every
peer had finished ok).

Children run in their own process groups, so a Ctrl-C on the terminal reaches only the
launcher, which then stops them in the right order (peers before the daemons, so that no
peer mistakes the shutdown for a lost daemon). Nothing here sleeps to synchronise: every
wait is on a child's output, its exit, or a signal (the live line is redrawn on a clock).
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
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from ivshmemd.argtypes import int_in, seconds, size
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
from ivshmemd.wording import plural

from . import report
from .cmdline import UsageError, format_help, split_at_plugin
from .display import Display
from .forkserver import ForkServer, ForkServerError
from .harness import peer_command
from .peerstate import Peer, PeerState
from .plugin import PluginError, load_plugin
from .topology import (
    MAX_PEERS,
    PeerGroup,
    RegionSpec,
    Topology,
    TopologyError,
    check_plugins,
    load_topology,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UpConfig",
    "UsageError",
    "build_up_parser",
    "main",
    "parse_up_argv",
    "register_up_command",
    "run_up",
]

#: How long a daemon (and the fork server) may take to be ready.
DAEMON_READY_TIMEOUT: Final = 30.0
PROG: Final = "ivshmemctl up"
#: Seconds between redraws of the live line (its clock and the work's progress).
TICK: Final = 0.5
#: The one region of a command-line ``up``.
CLI_REGION: Final = "main"
#: Options that describe the one region of the command line; a topology file says them.
_REGION_OPTIONS: Final = ("peers", "vectors", "size", "socket", "shm_name")


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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_up_parser() -> argparse.ArgumentParser:
    """The parser of ``up``'s own options (what comes before ``--plugin NAME``)."""
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} --peers N [LAUNCHER OPTIONS] --plugin NAME [PLUGIN OPTIONS]\n"
        f"       {PROG} -f TOPOLOGY.toml [--keep] [--timeout S] [--no-fork-server] [-v]",
        description="Start an ivshmemd and N peer processes running a plugin (or the daemons "
        "and peers a topology file describes), show their progress, print each plugin's "
        "summary, and stop everything cleanly when the plugins finish, on --timeout or on "
        "Ctrl-C.",
        epilog="Everything after --plugin NAME is the plugin's ('--plugin NAME --help' lists "
        "its options); launcher options go before it. Exit status: 0 all peers ok, 1 a peer "
        "or a daemon failed or the timeout passed, 2 bad usage, 130/143 stopped by "
        "SIGINT/SIGTERM.",
        add_help=False,
        allow_abbrev=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument(
        "--peers", type=int_in(1, MAX_PEERS), metavar="N", help="how many peer processes to run"
    )
    parser.add_argument(
        "--vectors",
        type=int_in(0, MAX_VECTORS),
        metavar="V",
        default=None,
        help="interrupt vectors per peer, the daemon's -n (default 1)",
    )
    parser.add_argument(
        "--size",
        type=size,
        metavar="S",
        help="shared memory size, the daemon's -l (default: the daemon's, 4M)",
    )
    parser.add_argument(
        "-S",
        "--socket",
        metavar="PATH",
        help="the daemon's socket (default: a unique one in a private temporary directory)",
    )
    parser.add_argument(
        "--shm-name", metavar="NAME", help="the POSIX shm name (default: a unique one)"
    )
    parser.add_argument(
        "-f",
        "--file",
        metavar="TOPOLOGY",
        help="run the regions (daemons) and peers this TOML file describes "
        "(instead of --peers/--plugin; see docs/topology.md)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the daemons running after the peers are done, until Ctrl-C",
    )
    parser.add_argument(
        "--timeout",
        type=seconds(),
        metavar="S",
        help="stop everything after S seconds, naming the peers still "
        "running and what they wait for (exit status 1)",
    )
    parser.add_argument(
        "--no-fork-server",
        dest="fork_server",
        action="store_false",
        help="start every peer as a fresh interpreter instead of forking it "
        "from one that has already imported the peer runtime (slower "
        "start-up)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the daemons' logs, every peer's log lines and a failing plugin's traceback",
    )
    parser.add_argument(
        "--plugin",
        metavar="NAME",
        help="the plugin every peer runs; every option after it is the plugin's",
    )
    return parser


def register_up_command(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """``ivshmemctl`` subcommand provider, registered in the entry-point group
    ``ivshmemctl.commands`` (see ``ivshmemd.ctl.COMMANDS_GROUP``).

    ``up`` reads its arguments itself (:func:`parse_up_argv`): the subparser takes them all,
    as they are (no character starts an option for it), so that argparse never splits the
    plugin's options from the launcher's by name."""
    del common  # -S means the socket to create here, not one to talk to
    parser = subparsers.add_parser(
        "up",
        help="run a daemon and N peers running a plugin (or a topology file); stop them all "
        "when done or on Ctrl-C",
        add_help=False,
        prefix_chars="\0",
    )
    parser.add_argument("up_argv", nargs=argparse.REMAINDER)
    parser.set_defaults(run=run_up)


@dataclass(frozen=True)
class UpConfig:
    """Everything ``up`` needs, validated."""

    topology: Topology
    keep: bool = False
    verbose: bool = False
    fork_server: bool = True
    timeout: float | None = None


def parse_up_argv(argv: Sequence[str], socket: str | None = None) -> UpConfig | None:
    """``up``'s arguments as an :class:`UpConfig`; None when help was asked for (and
    printed). ``socket`` is an ``ivshmemctl -S`` given before ``up``. Raises
    :class:`UsageError` (or :class:`~peers.topology.TopologyError`, one line per
    problem)."""
    parser = build_up_parser()
    line = split_at_plugin(argv, parser)
    try:
        plugin_cls = load_plugin(line.plugin) if line.plugin else None
    except PluginError as exc:
        raise UsageError(str(exc)) from None
    if line.help:
        print(format_help(PROG, parser, line.plugin, plugin_cls), end="")
        return None
    args = parser.parse_args(line.own)
    args.socket = args.socket or socket
    if args.file is not None:
        values = {name: getattr(args, name) for name in _REGION_OPTIONS}
        given = [name for name, value in {**values, "plugin": line.plugin}.items() if value]
        if given:
            option = "--" + given[0].replace("_", "-")
            raise UsageError(
                f"{option} cannot be combined with -f: the topology file "
                "describes the regions and their peers"
            )
        topology = load_topology(args.file)
    else:
        if line.plugin is None:
            raise UsageError(
                "--plugin NAME is required (ivshmem-peer --list-plugins lists them)"
                " unless -f TOPOLOGY.toml"
            )
        if args.peers is None:
            raise UsageError("--peers N is required")
        group = PeerGroup(line.plugin, args.peers, tuple(line.plugin_args))
        region = RegionSpec(
            CLI_REGION,
            (group,),
            args.size,
            1 if args.vectors is None else args.vectors,
            args.shm_name,
            args.socket,
        )
        topology = Topology((region,))
        try:
            check_plugins(topology, PROG, command=parser, count_option="--peers")
        except TopologyError as exc:
            raise UsageError(exc.problems[0]) from None
    return UpConfig(
        topology,
        keep=args.keep,
        verbose=args.verbose,
        fork_server=args.fork_server,
        timeout=args.timeout,
    )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class RegionRun:
    """One region of the run: its daemon, where it listens, its peers."""

    spec: RegionSpec
    socket_path: str
    shm_name: str
    label: str  # how its peers are named ("" for a lone region)
    daemon: DaemonProcess | None = None
    peers: list[Peer] = field(default_factory=list)


class Launcher:
    """Runs one ``up``: the daemons, the peers, the display, the shutdown."""

    def __init__(self, config: UpConfig, display: Display) -> None:
        self.config = config
        self.display = display
        self.t0 = _STARTED
        self.own_dir: str | None = None
        self.expected = config.topology.peers
        several = len(config.topology.regions) > 1
        self.regions = [
            RegionRun(
                spec,
                spec.socket or "",
                spec.shm_name or unique_name("ivshmem-up"),
                spec.name if several else "",
            )
            for spec in config.topology.regions
        ]
        self.supervisor: Supervisor | None = None
        self.forkserver: ForkServer | None = None
        self.kept = False  # --keep: the peers are done, the daemons stay up until a signal
        self.peers: list[Peer] = []
        self.failed: list[Peer] = []  # in the order they failed: the first is the cause
        self.interrupted: list[tuple[Peer, str]] = []  # running when the stop began: doing
        self.all_running_ms: float | None = None
        self.stopping = False
        self.stop_signal: int | None = None
        self.timed_out = False
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
        text = (
            f"up: {running}/{self.expected} running, {finished} finished, {failed} failed, "
            f"{self._ms() / 1000:.1f} s"
        )
        work = self._progress()
        if work:
            text += f" | {work}"
        self.display.status(text)

    def _progress(self) -> str:
        """The work's progress as the plugins report it, summed by unit."""
        totals: dict[str, list[int]] = {}
        for peer in self.peers:
            if peer.progress is not None:
                done_total = totals.setdefault(peer.progress.unit, [0, 0])
                done_total[0] += peer.progress.done
                done_total[1] += peer.progress.total
        return ", ".join(
            f"{100 * done // max(total, 1)}% ({done}/{total} {unit})"
            for unit, (done, total) in totals.items()
        )

    async def _tick(self) -> None:
        """Redraw the live line on a clock (elapsed time, progress)."""
        while True:
            await trio.sleep(TICK)
            self._refresh()

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

    # -- the daemons ------------------------------------------------------------------------

    async def _start_daemon(self, supervisor: Supervisor, region: RegionRun) -> DaemonProcess:
        spec = region.spec
        argv = daemon_command(region.socket_path, region.shm_name, spec.vectors, spec.size)
        daemon = DaemonProcess(argv, region.socket_path, region.shm_name, spec.vectors)
        name = f"{region.label} daemon" if region.label else "daemon"
        daemon.on_log = self._verbose(lambda: name)
        await supervisor.start(daemon, env=self._child_env(), notify=True, process_group=True)
        return daemon

    def _daemon_failure(self, daemon: DaemonProcess) -> str:
        if daemon.alive:
            return f"not listening after {DAEMON_READY_TIMEOUT:g} s"
        last = next((x for x in reversed(daemon.log) if x.strip()), "no message")
        return f"{exit_text(daemon.returncode)}: {last.strip()}"

    async def _watch_daemon(self, region: RegionRun, daemon: DaemonProcess) -> None:
        await daemon.wait_exit(math.inf)
        if not self.stopping and self.daemon_failed is None:
            where = f" of region {region.spec.name}" if region.label else ""
            self.daemon_failed = f"the daemon{where} stopped unexpectedly, " + (
                self._daemon_failure(daemon)
            )
            self._begin_stop()
        self._notify()

    async def _open_region(
        self, supervisor: Supervisor, nursery: trio.Nursery, region: RegionRun
    ) -> bool:
        """Start the region's daemon and wait until it listens; False if it failed."""
        region.daemon = daemon = await self._start_daemon(supervisor, region)
        nursery.start_soon(self._watch_daemon, region, daemon)
        if self.forkserver is not None:  # should we die, it stops the daemon and cleans up
            first = region is self.regions[0]
            await self.forkserver.send(
                {
                    "guard": daemon.pid,
                    "dir": self.own_dir if first else None,
                    "shm": region.shm_name,
                }
            )
        try:
            await daemon.wait_ready(DAEMON_READY_TIMEOUT)
        except ChildError:
            where = f" of region {region.spec.name}" if region.label else ""
            self.daemon_failed = self.daemon_failed or (
                f"the daemon{where} did not start, {self._daemon_failure(daemon)}"
            )
            return False
        spec = region.spec
        size = f", {spec.size} bytes" if spec.size else ""
        what = ", ".join(f"{plural(g.count, 'peer')} running {g.plugin}" for g in spec.groups)
        where = f"region {spec.name}: " if region.label else ""
        self.display.line(
            f"{where}daemon (pid {daemon.pid}) listening on {region.socket_path} "
            f"(shm {region.shm_name}{size}, {plural(spec.vectors, 'vector')}) after "
            f"{self._ms():.0f} ms; starting {what}"
        )
        return True

    # -- the peers --------------------------------------------------------------------------

    def peer_argv(self, region: RegionRun, group: PeerGroup) -> list[str]:
        """A peer's argv (its device gets exactly the daemon's vectors)."""
        return peer_command(
            region.socket_path,
            group.plugin,
            group.args,
            vectors=region.spec.vectors,
            peer_args=["--verbose"] if self.config.verbose else [],
        )

    async def _start_peer(
        self, region: RegionRun, group: PeerGroup, supervisor: Supervisor, nursery: trio.Nursery
    ) -> None:
        peer = Peer(self.peer_argv(region, group), len(self.peers), region.label)
        self.peers.append(peer)
        region.peers.append(peer)
        peer.on_event = lambda event: self._on_peer_event(peer, event)
        peer.on_log = self._verbose(lambda: peer.name)
        started = False
        if self.forkserver is not None:
            try:
                await self.forkserver.start_peer(supervisor, peer)
                started = True
            except ForkServerError as exc:
                self.display.line(f"fork server: {exc}; starting the peer with exec")
        if not started:
            await supervisor.start(peer, env=self._child_env(), events=True, process_group=True)
        if self.stopping:
            peer.stopping()
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
                if not self.display.live or verbose:  # the live line says it
                    self.display.line(f"{peer.name} running (pid {peer.pid})")
                self._count_running()
            case report.Finished(ok=True):
                self.display.line(f"{peer.name} finished")  # its summary comes at the end
            case report.Log(message=message) if verbose:
                self.display.line(f"{peer.name}: {message}")
            case report.Waiting(what=what) if verbose:
                self.display.line(f"{peer.name} waits for {what}")
            case report.PeerJoined(peer_id=other) | report.PeerLeft(peer_id=other) if verbose:
                self.display.line(f"{peer.name}: {type(event).KIND} {other}")
        self._notify()

    def _count_running(self) -> None:
        running = sum(1 for p in self.peers if p.peer_id is not None)
        if running == self.expected and self.all_running_ms is None:
            self.all_running_ms = self._ms()
            self.display.result(
                f"all {plural(self.expected, 'peer')} running after {self.all_running_ms:.0f} ms"
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
            others = "; stopping the others" if not self.stopping else ""
            self.display.line(
                f"{peer.name} (pid {peer.pid}) failed, {exit_text(peer.returncode)}{others}"
            )
            self._begin_stop()
        self._notify()

    # -- signals and the clock --------------------------------------------------------------

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

    async def _watch_clock(self, timeout: float) -> None:
        await trio.sleep(max(0.0, timeout - self._ms() / 1000))  # from the command's start
        if not self.stopping or self.kept:
            self.timed_out = True
            self._begin_stop()
            self._run_scope.cancel()
            self.display.line(f"--timeout {timeout:g} s passed, stopping")
            self._notify()

    def _begin_stop(self) -> None:
        """From now on a peer that goes down is a consequence of stopping, not a failure.
        Peers still running are remembered with what they were doing."""
        if not self.stopping:
            self.interrupted = [(p, p.doing()) for p in self.peers if p.state.working]
        self.stopping = True
        for peer in self.peers:
            peer.stopping()

    def _children(self) -> list[Child]:
        daemons: list[Child] = [r.daemon for r in self.regions if r.daemon is not None]
        return [*self.peers, *daemons]

    # -- the whole run ----------------------------------------------------------------------

    def _should_stop(self) -> bool:
        if self.stopping:
            return True
        return len(self.peers) == self.expected and all(p.state.ended for p in self.peers)

    async def _stop_all(self) -> None:
        self._begin_stop()
        grace = 0 if self.kill_now else STOP_GRACE
        async with trio.open_nursery() as nursery:
            for peer in self.peers:
                nursery.start_soon(peer.stop, grace)
        if self.forkserver is not None:
            await self.forkserver.aclose()
        async with trio.open_nursery() as nursery:
            for region in self.regions:
                if region.daemon is not None:
                    nursery.start_soon(region.daemon.stop, grace)

    async def run(self) -> int:
        """Run to the end; return the exit status."""
        async with open_supervisor() as supervisor, trio.open_nursery() as nursery:
            await nursery.start(self._watch_signals)
            if self.config.timeout is not None:
                nursery.start_soon(self._watch_clock, self.config.timeout)
            if self.display.live:
                nursery.start_soon(self._tick)
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

    def _place_sockets(self) -> None:
        """A socket path for every region that has none: in one private directory."""
        for region in self.regions:
            if not region.socket_path:
                if self.own_dir is None:
                    self.own_dir = tempfile.mkdtemp(prefix="ivshmem-up-")
                name = f"{region.spec.name}.sock" if region.label else "ivshmem.sock"
                region.socket_path = os.path.join(self.own_dir, name)

    async def _run(self, supervisor: Supervisor, nursery: trio.Nursery) -> None:
        config = self.config
        self._place_sockets()
        if config.fork_server:  # its imports overlap with the daemons' start-up
            self.forkserver = await ForkServer.start(
                supervisor, config.topology.plugins, self._child_env()
            )
            nursery.start_soon(self.forkserver.run)
        for region in self.regions:
            if not await self._open_region(supervisor, nursery, region):
                return
        if self.forkserver is not None:
            await self._wait_fork_server()
        async with trio.open_nursery() as starting:
            for region in self.regions:
                for group in region.spec.groups:
                    for _ in range(group.count):
                        starting.start_soon(self._start_peer, region, group, supervisor, nursery)
        await self._wait_until(self._should_stop)
        if config.keep and not self.stopping:
            self.kept = True
            self._report_peers_done()
            sockets = ", ".join(r.socket_path for r in self.regions)
            shms = ", ".join(r.shm_name for r in self.regions)
            self.display.line(
                f"--keep: the daemon{'s stay' if len(self.regions) > 1 else ' stays'} up on "
                f"{sockets} (shm {shms}); Ctrl-C to stop"
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
        self.display.line(f"{ok} of {plural(self.expected, 'peer')} finished ok")

    def _finish(self) -> int:
        self.display.close()
        for peer in self.failed:
            self.display.line(
                f"FAILED: {peer.name} (pid {peer.pid}), {exit_text(peer.returncode)}: "
                f"{peer.reason()}"
            )
        if self.daemon_failed is not None:
            self.display.line(f"FAILED: {self.daemon_failed}")
        elapsed = self._ms() / 1000
        if self.timed_out and not self.kept:
            self.display.line(f"FAILED: timed out after {self.config.timeout:g} s")
        for peer, doing in self.interrupted:
            if peer not in self.failed:
                self.display.line(
                    f"still running when stopped: {peer.name} (pid {peer.pid}), {doing}"
                )
        summaries = sorted(
            (p for p in self.peers if p.summary and p.ok),
            key=lambda p: (p.region, p.peer_id is None, p.peer_id or 0, p.index),
        )
        if self.failed or self.daemon_failed is not None or (self.timed_out and not self.kept):
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
            daemons = "daemons" if len(self.regions) > 1 else "daemon"
            self.display.line(f"done in {elapsed:.2f} s; {daemons} stopped, shm unlinked")
        for peer in summaries:
            assert peer.summary is not None
            where = f"{peer.region}: " if peer.region else ""
            self.display.result(where + peer.summary)
        return status

    def _cleanup_files(self) -> None:
        """Remove what a killed daemon may have left: the socket (directory) and the shm."""
        if self.own_dir is not None:
            shutil.rmtree(self.own_dir, ignore_errors=True)
        for region in self.regions:
            if region.spec.socket:  # given by the user: only the files a daemon makes
                for path in (
                    region.socket_path,
                    region.socket_path + ".ctl",
                    region.socket_path + ".events",
                ):
                    try:
                        if not os.path.isdir(path):
                            os.unlink(path)
                    except FileNotFoundError:
                        pass
            unlink_posix_shm(region.shm_name)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_up(args: argparse.Namespace) -> int:
    """Run ``up`` with what :func:`register_up_command` parsed; return the exit status."""
    try:
        config = parse_up_argv(args.up_argv, getattr(args, "socket", None))
    except UsageError as exc:
        print(f"{PROG}: {exc}\nTry '{PROG} --help'.", file=sys.stderr)
        return EXIT_USAGE
    except TopologyError as exc:
        for problem in exc.problems:
            print(f"{PROG}: {problem}", file=sys.stderr)
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
        failure = _os_error(exc)
        if failure is None:
            raise
        display.line(f"FAILED: {failure}")
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
    parser.add_argument("-S", "--socket", default=None, help=argparse.SUPPRESS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_up_command(subparsers, argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
