"""huge-pages: TLB reach. The same random accesses over 4 KiB pages and over huge pages.

Host: dependent random reads (each address depends on the previous load) over a 512 MiB buffer
backed by 4 KiB pages (THP off), by transparent huge pages (MADV_HUGEPAGE; AnonHugePages in
smaps), by hugetlb 2 MiB pages and, where one can be reserved, a hugetlb 1 GiB page. hugetlb
pages are reserved through /proc/sys/vm/nr_hugepages (and the 1 GiB pool's sysfs file) just for
the run and always given back. Evidence: backing (smaps, HugePages_Free, pagemap PFN runs), time
per access and the ratios. Sim: TLB misses and walks for the same pattern over 4 KiB and 2 MiB
pages (reach: entries x page size); fragmentation defeating a 2 MiB allocation; compaction
restoring it.
"""

from __future__ import annotations

import fcntl
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from migrate.lab.base import (
    HostResult,
    Scenario,
    SimResult,
    cpu_flags,
    is_root,
    meminfo,
    read_text,
    smaps_field,
)

BUF = 256 << 20
ACCESSES = 500_000
REPEATS = 3
POOL_2M = "/proc/sys/vm/nr_hugepages"
POOL_1G = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
HUGETLB_LOCK = "/tmp/migrate-lab-hugetlb.lock"


def _read_int(path: str) -> int | None:
    text = read_text(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass
class Reservation:
    """What :func:`reserved_huge_pages` did to a pool: pages ``added`` on entry, ``given_back``
    on exit (equal unless the pool could not be shrunk)."""

    path: str
    requested: int
    added: int = 0
    given_back: int = 0


@contextmanager
def reserved_huge_pages(path: str, count: int) -> Iterator[Reservation]:
    """Add ``count`` pages to a hugetlb pool for the duration (the kernel may find fewer free
    contiguous blocks: see ``.added``). Gives back what it added even on error, by subtracting
    from the value current at the end, so other users of the pool keep theirs. Lab runs hold
    HUGETLB_LOCK meanwhile, so two of them never interleave their read-modify-writes."""
    if count <= 0:
        raise ValueError(f"count must be positive, not {count}")
    res = Reservation(path, count)
    with open(HUGETLB_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = _read_int(path)
        if before is None:
            raise OSError(f"cannot read {path}")
        try:
            with open(path, "w") as f:
                f.write(str(before + count))
            now = _read_int(path) or before
            res.added = max(0, now - before)
            yield res
        finally:
            if res.added:
                current = _read_int(path) or 0
                with open(path, "w") as f:
                    f.write(str(max(0, current - res.added)))
                res.given_back = current - (_read_int(path) or 0)


def _chase(address: int, size: int) -> list[float]:
    from migrate._sys import lib

    lib.lab_random_chase(address, size, ACCESSES // 10, 7)  # warm-up
    return [lib.lab_random_chase(address, size, ACCESSES, 1234 + i) / ACCESSES
            for i in range(REPEATS)]


def _pfn_runs(region: Any, pages: int) -> bool:
    """Are the first ``pages`` 4 KiB pages on consecutive frames (one huge page)?"""
    from migrate.memory import pagemap

    pfns = [e.pfn for e in pagemap("self", region.address, pages)]  # 4 KiB entries
    known = [p for p in pfns if p is not None]
    return len(known) == pages and all(b == a + 1 for a, b in zip(known, known[1:],
                                                                    strict=False))


def _measure(name: str, make: Callable[[], Any], huge_pages_per_check: int) -> dict[str, Any]:
    t0 = time.monotonic()
    region = make()
    try:
        region.populate(write=True)
        populate_s = time.monotonic() - t0
        out: dict[str, Any] = {"populate_s": round(populate_s, 3)}
        out["anon_huge_bytes"] = smaps_field(region.address, "AnonHugePages")
        if is_root() and huge_pages_per_check:
            out["first_huge_page_physically_contiguous"] = _pfn_runs(region,
                                                                     huge_pages_per_check)
        out["hugetlb_free_during"] = meminfo().get("HugePages_Free")
        ns = _chase(region.address, BUF)
        out["ns_per_access"] = [round(x, 1) for x in ns]
        out["median_ns"] = round(statistics.median(ns), 1)
        return out
    finally:
        region.close()


def host() -> HostResult:
    from migrate.memory import Region

    if not is_root():
        return HostResult("skipped", "hugetlb pools need root (nr_hugepages)", {}, True,
                          "skipped: not root")
    configs: dict[str, Any] = {}
    configs["4k"] = _measure("4k", lambda: Region.anonymous(BUF, thp=False), 0)
    configs["thp"] = _measure("thp", lambda: Region.anonymous(BUF, thp=True), 512)
    pool_before = (_read_int(POOL_2M), _read_int(POOL_1G))
    reservations = []
    with reserved_huge_pages(POOL_2M, BUF >> 21) as r2:
        reservations.append(r2)
        if r2.added == BUF >> 21:
            configs["hugetlb_2m"] = _measure(
                "2m", lambda: Region.anonymous(BUF, hugetlb="2M"), 512)
        else:
            configs["hugetlb_2m"] = {"unavailable": f"only {r2.added} of {BUF >> 21} 2 MiB "
                                                    f"pages could be reserved"}
    if os.path.exists(POOL_1G):
        with reserved_huge_pages(POOL_1G, 1) as r1:
            reservations.append(r1)
            if r1.added == 1:
                configs["hugetlb_1g"] = _measure(
                    "1g", lambda: Region.anonymous(1 << 30, hugetlb="1G"), 1024)
            else:
                configs["hugetlb_1g"] = {"unavailable": "no free, contiguous, aligned 1 GiB of "
                                                        "RAM to reserve (fragmentation)"}
    pool_after = (_read_int(POOL_2M), _read_int(POOL_1G))
    base = configs["4k"]["median_ns"]
    ratios = {k: round(base / v["median_ns"], 2) for k, v in configs.items()
              if "median_ns" in v and v["median_ns"]}
    ev = {"buffer": BUF, "accesses": ACCESSES, "repeats": REPEATS, "configs": configs,
          "speedup_vs_4k": ratios, "pools_before": pool_before, "pools_after": pool_after,
          "reservations": [vars(r) for r in reservations],
          "thp_setting": (read_text("/sys/kernel/mm/transparent_hugepage/enabled")
                          or "").strip()}
    h2 = configs.get("hugetlb_2m", {})
    rules = {
        "4k_has_no_huge_pages": configs["4k"].get("anon_huge_bytes") == 0,
        "thp_backed_by_huge_pages": (configs["thp"].get("anon_huge_bytes") or 0) >= BUF // 2,
        "hugetlb_2m_ran": "median_ns" in h2,
        "hugetlb_2m_contiguous": bool(h2.get("first_huge_page_physically_contiguous")),
        "pools_given_back": all(r.given_back == r.added for r in reservations),
    }
    if "median_ns" in configs.get("hugetlb_1g", {}):
        rules["hugetlb_1g_contiguous"] = bool(
            configs["hugetlb_1g"].get("first_huge_page_physically_contiguous"))
    ev["rules"] = rules
    # Faster with huge pages is reported, not judged: it is timing on a shared, noisy VM, and
    # in a guest the hardware TLB caches the hypervisor's (nested or shadow) translation, whose
    # page size also depends on how the host backs guest memory.
    ev["huge_pages_faster"] = all(r > 1.0 for k, r in ratios.items() if k != "4k")
    ev["virtualised"] = "hypervisor" in cpu_flags()
    summary = (f"{ACCESSES} dependent random reads over {BUF >> 20} MiB, ns/access (median of "
               f"{REPEATS}): " + ", ".join(f"{k} {v['median_ns']}" for k, v in configs.items()
                                           if "median_ns" in v)
               + "; speedup vs 4k: " + ", ".join(f"{k} x{r}" for k, r in ratios.items()
                                                 if k != "4k")
               + f"; THP backed {(configs['thp'].get('anon_huge_bytes') or 0) >> 20} MiB; "
               f"reservations given back: {rules['pools_given_back']}")
    return HostResult("ran", "", ev, all(rules.values()), summary)


def sim() -> SimResult:
    from migrate.sim import Machine

    size = 32 << 20
    n = 5000
    m = Machine(cores=1, memory=128 << 20)
    p = m.kernel.spawn("db")
    small = p.mmap(None, size, "rw", populate=True)
    huge = p.mmap(None, size, "rw", huge=True, populate=True)
    tlb = m.cores[0].tlb
    rng = random.Random(3)
    offsets = [rng.randrange(size) & ~63 for _ in range(n)]
    runs: dict[str, Any] = {}
    for name, base in (("4k", small), ("2m", huge)):
        for off in offsets[:500]:  # warm-up
            p.read(base + off, 1)
        walks0 = tlb.stats["walks"]
        l1 = dict(tlb.stats["l1d_4k" if name == "4k" else "l1d_2m"])
        st = dict(tlb.stats["stlb"])
        for off in offsets:
            p.read(base + off, 1)
        l1b = tlb.stats["l1d_4k" if name == "4k" else "l1d_2m"]
        runs[name] = {"accesses": n, "walks": tlb.stats["walks"] - walks0,
                      "l1_dtlb_misses": l1b["misses"] - l1["misses"],
                      "stlb_misses": tlb.stats["stlb"]["misses"] - st["misses"]}
        runs[name]["walk_rate"] = round(runs[name]["walks"] / n, 3)
    cfg = m.config.tlb
    reach = {"l1d_4k_entries": _entries(cfg, "l1d_4k"), "l1d_2m_entries": _entries(cfg, "l1d_2m"),
             "stlb_entries": _entries(cfg, "stlb")}
    reach["reach_4k_bytes"] = reach["stlb_entries"] * 4096
    reach["reach_2m_bytes"] = reach["stlb_entries"] * (2 << 20)
    # Fragmentation: a small machine whose memory a process fills, then frees every other page.
    fm = Machine(cores=1, memory=8 << 20)
    q = fm.kernel.spawn("fragmenter")
    pages = fm.physmem.free_frames - 64
    a = q.mmap(None, pages * 4096, "rw")
    # Touch one page per 2 MiB first, so the page-table frames are allocated together at the
    # bottom: the model's buddy allocator has no pageblock migratetypes, and a page-table frame
    # (unmovable) left in every 2 MiB block would make an order-9 block impossible to compact.
    for i in range(0, pages, 512):
        q.write(a + i * 4096, b"\0")
    for i in range(pages):
        q.write(a + i * 4096, b"\0")
    for i in range(0, pages, 2):
        q.munmap(a + i * 4096, 4096)
    frag_before = round(fm.physmem.fragmentation_index(9), 3)
    largest_before = fm.physmem.largest_free_order()
    h1 = q.mmap(None, 2 << 20, "rw", huge=True)
    q.write(h1, b"x")
    first = q.fault_log[-1].resolution
    moved = fm.physmem.compact()
    largest_after = fm.physmem.largest_free_order()
    h2 = q.mmap(None, 2 << 20, "rw", huge=True)
    q.write(h2, b"y")
    second = q.fault_log[-1].resolution
    intact = all(q.read(a + i * 4096, 1) == b"\0" for i in range(1, min(pages, 200), 2))
    frag = {"free_frames": fm.physmem.free_frames, "fragmentation_index_order9": frag_before,
            "largest_free_order_before": largest_before, "huge_fault_before": first,
            "frames_moved_by_compaction": moved, "largest_free_order_after": largest_after,
            "huge_fault_after": second, "data_intact_after_compaction": intact}
    ev = {"tlb": runs, "reach": reach, "fragmentation": frag}
    ok = (runs["4k"]["walk_rate"] > 0.5 and runs["2m"]["walks"] <= size // (2 << 20)
          and first == "thp-fallback" and second == "thp" and moved > 0 and intact
          and largest_before < 9 <= largest_after)
    summary = (f"{n} random reads over {size >> 20} MiB: {runs['4k']['walks']} page walks with "
               f"4 KiB pages (STLB reach {reach['reach_4k_bytes'] >> 20} MiB), "
               f"{runs['2m']['walks']} with 2 MiB pages; fragmented memory: {first}; after "
               f"compaction moved {moved} frames: {second}")
    return SimResult(ev, ok, summary)


def _entries(cfg: Any, name: str) -> int:
    return int(getattr(cfg, name).entries)


SCENARIO = Scenario(
    "huge-pages", "Huge pages: TLB reach against fragmentation",
    "A TLB entry covers one page: with 4 KiB pages a few thousand entries cover a few MiB, so "
    "random access over a large buffer walks the page tables on almost every access. A 2 MiB "
    "or 1 GiB page covers 512 or 262144 times more. The price: the OS must find that much "
    "contiguous, aligned physical memory, which fragmentation takes away and compaction gives "
    "back.",
    host, sim)
