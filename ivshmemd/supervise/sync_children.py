"""Supervised children in blocking code: :class:`SyncChild` (its output read by one thread)
and the :class:`SyncSupervisor` that stops them when it closes."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any, TypeVar

from .record import ChildError, ChildRecord
from .spawn import NOTIFY_DATAGRAM_MAX, READ_CHUNK, STOP_GRACE, WAIT_TIMEOUT, Launch

__all__ = ["SyncChild", "SyncSupervisor", "sync_supervisor"]

T = TypeVar("T")
S = TypeVar("S", bound="SyncChild")


class SyncChild(ChildRecord):
    """A supervised child process in blocking code: the same questions and waits as
    :class:`Child`, without ``await``; its output is read by one thread."""

    def __init__(self, argv: Sequence[str], **limits: int | None) -> None:
        super().__init__(argv, **limits)
        self.process: subprocess.Popen[bytes] | None = None
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None  # the reader thread's stop pipe

    # -- the reader thread ------------------------------------------------------------------

    def _read_all(self, pipes: Iterable[tuple[IO[bytes], Callable[[bytes], None]]],
                  notify: socket.socket | None) -> None:  # fmt: skip
        """Thread body: feed every line and datagram to the record until the pipes are at
        EOF and the child has exited (or :meth:`_release` wakes it)."""
        with selectors.DefaultSelector() as selector:
            for pipe, feed in pipes:
                selector.register(pipe, selectors.EVENT_READ, feed)
            if notify is not None:
                selector.register(notify, selectors.EVENT_READ, None)
            assert self._wake is not None
            wake = self._wake[0]
            selector.register(wake, selectors.EVENT_READ, None)
            while len(selector.get_map()) > (2 if notify is not None else 1):
                for key, _ in selector.select():
                    if key.fileobj == wake:
                        return
                    if key.fileobj is notify:
                        self._locked(self.feed_notify, notify.recv(NOTIFY_DATAGRAM_MAX))
                        continue
                    chunk = os.read(key.fd, READ_CHUNK)
                    self._locked(key.data, chunk)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        self._locked(self._stream_closed, chunk)
        # Its output is at its end, so it is exiting: reap it, then read any notification
        # it sent before (queued by now), and tell the waiters.
        assert self.process is not None
        status = self.process.wait()
        while notify is not None:
            try:
                datagram = notify.recv(NOTIFY_DATAGRAM_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            self._locked(self.feed_notify, datagram)
        self._locked(lambda _: self.set_exited(status), b"")

    def _stream_closed(self, _eof: bytes) -> None:
        self.streams_closed()

    def _locked(self, feed: Callable[[bytes], None], data: bytes) -> None:
        with self._changed:
            feed(data)
            self._changed.notify_all()

    def _refresh(self) -> None:
        if self.process is not None and self.returncode is None:
            status = self.process.poll()
            if status is not None:
                self.set_exited(status)

    # -- waiting ----------------------------------------------------------------------------

    def wait_for(self, condition: Callable[[], T | None], what: str, timeout: float) -> T:
        """Block until ``condition()`` returns something other than None; return it. Raises
        (:meth:`ChildRecord.error`) if the child ends first or ``timeout`` passes."""
        found: list[T] = []

        def done() -> bool:
            self._refresh()
            result = condition()
            if result is not None:
                found.append(result)
                return True
            return self.silent

        with self._changed:
            # poll the exit now and then: a Condition cannot wait on a process
            self._changed.wait_for(done, timeout)
        if found:
            return found[0]
        raise self.error(what, timeout)

    def wait_ready(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Block until its ``READY=1``."""
        self.wait_for(self._ready_found, "READY=1", timeout)

    def wait_events(
        self, count: int, *, timeout: float = WAIT_TIMEOUT, **fields: Any
    ) -> list[dict[str, Any]]:
        """Block until ``count`` events match ``fields``; return the first ``count``."""
        return self.wait_for(
            lambda: self._events_found(count, fields), f"{count} event(s) matching {fields}",
            timeout,
        )  # fmt: skip

    def wait_event(
        self, *, count: int = 1, timeout: float = WAIT_TIMEOUT, **fields: Any
    ) -> dict[str, Any]:
        """The ``count``-th event matching ``fields``, blocking for it if need be."""
        return self.wait_events(count, timeout=timeout, **fields)[-1]

    def wait_log(self, pattern: str, count: int = 1, timeout: float = WAIT_TIMEOUT) -> list[str]:
        """Block until ``count`` log lines match ``pattern``; return the first ``count``."""
        return self.wait_for(
            lambda: self._log_found(pattern, count), f"{count} x /{pattern}/ in the log", timeout
        )

    def wait_exit(self, timeout: float = WAIT_TIMEOUT) -> int:
        """Block until it has exited and its output is read; return its status."""
        assert self.process is not None
        try:
            self.set_exited(self.process.wait(timeout))
        except subprocess.TimeoutExpired:
            raise self.error("its exit", timeout) from None
        if self._reader is not None:
            self._reader.join(timeout)
        assert self.returncode is not None
        return self.returncode

    # -- acting -----------------------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        """Signal it unless it has been reaped (so its pid cannot have been reused)."""
        if self.process is not None and self.process.poll() is None:
            self.signals_sent.add(signum)
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def send_line(self, line: str) -> None:
        """A line on its stdin (started with ``stdin=True``)."""
        if self.process is None or self.process.stdin is None:
            raise ChildError(f"no stdin pipe to {self.argv[:3]}")
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; reap; return the status."""
        assert self.process is not None
        if grace > 0:
            self.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self.set_exited(self.process.wait())
        self._release()
        assert self.returncode is not None
        return self.returncode

    def _release(self) -> None:
        """Let the reader thread finish, then close what it read from (once)."""
        if self._wake is None:
            return
        wake_read, wake_write = self._wake
        if self._reader is not None:
            self._reader.join(STOP_GRACE)
            if self._reader.is_alive():  # a grandchild holds a pipe open: stop reading
                os.write(wake_write, b"x")
                self._reader.join()
        assert self.process is not None
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        os.close(wake_read)
        os.close(wake_write)
        self._wake = None


class SyncSupervisor:
    """Starts children for blocking code and stops those still running when closed
    (:func:`sync_supervisor`)."""

    def __init__(self) -> None:
        self.children: list[SyncChild] = []

    def start(self, child: S, launch: Launch | None = None, **options: Any) -> S:
        """Start ``child``: the same options as :meth:`Supervisor.start`."""
        launch = launch or Launch(**options)
        with launch.opening() as (notify, popen_options):
            process = subprocess.Popen(child.argv, **popen_options)
        child.process = process
        child.pid = process.pid
        child._wake = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        outputs = ((process.stdout, child.feed_events), (process.stderr, child.feed_log))
        pipes = [(pipe, feed) for pipe, feed in outputs if pipe is not None]
        child.streams_opened(len(pipes))
        child._reader = threading.Thread(
            target=self._read, args=(child, pipes, notify), daemon=True
        )
        child._reader.start()
        self.children.append(child)
        return child

    @staticmethod
    def _read(
        child: SyncChild,
        pipes: list[tuple[IO[bytes], Callable[[bytes], None]]],
        notify: socket.socket | None,
    ) -> None:
        try:
            child._read_all(pipes, notify)
        finally:
            if notify is not None:
                notify.close()

    def close(self, grace: float = STOP_GRACE) -> None:
        """Stop every child (SIGTERM them all first, then wait for each) and reap it."""
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                child.terminate()
        for child in self.children:
            child.stop(grace)


@contextmanager
def sync_supervisor() -> Iterator[SyncSupervisor]:
    """``with sync_supervisor() as sup: child = sup.start(SyncChild(argv))``; every child is
    stopped and reaped when the block ends."""
    supervisor = SyncSupervisor()
    try:
        yield supervisor
    finally:
        supervisor.close()
