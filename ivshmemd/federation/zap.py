"""A ZAP authenticator for CURVE, driven from trio (no thread): who may connect to us.

libzmq asks the ZAP handler of a socket's context (a REP socket bound to
``inproc://zeromq.zap.01``, RFC 27) whether each CURVE client may connect. This one answers
from the allow directory's public keys: a known key is admitted with its z85 text as the
``User-Id`` (libzmq attaches it to every message of that connection, which is how the
daemon learns a member's key to dial it back); an unknown key is refused and logged (once
per key per :data:`LOG_EVERY` seconds, since a refused daemon keeps retrying).

Without a ZAP handler libzmq would admit every client, so the :class:`ZapAuthenticator` is
made (which binds its socket) before the CURVE server socket binds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Final

import zmq
import zmq.utils.z85

from ivshmemd.zmqtrio import TrioSocket

from .throttle import Throttle

__all__ = ["ZAP_DOMAIN", "ZAP_ENDPOINT", "ZapAuthenticator", "zap_answer"]

log = logging.getLogger(__name__)

ZAP_ENDPOINT: Final = "inproc://zeromq.zap.01"
ZAP_DOMAIN: Final = "ivshmem-federation"
ZAP_VERSION: Final = b"1.0"
LOG_EVERY: Final = 60.0


def _reply(request_id: bytes, code: bytes, text: bytes, user_id: bytes = b"") -> list[bytes]:
    return [ZAP_VERSION, request_id, code, text, user_id, b""]


Refusal = tuple[str, str]


def zap_answer(
    frames: list[bytes], allowed: Mapping[str, str]
) -> tuple[list[bytes], Refusal | None]:
    """The reply to one ZAP request, and if it refuses, ``(what, log message)`` (``what``
    identifies the refused party for throttling the log)."""
    if len(frames) < 6 or frames[0] != ZAP_VERSION:
        return _reply(frames[1] if len(frames) > 1 else b"", b"500", b"bad ZAP request"), None
    request_id, _domain, address, _identity, mechanism = frames[1:6]
    where = address.decode("ascii", "replace")
    if mechanism != b"CURVE" or len(frames) != 7 or len(frames[6]) != 32:
        return _reply(request_id, b"400", b"CURVE only"), (
            where,
            f"{where}: mechanism {mechanism.decode('ascii', 'replace')}, not CURVE",
        )
    key = zmq.utils.z85.encode(frames[6]).decode("ascii")
    if key not in allowed:
        return _reply(request_id, b"400", b"key not allowed"), (
            key,
            f"{where}: public key {key} is not in the allow directory",
        )
    return _reply(request_id, b"200", b"OK", key.encode("ascii")), None


class ZapAuthenticator:
    """The ZAP handler of one zmq context. Construction binds its socket (synchronously, so
    that a CURVE server bound afterwards is never without it: libzmq queues the requests
    until :meth:`serve` answers them); :meth:`close` when done."""

    def __init__(self, context: zmq.Context[Any], allowed: Mapping[str, str]) -> None:
        self.allowed = allowed
        self._sock = TrioSocket(context.socket(zmq.REP))
        try:
            self._sock.socket.setsockopt(zmq.LINGER, 0)
            self._sock.socket.bind(ZAP_ENDPOINT)
        except BaseException:
            self._sock.close()
            raise

    async def serve(self) -> None:
        """Answer ZAP requests from ``allowed`` (``{z85 public key: name}``) until
        cancelled."""
        throttle = Throttle(LOG_EVERY)
        sock = self._sock
        while True:
            frames = await sock.recv_multipart()
            reply, refusal = zap_answer(frames, self.allowed)
            if refusal is not None:
                what, message = refusal
                if throttle.allow(what, time.monotonic()):
                    log.warning("federation: refused a connection from %s", message)
            await sock.send_multipart(reply)

    def close(self) -> None:
        self._sock.close()
