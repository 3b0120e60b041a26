"""The examples run (issue 11, item 13): the plugin package of examples/hello-plugin with
``ivshmemctl up``, and the external test project of examples/external-tests on the fixtures.

Here the package is made visible the way an installed one is (its ``*.dist-info`` with the
entry points its ``pyproject.toml`` declares, its sources on PYTHONPATH), without touching
this environment; ``.ci/run`` installs it for real (``pip install ./examples/hello-plugin``)
and runs both the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "examples" / "hello-plugin"
PROJECT = ROOT / "examples" / "external-tests"
TIMEOUT = 240


def installed_like(tmp_path: Path) -> dict[str, str]:
    """An environment where the example package is found as if installed."""
    meta = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    dist = tmp_path / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    groups = meta["entry-points"]
    (dist / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items())
            for group, eps in groups.items()
        )
    )
    paths = [str(tmp_path), str(PACKAGE / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


def run(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_the_plugin_package_runs_two_peers_that_finish_on_their_own(tmp_path: Path) -> None:
    env = installed_like(tmp_path)
    listed = run([sys.executable, "-m", "peers", "--list-plugins"], env)
    assert re.search(r"^hello +two peers greet each other", listed.stdout, re.M), listed
    argv = [sys.executable, "-m", "peers.launcher", "up", "--timeout", "120", "--peers", "4",
            "--plugin", "hello", "--text", "hi"]  # fmt: skip
    done = run(argv, env)
    assert done.returncode == 0, done.stderr
    summaries = done.stdout.splitlines()[1:]
    said = [s for s in summaries if re.fullmatch(r"hello: peer \d+ said 'hi from peer \d+'", s)]
    answered = [
        s
        for s in summaries
        if re.fullmatch(
            r"hello: peer \d+ answered 'hi from peer \d+, and hello back from peer \d+'", s
        )
    ]
    assert len(said) == len(answered) == 2, done.stdout


def test_the_external_test_project_passes(tmp_path: Path) -> None:
    done = run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        installed_like(tmp_path),
        cwd=PROJECT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^4 passed", done.stdout, re.M), done.stdout
