"""The ``ivshmem`` pytest fixtures as another project uses them (issue 11, item 14): pytest
runs in a subprocess on a project written under ``tmp_path``, with only the installed
plugin (entry point ``pytest11: ivshmem``) to go by."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TIMEOUT = 180

INI_TRIO = "[pytest]\ntrio_mode = true\n"


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def write(project: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (project / name).write_text(text)
    return project


def test_session_daemon_many_peers_and_logs_attached_on_failure(tmp_path: Path) -> None:
    project = write(
        tmp_path,
        {
            "pytest.ini": INI_TRIO + "ivshmem_session_vectors = 1\nivshmem_session_size = 4M\n",
            "test_theirs.py": """
async def test_four_pingers_pair_up(ivshmem_session_daemon, ivshmem_peers):
    peers = await ivshmem_peers.many(ivshmem_session_daemon, "ping", 4, ["--count", "50"])
    summaries = [await peer.wait_finished() for peer in peers]
    assert sum(s.startswith("ping: 50 round trips") for s in summaries) == 2


async def test_the_same_daemon_again(ivshmem_session_daemon, ivshmem_peers):
    a, b = await ivshmem_peers.many(ivshmem_session_daemon, "ping", 2, ["--count", "5"])
    assert min(a.peer_id, b.peer_id) >= 4  # the session daemon's ids go on
    await a.wait_exit()


async def test_that_fails(ivshmem_session_daemon, ivshmem_daemon, ivshmem_peers):
    async with ivshmem_daemon(vectors=1) as daemon:
        peer = await ivshmem_peers(daemon, "monitor")
        assert peer.peer_id == 99, "on purpose"
""",
        },
    )
    done = run_pytest(project)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "1 failed, 2 passed" in out, out
    # the failed test's report carries every log: its daemon's, its peer's, the session's
    assert "ivshmem daemon (pid " in out and "ivshmemd: peer 0 joined" in out, out
    assert "ivshmem peer 0 (pid " in out and "running plugin monitor" in out, out
    assert "'event': 'running'" in out, out
    sections = [line for line in out.splitlines() if line.startswith("-") and "ivshmem" in line]
    assert len(sections) == 3, sections  # session daemon, test daemon, peer
    assert "AssertionError: on purpose" in out


def test_an_async_fixture_outside_trio_says_what_to_do(tmp_path: Path) -> None:
    project = write(
        tmp_path,
        {
            "pytest.ini": "[pytest]\n",
            "test_theirs.py": """
async def test_ping(ivshmem_daemon, ivshmem_peers):
    pass
""",
        },
    )
    done = run_pytest(project, "-W", "ignore")
    assert done.returncode == 1, done.stdout
    assert (
        "ivshmem_peers is an async fixture: it needs pytest-trio (pip install pytest-trio) and "
        "a trio test: set 'trio_mode = true' in your pytest configuration or mark the test "
        "@pytest.mark.trio"
        in done.stdout.replace("\n", " ").replace("  ", " ")
        or "ivshmem_peers is an async fixture" in done.stdout
    ), done.stdout
    assert "Traceback" not in done.stdout


def test_the_default_timeout_comes_from_the_ini_file_or_the_command_line(
    tmp_path: Path,
) -> None:
    project = write(
        tmp_path,
        {
            "pytest.ini": INI_TRIO + "ivshmem_timeout = 0.3\n",
            "test_theirs.py": """
import pytest
from peers.harness import PeerError


async def test_a_wait_that_cannot_end(ivshmem_daemon, ivshmem_peers, request):
    async with ivshmem_daemon(vectors=1, timeout=30) as daemon:  # starting may be slow
        peer = await ivshmem_peers(daemon, "monitor", timeout=30)
        with pytest.raises(PeerError) as failed:
            await peer.wait_finished()
        expected = request.config.getoption("ivshmem_timeout") or 0.3
        assert f"did not within {expected:g} s" in str(failed.value)


def test_plain_tests_get_it_too(ivshmem_daemon_sync, ivshmem_peers_sync):
    with ivshmem_daemon_sync(vectors=1, timeout=30) as daemon:
        (peer,) = ivshmem_peers_sync.many(daemon, "monitor", 1, timeout=30)
        with pytest.raises(PeerError, match="did not within"):
            peer.wait_finished()
""",
        },
    )
    done = run_pytest(project)
    assert done.returncode == 0, done.stdout + done.stderr
    done = run_pytest(project, "--ivshmem-timeout", "0.4")
    assert done.returncode == 0, done.stdout + done.stderr
    bad = run_pytest(project, "--ivshmem-timeout", "-1")
    assert bad.returncode != 0 and "ivshmem_timeout must be positive" in bad.stderr, bad
