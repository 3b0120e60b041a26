"""See the fabric: telemetry counts end to end (top --json, Prometheus, the snapshot's SVG
data), the live view in a real terminal (tmux), and a flooding telemetry client bounded."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import zmq
from prometheus_client.parser import text_string_to_metric_families

from ivshmemd.control.client import ControlClient
from ivshmemd.supervise import DaemonProcess
from ivshmemd.telemetry import default_telemetry_endpoints, encode_report
from ivshmemd.telemetryserve import BUCKET_BURST, BUCKET_RATE
from ivshmemd.top import snapshot_data
from peers.pytest_plugin import DaemonFactory, PeerSpawner
from peers.qtest import QEMU_BINARY, QemuIvshmemVm, qemu_available

COUNT = 400
DEADLINE = 30.0


def _ctl(daemon: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ivshmemd.ctl", "-S", daemon.socket_path, *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def _watch(daemon: DaemonProcess, seconds: float = 300.0) -> None:
    """A long lease, so that the peers report (their last report too) while the test runs."""
    client = ControlClient(default_telemetry_endpoints(daemon.socket_path).reports, 5.0)
    try:
        await trio.to_thread.run_sync(
            lambda: client.request("watch", {"interval": 0.1, "seconds": seconds})
        )
    finally:
        client.close()


async def _until(take: Callable[[], Any], ok: Callable[[Any], bool], what: str) -> Any:
    """Poll ``take()`` until ``ok`` holds (a deadline, no fixed sleep)."""
    deadline = trio.current_time() + DEADLINE
    value = None
    while trio.current_time() < deadline:
        value = await trio.to_thread.run_sync(take)
        if ok(value):
            return value
        await trio.sleep(0.05)
    raise AssertionError(f"{what} not seen in {DEADLINE} s; last: {value!r:.3000}")


async def _ping_pair(daemon: DaemonProcess, ivshmem_peers: PeerSpawner) -> None:
    """Peers 0 and 1 ping each other COUNT times (known ids: no directory, no warm-up)."""
    first = await ivshmem_peers(daemon, "ping", ["--partner", "1", "--count", str(COUNT),
                                                 "--warmup", "0"])  # fmt: skip
    second = await ivshmem_peers(daemon, "ping", ["--partner", "0", "--count", str(COUNT),
                                                  "--warmup", "0"])  # fmt: skip
    assert (first.peer_id, second.peer_id) == (0, 1)
    await first.wait_finished()
    await second.wait_finished()


def _top_json(daemon: DaemonProcess) -> dict[str, Any]:
    done = _ctl(daemon, "top", "--once", "--json", "--interval", "0.1")
    assert done.returncode == 0, done.stderr
    snap: dict[str, Any] = json.loads(done.stdout)
    return snap


def _rung(snap: dict[str, Any]) -> dict[tuple[int, int, int], int]:
    return {(d["src"], d["dst"], d["vector"]): d["total"] for d in snap["doorbells"]}


def _both_done(snap: dict[str, Any]) -> bool:
    rung = _rung(snap)
    return rung.get((0, 1, 0), 0) >= COUNT and rung.get((1, 0, 0), 0) >= COUNT


async def test_counts_are_exact_in_top_json_prometheus_and_the_snapshot(
    ivshmem_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, tmp_path: Path
) -> None:
    async with ivshmem_daemon(vectors=2, args=["--metrics", "127.0.0.1:0"]) as daemon:
        line = (await daemon.wait_log(r"Prometheus metrics on http://"))[0]
        url = re.search(r"(http://\S+/metrics)", line)
        assert url is not None
        await _watch(daemon)
        await _ping_pair(daemon, ivshmem_peers)

        # top --once --json: exactly COUNT rings each way, COUNT interrupts each
        snap = await _until(lambda: _top_json(daemon), _both_done, "both peers' counts")
        assert _rung(snap) == {(0, 1, 0): COUNT, (1, 0, 0): COUNT}
        by_id = {p["id"]: p for p in snap["peers"]}
        for peer_id in (0, 1):
            assert by_id[peer_id]["plugin"] == "ping"
            assert by_id[peer_id]["interrupts"] == [COUNT, 0]
            assert by_id[peer_id]["doorbells_total"] == COUNT

        # Prometheus: the same counts, in the standard exposition format
        text = await trio.to_thread.run_sync(
            lambda: urllib.request.urlopen(url.group(1), timeout=10).read().decode()
        )
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("ivshmem_doorbells_total",
                        (("dst", "1"), ("src", "0"), ("vector", "0")))] == COUNT  # fmt: skip
        assert samples[("ivshmem_doorbells_total",
                        (("dst", "0"), ("src", "1"), ("vector", "0")))] == COUNT  # fmt: skip
        assert samples[("ivshmem_interrupts_total", (("peer", "0"), ("vector", "0")))] == COUNT
        assert samples[("ivshmem_joins_total", ())] == 2

        # the snapshot's SVG carries the same data
        svg = tmp_path / "fabric.svg"
        done = await trio.to_thread.run_sync(
            lambda: _ctl(daemon, "snapshot", "--svg", str(svg), "--interval", "0.1")
        )
        assert done.returncode == 0, done.stderr
        picture = svg.read_text()
        assert picture.startswith("<svg")
        assert _rung(snapshot_data(picture)) == {(0, 1, 0): COUNT, (1, 0, 0): COUNT}
        # and an existing file is not overwritten without --force
        again = await trio.to_thread.run_sync(lambda: _ctl(daemon, "snapshot", "--svg", str(svg)))
        assert again.returncode != 0 and "exists" in again.stderr


async def test_metrics_label_peers_up_to_the_cap_and_sum_the_rest(
    ivshmem_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    args = ["--metrics", "127.0.0.1:0", "--metrics-max-peers", "1"]
    async with ivshmem_daemon(vectors=2, args=args) as daemon:
        line = (await daemon.wait_log(r"Prometheus metrics on http://"))[0]
        url = re.search(r"(http://\S+/metrics)", line)
        assert url is not None
        await _watch(daemon)
        await _ping_pair(daemon, ivshmem_peers)
        await _until(lambda: _top_json(daemon), _both_done, "both peers' counts")
        text = await trio.to_thread.run_sync(
            lambda: urllib.request.urlopen(url.group(1), timeout=10).read().decode()
        )
        rings = {
            tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "ivshmem_doorbells_total"
        }
        assert rings == {
            (("dst", "other"), ("src", "0"), ("vector", "0")): COUNT,
            (("dst", "0"), ("src", "other"), ("vector", "0")): COUNT,
        }


async def test_a_peer_that_does_not_report_is_shown_silent_with_the_reason(
    ivshmem_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with ivshmem_daemon(vectors=1) as daemon:
        quiet = await ivshmem_peers(daemon, "ping", ["--partner", "7"],
                                    peer_args=["--no-telemetry"])  # fmt: skip
        snap = await trio.to_thread.run_sync(lambda: _top_json(daemon))
        (row,) = [p for p in snap["peers"] if p["id"] == quiet.peer_id]
        assert row["telemetry"] is False
        assert row["silent"] == "no telemetry (not an ivshmem-emu peer?)"
        done = await trio.to_thread.run_sync(lambda: _ctl(daemon, "top", "--once"))
        assert "no telemetry" in done.stdout


async def test_a_flooding_telemetry_client_is_bounded_and_the_others_go_on(
    ivshmem_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with ivshmem_daemon(vectors=2) as daemon:
        await _watch(daemon)
        endpoints = default_telemetry_endpoints(daemon.socket_path)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 100_000)
        dealer.connect(endpoints.reports)
        report = encode_report({"peer": 900, "pid": os.getpid(), "t": 1.0, "rung": [[0, 0, 1]]})
        sent, started = 5000, time.monotonic()
        try:
            for _ in range(sent):
                dealer.send(report)
            # the flood is cut down to its token bucket, counted, and the plane still serves
            snap = await _until(
                lambda: _top_json(daemon), lambda s: s["telemetry"]["flooded"] > 0, "flood"
            )
            elapsed = time.monotonic() - started
            accepted = snap["telemetry"]["reports"]
            assert accepted <= BUCKET_BURST + BUCKET_RATE * elapsed + 1
            assert snap["telemetry"]["flooded"] + accepted <= sent
            # a report claiming another process's pid is refused
            # (sent again until it gets past the flood's bucket, which refills at its rate:
            # a report the bucket drops is counted as flooded, never looked at)
            forged = encode_report({"peer": 901, "pid": 1, "t": 2.0})

            def forge_and_look() -> dict[str, Any]:
                dealer.send(forged)
                return _top_json(daemon)

            await _until(forge_and_look, lambda s: s["telemetry"]["rejected"] >= 1,
                         "the refused report")  # fmt: skip
            # and real peers still report in full
            await _ping_pair(daemon, ivshmem_peers)
            snap = await _until(lambda: _top_json(daemon), _both_done, "both peers' counts")
            assert _rung(snap)[(0, 1, 0)] == COUNT
        finally:
            dealer.close(linger=0)
            ctx.term()
        assert daemon.returncode is None


@pytest.mark.parametrize("loop", ["--fast-path", "--trio"])
async def test_a_peer_reports_nothing_until_watched_then_the_knock_connects_it(
    ivshmem_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, loop: str
) -> None:
    async with ivshmem_daemon(vectors=1) as daemon:
        peer = await ivshmem_peers(daemon, "monitor", [], peer_args=[loop])

        def zmq_threads() -> int:
            tasks = f"/proc/{peer.pid}/task"
            names = [Path(tasks, tid, "comm").read_text() for tid in os.listdir(tasks)]
            return sum(name.startswith("ZMQbg") for name in names)

        assert zmq_threads() == 0  # nobody watches: no zmq context, no socket, no thread
        snap = await _until(
            lambda: _top_json(daemon),
            lambda s: any(p["id"] == peer.peer_id and p["telemetry"] for p in s["peers"]),
            "the knocked peer's report",
        )
        (row,) = [p for p in snap["peers"] if p["id"] == peer.peer_id]
        assert row["plugin"] == "monitor" and row["pid"] == peer.pid
        assert zmq_threads() > 0


@pytest.mark.skipif(not qemu_available(), reason=f"{QEMU_BINARY} is not on PATH")
async def test_a_qemu_vm_is_shown_silent_and_the_knocks_leave_it_alone(
    ivshmem_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with ivshmem_daemon(vectors=1) as daemon:
        vm = await trio.to_thread.run_sync(lambda: QemuIvshmemVm.doorbell(daemon.socket_path))
        try:
            qemu_id = await trio.to_thread.run_sync(vm.iv_position)
            peer = await ivshmem_peers(daemon, "monitor", [])
            snap = await _until(
                lambda: _top_json(daemon),
                lambda s: (
                    s["telemetry"]["knocks"] >= 2
                    and any(p["id"] == peer.peer_id and p["telemetry"] for p in s["peers"])
                ),
                "knocks, and our peer's report",
            )
            (row,) = [p for p in snap["peers"] if p["id"] == qemu_id]
            assert row["telemetry"] is False
            assert row["silent"] == "no telemetry (not an ivshmem-emu peer?)"
            assert row["pid"] == vm.pid
            # the knock (SIGURG, ignored by default) did QEMU no harm: it still answers
            assert await trio.to_thread.run_sync(vm.iv_position) == qemu_id
        finally:
            await trio.to_thread.run_sync(vm.close)


# ---------------------------------------------------------------------------------------------
# The live view in a real terminal
# ---------------------------------------------------------------------------------------------


class _Tmux:
    def __init__(self, tmp_path: Path) -> None:
        self.socket = str(tmp_path / "tmux.sock")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True,
                              text=True, timeout=20)  # fmt: skip

    def start_shell(self, home: Path) -> None:
        """A 100 x 40 session ``top`` running a bare bash (prompt ``READY$``) with this
        environment's commands first on PATH."""
        path = f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        started = self.run("new-session", "-d", "-s", "top", "-x", "100", "-y", "40",
                           "env", "-i", f"HOME={home}", "TERM=xterm-256color", "PS1=READY$ ",
                           f"PATH={path}", "bash", "--norc", "--noprofile")  # fmt: skip
        assert started.returncode == 0, started.stderr

    def pane(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top").stdout


async def _pane_until(tmux: _Tmux, ok: Callable[[str], bool], what: str) -> str:
    result: str = await _until(tmux.pane, ok, what)
    return result


def _stty(pane: str) -> str | None:
    """What the last ``stty -a | grep -o -- '-*icanon'`` printed (``icanon`` or
    ``-icanon``), or None before it has."""
    lines = [line.strip() for line in pane.splitlines()]
    asked = [i for i, line in enumerate(lines) if "grep -o" in line]
    if not asked or asked[-1] + 1 >= len(lines):
        return None
    answer = lines[asked[-1] + 1]
    return answer if answer.endswith("icanon") else None


def _cell(pane: str, row: int) -> list[str]:
    """The cells of the matrix row for source ``row``."""
    lines = pane.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("doorbells/s"))
    for line in lines[start + 2 :]:
        fields = line.split()
        if fields and fields[0] == str(row):
            return fields[1:]
    raise AssertionError(f"no matrix row {row} in:\n{pane}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_top_renders_in_a_real_terminal_resizes_and_q_restores_it(
    ivshmem_daemon: DaemonFactory, ivshmem_peers: PeerSpawner, tmp_path: Path
) -> None:
    tmux = _Tmux(tmp_path)
    async with ivshmem_daemon(vectors=1) as daemon:
        a = await ivshmem_peers(daemon, "ping", ["--partner", "1", "--count", "100000000"])
        b = await ivshmem_peers(daemon, "ping", ["--partner", "0", "--count", "100000000"])
        assert (a.peer_id, b.peer_id) == (0, 1)
        tmux.start_shell(tmp_path)
        try:
            tmux.run("send-keys", "-t", "top", "stty -a | grep -o -- '-*icanon'", "Enter")
            canonical = _stty(await _pane_until(tmux, lambda p: _stty(p) is not None, "stty"))
            assert canonical == "icanon"
            tmux.run("send-keys", "-t", "top", "clear; python -m ivshmemd.ctl -S "
                     f"{daemon.socket_path} top --interval 0.2; echo exit=$?", "Enter")  # fmt: skip

            def matrix_live(pane: str) -> bool:
                return "doorbells/s" in pane and "ping" in pane and "k" in "".join(
                    _cell(pane, 0)) if "doorbells/s" in pane else False  # fmt: skip

            pane = await _pane_until(tmux, matrix_live, "the matrix with rates")
            assert _cell(pane, 0)[0] == "·" and _cell(pane, 0)[1] != "·"  # 0 rings 1 only
            assert _cell(pane, 1)[1] == "·" and _cell(pane, 1)[0] != "·"
            rows = [line.split() for line in pane.splitlines()]
            assert any(r[:1] == ["0"] and "ping" in r for r in rows)
            assert any(r[:1] == ["1"] and "ping" in r for r in rows)
            assert max(len(line) for line in pane.splitlines()) > 60

            # narrower and shorter: drawn again to fit
            assert tmux.run("resize-window", "-t", "top", "-x", "60", "-y", "30").returncode == 0
            pane = await _pane_until(
                tmux, lambda p: "doorbells/s" in p and len(p.splitlines()[0].rstrip()) <= 60
                and p.splitlines()[0].startswith("ivshmemd"), "the resized view",
            )  # fmt: skip
            assert all(len(line) <= 60 for line in pane.splitlines())
            assert _cell(pane, 0)[1] != "·"

            # q: the view goes, the shell is back with its terminal settings
            tmux.run("send-keys", "-t", "top", "q")
            pane = await _pane_until(tmux, lambda p: "exit=0" in p, "top's exit")
            assert "doorbells/s" not in pane  # the alternate screen is gone
            tmux.run("send-keys", "-t", "top", "stty -a | grep -o -- '-*icanon'", "Enter")
            after = await _pane_until(tmux, lambda p: _stty(p) is not None, "stty after top")
            assert _stty(after) == canonical  # cbreak undone
        finally:
            tmux.run("kill-server")


def test_report_schema_refuses_unknown_fields() -> None:
    from ivshmemd.telemetry import ReportError, validate_report

    with pytest.raises(ReportError):
        validate_report({"peer": 1, "pid": 2, "t": 1.0, "evil": 1})
    assert msgpack.unpackb(encode_report({"peer": 1}))["cmd"] == "report"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_up_top_shows_the_launched_peers_and_q_stops_the_run(tmp_path: Path) -> None:
    tmux = _Tmux(tmp_path)
    socket_path = tmp_path / "up.sock"
    tmux.start_shell(tmp_path)
    try:
        tmux.run("send-keys", "-t", "top", "python -m ivshmemd.ctl up --top "
                 f"-S {socket_path} --peers 2 --plugin ping --count 100000000; echo exit=$?",
                 "Enter")  # fmt: skip

        def both_ringing(pane: str) -> bool:
            try:
                cells = _cell(pane, 0) + _cell(pane, 1)
            except (AssertionError, StopIteration):
                return False  # not drawn yet
            return sum(cell.endswith("k") for cell in cells) == 2

        pane = await _pane_until(tmux, both_ringing, "the launched pair in the matrix")
        assert pane.count(" ping ") >= 2
        tmux.run("send-keys", "-t", "top", "q")
        pane = await _pane_until(tmux, lambda p: re.search(r"exit=\d", p) is not None, "exit")
        assert "exit=130" in pane  # stopped as Ctrl-C stops it
        assert "doorbells/s" not in pane
        assert not socket_path.exists()  # the run cleaned up after itself
    finally:
        tmux.run("kill-server")
