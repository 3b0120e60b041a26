"""The control plane's client: requests and the event stream, blocking, for ``ivshmemctl``,
the benchmarks and anyone's scripts.

:class:`ControlClient` sends one request and returns its result (:mod:`ivshmemd.control.schema`
encodes and decodes); :class:`EventSubscription` follows the event stream. Both turn the
usual failures into one-line exceptions: :class:`NoDaemonError` (nothing answers: not
running, wrong path, no permission, timeout) and :class:`~ivshmemd.control.schema.ControlError`
(the daemon answered with an error, or turned the connection away during the handshake:
not on its allow-list, a CURVE key it does not accept, or busy).
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Mapping
from typing import Any, Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from ivshmemd.curve import ClientCurve

from .schema import (
    EVENTS_WELCOME,
    ControlError,
    Event,
    SchemaError,
    decode_event,
    decode_reply,
    encode_request,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ControlClient",
    "EventSubscription",
    "NoDaemonError",
    "StreamNotice",
    "departure_reason",
]

#: how long to wait for the daemon, by default (seconds)
DEFAULT_TIMEOUT: Final = 2.0


class NoDaemonError(Exception):
    """No daemon answered (not running, wrong path, no permission, timeout)."""


# ---------------------------------------------------------------------------------------------
# Talking to the daemon
# ---------------------------------------------------------------------------------------------


def _check_ipc_path(endpoint: str, what: str) -> None:
    """Turn the common ipc failures into clear messages before waiting for a timeout."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return
    path = endpoint[len("ipc://") :]
    if not os.path.exists(path):
        raise NoDaemonError(
            f"no daemon: {path} does not exist (is ivshmemd running, and with this -S?)"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        st = os.stat(path)
        raise NoDaemonError(
            f"permission denied on {what} socket {path} (mode {st.st_mode & 0o777:04o}, "
            f"owner uid {st.st_uid}); run as the daemon's user or root"
        )


#: the handshake outcomes that mean the daemon turned this connection away
_REFUSED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_REFUSAL = (
    "the daemon refused the connection: this user is not on its allow-list, or (over "
    "tcp) the CURVE keys do not match"
)
#: the ZAP status of a refusal for now (the daemon has all the connections it takes)
_ZAP_BUSY = 300
_BUSY = "the daemon has all the control connections it takes; try again"


def _connect(sock: zmq.Socket[bytes], endpoint: str, curve: ClientCurve | None) -> None:
    if endpoint.startswith("tcp://"):
        if curve is None:
            raise NoDaemonError(
                f"{endpoint} is tcp: the daemon serves tcp only with CURVE; give --curve-key "
                "and --curve-server-key"
            )
        curve.apply(sock)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise NoDaemonError(f"cannot connect to {endpoint}: {exc}") from None


def _wait_readable(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes], timeout: float) -> bool:
    """Wait for ``sock`` to have a message; raise a permission error if the daemon turned
    the connection away during the handshake (seen on ``monitor``)."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        ready = dict(poller.poll(int(remaining * 1000) + 1))
        if sock in ready:
            return True
        if monitor in ready:
            event = recv_monitor_message(monitor)
            if event["event"] & _REFUSED and event.get("value") == _ZAP_BUSY:
                raise ControlError("busy", _BUSY)
            if event["event"] & _REFUSED:
                raise ControlError("permission-denied", _REFUSAL)
    return False


class ControlClient:
    """A blocking request/reply client: one zmq REQ socket per request, so that a request
    that timed out never confuses the next one."""

    def __init__(
        self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, curve: ClientCurve | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.curve = curve
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    def request(self, cmd: str, args: Mapping[str, Any] | None = None) -> Any:
        """Send one request; return its result. Raises :class:`NoDaemonError` when nothing
        answers within the timeout and :class:`ControlError` for an error reply (or a
        connection the daemon refused)."""
        _check_ipc_path(self.endpoint, "control")
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(_REFUSED)
        try:
            _connect(sock, self.endpoint, self.curve)
            sock.send(encode_request(cmd, args))
            if not _wait_readable(sock, monitor, self.timeout):
                raise NoDaemonError(
                    f"no daemon answered on {self.endpoint} within {self.timeout:g} s"
                )
            return decode_reply(sock.recv())
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def close(self) -> None:
        self._ctx.destroy(linger=0)


class StreamNotice(enum.Enum):
    """What :meth:`EventSubscription.receive` reports besides events."""

    #: the connection to the daemon's event stream closed, or went silent (no heartbeat
    #: answered): the daemon stopped, or its control plane is stuck
    LOST = "lost"
    #: connected again after :attr:`LOST`, and subscribed (the daemon's greeting came)
    BACK = "back"


#: heartbeats on the events connection: a daemon that answers none for this long is gone
HEARTBEAT_IVL_MS: Final = 1000
HEARTBEAT_TIMEOUT_MS: Final = 3000
_WATCHED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED


class EventSubscription:
    """A subscriber to the daemon's event stream (every topic), connected and live once
    constructed: the daemon's greeting (:data:`~ivshmemd.control.schema.EVENTS_WELCOME`)
    has arrived, so no event published from now on is missed. Raises
    :class:`NoDaemonError` if no greeting comes within ``timeout``.

    It outlives the daemon: zmq reconnects by itself, and :meth:`receive` says when the
    stream was lost and when it came back (:class:`StreamNotice`)."""

    def __init__(
        self, endpoint: str, timeout: float = DEFAULT_TIMEOUT, curve: ClientCurve | None = None
    ) -> None:
        self.endpoint = endpoint
        _check_ipc_path(endpoint, "events")
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self._ctx.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        # never drop on our side: the daemon's queue is the limit
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self._lost = False
        # one monitor for its life: refusals while connecting, then losses and returns
        self._monitor = self.socket.get_monitor_socket(_REFUSED | _WATCHED)
        try:
            _connect(self.socket, endpoint, curve)
            if not _wait_readable(self.socket, self._monitor, timeout):
                raise NoDaemonError(f"no daemon answered on {endpoint} within {timeout:g} s")
        except BaseException:
            self.close()
            raise

    def receive(self, timeout: float | None = None) -> Event | StreamNotice | None:
        """The next event (greetings skipped) or notice; None if nothing came within
        ``timeout`` (None: wait for ever). Raises
        :class:`~ivshmemd.control.schema.SchemaError` for a malformed event."""
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = dict(poller.poll(None if remaining is None else int(remaining * 1000)))
            if not ready:
                return None
            if self.socket in ready:  # events first: those sent before a loss
                frames = self.socket.recv_multipart()
                if frames != [EVENTS_WELCOME]:
                    return decode_event(frames)
                if self._lost:  # subscribed again: the daemon greets us
                    self._lost = False
                    return StreamNotice.BACK
                continue
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED and not self._lost:
                self._lost = True
                return StreamNotice.LOST

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)
        self._ctx.term()


def departure_reason(endpoint: str, peer_id: int, timeout: float = DEFAULT_TIMEOUT) -> str | None:
    """Why the daemon at ``endpoint`` disconnected ``peer_id`` (e.g. ``"kicked by uid 0
    (ivshmemctl kick)"``), or None when it cannot tell (no control plane, not allowed, no
    such departure): what a peer asks when its connection closes."""
    client = ControlClient(endpoint, timeout)
    try:
        departure = client.request("departure", {"id": peer_id})
    except (NoDaemonError, ControlError, SchemaError):
        return None
    finally:
        client.close()
    reason = departure.get("reason") if isinstance(departure, Mapping) else None
    return None if reason is None else str(reason)
