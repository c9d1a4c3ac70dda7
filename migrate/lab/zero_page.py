"""zero-page: fresh anonymous memory is the shared zero page until written.

Host: read one byte of every page of 1 GiB of fresh private anonymous memory (from C); RSS
barely moves and pagemap shows every page on one physical frame, which /proc/kpageflags names
the zero page. Then write N pages: RSS grows by exactly N pages (each write fault copies the zero
page into a fresh frame). Sim: the same in the model, with the fault log and frame refcounts.
"""

from __future__ import annotations

import array
import os
from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, is_root, proc_status

READ_SIZE = 1 << 30
WRITE_PAGES = 4096
# RSS counters are exact enough here; the interpreter may allocate a little between reads.
RSS_SLACK_PAGES = 64
READ_RSS_LIMIT = 4 << 20
KPF_ZERO_PAGE = 24  # include/uapi/linux/kernel-page-flags.h
PFN_MASK = (1 << 55) - 1


def kpageflags(pfn: int) -> int | None:
    try:
        fd = os.open("/proc/kpageflags", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 8, pfn * 8)
    finally:
        os.close(fd)
    return int.from_bytes(data, "little") if len(data) == 8 else None


def pagemap_raw(start: int, npages: int) -> array.array:
    from migrate._sys import check, ffi, lib

    out = array.array("Q", bytes(8 * npages))
    fd = check(lib.mig_open_pagemap(0, 0), "open /proc/self/pagemap")
    try:
        check(lib.mig_pagemap_read(fd, start, npages, 4096, ffi.from_buffer("uint64_t[]", out)),
              "pread(pagemap)")
    finally:
        os.close(fd)
    return out


def host() -> HostResult:
    from migrate._sys import ffi, lib
    from migrate.memory import PAGE_SIZE, Region

    npages = READ_SIZE // PAGE_SIZE
    ev: dict[str, Any] = {"read_bytes": READ_SIZE, "write_pages": WRITE_PAGES}
    with Region.anonymous(READ_SIZE, thp=False) as region:  # no huge zero page: 4 KiB view
        before = proc_status()
        lib.mig_touch_range(region.address, npages, PAGE_SIZE, 0, ffi.NULL)
        after_read = proc_status()
        raw = pagemap_raw(region.address, npages)
        present = sum(1 for v in raw if v >> 63)
        pfns = {v & PFN_MASK for v in raw if v >> 63}
        # Write the last WRITE_PAGES pages (each a zero-page mapping now): one COW each.
        first = npages - WRITE_PAGES
        before_write = proc_status()  # after the pagemap buffer above was allocated
        lib.mig_touch_range(region.page_address(first), WRITE_PAGES, PAGE_SIZE, 1, ffi.NULL)
        after_write = proc_status()
        raw_w = pagemap_raw(region.page_address(first), WRITE_PAGES)
        written_pfns = {v & PFN_MASK for v in raw_w if v >> 63}
    read_growth = after_read["RssAnon"] - before["RssAnon"]
    write_growth = after_write["RssAnon"] - before_write["RssAnon"]
    ev.update({
        "rss_anon_before": before["RssAnon"], "rss_anon_after_read": after_read["RssAnon"],
        "rss_anon_growth_read": read_growth,
        "page_tables_growth_read": after_read.get("VmPTE", 0) - before.get("VmPTE", 0),
        "pages_present_after_read": present,
        "distinct_pfns_after_read": len(pfns) if is_root() else None,
        "rss_anon_growth_write": write_growth,
        "rss_anon_growth_write_pages": write_growth // PAGE_SIZE,
        "distinct_pfns_written": len(written_pfns) if is_root() else None,
    })
    rules = {
        "every_page_present_after_read": present == npages,
        "rss_barely_moved_on_read": read_growth < READ_RSS_LIMIT,
        "rss_grew_by_written_pages": abs(write_growth // PAGE_SIZE - WRITE_PAGES)
        <= RSS_SLACK_PAGES,
    }
    if is_root():
        zero_pfn = next(iter(pfns)) if len(pfns) == 1 else None
        flags = kpageflags(zero_pfn) if zero_pfn is not None else None
        ev["zero_pfn"] = hex(zero_pfn) if zero_pfn is not None else None
        ev["kpageflags_zero_page"] = bool(flags is not None and flags >> KPF_ZERO_PAGE & 1)
        rules["one_shared_frame"] = len(pfns) == 1
        rules["frame_is_the_zero_page"] = ev["kpageflags_zero_page"]
        rules["written_pages_got_own_frames"] = (len(written_pfns) == WRITE_PAGES
                                                 and zero_pfn not in written_pfns)
        reason = ""
    else:
        reason = "not root: pagemap hides PFNs, so the shared frame is not shown"
    ev["rules"] = rules
    ok = all(rules.values())
    summary = (f"read 1 GiB: RSS +{read_growth >> 10} KiB, {present} pages present on "
               f"{ev['distinct_pfns_after_read']} frame(s) (zero page: "
               f"{ev.get('kpageflags_zero_page')}); wrote {WRITE_PAGES} pages: RSS "
               f"+{write_growth // PAGE_SIZE} pages")
    return HostResult("ran", reason, ev, ok, summary)


def sim() -> SimResult:
    from migrate.sim import Machine

    m = Machine(cores=2, memory=64 << 20)
    zero = m.physmem.zero_frame
    p = m.kernel.spawn("reader")
    n = 256
    a = p.mmap(None, n * 4096, "rw")
    for i in range(n):
        p.read(a + i * 4096, 8)
    read_frames = {p.frame_of(a + i * 4096) for i in range(n)}
    rss_after_read = p.rss_pages()
    read_faults = [(hex(r.error_code), r.resolution) for r in p.fault_log[:1]]
    p.write(a, b"first write")
    cow = p.fault_log[-1]
    written_frame = p.frame_of(a)
    child = p.fork("child")
    shared_refcount = m.physmem.frame(written_frame).refcount
    child_sees_zero = child.frame_of(a + 4096) == zero
    child.write(a, b"child")
    child_cow = child.fault_log[-1].resolution
    refcounts_after = [m.physmem.frame(written_frame).refcount,
                       m.physmem.frame(child.frame_of(a)).refcount]
    ev = {
        "pages_read": n, "distinct_frames_after_read": len(read_frames),
        "all_zero_frame": read_frames == {zero}, "rss_pages_after_read": rss_after_read,
        "first_read_fault": read_faults,
        "first_write": {"error_code": hex(cow.error_code), "resolution": cow.resolution},
        "rss_pages_after_write": p.rss_pages(),
        "refcount_after_fork": shared_refcount, "child_page1_is_zero_frame": child_sees_zero,
        "child_write_resolution": child_cow, "refcounts_after_child_write": refcounts_after,
    }
    ok = (read_frames == {zero} and rss_after_read == 0 and cow.resolution == "cow"
          and cow.error_code == 0x7 and p.rss_pages() == 1 and shared_refcount == 2
          and child_sees_zero and child_cow == "cow" and refcounts_after == [1, 1])
    summary = (f"{n} reads -> 1 zero frame, RSS 0; first write #PF {cow.error_code:#x} -> "
               f"{cow.resolution}; after fork refcount {shared_refcount}, child write -> "
               f"{child_cow}, refcounts {refcounts_after}")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "zero-page", "Demand paging and the shared zero page",
    "Fresh anonymous memory is a promise, not memory: reading it maps one shared, read-only "
    "frame of zeros; the first write to a page takes a copy-on-write fault that allocates a "
    "private frame. So a program can ask for gigabytes of zeroed memory and pay only for the "
    "pages it writes.",
    host, sim)
