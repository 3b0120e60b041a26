"""A plugin in a separate package loads with no change to this project.

The test writes, under ``tmp_path``, a package the way a user's would be installed: its own
module and a ``*.dist-info`` directory with ``METADATA`` and an ``entry_points.txt`` that
registers the plugin in the ``ivshmem.peers`` group. Only the peer subprocesses get it on
their PYTHONPATH; this process, the project's metadata and its source stay untouched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from peers import pytest_plugin
from peers.pytest_plugin import PeerSpawner

# Available through the `ivshmem` pytest11 entry point once installed; see
# test_peers_integration.py.
ivshmem_daemon = pytest_plugin.ivshmem_daemon
ivshmem_peers = pytest_plugin.ivshmem_peers

PLUGIN_SOURCE = '''\
"""A third party's ivshmem peer plugin: write a pattern into the shared memory through the
guest's vCPU, read it back, and finish with a summary."""

from peers.plugin import Guest, Plugin


class HelloPlugin(Plugin):
    name = "hello-thirdparty"
    description = "third-party test plugin: greets through the shared memory"

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--greeting", default="hello", help="what to write")

    def start(self, guest: Guest) -> None:
        super().start(guest)
        me = guest.peer_id
        message = f"{self.options.greeting} from peer {me}".encode()
        offset = 64 * me
        guest.write_shm(offset, message)
        back = guest.read_shm(offset, len(message))
        if back != message:
            guest.fail(f"read back {back!r}, wrote {message!r}")
            return
        guest.finish(f"{back.decode()}: {guest.shm_size} bytes of shm, {guest.vectors} vectors")
'''

ENTRY_POINTS = """\
[ivshmem.peers]
hello-thirdparty = hello_ivshmem_thirdparty:HelloPlugin
"""

METADATA = """\
Metadata-Version: 2.1
Name: hello-ivshmem-thirdparty
Version: 1.0
Summary: A third-party ivshmem peer plugin
"""


def _make_package(root: Path) -> Path:
    """Lay out an installed third-party distribution under ``root``; return ``root``."""
    (root / "hello_ivshmem_thirdparty").mkdir(parents=True)
    (root / "hello_ivshmem_thirdparty" / "__init__.py").write_text(PLUGIN_SOURCE)
    dist_info = root / "hello_ivshmem_thirdparty-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(METADATA)
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


def _peer_command() -> list[str]:
    script = shutil.which("ivshmem-peer", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "peers"]


async def _list_plugins(pythonpath: Path | None) -> str:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    with trio.fail_after(60):
        done = await trio.run_process(
            [*_peer_command(), "--list-plugins"],
            capture_stdout=True,
            capture_stderr=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    return done.stdout.decode()


async def test_list_plugins_shows_it_only_where_it_is_installed(tmp_path: Path) -> None:
    package = _make_package(tmp_path / "site")
    names = [line.split()[0] for line in (await _list_plugins(package)).splitlines()]
    assert "hello-thirdparty" in names
    assert {"ping", "monitor"} <= set(names)  # the built-ins, found the same way
    without = [line.split()[0] for line in (await _list_plugins(None)).splitlines()]
    assert "hello-thirdparty" not in without
    assert "hello-thirdparty" not in sys.modules and "hello_ivshmem_thirdparty" not in sys.modules


async def test_it_runs_against_a_real_daemon(
    tmp_path: Path, ivshmem_daemon: Any, ivshmem_peers: PeerSpawner
) -> None:
    package = _make_package(tmp_path / "site")
    async with ivshmem_daemon(vectors=2, size="64K") as daemon:
        peer = await ivshmem_peers(
            daemon, "hello-thirdparty", ["--greeting", "bonjour"], pythonpath=[package]
        )
        summary = await peer.wait_finished()
        assert summary == f"bonjour from peer {peer.peer_id}: 65536 bytes of shm, 2 vectors"
        assert await peer.wait_exit() == 0
        await daemon.wait_log(rf"peer {peer.peer_id} left")
