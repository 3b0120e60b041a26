"""The ``pagetable`` plugin in real peer processes on a real daemon.

A small memslot runs all three kvm_page_table_test stages and reports them (JSON event,
selftest-format lines, finished summary); bad options exit 2 with a clear message.
"""

from __future__ import annotations

from pathlib import Path

from tests.peers.test_plugin_ring import StartDaemon, peer_argv, plugin_env, run_peers
from vmm.bench.pagetable import STAGES


async def test_pagetable_runs_all_three_stages_in_peers(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    env = plugin_env(tmp_path, ["pagetable"])
    async with start_daemon(vectors=1, size="64K") as daemon:
        runs = await run_peers(
            [
                peer_argv(daemon.socket_path, "pagetable", "--size", "8M"),
                peer_argv(
                    daemon.socket_path,
                    "pagetable",
                    "--size",
                    "8M",
                    "--backing",
                    "thp",
                    "--vcpus",
                    "2",
                ),
            ],
            env,
        )
    for run, (backing, vcpus) in zip(runs, [("anonymous", 1), ("thp", 2)], strict=True):
        assert run.returncode == 0, run.stderr
        figures = run.last("pagetable")
        assert (figures["backing"], figures["vcpus"], figures["size"]) == (backing, vcpus, 8 << 20)
        assert list(figures["times"]) == list(STAGES)
        assert all(seconds >= 0 for seconds in figures["times"].values())
        assert figures["tlb_conflict"] is None
        assert figures["table_pages"] > 0
        logged = [e["message"] for e in run.events if e.get("event") == "log"]
        for stage in STAGES:
            assert any(line.startswith(f"{stage}: total execution time: ") for line in logged)
        assert f"Testing memory backing src type: {backing}" in logged
        finished = run.last("finished")
        assert finished["ok"] is True
        assert finished["summary"].startswith("pagetable: 3 stages on 0x800000 bytes")


async def test_bad_pagetable_options_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    env = plugin_env(tmp_path, ["pagetable"])
    socket_path = str(tmp_path / "no-daemon.sock")
    bad = [
        (["--vcpus", "0"], "--vcpus must be 1..512"),
        (["--backing", "floppy"], "invalid choice"),
        (["--size", "0"], "--size must be at least 1 byte"),
        (["--size", "lots"], "invalid size"),
    ]
    runs = await run_peers([peer_argv(socket_path, "pagetable", *opts) for opts, _ in bad], env)
    for (options, complaint), run in zip(bad, runs, strict=True):
        assert run.returncode == 2, (options, run.stderr)
        assert complaint in run.stderr, (options, run.stderr)
        assert "Traceback" not in run.stderr
