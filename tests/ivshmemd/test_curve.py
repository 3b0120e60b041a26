"""The control plane's CURVE keys and ZAP decisions go through the one key loader
(:mod:`ivshmemd.curve`) and the one ZAP policy (:mod:`ivshmemd.zap`) the federation uses."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import zmq.utils.z85

from ivshmemd.curve import KeyFileError, client_keys, keygen, load_secret_key, server_keys
from ivshmemd.ratelimit import LogLimiter
from ivshmemd.zap import ConnectionCounter, ZapPolicy, ZapRequest, answer


def _keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The daemon's secret key, the clients' directory (alice), alice's secret key."""
    _, server_secret = keygen(tmp_path / "keys", "server")
    clients = tmp_path / "clients"
    alice_public, alice_secret = keygen(tmp_path / "keys", "alice")
    clients.mkdir()
    os.link(alice_public, clients / "alice.key")
    return server_secret, clients, alice_secret


def test_the_control_plane_loads_its_keys_through_the_one_loader(tmp_path: Path) -> None:
    server_secret, clients, alice_secret = _keys(tmp_path)
    keys = server_keys(str(server_secret), str(clients))
    alice = load_secret_key(alice_secret)
    assert keys.clients == frozenset({alice.public.encode()})
    client = client_keys(str(alice_secret), str(server_secret.with_suffix(".key")))
    assert client.server == keys.public and client.public == alice.public.encode()


def test_the_control_plane_refuses_a_shared_or_symlinked_secret_key(tmp_path: Path) -> None:
    server_secret, clients, alice_secret = _keys(tmp_path)
    link = tmp_path / "link.key_secret"
    link.symlink_to(server_secret)
    with pytest.raises(KeyFileError, match="is a symlink"):
        server_keys(str(link), str(clients))
    os.chmod(alice_secret, 0o644)
    with pytest.raises(KeyFileError, match=r"mode 0644.*chmod 600"):
        client_keys(str(alice_secret), str(server_secret.with_suffix(".key")))
    with pytest.raises(KeyFileError, match="no public keys"):
        server_keys(str(server_secret), str(tmp_path / "keys" / ".."))


def _request(mechanism: bytes, address: str, *credentials: bytes) -> list[bytes]:
    return [b"1.0", b"9", b"dom", address.encode(), b"", mechanism, *credentials]


def test_one_policy_judges_ipc_credentials_curve_keys_and_caps(tmp_path: Path) -> None:
    alice = load_secret_key(keygen(tmp_path, "alice")[1])
    raw = zmq.utils.z85.decode(alice.public)
    counter = ConnectionCounter("control", limit=1)
    policy = ZapPolicy(
        allow=lambda uid, gid, pid: None if uid == 1000 else f"uid {uid} is not allowed",
        curve_clients={alice.public: "alice"},
        counters={b"dom": counter},
    )
    reply, verdict = answer(_request(b"NULL", "/s.sock:1000:100:42"), policy)
    assert reply == [b"1.0", b"9", b"200", b"OK", b"uid:1000", b""] and verdict.admitted
    _, verdict = answer(_request(b"NULL", "/s.sock:1001:100:42"), policy)
    assert (verdict.status, verdict.text) == (400, "uid 1001 is not allowed")
    _, verdict = answer(_request(b"NULL", "127.0.0.1"), policy)
    assert verdict.status == 400 and "no credentials" in verdict.text
    reply, verdict = answer(_request(b"CURVE", "127.0.0.1", raw), policy)
    assert verdict.admitted and reply[4] == alice.public.encode()
    _, verdict = answer(_request(b"CURVE", "127.0.0.1", b"\0" * 32), policy)
    assert verdict.status == 400 and "is not in the allow directory" in verdict.why
    _, verdict = answer(_request(b"PLAIN", "127.0.0.1"), policy)
    assert verdict.status == 400 and "not NULL (ipc) or CURVE" in verdict.why
    counter.apply(zmq.EVENT_ACCEPTED, 7)
    _, verdict = answer(_request(b"NULL", "/s.sock:1000:100:42"), policy)
    assert verdict.status == 300 and verdict.text == "too many control connections (1)"
    assert ZapRequest.parse([b"1.0", b"9"]) is None


def test_a_policy_that_raises_refuses_with_500() -> None:
    def broken(uid: int, gid: int, pid: int) -> str | None:
        raise RuntimeError("boom")

    reply, verdict = answer(_request(b"NULL", "/s:1:1:1"), ZapPolicy(allow=broken))
    assert reply[2] == b"500" and not verdict.admitted


def test_refusal_log_lines_are_limited_per_party_in_bounded_memory() -> None:
    now = [0.0]
    limiter = LogLimiter(logging.getLogger("test"), 1.0, lambda: now[0], max_keys=4)
    assert limiter.log("a", logging.INFO, "x") and not limiter.log("a", logging.INFO, "x")
    for key in "bcdefgh":
        assert limiter.log(key, logging.INFO, "x")
    assert len(limiter._state) <= 4
