"""A peer's counters and its dirty-page heatmap, on a real VM model."""

from __future__ import annotations

import os

from peers.client import ring_eventfd, vector_handler
from peers.telemetry import DirtyHeat, PeerCounters
from vmm import KVM_CAP_DIRTY_LOG_RING, KVM_MEM_LOG_DIRTY_PAGES, Backing, Vm

SLOT, GPA, SIZE = 1, 0x1_0000_0000, 1 << 20


def _vm() -> tuple[Vm, object]:
    vm = Vm()
    vm.set_user_memory_region(SLOT, 0, GPA, SIZE, Backing.anonymous(SIZE))
    return vm, vm.create_vcpu(0)


def test_routes_and_handlers_count_exactly() -> None:
    counters = PeerCounters(vectors=2)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        slot = counters.slot(5, 1)
        assert counters.slot(5, 1) == slot  # one slot per pair, kept
        for _ in range(7):
            assert ring_eventfd(fd, counters.rung, slot)
        fired: list[int] = []
        handle = vector_handler(fd, lambda: fired.append(1), counters.interrupts, 1)
        assert handle() and not handle()  # one read consumes the 7 rings
        assert counters.rung_list() == [[5, 1, 7]]
        assert list(counters.interrupts) == [0, 1] and fired == [1]
    finally:
        os.close(fd)


def test_plugin_counters_are_bounded() -> None:
    counters = PeerCounters(vectors=1)
    for i in range(100):
        counters.count(f"c{i}")
    counters.count("c0", 4)
    assert len(counters.plugin) == 64 and counters.plugin["c0"] == 5
    assert counters.dropped_names == 36


def test_dirty_heat_counts_the_pages_written_per_region_between_harvests() -> None:
    vm, vcpu = _vm()
    heat = DirtyHeat(vm, SLOT, SIZE)
    heat.harvest()  # starts its tracker
    assert heat.tracker is not None and not vm.memslot(SLOT).logging  # KVM's log stays off
    vcpu.write(GPA, b"x" * 3 * 4096)  # pages 0-2: region 0 (4 pages per region)
    vcpu.write(GPA + SIZE - 4096, b"y")  # the last page: the last region
    heat.harvest()
    assert heat.totals[0] == 3 and heat.totals[-1] == 1 and heat.totals.sum() == 4
    vcpu.write(GPA, b"z")  # written again after the harvest re-protected it: seen again
    heat.harvest()
    assert heat.totals[0] == 4
    heat.close()


def test_dirty_heat_leaves_the_plugins_log_alone() -> None:
    vm, vcpu = _vm()
    vm.set_user_memory_region(SLOT, KVM_MEM_LOG_DIRTY_PAGES, GPA, SIZE)
    heat = DirtyHeat(vm, SLOT, SIZE)
    heat.harvest()
    vcpu.write(GPA + 8 * 4096, b"a")
    assert int(vm.get_dirty_log(SLOT)[0]) == 1 << 8  # the plugin harvests (and clears) first
    heat.harvest()
    heat.harvest()  # nothing new
    assert int(heat.totals.sum()) == 1
    vcpu.write(GPA + 9 * 4096, b"b")
    heat.harvest()
    # the plugin's log is untouched: its page is dirty for the plugin to harvest
    assert int(vm.get_dirty_log(SLOT)[0]) == 1 << 9
    assert int(heat.totals.sum()) == 2


def test_dirty_heat_works_beside_dirty_rings() -> None:
    vm = Vm()
    vm.enable_cap(KVM_CAP_DIRTY_LOG_RING, 4096)
    vm.set_user_memory_region(SLOT, KVM_MEM_LOG_DIRTY_PAGES, GPA, SIZE, Backing.anonymous(SIZE))
    vcpu = vm.create_vcpu(0)
    heat = DirtyHeat(vm, SLOT, SIZE)
    heat.harvest()
    vcpu.write(GPA + 5 * 4096, b"a")
    heat.harvest()
    assert heat.usable and int(heat.totals.sum()) == 1
    assert vm.harvest_dirty_rings()[SLOT].dirty_pages().tolist() == [5]  # the ring has it too
