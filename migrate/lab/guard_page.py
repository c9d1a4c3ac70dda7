"""guard-page: buffers placed flush against an inaccessible page catch overflows at once.

Host (in child processes): an allocator that ends each buffer exactly where a PROT_NONE page
begins (and a variant using MADV_GUARD_INSTALL guard markers, Linux 6.15+). Writing the last
byte works; writing one byte past the end faults with si_addr = the first byte past the end.
A child that overflows by one byte with no handler is killed by SIGSEGV. Sim: the same
allocator on the model.
"""

from __future__ import annotations

from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, fault_probe, pf_bits
from migrate.lab.child import run_child

PG = 4096
SIZES = [1, 100, 4095, 4096, 5000, 12345]


class GuardedAllocator:
    """Each buffer ends flush against an inaccessible page (PROT_NONE, or a guard marker)."""

    def __init__(self, marker: bool = False) -> None:
        self.marker = marker
        self.regions: list[Any] = []

    def alloc(self, size: int) -> int:
        from migrate.memory import Advice, Region

        if size <= 0:
            raise ValueError(f"buffer size must be positive, not {size}")
        data_pages = (size + PG - 1) // PG
        region = Region.anonymous((data_pages + 1) * PG)
        if self.marker:
            region.advise(Advice.GUARD_INSTALL, data_pages * PG, PG)
        else:
            region.protect("", data_pages * PG, PG)
        self.regions.append(region)
        return region.address + data_pages * PG - size


def child_guard(marker: bool) -> dict[str, Any]:
    alloc = GuardedAllocator(marker)
    out = []
    for size in SIZES:
        buf = alloc.alloc(size)
        last = fault_probe(buf + size - 1, "write", 0x41)
        over = fault_probe(buf + size, "write", 0x41)
        out.append({"size": size, "buffer": buf, "last_byte": last, "one_past": over,
                    "expected_si_addr": buf + size})
    return {"buffers": out}


def child_raw_overflow(size: int) -> dict[str, Any]:
    import ctypes

    buf = GuardedAllocator().alloc(size)
    ctypes.memset(buf, 0x41, size + 1)  # one byte too many
    return {"survived": True}


def _check(buffers: list[dict[str, Any]], code: str | None) -> dict[str, bool]:
    return {
        "last_byte_writable": all(b["last_byte"].get("faulted") is False for b in buffers),
        "one_past_faults": all(b["one_past"].get("signal") == "SIGSEGV" for b in buffers),
        "exact_address": all(b["one_past"].get("si_addr") == b["expected_si_addr"]
                             for b in buffers),
        "si_code": code is None or all(b["one_past"].get("si_code") == code for b in buffers),
    }


def host() -> HostResult:
    prot = run_child("migrate.lab.guard_page:child_guard", {"marker": False})
    marker = run_child("migrate.lab.guard_page:child_guard", {"marker": True})
    raw = run_child("migrate.lab.guard_page:child_raw_overflow", {"size": 100})
    pb = (prot.result or {}).get("buffers", [])
    mb = (marker.result or {}).get("buffers", [])
    rules = {f"prot_none_{k}": v for k, v in _check(pb, "SEGV_ACCERR").items()}
    rules["prot_none_all_sizes"] = len(pb) == len(SIZES)
    rules["raw_overflow_killed"] = raw.signal == "SIGSEGV"
    marker_ev: dict[str, Any]
    if marker.result is None:
        marker_ev = {"available": False, "error": marker.stderr.strip().splitlines()[-1:]}
    else:
        marker_ev = {"available": True, "rules": _check(mb, None),
                     "si_codes": sorted({b["one_past"].get("si_code") for b in mb}),
                     "error_codes": sorted({hex(b["one_past"].get("error_code", 0)) for b in mb})}
    ev = {"prot_none": [{"size": b["size"], "buffer": hex(b["buffer"]),
                         "fault_at": hex(b["one_past"].get("si_addr") or 0),
                         "si_code": b["one_past"].get("si_code"),
                         "error_code": hex(b["one_past"].get("error_code", 0))} for b in pb],
          "guard_markers": marker_ev, "raw_overflow": {"signal": raw.signal,
                                                       "returncode": raw.returncode},
          "rules": rules}
    ok = all(rules.values()) and (not marker_ev["available"] or all(marker_ev["rules"].values()))
    summary = (f"{len(pb)} buffers ({SIZES[0]}..{SIZES[-1]} bytes): last byte writable, one byte "
               f"past -> SIGSEGV {pb[0]['one_past'].get('si_code') if pb else '?'} at exactly "
               f"buf+size; guard markers: {'same' if marker_ev['available'] else 'unavailable'}; "
               f"raw overflow: child killed by {raw.signal}")
    return HostResult("ran", "", ev, ok, summary)


def sim() -> SimResult:
    from migrate.sim import Machine, Signal

    m = Machine(cores=1, memory=32 << 20)
    p = m.kernel.spawn()
    rows: list[dict[str, Any]] = []
    ok = True
    for size in SIZES:
        data_pages = (size + PG - 1) // PG
        base = p.mmap(None, (data_pages + 1) * PG, "rw")
        p.mprotect(base + data_pages * PG, PG, "")
        buf = base + data_pages * PG - size
        p.write(buf, b"A" * size)
        try:
            p.write(buf + size, b"!")
            rows.append({"size": size, "faulted": False})
            ok = False
        except Signal as s:
            rows.append({"size": size, "fault_at": hex(s.address), "si_code": s.si_code,
                         "error_code": hex(s.error_code), "error_bits": pf_bits(s.error_code)})
            ok = ok and s.address == buf + size and s.si_code == "SEGV_ACCERR"
    summary = (f"{len(rows)} buffers: one byte past the end -> {rows[0].get('si_code')} at "
               f"buf+size, #PF {rows[0].get('error_code')} (P=0 on a PROT_NONE page)")
    return SimResult({"buffers": rows}, ok, summary)


SCENARIO = Scenario(
    "guard-page", "Guard pages catch a one-byte overflow",
    "Put an inaccessible page right after a buffer and the MMU becomes a bounds checker: the "
    "first byte written past the end faults, at exactly that address, instead of silently "
    "corrupting the neighbour.",
    host, sim)
