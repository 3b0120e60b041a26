"""The units' commands with the shipped sample configuration files run (issue 11, item 10).

The peer unit's old sample (``IVSHMEM_PEER_ARGS=--verbose``) was refused (exit 2), which
with ``Restart=on-failure`` restart-looped every 2 s. Here each unit's ``ExecStart=`` is
expanded the way systemd expands it — ``Environment=`` defaults, then the sample file as
its ``EnvironmentFile=``, ``${VAR}`` as one word and a lone ``$VAR`` split at whitespace,
``%t``/``%i`` specifiers — with ``/opt/ivshmem/bin/`` (the README's install) pointing at this
environment's commands, and run: the daemon gets ready, the peer runs its plugin against
it and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from ivshmemd.supervise import Child, open_supervisor, unique_name

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
INSTALLED = "/opt/ivshmem/bin/"
TIMEOUT = 60.0


def unit_settings(unit: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / unit).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as systemd reads an EnvironmentFile= (comments, quotes)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        words = shlex.split(value) if value else []
        env[key.strip()] = " ".join(words)
    return env


def expand(command: str, env: dict[str, str], specifiers: dict[str, str]) -> list[str]:
    """systemd's ExecStart= expansion: specifiers, ${VAR} as one word, $VAR split."""
    for spec, value in specifiers.items():
        command = command.replace(spec, value)
    argv: list[str] = []
    for word in shlex.split(command):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            argv += env.get(alone.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return argv


def installed_here(argv: list[str]) -> list[str]:
    assert argv[0].startswith(INSTALLED), argv
    return [str(Path(sys.executable).parent / argv[0][len(INSTALLED) :]), *argv[1:]]


async def test_the_sample_configurations_run(short_tmp: Path) -> None:
    runtime = short_tmp / "run"
    (runtime / "ivshmem").mkdir(parents=True)
    daemon_unit = unit_settings("ivshmemd.service")
    (daemon_start,) = daemon_unit["ExecStart"]
    daemon_env = environment_file(UNITS / "ivshmemd.conf")
    daemon_argv = installed_here(expand(daemon_start, daemon_env, {"%t": str(runtime)}))
    shm = unique_name()
    daemon_argv += ["-M", shm]  # a unique shm here (the sample keeps the default name)
    socket_path = str(runtime / "ivshmem" / "ivshmem.sock")
    assert f"-S {socket_path}" in " ".join(daemon_argv)

    peer_unit = unit_settings("ivshmem-peer@.service")
    (peer_start,) = peer_unit["ExecStart"]
    peer_env: dict[str, str] = {}
    for assignment in peer_unit["Environment"]:
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            peer_env[key] = value.replace("%t", str(runtime))
    assert peer_unit["EnvironmentFile"] == ["/etc/ivshmem/peer-%i.conf"]
    peer_env.update(environment_file(UNITS / "peer-monitor.conf"))
    peer_argv = installed_here(expand(peer_start, peer_env, {"%t": str(runtime), "%i": "monitor"}))
    assert peer_argv[1:] == [
        "-S", socket_path, "--verbose", "--wait", "30", "--plugin", "monitor",
    ]  # fmt: skip

    async with open_supervisor() as supervisor:
        daemon = await supervisor.start(Child(daemon_argv), notify=True)
        try:
            await daemon.wait_ready(TIMEOUT)
            assert daemon.log_matching(r"16777216 bytes reserved, 2 vectors per peer"), daemon.log
            peer = await supervisor.start(Child(peer_argv))
            await peer.wait_log(r"^peer 0: running plugin monitor \(id 0, .*2 vectors", 1, TIMEOUT)
            peer.terminate()
            assert await peer.wait_exit(TIMEOUT) == 0, peer.log
            assert peer.log_matching(r"SIGTERM received, stopping"), peer.log
        finally:
            await daemon.stop()
    assert not Path("/dev/shm", shm).exists()
