"""The crash-restart state file: a snapshot and appended records, read back through a torn
tail, never through a symlink; replayed into the peers a restart serves on."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from ivshmemd.activation import PassedFd
from ivshmemd.crashsafe import recover, replay
from ivshmemd.fdstore import classify, peer_names, remote_names
from ivshmemd.statefile import FORMAT, StateFile, StateFileError, state_path

INFO = {"pid": 1, "uid": 0, "gid": 0, "connected_at": 1.5}


def test_snapshot_then_records_then_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "iv.sock.state"
    state = StateFile(str(path))
    state.write({"n_vectors": 2, "next_id": 2, "started_at": 1.0,
                 "peers": [[0, INFO, True], [1, INFO, True]]})  # fmt: skip
    state.append(["join", 2, INFO, 3, [2]])  # peer 2 joins, its greeting still queued
    state.append(["leave", 0, [2]])
    state.append(["unsettled", []])  # peer 2's queue drained
    with path.open("ab") as out:
        out.write(msgpack.packb(["join", 3, INFO, 4, []])[:-3])  # the crash tore this one
    read = StateFile(str(path)).read()
    assert read is not None and read["format"] == FORMAT and len(read["records"]) == 3
    replayed = replay(read)
    assert replayed["peers"] == [[1, INFO, True], [2, INFO, True]]
    assert replayed["next_id"] == 3
    # what was still queued when it died is remembered
    state.append(["join", 3, INFO, 4, [3]])
    assert replay(StateFile(str(path)).read() or {})["peers"][-1] == [3, INFO, False]


def test_a_snapshot_replaces_the_file_and_restarts_the_records(tmp_path: Path) -> None:
    path = tmp_path / "s.state"
    state = StateFile(str(path))
    state.write({"peers": [], "next_id": 0})
    state.append(["join", 0, INFO, 1, []])
    assert state.records == 1
    state.write({"peers": [[0, INFO, True]], "next_id": 1})
    assert state.records == 0
    read = StateFile(str(path)).read()
    assert read is not None and read["records"] == [] and read["next_id"] == 1
    state.remove()
    assert not path.exists()


def test_no_file_a_symlink_or_another_format(tmp_path: Path) -> None:
    assert StateFile(str(tmp_path / "none")).read() is None
    target = tmp_path / "target"
    target.write_bytes(msgpack.packb({"format": FORMAT, "peers": []}))
    link = tmp_path / "link.state"
    link.symlink_to(target)
    with pytest.raises(StateFileError, match="cannot read state file"):
        StateFile(str(link)).read()
    future = tmp_path / "future.state"
    future.write_bytes(msgpack.packb({"format": 99}))
    with pytest.raises(StateFileError, match="has format 99; this ivshmemd reads format 1"):
        StateFile(str(future)).read()


def test_where_the_state_file_lives() -> None:
    assert state_path("/run/ivshmem/iv.sock", {"RUNTIME_DIRECTORY": "/run/ivshmem"}) == (
        "/run/ivshmem/iv.sock.state"
    )
    assert state_path("/tmp/x/iv.sock", {}) == "/tmp/x/iv.sock.state"
    assert os.path.basename(state_path("a.sock", {"RUNTIME_DIRECTORY": "/r:/s"})) == "a.sock.state"


def test_remote_peers_are_recorded_with_their_member_and_stored_by_their_vectors(
    tmp_path: Path,
) -> None:
    """A federation's remote peers: a ``remote`` record (not a local join: the allocator
    does not move), and ``remote-<id>-vec-<v>`` fds that :func:`recover` restores as
    remote peers (no connection); one stored but never recorded is closed."""
    remote = {"member": "host-b", "connected_at": 2.0}
    path = tmp_path / "r.state"
    state = StateFile(str(path))
    state.write({"n_vectors": 1, "next_id": 1, "started_at": 1.0, "peers": [[0, INFO, True]]})
    state.append(["remote", 40000, remote])
    state.append(["remote", 40001, remote])
    state.append(["leave", 40001, []])
    replayed = replay(StateFile(str(path)).read() or {})
    assert replayed["peers"] == [[0, INFO, True], [40000, remote, True]]
    assert replayed["next_id"] == 1
    fds = [os.eventfd(0) for _ in range(3)]
    names = [*peer_names(0, 1)[1:], *remote_names(40000, 1), *remote_names(40002, 1)]
    stored = classify([PassedFd(fd, name) for fd, name in zip(fds, names, strict=True)])
    assert set(stored.remote) == {40000, 40002} and stored.peers[0].conn is None
    server_state, gone = recover(stored, StateFile(str(path)).read(), 1)
    by_id = {entry["id"]: entry for entry in server_state["peers"]}
    assert by_id[40000] == {"id": 40000, "vectors": [fds[1]], "info": remote, "conn": None,
                            "member": "host-b"}  # fmt: skip
    assert 40002 not in by_id and server_state["next_id"] == 1
    with pytest.raises(OSError):
        os.fstat(fds[2])  # stored, never recorded: closed
    assert gone == {0: "it hung up while the daemon was down"}
    for fd in fds[:2]:
        os.close(fd)
