"""systemd socket activation: adopt the listening socket systemd (or any compatible
launcher, e.g. ``systemd-socket-activate``) opened for us, instead of binding our own.

The protocol (sd_listen_fds(3)): the launcher passes sockets as fds 3, 4, ... and sets
``LISTEN_FDS`` (how many), ``LISTEN_PID`` (the pid they are meant for; a child that
inherited the environment must not take them) and optionally ``LISTEN_FDNAMES``
(colon-separated names, ``FileDescriptorName=`` in a .socket unit).

What we do with them: check ``LISTEN_PID``, unset the three variables so that our own
children do not inherit them, set ``FD_CLOEXEC`` on every passed fd, and verify that the one
ivshmemd adopts is an ``AF_UNIX`` ``SOCK_STREAM`` socket that is already listening. Anything
else is an :class:`ActivationError` with a message that says what was found and what is needed.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
from collections.abc import Mapping, MutableMapping
from typing import Final

__all__ = [
    "DEFAULT_FD_NAME",
    "SD_LISTEN_FDS_START",
    "ActivationError",
    "PassedFd",
    "adopt_unix_listener",
    "listen_fds",
    "parse_listen_env",
]

SD_LISTEN_FDS_START: Final = 3
#: The name ``FileDescriptorName=`` gives the daemon's socket in systemd/ivshmemd.socket.
DEFAULT_FD_NAME: Final = "ivshmem"
_ENV_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_FAMILY_NAMES: Final = {socket.AF_UNIX: "AF_UNIX", socket.AF_INET: "AF_INET"}
_TYPE_NAMES: Final = {
    socket.SOCK_STREAM: "SOCK_STREAM",
    socket.SOCK_DGRAM: "SOCK_DGRAM",
    socket.SOCK_SEQPACKET: "SOCK_SEQPACKET",
}


class ActivationError(Exception):
    """Socket activation was requested but the passed sockets cannot be used."""


@dataclasses.dataclass(frozen=True)
class PassedFd:
    """One fd passed by the launcher, with its name (``"unknown"`` when none was given)."""

    fd: int
    name: str


def parse_listen_env(env: Mapping[str, str], pid: int) -> list[PassedFd]:
    """The fds that ``env`` passes to process ``pid``; [] when there are none or they are
    meant for another process. Pure: touches no fd."""
    fds_text = env.get("LISTEN_FDS")
    if fds_text is None:
        return []
    pid_text = env.get("LISTEN_PID")
    if pid_text is not None:
        try:
            target = int(pid_text)
        except ValueError:
            raise ActivationError(f"LISTEN_PID={pid_text!r} is not a pid") from None
        if target != pid:
            return []
    try:
        count = int(fds_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={fds_text!r} is not a number") from None
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={count} is negative")
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text else []
    if len(names) != count:
        names = ["unknown"] * count
    return [PassedFd(SD_LISTEN_FDS_START + i, names[i]) for i in range(count)]


def listen_fds(
    *, unset_environment: bool = True, environ: MutableMapping[str, str] | None = None
) -> list[PassedFd]:
    """The fds passed to this process (sd_listen_fds), each made close-on-exec.

    With ``unset_environment`` (the default) the ``LISTEN_*`` variables are removed from the
    environment afterwards, so that processes we spawn do not think the fds are theirs.
    """
    env = os.environ if environ is None else environ
    try:
        passed = parse_listen_env(env, os.getpid())
    finally:
        if unset_environment:
            for var in _ENV_VARS:
                env.pop(var, None)
    for item in passed:
        try:
            flags = fcntl.fcntl(item.fd, fcntl.F_GETFD)
            fcntl.fcntl(item.fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError as exc:
            raise ActivationError(
                f"LISTEN_FDS says fd {item.fd} ({item.name}) was passed, but it is not open: {exc}"
            ) from None
    return passed


def _describe(sock: socket.socket) -> str:
    family = _FAMILY_NAMES.get(sock.family, str(sock.family))
    kind = _TYPE_NAMES.get(sock.type, str(sock.type))
    return f"{family} {kind}"


def _check_unix_listener(item: PassedFd) -> socket.socket:
    try:
        sock = socket.socket(fileno=item.fd)
    except OSError as exc:
        raise ActivationError(f"passed fd {item.fd} ({item.name}) is not a socket: {exc}") from None
    needed = "ivshmemd needs an AF_UNIX SOCK_STREAM listening socket (ListenStream=/path)"
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        what = _describe(sock)
        sock.detach()
        raise ActivationError(f"passed fd {item.fd} ({item.name}) is {what}; {needed}")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"passed fd {item.fd} ({item.name}) is not listening; {needed}")
    return sock


def adopt_unix_listener(
    name: str = DEFAULT_FD_NAME,
    *,
    unset_environment: bool = True,
    environ: MutableMapping[str, str] | None = None,
    passed: list[PassedFd] | None = None,
) -> socket.socket | None:
    """The listening unix socket systemd passed us, or None when not socket-activated.

    With one passed fd it is taken whatever its name; with several, the one named ``name``.
    The socket is returned non-blocking with close-on-exec set, like the one the daemon
    binds itself, so it can take its place as is. ``getsockname()`` gives the path systemd
    bound. Raises :class:`ActivationError` for a socket of the wrong kind. ``passed``: the
    fds to choose from when the caller read them already (:func:`listen_fds`) and set aside
    those of systemd's fd store (:mod:`ivshmemd.fdstore`).
    """
    if passed is None:
        passed = listen_fds(unset_environment=unset_environment, environ=environ)
    if not passed:
        return None
    if len(passed) == 1:
        chosen = passed[0]
    else:
        matching = [item for item in passed if item.name == name]
        if len(matching) != 1:
            names = ", ".join(f"{item.fd}={item.name}" for item in passed)
            raise ActivationError(
                f"{len(passed)} sockets were passed ({names}); expected exactly one named "
                f"{name!r} (FileDescriptorName={name} in the .socket unit)"
            )
        chosen = matching[0]
    sock = _check_unix_listener(chosen)
    sock.setblocking(False)
    return sock
