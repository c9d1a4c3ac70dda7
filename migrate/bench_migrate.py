"""``migrate bench migrate``: the loopback floor, then live migrations in each mode, in one run.

The floor is measured between two processes placed exactly as the daemons are (source on one CPU,
destination on another when there are two), so every figure can be read against it:

* ``zmq_rtt_us``: a 16-byte request on a DEALER socket answered with a 4 KiB reply (median), in C
  on both ends with the daemons' contexts and priorities, i.e. what a remote fault costs at the
  least in this design; ``pyzmq_rtt_us``: the same from Python on both ends;
* ``bulk_gbps``: 1 MiB messages streamed one way and received (GB/s, 1e9 bytes);
* ``fresh_memory_gbps``: first touch of newly mapped memory on the destination's CPU, and
  ``reserve_memory_gbps``: the same for memory just given back by a reserve (``migrate dest
  --reserve``). Installing a page needs a fresh one, so on a VM whose free memory is cold (free
  page reporting) the first figure bounds any transfer into a guest's region.

Then ``kv`` is migrated at ``--memory`` (default 1 GiB) in each mode, ``--runs`` times each, by the
same code path as ``migrate demo`` (two daemon processes); medians are reported with every run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time
from typing import Any

import zmq

from migrate import workloads
from migrate.demo import cpus_for_daemons, run_demo
from migrate.stats import median

RTT_SAMPLES = 3000
BULK_BYTES = 1 << 30
BULK_MESSAGE = 1 << 20


def _floor_context(cpu: int | None) -> Any:
    """The daemons' kind of context (transport.make_context: an urgent I/O thread at real-time
    priority, pinned like the daemon) and two DEALERs, one on each channel's I/O thread."""
    from migrate import transport

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ctx = transport.make_context(cpu)
    socks = []
    for channel in ("urgent", "bulk"):
        sock = ctx.socket(zmq.DEALER)
        transport._place(sock, channel)
        socks.append(sock)
    return ctx, socks


def _echo_server(endpoint_queue: Any, cpu: int | None) -> None:
    from migrate import fastpath
    from migrate._native import ffi, lib

    ctx, (sock, bulk) = _floor_context(cpu)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    bulk_port = bulk.bind_to_random_port("tcp://127.0.0.1")
    endpoint_queue.put((f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{bulk_port}"))
    if fastpath.available()[0]:
        # The C round trips first (answered by C, as a source's loop answers a request).
        with fastpath.realtime():
            lib.mig_x_echo(ffi.cast("void *", sock.underlying), 4096)
    page = b"\xa5" * 4096
    while True:  # the Python round trips, until "q"
        frames = sock.recv_multipart(copy=False)
        if frames[0].bytes == b"q":
            break
        sock.send(page, copy=False)
    received = 0
    while True:  # bulk, on the bulk channel's socket
        frames = bulk.recv_multipart(copy=False)
        kind = frames[0].bytes
        if kind == b"q":
            break
        if kind == b"b":
            received += len(frames[1].buffer)
        elif kind == b"e":
            bulk.send(str(received).encode())
            received = 0
    sock.close(linger=0)
    bulk.close(linger=0)
    ctx.term()


FRESH_BYTES = 256 << 20
# Seconds the guest runs before each migration: at 1 GiB, kv spends about the first two filling
# its table (sequential writes); by four it is in its steady Zipf-skewed gets and puts, the access
# pattern whose remote faults the benchmark means to measure.
BENCH_AFTER_S = 4.0
# ... and the workload gets this many times its default operations, so it is still running
# through the whole migration: with the default count, kv at 1 GiB sometimes finished just
# around the pause (a migrated guest with nothing left to do has no faults to measure).
BENCH_OPS_FACTOR = 3


def _touch_gbps(queue: Any, cpu: int | None) -> None:
    """First touch of fresh memory, then of memory released from a reserve 2 MiB ahead."""
    from migrate import fastpath, memory
    from migrate._native import ffi, lib

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    npages = FRESH_BYTES // memory.PAGE_SIZE
    lat = ffi.new("uint64_t[]", npages)
    fresh = memory.Region.anonymous(FRESH_BYTES)
    t = time.perf_counter()
    lib.mig_touch_range(fresh.address, npages, memory.PAGE_SIZE, 1, lat)
    fresh_s = time.perf_counter() - t
    fresh.close()
    reserve = fastpath.Reserve(FRESH_BYTES)
    reserve.fill()
    target = memory.Region.anonymous(FRESH_BYTES)
    chunk = 2 << 20
    t = time.perf_counter()
    for off in range(0, FRESH_BYTES, chunk):
        reserve.take(chunk)
        lib.mig_touch_range(target.address + off, chunk // memory.PAGE_SIZE, memory.PAGE_SIZE,
                            1, lat)
    reserve_s = time.perf_counter() - t
    target.close()
    reserve.close()
    queue.put((round(FRESH_BYTES / fresh_s / 1e9, 3), round(FRESH_BYTES / reserve_s / 1e9, 3)))


def measure_fresh_memory(cpu: int | None) -> dict[str, float]:
    mp = multiprocessing.get_context("spawn")
    queue = mp.Queue()
    proc = mp.Process(target=_touch_gbps, args=(queue, cpu), daemon=True)
    proc.start()
    fresh, reserved = queue.get(timeout=120)
    proc.join(10)
    return {"fresh_memory_gbps": fresh, "reserve_memory_gbps": reserved,
            "fresh_memory_bytes": FRESH_BYTES}


def _c_rtt(sock: Any) -> list[int] | None:
    """RTT_SAMPLES round trips from C (after 300 to warm up), or None without the fast path."""
    from migrate import fastpath
    from migrate._native import ffi, lib

    if not fastpath.available()[0]:
        return None
    ns = ffi.new("uint64_t[]", RTT_SAMPLES)
    handle = ffi.cast("void *", sock.underlying)
    with fastpath.realtime():
        if lib.mig_x_rtt(handle, 300, ns) < 0 or lib.mig_x_rtt(handle, RTT_SAMPLES, ns) < 0:
            return None
    sock.send(b"q")  # the server's C echo ends; the Python one follows
    return sorted(ffi.unpack(ns, RTT_SAMPLES))


def measure_floor(source_cpu: int | None, dest_cpu: int | None) -> dict[str, Any]:
    """``zmq_rtt_us``: the ZeroMQ round trip as the fast path makes it (C on both ends, the
    daemons' contexts and priorities); ``pyzmq_rtt_us``: the same from Python on both ends."""
    mp = multiprocessing.get_context("spawn")
    queue = mp.Queue()
    server = mp.Process(target=_echo_server, args=(queue, dest_cpu), daemon=True)
    server.start()
    endpoint, bulk_endpoint = queue.get(timeout=30)
    old_affinity = os.sched_getaffinity(0)
    ctx, (sock, bulk) = _floor_context(source_cpu)
    sock.connect(endpoint)
    bulk.connect(bulk_endpoint)
    try:
        c_samples = _c_rtt(sock)
        request = [b"r", b"\x00" * 16]
        for _ in range(300):
            sock.send_multipart(request)
            sock.recv(copy=False)
        samples = []
        for _ in range(RTT_SAMPLES):
            t = time.perf_counter_ns()
            sock.send_multipart(request)
            sock.recv(copy=False)
            samples.append(time.perf_counter_ns() - t)
        samples.sort()
        sock.send(b"q")
        payload = bytes(BULK_MESSAGE)
        start = time.perf_counter()
        for _ in range(BULK_BYTES // BULK_MESSAGE):
            bulk.send_multipart([b"b", payload], copy=False)
        bulk.send(b"e")
        got = int(bulk.recv())
        elapsed = time.perf_counter() - start
        bulk.send(b"q")
        floor_samples = c_samples or samples

        def pct(values: list[int], q: float) -> float:
            return round(values[min(len(values) - 1, int(len(values) * q))] / 1000, 1)

        return {
            "zmq_rtt_us": pct(floor_samples, 0.5),
            "zmq_rtt_p99_us": pct(floor_samples, 0.99),
            "zmq_rtt_from": "c" if c_samples else "python",
            "pyzmq_rtt_us": pct(samples, 0.5),
            "pyzmq_rtt_p99_us": pct(samples, 0.99),
            "bulk_gbps": round(got / elapsed / 1e9, 3),
            "rtt_samples": RTT_SAMPLES,
            "bulk_bytes": got,
        }
    finally:
        sock.close(linger=0)
        bulk.close(linger=0)
        ctx.term()
        server.join(10)
        os.sched_setaffinity(0, old_affinity)


def run(args: argparse.Namespace) -> dict[str, Any]:
    memory = args.memory or "1G"
    runs = max(1, args.runs)
    source_cpu, dest_cpu = cpus_for_daemons(True)
    floor = measure_floor(source_cpu, dest_cpu)
    floor.update(measure_fresh_memory(dest_cpu))
    modes: dict[str, Any] = {}
    fault_p50: list[float] = []
    fault_p99: list[float] = []
    bulk: list[float] = []
    push: list[float] = []
    # The three modes, then hybrid with the guest throttled during pre-copy (--throttle), and
    # post-copy without the destination's reserve (every page installed into fresh memory).
    ops = workloads.WORKLOADS["kv"].default_ops(memory) * BENCH_OPS_FACTOR
    for name, mode, throttle, reserve in (
            ("precopy", "precopy", False, True), ("postcopy", "postcopy", False, True),
            ("hybrid", "hybrid", False, True), ("hybrid_throttled", "hybrid", True, True),
            ("postcopy_no_reserve", "postcopy", False, False)):
        reports = []
        for _ in range(runs):
            r = run_demo("kv", memory, mode, after=getattr(args, "after", None) or BENCH_AFTER_S,
                         ops=ops, quiet=True, throttle=throttle, reserve=reserve)
            reports.append(r)
            if throttle or not reserve:
                continue  # the headline figures are those of the plain modes'
            lat = r.get("fault_latency_us") or {}
            if lat.get("p50") is not None and r.get("faults", 0) >= 100:
                fault_p50.append(lat["p50"])
                fault_p99.append(lat["p99"])
            if r.get("bulk_gbps"):
                bulk.append(r["bulk_gbps"])
            if mode == "postcopy" and r.get("postcopy_gbps"):
                push.append(r["postcopy_gbps"])
        ok = [r for r in reports if r.get("ok")]
        modes[name] = {
            "ok": len(ok) == runs,
            "runs": runs,
            "downtime_ms": median([r["downtime_ms"] for r in ok]) if ok else None,
            "total_s": median([r["total_s"] for r in ok]) if ok else None,
            "bytes_sent": int(median([r["bytes_sent"] for r in ok])) if ok else None,
            "each": [{k: r.get(k) for k in ("ok", "error", "downtime_ms", "total_s", "bytes_sent",
                                            "precopy_rounds", "faults", "bulk_gbps",
                                            "postcopy_gbps", "guest_ops_during_precopy")}
                     | {"fault_p50_us": (r.get("fault_latency_us") or {}).get("p50"),
                        "fault_p99_us": (r.get("fault_latency_us") or {}).get("p99")}
                     for r in reports],
        }
    p50 = median(fault_p50) if fault_p50 else None
    figures = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "placement": {"source_cpu": source_cpu, "dest_cpu": dest_cpu}},
        "memory": memory,
        "workload_ops": ops,
        "floor": floor,
        "fault_p50_us": p50,
        "fault_p99_us": median(fault_p99) if fault_p99 else None,
        "fault_p50_ratio": round(p50 / floor["zmq_rtt_us"], 3) if p50 else None,
        # Round 1 of pre-copy into the destination (staged), and post-copy mode's transfer into
        # the guest's region (pushed and demanded pages, from the resume to COMPLETE).
        "bulk_gbps": median(bulk) if bulk else None,
        "push_gbps": median(push) if push else None,
        "push_gbps_no_reserve": _median_of(modes.get("postcopy_no_reserve"), "postcopy_gbps"),
        "modes": modes,
    }
    figures["goals"] = goals(figures)
    return figures


def _median_of(row: dict[str, Any] | None, key: str) -> float | None:
    values = [r[key] for r in (row or {}).get("each", []) if r.get("ok") and r.get(key)]
    return median(values) if values else None


# The live-migration issue's goals for kv at 1 GiB over loopback: (figure path, bound, at most?).
GOALS: dict[str, tuple[tuple[str, ...], float, bool]] = {
    "fault_p50_us <= 150": (("fault_p50_us",), 150.0, True),
    "fault_p50_ratio <= 1.3": (("fault_p50_ratio",), 1.3, True),
    "fault_p99_us <= 600": (("fault_p99_us",), 600.0, True),
    "bulk_gbps >= 1.0 (pre-copy round 1)": (("bulk_gbps",), 1.0, False),
    "push_gbps >= 1.0 (post-copy into the region)": (("push_gbps",), 1.0, False),
    "hybrid downtime_ms <= 2": (("modes", "hybrid", "downtime_ms"), 2.0, True),
    "hybrid total_s <= 1.2": (("modes", "hybrid", "total_s"), 1.2, True),
}


GOALS_MEMORY = 1 << 30


def goals(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal with the measured median and whether it is met (None: not measured, or measured
    at another size than the goals are for)."""
    from migrate.workloads import parse_size

    at_goal_size = parse_size(figures.get("memory") or GOALS_MEMORY) == GOALS_MEMORY
    out = {}
    for name, (path, bound, at_most) in GOALS.items():
        value: Any = figures
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        met = None if value is None or not at_goal_size else (
            value <= bound if at_most else value >= bound)
        out[name] = {"value": value, "met": met}
    return out
