"""Shared fixtures: a real daemon per test, under the test's own temporary directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from peers.testing import DaemonProcess, daemon_process


@pytest.fixture
def start_daemon(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[DaemonProcess]]:
    """``async with start_daemon(vectors=2) as d:`` runs an ivshmemd under tmp_path."""

    def start(**kwargs: Any) -> AbstractAsyncContextManager[DaemonProcess]:
        return daemon_process(tmp_path, **kwargs)

    return start


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    """A daemon with one vector per peer."""
    async with daemon_process(tmp_path, vectors=1) as d:
        yield d


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
