"""vmm.tablepool: host-physical table pages (rows of one array) and KVM's page cache."""

from __future__ import annotations

import numpy as np
import pytest

from vmm.errors import ModelBug, PageCacheEmpty, VmmError
from vmm.memory import HostPhysSpace
from vmm.pte import PTE_PPN_SHIFT, PTE_RWX, PTE_V, get_mode
from vmm.tablepool import PageCache, TablePagePool

MODE = get_mode("sv39x4")


def test_alloc_free_reuse_and_zeroing() -> None:
    pool = TablePagePool(MODE, reserve_pages=1024)
    root = pool.alloc_root()
    assert pool.hpa_of(root) % 16384 == 0 and pool.in_use == 4
    rows = pool.alloc(3)
    assert rows.tolist() == [root + 4, root + 5, root + 6]  # fresh rows are consecutive
    pool.pages[rows[1]] = 7
    pool.free([int(rows[1])])
    again = pool.alloc(1)
    assert again.tolist() == [rows[1]] and not pool.pages[again[0]].any()  # zeroed on reuse
    assert pool.in_use == 7
    assert pool.alloc(0).size == 0


def test_table_ptes_point_at_rows_and_follow_back() -> None:
    pool = TablePagePool(MODE, reserve_pages=1024)
    rows = pool.alloc(5)
    pte = pool.table_pte(int(rows[2]))
    assert pte & (PTE_V | PTE_RWX) == PTE_V
    assert (pte >> PTE_PPN_SHIFT) << 12 == pool.hpa_of(int(rows[2]))
    assert pool.follow(pte) == rows[2]
    ptes = pool.table_ptes(rows)
    assert ptes.dtype == np.uint64 and pool.follow_many(ptes).tolist() == rows.tolist()


def test_the_flat_views_alias_the_pages_and_survive_growth() -> None:
    pool = TablePagePool(MODE, reserve_pages=4096)
    rows = pool.alloc(2)
    pool.words[int(rows[1]) * 512 + 7] = 0xABC
    assert int(pool.pages[rows[1], 7]) == 0xABC and int(pool.flat[int(rows[1]) * 512 + 7]) == 0xABC
    assert int(pool.table(int(rows[1]))[7]) == 0xABC
    pool.alloc(1000)  # grows the array: the views follow it
    assert int(pool.words[int(rows[1]) * 512 + 7]) == 0xABC
    pool.flat[5] = 9
    assert int(pool.pages[0, 5]) == 9
    sv32 = TablePagePool(get_mode("sv32x4"), reserve_pages=64)
    assert sv32.words.format == "I" and sv32.pages.shape[1] == 1024


def test_exhaustion_and_the_hpa_window() -> None:
    base = 1 << 36  # where 64-bit modes put their table windows
    space = HostPhysSpace(base=base, limit=base + 64 * 4096 * 3)
    pool = TablePagePool(MODE, reserve_pages=64, space=space)
    with pytest.raises(VmmError, match="exhausted"):
        pool.alloc(65)
    other = TablePagePool(MODE, reserve_pages=64, space=space)
    assert other.base_hpa != pool.base_hpa
    pool.close()
    third = TablePagePool(MODE, reserve_pages=64, space=space)
    assert third.base_hpa == pool.base_hpa  # the window came back


def test_page_cache_topup_take_give_back_trim() -> None:
    pool = TablePagePool(MODE, reserve_pages=1024)
    cache = PageCache(pool, minimum=3)
    cache.topup()
    assert len(cache) == 3
    cache.topup(10)
    assert len(cache) == 10 and pool.in_use == 10
    cache.locked = True
    with pytest.raises(ModelBug, match="under the MMU lock"):
        cache.topup(20)
    row = cache.take_one()
    two = cache.take(2)
    with pytest.raises(PageCacheEmpty, match="top"):
        cache.take(8)
    pool.pages[row] = 5
    cache.give_back([row])  # freed under the lock: back in the cache, zeroed
    assert not pool.pages[row].any() and len(cache) == 8
    cache.locked = False
    cache.trim()
    assert len(cache) == 3 and pool.in_use == 3 + 2
    cache.drain()
    assert len(cache) == 0 and pool.in_use == 2 and two.size == 2
    with pytest.raises(PageCacheEmpty):
        cache.take_one()
