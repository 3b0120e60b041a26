"""ivshmemctl against a real daemon and real peers: why a peer was disconnected, a doorbell
rung from the command line, the fds the daemon holds, errors in JSON, a watch that
outlives the daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ivshmemd.exitcodes import EXIT_FAILED, EXIT_NO_DAEMON
from ivshmemd.supervise.daemon import sync_daemon_process
from ivshmemd.supervise.sync_children import SyncChild, SyncSupervisor

CTL = [sys.executable, "-m", "ivshmemd.ctl"]
TIMEOUT = 30.0


def ctl(*argv: str) -> tuple[int, str, str]:
    done = subprocess.run([*CTL, *argv], capture_output=True, text=True, timeout=TIMEOUT)
    return done.returncode, done.stdout, done.stderr


def test_a_kicked_peer_says_who_kicked_it(
    ivshmem_daemon_sync: Any, ivshmem_peers_sync: Any
) -> None:
    with ivshmem_daemon_sync(vectors=1) as daemon:
        peer = ivshmem_peers_sync(daemon, "monitor")
        code, _, err = ctl("-S", daemon.socket_path, "kick", str(peer.peer_id))
        assert code == 0, err
        assert peer.wait_exit(TIMEOUT) == EXIT_FAILED
        expected = f"disconnected by the daemon: kicked by uid {os.getuid()} (ivshmemctl kick)"
        assert peer.matching(event="server-gone", message=expected), peer.describe()
        assert peer.matching(event="log", message=f"{expected}; exiting")


def test_ring_a_peers_doorbell_and_dump_its_fds(
    ivshmem_daemon_sync: Any, ivshmem_peers_sync: Any
) -> None:
    with ivshmem_daemon_sync(vectors=2) as daemon:
        sock = daemon.socket_path
        peer = ivshmem_peers_sync(daemon, "monitor", ["--exit-after", "2"])
        code, out, err = ctl("-S", sock, "dump", "--json")
        assert code == 0, err
        dump = json.loads(out)
        assert dump["shm"]["size"] == 1 << 20 and dump["shm"]["fd"] >= 0
        (entry,) = dump["peers"]
        assert entry["id"] == peer.peer_id and len(entry["eventfds"]) == 2
        assert len(set(entry["eventfds"]) | {dump["shm"]["fd"]}) == 3
        code, out, err = ctl("-S", sock, "dump")
        assert code == 0 and f"fd {dump['shm']['fd']}" in out.splitlines()[0], err
        code, out, err = ctl("-S", sock, "ring", str(peer.peer_id), "1")
        assert (code, out) == (0, f"rang peer {peer.peer_id}, vector 1\n"), err
        peer.wait_event(event="monitor", text="interrupt on vector 1")
        code, out, err = ctl("-S", sock, "ring", str(peer.peer_id))  # vector 0 by default
        assert code == 0, err
        assert peer.wait_exit(TIMEOUT) == 0, peer.describe()
        assert peer.matching(event="monitor", text="interrupt on vector 0")
        code, _, err = ctl("-S", sock, "ring", str(peer.peer_id + 1), "0")
        assert code == EXIT_FAILED and "no peer with id" in err


def test_errors_are_json_under_json(tmp_path: Path, ivshmem_daemon_sync: Any) -> None:
    with ivshmem_daemon_sync(vectors=1) as daemon:
        code, out, err = ctl("-S", daemon.socket_path, "kick", "99", "--json")
        assert (code, out) == (EXIT_FAILED, "")
        assert json.loads(err)["error"]["code"] == "no-such-peer"
    code, out, err = ctl("-S", str(tmp_path / "none.sock"), "--json", "status")
    assert (code, out) == (EXIT_NO_DAEMON, "")
    assert json.loads(err)["error"]["code"] == "no-daemon"


def _notices(watch: SyncChild) -> list[dict[str, Any]]:
    return [json.loads(line) for line in watch.log_matching('^{"notice"')]


def test_watch_says_when_the_daemon_stops_and_when_a_new_one_starts(
    tmp_path: Path, supervisor: SyncSupervisor, ivshmem_peers_sync: Any
) -> None:
    sock = str(tmp_path / "d.sock")
    with sync_daemon_process(tmp_path, socket_path=sock) as first:
        watch = supervisor.start(SyncChild([*CTL, "-S", sock, "watch", "--json"]), events=True)
        watch.wait_log("^watching events on")
        ivshmem_peers_sync(first, "monitor")
        old = watch.wait_event(event="peer-joined")
        first.stop()
    watch.wait_log('"notice": "daemon-stopped"')
    with sync_daemon_process(tmp_path, socket_path=sock) as second:
        ivshmem_peers_sync(second, "monitor")
        new = watch.wait_event(event="peer-joined", count=2)
        watch.wait_log('"notice": "daemon-restarted"')
    (restarted,) = [n for n in _notices(watch) if n["notice"] == "daemon-restarted"]
    assert restarted["boot"] == new["boot"] != old["boot"]
    assert new["seq"] == 1 or restarted.get("missed") == [1, new["seq"] - 1]


def test_verbose_daemon_says_things_once_and_in_good_plurals(ivshmem_daemon_sync: Any) -> None:
    with ivshmem_daemon_sync(vectors=1, args=["-v"]) as daemon:
        code, _, err = ctl("-S", daemon.socket_path, "status")  # the control plane answers
        assert code == 0, err
        assert daemon.log_matching(r"1 vector per peer\)")
        assert len(daemon.log_matching("control plane on")) == 1, daemon.log
