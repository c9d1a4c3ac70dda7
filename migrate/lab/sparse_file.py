"""sparse-file: a 1 GiB file that is almost all hole, mapped and read.

Host: a sparse file of 1 GiB with one page of data in the middle, mapped and read page by page
from C: every hole reads as zeros and no disk block is allocated (st_blocks does not move);
SEEK_DATA / SEEK_HOLE find the one data page. Linux fills a file hole's page-cache page with
zeros (it does not map the zero page into a file mapping), so the page cache grows while the
disk does not; that is reported. Access past the page holding EOF is SIGBUS (in a child).
Sim: the model serves holes from the zero frame and raises SIGBUS past EOF.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, fault_probe, meminfo
from migrate.lab.child import run_child
from migrate.lab.zero_page import pagemap_raw

PG = 4096
FILE_SIZE = 1 << 30
ISLAND = 512 << 20
ISLAND_DATA = b"an island of data in a sea of holes"
SAMPLE_EVERY = 997  # pages compared byte for byte against zeros (a prime stride)


def child_past_eof(path: str, size: int) -> dict[str, Any]:
    """Map a file whose size is not a page multiple; touch the EOF page and the page after."""
    from migrate.memory import Region

    fd = os.open(path, os.O_RDONLY)
    region = Region.from_fd(fd, size + 2 * PG, shared=True, prot="r")
    eof_page = (size // PG) * PG
    return {"eof_page": hex(region.address + eof_page),
            "eof_page_tail": fault_probe(region.address + size + 10),
            "past_eof": fault_probe(region.address + eof_page + PG),
            "expected_addr": region.address + eof_page + PG}


def host() -> HostResult:
    from migrate._sys import ffi, lib
    from migrate.memory import Region

    with tempfile.TemporaryDirectory(prefix="lab-sparse-", dir="/var/tmp") as tmp:
        path = os.path.join(tmp, "sparse.img")
        with open(path, "wb") as f:
            f.truncate(FILE_SIZE)
            f.seek(ISLAND)
            f.write(ISLAND_DATA)
        blocks_before = os.stat(path).st_blocks
        fd = os.open(path, os.O_RDONLY)
        try:
            data_at = os.lseek(fd, 0, os.SEEK_DATA)
            hole_at = os.lseek(fd, data_at, os.SEEK_HOLE)
            cached_before = meminfo().get("Cached", 0)
            with Region.from_fd(fd, FILE_SIZE, shared=True, prot="r") as region:
                npages = FILE_SIZE // PG
                lib.mig_touch_range(region.address, npages, PG, 0, ffi.NULL)
                present = sum(1 for v in pagemap_raw(region.address, npages) if v >> 63)
                zero_page = bytes(PG)
                sampled = list(range(0, npages, SAMPLE_EVERY))
                nonzero = [i for i in sampled if region.read(i * PG, PG) != zero_page]
                island = region.read(ISLAND, len(ISLAND_DATA))
                cached_after = meminfo().get("Cached", 0)
            blocks_after = os.stat(path).st_blocks
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        small = os.path.join(tmp, "short.bin")
        with open(small, "wb") as f:
            f.write(b"x" * (PG + 100))  # EOF 100 bytes into the second page
        eof = run_child("migrate.lab.sparse_file:child_past_eof",
                        {"path": small, "size": PG + 100})
    past = (eof.result or {}).get("past_eof", {})
    tail = (eof.result or {}).get("eof_page_tail", {})
    ev: dict[str, Any] = {
        "file_size": FILE_SIZE, "st_blocks_before": blocks_before,
        "st_blocks_after_reading_all": blocks_after,
        "seek_data": data_at, "seek_hole": hole_at,
        "pages_read": FILE_SIZE // PG, "pages_present_after_read": present,
        "sampled_pages": len(sampled), "sampled_nonzero_pages": nonzero,
        "island": island.decode(errors="replace"),
        "page_cache_growth_bytes": cached_after - cached_before,
        "past_eof": {"read_in_eof_page": tail, "read_after_eof_page": past,
                     "expected_si_addr": (eof.result or {}).get("expected_addr"),
                     "child_signal": eof.signal},
    }
    rules = {
        "no_blocks_allocated_by_reading": blocks_after == blocks_before,
        "only_island_is_data": data_at == ISLAND and hole_at == ISLAND + PG
        or (data_at <= ISLAND and hole_at > ISLAND and hole_at - data_at <= 64 * 1024),
        "holes_read_as_zeros": nonzero == ([ISLAND // PG] if ISLAND // PG in sampled else []),
        "island_intact": island == ISLAND_DATA,
        "all_pages_mapped": present == FILE_SIZE // PG,
        "eof_page_tail_reads": tail.get("faulted") is False,
        "sigbus_past_eof": past.get("signal") == "SIGBUS" and past.get("si_code") == "BUS_ADRERR"
        and past.get("si_addr") == (eof.result or {}).get("expected_addr"),
    }
    ev["rules"] = rules
    grown_mib = (cached_after - cached_before) >> 20
    summary = (f"read 1 GiB sparse file: st_blocks {blocks_before} -> {blocks_after}, data only "
               f"at [{data_at:#x}, {hole_at:#x}); page cache +{grown_mib} MiB of zero-filled "
               f"pages; past EOF: {past.get('signal')} {past.get('si_code')}")
    return HostResult("ran", "", ev, all(rules.values()), summary)


def sim() -> SimResult:
    from migrate.sim import Machine, Signal

    m = Machine(cores=1, memory=64 << 20)
    k = m.kernel
    size = 64 * PG + 100
    f = k.create_file("sparse", size, {10 * PG: ISLAND_DATA})
    p = k.spawn()
    a = p.mmap(None, 80 * PG, "r", file="sparse")
    zero = m.physmem.zero_frame
    holes = [i for i in range(65) if i != 10]
    hole_frames: set[int | None] = set()
    for i in holes:
        assert p.read(a + i * PG, 16) == bytes(16)
        hole_frames.add(p.frame_of(a + i * PG))
    island = p.read(a + 10 * PG, len(ISLAND_DATA))
    resolutions = sorted({r.resolution for r in p.fault_log})
    err: dict[str, Any] = {}
    try:
        p.read(a + 65 * PG, 1)
    except Signal as s:
        err = {"signo": s.signo, "si_code": s.si_code, "address": hex(s.address)}
    ev = {"pages_read": 65, "zero_frame": zero,
          "hole_frames": sorted(pfn for pfn in hole_frames if pfn is not None),
          "allocated_blocks": f.allocated_blocks(), "page_cache_pages": len(f.pages),
          "island": island.decode(), "resolutions": resolutions, "past_eof": err,
          "rss_pages": p.rss_pages()}
    ok = (hole_frames == {zero} and f.allocated_blocks() == 1 and len(f.pages) == 1
          and island == ISLAND_DATA and err.get("signo") == "SIGBUS"
          and err.get("si_code") == "BUS_ADRERR" and err.get("address") == hex(a + 65 * PG))
    summary = (f"{len(holes)} hole pages all on the zero frame, 1 block allocated, 1 page-cache "
               f"page; past EOF: {err.get('signo')} {err.get('si_code')}")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "sparse-file", "Sparse files: holes cost no disk",
    "A sparse file's holes have no blocks on disk; mapping and reading them manufactures zeros "
    "on demand. Past the last page of the file there is nothing to map, and the access is "
    "SIGBUS, not zeros.",
    host, sim)
