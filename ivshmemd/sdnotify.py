"""systemd's notify protocol (sd_notify) without libsystemd.

A ``Type=notify`` service tells systemd how it is doing by sending datagrams of newline-
separated ``KEY=VALUE`` lines to the AF_UNIX socket named in ``$NOTIFY_SOCKET``:
``READY=1`` once it serves, ``STATUS=...`` free text for ``systemctl status``,
``STOPPING=1`` when it begins to shut down, ``MAINPID=`` if another process is the main one,
``RELOADING=1`` while it re-executes itself (``READY=1`` again once it serves), and
``FDSTORE=1`` with fds attached to keep them in systemd's fd store (:mod:`ivshmemd.fdstore`).

A name starting with ``@`` is in the abstract namespace (the ``@`` stands for a NUL byte).
When ``$NOTIFY_SOCKET`` is unset (not run by systemd) every call is a no-op. Delivery errors
are logged and reported as False, never raised: a daemon must not die because systemd's
socket went away.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Final

from .closing import Closing

__all__ = ["NOTIFY_SOCKET_ENV", "SystemdNotifier", "notify"]

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV: Final = "NOTIFY_SOCKET"
#: How long a send may wait when systemd's receive queue is full.
SEND_TIMEOUT: Final = 1.0


def _socket_address(name: str) -> str | bytes:
    """The sockaddr for a ``$NOTIFY_SOCKET`` value: a path, or ``@name`` (abstract)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    raise ValueError(f"unsupported {NOTIFY_SOCKET_ENV} address {name!r} (want /path or @name)")


def _format(fields: Mapping[str, str | int]) -> bytes:
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"invalid notify field name {key!r}")
        # A newline would start a new assignment: flatten multi-line text.
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


class SystemdNotifier(Closing):
    """A client of ``$NOTIFY_SOCKET`` (or of an explicit address). Cheap; reusable."""

    def __init__(self, address: str | None = None) -> None:
        name = os.environ.get(NOTIFY_SOCKET_ENV) if address is None else address
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if name:
            try:
                self._address = _socket_address(name)
            except ValueError as exc:
                log.warning("systemd notifications disabled: %s", exc)

    @property
    def enabled(self) -> bool:
        """True when there is a systemd socket to talk to."""
        return self._address is not None

    def send(self, fields: Mapping[str, str | int], fds: Sequence[int] = ()) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines (with ``fds`` attached, SCM_RIGHTS, as
        ``sd_pid_notify_with_fds`` does); False if disabled or undeliverable."""
        if self._address is None or not fields:
            return False
        data = _format(fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT)
            if fds:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                self._sock.sendmsg([data], rights, 0, self._address)
            else:
                self._sock.sendto(data, self._address)
        except OSError as exc:
            log.warning("cannot notify systemd at %r: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with an optional ``STATUS=``): the service is up."""
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.send(fields)

    def status(self, text: str) -> bool:
        """``STATUS=text``: one line shown by ``systemctl status``."""
        return self.send({"STATUS": text})

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        fields: dict[str, str | int] = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        return self.send(fields)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` (with ``MONOTONIC_USEC=``, which newer systemd wants): the service
        is re-executing itself; ``READY=1`` ends that state."""
        fields: dict[str, str | int] = {
            "RELOADING": 1,
            "MONOTONIC_USEC": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
        }
        if status is not None:
            fields["STATUS"] = status
        return self.send(fields)

    def mainpid(self, pid: int) -> bool:
        """``MAINPID=pid``: another process is the service's main process."""
        return self.send({"MAINPID": pid})

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def notify(fields: Mapping[str, str | int]) -> bool:
    """One-shot ``sd_notify``: send ``fields`` to ``$NOTIFY_SOCKET`` if it is set."""
    with SystemdNotifier() as notifier:
        return notifier.send(fields)
