"""Topology files (``ivshmemctl up -f``): what they describe, and one clear error per bad
key or value, naming the file, the line and the key (issue 11, item 15)."""

from __future__ import annotations

import pytest

from peers.topology import PeerGroup, RegionSpec, TopologyError, check_plugins, parse_topology

GOOD = """\
# two regions
[[region]]
name = "pp"
size = "4M"
vectors = 1

[[region.peers]]
plugin = "ping"
count = 2
options = { count = 500, warmup = 10 }

[[region]]
name = "stream"
vectors = 2
shm_name = "vmshm"
socket = "/run/stream.sock"

[[region.peers]]
plugin = "ring"
count = 4
options = ["--bytes", "64M"]

[[region.peers]]
plugin = "monitor"
"""


def test_a_topology_describes_regions_and_their_peer_groups() -> None:
    topology = parse_topology(GOOD, "t.toml")
    check_plugins(topology, "ivshmemctl up")
    assert topology.regions == (
        RegionSpec(
            "pp",
            (PeerGroup("ping", 2, ("--count", "500", "--warmup", "10"), line=7),),
            size=4 << 20,
            vectors=1,
            line=2,
        ),
        RegionSpec(
            "stream",
            (
                PeerGroup("ring", 4, ("--bytes", "64M"), line=18),
                PeerGroup("monitor", 1, (), line=23),
            ),
            vectors=2,
            shm_name="vmshm",
            socket="/run/stream.sock",
            line=12,
        ),
    )
    assert topology.peers == 7
    assert topology.plugins == ["monitor", "ping", "ring"]


BAD = """\
[[region]]
name = "a"
sise = "4M"
vectors = 99

[[region.peers]]
plugin = "ping"
count = 0

[[region.peers]]
plugin = "ring"
options = { bytes = [1, 2] }

[[region]]
name = "a b"
size = "lots"

[hosts.b]
endpoint = "tcp://b:5555"
"""


def test_every_bad_key_and_value_is_named_with_its_line() -> None:
    with pytest.raises(TopologyError) as refused:
        parse_topology(BAD, "bad.toml")
    assert refused.value.problems == [
        "bad.toml:18: 'hosts' is reserved for daemons federated across hosts (not supported yet)",
        "bad.toml:3: region 'a': unknown key 'sise' (known keys: name, size, vectors, "
        "shm_name, socket, peers)",
        "bad.toml:4: region 'a': 'vectors' must be an integer 0..64, got 99",
        "bad.toml:8: region 'a', peers #1: 'count' must be an integer 1..4096, got 0",
        "bad.toml:12: region 'a', peers #2: options: 'bytes' must be a string, a number or a "
        "boolean",
        "bad.toml:15: region 'a b': 'name' must be 1..64 letters, digits, '_', '.' or '-', "
        "got 'a b'",
        "bad.toml:16: region 'a b': 'size': invalid size 'lots': expected digits with an "
        "optional fraction and a suffix B, K, M, G, T, P or E (optionally followed by iB), "
        "or 0x-hex bytes",
        "bad.toml:14: region 'a b': needs at least one [[region.peers]] group",
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "t.toml: no region: describe at least one with [[region]]"),
        (
            "[[region]]\nname = 'x'\n[[region.peers]]\n",
            "t.toml:3: region 'x', peers #1: 'plugin' (a plugin name) is required",
        ),
        ("region = 3\n", "t.toml:1: no region: describe at least one with [[region]]"),
        ("[[region]\n", "t.toml: not valid TOML: "),
        (
            "[[region]]\n[[region.peers]]\nplugin = 'monitor'\nhost = 'b'\n",
            "t.toml:4: region #1, peers #1: 'host' is reserved for daemons federated across "
            "hosts (not supported yet)",
        ),
        (
            "[[region]]\nname='a'\n[[region.peers]]\nplugin='monitor'\n"
            "[[region]]\nname='a'\n[[region.peers]]\nplugin='monitor'\n",
            "t.toml:5: region name 'a' is used more than once",
        ),
    ],
)
def test_small_mistakes(text: str, problem: str) -> None:
    with pytest.raises(TopologyError) as refused:
        parse_topology(text, "t.toml")
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems


def test_plugins_and_their_options_are_checked_with_the_groups_line() -> None:
    text = """\
[[region]]
[[region.peers]]
plugin = "no-such-plugin"

[[region.peers]]
plugin = "ping"
options = { count = "many" }

[[region.peers]]
plugin = "ping"
options = ["--vectors", "2"]

[[region.peers]]
plugin = "ring"
count = 3
"""
    topology = parse_topology(text, "p.toml")
    with pytest.raises(TopologyError) as refused:
        check_plugins(topology, "ivshmemctl up")
    problems = refused.value.problems
    assert problems[0].startswith("p.toml:2: unknown plugin 'no-such-plugin' (available: ")
    assert problems[1:] == [
        "p.toml:5: argument --count: invalid int value: 'many'",
        "p.toml:9: plugin ping: unrecognized arguments: --vectors 2",
        "p.toml:13: ring pairs its peers: 3 peers of it in region 'region1' would leave one "
        "waiting for a partner for ever; give an even count",
    ]
