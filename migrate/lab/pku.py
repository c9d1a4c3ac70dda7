"""pku: protection keys, per-thread rights without a system call or a TLB flush.

Host: the CPU's flags (/proc/cpuinfo "pku", "ospke") and pkey_alloc(2). Where PKU exists, a page
tagged with a key (pkey_mprotect) is made inaccessible to this thread with pkey_set (WRPKRU, no
system call) and a read faults with SEGV_PKUERR and the PK bit in the #PF error code (in a child).
Where it does not, pkey_alloc's errno and the missing flag are the evidence. Sim: PKRU per
thread (core), no TLB flush or IPI for a rights change, against mprotect + shootdown.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, cpu_flags, fault_probe, pf_bits
from migrate.lab.child import run_child

PG = 4096


def child_pkey() -> dict[str, Any]:
    import ctypes

    from migrate._sys import lib
    from migrate.memory import Region

    libc = ctypes.CDLL(None, use_errno=True)
    key = lib.mig_pkey_alloc(0, 0)
    if key < 0:
        return {"error": f"pkey_alloc: {os.strerror(-key)}"}
    region = Region.anonymous(PG)
    region.write(0, b"secret")
    rc = lib.mig_pkey_mprotect(region.address, PG, lib.PROT_READ | lib.PROT_WRITE, key)
    libc.pkey_set(key, 1)  # PKEY_DISABLE_ACCESS: WRPKRU in this thread only
    denied = fault_probe(region.address, "read")
    libc.pkey_set(key, 0)
    allowed = fault_probe(region.address, "read")
    lib.mig_pkey_free(key)
    return {"key": key, "pkey_mprotect": rc, "read_denied": denied, "read_allowed": allowed}


def host() -> HostResult:
    from migrate._sys import lib

    flags = cpu_flags()
    key = lib.mig_pkey_alloc(0, 0)
    ev: dict[str, Any] = {"cpu_flag_pku": "pku" in flags, "cpu_flag_ospke": "ospke" in flags,
                          "pkey_alloc": key if key >= 0 else None,
                          "pkey_alloc_errno": errno.errorcode.get(-key) if key < 0 else None}
    if key >= 0:
        lib.mig_pkey_free(key)
        res = run_child("migrate.lab.pku:child_pkey")
        r = res.result or {}
        ev["child"] = r
        denied = r.get("read_denied", {})
        if denied.get("faulted"):
            denied["error_bits"] = pf_bits(denied.get("error_code", 0))
        ok = (denied.get("si_code") == "SEGV_PKUERR" and bool(denied.get("error_code", 0) & 0x20)
              and r.get("read_allowed", {}).get("faulted") is False)
        return HostResult("ran", "", ev, ok,
                          f"pkey {r.get('key')}: read with access disabled -> "
                          f"{denied.get('si_code')}, #PF {denied.get('error_code', 0):#x}")
    reason = (f"no PKU on this CPU: /proc/cpuinfo has {'a' if 'pku' in flags else 'no'} 'pku' "
              f"flag and {'an' if 'ospke' in flags else 'no'} 'ospke' flag; pkey_alloc(0, 0) "
              f"failed with {errno.errorcode.get(-key, -key)} ({os.strerror(-key)})")
    # Established absence: the CPU lacks the flag and the kernel refuses keys accordingly.
    ok = "pku" not in flags and key < 0
    return HostResult("not-exposed", reason, ev, ok, reason)


def sim() -> SimResult:
    from migrate.sim import Machine, Signal

    m = Machine(cores=2, memory=64 << 20)
    k = m.kernel
    p = k.spawn("sandbox")
    n = 16
    a = p.mmap(None, n * PG, "rw")
    for core in (0, 1):
        for i in range(n):
            p.write(a + i * PG, b"data", core=core)
    key = p.pkey_alloc()
    p.pkey_mprotect(a, n * PG, "rw", key)
    p.pkey_set(key, 0, core=0)
    p.pkey_set(key, 0, core=1)
    for core in (0, 1):
        p.read(a, 1, core=core)  # warm both TLBs again after pkey_mprotect's flush

    def counters() -> dict[str, int]:
        tl = [c.tlb.stats for c in m.cores]
        return {"ipis": k.stats["ipis"], "shootdowns": k.stats["shootdowns"],
                "invlpg": k.stats["invlpg"], "full_flushes": k.stats["full_flushes"],
                "tlb_invalidations": sum(s[a]["invalidations"] for s in tl for a in s
                                         if isinstance(s[a], dict) and "invalidations" in s[a])}

    before = counters()
    p.pkey_set(key, 1, core=0)  # thread on core 0: PKEY_DISABLE_ACCESS
    after_pkey = counters()
    denied: dict[str, Any] = {}
    try:
        p.read(a, 1, core=0)
    except Signal as s:
        denied = {"si_code": s.si_code, "pkey": s.pkey, "error_code": s.error_code,
                  "error_bits": pf_bits(s.error_code)}
    other_thread = p.read(a, 4, core=1)  # same page, same moment, other thread: allowed
    p.pkey_set(key, 0, core=0)
    before_mp = counters()
    p.mprotect(a, n * PG, "", core=0)  # the mprotect way to revoke access for everyone
    after_mp = counters()
    cost_pkey = {k_: after_pkey[k_] - before[k_] for k_ in before}
    cost_mprotect = {k_: after_mp[k_] - before_mp[k_] for k_ in before}
    ev = {"key": key, "pages": n, "pkey_set_cost": cost_pkey, "mprotect_cost": cost_mprotect,
          "denied_on_core0": denied, "core1_reads": other_thread.decode()}
    ok = (all(v == 0 for v in cost_pkey.values()) and denied.get("si_code") == "SEGV_PKUERR"
          and bool(denied.get("error_code", 0) & 0x20) and other_thread == b"data"
          and cost_mprotect["ipis"] >= 1 and cost_mprotect["invlpg"] >= n)
    summary = (f"pkey_set on one thread: {cost_pkey['ipis']} IPIs, {cost_pkey['invlpg']} INVLPG, "
               f"{cost_pkey['tlb_invalidations']} TLB invalidations; that thread gets "
               f"{denied.get('si_code')} (#PF {denied.get('error_code', 0):#x}) while the other "
               f"reads; mprotect of {n} pages instead: {cost_mprotect['ipis']} IPI(s), "
               f"{cost_mprotect['invlpg']} INVLPG")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "pku", "Protection keys: per-thread rights without a TLB flush",
    "With PKU every PTE carries a 4-bit key and each thread has a PKRU register saying what it "
    "may do with each key. Changing PKRU is one unprivileged instruction: no system call, no "
    "TLB flush, no IPI to other cores, and only this thread's rights change. mprotect changes "
    "the PTEs for every thread and must shoot down other cores' TLBs.",
    host, sim)
