"""Tests of CURVE certificates (keygen, loading) and of the ZAP authenticator."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio
import zmq
import zmq.auth

from ivshmemd.curve import KeyFileError, keygen, load_allowed_keys, load_secret_key
from ivshmemd.federation.zap import ZAP_DOMAIN, ZapAuthenticator, zap_answer
from ivshmemd.zmqtrio import TrioSocket

from .hosts import LogWaiter


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_keygen_writes_a_zmq_certificate_pair_with_safe_modes(tmp_path: Path) -> None:
    public, secret = keygen(tmp_path / "keys", "host-a")
    assert public == tmp_path / "keys" / "host-a.key"
    assert secret == tmp_path / "keys" / "host-a.key_secret"
    assert mode(public) == 0o644 and mode(secret) == 0o600
    assert sorted(os.listdir(tmp_path / "keys")) == ["host-a.key", "host-a.key_secret"]
    pub, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert none is None and pub == pub2 and sec is not None
    pair = load_secret_key(secret)
    assert pair.public == pub.decode() and pair.secret == sec.decode()
    assert zmq.curve_public(sec) == pub


def test_keygen_never_replaces_a_file_or_writes_through_a_symlink(tmp_path: Path) -> None:
    keygen(tmp_path, "a")
    before = (tmp_path / "a.key_secret").read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        keygen(tmp_path, "a")
    assert (tmp_path / "a.key_secret").read_bytes() == before
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "b.key_secret").symlink_to(elsewhere)  # dangling
    with pytest.raises(KeyFileError, match="already exists"):
        keygen(tmp_path, "b")
    assert not elsewhere.exists()
    assert not (tmp_path / "b.key").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keygen")] == []


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x", "x" * 65, "a b"])
def test_keygen_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(KeyFileError, match="invalid key name"):
        keygen(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


def test_loading_a_secret_key_refuses_unsafe_files(tmp_path: Path) -> None:
    public, secret = keygen(tmp_path, "a")
    link = tmp_path / "link.key_secret"
    link.symlink_to(secret)
    with pytest.raises(KeyFileError, match="is a symlink"):
        load_secret_key(link)
    with pytest.raises(KeyFileError, match="holds no secret key"):
        _private_copy(public)
    os.chmod(secret, 0o640)
    with pytest.raises(KeyFileError, match=r"mode 0640.*chmod 600"):
        load_secret_key(secret)
    garbage = tmp_path / "garbage"
    garbage.write_text("hello\n")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a zmq certificate"):
        load_secret_key(garbage)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_secret_key(tmp_path)
    with pytest.raises(KeyFileError, match="cannot open"):
        load_secret_key(tmp_path / "missing")


def _private_copy(public: Path) -> Any:
    copy = public.with_name("copy.key")
    copy.write_bytes(public.read_bytes())
    copy.chmod(0o600)
    return load_secret_key(copy)


def test_the_allow_directory_yields_public_keys_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for name in ("a", "b"):
        public, _secret = keygen(keys, name)
        (allowed / public.name).write_bytes(public.read_bytes())
    (allowed / "c.key").symlink_to(keygen(keys, "c")[0])
    (allowed / "d.key_secret").write_bytes((keys / "a.key_secret").read_bytes())
    (allowed / "README").write_text("not a key")
    caplog.set_level(logging.WARNING)
    found = load_allowed_keys(allowed)
    assert sorted(found.values()) == ["a", "b"]
    assert load_secret_key(keys / "a.key_secret").public in found
    assert "c.key: a symlink" in caplog.text
    assert "d.key_secret is a secret key" in caplog.text


def test_a_broken_or_empty_allow_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no public keys"):
        load_allowed_keys(tmp_path)
    (tmp_path / "bad.key").write_text("nothing here\n")
    with pytest.raises(KeyFileError, match=r"bad\.key is not a zmq certificate"):
        load_allowed_keys(tmp_path)
    with pytest.raises(KeyFileError, match="cannot open the allow directory"):
        load_allowed_keys(tmp_path / "missing")


# -- ZAP ----------------------------------------------------------------------------------------


def _request(key: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"7", ZAP_DOMAIN.encode(), b"127.0.0.1", b"", mechanism, key]


def test_zap_admits_allowed_keys_with_their_key_as_user_id(tmp_path: Path) -> None:
    pair = load_secret_key(keygen(tmp_path, "a")[1])
    raw = zmq.utils.z85.decode(pair.public)
    reply, refusal = zap_answer(_request(raw), {pair.public: "a"})
    assert reply == [b"1.0", b"7", b"200", b"OK", pair.public.encode(), b""]
    assert refusal is None
    reply, refusal = zap_answer(_request(raw), {})
    assert reply[2] == b"400" and refusal is not None
    assert refusal == (
        pair.public,
        f"127.0.0.1: public key {pair.public} is not in the allow directory",
    )
    reply, refusal = zap_answer(_request(b"", b"NULL")[:6], {})
    assert reply[2] == b"400" and refusal is not None and "not CURVE" in refusal[1]
    assert zap_answer([b"2.0", b"x"], {})[0][2] == b"500"


async def test_zap_over_real_curve_sockets_admits_and_refuses(tmp_path: Path) -> None:
    server = load_secret_key(keygen(tmp_path, "server")[1])
    friend = load_secret_key(keygen(tmp_path, "friend")[1])
    stranger = load_secret_key(keygen(tmp_path, "stranger")[1])
    context: zmq.Context[Any] = zmq.Context()
    router = TrioSocket(context.socket(zmq.ROUTER))
    clients: list[TrioSocket] = []
    zap = ZapAuthenticator(context, {server.public: "server", friend.public: "friend"})
    try:
        with LogWaiter() as logged:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(zap.serve)
                sock = router.socket
                sock.setsockopt(zmq.CURVE_SERVER, 1)
                sock.setsockopt(zmq.CURVE_SECRETKEY, server.secret.encode())
                sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                sock.bind(f"ipc://{tmp_path}/s")
                for pair, text in ((stranger, b"stranger"), (friend, b"friend")):
                    client = TrioSocket(context.socket(zmq.DEALER))
                    clients.append(client)
                    client.socket.setsockopt(zmq.CURVE_SERVERKEY, server.public.encode())
                    client.socket.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.encode())
                    client.socket.setsockopt(zmq.CURVE_SECRETKEY, pair.secret.encode())
                    client.socket.connect(f"ipc://{tmp_path}/s")
                    await client.send_multipart([text])
                with trio.fail_after(20):
                    frames = await router.recv_frames()
                    assert frames[1].bytes == b"friend"
                    assert frames[1].get("User-Id") == friend.public
                    await logged.wait_for(f"public key {stranger.public} is not in")
                assert router.try_recv_multipart() is None  # the stranger's message never came
                nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
        router.close()
        zap.close()
        context.term()
