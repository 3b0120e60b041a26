"""Shared fixtures: a real daemon per test under the test's own temporary directory (the
``ivshmem`` pytest plugin's, under the names the tests use), and probe client processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from ivshmemd.supervise import DaemonProcess, SyncSupervisor, open_supervisor, sync_supervisor
from peers.pytest_plugin import DaemonFactory
from tests.peer_probe import ProbeProcess, StartProbe
from tests.wakeups import TaskSteps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def start_daemon(ivshmem_daemon: DaemonFactory) -> DaemonFactory:
    """``async with start_daemon(vectors=2) as d:`` runs an ivshmemd under tmp_path."""
    return ivshmem_daemon


@pytest.fixture
async def daemon(ivshmem_daemon: DaemonFactory) -> AsyncIterator[DaemonProcess]:
    """A daemon with one vector per peer."""
    async with ivshmem_daemon(vectors=1) as d:
        yield d


@pytest.fixture
async def probe() -> AsyncIterator[StartProbe]:
    """``client = await probe(socket_path, vectors)`` starts a ``tests.peer_probe`` client
    process and returns it once it is welcomed; every one is stopped when the test ends."""
    async with open_supervisor() as supervisor:

        async def start(socket_path: str, vectors: int) -> ProbeProcess:
            client = ProbeProcess.command(socket_path, vectors)
            await supervisor.start(client, events=True, stdin=True, cwd=ROOT)
            await client.wait_event(event="welcome")
            return client

        yield start


@pytest.fixture
def supervisor() -> Iterator[SyncSupervisor]:
    """Child processes in a plain test: ``child = supervisor.start(SyncChild(argv), ...)``;
    every one is stopped and reaped when the test ends, pass or fail."""
    with sync_supervisor() as started:
        yield started


@pytest.fixture
async def task_steps() -> AsyncIterator[TaskSteps]:
    """Counts the wake-ups of every task of the test's trio run (a trio instrument)."""
    counter = TaskSteps()
    trio.lowlevel.add_instrument(counter)
    try:
        yield counter
    finally:
        trio.lowlevel.remove_instrument(counter)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A private (0700) directory with a short path: unix socket paths stay under their
    108-byte limit even where pytest's tmp_path is deep (one per xdist worker)."""
    path = Path(tempfile.mkdtemp(prefix="iv-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def world_dir() -> Iterator[str]:
    """A short directory every uid can reach and create sockets in (sticky, like /tmp):
    pytest's tmp_path is private to root, and tests run clients and daemons as others."""
    path = tempfile.mkdtemp(prefix="ivshmem-world-")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
