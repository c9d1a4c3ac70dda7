"""Faults served on the real kernel: a C toucher blocks on missing/WP/minor pages while this
Python thread reads the userfaultfd and resolves them."""

from __future__ import annotations

import os
import time

import pytest

from migrate import memory
from migrate.memory import PAGE_SIZE, PageCategory, PagemapScanner, Region
from migrate.probe import Toucher, probe, touch_pages
from migrate.uffd import Feature, Ioctl, PageFault, RegisterMode, Userfaultfd

pytestmark = pytest.mark.host


def page_of(byte: int) -> bytes:
    return bytes([byte]) * PAGE_SIZE


def test_missing_fault_served_by_copy_from_python_thread(need, serve):
    need("THREAD_ID")
    with Userfaultfd.open(Feature.THREAD_ID) as uffd, Region.anonymous(16 * PAGE_SIZE) as region:
        ioctls = uffd.register(region.address, region.size, RegisterMode.MISSING)
        assert Ioctl.COPY in ioctls and Ioctl.WAKE in ioctls
        toucher = Toucher.start((region.address, region.npages, PAGE_SIZE), write=False)
        tid = toucher.thread_id()

        def resolve(event):
            assert isinstance(event, PageFault)
            page = event.address & ~(PAGE_SIZE - 1)
            index = (page - region.address) // PAGE_SIZE
            assert uffd.copy(page, page_of(index + 1)) == PAGE_SIZE

        events = serve(uffd, toucher, resolve)
        faults = [e for e in events if isinstance(e, PageFault)]
        # one read fault per page, in touch order, all from the toucher thread
        assert [f.address & ~(PAGE_SIZE - 1) for f in faults] == list(region.pages())
        assert not any(f.write or f.wp or f.minor for f in faults)
        assert {f.thread_id for f in faults} == {tid}
        for i in range(region.npages):
            assert region.read(i * PAGE_SIZE, PAGE_SIZE) == page_of(i + 1)


def test_zeropage_resolves_with_zeros_and_shares_the_zero_frame(need, serve):
    need()
    with Userfaultfd.open() as uffd, Region.anonymous(4 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        toucher = Toucher.start(list(region.pages()))
        events = serve(uffd, toucher, lambda e: uffd.zeropage(e.address & ~(PAGE_SIZE - 1),
                                                              PAGE_SIZE))
        assert len(events) == 4
        assert region.read(0, region.size) == bytes(region.size)
        # A ZEROPAGE install maps the shared zero page: PAGEMAP_SCAN calls it PFNZERO.
        if os.geteuid() == 0:
            runs = PagemapScanner().scan(region.address, region.end,
                                         require=PageCategory.PFNZERO)
            assert runs and runs[0][0] == region.address and runs[-1][1] == region.end


def test_write_protect_fault_then_unprotect(need, serve):
    need("PAGEFAULT_FLAG_WP")
    with Userfaultfd.open() as uffd, Region.anonymous(4 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, RegisterMode.MISSING | RegisterMode.WP)
        # populate the pages through the uffd so none is missing, then protect them
        for i, addr in enumerate(region.pages()):
            uffd.copy(addr, page_of(0x40 + i))
        uffd.writeprotect(region.address, region.size, True)
        assert all(e.uffd_wp for e in region.pagemap())
        toucher = Toucher.start(list(region.pages()), write=True)

        def resolve(event):
            assert isinstance(event, PageFault) and event.wp and event.write
            uffd.writeprotect(event.address & ~(PAGE_SIZE - 1), PAGE_SIZE, False)

        events = serve(uffd, toucher, resolve)
        assert [e.address & ~(PAGE_SIZE - 1) for e in events] == list(region.pages())
        # the locked add of zero kept each byte; protection is gone from every page
        assert [region[i * PAGE_SIZE] for i in range(4)] == [0x40, 0x41, 0x42, 0x43]
        assert not any(e.uffd_wp for e in region.pagemap())


def test_wp_async_pagemap_scan_reports_exactly_the_written_pages(need):
    need("WP_ASYNC", "WP_UNPOPULATED", pagemap_scan=True)
    npages = 32
    written = [3, 7, 8, 20, 31]
    with Userfaultfd.open(Feature.WP_ASYNC | Feature.WP_UNPOPULATED) as uffd, \
            Region.anonymous(npages * PAGE_SIZE) as region, PagemapScanner() as scanner:
        region.populate(write=True, length=16 * PAGE_SIZE)  # half present, half never touched
        uffd.register(region.address, region.size, RegisterMode.WP)
        uffd.writeprotect(region.address, region.size, True)
        # start of a round: nothing written yet
        assert scanner.scan(region.address, region.end, require=PageCategory.WRITTEN,
                            wp_matching=True, check_wpasync=True) == []
        touch_pages([region.page_address(i) for i in written], write=True)
        assert uffd.read_events() == []  # async WP is resolved by the kernel, no events
        runs = scanner.scan(region.address, region.end, require=PageCategory.WRITTEN,
                            wp_matching=True, check_wpasync=True, return_mask=PageCategory.WRITTEN)
        pages = [(s - region.address) // PAGE_SIZE + k for s, e, _ in runs
                 for k in range((e - s) // PAGE_SIZE)]
        assert pages == written
        assert all(cat == PageCategory.WRITTEN for _, _, cat in runs)
        # the same walk write-protected them again: the next round is clean
        assert scanner.scan(region.address, region.end, require=PageCategory.WRITTEN) == []
        touch_pages([region.page_address(5)], write=True)
        runs = scanner.scan(region.address, region.end, require=PageCategory.WRITTEN)
        assert [(s, e) for s, e, _ in runs] == [(region.page_address(5), region.page_address(6))]


def test_minor_fault_on_memfd_resolved_by_continue(need, serve):
    need("MINOR_SHMEM")
    with Region.memfd(8 * PAGE_SIZE, "minor") as backing, \
            Region.from_fd(backing.memfd, backing.size) as guest, \
            Userfaultfd.open(Feature.MINOR_SHMEM) as uffd:
        # the page cache holds the data (written through another mapping); the guest mapping
        # has no PTEs yet, so its first access is a MINOR fault
        for i in range(8):
            backing.write(i * PAGE_SIZE, page_of(0x80 + i))
        ioctls = uffd.register(guest.address, guest.size, RegisterMode.MINOR)
        assert Ioctl.CONTINUE in ioctls
        toucher = Toucher.start(list(guest.pages()))

        def resolve(event):
            assert isinstance(event, PageFault) and event.minor
            assert uffd.continue_(event.address & ~(PAGE_SIZE - 1), PAGE_SIZE) == PAGE_SIZE

        events = serve(uffd, toucher, resolve)
        assert len(events) == 8
        assert [guest[i * PAGE_SIZE] for i in range(8)] == [0x80 + i for i in range(8)]


def test_poison_gives_sigbus_in_the_probe(need):
    need("POISON")
    with Userfaultfd.open(Feature.POISON) as uffd, Region.anonymous(2 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        assert uffd.poison(region.address, PAGE_SIZE) == PAGE_SIZE
        result = probe(region.address + 123, "read")
        assert result.faulted and result.signal_name == "SIGBUS"
        # handle_pte_marker() returns VM_FAULT_HWPOISON for a poisoned marker; x86 do_sigbus()
        # reports it as BUS_MCEERR_AR with CONFIG_MEMORY_FAILURE, else as BUS_ADRERR.
        assert result.si_code_name in ("BUS_MCEERR_AR", "BUS_ADRERR")
        assert region.address <= result.si_addr < region.address + PAGE_SIZE
        # the neighbour is untouched: still missing, so poisoning it works too (no EEXIST)
        assert uffd.poison(region.address + PAGE_SIZE, PAGE_SIZE) == PAGE_SIZE
        with pytest.raises(FileExistsError):
            uffd.poison(region.address, PAGE_SIZE)


def test_move_takes_pages_without_copying(need):
    need("MOVE")
    with Userfaultfd.open(Feature.MOVE) as uffd, Region.anonymous(4 * PAGE_SIZE) as dst, \
            Region.anonymous(4 * PAGE_SIZE) as src:
        uffd.register(dst.address, dst.size, "MISSING")
        for i in range(4):
            src.write(i * PAGE_SIZE, page_of(0x10 + i))
        frames = [e.pfn for e in src.pagemap()]
        assert uffd.move(dst.address, src.address, src.size) == src.size
        assert [dst[i * PAGE_SIZE] for i in range(4)] == [0x10, 0x11, 0x12, 0x13]
        if os.geteuid() == 0:  # frame numbers are visible to root: the same frames moved
            assert [e.pfn for e in dst.pagemap()] == frames
        assert not any(e.present for e in src.pagemap())


def test_copy_over_present_page_raises_file_exists(need):
    need()
    with Userfaultfd.open() as uffd, Region.anonymous(4 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        assert uffd.copy(region.address, page_of(1)) == PAGE_SIZE
        with pytest.raises(FileExistsError, match="UFFDIO_COPY"):
            uffd.copy(region.address, page_of(2))
        assert region[0] == 1
        # the batch helpers count EEXIST as already present, not as an error
        assert uffd.copy_pages([region.address, region.page_address(1)],
                               page_of(3) + page_of(4)) == 1
        # copy_range over [present, present, missing, missing] installs the last two
        assert uffd.copy_range(region.address, page_of(5) * 4) == 2 * PAGE_SIZE
        assert [region[i * PAGE_SIZE] for i in range(4)] == [1, 4, 5, 5]


def test_dontwake_batch_then_one_wake(need):
    need()
    with Userfaultfd.open() as uffd, Region.anonymous(8 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        toucher = Toucher.start(list(region.pages()))
        try:
            events = uffd.wait_events(timeout=5)
            assert len(events) == 1 and events[0].address == region.address
            # install all 8 pages without waking anyone
            assert uffd.copy_pages(list(region.pages()), page_of(9) * 8, wake=False) == 8
            time.sleep(0.05)
            assert toucher.done == 0, "a DONTWAKE copy woke the faulting thread"
            uffd.wake(region.address, region.size)
            assert toucher.join(timeout=5)
        finally:
            if not toucher.join(timeout=0):
                uffd.close()
                toucher.join(timeout=5)
        # the other seven pages were already present: no further faults
        assert uffd.read_events() == []
        assert region.read(0, region.size) == page_of(9) * 8


def test_zero_pages_batch_and_sigbus_feature(need):
    need("SIGBUS")
    with Userfaultfd.open(Feature.SIGBUS) as uffd, Region.anonymous(4 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        # with UFFD_FEATURE_SIGBUS a missing page raises SIGBUS instead of an event
        result = probe(region.page_address(2), "read")
        assert result.faulted and result.signal_name == "SIGBUS"
        assert result.si_addr == region.page_address(2)
        assert uffd.read_events() == []
        assert uffd.zero_pages([region.page_address(2), region.page_address(3)]) == 2
        assert not probe(region.page_address(2), "write").faulted
        assert probe(region.page_address(0), "read").signal_name == "SIGBUS"


def test_shmem_missing_fault_on_memfd(need, serve):
    need("MISSING_SHMEM")
    with Region.memfd(4 * PAGE_SIZE, "missing") as region, Userfaultfd.open() as uffd:
        uffd.register(region.address, region.size, "MISSING")
        toucher = Toucher.start(list(region.pages()), write=True)
        serve(uffd, toucher, lambda e: uffd.copy(e.address & ~(PAGE_SIZE - 1), page_of(0x33)))
        # the data is in the shared page cache: a second mapping of the memfd sees it
        with Region.from_fd(region.memfd, region.size) as other:
            assert other.read(0, other.size) == page_of(0x33) * 4


def test_open_via_device_and_syscall_agree(need, caps):
    need()
    if not caps["userfaultfd"]["dev_node"]["accessible"]:
        pytest.skip("/dev/userfaultfd is not accessible to this user")
    with Userfaultfd.open(via="dev") as a, Userfaultfd.open(via="syscall") as b:
        assert (a.via, b.via) == ("dev", "syscall")
        assert a.offered == b.offered
        assert len([f for f in Feature if f in a.offered]) == len(
            caps["userfaultfd"]["features"])
        assert not os.get_blocking(a.fileno())  # O_NONBLOCK by default


def test_unknown_feature_names_and_bits_are_rejected_before_any_syscall(need):
    need()
    with pytest.raises(ValueError, match="unknown userfaultfd feature bits"):
        Userfaultfd.open(1 << 40)
    with pytest.raises(ValueError, match="NOT_A_FEATURE"):
        Userfaultfd.open("THREAD_ID|NOT_A_FEATURE")


def test_partial_copy_reports_the_bytes_copied(need):
    need()
    with Userfaultfd.open() as uffd, Region.anonymous(4 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        uffd.copy(region.page_address(2), page_of(1))
        # pages 0 and 1 are missing, page 2 present: the kernel copies two pages and stops
        # (ioctl fails with EAGAIN, uffdio_copy.copy = 2 pages); the call reports that count
        assert uffd.copy(region.address, page_of(7) * 3) == 2 * PAGE_SIZE
        assert [region[i * PAGE_SIZE] for i in range(3)] == [7, 7, 1]
        # starting on the present page there is nothing to copy: EEXIST
        with pytest.raises(FileExistsError):
            uffd.copy(region.page_address(2), page_of(8) * 2)


def test_copy_with_wp_mode_installs_write_protected_pages(need, serve):
    need("PAGEFAULT_FLAG_WP")
    with Userfaultfd.open() as uffd, Region.anonymous(2 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, RegisterMode.MISSING | RegisterMode.WP)
        # from a memoryview slice, as a received frame would be: no copy in Python
        frame = memoryview(bytearray(page_of(0x61) + page_of(0x62)))
        assert uffd.copy(region.address, frame[:PAGE_SIZE], wp=True) == PAGE_SIZE
        assert uffd.copy(region.page_address(1), frame[PAGE_SIZE:]) == PAGE_SIZE
        assert [e.uffd_wp for e in region.pagemap()] == [True, False]
        # writing the protected page is a WP fault; the unprotected one is not
        toucher = Toucher.start([region.page_address(1), region.address], write=True)
        events = serve(uffd, toucher, lambda e: uffd.writeprotect(
            e.address & ~(PAGE_SIZE - 1), PAGE_SIZE, False))
        assert len(events) == 1 and events[0].wp and events[0].address == region.address
        assert [region[0], region[PAGE_SIZE]] == [0x61, 0x62]


def test_copy_pages_wakes_each_contiguous_run_for_several_waiting_threads(need):
    need()
    with Userfaultfd.open() as uffd, Region.anonymous(16 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        # three threads wait on pages 1, 2 (one run) and 9 (another run)
        waiters = [Toucher.start([region.page_address(i)]) for i in (1, 2, 9)]
        try:
            seen: set[int] = set()
            deadline = time.monotonic() + 5
            while len(seen) < 3 and time.monotonic() < deadline:
                seen |= {e.address for e in uffd.wait_events(timeout=0.5)}
            assert seen == {region.page_address(i) for i in (1, 2, 9)}
            pages = [1, 2, 3, 9, 10]
            assert uffd.copy_pages([region.page_address(i) for i in pages],
                                   b"".join(page_of(i) for i in pages)) == 5
            assert all(w.join(timeout=5) for w in waiters)
        finally:
            if not all(w.join(timeout=0) for w in waiters):
                uffd.close()
                for w in waiters:
                    w.join(timeout=5)
        assert [region[i * PAGE_SIZE] for i in pages] == pages
        assert uffd.read_events() == []


def test_copy_pages_skips_a_present_page_inside_a_run(need):
    need()
    with Userfaultfd.open() as uffd, Region.anonymous(8 * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        uffd.copy(region.page_address(2), page_of(0xEE))
        uffd.zero_pages([region.page_address(6)])
        # one run 1..4 with page 2 present in the middle, then a run 6..7 with 6 present
        pages = [1, 2, 3, 4, 6, 7]
        assert uffd.copy_pages([region.page_address(i) for i in pages],
                               b"".join(page_of(i) for i in pages)) == 4
        # pages 0 and 5 were never filled: still missing (never read them from Python!)
        assert not memory_present(region, 0) and not memory_present(region, 5)
        assert [region[i * PAGE_SIZE] for i in (1, 2, 3, 4, 6, 7)] == [1, 0xEE, 3, 4, 0, 7]
        assert uffd.zero_pages([region.page_address(i) for i in range(8)]) == 2


def memory_present(region: Region, index: int) -> bool:
    return region.pagemap(index, 1)[0].present


def test_missing_fault_on_hugetlb_served_with_one_2m_copy(need, serve, hugepages_2m):
    need("MISSING_HUGETLBFS")
    hugepages_2m(2)
    huge = 2 << 20
    with Userfaultfd.open() as uffd, Region.anonymous(2 * huge, hugetlb="2M") as region:
        assert region.page_size == huge
        uffd.register(region.address, region.size, "MISSING")
        # two touches inside the second huge page, one in the first
        toucher = Toucher.start([region.address + huge + 5 * PAGE_SIZE, region.address + 77,
                                 region.address + 2 * huge - 1])
        source = bytes(range(256)) * (huge // 256)

        def resolve(event):
            page = event.address & ~(huge - 1)
            assert uffd.copy(page, source) == huge

        events = serve(uffd, toucher, resolve)
        # one fault per huge page: the third touch hit the page the first one filled
        assert [e.address & ~(huge - 1) for e in events] == [region.address + huge,
                                                              region.address]
        assert region.read(huge - 3, 6) == bytes([253, 254, 255, 0, 1, 2])
        with pytest.raises(FileExistsError):
            uffd.copy(region.address, source)


def test_wp_async_mark_sets_the_written_pages_in_a_byte_map(need):
    """PagemapScanner.mark: the same walk as scan, each written page's byte set in C; a vector
    too small for the runs makes it continue the walk, and wp_matching protects them again."""
    need("WP_ASYNC", "WP_UNPOPULATED", pagemap_scan=True)
    npages = 64
    written = list(range(1, 64, 3))  # 21 separate runs
    with Userfaultfd.open(Feature.WP_ASYNC | Feature.WP_UNPOPULATED) as uffd, \
            Region.anonymous(npages * PAGE_SIZE) as region, PagemapScanner(capacity=4) as scanner:
        uffd.register(region.address, region.size, RegisterMode.WP)
        uffd.writeprotect(region.address, region.size, True)
        touch_pages([region.page_address(i) for i in written], write=True)
        dirty = bytearray(npages)
        assert scanner.mark(region.address, region.end, dirty, require=PageCategory.WRITTEN,
                            wp_matching=True, check_wpasync=True) == len(written)
        assert [i for i in range(npages) if dirty[i]] == written
        assert set(dirty) <= {0, 1}
        assert list(memory.byte_indexes(dirty)) == written
        again = bytearray(npages)
        assert scanner.mark(region.address, region.end, again,
                            require=PageCategory.WRITTEN) == 0  # protected again by the walk
        assert again == bytearray(npages)
        # a part of the region, into a map of that part only
        part = bytearray(8)
        touch_pages([region.page_address(17), region.page_address(40)], write=True)
        assert scanner.mark(region.page_address(16), region.page_address(24), part,
                            require=PageCategory.WRITTEN) == 1
        assert part == bytearray([0, 1, 0, 0, 0, 0, 0, 0])
        with pytest.raises(ValueError, match="byte map"):
            scanner.mark(region.address, region.end, bytearray(3), require=PageCategory.WRITTEN)


def test_byte_map_operations():
    a = bytearray([1, 1, 0, 0, 1])
    b = bytearray([1, 0, 1, 0, 0])
    c = bytearray(a)
    memory.bytes_clear(c, b)
    assert c == bytearray([0, 1, 0, 0, 1])
    c = bytearray(a)
    memory.bytes_keep(c, b)
    assert c == bytearray([1, 0, 0, 0, 0])
    c = bytearray(a)
    memory.bytes_set(c, b)
    assert c == bytearray([1, 1, 1, 0, 1])
    assert list(memory.byte_indexes(a)) == [0, 1, 4]
    assert list(memory.byte_indexes(bytearray(7))) == []
    with pytest.raises(ValueError, match="byte maps"):
        memory.bytes_set(c, bytearray(4))
