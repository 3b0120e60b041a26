"""pytest fixtures: a real ``ivshmemd`` and real peer processes inside your own tests.

The plugin is registered as the ``pytest11`` entry point ``ivshmem``, so installing this
project makes the fixtures available to every test session (``pytest -p no:ivshmem`` turns
them off). They are for trio tests (pytest-trio, ``trio_mode = true`` or
``@pytest.mark.trio``):

``ivshmem_daemon``
    A factory of async context managers: ``async with ivshmem_daemon(vectors=2) as daemon``
    runs ``ivshmemd`` in the foreground on a unique socket under the test's ``tmp_path`` and
    a unique shm name, waits until it listens, and on exit stops it (SIGTERM, SIGKILL if it
    hangs) and removes the socket and the shm, whatever happened in the block. ``daemon`` is
    a :class:`peers.testing.DaemonProcess`: ``socket_path``, ``shm_name``, ``pid``, ``log``,
    ``await daemon.wait_log("peer 3 left")``. Keyword arguments: ``vectors`` (default 1),
    ``size`` (default ``"1M"``), ``args`` (more ``ivshmemd`` options).

``ivshmem_peers``
    A spawner: ``peer = await ivshmem_peers(daemon, plugin="ping", args=["--count", "100"])``
    starts ``ivshmem-peer --report json`` against that daemon and returns a
    :class:`PeerProcess` once the peer reports it is running (so ``peer.peer_id`` is known).
    Every peer the test spawned is stopped and reaped when the test ends (SIGTERM, then
    SIGKILL after a grace period), pass or fail. ``env=`` adds environment variables and
    ``pythonpath=`` directories (e.g. where a test-only plugin lives).

A :class:`PeerProcess` records every JSON event the peer prints (``peer.events``) and its
stderr (``peer.stderr``). Wait for what you expect instead of sleeping:
``await peer.wait_event(event="peer-left", peer_id=3)`` (any fields, ``count=`` for the n-th
match), ``await peer.wait_finished()`` (the plugin's summary; raises if the plugin failed or
the peer died), ``await peer.wait_exit()``; signal it with ``peer.terminate()`` or
``peer.kill()``. Plugins report their own events with ``guest.report(event="...", ...)``,
and those arrive here too. A multi-process test then reads::

    async def test_ping_between_two_peers(ivshmem_daemon, ivshmem_peers):
        async with ivshmem_daemon(vectors=1) as daemon:
            first = await ivshmem_peers(daemon, plugin="ping", args=["--count", "200"])
            second = await ivshmem_peers(daemon, plugin="ping", args=["--count", "200"])
            server = first if first.peer_id < second.peer_id else second
            summary = await server.wait_finished()
            assert summary.startswith("ping: 200 round trips")

Every wait has a timeout (``DEFAULT_TIMEOUT`` seconds) and fails with the peer's events and
stderr in the message rather than hanging the test run.

Plain (synchronous) tests get the same with blocking calls: ``ivshmem_daemon_sync`` (``with
ivshmem_daemon_sync(vectors=2) as daemon``) and ``ivshmem_peers_sync`` (``peer =
ivshmem_peers_sync(daemon, plugin="ping")``, then ``peer.wait_finished()`` without
``await``); their output is read by threads, and the same clean-up guarantees hold.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any, Final

import pytest
import trio

from ivshmemd.shm import unlink_posix_shm

from .testing import READY_PATTERN, DaemonProcess, daemon_command, daemon_process, unique_name

__all__ = [
    "DEFAULT_TIMEOUT",
    "PeerError",
    "PeerProcess",
    "PeerRecord",
    "PeerSpawner",
    "SyncDaemon",
    "SyncPeerProcess",
    "SyncPeerSpawner",
    "ivshmem_daemon",
    "ivshmem_daemon_sync",
    "ivshmem_peers",
    "ivshmem_peers_sync",
    "peer_command",
    "peer_launch",
    "sync_daemon_process",
]

#: Seconds any wait may take before the test fails with what the peer said so far.
DEFAULT_TIMEOUT: Final = 30.0
#: Seconds a peer gets to exit after SIGTERM at the end of a test before SIGKILL.
STOP_GRACE: Final = 10.0


class PeerError(AssertionError):
    """A peer did not do what the test waited for (failed, died, or timed out)."""


def peer_command(socket_path: str, plugin: str, args: Sequence[str] = ()) -> list[str]:
    """The argv of a peer reporting JSON lines: ``ivshmem-peer -S ... --report json``."""
    return [sys.executable, "-m", "peers", "-S", socket_path, "--plugin", plugin,
            "--report", "json", *args]  # fmt: skip


def peer_launch(
    daemon: DaemonProcess | SyncDaemon | str,
    plugin: str,
    args: Sequence[str],
    env: dict[str, str] | None,
    pythonpath: Sequence[str | os.PathLike[str]],
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a peer: ``--vectors`` set to the daemon's (so the device
    has exactly the vectors the daemon hands out), ``pythonpath`` put first on PYTHONPATH."""
    if isinstance(daemon, str):
        socket_path = daemon
    else:
        socket_path = daemon.socket_path
        if daemon.vectors and "--vectors" not in args:
            args = ["--vectors", str(daemon.vectors), *args]
    child_env = dict(os.environ)
    child_env.update(env or {})
    if pythonpath:
        paths = [os.fspath(p) for p in pythonpath]
        if child_env.get("PYTHONPATH"):
            paths.append(child_env["PYTHONPATH"])
        child_env["PYTHONPATH"] = os.pathsep.join(paths)
    return peer_command(socket_path, plugin, args), child_env


def _event_of(line: bytes) -> dict[str, Any] | None:
    text = line.decode(errors="replace").strip()
    if not text:
        return None
    try:
        event = json.loads(text)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        event = {"event": "stdout", "text": text}  # a plugin printing on its own
    return event


class PeerRecord:
    """What a peer process reported: ``events`` (its JSON objects, in order) and ``stderr``
    (its lines); the parts of :class:`PeerProcess` and :class:`SyncPeerProcess` that do
    not wait."""

    def __init__(self, pid: int, argv: list[str]) -> None:
        self._pid = pid
        self.argv = argv
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []

    @property
    def pid(self) -> int:
        """The peer's process id."""
        return self._pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited (negative: killed by that signal)."""
        raise NotImplementedError

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` unless it has already exited."""
        raise NotImplementedError

    def terminate(self) -> None:
        """SIGTERM: the peer stops cleanly (reports ``stopped``, exits 0)."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: the peer dies at once; the daemon tells the others it left."""
        self.send_signal(signal.SIGKILL)

    @property
    def peer_id(self) -> int | None:
        """The id the daemon gave it (from its ``running`` event), None before."""
        for event in self.events:
            if event.get("event") == "running":
                peer_id = event.get("peer_id")
                return int(peer_id) if peer_id is not None else None
        return None

    def matching(self, **fields: Any) -> list[dict[str, Any]]:
        """The events so far whose fields have these values."""
        return [e for e in self.events if all(e.get(k) == v for k, v in fields.items())]

    def describe(self) -> str:
        """Its events and stderr, for a failure message."""
        events = "\n".join(json.dumps(e) for e in self.events[-30:]) or "(none)"
        errors = "\n".join(self.stderr[-20:]) or "(none)"
        return (
            f"peer pid {self.pid} (id {self.peer_id}, exit status {self.returncode}); "
            f"last events:\n{events}\nstderr:\n{errors}"
        )

    def _wait_failed(self, what: str, closed: bool, timeout: float) -> PeerError:
        why = "exited" if closed else f"did not within {timeout:g} s"
        return PeerError(f"expected {what}; the peer {why}: {self.describe()}")

    def _finished_summary(self, event: dict[str, Any]) -> str | None:
        if not event.get("ok"):
            raise PeerError(f"the plugin failed: {event.get('summary')}: {self.describe()}")
        summary = event.get("summary")
        return str(summary) if summary is not None else None


class PeerProcess(PeerRecord):
    """One running peer process (trio) and everything it reported.

    ``events`` holds the JSON objects it printed, in order; ``stderr`` its stderr lines.
    """

    def __init__(self, process: trio.Process, argv: list[str]) -> None:
        super().__init__(process.pid, argv)
        self.process = process
        self._lot = trio.lowlevel.ParkingLot()
        self._stdout_closed = False
        self._exited = trio.Event()

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited (negative: killed by that signal)."""
        return self.process.returncode

    # -- waiting ----------------------------------------------------------------------------

    async def wait_events(
        self, count: int, *, timeout: float = DEFAULT_TIMEOUT, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` events match ``fields``; return the first ``count``."""
        with trio.move_on_after(timeout):
            while True:
                found = self.matching(**fields)
                if len(found) >= count:
                    return found[:count]
                if self._stdout_closed:
                    break
                await self._lot.park()
        raise self._wait_failed(f"{count} event(s) matching {fields}", self._stdout_closed, timeout)

    async def wait_event(
        self, *, count: int = 1, timeout: float = DEFAULT_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th event matching ``fields``, waiting for it if need be."""
        return (await self.wait_events(count, timeout=timeout, **fields))[-1]

    async def wait_running(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the ``running`` event; return the peer id."""
        event = await self.wait_event(event="running", timeout=timeout)
        return int(event["peer_id"])

    async def wait_finished(self, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """Wait until the plugin finishes; return its summary.

        Raises :class:`PeerError` if the plugin failed, or the peer stopped or died first.
        """
        return self._finished_summary(await self.wait_event(event="finished", timeout=timeout))

    async def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait until the process has exited (and its output is read); return its status."""
        with trio.move_on_after(timeout):
            await self._exited.wait()
            return await self.process.wait()
        raise PeerError(f"the peer did not exit within {timeout:g} s: {self.describe()}")

    # -- signals ----------------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` unless it has already exited."""
        if self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    async def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, wait up to ``grace`` seconds, SIGKILL if need be; return the status."""
        self.terminate()
        with trio.move_on_after(grace):
            await self._exited.wait()
        if not self._exited.is_set():
            self.kill()
            await self._exited.wait()
        return await self.process.wait()

    # -- plumbing ---------------------------------------------------------------------------

    async def _read_stdout(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        buffer = b""
        try:
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self._add_line(line)
                if lines:
                    self._lot.unpark_all()
            if buffer:
                self._add_line(buffer)
        finally:
            self._stdout_closed = True
            self._lot.unpark_all()

    def _add_line(self, line: bytes) -> None:
        event = _event_of(line)
        if event is not None:
            self.events.append(event)

    async def _read_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        buffer = b""
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            self.stderr.extend(line.decode(errors="replace") for line in lines)
        if buffer:
            self.stderr.append(buffer.decode(errors="replace"))

    async def _watch(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_stdout)
            nursery.start_soon(self._read_stderr)
        await self.process.wait()
        self._exited.set()


class PeerSpawner:
    """What the ``ivshmem_peers`` fixture gives: call it to start a peer.

    Use it only inside one test; the fixture stops every peer it started when the test ends.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.peers: list[PeerProcess] = []

    async def __call__(
        self,
        daemon: DaemonProcess | str,
        plugin: str,
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        pythonpath: Sequence[str | os.PathLike[str]] = (),
        wait_running: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> PeerProcess:
        """Start a peer running ``plugin`` (with its ``args``) against ``daemon`` (or a
        socket path). Returns once it is running (its ``peer_id`` known), unless
        ``wait_running=False``; raises :class:`PeerError` if it exits before that."""
        argv, child_env = peer_launch(daemon, plugin, args, env, pythonpath)
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env,
        )  # fmt: skip
        peer = PeerProcess(process, argv)
        self.peers.append(peer)
        self._nursery.start_soon(peer._watch)
        if wait_running:
            await peer.wait_running(timeout=timeout)
        return peer

    async def aclose(self) -> None:
        """Stop every peer started here (concurrently) and reap it."""
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for peer in self.peers:
                    nursery.start_soon(peer.stop)


@pytest.fixture
def ivshmem_daemon(
    tmp_path: Path,
) -> Callable[..., AbstractAsyncContextManager[DaemonProcess]]:
    """Factory: ``async with ivshmem_daemon(vectors=2, size="1M", args=[...]) as daemon``
    runs a real ``ivshmemd`` under ``tmp_path`` and always cleans it up."""

    def start(**kwargs: Any) -> AbstractAsyncContextManager[DaemonProcess]:
        return daemon_process(tmp_path, **kwargs)

    return start


@pytest.fixture
async def ivshmem_peers() -> AsyncIterator[PeerSpawner]:
    """Spawner: ``peer = await ivshmem_peers(daemon, plugin="ping", args=[...])``; every peer
    is stopped (SIGTERM, then SIGKILL) and reaped when the test ends."""
    async with trio.open_nursery() as nursery:
        spawner = PeerSpawner(nursery)
        try:
            yield spawner
        finally:
            await spawner.aclose()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------------
# Synchronous variants, for plain (non-trio) tests
# ---------------------------------------------------------------------------------------------


def _pump_lines(
    stream: IO[bytes], on_line: Callable[[bytes], None], done: Callable[[], None]
) -> None:
    """Thread body: feed ``stream``'s lines to ``on_line`` until EOF, then call ``done``."""
    try:
        for line in iter(stream.readline, b""):
            on_line(line.rstrip(b"\n"))
    finally:
        stream.close()
        done()


class SyncDaemon:
    """A running daemon for a plain test: like :class:`peers.testing.DaemonProcess`, with
    blocking waits. Its stderr is read by a thread; ``log`` holds the lines so far."""

    def __init__(
        self, process: subprocess.Popen[bytes], socket_path: str, shm_name: str, vectors: int
    ) -> None:
        self.process = process
        self.socket_path = socket_path
        self.shm_name = shm_name
        self.vectors = vectors
        self.log: list[str] = []
        self._changed = threading.Condition()
        self._eof = False
        assert process.stderr is not None
        self._reader = threading.Thread(
            target=_pump_lines, args=(process.stderr, self._add, self._closed), daemon=True
        )
        self._reader.start()

    @property
    def pid(self) -> int:
        """The daemon's pid."""
        return self.process.pid

    def _add(self, line: bytes) -> None:
        with self._changed:
            self.log.append(line.decode(errors="replace"))
            self._changed.notify_all()

    def _closed(self) -> None:
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def count(self, pattern: str) -> int:
        """How many log lines so far match the regular expression."""
        rx = re.compile(pattern)
        return sum(1 for line in list(self.log) if rx.search(line))

    def wait_log(self, pattern: str, count: int = 1, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Wait until ``count`` log lines match ``pattern``; return the matching lines."""
        rx = re.compile(pattern)
        with self._changed:
            found: list[str] = []

            def enough() -> bool:
                found[:] = [line for line in self.log if rx.search(line)]
                return len(found) >= count or self._eof

            self._changed.wait_for(enough, timeout)
            if len(found) >= count:
                return found[:count]
        tail = "\n".join(self.log[-20:])
        raise AssertionError(
            f"daemon log never showed {count} x /{pattern}/ (exit status "
            f"{self.process.poll()}); last lines:\n{tail}"
        )

    def terminate(self, timeout: float = STOP_GRACE) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``); return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        status = self.process.wait()
        self._reader.join()
        return status


@contextmanager
def sync_daemon_process(
    directory: str | os.PathLike[str],
    *,
    vectors: int = 1,
    size: str = "1M",
    args: Sequence[str] = (),
) -> Iterator[SyncDaemon]:
    """Run ``ivshmemd`` for the duration of the block (blocking version of
    :func:`peers.testing.daemon_process`); always stops it and removes its socket and shm."""
    socket_path = str(Path(directory) / f"ivshmem-{uuid.uuid4().hex[:8]}.sock")
    shm_name = unique_name()
    process = subprocess.Popen(
        daemon_command(socket_path, shm_name, vectors, size, args),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    daemon = SyncDaemon(process, socket_path, shm_name, vectors)
    try:
        daemon.wait_log(READY_PATTERN.pattern)
        yield daemon
    finally:
        daemon.terminate()
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
        unlink_posix_shm(shm_name)


class SyncPeerProcess(PeerRecord):
    """One running peer process for a plain test; the waits block (same API as
    :class:`PeerProcess`, without ``await``)."""

    def __init__(self, process: subprocess.Popen[bytes], argv: list[str]) -> None:
        super().__init__(process.pid, argv)
        self.process = process
        self._changed = threading.Condition()
        self._stdout_closed = False
        assert process.stdout is not None and process.stderr is not None
        self._readers = [
            threading.Thread(
                target=_pump_lines, args=(process.stdout, self._add_event, self._closed),
                daemon=True,
            ),
            threading.Thread(
                target=_pump_lines, args=(process.stderr, self._add_stderr, lambda: None),
                daemon=True,
            ),
        ]  # fmt: skip
        for reader in self._readers:
            reader.start()

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited (negative: killed by that signal)."""
        return self.process.poll()

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` unless it has already exited."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def _add_event(self, line: bytes) -> None:
        event = _event_of(line)
        if event is not None:
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    def _add_stderr(self, line: bytes) -> None:
        self.stderr.append(line.decode(errors="replace"))

    def _closed(self) -> None:
        with self._changed:
            self._stdout_closed = True
            self._changed.notify_all()

    def wait_events(
        self, count: int, *, timeout: float = DEFAULT_TIMEOUT, **fields: Any
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` events match ``fields``; return the first ``count``."""
        with self._changed:
            self._changed.wait_for(
                lambda: len(self.matching(**fields)) >= count or self._stdout_closed, timeout
            )
            found = self.matching(**fields)
            if len(found) >= count:
                return found[:count]
            closed = self._stdout_closed
        raise self._wait_failed(f"{count} event(s) matching {fields}", closed, timeout)

    def wait_event(
        self, *, count: int = 1, timeout: float = DEFAULT_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th event matching ``fields``, waiting for it if need be."""
        return self.wait_events(count, timeout=timeout, **fields)[-1]

    def wait_running(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the ``running`` event; return the peer id."""
        return int(self.wait_event(event="running", timeout=timeout)["peer_id"])

    def wait_finished(self, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """Wait until the plugin finishes; return its summary (raises if it failed)."""
        return self._finished_summary(self.wait_event(event="finished", timeout=timeout))

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait until the process has exited (and its output is read); return its status."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise PeerError(
                f"the peer did not exit within {timeout:g} s: {self.describe()}"
            ) from None
        for reader in self._readers:
            reader.join()
        return status

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, wait up to ``grace`` seconds, SIGKILL if need be; return the status."""
        self.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.wait_exit(timeout=float("inf"))


class SyncPeerSpawner:
    """What the ``ivshmem_peers_sync`` fixture gives: call it to start a peer (blocking)."""

    def __init__(self) -> None:
        self.peers: list[SyncPeerProcess] = []

    def __call__(
        self,
        daemon: SyncDaemon | DaemonProcess | str,
        plugin: str,
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        pythonpath: Sequence[str | os.PathLike[str]] = (),
        wait_running: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> SyncPeerProcess:
        """Start a peer, as :meth:`PeerSpawner.__call__` does."""
        argv, child_env = peer_launch(daemon, plugin, args, env, pythonpath)
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env,
        )  # fmt: skip
        peer = SyncPeerProcess(process, argv)
        self.peers.append(peer)
        if wait_running:
            peer.wait_running(timeout=timeout)
        return peer

    def close(self) -> None:
        """Stop every peer started here and reap it (SIGTERM them all first)."""
        for peer in self.peers:
            peer.terminate()
        for peer in self.peers:
            peer.stop()


@pytest.fixture
def ivshmem_daemon_sync(tmp_path: Path) -> Callable[..., AbstractContextManager[SyncDaemon]]:
    """Factory for plain tests: ``with ivshmem_daemon_sync(vectors=2) as daemon``."""

    def start(**kwargs: Any) -> AbstractContextManager[SyncDaemon]:
        return sync_daemon_process(tmp_path, **kwargs)

    return start


@pytest.fixture
def ivshmem_peers_sync() -> Iterator[SyncPeerSpawner]:
    """Spawner for plain tests: ``peer = ivshmem_peers_sync(daemon, plugin="ping")``; every
    peer is stopped and reaped when the test ends."""
    spawner = SyncPeerSpawner()
    try:
        yield spawner
    finally:
        spawner.close()
