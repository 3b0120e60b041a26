"""The unit files in systemd/: ``systemd-analyze verify`` has nothing to say about them.

``systemd-analyze verify`` exits 0 on warnings (unknown keys, unparsable values), so its
stderr and stdout must be empty. It also checks that every ExecStart= binary exists and is
executable; the units name ``/opt/ivshmem/bin/ivshmemd`` (the venv the README's install
section makes) while here the console scripts live in this venv. So the check runs twice:

1. on copies whose ExecStart= binary paths (and nothing else: the test asserts it) point at
   the console scripts installed in this venv: must be completely silent;
2. on the files exactly as shipped: the only message allowed is "Command /opt/ivshmem/bin/X
   is not executable" for an X that is indeed not installed there, so every other line of
   the shipped files is verified as is.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ivshmemd.activation import DEFAULT_FD_NAME

UNITS_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("ivshmemd.service", "ivshmemd.socket", "ivshmem-peer@.service")
INSTANCE = "ivshmem-peer@example.service"  # templates are verified through an instance
BINARIES = {
    "/opt/ivshmem/bin/ivshmemd": "ivshmemd",
    "/opt/ivshmem/bin/ivshmem-peer": "ivshmem-peer",
}
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def install_copies(
    dest: Path, rewrite: dict[str, str], units: tuple[str, ...] = UNITS
) -> list[Path]:
    copies = []
    for unit in units:
        text = (UNITS_DIR / unit).read_text()
        new = text
        for old, replacement in rewrite.items():
            new = new.replace(old, replacement)
        changed = [
            (a, b) for a, b in zip(text.splitlines(), new.splitlines(), strict=True) if a != b
        ]
        assert all(a.startswith("ExecStart=") for a, _ in changed), changed
        name = INSTANCE if unit.endswith("@.service") else unit
        (dest / name).write_text(new)
        copies.append(dest / name)
    return copies


def venv_script(name: str) -> Path | None:
    path = Path(sys.executable).parent / name
    return path if path.exists() else None


@pytest.mark.parametrize(
    ("units", "binary"),
    [
        (("ivshmemd.service", "ivshmemd.socket"), "ivshmemd"),
        (("ivshmem-peer@.service",), "ivshmem-peer"),
    ],
    ids=["daemon", "peer"],
)
def test_units_verify_silently_with_installed_console_scripts(
    tmp_path: Path, units: tuple[str, ...], binary: str
) -> None:
    script = venv_script(binary)
    if script is None:
        pytest.skip(f"console script {binary} is not installed in the venv yet")
    rewrite = {old: str(script) for old, name in BINARIES.items() if name == binary}
    result = verify(install_copies(tmp_path, rewrite, units))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


def test_units_verify_as_shipped(tmp_path: Path) -> None:
    result = verify(install_copies(tmp_path, {}))
    allowed = re.compile(
        r"^\S+: Command (/opt/ivshmem/bin/\S+) is not executable: No such file or directory$"
    )
    for line in (result.stderr + result.stdout).splitlines():
        match = allowed.match(line)
        assert match, f"systemd-analyze verify complained: {line}"
        assert match.group(1) in BINARIES
        assert not Path(match.group(1)).exists()


def unit_lines(unit: str) -> list[str]:
    return [
        line.strip()
        for line in (UNITS_DIR / unit).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def setting(unit: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit_lines(unit) if line.split("=", 1)[0] == key]


def test_units_agree_with_the_daemon() -> None:
    service, socket_unit = "ivshmemd.service", "ivshmemd.socket"
    assert setting(service, "Type") == ["notify"]
    assert setting(service, "RemoveIPC") == ["no"]
    assert setting(service, "DynamicUser") == []  # would imply RemoveIPC=yes
    assert setting(service, "RuntimeDirectory") == ["ivshmem"]
    (exec_start,) = setting(service, "ExecStart")
    (listen,) = setting(socket_unit, "ListenStream")
    # the socket unit listens where the daemon is told its socket is (-S), so that the
    # control endpoints derived from -S are the ones `ivshmemctl -S` computes
    assert f"-S {listen}" in exec_start
    assert listen.startswith("%t/ivshmem/")
    assert setting(socket_unit, "FileDescriptorName") == [DEFAULT_FD_NAME]
    assert setting(socket_unit, "SocketMode") == ["0600"]
    for unit in (service, "ivshmem-peer@.service"):
        assert setting(unit, "ProtectSystem") == ["strict"]
        assert setting(unit, "RestrictAddressFamilies") == ["AF_UNIX"]
        assert setting(unit, "PrivateDevices") == []  # would hide /dev/shm from the peers
    assert setting("ivshmem-peer@.service", "EnvironmentFile") == ["/etc/ivshmem/peer-%i.conf"]


def test_the_service_keeps_its_peers_across_upgrades_and_crashes() -> None:
    """What issue 14 needs from the unit: an fd store big enough, $FDSTORE for systemd
    versions that do not set it, the runtime directory kept across a restart (the state
    file), a restart after a crash, and reload as the in-place upgrade."""
    service = "ivshmemd.service"
    (store_max,) = setting(service, "FileDescriptorStoreMax")
    assert int(store_max) >= 2 + 4096 * 2  # listen, shm, the default --max-peers at -n 1
    assert setting(service, "Environment") == [f"FDSTORE={store_max}"]
    assert setting(service, "RuntimeDirectoryPreserve")[0] in ("restart", "yes")
    assert setting(service, "Restart") == ["on-failure"]
    assert setting(service, "ExecReload") == ["/bin/kill -USR2 $MAINPID"]
