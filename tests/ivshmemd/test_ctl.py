"""``ivshmemctl`` end to end against the real control server (serve_control in a helper
thread with its own trio loop, real zmq sockets on ipc endpoints under a temporary dir)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import zmq

from ivshmemd import ctl, exitcodes
from ivshmemd.control.schema import (
    EVENTS_WELCOME,
    Event,
    default_control_endpoint,
    default_events_endpoint,
)
from ivshmemd.control.server import ControlEndpoints, EventPublisher, serve_control
from ivshmemd.supervise import SyncChild, SyncSupervisor
from tests.asuser import NOBODY, run_as
from tests.controlview import FakeDaemon

T = TypeVar("T")
TIMEOUT = 30.0
CTL = [sys.executable, "-m", "ivshmemd.ctl"]


class ServerThread:
    """serve_control running in its own thread and trio loop, like a daemon would."""

    def __init__(self, sock_path: Path, *, socket_mode: int = 0o600) -> None:
        self.publisher = EventPublisher()
        self.daemon = FakeDaemon(owner_uid=os.getuid(), publisher=self.publisher)
        self.sock_path = sock_path
        self.socket_mode = socket_mode
        self.endpoints: ControlEndpoints | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self.endpoints = await nursery.start(
                lambda task_status: serve_control(
                    self.daemon,
                    default_control_endpoint(self.sock_path),
                    default_events_endpoint(self.sock_path),
                    self.publisher,
                    socket_mode=self.socket_mode,
                    task_status=task_status,
                )
            )
            self._ready.set()

    def start(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "control server did not start"
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the server's trio thread (the daemon's registry lives there)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._scope is not None and self._thread.is_alive():
            scope = self._scope
            trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
        self._thread.join(TIMEOUT)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    thread = ServerThread(tmp_path / "d.sock").start()
    try:
        yield thread
    finally:
        thread.stop()


def run_ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_human_and_json(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    server.call(server.daemon.join)
    code, out, err = run_ctl(capsys, "-S", str(server.sock_path), "status")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "ivshmemd 0.1.0, up 12.5s"
    assert "shm      ivshmem (/dev/shm/ivshmem), 4 MiB" in lines
    assert "peers    1" in lines
    code, out, _ = run_ctl(capsys, "-S", str(server.sock_path), "status", "--json")
    assert code == 0
    assert json.loads(out) == server.call(server.daemon.status)


def test_peers_table(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(capsys, "-S", str(server.sock_path), "peers")
    assert (code, out) == (0, "no peers connected\n")
    for _ in range(3):
        server.call(server.daemon.join)
    code, out, _ = run_ctl(capsys, "--json", "-S", str(server.sock_path), "peers")
    assert [p["id"] for p in json.loads(out)] == [0, 1, 2]
    code, out, _ = run_ctl(capsys, "-S", str(server.sock_path), "peers")
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "PID", "UID", "GID", "VECTORS", "CONNECTED"]
    assert [row.split()[:2] for row in rows] == [["0", "4000"], ["1", "4001"], ["2", "4002"]]


def test_kick_and_stats(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert server.endpoints is not None
    peer = server.call(server.daemon.join)
    code, out, _ = run_ctl(capsys, "--control", server.endpoints.control, "kick", str(peer))
    assert (code, out) == (0, f"peer {peer} kicked\n")
    assert server.call(lambda: dict(server.daemon.table)) == {}
    code, out, err = run_ctl(capsys, "--control", server.endpoints.control, "kick", "9")
    assert code == exitcodes.EXIT_FAILED
    assert out == ""
    assert "no peer with id 9 (no-such-peer)" in err
    code, out, _ = run_ctl(capsys, "--control", server.endpoints.control, "stats", "--json")
    assert json.loads(out)["leaves"] == 1
    code, out, _ = run_ctl(capsys, "--control", server.endpoints.control, "stats")
    assert "joins             1" in out.splitlines()


def test_no_daemon_is_a_clear_message(tmp_path: Path) -> None:
    # nothing at the path
    result = subprocess.run(
        [*CTL, "-S", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == exitcodes.EXIT_NO_DAEMON
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    # something at the path that never answers: the timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(f"{tmp_path}/mute.sock.ctl")
        mute.listen()
        result = subprocess.run(
            [*CTL, "-S", str(tmp_path / "mute.sock"), "--timeout", "0.3", "stats"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    assert result.returncode == exitcodes.EXIT_NO_DAEMON
    assert "no daemon answered" in result.stderr and "within 0.3 s" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the client under another uid")
def test_permission_denied_for_another_uid() -> None:
    base = Path(tempfile.mkdtemp(prefix="ivctl-"))
    base.chmod(0o755)
    thread = ServerThread(base / "d.sock").start()
    try:
        # forked from this process (no re-exec: this checkout may be private to root)
        status, output = run_as(NOBODY, ctl.main, ["-S", str(base / "d.sock"), "status"])
    finally:
        thread.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert status == exitcodes.EXIT_NO_DAEMON, output
    assert "permission denied" in output and "mode 0600" in output
    assert "Traceback" not in output


def start_watch(
    supervisor: SyncSupervisor, *argv: str, pub: zmq.Socket[bytes] | None = None
) -> SyncChild:
    """Start `ivshmemctl watch` and wait until it says its subscription is live. With a
    hand-made XPUB ``pub``, receive the subscription on it (that also sends the welcome)."""
    watch = supervisor.start(SyncChild([*CTL, *argv]), events=True)
    if pub is not None:
        assert pub.recv_multipart() == [b"\x01"]
    watch.wait_log("^watching events on")
    return watch


def printed(watch: SyncChild) -> list[str]:
    """What a human-format watch printed on stdout, line by line."""
    return [e["text"] for e in watch.matching(event="stdout")]


def test_watch_prints_events_live(server: ServerThread, supervisor: SyncSupervisor) -> None:
    human = start_watch(supervisor, "-S", str(server.sock_path), "watch", "--count", "2")
    machine = start_watch(
        supervisor, "-S", str(server.sock_path), "watch", "--json", "--count", "4"
    )
    peer = server.call(server.daemon.join)
    # the human watcher prints the join before anything else happens
    first = human.wait_event(event="stdout")["text"]
    assert f"#1      peer-joined peer {peer} (2 vectors)" in first
    server.call(server.daemon.kick, peer)
    server.call(server.daemon.join, 1)
    server.call(server.daemon.leave, peer + 1)
    assert human.wait_exit(TIMEOUT) == 0, human.describe()
    assert "#2      peer-left   peer 0 (2 vectors), kicked" in printed(human)[1]
    assert machine.wait_exit(TIMEOUT) == 0, machine.describe()
    events = list(machine.events)
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e["event"] for e in events] == ["peer-joined", "peer-left"] * 2
    assert events[1]["reason"] == "kicked"
    assert not machine.log_matching("gap")


def test_watch_notes_a_sequence_gap(tmp_path: Path, supervisor: SyncSupervisor) -> None:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = context.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_WELCOME_MSG, EVENTS_WELCOME)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # hand us every subscription, duplicates included
    pub.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
    endpoint = f"ipc://{tmp_path}/x.sock.events"
    pub.bind(endpoint)
    try:
        args = ["--control", "tcp://127.0.0.1:9", "watch", "--events", endpoint]
        watch = start_watch(supervisor, *args, pub=pub)
        watch_json = start_watch(supervisor, "--json", *args, "--count", "3", pub=pub)
        for seq in (1, 2, 5):
            pub.send_multipart(list(Event(seq, "peer-joined", seq, 1, 1.0e9).to_frames()))
        assert watch_json.wait_exit(TIMEOUT) == 0
        assert [e["seq"] for e in watch_json.events] == [1, 2, 5]
        gap = "gap in the event sequence: 2 events missed \\(seq 3..4\\)"
        assert watch_json.log_matching(gap)
        watch.wait_events(3, event="stdout")
        watch.wait_log(gap)
    finally:
        pub.close(linger=0)
        context.term()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["kick", "70000"], ["kick", "x"], [], ["frobnicate"], ["--timeout", "0", "stats"]):
        with pytest.raises(SystemExit) as info:
            ctl.main(argv)
        assert info.value.code == exitcodes.EXIT_USAGE
    capsys.readouterr()


DEMO_PROVIDER = """
def register(subparsers, common):
    from ivshmemd import ctl

    p = subparsers.add_parser("demo", parents=[common])
    p.set_defaults(run=lambda args: 40 + len(ctl.resolve_endpoints(args)))
"""


@pytest.fixture
def installed_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Install (on sys.path, as a distribution) an ``ivshmemctl.commands`` entry point, as
    a third-party package would ship one."""

    def install(target: str) -> None:
        site = tmp_path / "site"
        (site / "ctl_demo_provider").mkdir(parents=True)
        (site / "ctl_demo_provider" / "__init__.py").write_text(DEMO_PROVIDER)
        info = site / "ctl_demo_provider-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ctl-demo-provider\n"
                                       "Version: 1.0\n")  # fmt: skip
        (info / "entry_points.txt").write_text(f"[{ctl.COMMANDS_GROUP}]\ndemo = {target}\n")
        monkeypatch.syspath_prepend(str(site))

    return install


def test_subcommands_are_pluggable(installed_provider: Callable[[str], None]) -> None:
    installed_provider("ctl_demo_provider:register")
    args = ctl.build_parser().parse_args(["demo", "-S", "/run/x.sock"])
    assert ctl.resolve_endpoints(args) == ("ipc:///run/x.sock.ctl", "ipc:///run/x.sock.events")
    assert ctl.main(["demo"]) == 42


def test_up_is_a_subcommand_and_a_broken_provider_spares_the_rest(
    installed_provider: Callable[[str], None], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = ctl.build_parser()
    assert parser.parse_args(["up", "--peers", "2", "--plugin", "ping"]).command == "up"
    installed_provider("no.such.module:register")
    args = ctl.build_parser().parse_args(["-S", "/run/x.sock", "status"])
    assert args.command == "status"
    assert ctl.build_parser().parse_args(["up", "--peers", "1"]).command == "up"
    assert "commands of no.such.module:register unavailable" in capsys.readouterr().err


def test_help_lists_up_and_ctl_never_names_peers() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ivshmemd.ctl", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:1] == ["up"] for line in result.stdout.splitlines()), result.stdout
    assert "peers." not in Path(ctl.__file__).read_text()


def test_every_command_defaults_to_the_daemons_socket() -> None:
    from ivshmemd import cli
    from ivshmemd.protocol import DEFAULT_SOCKET
    from peers import cli as peer_cli

    assert cli.parse_args(["-F"]).socket == DEFAULT_SOCKET
    assert peer_cli.build_parser().parse_args([]).socket == DEFAULT_SOCKET
    assert ctl.resolve_endpoints(ctl.build_parser().parse_args(["status"]))[0] == (
        f"ipc://{DEFAULT_SOCKET}.ctl"
    )


def test_status_says_what_the_replicated_memory_did() -> None:
    from io import StringIO

    from ivshmemd.ctl import format_federation

    federation = {
        "running": True, "identity": "a", "endpoint": "a", "id_range": [0, 9], "members": [],
        "memory": {"holder": True, "diffs_sent": 3, "bytes_sent": 3 * 4096,
                   "diffs_applied": 1, "bytes_applied": 1 << 20, "regions_applied": 1,
                   "rings_held": 2, "logged_peers": [1, 2]},
    }  # fmt: skip
    out = StringIO()
    format_federation(federation, out)
    assert (
        "memory: replicated, holds the region; sent 3 diffs (12.0 KiB), applied 1 diff "
        "(1.0 MiB), 1 region received, 2 rings held for other hosts' diffs, "
        "2 peers reporting written pages"
    ) in out.getvalue()
    out = StringIO()
    format_federation({**federation, "memory": None}, out)
    assert "memory: not replicated (--federation-memory off)" in out.getvalue()
