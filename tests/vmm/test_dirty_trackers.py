"""Dirty trackers (:mod:`vmm.dirtytrack`): every write path marks every consumer, consumers
harvest independently, and KVM's own log never notices them.

The state machine runs two VMs side by side on the same operations: ``vm`` has trackers
that come, harvest and go; ``ref`` has none. After every step KVM's log of the two must be
identical, word for word and ring entry for ring entry (bitmaps, ring indices and
contents, ring-full exits with the same progress), whatever the trackers did. At every
tracker harvest the pages it reports must be exactly those written (by a vCPU, in bulk, by
a nested guest, by a device) since its previous harvest.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import vmm
from vmm.dirty import bitmap_to_bools
from vmm.errors import DirtyLogError

BASE = 0x8000_0000
L2_BASE = 0x1_0000_0000
SPAN = 16 << 20  # placements 16 MiB apart (2 MiB-aligned: blocks fit)
PLACES = 5
#: pages per slot: two small ones (not a multiple of 64) and a 2 MiB block
SLOT_PAGES = (96, 96, 512)
TRACKERS = 3
MODES = ("get", "manual", "initially-set", "ring")
_PATHS = {
    "vcpu": "vcpu_write",
    "across": "vcpu_write_across_pages",
    "read": "vcpu_read",
    "bulk-read": "bulk_read",
    "nested": "nested_write",
    "device": "device_write",
}


def _gpa(place: int) -> int:
    return BASE + place * SPAN


class Twin:
    """One VM of the pair: its vCPUs, backings and nested guest."""

    def __init__(self, mode: str, eager: bool) -> None:
        self.vm = vmm.Vm(eager_split=eager)
        if mode in ("manual", "initially-set"):
            flags = vmm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if mode == "initially-set":
                flags |= vmm.KVM_DIRTY_LOG_INITIALLY_SET
            self.vm.enable_cap(vmm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)
        elif mode == "ring":
            self.vm.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 4096)  # soft limit: 192 pages
        self.cpus = [self.vm.create_vcpu(0), self.vm.create_vcpu(1)]
        self.backings = [
            vmm.Backing.anonymous(SLOT_PAGES[0] * 4096),
            vmm.Backing.anonymous(SLOT_PAGES[1] * 4096),
            vmm.Backing.thp(SLOT_PAGES[2] * 4096),
        ]
        self.l2 = self.vm.create_nested(1)

    def close(self) -> None:
        self.vm.close()
        for backing in self.backings:
            backing.close()


def _outcome(action: Callable[[], object]) -> tuple[str, int]:
    """What a write did: ok, or a ring-full exit and how far it got."""
    try:
        action()
    except vmm.DirtyRingFull as full:
        return "full", full.completed
    return "ok", 0


class TrackerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "get"
        self.twins: list[Twin] = []
        self.place: dict[int, int] = {}
        self.logging: dict[int, bool] = {}
        #: tracker handle -> (slot, tracker, pages written since its last harvest)
        self.trackers: dict[int, tuple[int, vmm.DirtyTracker, set[int]]] = {}
        self.closed: list[vmm.DirtyTracker] = []
        self.counter = 0

    @initialize(
        mode=st.sampled_from(MODES),
        eager=st.booleans(),
        logging=st.lists(st.booleans(), min_size=3, max_size=3),
        tracked=st.integers(0, 2),
    )
    def choose_mode(self, mode: str, eager: bool, logging: list[bool], tracked: int) -> None:
        self.mode = mode
        self.twins = [Twin(mode, eager), Twin(mode, eager)]
        for slot, log in enumerate(logging):
            self.create(slot, slot, log)
        self.open_tracker(0, tracked)

    @property
    def vm(self) -> vmm.Vm:
        return self.twins[0].vm

    def both(self, action: Callable[[Twin], object]) -> tuple[str, int]:
        """Run ``action`` on both VMs: it must end the same way on both."""
        outcomes = [_outcome(lambda t=twin: action(t)) for twin in self.twins]
        assert outcomes[0] == outcomes[1], f"trackers changed a write's outcome: {outcomes}"
        return outcomes[0]

    # ------------------------------------------------------------------ memslots
    def _size(self, slot: int) -> int:
        return SLOT_PAGES[slot] * 4096

    def _map_l2(self, slot: int) -> None:
        for twin in self.twins:
            twin.l2.set_l2_mapping(L2_BASE + slot * SPAN, _gpa(self.place[slot]), self._size(slot))

    @rule(slot=st.integers(0, 2), place=st.integers(0, PLACES - 1), log=st.booleans())
    def create(self, slot: int, place: int, log: bool) -> None:
        if slot in self.place or place in self.place.values():
            return
        flags = vmm.KVM_MEM_LOG_DIRTY_PAGES if log else 0
        for twin in self.twins:
            twin.vm.set_user_memory_region(
                slot, flags, _gpa(place), self._size(slot), twin.backings[slot]
            )
        self.place[slot], self.logging[slot] = place, log
        self._map_l2(slot)

    @rule(slot=st.integers(0, 2), place=st.integers(0, PLACES - 1))
    def move(self, slot: int, place: int) -> None:
        if slot not in self.place or place in self.place.values():
            return
        flags = vmm.KVM_MEM_LOG_DIRTY_PAGES if self.logging[slot] else 0
        for twin in self.twins:
            twin.vm.set_user_memory_region(slot, flags, _gpa(place), self._size(slot))
        self.place[slot] = place
        self._map_l2(slot)

    @rule(slot=st.integers(0, 2))
    def delete(self, slot: int) -> None:
        if slot not in self.place:
            return
        for twin in self.twins:
            twin.vm.set_user_memory_region(slot, 0, _gpa(self.place[slot]), 0)
        del self.place[slot], self.logging[slot]
        for handle, (tracked, tracker, _pages) in list(self.trackers.items()):
            if tracked == slot:
                assert tracker.closed
                self.closed.append(tracker)
                del self.trackers[handle]

    @rule(slot=st.integers(0, 2), on=st.booleans())
    def set_logging(self, slot: int, on: bool) -> None:
        if slot not in self.place or self.logging[slot] == on:
            return
        flags = vmm.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        for twin in self.twins:
            twin.vm.set_user_memory_region(slot, flags, _gpa(self.place[slot]), self._size(slot))
        self.logging[slot] = on

    @rule(place=st.integers(0, PLACES - 1), first=st.integers(0, 511), count=st.integers(1, 300))
    def invalidate(self, place: int, first: int, count: int) -> None:
        for twin in self.twins:
            twin.vm.invalidate_range(_gpa(place) + first * 4096, count * 4096)

    # ------------------------------------------------------------------ writes
    def _written(self, slot: int, pages: range | list[int]) -> None:
        for tracked, _tracker, pending in self.trackers.values():
            if tracked == slot:
                pending.update(pages)

    def _until_done(self, action: Callable[[Twin], object]) -> None:
        """A single write: a ring-full exit is answered as userspace does (harvest, reset,
        run the vCPU again)."""
        for _ in range(3):
            if self.both(action)[0] == "ok":
                return
            self.harvest()
        raise AssertionError("the ring stayed full after a harvest")

    @rule(
        path=st.sampled_from([*_PATHS, "bulk"]),
        slot=st.integers(0, 2),
        page=st.integers(0, 511),
        count=st.integers(1, 300),
        cpu=st.integers(0, 1),
    )
    def write(self, path: str, slot: int, page: int, count: int, cpu: int) -> None:
        """A write by one of the paths (or a read, which maps pages without writing)."""
        if path == "bulk":
            self.bulk_write(slot, page, count, cpu)
        else:
            getattr(self, _PATHS[path])(slot, page, cpu)

    def vcpu_write(self, slot: int, page: int, cpu: int) -> None:
        if slot not in self.place:
            return
        page %= SLOT_PAGES[slot]
        self.counter += 1
        gpa, value = _gpa(self.place[slot]) + page * 4096 + 8, self.counter
        self._until_done(lambda t: t.cpus[cpu].write64(gpa, value))
        self._written(slot, [page])

    def vcpu_write_across_pages(self, slot: int, page: int, cpu: int) -> None:
        """``vcpu.write`` of a buffer over three pages (one access, leaf by leaf)."""
        if slot not in self.place:
            return
        page %= SLOT_PAGES[slot] - 2
        gpa = _gpa(self.place[slot]) + page * 4096 + 100
        self._until_done(lambda t: t.cpus[cpu].write(gpa, bytes(2 * 4096)))
        self._written(slot, [page, page + 1, page + 2])

    def vcpu_read(self, slot: int, page: int, cpu: int) -> None:
        if slot not in self.place:
            return
        page %= SLOT_PAGES[slot]
        gpa = _gpa(self.place[slot]) + page * 4096
        values = {twin.cpus[cpu].read64(gpa) >= 0 for twin in self.twins}
        assert values == {True}

    def bulk_read(self, slot: int, page: int, cpu: int) -> None:
        """Reads in bulk (``vcpu.touch(write=False)``): pages mapped, nothing written."""
        if slot not in self.place:
            return
        first = page % SLOT_PAGES[slot]
        count = min(40, SLOT_PAGES[slot] - first)
        gpa = _gpa(self.place[slot]) + first * 4096
        for twin in self.twins:
            twin.cpus[cpu].touch(gpa, count * 4096, write=False)

    def bulk_write(self, slot: int, first: int, count: int, cpu: int) -> None:
        if slot not in self.place:
            return
        first %= SLOT_PAGES[slot]
        count = min(count, SLOT_PAGES[slot] - first)
        gpa = _gpa(self.place[slot]) + first * 4096
        done = 0
        while done < count:
            kind, completed = self.both(
                lambda t, at=done: t.cpus[cpu].touch(gpa + at * 4096, (count - at) * 4096)
            )
            if kind == "ok":
                done = count
            else:
                done += completed
                self._written(slot, range(first, first + done))
                self.harvest()
        self._written(slot, range(first, first + count))

    def nested_write(self, slot: int, page: int, cpu: int) -> None:
        if slot not in self.place:
            return
        page %= SLOT_PAGES[slot]
        l2 = L2_BASE + slot * SPAN + page * 4096 + 16
        self._until_done(lambda t: t.l2.write(l2, b"L2 write", vcpu=t.cpus[cpu]))
        self._written(slot, [page])

    def device_write(self, slot: int, page: int, cpu: int) -> None:
        if slot not in self.place:
            return
        page %= SLOT_PAGES[slot]
        gpa = _gpa(self.place[slot]) + page * 4096 + 24
        ring = self.mode == "ring"
        self.both(lambda t: t.vm.write_guest(gpa, b"dma", vcpu=t.cpus[cpu] if ring else None))
        self._written(slot, [page])

    # ------------------------------------------------------------------ KVM's harvest
    @rule()
    def harvest(self) -> None:
        """KVM's own harvest on both VMs: the same answers."""
        if self.mode == "ring":
            for a, b in zip(self.twins[0].cpus, self.twins[1].cpus, strict=True):
                assert a.dirty_ring is not None and b.dirty_ring is not None
                got_a, got_b = a.dirty_ring.harvest(), b.dirty_ring.harvest()
                assert np.array_equal(got_a[0], got_b[0]) and np.array_equal(got_a[1], got_b[1])
            assert self.twins[0].vm.reset_dirty_rings() == self.twins[1].vm.reset_dirty_rings()
            return
        for slot in self.place:
            if not self.logging[slot]:
                continue
            words = [twin.vm.get_dirty_log(slot) for twin in self.twins]
            assert np.array_equal(words[0], words[1]), f"slot {slot}: GET differs"
            if self.mode != "get":
                for twin in self.twins:
                    twin.vm.clear_dirty_log(slot, 0, SLOT_PAGES[slot], words[0])

    @rule(slot=st.integers(0, 2), first=st.integers(0, 15), bits=st.integers(0, (1 << 64) - 1))
    def clear_part(self, slot: int, first: int, bits: int) -> None:
        """A CLEAR of part of the log (manual protect): 64-page chunks, random bits."""
        if self.mode not in ("manual", "initially-set") or slot not in self.place:
            return
        if not self.logging[slot]:
            return
        first = first * 64 % (-(-SLOT_PAGES[slot] // 64) * 64)
        num = min(64, SLOT_PAGES[slot] - first)
        mask = np.array([bits], dtype=np.uint64)
        for twin in self.twins:
            twin.vm.clear_dirty_log(slot, first, num, mask)

    @invariant()
    def kvm_log_is_the_same(self) -> None:
        if not self.twins:
            return
        a, b = self.twins
        for slot in self.place:
            bitmap_a = a.vm.memslot(slot).dirty_bitmap
            bitmap_b = b.vm.memslot(slot).dirty_bitmap
            assert (bitmap_a is None) == (bitmap_b is None)
            if bitmap_a is not None and bitmap_b is not None:
                assert np.array_equal(bitmap_a, bitmap_b), f"slot {slot}: bitmaps differ"
        for cpu_a, cpu_b in zip(a.cpus, b.cpus, strict=True):
            ring_a, ring_b = cpu_a.dirty_ring, cpu_b.dirty_ring
            if ring_a is None or ring_b is None:
                assert ring_a is ring_b
                continue
            assert (ring_a.dirty_index, ring_a.fetch_index, ring_a.reset_index) == (
                ring_b.dirty_index,
                ring_b.fetch_index,
                ring_b.reset_index,
            )
            for field in ("flags", "slot", "offset"):
                assert np.array_equal(getattr(ring_a, field), getattr(ring_b, field))

    # ------------------------------------------------------------------ trackers
    @rule(handle=st.integers(0, TRACKERS - 1), slot=st.integers(0, 2))
    def open_tracker(self, handle: int, slot: int) -> None:
        if handle in self.trackers or slot not in self.place:
            return
        self.trackers[handle] = (slot, self.vm.track_dirty(slot), set())

    @rule(handle=st.integers(0, TRACKERS - 1))
    def harvest_tracker(self, handle: int) -> None:
        if handle not in self.trackers:
            return
        slot, tracker, pending = self.trackers[handle]
        assert tracker.pending == bool(pending)
        bitmap = tracker.harvest()
        assert bitmap.iova == _gpa(self.place[slot]) and bitmap.npages == SLOT_PAGES[slot]
        reported = set(bitmap.dirty_pages().tolist())
        assert reported == pending, (
            f"tracker {handle} of slot {slot}: missed {sorted(pending - reported)}, "
            f"reported unwritten {sorted(reported - pending)}"
        )
        pending.clear()
        assert not tracker.pending

    @rule(handle=st.integers(0, TRACKERS - 1))
    def close_tracker(self, handle: int) -> None:
        if handle not in self.trackers:
            return
        _slot, tracker, _pending = self.trackers.pop(handle)
        tracker.close()
        self.closed.append(tracker)

    @invariant()
    def no_page_is_writable_unless_every_tracker_has_it(self) -> None:
        """A writable leaf (stage 2 or a nested guest's shadow) on a tracked page means the
        page is pending in every tracker of its slot: otherwise a write there escapes."""
        if not self.twins:
            return
        pending: dict[int, list[set[int]]] = {}
        for slot, _tracker, pages in self.trackers.values():
            pending.setdefault(slot, []).append(pages)

        def check(base: int, where: dict[int, int], table: vmm.Stage2PageTable) -> None:
            gpas, ptes, levels = table.leaves()
            for gpa, pte, level in zip(gpas.tolist(), ptes.tolist(), levels.tolist(), strict=True):
                if not pte & vmm.pte.PTE_W:
                    continue
                for slot, at in where.items():
                    size = SLOT_PAGES[slot] * 4096
                    if at <= gpa < at + size and slot in pending:
                        first = (gpa - at) // 4096
                        pages = range(first, first + table.mode.level_size(level) // 4096)
                        for tracked in pending[slot]:
                            assert set(pages) <= tracked, f"slot {slot}: {gpa:#x} writable"

        check(BASE, {slot: _gpa(place) for slot, place in self.place.items()}, self.vm.pt)
        l2_places = {slot: L2_BASE + slot * SPAN for slot in self.place}
        check(L2_BASE, l2_places, self.twins[0].l2.pt)

    @invariant()
    def closed_trackers_refuse(self) -> None:
        for tracker in self.closed[-2:]:
            with pytest.raises(DirtyLogError):
                tracker.harvest()

    def teardown(self) -> None:
        for twin in self.twins:
            twin.close()


TestTrackerMachine = TrackerMachine.TestCase
WALK_STEPS = 200


@pytest.mark.parametrize("seed", range(16))
def test_random_walks_through_the_machine(seed: int) -> None:
    """The machine's rules in long seeded random walks, writes weighted up, every invariant
    after every step: dense coverage of what hypothesis's short, swarm-pruned runs reach
    only now and then (both run the same checks)."""
    rng = random.Random(seed)
    machine = TrackerMachine()
    logging = [rng.random() < 0.5 for _ in range(3)]
    machine.choose_mode(MODES[seed % len(MODES)], seed >= 8, logging, rng.randrange(3))
    paths = [*_PATHS, "bulk"]

    def page() -> int:
        # mostly a few hot pages (rewrites after harvests), sometimes anywhere
        return rng.randrange(8) if rng.random() < 0.7 else rng.randrange(512)

    actions: list[tuple[int, Callable[[], None]]] = [
        (40, lambda: machine.write(rng.choice(paths), rng.randrange(3), page(),
                                   rng.randrange(1, 300), rng.randrange(2))),
        (12, lambda: machine.harvest_tracker(rng.randrange(TRACKERS))),
        (5, lambda: machine.open_tracker(rng.randrange(TRACKERS), rng.randrange(3))),
        (3, lambda: machine.close_tracker(rng.randrange(TRACKERS))),
        (6, machine.harvest),
        (3, lambda: machine.clear_part(rng.randrange(3), rng.randrange(16), rng.getrandbits(64))),
        (3, lambda: machine.set_logging(rng.randrange(3), rng.random() < 0.5)),
        (2, lambda: machine.move(rng.randrange(3), rng.randrange(PLACES))),
        (1, lambda: machine.delete(rng.randrange(3))),
        (2, lambda: machine.create(rng.randrange(3), rng.randrange(PLACES), rng.random() < 0.5)),
        (2, lambda: machine.invalidate(rng.randrange(PLACES), rng.randrange(512),
                                       rng.randrange(1, 300))),
    ]  # fmt: skip
    weights = [weight for weight, _ in actions]
    try:
        for _ in range(WALK_STEPS):
            rng.choices(actions, weights)[0][1]()
            machine.kvm_log_is_the_same()
            machine.no_page_is_writable_unless_every_tracker_has_it()
            machine.closed_trackers_refuse()
    finally:
        machine.teardown()


TestTrackerMachine.settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------- plain tests
PAGES = 256
RAM = 0x8000_0000


@pytest.fixture
def vm() -> Any:
    machine = vmm.Vm()
    backing = vmm.Backing.anonymous(PAGES * 4096)
    machine.set_user_memory_region(0, 0, RAM, PAGES * 4096, backing)
    yield machine
    machine.close()
    backing.close()


def _pages(tracker: vmm.DirtyTracker) -> list[int]:
    return tracker.harvest().dirty_pages().tolist()  # type: ignore[no-any-return]


def test_two_trackers_harvest_independently(vm: vmm.Vm) -> None:
    cpu = vm.create_vcpu(0)
    first, second = vm.track_dirty(0), vm.track_dirty(0)
    cpu.write(RAM + 5 * 4096, b"a")
    assert _pages(first) == [5]
    cpu.write(RAM + 6 * 4096, b"b")
    assert _pages(second) == [5, 6]  # the first one's harvest took nothing from it
    assert _pages(first) == [6]
    assert _pages(first) == [] and _pages(second) == []


def test_a_write_after_a_harvest_is_seen_again(vm: vmm.Vm) -> None:
    cpu = vm.create_vcpu(0)
    tracker = vm.track_dirty(0)
    for _ in range(3):
        cpu.write64(RAM + 7 * 4096, 1)  # a TLB hit after the first round's fault, until...
        assert tracker.pending
        assert _pages(tracker) == [7]  # ...the harvest write-protects the page again
        assert not tracker.pending


def test_a_marked_page_costs_no_fault(vm: vmm.Vm) -> None:
    """Once marked, a page stays writable: further writes are TLB hits, not faults."""
    cpu = vm.create_vcpu(0)
    tracker = vm.track_dirty(0)
    cpu.write64(RAM, 1)
    faults = vm.faults
    for value in range(100):
        cpu.write64(RAM + 8, value)
        cpu.write(RAM + 64, b"xyz")
    assert vm.faults == faults
    assert _pages(tracker) == [0]


def test_only_harvested_pages_are_protected_again(vm: vmm.Vm) -> None:
    cpu = vm.create_vcpu(0)
    cpu.touch(RAM, PAGES * 4096)  # everything mapped writable
    tracker = vm.track_dirty(0)
    cpu.write64(RAM + 3 * 4096, 1)
    cpu.write64(RAM + 200 * 4096, 1)
    assert _pages(tracker) == [3, 200]
    leaves = {
        (gpa - RAM) // 4096: bool(pte & vmm.pte.PTE_W)
        for gpa, pte, _level in zip(*(a.tolist() for a in vm.pt.leaves()), strict=True)
    }
    assert not leaves[3] and not leaves[200]
    assert not any(leaves[page] for page in (0, 100, 255))  # the tracker's start protected all


def test_a_tracker_splits_writable_blocks_and_sees_each_page() -> None:
    vm = vmm.Vm()
    backing = vmm.Backing.thp(4 << 20)
    vm.set_user_memory_region(0, 0, RAM, 4 << 20, backing)
    cpu = vm.create_vcpu(0)
    cpu.touch(RAM, 4 << 20)
    assert {level for _g, _p, level in zip(*vm.pt.leaves(), strict=True)} == {1}  # 2 MiB
    tracker = vm.track_dirty(0)
    cpu.write64(RAM + 4096, 1)
    cpu.write64(RAM + 2 * 4096, 1)
    cpu.write64(RAM + (3 << 20), 1)
    assert _pages(tracker) == [1, 2, 768]
    tracker.close()
    vm.close()
    backing.close()


@pytest.fixture
def ring_vm() -> Any:
    """A VM with dirty rings and a logged slot 0 at RAM (and its vCPU 0)."""
    machine = vmm.Vm()
    machine.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 4096)
    backing = vmm.Backing.anonymous(PAGES * 4096)
    machine.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, RAM, PAGES * 4096, backing)
    machine.create_vcpu(0)
    yield machine
    machine.close()
    backing.close()


def test_trackers_leave_kvm_log_exact_under_logging(ring_vm: vmm.Vm) -> None:
    """With logging on: a page KVM logged stays logged once in the ring, however often a
    tracker re-protects it (no second entry, no early ring-full exit)."""
    cpu = ring_vm.vcpus[0]
    tracker = ring_vm.track_dirty(0)
    for _ in range(500):  # far more harvests than the ring has room for
        cpu.write64(RAM, 1)
        assert _pages(tracker) == [0]
    assert cpu.dirty_ring is not None
    assert cpu.dirty_ring.dirty_index == 1


def test_deleting_the_slot_closes_its_trackers(vm: vmm.Vm) -> None:
    cpu = vm.create_vcpu(0)
    tracker = vm.track_dirty(0)
    cpu.write(RAM, b"x")
    assert tracker.pending
    vm.set_user_memory_region(0, 0, RAM, 0)
    assert tracker.closed and not tracker.pending  # nothing more to harvest
    with pytest.raises(DirtyLogError, match="closed"):
        tracker.harvest_words()


def test_a_moved_slot_reports_at_its_new_place(vm: vmm.Vm) -> None:
    cpu = vm.create_vcpu(0)
    tracker = vm.track_dirty(0)
    cpu.write(RAM + 4096, b"x")
    vm.set_user_memory_region(0, 0, RAM + SPAN, PAGES * 4096)
    cpu.write(RAM + SPAN + 2 * 4096, b"y")
    bitmap = tracker.harvest()
    assert bitmap.iova == RAM + SPAN
    assert bitmap.dirty_pages().tolist() == [1, 2]


def test_harvest_words_are_the_slots_pages(vm: vmm.Vm) -> None:
    cpu = vm.create_vcpu(0)
    with vm.track_dirty(0) as tracker:
        cpu.write(RAM + 65 * 4096, b"x")
        words = tracker.harvest_words()
        assert words.dtype == np.uint64 and words.shape == (PAGES // 64,)
        assert np.flatnonzero(bitmap_to_bools(words, PAGES)).tolist() == [65]
        assert not tracker.harvest_words().any()
    assert tracker.closed


def test_bulk_writes_into_a_tracked_huge_slot_map_pages_not_blocks() -> None:
    vm = vmm.Vm()
    backing = vmm.Backing.thp(2 << 20)
    vm.set_user_memory_region(0, 0, RAM, 2 << 20, backing)
    cpu = vm.create_vcpu(0)
    tracker = vm.track_dirty(0)
    cpu.touch(RAM + 10 * 4096, 5 * 4096)  # a bulk fault of five pages
    cpu.write64(RAM + 100 * 4096, 1)  # the same block: must fault, not hit a block
    assert _pages(tracker) == [10, 11, 12, 13, 14, 100]
    tracker.close()
    vm.close()
    backing.close()


@pytest.mark.parametrize("unmap", ["invalidate", "move"])
def test_an_unmapped_page_is_kvms_to_log_again(ring_vm: vmm.Vm, unmap: str) -> None:
    """A page a tracker protected and that is then unmapped faults for KVM's ring too,
    as it would with no tracker: a second ring entry."""
    vm, cpu = ring_vm, ring_vm.vcpus[0]
    tracker = vm.track_dirty(0)
    cpu.write64(RAM, 1)
    assert _pages(tracker) == [0]
    gpa = RAM
    if unmap == "invalidate":
        vm.invalidate_range(RAM, 4096)
    else:
        gpa = RAM + SPAN
        vm.set_user_memory_region(0, vmm.KVM_MEM_LOG_DIRTY_PAGES, gpa, PAGES * 4096)
    cpu.write64(gpa, 2)
    assert cpu.dirty_ring is not None and cpu.dirty_ring.dirty_index == 2
    assert _pages(tracker) == [0]


def test_a_nested_guests_write_after_a_harvest_is_seen_again(vm: vmm.Vm) -> None:
    cpu = vm.create_vcpu(0)
    l2 = vm.create_nested(1)
    l2.set_l2_mapping(0, RAM, PAGES * 4096)
    tracker = vm.track_dirty(0)
    for round_ in range(3):
        l2.write(9 * 4096, bytes([round_]), vcpu=cpu)  # the shadow PTE was made writable...
        assert _pages(tracker) == [9]  # ...and the harvest protected it again
