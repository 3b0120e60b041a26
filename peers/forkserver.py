"""A fork server for peer processes: import the peer runtime once, fork it N times.

Starting a peer with a fresh interpreter costs about half a second of CPU, nearly all of it
imports (trio, numpy, the ``vmm`` model). ``ivshmemctl up --peers 16`` on two cores would pay
that sixteen times. Instead the launcher starts one fork server, which imports the runtime
and the plugin and then forks one child per request. Each child is set up as if it had been
exec'ed: its own process group, its stdin on /dev/null, stdout and stderr on the pipes the
launcher sent with the request, default signal dispositions, and no fd of the server or of
another child; it runs ``peers.cli.main(argv)`` and exits with its status.

The server (:func:`serve`, ``python -m peers.forkserver FD [PLUGIN...]``) is a plain blocking
loop (trio is imported, never run; no threads), so forking it is safe. The launcher's end is
:class:`ForkServer` (trio). They talk over a ``SOCK_SEQPACKET`` socketpair, one JSON object
per datagram, fds by ``SCM_RIGHTS``:

* server -> launcher ``{"ready": PID}`` once the imports are done;
* launcher -> server ``{"spawn": TOKEN, "argv": [...]}`` with two fds (stdout, stderr);
* server -> launcher ``{"spawned": TOKEN, "pid": PID}`` or ``{"failed": TOKEN, "error": ...}``;
* server -> launcher ``{"exited": PID, "status": CODE}`` when it reaps a child (``CODE`` as
  ``subprocess`` reports it: negative for a signal);
* launcher -> server ``{"guard": PID, "dir": PATH, "shm": NAME}`` (one per daemon): should
  the launcher die (EOF without a ``{"release": true}`` first), stop process PID (a daemon,
  held by a pidfd, so never a recycled pid), remove the directory PATH and unlink the shm
  NAME.

Children are the server's, so the server reaps them; the launcher signals them by pid, which
is safe because a pid is only reused after its ``exited`` message. When the launcher goes away
(EOF on the socket) or sends SIGTERM, the server SIGTERMs every child, SIGKILLs those still
there after :data:`STOP_GRACE` seconds, reaps them all and exits: no orphan outlives it. If
the launcher died (no release), the guarded daemons and their files go the same way.

:meth:`ForkServer.start_peer` starts one supervised peer through the server (the launcher's
and the pytest fixtures' way).
"""

from __future__ import annotations

import array
import itertools
import json
import math
import os
import select
import selectors
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from ivshmemd.exitcodes import EXIT_FAILED, EXIT_OK
from ivshmemd.supervise import Child, Supervisor

from .harness import PEER_MODULE

__all__ = [
    "MAX_MESSAGE",
    "STOP_GRACE",
    "ForkServer",
    "ForkServerError",
    "ForkedChild",
    "decode",
    "encode",
    "recv_message",
    "serve",
]

#: Largest datagram (an argv easily fits).
MAX_MESSAGE: Final = 1 << 16
#: Seconds children get between SIGTERM and SIGKILL when the server shuts down.
STOP_GRACE: Final = 10.0
_FDS_PER_SPAWN: Final = 2
_TAIL_LINES: Final = 20
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


@dataclass
class Guard:
    """The launcher's daemon (a pidfd: no pid reuse), socket directory and shm name."""

    pidfd: int
    directory: str | None
    shm: str | None


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
        self.guards: list[Guard] = []
        self.old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    # -- the child ------------------------------------------------------------------------

    def _become_peer(self, argv: list[str], stdout_fd: int, stderr_fd: int) -> None:
        """In the forked child: set up as an exec'ed process would be, run, never return."""
        status = EXIT_FAILED
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
            _close([guard.pidfd for guard in self.guards])
            self.sock.close()
            sys.argv = ["ivshmem-peer", *argv]
            from .cli import main

            result = main(argv)
            status = result if isinstance(result, int) else EXIT_OK
        except SystemExit as exc:
            code = exc.code
            status = code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_FAILED)
        except KeyboardInterrupt:
            status = EXIT_OK
        except BaseException:
            traceback.print_exc()
            status = EXIT_FAILED
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
        self._clean_up_after_launcher()

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
            self._spawn(message, fds)  # it closes the fds
            return
        _close(fds)
        if "guard" in message:
            self._set_guard(message)
        elif "release" in message:
            self._release_guard()

    # -- the guard: what to clean up should the launcher die ------------------------------

    def _set_guard(self, message: dict[str, Any]) -> None:
        try:
            pidfd = os.pidfd_open(int(message["guard"]))
        except (OSError, ValueError, TypeError):
            return  # already gone, or no pidfd support: nothing to guard
        self.guards.append(Guard(pidfd, message.get("dir"), message.get("shm")))

    def _release_guard(self) -> None:
        _close([guard.pidfd for guard in self.guards])
        self.guards.clear()

    def _clean_up_after_launcher(self) -> None:
        """The launcher died without releasing the guards: stop its daemons (SIGTERM,
        SIGKILL after the grace period), then remove their socket directories and unlink
        their shm."""
        guards, self.guards = self.guards, []
        for guard in guards:
            self._clean_up(guard)

    def _clean_up(self, guard: Guard) -> None:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            try:
                signal.pidfd_send_signal(guard.pidfd, signum)
            except ProcessLookupError:
                break
            ready, _, _ = select.select([guard.pidfd], [], [], STOP_GRACE)
            if ready:  # a pidfd is readable once its process has exited
                break
        _close([guard.pidfd])
        if guard.directory:
            shutil.rmtree(guard.directory, ignore_errors=True)
        if guard.shm:
            from ivshmemd.shm import unlink_posix_shm

            unlink_posix_shm(guard.shm)

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


# ---------------------------------------------------------------------------------------------
# The launcher's end (trio)
# ---------------------------------------------------------------------------------------------


class ForkedChild(Protocol):
    """What :class:`ForkServer` needs of the launcher's record of a forked peer (an adopted
    :class:`ivshmemd.supervise.Child`)."""

    pid: int

    def kill(self) -> None: ...

    def set_exited(self, returncode: int) -> None: ...


class ForkServerError(Exception):
    """The fork server could not start a peer, or is gone."""


@dataclass
class _Reply:
    done: trio.Event = field(default_factory=trio.Event)
    pid: int = 0
    error: str | None = None


class ForkServer:
    """The launcher's end: start the server, ask it for peers, follow their exits."""

    def __init__(self, child: Child, sock: trio.socket.SocketType) -> None:
        self.child = child  # the server process, supervised (its log explains a failure)
        self.sock = sock
        self.ready = trio.Event()
        self.gone = False
        self.children: dict[int, ForkedChild] = {}
        self._early_exits: dict[int, int] = {}
        self._replies: dict[int, _Reply] = {}
        self._tokens = itertools.count()
        self._send_lock = trio.Lock()

    @classmethod
    async def start(
        cls, supervisor: Supervisor, preload: Sequence[str], env: Mapping[str, str]
    ) -> ForkServer:
        """Start the server under ``supervisor`` (it imports the runtime and the plugins
        named in ``preload``, then says it is ready)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "peers.forkserver", str(theirs.fileno()), *preload]
        try:
            child = await supervisor.start(
                Child(argv, log_limit=_TAIL_LINES), env=env, process_group=True,
                pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(child, trio.socket.from_stdlib_socket(ours))

    async def run(self) -> None:
        """Dispatch the server's messages until it is gone."""
        try:
            while data := await self.sock.recv(MAX_MESSAGE):
                self._dispatch(decode(data))
        except trio.ClosedResourceError:
            pass  # aclose(): we hung up
        except (OSError, ValueError) as exc:
            self.child.log.append(f"fork server connection: {exc}")
        finally:
            self._lost()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "ready" in message:
            self.ready.set()
        elif "spawned" in message or "failed" in message:
            token = message["spawned"] if "spawned" in message else message["failed"]
            reply = self._replies.pop(int(token), None)
            if reply is not None:
                reply.pid = int(message.get("pid", 0))
                reply.error = message.get("error")
                reply.done.set()
        elif "exited" in message:
            pid, status = int(message["exited"]), int(message["status"])
            child = self.children.pop(pid, None)
            if child is None:
                self._early_exits[pid] = status
            else:
                child.set_exited(status)

    def _lost(self) -> None:
        """The server is gone: its children are orphans now; make sure they die too."""
        self.gone = True
        self.ready.set()
        for reply in self._replies.values():
            reply.error = "the fork server is gone"
            reply.done.set()
        self._replies.clear()
        for child in self.children.values():
            child.kill()
            child.set_exited(-signal.SIGKILL)
        self.children.clear()

    def register(self, child: ForkedChild) -> None:
        """Follow ``child``'s exit (the server reports it)."""
        if child.pid in self._early_exits:
            child.set_exited(self._early_exits.pop(child.pid))
        elif self.gone:
            child.kill()
            child.set_exited(-signal.SIGKILL)
        else:
            self.children[child.pid] = child

    async def spawn(
        self, argv: list[str]
    ) -> tuple[int, trio.abc.ReceiveStream, trio.abc.ReceiveStream]:
        """Fork a peer running ``peers.cli.main(argv)``: its pid, stdout and stderr."""
        if self.gone:
            raise ForkServerError("the fork server is gone")
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        token = next(self._tokens)
        reply = self._replies[token] = _Reply()
        try:
            fds = array.array("i", [out_w, err_w])
            message = encode({"spawn": token, "argv": argv})
            async with self._send_lock:
                await self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except BaseException:
            self._replies.pop(token, None)
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        await reply.done.wait()
        if reply.error is not None:
            os.close(out_r)
            os.close(err_r)
            raise ForkServerError(reply.error)
        return reply.pid, trio.lowlevel.FdStream(out_r), trio.lowlevel.FdStream(err_r)

    async def start_peer(self, supervisor: Supervisor, peer: Child) -> None:
        """Fork ``peer`` (its argv is a :func:`peers.harness.peer_command`) and supervise it
        as if ``supervisor`` had started it. Raises :class:`ForkServerError`."""
        pid, stdout, stderr = await self.spawn(peer.argv[1 + len(PEER_MODULE) :])
        supervisor.adopt(peer, pid, stdout, stderr)
        self.register(peer)

    async def send(self, message: dict[str, Any]) -> None:
        """A message without fds (``guard``/``release``); ignored if the server is gone."""
        try:
            async with self._send_lock:
                await self.sock.send(encode(message))
        except (OSError, trio.ClosedResourceError):
            pass

    async def aclose(self) -> None:
        """Release the guard, EOF to the server (it stops any child left), reap it."""
        if not self.gone:
            await self.send({"release": True})
        self.sock.close()
        with trio.move_on_after(STOP_GRACE):  # asked by the EOF: no signal, it is cleaning up
            await self.child.wait_exit(math.inf)
        await self.child.stop(grace=0)


# ---------------------------------------------------------------------------------------------
# Entry point of the server process
# ---------------------------------------------------------------------------------------------


def serve(fd: int, preload: Sequence[str] = ()) -> int:
    """Run the fork server on the inherited socket ``fd``; ``preload`` names plugins to
    import before the first fork. Returns when the launcher is gone or sends SIGTERM."""
    # the point: import once, before forking (the CLI imports the VMM model lazily, so name
    # the runtime modules too)
    from . import cli, loops, runtime  # noqa: F401
    from .plugin import PluginError, load_plugin

    for name in preload:
        try:
            load_plugin(name)
        except PluginError:
            pass  # the child will report it properly
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    _Server(sock).run()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(serve(int(sys.argv[1]), sys.argv[2:]))
