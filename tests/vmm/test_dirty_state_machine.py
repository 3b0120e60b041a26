"""No write escapes the dirty log: a hypothesis state machine over every write path and mode.

Rules create, move and delete memslots, turn logging on and off, and write through every
path the model has: a vCPU's single access, a vCPU's bulk access, a nested (L2) guest on an
L1 vCPU (through shadow PTEs that outlive harvests), and a device write (``write_guest``).
Harvests follow the VM's mode: KVM_GET_DIRTY_LOG (it clears and re-protects), GET then
KVM_CLEAR_DIRTY_LOG under MANUAL_DIRTY_LOG_PROTECT2, or the per-vCPU dirty rings (harvest and
reset; a ring-full exit harvests too). The invariant, checked at every harvest: every page
written while its slot was logged since the previous harvest is reported.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vmm
from vmm.dirty import bitmap_to_bools

PAGES = 96  # not a multiple of 64
SLOTS = 3
PLACES = 6  # slot placements, 16 MiB apart
BASE = 0x8000_0000
L2_BASE = 0x1_0000_0000
SPAN = 16 << 20


def _gpa(place: int) -> int:
    return BASE + place * SPAN


class DirtyLogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vm = vmm.Vm()
        self.mode = "get"
        self.cpus: list[vmm.Vcpu] = []
        self.backings = [vmm.Backing.anonymous(PAGES * 4096) for _ in range(SLOTS)]
        self.place: dict[int, int] = {}  # slot -> placement index
        self.logging: dict[int, bool] = {}
        self.pending: dict[int, set[int]] = {}  # slot -> pages written since the harvest
        self.l2 = self.vm.create_nested(1)
        self.counter = 0

    @initialize(mode=st.sampled_from(["get", "manual", "ring"]))
    def choose_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == "manual":
            self.vm.enable_cap(
                vmm.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, vmm.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            )
        elif mode == "ring":
            self.vm.enable_cap(vmm.KVM_CAP_DIRTY_LOG_RING, 4096)  # soft limit: 192 pages
        self.cpus = [self.vm.create_vcpu(0), self.vm.create_vcpu(1)]

    # ------------------------------------------------------------------ memslots
    def _free_place(self, place: int) -> bool:
        return place not in self.place.values()

    def _map_l2(self, slot: int) -> None:
        self.l2.set_l2_mapping(L2_BASE + slot * SPAN, _gpa(self.place[slot]), PAGES * 4096)

    @rule(slot=st.integers(0, SLOTS - 1), place=st.integers(0, PLACES - 1), log=st.booleans())
    def create(self, slot: int, place: int, log: bool) -> None:
        if slot in self.place or not self._free_place(place):
            return
        flags = vmm.KVM_MEM_LOG_DIRTY_PAGES if log else 0
        self.vm.set_user_memory_region(slot, flags, _gpa(place), PAGES * 4096, self.backings[slot])
        self.place[slot] = place
        self.logging[slot] = log
        self.pending[slot] = set()
        self._map_l2(slot)

    @rule(slot=st.integers(0, SLOTS - 1), place=st.integers(0, PLACES - 1))
    def move(self, slot: int, place: int) -> None:
        if slot not in self.place or not self._free_place(place):
            return
        flags = vmm.KVM_MEM_LOG_DIRTY_PAGES if self.logging[slot] else 0
        self.vm.set_user_memory_region(slot, flags, _gpa(place), PAGES * 4096)
        self.place[slot] = place  # the bitmap (and the pending pages) move with it
        self._map_l2(slot)

    @rule(slot=st.integers(0, SLOTS - 1))
    def delete(self, slot: int) -> None:
        if slot not in self.place:
            return
        self.vm.set_user_memory_region(slot, 0, _gpa(self.place.pop(slot)), 0)
        del self.logging[slot], self.pending[slot]

    @rule(slot=st.integers(0, SLOTS - 1), on=st.booleans())
    def set_logging(self, slot: int, on: bool) -> None:
        if slot not in self.place or self.logging[slot] == on:
            return
        flags = vmm.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        self.vm.set_user_memory_region(slot, flags, _gpa(self.place[slot]), PAGES * 4096)
        self.logging[slot] = on
        self.pending[slot] = set()  # logging off frees the bitmap; on starts afresh

    # ------------------------------------------------------------------ writes
    def _written(self, slot: int, pages: range | list[int]) -> None:
        if self.logging[slot]:
            self.pending[slot].update(pages)

    def _retry_on_full(self, write: object) -> None:
        """Run ``write``; a ring-full exit is answered as userspace does: harvest, reset,
        run the vCPU again."""
        for _ in range(3):
            try:
                write()  # type: ignore[operator]
                return
            except vmm.DirtyRingFull:
                self.harvest()
        raise AssertionError("the ring stayed full after a harvest")

    @rule(slot=st.integers(0, SLOTS - 1), page=st.integers(0, PAGES - 1), cpu=st.integers(0, 1))
    def vcpu_write(self, slot: int, page: int, cpu: int) -> None:
        if slot not in self.place:
            return
        self.counter += 1
        gpa = _gpa(self.place[slot]) + page * 4096 + 8
        self._retry_on_full(lambda: self.cpus[cpu].write64(gpa, self.counter))
        self._written(slot, [page])

    @rule(
        slot=st.integers(0, SLOTS - 1),
        first=st.integers(0, PAGES - 1),
        count=st.integers(1, PAGES),
        cpu=st.integers(0, 1),
    )
    def bulk_write(self, slot: int, first: int, count: int, cpu: int) -> None:
        if slot not in self.place:
            return
        count = min(count, PAGES - first)
        gpa = _gpa(self.place[slot]) + first * 4096
        done = 0
        while done < count:
            try:
                self.cpus[cpu].touch(gpa + done * 4096, (count - done) * 4096)
                done = count
            except vmm.DirtyRingFull as full:
                done += full.completed
                self._written(slot, range(first, first + done))
                self.harvest()
        self._written(slot, range(first, first + count))

    @rule(slot=st.integers(0, SLOTS - 1), page=st.integers(0, PAGES - 1), cpu=st.integers(0, 1))
    def nested_write(self, slot: int, page: int, cpu: int) -> None:
        if slot not in self.place:
            return
        l2 = L2_BASE + slot * SPAN + page * 4096 + 16
        self._retry_on_full(lambda: self.l2.write(l2, b"L2 write", vcpu=self.cpus[cpu]))
        self._written(slot, [page])

    @rule(slot=st.integers(0, SLOTS - 1), page=st.integers(0, PAGES - 1), cpu=st.integers(0, 1))
    def device_write(self, slot: int, page: int, cpu: int) -> None:
        if slot not in self.place:
            return
        gpa = _gpa(self.place[slot]) + page * 4096 + 24
        self.vm.write_guest(gpa, b"dma", vcpu=self.cpus[cpu] if self.mode == "ring" else None)
        self._written(slot, [page])

    # ------------------------------------------------------------------ harvests
    @precondition(lambda self: bool(self.cpus))
    @rule()
    def harvest(self) -> None:
        reported: dict[int, set[int]] = {slot: set() for slot in self.place}
        if self.mode == "ring":
            for slot, bitmap in self.vm.harvest_dirty_rings().items():
                reported[slot] = set(bitmap.dirty_pages().tolist())
        else:
            for slot in self.place:
                if not self.logging[slot]:
                    continue
                words = self.vm.get_dirty_log(slot)
                if self.mode == "manual":
                    self.vm.clear_dirty_log(slot, 0, PAGES, words)
                reported[slot] = set(np.flatnonzero(bitmap_to_bools(words, PAGES)).tolist())
        for slot, pages in self.pending.items():
            missing = pages - reported[slot]
            assert not missing, f"slot {slot}: written pages {sorted(missing)} were not reported"
            pages.clear()

    @invariant()
    def no_shadow_is_writable_unless_its_page_is_logged(self) -> None:
        """A writable shadow PTE on a logged slot means its page is pending (logged since
        the last harvest): otherwise an L2 write there would escape."""
        g, ptes, _levels = self.l2.pt.leaves()
        for l2_gpa, pte in zip(g.tolist(), ptes.tolist(), strict=True):
            if not pte & vmm.pte.PTE_W:
                continue
            slot = (l2_gpa - L2_BASE) // SPAN
            if slot in self.place and self.logging[slot]:
                page = (l2_gpa - L2_BASE - slot * SPAN) // 4096
                assert page in self.pending[slot], f"slot {slot} page {page}: writable, unlogged"

    def teardown(self) -> None:
        self.vm.close()
        for backing in self.backings:
            backing.close()


TestDirtyLogMachine = DirtyLogMachine.TestCase
TestDirtyLogMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
