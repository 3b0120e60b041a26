"""CURVE key files for a control plane reached over tcp (``zmq.auth`` certificates).

tcp carries no credentials, so the daemon serves tcp only to clients that prove who they
are with CURVE (ZMTP's public-key encryption and authentication). Keys are ordinary
``zmq.auth`` certificate files, made for instance with::

    python -c "import zmq.auth; zmq.auth.create_certificates('keys', 'server')"
    python -c "import zmq.auth; zmq.auth.create_certificates('keys', 'alice')"

which writes ``keys/server.key`` (public) and ``keys/server.key_secret`` (both). The daemon
needs its ``*.key_secret`` (``--curve-secret-key``) and a directory holding the public
certificates of the clients it accepts (``--curve-clients``); ``ivshmemctl`` needs its own
``*.key_secret`` (``--curve-key``) and the daemon's public certificate
(``--curve-server-key``). Any problem with a file is one :class:`CurveKeyError` line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
import zmq.auth

from .control.server import CurveKeys

__all__ = ["ClientCurve", "CurveKeyError", "client_keys", "server_keys"]


class CurveKeyError(Exception):
    """A key file or directory cannot be used (the message says why)."""


def _load(path: str, need_secret: bool, what: str) -> tuple[bytes, bytes | None]:
    if not zmq.has("curve"):
        raise CurveKeyError("this libzmq has no CURVE support")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read {what} {path}: {exc}") from None
    if need_secret and not secret:
        raise CurveKeyError(f"{what} {path} holds no secret key (use the *.key_secret file)")
    return public, secret


def server_keys(secret_file: str, clients_dir: str) -> CurveKeys:
    """The daemon's key pair and the public keys of the clients it accepts."""
    public, secret = _load(secret_file, True, "CURVE secret key")
    assert secret is not None
    if not os.path.isdir(clients_dir):
        raise CurveKeyError(f"CURVE clients directory {clients_dir} does not exist")
    try:
        clients = frozenset(zmq.auth.load_certificates(clients_dir))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read the CURVE client keys in {clients_dir}: {exc}") from None
    if not clients:
        raise CurveKeyError(f"no client certificate (*.key) in {clients_dir}: nobody could connect")
    return CurveKeys(public=public, secret=secret, clients=clients)


@dataclass(frozen=True)
class ClientCurve:
    """A client's key pair and the server's public key."""

    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket[bytes]) -> None:
        """Make ``sock`` connect with CURVE (before ``connect``)."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def client_keys(secret_file: str, server_public_file: str) -> ClientCurve:
    """ivshmemctl's key pair and the daemon's public key."""
    public, secret = _load(secret_file, True, "CURVE secret key")
    server, _ = _load(server_public_file, False, "the daemon's CURVE public key")
    assert secret is not None
    return ClientCurve(public=public, secret=secret, server=server)
