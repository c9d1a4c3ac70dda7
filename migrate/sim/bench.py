"""``migrate bench sim``: translation throughput of the simulated MMU in CPython.

- ``tlb_hit_per_s``: user-mode data reads of 32 pages that stay resident in the L1 DTLB.
- ``walk_per_s``: full 4-level walks from CR3 (``Core.walk``: no TLB, no paging-structure cache),
  each reading four 8-byte entries out of simulated physical memory and checking the rights.
- ``tlb_miss_translate_per_s``: ``translate`` over 16384 pages in a shuffled order, far beyond
  the STLB's reach, so nearly every access misses both TLB levels (the PDE cache still helps).
Each figure is the median of ``--runs`` runs (default 3).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from typing import Any

from migrate.sim.machine import Machine
from migrate.sim.mmu import Access

HIT_PAGES = 32
WALK_PAGES = 4096
MISS_PAGES = 16384
BASE = 0x0000_5555_0000_0000


def _setup(pages: int) -> tuple[Machine, list[int]]:
    m = Machine(cores=1, memory=256 << 20)
    pt = m.new_page_table()
    frames = [m.physmem.alloc() << 12 for _ in range(min(pages, 64))]
    addrs = []
    for i in range(pages):
        va = BASE + i * 4096
        pt.map(va, frames[i % len(frames)])
        addrs.append(va + (i * 8) % 4096)
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3
    return m, addrs


def _rate(fn, addrs: list[int], repeat: int, access: Access = Access.READ) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for va in addrs:
            fn(va, access)
    return repeat * len(addrs) / (time.perf_counter() - start)


def measure_once() -> dict[str, float]:
    m, addrs = _setup(HIT_PAGES)
    core = m.cores[0]
    for va in addrs:
        core.translate(va)
    hits_before = core.tlb.stats["l1d_4k"]["hits"]
    repeat = 20000
    tlb_hit = _rate(core.translate, addrs, repeat)
    hits = core.tlb.stats["l1d_4k"]["hits"] - hits_before
    if hits != repeat * len(addrs):
        raise RuntimeError(f"expected only L1 hits, got {hits} of {repeat * len(addrs)}")

    m, addrs = _setup(WALK_PAGES)
    core = m.cores[0]
    walks_before = core.tlb.counters.walks
    walk = _rate(core.walk, addrs, 20)
    assert core.tlb.counters.walks - walks_before == 20 * len(addrs)

    m, addrs = _setup(MISS_PAGES)
    random.Random(0).shuffle(addrs)
    core = m.cores[0]
    miss = _rate(core.translate, addrs, 3)
    stlb = core.tlb.stats["stlb"]
    return {"tlb_hit_per_s": tlb_hit, "walk_per_s": walk, "tlb_miss_translate_per_s": miss,
            "miss_run_stlb_hit_ratio": stlb["hits"] / max(1, stlb["hits"] + stlb["misses"])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = max(1, int(getattr(args, "runs", 3) or 3))
    samples = [measure_once() for _ in range(runs)]
    keys = ("tlb_hit_per_s", "walk_per_s", "tlb_miss_translate_per_s")
    out: dict[str, Any] = {k: round(statistics.median(s[k] for s in samples)) for k in keys}
    out["goals"] = {"tlb_hit_per_s": 1_000_000, "walk_per_s": 150_000}
    out["goals_met"] = out["tlb_hit_per_s"] >= 1_000_000 and out["walk_per_s"] >= 150_000
    out["runs"] = runs
    out["samples"] = [{k: round(s[k]) for k in keys} for s in samples]
    out["miss_run_stlb_hit_ratio"] = round(samples[-1]["miss_run_stlb_hit_ratio"], 4)
    out["python"] = sys.version.split()[0]
    out["implementation"] = platform.python_implementation()
    out["machine"] = platform.machine()
    return out
