"""Non-fault events: REMOVE, UNMAP, REMAP and FORK. The kernel makes madvise/munmap/mremap/fork
wait until the handler has read the event, so those calls run in another thread (cffi releases
the GIL) while this thread reads."""

from __future__ import annotations

import os
import threading

import pytest

from migrate import memory
from migrate.memory import PAGE_SIZE, Region
from migrate.probe import fork_touch
from migrate.uffd import Feature, Fork, PageFault, Remap, Remove, Unmap, Userfaultfd

pytestmark = pytest.mark.host


def in_thread(fn):
    """Run fn in a thread; return (thread, box) where box gets the result or the exception."""
    box: dict = {}

    def body():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


def read_until(uffd: Userfaultfd, count: int, timeout: float = 5.0) -> list:
    events: list = []
    while len(events) < count:
        batch = uffd.wait_events(timeout=timeout)
        if not batch:
            pytest.fail(f"expected {count} events, got {events} before the {timeout}s deadline")
        events.extend(batch)
    return events


def test_remove_event_on_madv_dontneed(need):
    need("EVENT_REMOVE")
    with Userfaultfd.open(Feature.EVENT_REMOVE) as uffd, Region.anonymous(8 * PAGE_SIZE) as r:
        uffd.register(r.address, r.size, "MISSING")
        uffd.copy_range(r.address, b"\x01" * r.size)
        t, box = in_thread(lambda: r.advise("DONTNEED", 2 * PAGE_SIZE, 3 * PAGE_SIZE))
        events = read_until(uffd, 1)
        t.join(5)
        assert not t.is_alive() and "error" not in box
        assert events == [Remove(r.page_address(2), r.page_address(5))]
        # the pages are gone: copying into them works again, the others still raise EEXIST
        assert uffd.copy_pages([r.page_address(i) for i in range(8)], b"\x02" * r.size) == 3


def test_unmap_event_on_munmap(need):
    need("EVENT_UNMAP")
    with Userfaultfd.open(Feature.EVENT_UNMAP) as uffd:
        addr = memory.mmap(8 * PAGE_SIZE)
        try:
            uffd.register(addr, 8 * PAGE_SIZE, "MISSING")
            t, box = in_thread(lambda: memory.munmap(addr + 4 * PAGE_SIZE, 4 * PAGE_SIZE))
            events = read_until(uffd, 1)
            t.join(5)
            assert "error" not in box
            assert events == [Unmap(addr + 4 * PAGE_SIZE, addr + 8 * PAGE_SIZE)]
            # munmap of a range registered with EVENT_UNMAP waits for its event to be read:
            # unregister first, or this thread would wait for itself
            uffd.unregister(addr, 4 * PAGE_SIZE)
        finally:
            memory.munmap(addr, 4 * PAGE_SIZE)


def test_remap_event_on_mremap(need):
    need("EVENT_REMAP")
    with Userfaultfd.open(Feature.EVENT_REMAP) as uffd:
        old = memory.mmap(4 * PAGE_SIZE)
        target = memory.mmap(4 * PAGE_SIZE)  # a place to move it to (MREMAP_FIXED replaces it)
        moved = False
        try:
            uffd.register(old, 4 * PAGE_SIZE, "MISSING")
            uffd.copy(old, b"\x07" * PAGE_SIZE)
            t, box = in_thread(lambda: memory.mremap(old, 4 * PAGE_SIZE, 4 * PAGE_SIZE,
                                                     fixed_address=target))
            events = read_until(uffd, 1)
            t.join(5)
            assert "error" not in box, box.get("error")
            moved = True
            assert box["result"] == target
            assert events == [Remap(old, target, 4 * PAGE_SIZE)]
            # the registration moved with the VMA: the copied page came along, the rest is
            # still missing and still ours to fill
            assert memory.pagemap("self", target, 1)[0].present
            assert uffd.copy(target + PAGE_SIZE, b"\x08" * PAGE_SIZE) == PAGE_SIZE
        finally:
            memory.munmap(target, 4 * PAGE_SIZE)
            if not moved:
                memory.munmap(old, 4 * PAGE_SIZE)


def test_fork_event_and_the_childs_registration_survives(need, reap):
    """EVENT_FORK hands us the child's own uffd; a missing page touched by the child faults on
    it, and a COPY through it fills the child's memory, not ours."""
    need("EVENT_FORK")
    with Userfaultfd.open(Feature.EVENT_FORK) as uffd, Region.anonymous(4 * PAGE_SIZE) as r:
        uffd.register(r.address, r.size, "MISSING")
        uffd.copy(r.address, b"\x11" * PAGE_SIZE)  # present before the fork: inherited
        rfd, wfd = os.pipe()
        try:
            # the child reads page 0 (present) then page 2 (missing in the child too)
            t, box = in_thread(lambda: fork_touch([r.address, r.page_address(2)], out_fd=wfd))
            events = read_until(uffd, 1)
            assert len(events) == 1 and isinstance(events[0], Fork)
            t.join(5)
            assert "error" not in box, box.get("error")
            pid = box["result"]
            reap.track(pid)
            with Userfaultfd.adopt(events[0].uffd, Feature.EVENT_FORK) as child_uffd:
                faults = read_until(child_uffd, 1)
                assert isinstance(faults[0], PageFault)
                assert faults[0].address & ~(PAGE_SIZE - 1) == r.page_address(2)
                child_uffd.copy(r.page_address(2), b"\x22" * PAGE_SIZE)
                assert os.waitstatus_to_exitcode(reap(pid)) == 0
            assert os.read(rfd, 2) == b"\x11\x22"
            # our own page 2 is still missing: the copy went into the child's mm
            assert not memory.pagemap("self", r.page_address(2), 1)[0].present
            assert uffd.read_events() == []
        finally:
            os.close(rfd)
            os.close(wfd)


def test_adopt_does_not_redo_the_handshake(need):
    need("THREAD_ID")
    with Userfaultfd.open(Feature.THREAD_ID) as uffd, Region.anonymous(PAGE_SIZE) as r:
        adopted = Userfaultfd.adopt(os.dup(uffd.fileno()), Feature.THREAD_ID)
        with adopted:
            assert adopted.features == Feature.THREAD_ID
            # the fd is usable at once (a second UFFDIO_API would have failed with EINVAL)
            adopted.register(r.address, r.size, "MISSING")
            assert adopted.copy(r.address, b"\x05" * PAGE_SIZE) == PAGE_SIZE
        assert r[0] == 5


def test_copy_into_a_process_that_exited_says_so(need, reap):
    need("EVENT_FORK")
    from migrate.probe import fork_paused

    with Userfaultfd.open(Feature.EVENT_FORK) as uffd, Region.anonymous(2 * PAGE_SIZE) as r:
        uffd.register(r.address, r.size, "MISSING")
        t, box = in_thread(fork_paused)
        events = read_until(uffd, 1)
        t.join(5)
        pid = box["result"]
        reap.track(pid)
        with Userfaultfd.adopt(events[0].uffd, Feature.EVENT_FORK) as child_uffd:
            os.kill(pid, 9)
            reap(pid)
            with pytest.raises(ProcessLookupError, match="serves has exited"):
                child_uffd.copy_pages([r.address], bytes(PAGE_SIZE))
            with pytest.raises(ProcessLookupError, match="UFFDIO_COPY"):
                child_uffd.copy(r.address, bytes(PAGE_SIZE))


def test_wp_async_dirty_tracking_of_another_process(need, reap):
    """The source daemon's view: a guest process's region is write-protected asynchronously and
    PAGEMAP_SCAN on /proc/PID/pagemap returns the pages written since the previous round."""
    need("WP_ASYNC", "WP_UNPOPULATED", "EVENT_FORK", pagemap_scan=True)
    from migrate.memory import PageCategory, PagemapScanner
    from migrate.probe import fork_paused

    features = Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.EVENT_FORK
    with Userfaultfd.open(features) as uffd, Region.anonymous(16 * PAGE_SIZE) as r:
        r.populate(write=True)
        uffd.register(r.address, r.size, "WP")
        uffd.writeprotect(r.address, r.size, True)
        t, box = in_thread(fork_paused)
        events = read_until(uffd, 1)
        t.join(5)
        pid = box["result"]
        reap.track(pid)
        try:
            with Userfaultfd.adopt(events[0].uffd, features), PagemapScanner(pid) as scanner:
                def round_() -> list[tuple[int, int]]:
                    runs = scanner.scan(r.address, r.end, require=PageCategory.WRITTEN,
                                        wp_matching=True, check_wpasync=True)
                    return [((s - r.address) // PAGE_SIZE, (e - r.address) // PAGE_SIZE)
                            for s, e, _ in runs]

                assert round_() == []  # the child inherited the protection with its uffd
                for i in (2, 9, 10):  # writes into the child's memory (process_vm_writev)
                    assert memory.write_process(pid, r.page_address(i), b"dirty") == 5
                assert round_() == [(2, 3), (9, 11)]
                assert round_() == []  # re-protected by the previous walk
                memory.write_process(pid, r.page_address(15), b"x")
                assert round_() == [(15, 16)]
            # our own copy of the region saw none of it
            assert memory.pagemap_scan("self", r.address, r.end,
                                       require=PageCategory.WRITTEN) == []
        finally:
            os.kill(pid, 9)
            reap(pid)


def test_handler_may_allocate_while_a_fork_waits_for_its_event(need, reap):
    """fork_touch/fork_paused use a raw clone: glibc's fork() would hold malloc's locks while
    the kernel waits for the FORK event, and a reader allocating memory would deadlock."""
    need("EVENT_FORK")
    import time

    from migrate._sys import ffi
    from migrate.probe import fork_paused

    with Userfaultfd.open(Feature.EVENT_FORK) as uffd, Region.anonymous(PAGE_SIZE) as r:
        uffd.register(r.address, r.size, "MISSING")
        t, box = in_thread(fork_paused)
        time.sleep(0.1)  # let the fork reach the kernel's wait for the event
        big = ffi.new("char[]", 1 << 20)  # malloc'd, not from Python's small-object arenas
        assert len(big) == 1 << 20
        events = read_until(uffd, 1)
        t.join(5)
        reap.track(box["result"])
        assert isinstance(events[0], Fork)
        os.close(events[0].uffd)
        os.kill(box["result"], 9)
        reap(box["result"])
