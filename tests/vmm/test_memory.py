"""vmm.memory: host-physical address space and the backings the memslots use."""

from __future__ import annotations

import gc
import mmap
import os

import pytest

from vmm.errors import VmmError
from vmm.memory import HOST_PHYS, Backing, HostPhysSpace

MIB = 1 << 20


def test_host_phys_space_first_fit_alignment_and_merge() -> None:
    space = HostPhysSpace(base=0x1000, limit=0x1000 + 64 * MIB)
    a = space.allocate(4096, 4096)
    b = space.allocate(2 * MIB, 2 * MIB)
    c = space.allocate(4096, 4096)
    assert a == 0x1000 and b % (2 * MIB) == 0 and c == 0x2000  # the gap before b is reused
    assert space.allocate(4096, 4096, minimum=32 * MIB) >= 32 * MIB
    with pytest.raises(VmmError, match="exhausted"):
        space.allocate(128 * MIB, 4096)
    space.release(a, 4096)
    space.release(c, 4096)
    assert space.allocate(8192, 4096) == 0x1000  # freed neighbours merged
    space.release_later(b, 2 * MIB)  # queued (a finalizer's way), drained by the next call
    assert space.allocate(2 * MIB, 2 * MIB) == b


def test_owner_maps_hpas_back_to_live_backings() -> None:
    space = HostPhysSpace(base=1 << 32, limit=(1 << 32) + 256 * MIB)
    backing = Backing(bytearray(2 * MIB), 2 * MIB, 4096, "test", space=space)
    assert space.owner(backing.hpa) is backing
    assert space.owner(backing.hpa_end - 1) is backing
    assert space.owner(backing.hpa_end) is None and space.owner(0) is None
    hpa = backing.hpa
    backing.close()
    assert not backing.live and space.owner(hpa) is None
    again = Backing(bytearray(2 * MIB), 2 * MIB, 4096, "test", space=space)
    assert again.hpa == hpa  # the range is reusable once closed
    del again
    gc.collect()
    third = Backing(bytearray(2 * MIB), 2 * MIB, 4096, "test", space=space)
    assert third.hpa == hpa  # ... and once garbage-collected


def test_backing_constructors_and_checks(tmp_path: object) -> None:
    anon = Backing.anonymous(4 * MIB, populate=True)
    assert anon.page_size == 4096 and anon.kind == "anonymous" and anon.live
    assert anon.hpa % 4096 == 0 and HOST_PHYS.owner(anon.hpa) is anon
    thp = Backing.thp(4 * MIB)
    assert thp.page_size == 2 * MIB and thp.hpa % (2 * MIB) == 0
    huge = Backing.hugetlb(4 * MIB)
    assert huge.page_size == 2 * MIB and huge.kind == "hugetlb"
    anon.view(4096, 8)[:] = b"12345678"
    assert bytes(anon.mem[4096:4104]) == b"12345678" and int(anon.u64[512]) != 0
    with pytest.raises(VmmError, match="outside"):
        anon.view(4 * MIB - 4, 8)
    shm = mmap.mmap(-1, MIB)
    buf = Backing.from_buffer(shm)
    buf.mem[0:3] = b"abc"
    assert shm[0:3] == b"abc"
    fd = os.memfd_create("vmm-memory-test")
    try:
        os.ftruncate(fd, MIB)
        mapped = Backing.from_fd(fd, MIB)
        mapped.mem[5:8] = b"xyz"
        assert os.pread(fd, 3, 5) == b"xyz"
        with pytest.raises(VmmError, match="holds"):
            Backing.from_fd(fd, MIB, offset=4096)
    finally:
        os.close(fd)
    with pytest.raises(VmmError, match="power of two"):
        Backing(bytearray(8192), 8192, 3000, "bad")
    with pytest.raises(VmmError, match="multiple of its page size"):
        Backing(bytearray(8192), 6000, 4096, "bad")
    with pytest.raises(VmmError, match="writable"):
        Backing.from_buffer(bytes(4096))
    with pytest.raises(VmmError, match="less than the size"):
        Backing(bytearray(4096), 8192, 4096, "bad")
    with pytest.raises(VmmError, match="2 MiB or 1 GiB"):
        Backing.hugetlb(4 * MIB, 4096)
    with pytest.raises(VmmError, match="positive"):
        Backing.anonymous(0)
