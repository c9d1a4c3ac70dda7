"""dma-teardown: the order of tearing down a DMA buffer, and what each wrong order breaks.

Host: the user-space analogue of pinning: mlock'd pages are resident (VmLck grows by exactly the
buffer, pagemap shows every page present) until munlock. mlock keeps pages in RAM but does not
fix their physical address (vm.compact_unevictable_allowed), which is why drivers pin with
pin_user_pages(FOLL_LONGTERM) instead. Sim: a device write in flight, torn down in the right
order and in each wrong one, with the freed frames immediately reused by another owner.
"""

from __future__ import annotations

import ctypes
from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, proc_status, read_text

SIZE = 16 << 20
PG = 4096

# (mode, order, expected outcome): after docs/iommu-cache.md's table.
ORDERS: list[tuple[str, tuple[str, ...], str]] = [
    ("strict", ("wait", "unmap", "unpin", "free"), "safe"),
    ("strict", ("unpin", "free", "wait", "unmap"), "use-after-free"),
    ("strict", ("unmap", "unpin", "free", "wait"), "aborted"),
    ("lazy", ("wait", "unmap", "unpin", "free", "late_write"), "use-after-free"),
    ("lazy", ("wait", "unmap", "flush", "unpin", "free", "late_write"), "safe"),
    ("strict", ("wait", "unmap", "unpin", "free", "late_write"), "safe"),
]


def host() -> HostResult:
    from migrate.memory import Region

    libc = ctypes.CDLL(None, use_errno=True)
    with Region.anonymous(SIZE) as region:
        before = proc_status()["VmLck"]
        rc = libc.mlock(ctypes.c_void_p(region.address), ctypes.c_size_t(SIZE))
        err = ctypes.get_errno()
        locked = proc_status()["VmLck"]
        present = sum(e.present for e in region.pagemap())
        libc.munlock(ctypes.c_void_p(region.address), ctypes.c_size_t(SIZE))
        after = proc_status()["VmLck"]
    compact = (read_text("/proc/sys/vm/compact_unevictable_allowed") or "").strip()
    ev: dict[str, Any] = {"size": SIZE, "mlock_rc": rc, "mlock_errno": err if rc else 0,
                          "vmlck_before": before, "vmlck_locked": locked, "vmlck_after": after,
                          "pages_present_while_locked": present, "pages": SIZE // PG,
                          "compact_unevictable_allowed": compact}
    ok = (rc == 0 and locked - before == SIZE and present == SIZE // PG and after == before)
    summary = (f"mlock of {SIZE >> 20} MiB: VmLck +{(locked - before) >> 20} MiB, "
               f"{present}/{SIZE // PG} pages present, back to {after >> 10} KiB after munlock; "
               f"compact_unevictable_allowed={compact} (locked pages may still move)")
    return HostResult("ran", "", ev, ok, summary)


def _outcome(r: Any) -> str:
    if r.use_after_free:
        return "use-after-free"
    if r.transfer_status == "error" and not r.victim_corrupted:
        return "aborted"
    return "safe" if r.safe else "unsafe"


def sim() -> SimResult:
    from migrate.sim import Machine
    from migrate.sim.devices import run_teardown

    rows: list[dict[str, Any]] = []
    for mode, order, expected in ORDERS:
        m = Machine(cores=1, memory=64 << 20)
        m.iommu.mode = mode
        r = run_teardown(m.iommu, order)
        rows.append({"mode": mode, "order": list(order), "expected": expected,
                     "outcome": _outcome(r), "transfer": r.transfer_status,
                     "victim_corrupted": len(r.victim_corrupted),
                     "violations": [v.describe() for v in r.violations][:2],
                     "faults": len(r.faults)})
    ok = all(row["outcome"] == row["expected"] for row in rows)
    summary = "; ".join(f"{row['mode']} {'>'.join(row['order'])}: {row['outcome']}"
                        for row in rows)
    return SimResult({"orders": rows}, ok, summary)


SCENARIO = Scenario(
    "dma-teardown", "DMA teardown: wait, unmap + flush, then unpin",
    "A device writes memory on its own schedule. The buffer must stay pinned until the device "
    "is done and its IOMMU mapping is gone from the IOTLB; free the frames any earlier and the "
    "device's late writes land in whoever got them next, a use-after-free no CPU check can see.",
    host, sim)
