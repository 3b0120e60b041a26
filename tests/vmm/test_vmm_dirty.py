"""Dirty logging as KVM documents it: GET, CLEAR with manual protect, INITIALLY_SET, the ring.

The oracle test follows tools/testing/selftests/kvm/dirty_log_test.c: the guest writes the
iteration number into random pages, some of them while the host collects; the host checks
that a set bit means the page holds the current or previous iteration, and that a page
written in an iteration whose bit was collected clear is reported in the next round.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest

import vmm
from vmm.dirty import bitmap_to_bools

RAM = 0x4000_0000
PAGES = 1000  # not a multiple of 64
ITERATIONS = 25
WRITES = 150


def _logged_vm(mode: str, ring: int = 0) -> tuple[vmm.Vm, vmm.Vcpu, vmm.Backing]:
    vm = vmm.Vm()
    if mode == "manual":
        vm.enable_cap(
            vmm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, vmm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        )
    if ring:
        vm.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, ring)  # bytes, as KVM takes it
    backing = vmm.Backing.anonymous(PAGES * 4096)
    vm.set_user_memory_region(3, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM, PAGES * 4096, backing)
    return vm, vm.create_vcpu(0), backing


def _collector(vm: vmm.Vm, vcpu: vmm.Vcpu, mode: str) -> Callable[[], np.ndarray]:
    pending = np.zeros(PAGES, dtype=np.bool_)

    def ring_drain() -> None:
        assert vcpu.dirty_ring is not None
        slots, offsets = vcpu.dirty_ring.harvest()
        assert set(slots.tolist()) <= {3}
        pending[offsets.astype(np.int64)] = True
        vm.reset_dirty_rings()

    def collect() -> np.ndarray:
        if mode == "get":
            return bitmap_to_bools(vm.get_dirty_log(3), PAGES)
        if mode == "manual":
            words = vm.get_dirty_log(3)
            # CLEAR in chunks: 64-page multiples, the last one reaching the slot's end.
            for first in range(0, PAGES, 256):
                count = min(256, PAGES - first)
                vm.clear_dirty_log(3, first, count, words[first // 64 :])
            return bitmap_to_bools(words, PAGES)
        ring_drain()
        out = pending.copy()
        pending[:] = False
        return out

    collect.drain = ring_drain  # type: ignore[attr-defined]
    return collect


@pytest.mark.parametrize("mode", ["get", "manual", "ring"])
def test_dirty_log_oracle(mode: str) -> None:
    vm, vcpu, backing = _logged_vm(mode, ring=4096 if mode == "ring" else 0)
    collect = _collector(vm, vcpu, mode)
    rng = random.Random(1234)
    values = backing.u64.reshape(PAGES, 512)[:, 0]
    must_report = np.zeros(PAGES, dtype=np.bool_)
    reported_total = 0

    def guest_writes(iteration: int, count: int) -> None:
        for _ in range(count):
            page = rng.randrange(PAGES)
            while True:
                try:
                    vcpu.write64(RAM + page * 4096, iteration)
                    break
                except vmm.DirtyRingFull:
                    collect.drain()  # type: ignore[attr-defined]

    for iteration in range(1, ITERATIONS + 1):
        guest_writes(iteration, WRITES)
        dirty = collect()
        guest_writes(iteration, WRITES // 5)  # the guest keeps running while we verify
        seen = values.copy()
        reported_total += int(dirty.sum())
        assert not (must_report & ~dirty).any(), "a page written after the last collection was lost"
        assert np.isin(seen[dirty], [iteration, iteration - 1]).all()
        clean = ~dirty
        assert (seen[clean] <= iteration).all()
        must_report = clean & (seen == iteration)
        # Pages dirtied since this collection and still unharvested stay tracked.
    assert reported_total > ITERATIONS * WRITES // 2


def test_get_dirty_log_clears_and_reprotects() -> None:
    vm, vcpu, _backing = _logged_vm("get")
    vcpu.write(RAM + 5 * 4096, b"x")
    vcpu.write(RAM + 999 * 4096, b"y")
    bits = bitmap_to_bools(vm.get_dirty_log(3), PAGES)
    assert np.flatnonzero(bits).tolist() == [5, 999]
    assert not bitmap_to_bools(vm.get_dirty_log(3), PAGES).any()
    leaf = vm.pt.get_leaf(RAM + 5 * 4096)
    assert leaf is not None and not leaf.writable
    vcpu.write(RAM + 5 * 4096, b"z")  # write-protected again: faults, marks dirty
    assert np.flatnonzero(bitmap_to_bools(vm.get_dirty_log(3), PAGES)).tolist() == [5]


def test_clear_dirty_log_rules() -> None:
    vm, vcpu, _backing = _logged_vm("manual")
    ones = np.full(16, np.uint64(0xFFFF_FFFF_FFFF_FFFF))
    with pytest.raises(vmm.DirtyLogError, match="multiple of 64"):
        vm.clear_dirty_log(3, 1, 64, ones)
    with pytest.raises(vmm.DirtyLogError, match="does not reach the slot's end"):
        vm.clear_dirty_log(3, 0, 100, ones)
    with pytest.raises(vmm.DirtyLogError, match="run past"):
        vm.clear_dirty_log(3, 960, 64, ones)
    with pytest.raises(vmm.DirtyLogError, match="words"):
        vm.clear_dirty_log(3, 0, 1000, ones[:3])
    vm.clear_dirty_log(3, 960, 40, ones)  # reaches the end: fine
    with pytest.raises(vmm.MemslotError, match="does not exist"):
        vm.clear_dirty_log(4, 0, 64, ones)
    plain, _cpu, _b = _logged_vm("get")
    with pytest.raises(vmm.DirtyLogError, match="unknown"):
        plain.enable_cap(vmm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0x10)
    # Manual protect: GET does not clear; CLEAR does, and only for the given bits.
    vcpu.write(RAM, b"a")
    vcpu.write(RAM + 64 * 4096, b"b")
    words = vm.get_dirty_log(3)
    assert np.flatnonzero(bitmap_to_bools(vm.get_dirty_log(3), PAGES)).tolist() == [0, 64]
    vm.clear_dirty_log(3, 64, 64, words[1:])
    assert np.flatnonzero(bitmap_to_bools(vm.get_dirty_log(3), PAGES)).tolist() == [0]
    leaf0, leaf64 = vm.pt.get_leaf(RAM), vm.pt.get_leaf(RAM + 64 * 4096)
    assert leaf0 is not None and leaf0.writable
    assert leaf64 is not None and not leaf64.writable


def test_initially_set() -> None:
    vm = vmm.Vm()
    vm.enable_cap(
        vmm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        vmm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | vmm.KVM_DIRTY_LOG_INITIALLY_SET,
    )
    backing = vmm.Backing.anonymous(PAGES * 4096)
    vm.set_user_memory_region(0, 0, RAM, PAGES * 4096, backing)
    vcpu = vm.create_vcpu(0)
    vcpu.touch(RAM, PAGES * 4096)  # mapped writable before logging
    vm.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM, PAGES * 4096)
    words = vm.get_dirty_log(0)
    assert bitmap_to_bools(words, PAGES).all()
    assert int(words[-1]) == (1 << (PAGES % 64)) - 1  # no bits past the slot
    leaf = vm.pt.get_leaf(RAM)
    assert leaf is not None and leaf.writable  # not protected until CLEAR
    vm.clear_dirty_log(0, 0, PAGES, words)
    assert not bitmap_to_bools(vm.get_dirty_log(0), PAGES).any()
    vcpu.write(RAM + 7 * 4096, b"!")
    assert np.flatnonzero(bitmap_to_bools(vm.get_dirty_log(0), PAGES)).tolist() == [7]


def test_dirty_ring_order_full_and_reset() -> None:
    vm, vcpu, _backing = _logged_vm("ring", ring=4096)  # 256 entries, soft limit 192
    ring = vcpu.dirty_ring
    assert ring is not None
    order = [9, 3, 700, *range(10, 199)]
    for page in order:
        vcpu.write(RAM + page * 4096, b"r")
    with pytest.raises(vmm.DirtyRingFull):
        vcpu.write(RAM + 900 * 4096, b"r")
    slots, offsets = ring.harvest(4)
    assert offsets.tolist() == order[:4] and set(slots.tolist()) == {3}
    _slots, rest = ring.harvest()
    assert rest.tolist() == order[4:]
    with pytest.raises(vmm.DirtyRingFull):  # harvested but not reset: still full
        vcpu.write(RAM + 900 * 4096, b"r")
    # Without a reset the harvested pages stay writable: a rewrite is not reported.
    vcpu.write(RAM + 9 * 4096, b"again")
    assert vm.reset_dirty_rings() == 192
    vcpu.write(RAM + 900 * 4096, b"r")
    vcpu.write(RAM + 9 * 4096, b"after reset")  # re-protected: reported again
    assert ring.harvest()[1].tolist() == [900, 9]
    # Bulk writes stop at the ring-full exit and say how far they got.
    vm.reset_dirty_rings()
    with pytest.raises(vmm.DirtyRingFull) as info:
        vcpu.touch(RAM + 300 * 4096, 250 * 4096)
    assert info.value.completed == 192
    late = vmm.Vm()
    late.create_vcpu(0)
    with pytest.raises(vmm.DirtyLogError, match="before vCPUs"):
        late.enable_dirty_ring(8192)
    with pytest.raises(vmm.DirtyLogError, match="power of two"):
        vmm.Vm().enable_dirty_ring(100)


def test_export_dirty_is_an_iova_bitmap() -> None:
    vm, vcpu, _backing = _logged_vm("manual")
    for page in (0, 63, 64, 999):
        vcpu.write(RAM + page * 4096 + 5, b"e")
    exported = vm.export_dirty(3)
    assert exported.iova == RAM and exported.page_size == 4096
    assert [exported.test(RAM + p * 4096) for p in (0, 1, 63, 64, 999)] == [
        True,
        False,
        True,
        True,
        True,
    ]
    assert int(exported.data[0]) == (1 << 0) | (1 << 63)
    with pytest.raises(ValueError, match="outside"):
        exported.test(RAM + PAGES * 4096)
    # The export harvested: the next one is empty, and the pages are protected again.
    assert vm.export_dirty(3).count() == 0


def test_harvest_dirty_rings_exports_iova_bitmaps() -> None:
    vm, vcpu, _backing = _logged_vm("ring", ring=4096)
    other = vm.create_vcpu(1)
    vcpu.write(RAM + 2 * 4096, b"a")
    other.write(RAM + 999 * 4096, b"b")
    bitmaps = vm.harvest_dirty_rings()
    assert set(bitmaps) == {3}
    assert bitmaps[3].dirty_pages().tolist() == [2, 999]
    assert bitmaps[3].iova == RAM
    # Harvested and reset: the pages are protected again and report on the next write.
    assert vm.harvest_dirty_rings() == {}
    vcpu.write(RAM + 2 * 4096, b"c")
    assert vm.harvest_dirty_rings()[3].dirty_pages().tolist() == [2]
    with pytest.raises(vmm.DirtyLogError, match="not enabled"):
        vmm.Vm().harvest_dirty_rings()
