"""Tests of federation settings and of the rule for endpoints without keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from ivshmemd.federation.config import (
    FederationConfig,
    FederationConfigError,
    check_endpoint,
    endpoint_refusal,
    is_local_endpoint,
)


@pytest.mark.parametrize(
    "endpoint",
    [
        "ipc:///run/x.sock",
        "ipc://@abstract",
        "tcp://127.0.0.1:7300",
        "tcp://[::1]:7300",
        "tcp://localhost:1",
        "tcp://127.3.4.5:65535",
    ],
)
def test_local_endpoints(endpoint: str) -> None:
    check_endpoint(endpoint)
    assert is_local_endpoint(endpoint)
    assert endpoint_refusal(endpoint, secure=False, insecure=False) is None


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://10.0.0.1:7300", "tcp://[2001:db8::1]:7300", "tcp://host-b:7300"],
)
def test_remote_endpoints_need_keys_or_insecure(endpoint: str) -> None:
    check_endpoint(endpoint)
    assert not is_local_endpoint(endpoint)
    refusal = endpoint_refusal(endpoint, secure=False, insecure=False)
    assert refusal is not None and "--federation-insecure" in refusal
    assert endpoint_refusal(endpoint, secure=True, insecure=False) is None
    assert endpoint_refusal(endpoint, secure=False, insecure=True) is None


@pytest.mark.parametrize(
    ("endpoint", "bind", "message"),
    [
        ("udp://1.2.3.4:5", False, "is not tcp://HOST:PORT or ipc://PATH"),
        ("tcp://1.2.3.4", False, "is not tcp://HOST:PORT"),
        ("tcp://1.2.3.4:0", False, "needs a port number"),
        ("tcp://*:7300", False, "needs a host"),
        ("tcp://1.2.3.4:70000", True, "above 65535"),
        ("ipc://", True, "has no path"),
        ("tcp://" + "a" * 300 + ":1", False, "longer than 256"),
    ],
)
def test_bad_endpoints(endpoint: str, bind: bool, message: str) -> None:
    with pytest.raises(FederationConfigError, match=message):
        check_endpoint(endpoint, bind=bind)


def test_binding_accepts_wildcards() -> None:
    check_endpoint("tcp://*:7300", bind=True)
    check_endpoint("tcp://127.0.0.1:0", bind=True)
    check_endpoint("tcp://127.0.0.1:*", bind=True)


def config(**overrides: object) -> FederationConfig:
    settings: dict[str, object] = {
        "listen": "tcp://127.0.0.1:0",
        "id_range": (0, 99),
        "shm_size": 4096,
        "vectors": 1,
    }
    settings.update(overrides)
    return FederationConfig(**settings)  # type: ignore[arg-type]


def test_a_plain_loopback_config_is_fine() -> None:
    config(peers=("tcp://127.0.0.1:7301", "ipc:///x")).check()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"listen": "tcp://0.0.0.0:7300"}, "listens on every address"),
        ({"listen": "tcp://10.0.0.1:7300"}, "is not ipc:// or loopback: give --federation-key"),
        ({"listen": "tcp://*:7300", "insecure": True}, "other daemons cannot dial"),
        ({"peers": ("tcp://10.0.0.2:7300",)}, "10.0.0.2"),
        ({"advertise": "tcp://10.0.0.2:7300"}, "10.0.0.2"),
        ({"key_file": Path("k")}, "both a secret key file"),
        ({"allow_dir": Path("d")}, "both a secret key file"),
        ({"id_range": (5, 4)}, "invalid peer id range 5-4"),
        ({"id_range": (0, 70000)}, "invalid peer id range"),
        ({"vectors": 65}, "vector count"),
        ({"timeout": 0.0}, "timeout must be positive"),
        ({"timeout": float("inf")}, "timeout must be positive"),
        ({"identity": ""}, "identity"),
        ({"incarnation": "x" * 65}, "incarnation"),
        ({"max_backlog": 0}, "max_backlog"),
    ],
)
def test_configs_that_cannot_work_say_why(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(FederationConfigError, match=message):
        config(**overrides).check()


def test_insecure_or_keys_allow_remote_endpoints() -> None:
    config(listen="tcp://10.0.0.1:7300", peers=("tcp://10.0.0.2:7300",), insecure=True).check()
    config(listen="tcp://10.0.0.1:7300", key_file=Path("k"), allow_dir=Path("d")).check()
    # every address, but other daemons are told which one to dial
    config(listen="tcp://0.0.0.0:7300", advertise="tcp://10.0.0.1:7300", insecure=True).check()


def test_incarnation_is_fresh_unless_given() -> None:
    assert config().make_incarnation() != config().make_incarnation()
    assert config(incarnation="abc").make_incarnation() == "abc"
