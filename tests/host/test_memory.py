"""Region, pagemap, PAGEMAP_SCAN on another process, process_vm_readv/writev, hugetlb."""

from __future__ import annotations

import os
import signal

import pytest

from migrate import memory
from migrate.memory import PAGE_SIZE, PageCategory, PagemapScanner, Region
from migrate.probe import fork_paused

pytestmark = pytest.mark.host


def test_region_buffer_view_and_pagemap_presence():
    with Region.anonymous(4 * PAGE_SIZE) as region:
        assert [e.present for e in region.pagemap()] == [False] * 4
        view = region.view()
        view[PAGE_SIZE:PAGE_SIZE + 3] = b"abc"
        entries = region.pagemap()
        assert [e.present for e in entries] == [False, True, False, False]
        assert entries[1].exclusive and not entries[1].file_shared
        if os.geteuid() == 0:
            assert entries[1].pfn is not None  # frame numbers are visible to root
        assert bytes(view[PAGE_SIZE:PAGE_SIZE + 3]) == b"abc"
    with pytest.raises(ValueError):
        view[0]  # released when the region closed, rather than pointing at unmapped memory


def test_dontneed_drops_private_pages_and_populate_write_brings_them_back():
    with Region.anonymous(4 * PAGE_SIZE) as region:
        region.populate(write=True)
        assert all(e.present for e in region.pagemap())
        region[0] = 9
        region.advise("DONTNEED")
        assert not any(e.present for e in region.pagemap())
        assert region[0] == 0  # private anonymous memory comes back zero-filled


def test_memfd_region_is_shared_between_mappings_and_remove_punches_holes():
    with Region.memfd(4 * PAGE_SIZE) as a, Region.from_fd(a.memfd, a.size) as b:
        a.write(0, b"shared")
        assert b.read(0, 6) == b"shared"
        assert b.pagemap()[0].file_shared
        b.advise(memory.Advice.REMOVE)  # frees the backing store: both mappings see zeros
        assert a.read(0, 6) == bytes(6)


def test_remap_grows_the_region_and_keeps_the_data():
    with Region.anonymous(2 * PAGE_SIZE) as region:
        region.write(0, b"keep")
        region.remap(64 * PAGE_SIZE)
        assert region.size == 64 * PAGE_SIZE and region.read(0, 4) == b"keep"
        region[63 * PAGE_SIZE] = 1


def test_fixed_noreplace_refuses_an_occupied_address():
    with Region.anonymous(PAGE_SIZE) as region, pytest.raises(FileExistsError, match="mmap"):
        Region.anonymous(PAGE_SIZE, address=region.address, fixed_noreplace=True)


def test_process_vm_read_write_and_pagemap_scan_on_a_child(reap):
    with Region.anonymous(16 * PAGE_SIZE) as region:
        for i in (0, 2, 5, 6):
            region.write(i * PAGE_SIZE, bytes([0x30 + i]) * PAGE_SIZE)
        pid = fork_paused()
        reap.track(pid)
        try:
            # the child has our pages (copy-on-write): read them through its address space
            got = memory.read_process(pid, region.page_address(2), 8)
            assert bytes(got) == bytes([0x32]) * 8
            into = bytearray(4 * PAGE_SIZE)
            addrs = [region.page_address(i) for i in (6, 0, 5, 2)]
            assert memory.read_process_pages(pid, addrs, PAGE_SIZE, into) == 4 * PAGE_SIZE
            assert into[::PAGE_SIZE] == bytes([0x36, 0x30, 0x35, 0x32])
            # writing the child's copy leaves ours alone
            assert memory.write_process(pid, region.page_address(0), b"child") == 5
            assert bytes(memory.read_process(pid, region.page_address(0), 5)) == b"child"
            assert region.read(0, 5) == bytes([0x30]) * 5
            # PAGEMAP_SCAN of the child's mm: exactly the pages present at fork time
            with PagemapScanner(pid) as scanner:
                runs = scanner.scan(region.address, region.end, require=PageCategory.PRESENT,
                                    return_mask=PageCategory.PRESENT)
            assert [((s - region.address) // PAGE_SIZE, (e - region.address) // PAGE_SIZE)
                    for s, e, _ in runs] == [(0, 1), (2, 3), (5, 7)]
        finally:
            os.kill(pid, signal.SIGKILL)
            reap(pid)
    # a gathered read larger than IOV_MAX pages loops in C
    with Region.anonymous(2 * memory.IOV_MAX * PAGE_SIZE) as big:
        big.populate(write=True)
        for i in range(0, big.npages, 97):
            big[i * PAGE_SIZE] = i % 251
        pid = fork_paused()
        reap.track(pid)
        try:
            out = bytearray(big.size)
            addrs = list(big.pages())
            assert memory.read_process_pages(pid, addrs, PAGE_SIZE, out) == big.size
            assert all(out[i * PAGE_SIZE] == i % 251 for i in range(0, big.npages, 97))
        finally:
            os.kill(pid, signal.SIGKILL)
            reap(pid)


def test_pagemap_scan_max_pages_and_vector_overflow():
    with Region.anonymous(64 * PAGE_SIZE) as region:
        for i in range(0, 64, 2):  # 32 separate present runs
            region[i * PAGE_SIZE] = 1
        with PagemapScanner(capacity=5) as scanner:  # forces the walk to continue 7 times
            runs = scanner.scan(region.address, region.end, require=PageCategory.PRESENT,
                                return_mask=PageCategory.PRESENT)
            assert [s for s, _, _ in runs] == [region.page_address(i) for i in range(0, 64, 2)]
            limited = scanner.scan(region.address, region.end, require=PageCategory.PRESENT,
                                   max_pages=3)
            assert sum((e - s) // PAGE_SIZE for s, e, _ in limited) == 3
            absent = scanner.scan(region.address, region.end, exclude=PageCategory.PRESENT)
            assert [s for s, _, _ in absent] == [region.page_address(i) for i in range(1, 64, 2)]


def test_hugetlb_2m_region_maps_one_huge_page(hugepages_2m):
    hugepages_2m(1)
    with Region.anonymous(1, hugetlb="2M") as region:
        assert region.size == region.page_size == 2 << 20
        region[(1 << 20) + 1] = 7
        runs = memory.pagemap_scan("self", region.address, region.end,
                                   require=PageCategory.PRESENT | PageCategory.HUGE)
        assert [(s, e) for s, e, _ in runs] == [(region.address, region.end)]
        assert PageCategory.HUGE in runs[0][2]


def test_thp_advice_decides_whether_the_range_gets_huge_pages(caps):
    mode = caps["thp"]["enabled"]
    if mode not in ("madvise", "always"):
        pytest.skip(f"transparent huge pages are {mode!r} here")
    with Region.anonymous(4 << 20, thp=False) as region:
        region.populate(write=True)
        assert memory.pagemap_scan("self", region.address, region.end,
                                   require=PageCategory.HUGE) == []
    with Region.anonymous(4 << 20, thp=True) as region:
        region.populate(write=True)
        huge = memory.pagemap_scan("self", region.address, region.end,
                                   require=PageCategory.HUGE)
        if not huge:
            pytest.skip("MADV_HUGEPAGE got no huge page (memory too fragmented right now)")
        # whole 2 MiB extents, aligned: a PMD maps them
        for start, end, _ in huge:
            assert start % (2 << 20) == 0 and (end - start) % (2 << 20) == 0
