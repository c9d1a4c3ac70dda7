"""mmap-shared-private: one file, two processes, MAP_SHARED against MAP_PRIVATE.

Host: a 4-page file on disk; this process maps it MAP_SHARED, a child process maps it
MAP_SHARED and MAP_PRIVATE. The child's shared write is seen by this process and in the file,
on the same page-cache frame (pagemap PFNs); the child's private mapping first maps that same
frame, and its write moves it to a new frame (COW) and leaves the file alone.
Sim: the same with the model's page cache.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, is_root
from migrate.lab.child import Child, emit, receive

PG = 4096
FILE_PAGES = 4
ORIGINAL = b"file-content"


def _pfn(region: Any, index: int) -> int | None:
    return region.pagemap(index, 1)[0].pfn


def child_mapper(path: str) -> dict[str, Any]:
    from migrate.memory import Region

    fd = os.open(path, os.O_RDWR)
    shared = Region.from_fd(fd, FILE_PAGES * PG, shared=True)
    private = Region.from_fd(fd, FILE_PAGES * PG, shared=False)
    shared.write(0, b"CHILD-SHARED")
    first_read = private.read(PG, len(ORIGINAL))
    private_before = _pfn(private, 1)
    private.write(PG, b"CHILD-PRIVATE")
    emit({"shared_pfn0": _pfn(shared, 0), "private_read": first_read.decode(),
          "private_pfn1_before_write": private_before,
          "private_pfn1_after_write": _pfn(private, 1),
          "private_view": private.read(PG, 13).decode()})
    receive()  # keep the mappings alive until the parent has looked
    return {"done": True}


def host() -> HostResult:
    from migrate.memory import Region

    with tempfile.TemporaryDirectory(prefix="lab-mmap-", dir="/var/tmp") as tmp:
        path = os.path.join(tmp, "data.bin")
        with open(path, "wb") as f:
            for _ in range(FILE_PAGES):
                f.write(ORIGINAL.ljust(PG, b"."))
        fd = os.open(path, os.O_RDWR)
        try:
            with Region.from_fd(fd, FILE_PAGES * PG, shared=True) as mine:
                mine.read(0, PG)
                mine.read(PG, PG)
                child = Child("migrate.lab.mmap_shared_private:child_mapper", {"path": path})
                try:
                    seen = child.recv()
                    parent_view0 = mine.read(0, 12)
                    parent_view1 = mine.read(PG, len(ORIGINAL))
                    file0 = os.pread(fd, 12, 0)
                    file1 = os.pread(fd, len(ORIGINAL), PG)
                    my_pfn0, my_pfn1 = _pfn(mine, 0), _pfn(mine, 1)
                    child.send({"go": True})
                finally:
                    res = child.finish(timeout=30)
        finally:
            os.close(fd)
    ev: dict[str, Any] = {
        "child": seen, "child_exit": res.returncode,
        "parent_shared_page0": parent_view0.decode(), "file_page0": file0.decode(),
        "parent_shared_page1": parent_view1.decode(), "file_page1": file1.decode(),
        "parent_pfn0": my_pfn0, "parent_pfn1": my_pfn1,
    }
    rules = {
        "shared_write_seen_by_other_process": parent_view0 == b"CHILD-SHARED",
        "shared_write_in_file": file0 == b"CHILD-SHARED",
        "private_write_not_in_file": file1 == ORIGINAL,
        "private_write_not_seen_by_other": parent_view1 == ORIGINAL,
        "private_view_has_write": seen.get("private_view") == "CHILD-PRIVATE",
    }
    reason = ""
    if is_root():
        rules["shared_same_frame"] = my_pfn0 is not None and seen["shared_pfn0"] == my_pfn0
        rules["private_read_maps_page_cache_frame"] = seen["private_pfn1_before_write"] == my_pfn1
        rules["private_write_gets_new_frame"] = seen["private_pfn1_after_write"] not in (
            None, my_pfn1)
    else:
        reason = "not root: pagemap hides PFNs, frames not compared"
    ev["rules"] = rules
    ok = all(rules.values()) and res.returncode == 0
    summary = (f"shared write seen by the other process and the file on frame "
               f"{hex(my_pfn0 or 0)}; private write COW'd frame {hex(my_pfn1 or 0)} -> "
               f"{hex(seen.get('private_pfn1_after_write') or 0)}, file page still "
               f"{file1.decode()!r}")
    return HostResult("ran", reason, ev, ok, summary)


def sim() -> SimResult:
    from migrate.sim import Machine

    m = Machine(cores=2, memory=64 << 20)
    k = m.kernel
    f = k.create_file("data.bin", FILE_PAGES * PG, {0: ORIGINAL, PG: ORIGINAL})
    p1, p2 = k.spawn("p1"), k.spawn("p2")
    s1 = p1.mmap(None, FILE_PAGES * PG, "rw", shared=True, file="data.bin")
    s2 = p2.mmap(None, FILE_PAGES * PG, "rw", shared=True, file="data.bin")
    priv = p2.mmap(None, FILE_PAGES * PG, "rw", file="data.bin")
    p1.read(s1, 12)
    p2.write(s2, b"CHILD-SHARED")
    seen_by_p1 = p1.read(s1, 12)
    cache_frame0 = f.pages[0]
    in_page_cache = m.physmem.read(cache_frame0 << 12, 12)
    p2.read(priv + PG, 12)
    private_before = p2.frame_of(priv + PG)
    cache_frame1 = f.pages[1]
    p2.write(priv + PG, b"CHILD-PRIVATE")
    rec = p2.fault_log[-1]
    ev = {
        "shared_frames": [p1.frame_of(s1), p2.frame_of(s2), cache_frame0],
        "p1_sees": seen_by_p1.decode(), "page_cache_holds": in_page_cache.decode(),
        "private_frame_before_write": private_before, "page_cache_frame1": cache_frame1,
        "private_write_fault": {"error_code": hex(rec.error_code), "resolution": rec.resolution},
        "private_frame_after_write": p2.frame_of(priv + PG),
        "page_cache_page1": m.physmem.read(cache_frame1 << 12, 12).decode(),
        "shared_pte_dirty": bool(getattr(p2.pte(s2), "dirty", False)),
    }
    ok = (p1.frame_of(s1) == p2.frame_of(s2) == cache_frame0 and seen_by_p1 == b"CHILD-SHARED"
          and in_page_cache == b"CHILD-SHARED" and private_before == cache_frame1
          and rec.resolution == "cow" and p2.frame_of(priv + PG) != cache_frame1
          and m.physmem.read(cache_frame1 << 12, 12) == ORIGINAL)
    summary = (f"shared: both PTEs -> page-cache frame {cache_frame0:#x}; private write "
               f"#PF {rec.error_code:#x} -> {rec.resolution}, new frame "
               f"{p2.frame_of(priv + PG):#x}, page cache unchanged")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "mmap-shared-private", "mmap: MAP_SHARED collaboration, MAP_PRIVATE sandbox",
    "Mapping a file makes its page-cache pages part of the address space. MAP_SHARED mappers "
    "all point at the same frames, so a store is seen by everyone and reaches the file. "
    "MAP_PRIVATE starts on the same frames read-only; the first store copies the page, so the "
    "writer gets a private sandbox and the file is untouched.",
    host, sim)
