"""The destination's reserve of faulted-in memory (fastpath.Reserve), on the real kernel."""

from __future__ import annotations

import threading
from array import array

import pytest

from migrate import fastpath, memory
from migrate._native import lib
from migrate.staging import Staging

pytestmark = pytest.mark.host

MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss in smaps_rollup")


def mapped(address: int, length: int) -> bool:
    """Whether [address, address + length) is mapped (madvise answers ENOMEM where it is not)."""
    return lib.mig_madvise(address, length, lib.MADV_NORMAL) == 0


def test_fill_faults_the_memory_in_and_take_gives_it_back_ahead():
    before = rss_bytes()
    r = fastpath.Reserve(40 * MIB)
    try:
        base = int(fastpath.ffi.cast("uintptr_t", r.st.base))
        assert base % (2 * MIB) == 0 and r.size == 40 * MIB
        assert mapped(base, r.size)
        r.fill()
        assert r.error is None and r.st.filled == r.size
        assert rss_bytes() - before >= 38 * MIB  # resident, not just reserved address space
        r.take(3 * MIB)  # 3 MiB asked: 3 + 16 MiB margin, in whole 2 MiB chunks
        assert r.st.freed == 20 * MIB
        assert not mapped(base, 2 * MIB) and not mapped(base + 18 * MIB, 2 * MIB)
        assert mapped(base + 20 * MIB, 20 * MIB)
        r.take(100 * MIB)  # more than the reserve: everything goes, nothing beyond it
        assert r.st.freed == r.size and not mapped(base + 38 * MIB, 2 * MIB)
    finally:
        r.close()
        r.close()  # idempotent


def test_take_never_releases_what_is_not_filled_yet():
    r = fastpath.Reserve(8 * MIB)
    try:
        r.take(1 * MIB)
        assert r.st.freed == 0  # nothing filled: a migration starting early takes nothing
        lib.mig_reserve_fill(r.st, 2 * MIB)
        r.take(0)
        assert r.st.filled == 2 * MIB and r.st.freed == 2 * MIB
    finally:
        r.close()


def test_give_back_while_filling_stops_the_fill():
    r = fastpath.Reserve(512 * MIB)
    t = threading.Thread(target=r.fill)
    t.start()
    r.give_back()
    t.join(30)
    assert not t.is_alive()
    assert r.error is None  # chunks given back during the fill are not an error
    assert r.st.freed == r.size
    r.close()


def test_claim_moves_faulted_in_chunks_and_take_continues_after_them():
    """claim: filled chunks move (mremap) to another address with their frames, no fault when
    written there; they count as used, so take keeps giving back ahead of later installs."""
    r = fastpath.Reserve(24 * MIB)
    dst = memory.Region.anonymous(8 * MIB)
    try:
        r.fill()
        base = int(fastpath.ffi.cast("uintptr_t", r.st.base))
        assert r.claim(dst.address, 5 * MIB) == 4 * MIB  # whole chunks only
        assert r.st.freed == 4 * MIB and r.st.used == 4 * MIB
        assert not mapped(base, 4 * MIB)  # gone from the reserve
        present = [e.present for e in dst.pagemap(0, dst.npages)]
        assert all(present[:1024]) and not any(present[1024:])  # moved in, already backed
        dst[0] = 7
        assert dst[0] == 7
        r.take(0)  # used 4 MiB + 16 MiB margin
        assert r.st.freed == 20 * MIB
        assert r.claim(dst.address + 4 * MIB, 4 * MIB) == 4 * MIB
        assert r.claim(dst.address, 2 * MIB) == 0  # nothing filled is left
    finally:
        dst.close()
        r.close()


def test_staging_stores_into_reserve_memory():
    """Staging claims a reserve chunk under each 2 MiB piece before its first store; without
    filled reserve left it stores into fresh memory (and asks the reserve to give back)."""
    npages = 1536  # 6 MiB: three chunks
    r = fastpath.Reserve(4 * MIB)
    r.fill()
    st = Staging(npages, memory.PAGE_SIZE, r)
    try:
        hashes = array("Q", bytes(8 * npages))
        data = bytes(range(256)) * 16 * 8  # 8 pages
        idx = array("I", range(0, 8))
        assert st.store(idx, bytes(8), data, hashes) == (8, 0)
        assert r.st.freed == 2 * MIB  # chunk 0 came from the reserve
        present = [e.present for e in st.region.pagemap(0, 512)]
        assert all(present)  # the whole chunk is backed, not just the 8 pages stored
        st.store(array("I", range(1024, 1032)), bytes(8), data, hashes)  # chunk 2
        assert r.st.freed == 4 * MIB
        st.store(array("I", range(600, 608)), bytes(8), data, hashes)  # chunk 1: none left
        assert bytes(st.region.read(600 * memory.PAGE_SIZE, len(data))) == data
        assert bytes(st.region.read(1024 * memory.PAGE_SIZE, len(data))) == data
        assert list(st.backed) == [1, 1, 1]
    finally:
        st.close()
        r.close()
