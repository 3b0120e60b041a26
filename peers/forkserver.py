"""A fork server for peer processes: import the peer runtime once, fork it N times.

Starting a peer with a fresh interpreter costs about half a second of CPU, nearly all of it
imports (trio, numpy, the ``vmm`` model). ``ivshmemctl up --peers 16`` on two cores would pay
that sixteen times. Instead the launcher starts one fork server, which imports the runtime
and the plugin and then forks one child per request. Each child is set up as if it had been
exec'ed: its own process group, its stdin on /dev/null, stdout and stderr on the pipes the
launcher sent with the request, default signal dispositions, and no fd of the server or of
another child; it runs ``peers.cli.main(argv)`` and exits with its status.

The server is a plain blocking loop (no trio, no threads), so forking it is safe. It talks
to the launcher over a ``SOCK_SEQPACKET`` socketpair, one JSON object per datagram, fds by
``SCM_RIGHTS``:

* server -> launcher ``{"ready": PID}`` once the imports are done;
* launcher -> server ``{"spawn": TOKEN, "argv": [...]}`` with two fds (stdout, stderr);
* server -> launcher ``{"spawned": TOKEN, "pid": PID}`` or ``{"failed": TOKEN, "error": ...}``;
* server -> launcher ``{"exited": PID, "status": CODE}`` when it reaps a child (``CODE`` as
  ``subprocess`` reports it: negative for a signal).

Children are the server's, so the server reaps them; the launcher signals them by pid, which
is safe because a pid is only reused after its ``exited`` message. When the launcher goes away
(EOF on the socket) or sends SIGTERM, the server SIGTERMs every child, SIGKILLs those still
there after :data:`STOP_GRACE` seconds, reaps them all and exits: no orphan outlives it.
"""

from __future__ import annotations

import array
import json
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["MAX_MESSAGE", "STOP_GRACE", "decode", "encode", "recv_message", "serve"]

#: Largest datagram (an argv easily fits).
MAX_MESSAGE: Final = 1 << 16
#: Seconds children get between SIGTERM and SIGKILL when the server shuts down.
STOP_GRACE: Final = 10.0
_FDS_PER_SPAWN: Final = 2
_HANDLED: Final = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)


def encode(message: dict[str, Any]) -> bytes:
    """One datagram."""
    return json.dumps(message).encode()


def decode(data: bytes) -> dict[str, Any]:
    """The object in one datagram (ValueError if it is not one)."""
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    return message


def recv_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One datagram and the fds that came with it (``b""`` at EOF)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        MAX_MESSAGE, socket.CMSG_SPACE(_FDS_PER_SPAWN * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fds.itemsize
            fds.frombytes(payload[:usable])
    return data, list(fds)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: set[int] = set()
        self.wake_read, self.wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stop_requested = False
        self.selector = selectors.DefaultSelector()
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    # -- the child ------------------------------------------------------------------------

    def _become_peer(self, argv: list[str], stdout_fd: int, stderr_fd: int) -> None:
        """In the forked child: set up as an exec'ed process would be, run, never return."""
        status = 1
        try:
            os.setpgid(0, 0)
            signal.set_wakeup_fd(-1)
            # The dispositions a fresh interpreter has; then let through what was blocked
            # around the fork (a SIGTERM sent that early now simply terminates the child).
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)
            self.selector.close()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stdout_fd, 1)
            os.dup2(stderr_fd, 2)
            _close([devnull, stdout_fd, stderr_fd, self.wake_read, self.wake_write])
            self.sock.close()
            sys.argv = ["ivshmem-peer", *argv]
            from .cli import main

            result = main(argv)
            status = result if isinstance(result, int) else 0
        except SystemExit as exc:
            code = exc.code
            status = code if isinstance(code, int) else (0 if code is None else 1)
        except KeyboardInterrupt:
            status = 0
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(status)

    # -- the server -----------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.sock.send(encode(message))
        except OSError:
            self.stop_requested = True  # the launcher is gone

    def _spawn(self, message: dict[str, Any], fds: list[int]) -> None:
        token = message.get("spawn")
        argv = message.get("argv")
        try:
            if len(fds) != _FDS_PER_SPAWN:
                raise ValueError(f"a spawn request needs {_FDS_PER_SPAWN} fds, got {len(fds)}")
            if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)):
                raise ValueError("argv must be a list of strings")
            sys.stdout.flush()
            sys.stderr.flush()
            signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
            try:
                pid = os.fork()
                if pid == 0:
                    self._become_peer(argv, fds[0], fds[1])
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, self.old_mask)
            self.children.add(pid)
            self._send({"spawned": token, "pid": pid})
        except Exception as exc:
            self._send({"failed": token, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            _close(fds)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, waitstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self._send({"exited": pid, "status": os.waitstatus_to_exitcode(waitstatus)})

    def _drain_wakeups(self) -> list[int]:
        signals: list[int] = []
        try:
            while data := os.read(self.wake_read, 64):
                signals.extend(data)
        except BlockingIOError:
            pass
        return signals

    def run(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when to stop
        signal.set_wakeup_fd(self.wake_write, warn_on_full_buffer=False)
        selector = self.selector
        selector.register(self.sock, selectors.EVENT_READ)
        selector.register(self.wake_read, selectors.EVENT_READ)
        self._send({"ready": os.getpid()})
        while not self.stop_requested:
            for key, _events in selector.select():
                if key.fileobj is self.sock:
                    self._on_request()
                elif signal.SIGTERM in self._drain_wakeups():
                    self.stop_requested = True
                self._reap()
        self._stop_children(selector)

    def _on_request(self) -> None:
        try:
            data, fds = recv_message(self.sock)
        except OSError:
            self.stop_requested = True
            return
        if not data:
            _close(fds)
            self.stop_requested = True
            return
        try:
            message = decode(data)
        except ValueError:
            _close(fds)
            return
        if "spawn" in message:
            self._spawn(message, fds)
        else:
            _close(fds)

    def _stop_children(self, selector: selectors.BaseSelector) -> None:
        """SIGTERM every child, SIGKILL after the grace period, reap them all."""
        for pid in list(self.children):
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        self._reap()
        while self.children and time.monotonic() < deadline:
            selector.select(timeout=deadline - time.monotonic())  # woken by SIGCHLD
            self._drain_wakeups()
            self._reap()
        for pid in list(self.children):
            _kill(pid, signal.SIGKILL)
        while self.children:
            try:
                pid, waitstatus = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.discard(pid)
            self._send({"exited": pid, "status": os.waitstatus_to_exitcode(waitstatus)})


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def serve(fd: int, preload: Sequence[str] = ()) -> int:
    """Run the fork server on the inherited socket ``fd``; ``preload`` names plugins to
    import before the first fork. Returns when the launcher is gone or sends SIGTERM."""
    from . import cli  # noqa: F401  (the point: import once, before forking)
    from .plugin import PluginError, load_plugin

    for name in preload:
        try:
            load_plugin(name)
        except PluginError:
            pass  # the child will report it properly
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    _Server(sock).run()
    return 0


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), sys.argv[2:]))
