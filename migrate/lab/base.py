"""The lab's building blocks: a scenario, its two results, and small readers of /proc.

A :class:`Scenario` has a host part (the real kernel: real faults, mappings, measurements) and a
sim part (the simulated machine in :mod:`migrate.sim`). Each part returns evidence (numbers,
addresses, error codes) and a verdict computed from that evidence against the rule the scenario
demonstrates, so a broken scenario reports ``ok: false`` rather than a story.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

HostStatus = Literal["ran", "skipped", "not-exposed"]
HOST_STATUSES = ("ran", "skipped", "not-exposed")


@dataclass
class HostResult:
    """What the host part did. ``status``: "ran" (the kernel exposes it and it was shown),
    "skipped" (it could not run here, e.g. not root: ``reason`` says why), "not-exposed" (this
    machine does not have the feature: ``reason`` is the evidence of that, and ``ok`` says
    whether the absence was established)."""

    status: HostStatus
    reason: str
    evidence: dict[str, Any]
    ok: bool
    summary: str = ""

    def __post_init__(self) -> None:
        if self.status not in HOST_STATUSES:
            raise ValueError(f"host status must be one of {HOST_STATUSES}, not {self.status!r}")


@dataclass
class SimResult:
    evidence: dict[str, Any]
    ok: bool
    summary: str = ""


@dataclass(frozen=True)
class Scenario:
    """One use of address translation from the source document.

    ``story`` says what is done and why it matters; each result's ``summary`` says what was
    seen this time."""

    name: str
    title: str
    story: str
    host_part: Callable[[], HostResult] = field(repr=False)
    sim_part: Callable[[], SimResult] = field(repr=False)

    def host(self) -> HostResult:
        """Run the host part; an exception is a failed verdict with its traceback as evidence
        (a crash of a child process is the child's business and already evidence)."""
        try:
            return self.host_part()
        except Exception as exc:  # noqa: BLE001 - the runner reports, it does not crash
            return HostResult("ran", f"host part raised {type(exc).__name__}: {exc}",
                              {"error": traceback.format_exc()}, False,
                              f"error: {type(exc).__name__}: {exc}")

    def sim(self) -> SimResult:
        try:
            return self.sim_part()
        except Exception as exc:  # noqa: BLE001
            return SimResult({"error": traceback.format_exc()}, False,
                             f"error: {type(exc).__name__}: {exc}")

    def run(self, *, host: bool = True, sim: bool = True) -> dict[str, Any]:
        """Both parts as a report dict (name, title, story, host, sim, ok)."""
        report: dict[str, Any] = {"name": self.name, "title": self.title, "story": self.story}
        ok = True
        if host:
            t0 = time.monotonic()
            h = self.host()
            report["host"] = {"status": h.status, "reason": h.reason, "evidence": h.evidence,
                              "ok": h.ok, "summary": h.summary,
                              "seconds": round(time.monotonic() - t0, 3)}
            ok = ok and h.ok
        if sim:
            t0 = time.monotonic()
            s = self.sim()
            report["sim"] = {"evidence": s.evidence, "ok": s.ok, "summary": s.summary,
                             "seconds": round(time.monotonic() - t0, 3)}
            ok = ok and s.ok
        report["ok"] = ok
        return report


# ------------------------------------------------------------------ small readers of /proc
def read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/status memory fields in bytes (VmRSS, RssAnon, VmLck, VmStk, VmPTE, ...)."""
    out: dict[str, int] = {}
    text = read_text(f"/proc/{pid}/status") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def meminfo() -> dict[str, int]:
    """/proc/meminfo: sizes in bytes, counts (HugePages_*) as they are."""
    out: dict[str, int] = {}
    for line in (read_text("/proc/meminfo") or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts:
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def cpu_flags() -> set[str]:
    for line in (read_text("/proc/cpuinfo") or "").splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def tlb_shootdowns() -> list[int]:
    """Per-CPU counts of the "TLB" row of /proc/interrupts (TLB shootdown IPIs received)."""
    for line in (read_text("/proc/interrupts") or "").splitlines():
        fields = line.split()
        if fields and fields[0] == "TLB:":
            return [int(v) for v in fields[1:] if v.isdigit()]
    return []


def smaps_field(address: int, key: str, pid: int | str = "self") -> int | None:
    """One field (bytes) of the /proc/PID/smaps entry of the VMA starting at ``address``."""
    text = read_text(f"/proc/{pid}/smaps") or ""
    inside = False
    for line in text.splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo = int(head.split("-")[0], 16)
            inside = lo == address
            continue
        if inside and line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def entropy_bits(distinct: int, samples: int) -> float:
    """log2 of the distinct values seen: a lower bound on the entropy, at most log2(samples)."""
    if distinct < 1 or samples < 1:
        return 0.0
    return round(math.log2(min(distinct, samples)), 2)


def is_root() -> bool:
    return os.geteuid() == 0


def hexs(values: list[int]) -> list[str]:
    return [hex(v) for v in values]


def fault_probe(address: int, kind: str = "read", value: int = 0) -> dict[str, Any]:
    """One access through the lab's native probe: whether it faulted, the signal, si_code,
    si_addr, and (x86-64) the trap number and #PF error code from the signal frame. Run it in a
    child process when the access may hit something no handler should survive."""
    from migrate._sys import check, ffi, lib
    from migrate.probe import SI_CODE_NAMES

    kinds = {"read": lib.MIG_PROBE_READ, "write": lib.MIG_PROBE_WRITE,
             "fetch": lib.MIG_PROBE_FETCH}
    if kind not in kinds:
        raise ValueError(f"fault_probe kind must be one of {sorted(kinds)}, not {kind!r}")
    out = ffi.new("struct mig_probe_result *")
    check(lib.mig_probe_value(address, kinds[kind], value, out), f"mig_probe_value({kind})")
    if not out.faulted:
        return {"faulted": False, "ret": int(out.ret)}
    signo, code = int(out.signo), int(out.code)
    names = {int(lib.SIGSEGV): "SIGSEGV", int(lib.SIGBUS): "SIGBUS"}
    return {"faulted": True, "signal": names.get(signo, str(signo)),
            "si_code": SI_CODE_NAMES.get(signo, {}).get(code, str(code)),
            "si_addr": int(out.addr), "trapno": int(out.trapno), "error_code": int(out.err)}


PF_BITS = ((0x1, "P"), (0x2, "W/R"), (0x4, "U/S"), (0x8, "RSVD"), (0x10, "I/D"), (0x20, "PK"))


def pf_bits(error_code: int) -> list[str]:
    """Names of the set bits of a #PF error code (SDM vol. 3A, 4.7)."""
    return [name for bit, name in PF_BITS if error_code & bit]
