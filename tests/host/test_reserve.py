"""The destination's reserve of faulted-in memory (fastpath.Reserve), on the real kernel."""

from __future__ import annotations

import threading

import pytest

from migrate import fastpath
from migrate._native import lib

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
