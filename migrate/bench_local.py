"""``migrate bench local``: how fast a local userfaultfd fault is served, by Python and by C.

A C toucher thread (GIL released) reads each page of a registered region once, timing each first
touch; every touch is a MISSING fault served by either

* the Python handler: one lean loop on this thread -- one C call waits and reads a batch of
  events into a preallocated buffer, then one UFFDIO_COPY call per fault (direct ffi calls, no
  per-fault objects), or
* the native handler: a C thread doing poll + read + UFFDIO_COPY.

The per-fault latency is what the faulting thread saw: trap, event delivery, handler wake-up,
the copy and the wake-up back. Figures are medians over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

from migrate._sys import check, ffi, lib
from migrate.memory import PAGE_SIZE, Region
from migrate.probe import NativeHandler, Toucher
from migrate.uffd import Userfaultfd

__all__ = ["measure_native", "measure_python", "run"]

DEFAULT_PAGES = 8192


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def _summary(latencies_ns: list[int], elapsed_s: float) -> dict[str, float]:
    lat = sorted(latencies_ns)
    return {
        "p50_us": round(_percentile(lat, 0.50) / 1000, 2),
        "p90_us": round(_percentile(lat, 0.90) / 1000, 2),
        "p99_us": round(_percentile(lat, 0.99) / 1000, 2),
        "faults_per_s": round(len(lat) / elapsed_s) if elapsed_s > 0 else 0,
        "faults": len(lat),
    }


def measure_python(npages: int = DEFAULT_PAGES) -> dict[str, float]:
    """Serve ``npages`` faults from this Python thread; returns the latency summary."""
    src = bytearray(b"\xa5" * PAGE_SIZE)
    with Userfaultfd.open() as uffd, Region.anonymous(npages * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        fd = uffd.fileno()
        events = uffd.raw_events()
        out = ffi.new("int64_t *")
        src_ptr = ffi.from_buffer(src)
        src_addr = int(ffi.cast("uintptr_t", src_ptr))
        wait_events = lib.mig_uffd_wait_events
        copy = lib.mig_uffd_copy
        mask = ~(PAGE_SIZE - 1)
        pagefault = lib.UFFD_EVENT_PAGEFAULT
        served = 0
        t0 = time.perf_counter()
        toucher = Toucher.start((region.address, npages, PAGE_SIZE))
        try:
            while served < npages:
                n = wait_events(fd, events, 64, 2000)
                if n <= 0:
                    check(n, "poll+read(userfaultfd)")
                    raise TimeoutError(f"no fault for 2 s after {served} of {npages}")
                for i in range(n):
                    ev = events[i]
                    if ev.event == pagefault:
                        ret = copy(fd, ev.a & mask, src_addr, PAGE_SIZE, 0, out)
                        if ret < 0 and ret != -17:  # EEXIST: already there, woken anyway
                            check(ret, "ioctl(UFFDIO_COPY)")
                        served += 1
            if not toucher.join(timeout=10):
                raise TimeoutError("toucher did not finish")
        finally:
            if toucher.running:
                uffd.close()  # frees a stuck toucher
                toucher.join(timeout=5)
        elapsed = time.perf_counter() - t0
        lat = list(toucher.result())
    return _summary(lat, elapsed)


def measure_native(npages: int = DEFAULT_PAGES) -> dict[str, float]:
    """Serve ``npages`` faults from a C handler thread; returns the latency summary."""
    src = bytearray(b"\x5a" * PAGE_SIZE)
    with Userfaultfd.open() as uffd, Region.anonymous(npages * PAGE_SIZE) as region:
        uffd.register(region.address, region.size, "MISSING")
        handler = NativeHandler(uffd, src)
        t0 = time.perf_counter()
        toucher = Toucher.start((region.address, npages, PAGE_SIZE))
        try:
            if not toucher.join(timeout=30):
                raise TimeoutError("toucher did not finish under the native handler")
        finally:
            served = handler.stop()
            if toucher.running:
                uffd.close()
                toucher.join(timeout=5)
        elapsed = time.perf_counter() - t0
        if served != npages:
            raise RuntimeError(f"native handler served {served} faults, expected {npages}")
        lat = list(toucher.result())
    return _summary(lat, elapsed)


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = runs[0].keys()
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}


def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = max(1, int(getattr(args, "runs", 3) or 3))
    npages = DEFAULT_PAGES
    memory_arg = getattr(args, "memory", None)
    if memory_arg:
        npages = max(1, _parse_size(memory_arg) // PAGE_SIZE)
    # Warm-up: first faults of a process pay for page-table and allocator setup.
    measure_native(512)
    measure_python(512)
    python_runs: list[dict[str, float]] = []
    native_runs: list[dict[str, float]] = []
    for _ in range(runs):
        # Alternate so drift (frequency, other load) hits both alike.
        python_runs.append(measure_python(npages))
        native_runs.append(measure_native(npages))
    py, nat = _median_of(python_runs), _median_of(native_runs)
    return {
        "python": py,
        "native": nat,
        "ratio_p50": round(py["p50_us"] / nat["p50_us"], 3) if nat["p50_us"] else None,
        "ratio_p99": round(py["p99_us"] / nat["p99_us"], 3) if nat["p99_us"] else None,
        "runs": runs,
        "faults_per_run": npages,
        "page_size": PAGE_SIZE,
        "machine": {
            "kernel": os.uname().release,
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
        },
        "per_run": {"python": python_runs, "native": native_runs},
    }


def _parse_size(text: str) -> int:
    """'32M', '1G', '4096' -> bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r} (use e.g. 32M, 1G)") from None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
