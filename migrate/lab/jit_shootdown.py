"""jit-shootdown: a JIT's W^X dance, and the TLB shootdowns it costs on a multi-core machine.

Host (in a child process pinned to one CPU): write ``mov eax, i; ret`` into a RW page, mprotect
it to RX, call it (it must return i), and back to RW, N times. Run once alone, and once while a
second thread of the same process spins on the other CPU: the kernel must then interrupt that
CPU to flush its TLB at every permission change, and /proc/interrupts' "TLB" row counts the
IPIs it received. Sim: shootdown IPIs per core; with the shootdown skipped, the other core keeps
a stale writable entry and patches code that is supposed to be read-only and executable.
"""

from __future__ import annotations

import os
import time
from typing import Any

from migrate.lab.base import (
    HostResult,
    Scenario,
    SimResult,
    cpu_flags,
    read_text,
    tlb_shootdowns,
)
from migrate.lab.child import run_child

ITERATIONS = 2000
PG = 4096


def _code(value: int) -> bytes:
    return bytes([0xB8]) + value.to_bytes(4, "little") + bytes([0xC3])


def _jit_loop(region: Any, n: int) -> tuple[int, list[int]]:
    """Returns (calls that returned the right value, TLB IPI deltas per CPU)."""
    import ctypes

    func = ctypes.CFUNCTYPE(ctypes.c_int)(region.address)
    right = 0
    before = tlb_shootdowns()
    for i in range(n):
        region.protect("rw")
        region.write(0, _code(i))
        region.protect("rx")
        right += func() == i
    after = tlb_shootdowns()
    return right, [b - a for a, b in zip(before, after, strict=True)]


def child_jit(n: int, cpu: int, other: int) -> dict[str, Any]:
    from migrate._sys import lib
    from migrate.memory import Region

    pinned = lib.lab_pin_self(cpu)
    region = Region.anonymous(PG)
    alone_right, alone = _jit_loop(region, n)
    started = lib.lab_spinner_start(other)
    time.sleep(0.02)  # let it get onto its CPU
    shared_right, shared = _jit_loop(region, n)
    realtime = bool(lib.lab_spinner_is_rt())
    spins = lib.lab_spinner_stop()
    return {"pinned": pinned, "spinner_started": started, "spins": int(spins),
            "spinner_sched_fifo": realtime,
            "alone": {"right": alone_right, "ipis_per_cpu": alone},
            "with_thread": {"right": shared_right, "ipis_per_cpu": shared}}


def paravirt_flush() -> list[str]:
    """Paravirtual remote-TLB-flush implementations this kernel has (a guest's shootdowns may
    go through a hypercall instead of an IPI)."""
    found = set()
    for line in (read_text("/proc/kallsyms") or "").splitlines():
        name = line.rsplit(" ", 1)[-1]
        if name in ("kvm_flush_tlb_multi", "pvm_flush_tlb_multi", "hyperv_flush_tlb_multi",
                    "xen_flush_tlb_multi"):
            found.add(name)
    if "hypervisor" not in cpu_flags():
        return []
    return sorted(found)


def host() -> HostResult:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return HostResult("skipped", f"needs two CPUs, this process may use {cpus}", {}, True,
                          "skipped: one CPU")
    if not tlb_shootdowns():
        return HostResult("not-exposed", "/proc/interrupts has no TLB row", {}, True,
                          "not exposed: no TLB row in /proc/interrupts")
    cpu, other = cpus[0], cpus[1]
    res = run_child("migrate.lab.jit_shootdown:child_jit",
                    {"n": ITERATIONS, "cpu": cpu, "other": other})
    r = res.result or {}
    alone, shared = r.get("alone", {}), r.get("with_thread", {})
    alone_other = (alone.get("ipis_per_cpu") or [0] * (other + 1))[other]
    shared_other = (shared.get("ipis_per_cpu") or [0] * (other + 1))[other]
    ev = {"iterations": ITERATIONS, "mprotects": 2 * ITERATIONS, "cpu": cpu, "other_cpu": other,
          "child": r, "ipis_to_other_cpu_alone": alone_other,
          "ipis_to_other_cpu_with_thread": shared_other,
          "ipis_per_mprotect_with_thread": round(shared_other / (2 * ITERATIONS), 3),
          "child_signal": res.signal}
    ev["paravirt_remote_flush"] = paravirt_flush()
    # Each RW<->RX flip needs the other CPU flushed while it runs our mm. Two things hide IPIs
    # from the "TLB" row: the spinner being preempted by other work on its CPU, and (in a KVM
    # or PVM guest) the paravirt remote flush, which skips the IPI to a vCPU the host has
    # descheduled and lets the host flush it. So the row is a lower bound: ask that it moves
    # with the second thread (a few IPIs at least; ~1 per mprotect on a quiet machine) and
    # (almost) not without it.
    rules = {
        "generated_code_ran": alone.get("right") == ITERATIONS
        and shared.get("right") == ITERATIONS,
        "shootdowns_with_second_thread": shared_other >= 3,
        "few_without": alone_other * 2 < shared_other,
        "spinner_ran": r.get("spinner_started") == 0 and r.get("spins", 0) > 0,
    }
    ev["rules"] = rules
    summary = (f"{ITERATIONS} RW->RX->RW rounds, code returned the right value each time; TLB "
               f"IPIs to CPU {other}: {alone_other} alone, {shared_other} with a thread of the "
               f"same process running there ({ev['ipis_per_mprotect_with_thread']} per mprotect; "
               f"paravirt flush: {ev['paravirt_remote_flush'] or 'none'})")
    return HostResult("ran", "", ev, all(rules.values()), summary)


def sim() -> SimResult:
    from migrate.sim import Machine, Signal

    code = _code(7)
    patched = _code(666)

    def setup() -> tuple[Any, Any, int]:
        m = Machine(cores=2, memory=32 << 20)
        p = m.kernel.spawn("jit")
        page = p.mmap(None, PG, "rw")
        for core in (0, 1):  # two threads, one per core, both wrote the code page (TLB warm)
            p.write(page, code, core=core)
        return m, p, page

    m, p, page = setup()
    k = m.kernel
    ipis0 = k.stats["ipis"]
    p.mprotect(page, PG, "rx", core=0)
    ran = p.execute(page, len(code), core=0)
    safe: dict[str, Any] = {"ipis": k.stats["ipis"] - ipis0,
                            "ipis_received": [c.ipis_received for c in k.cores]}
    try:
        p.write(page, patched, core=1)
        safe["late_write_from_core1"] = "succeeded"
    except Signal as s:
        safe["late_write_from_core1"] = f"{s.signo} {s.si_code} #PF {s.error_code:#x}"

    m2, p2, page2 = setup()
    k2 = m2.kernel
    p2.mprotect(page2, PG, "rx", core=0, shootdown=False)
    stale: dict[str, Any] = {"ipis": k2.stats["ipis"], "skipped_remote": k2.stats["skipped_remote"],
                             "pte_writable": bool(p2.pte(page2).writable)}
    try:
        p2.write(page2, patched, core=1)  # served from core 1's stale, writable TLB entry
        stale["late_write_from_core1"] = "succeeded"
    except Signal as s:
        stale["late_write_from_core1"] = f"{s.signo} {s.si_code}"
    stale["core0_executes"] = p2.execute(page2, len(code), core=0).hex()
    ev = {"code": code.hex(), "with_shootdown": {**safe, "executed": ran.hex()},
          "without_shootdown": stale}
    ok = (safe["ipis"] >= 1 and ran == code
          and safe["late_write_from_core1"].startswith("SIGSEGV")
          and not stale["pte_writable"] and stale["late_write_from_core1"] == "succeeded"
          and stale["core0_executes"] == patched.hex())
    summary = (f"mprotect RX with shootdown: {safe['ipis']} IPI, core 1's later write -> "
               f"{safe['late_write_from_core1']}; without: core 1 wrote through its stale entry "
               f"and core 0 then executed the patched code {stale['core0_executes']}")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "jit-shootdown", "JIT W^X and TLB shootdowns",
    "A JIT writes code into a RW page and flips it to RX before running it. On a multi-core "
    "machine every other core running the same address space may still cache the old, writable "
    "translation, so the kernel interrupts each of them (a TLB shootdown IPI) at every flip; "
    "skip that and a stale entry lets a thread modify code that is supposed to be read-only.",
    host, sim)
