"""The ``pagetable`` plugin in real peer processes on a real daemon.

A small memslot runs all three kvm_page_table_test stages and reports them (JSON event,
selftest-format lines, finished summary); bad options exit 2 with a clear message.
"""

from __future__ import annotations

from pathlib import Path

from peers.pytest_plugin import DaemonFactory, PeerSpawner
from vmm.bench.pagetable import STAGES

PEER_TIMEOUT = 60.0


async def test_pagetable_runs_all_three_stages_in_peers(
    start_daemon: DaemonFactory, ivshmem_peers: PeerSpawner
) -> None:
    async with start_daemon(vectors=1, size="64K") as daemon:
        peers = [
            await ivshmem_peers(daemon, "pagetable", options, wait_running=False)
            for options in (
                ["--size", "8M"],
                ["--size", "8M", "--backing", "thp", "--vcpus", "2"],
            )
        ]
        for peer in peers:
            await peer.wait_exit(PEER_TIMEOUT)
    for peer, (backing, vcpus) in zip(peers, [("anonymous", 1), ("thp", 2)], strict=True):
        assert peer.returncode == 0, peer.describe()
        figures = peer.matching(event="pagetable")[-1]
        assert (figures["backing"], figures["vcpus"], figures["size"]) == (backing, vcpus, 8 << 20)
        assert list(figures["times"]) == list(STAGES)
        assert all(seconds >= 0 for seconds in figures["times"].values())
        assert figures["tlb_conflict"] is None
        assert figures["table_pages"] > 0
        logged = [e["message"] for e in peer.matching(event="log")]
        for stage in STAGES:
            assert any(line.startswith(f"{stage}: total execution time: ") for line in logged)
        assert f"Testing memory backing src type: {backing}" in logged
        finished = peer.matching(event="finished")[-1]
        assert finished["ok"] is True
        assert finished["summary"].startswith("pagetable: 3 stages on 0x800000 bytes")


async def test_bad_pagetable_options_exit_2_with_a_clear_message(
    ivshmem_peers: PeerSpawner, tmp_path: Path
) -> None:
    socket_path = str(tmp_path / "no-daemon.sock")
    bad = [
        (["--vcpus", "0"], "--vcpus must be 1..512"),
        (["--backing", "floppy"], "invalid choice"),
        (["--size", "0"], "--size must be at least 1 byte"),
        (["--size", "lots"], "invalid size"),
    ]
    for options, complaint in bad:
        peer = await ivshmem_peers(socket_path, "pagetable", options, wait_running=False)
        assert await peer.wait_exit() == 2, (options, peer.describe())
        errors = "\n".join(peer.stderr)
        assert complaint in errors and "Traceback" not in errors, (options, errors)
