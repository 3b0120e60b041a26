"""Who may join us: the federation's use of the daemon's ZAP handler (:mod:`ivshmemd.zap`).

Federation sockets have the ZAP domain :data:`ZAP_DOMAIN` and speak CURVE only: a member
whose public key is in the allow directory is admitted with its z85 key as the ``User-Id``
(libzmq attaches it to every message of that connection, which is how the daemon learns a
member's key to dial it back); any other is refused and logged (once per key per
:data:`LOG_EVERY` seconds, since a refused daemon keeps retrying).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final

import zmq

from ivshmemd.zap import ZAP_ENDPOINT, ZapHandler, ZapPolicy, answer

__all__ = ["ZAP_DOMAIN", "ZAP_ENDPOINT", "ZapAuthenticator", "zap_answer"]

log = logging.getLogger(__name__)

ZAP_DOMAIN: Final = "ivshmem-federation"
LOG_EVERY: Final = 60.0

Refusal = tuple[str, str]


def zap_answer(
    frames: list[bytes], allowed: Mapping[str, str]
) -> tuple[list[bytes], Refusal | None]:
    """The reply to one ZAP request, and if it refuses, ``(who, log message)`` (``who``
    identifies the refused party for throttling the log)."""
    reply, verdict = answer(frames, ZapPolicy(curve_clients=allowed), "federation")
    return reply, (verdict.party, verdict.why) if verdict.why else None


class ZapAuthenticator(ZapHandler):
    """The ZAP handler of the federation's zmq context: CURVE only, the keys of
    ``allowed`` (``{z85 public key: name}``). Make it before the CURVE server binds."""

    def __init__(self, context: zmq.Context[Any], allowed: Mapping[str, str]) -> None:
        super().__init__(
            context, ZapPolicy(curve_clients=allowed), "federation", log, log_interval=LOG_EVERY
        )
        self.allowed = allowed
