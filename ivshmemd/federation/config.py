"""Federation settings and the rule for which endpoints a federation may use.

Endpoints are zmq endpoints: ``tcp://HOST:PORT`` (HOST an IPv4 address, ``[IPv6]``, a host
name or ``*``; PORT a number, or ``*``/``0`` to bind an ephemeral port) and ``ipc://PATH``.

Without CURVE keys the links are neither encrypted nor authenticated, so a federation may
only use ``ipc://`` (guarded by the socket file's mode) and loopback TCP, unless the user
says ``insecure`` (``--federation-insecure``). The rule applies to the listening endpoint,
to the configured members and to every endpoint learned from the network.
"""

from __future__ import annotations

import ipaddress
import math
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .membership import DEFAULT_TIMEOUT
from .schema import MAX_ENDPOINT_LEN, MAX_IDENTITY_LEN, MAX_PEER_ID, MAX_VECTORS

__all__ = [
    "DEFAULT_FLUSH",
    "DEFAULT_MAX_BACKLOG",
    "DEFAULT_MAX_MEMBERS",
    "FLUSH_SCAN_BYTES",
    "FederationConfig",
    "FederationConfigError",
    "check_endpoint",
    "endpoint_refusal",
    "is_local_endpoint",
]

#: Members one daemon federates with at most.
DEFAULT_MAX_MEMBERS: Final = 64
#: Frames queued for one member beyond zmq's own queue before it is declared too slow.
#: Above the largest opening snapshot (one frame per local peer, ids are 16 bits).
DEFAULT_MAX_BACKLOG: Final = 2**17
#: Seconds between two rounds of the background flush (``--federation-flush``).
DEFAULT_FLUSH: Final = 0.1
#: The background flush looks at this much of the region per round (a bounded cost per
#: round; the whole region is covered every ``size / FLUSH_SCAN_BYTES`` rounds).
FLUSH_SCAN_BYTES: Final = 64 << 20

_TCP_RE = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(\*|\d{1,5})")


class FederationConfigError(ValueError):
    """A federation setting that cannot work (the message says which and why)."""


def check_endpoint(endpoint: str, *, bind: bool = False) -> None:
    """Raise :class:`FederationConfigError` unless ``endpoint`` is one we can use."""
    if len(endpoint) > MAX_ENDPOINT_LEN:
        raise FederationConfigError(
            f"endpoint {endpoint[:40]!r}... is longer than {MAX_ENDPOINT_LEN} characters"
        )
    if endpoint.startswith("ipc://"):
        if len(endpoint) == len("ipc://"):
            raise FederationConfigError(f"endpoint {endpoint!r} has no path")
        return
    match = _TCP_RE.fullmatch(endpoint)
    if match is None:
        raise FederationConfigError(f"endpoint {endpoint!r} is not tcp://HOST:PORT or ipc://PATH")
    host, port = match.groups()
    if port == "*" or int(port) == 0:
        if not bind:
            raise FederationConfigError(f"endpoint {endpoint!r} needs a port number")
    elif int(port) > 65535:
        raise FederationConfigError(f"endpoint {endpoint!r}: port {port} is above 65535")
    if host == "*" and not bind:
        raise FederationConfigError(f"endpoint {endpoint!r} needs a host to connect to")


def _is_wildcard(endpoint: str) -> bool:
    """True for a tcp endpoint bound to every address (or an ephemeral ``*`` port)."""
    match = _TCP_RE.fullmatch(endpoint)
    if match is None:
        return False
    host, port = match.groups()
    return host.strip("[]") in ("*", "0.0.0.0", "::") or port == "*"


def is_local_endpoint(endpoint: str) -> bool:
    """True for ``ipc://`` and TCP on a loopback address (or ``localhost``)."""
    if endpoint.startswith("ipc://"):
        return True
    match = _TCP_RE.fullmatch(endpoint)
    if match is None:
        return False
    host = match.group(1).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def endpoint_refusal(endpoint: str, *, secure: bool, insecure: bool) -> str | None:
    """Why a federation may not use ``endpoint`` (None if it may)."""
    try:
        check_endpoint(endpoint)
    except FederationConfigError as exc:
        return str(exc)
    if secure or insecure or is_local_endpoint(endpoint):
        return None
    return (
        f"endpoint {endpoint} is not ipc:// or loopback, and the federation has no keys "
        "(give --federation-key and --federation-allow, or --federation-insecure)"
    )


@dataclass(frozen=True)
class FederationConfig:
    """What a :class:`~ivshmemd.federation.node.Federation` needs.

    ``listen`` is where other daemons reach this one (``--federation-listen``), ``peers`` the
    members to contact first (``--federation-peer``). ``key_file`` (our secret certificate)
    and ``allow_dir`` (the public certificates of the members we accept) turn CURVE on;
    both or neither. ``id_range``, ``shm_size`` and ``vectors`` are what the hello checks.
    ``identity`` names this daemon in the federation (default: its listening endpoint as
    bound) and must stay the same across restarts; ``incarnation`` changes at every start
    unless a restart carries it over with its peers (default: a fresh random one).
    ``advertise`` is the endpoint other daemons should dial (default: ``listen`` as bound).

    Memory replication (issue 13, :mod:`~ivshmemd.federation.replica`): ``memory`` turns it
    on (``--federation-memory``); ``flush`` is the background flush's period in seconds
    (``--federation-flush``); ``memlog`` the path of the memory-log socket our peers report
    their written pages on (with ``memlog_mode`` and ``memlog_gid``, as the ivshmem socket's);
    ``holder`` whether this daemon holds the region from the start (default: unless it joins
    through ``peers``; a restarted federation process holds the region it kept).
    """

    listen: str
    id_range: tuple[int, int]
    shm_size: int
    vectors: int
    peers: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    key_file: Path | None = None
    allow_dir: Path | None = None
    insecure: bool = False
    identity: str | None = None
    incarnation: str | None = None
    advertise: str | None = None
    max_members: int = DEFAULT_MAX_MEMBERS
    max_backlog: int = DEFAULT_MAX_BACKLOG
    memory: bool = False
    flush: float = DEFAULT_FLUSH
    memlog: str | None = None
    memlog_mode: int = 0o600
    memlog_gid: int | None = None
    holder: bool | None = None

    @property
    def secure(self) -> bool:
        """True when CURVE is on."""
        return self.key_file is not None

    def make_incarnation(self) -> str:
        """The configured incarnation, or a fresh one."""
        return self.incarnation or uuid.uuid4().hex

    def check(self) -> None:
        """Raise :class:`FederationConfigError` for settings that cannot work."""
        if (self.key_file is None) != (self.allow_dir is None):
            raise FederationConfigError(
                "CURVE needs both a secret key file (--federation-key) and an allow "
                "directory of public keys (--federation-allow)"
            )
        check_endpoint(self.listen, bind=True)
        if self.advertise is not None:
            check_endpoint(self.advertise)
        elif _is_wildcard(self.listen):
            raise FederationConfigError(
                f"federation endpoint {self.listen} listens on every address, which other "
                "daemons cannot dial: listen on the address they reach this host at"
            )
        for endpoint in self.peers:
            check_endpoint(endpoint)
        if not (self.secure or self.insecure):
            advertised = (self.advertise,) if self.advertise else ()
            for endpoint in (self.listen, *advertised, *self.peers):
                if not is_local_endpoint(endpoint):
                    raise FederationConfigError(
                        f"federation endpoint {endpoint} is not ipc:// or loopback: give "
                        "--federation-key and --federation-allow to encrypt and "
                        "authenticate the links, or --federation-insecure"
                    )
        lo, hi = self.id_range
        if not 0 <= lo <= hi <= MAX_PEER_ID:
            raise FederationConfigError(f"invalid peer id range {lo}-{hi}")
        if not 0 <= self.vectors <= MAX_VECTORS:
            raise FederationConfigError(f"vector count must be in 0..{MAX_VECTORS}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise FederationConfigError(f"federation timeout must be positive, got {self.timeout}")
        if self.identity is not None and not 0 < len(self.identity) <= MAX_IDENTITY_LEN:
            raise FederationConfigError(
                f"federation identity must have 1..{MAX_IDENTITY_LEN} characters"
            )
        if self.incarnation is not None and not 0 < len(self.incarnation) <= 64:
            raise FederationConfigError("incarnation must have 1..64 characters")
        if self.max_members < 1 or self.max_backlog < 1:
            raise FederationConfigError("max_members and max_backlog must be positive")
        if self.memory:
            if not (math.isfinite(self.flush) and 0 < self.flush <= 3600):
                raise FederationConfigError(
                    f"--federation-flush must be a period of 0-3600 seconds, got {self.flush}"
                )
            if self.shm_size == 0 or self.shm_size % 4096:
                raise FederationConfigError(
                    f"--federation-memory on needs shared memory of whole 4 KiB pages, not "
                    f"{self.shm_size} bytes (use --federation-memory off for doorbells only)"
                )
