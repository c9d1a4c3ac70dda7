"""Load: four guests migrating to one destination at once, and twenty migrations in a row.

One destination daemon process serves all of them. Its file descriptors, threads and child
processes must come back exactly to their level before the load, and its resident memory to within
``RSS_SLACK`` (the allocator keeps some freed memory in per-thread arenas; a leak of per-migration
state, 9 bytes per page plus a thread, a guest and sockets per migration, shows up in the counts
long before it does in RSS). The baseline is taken after warm-up migrations, so one-time costs
(imports, the first reference run's code paths) are not counted as growth. Measured here: the
destination +1.0 to +1.3 MiB after four at once, +0.3 MiB after 24 in a row; the source +0.3 to
+0.5 MiB after 20 (4 runs).

The source side is one long-lived process that runs twenty ``SourceMigration().run()`` in a row
in one thread, measuring itself the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest


MIB = 1 << 20
# glibc raises its mmap threshold after the first large free, and later large buffers then come
# from the heap and stay in RSS: fixing the threshold makes freed buffers go back to the kernel,
# so RSS shows what the daemons really keep (for the tests only; the daemons do not need it).
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 << 10)}
RSS_SLACK = 8 * MIB
LEAK_SLACK = 2 * MIB
SETTLE_S = 20.0
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("migration_capable")]



def usage(proc: psutil.Process) -> dict[str, int]:
    return {"fds": proc.num_fds(), "threads": proc.num_threads(),
            "children": len(proc.children(recursive=True)), "rss": proc.memory_info().rss}


def settled(proc: psutil.Process) -> dict[str, int]:
    """The daemon's usage once it is idle: no guest processes, and the same descriptors and
    threads for half a second (a session's thread ends shortly after its report is printed).
    After SETTLE_S, whatever it is then (a leak is steady too, and fails the comparison)."""
    deadline = time.monotonic() + SETTLE_S
    last, same = None, 0
    while True:
        now = usage(proc)
        key = (now["fds"], now["threads"], now["children"])
        same = same + 1 if key == last else 0
        last = key
        if (same >= 10 and now["children"] == 0) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def check_back_to_baseline(before: dict[str, int], after: dict[str, int], who: str) -> None:
    print(f"{who}: before {before}, after {after}, RSS "
          f"{(after['rss'] - before['rss']) / MIB:+.1f} MiB")
    assert after["fds"] == before["fds"], f"{who} leaked file descriptors: {before} -> {after}"
    assert after["threads"] == before["threads"], f"{who} leaked threads: {before} -> {after}"
    assert after["children"] == 0, f"{who} left guest processes behind: {after}"
    assert after["rss"] <= before["rss"] + RSS_SLACK, (
        f"{who} RSS grew by {(after['rss'] - before['rss']) / MIB:.1f} MiB: {before} -> {after}")


class Dest:
    def __init__(self, tmp: Path, *extra: str) -> None:
        ready = tmp / "dest.endpoint"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", "dest", "--listen", "tcp://127.0.0.1:*",
             "--ready-file", str(ready), "--json", "--quiet", *extra],
            stdout=subprocess.PIPE, text=True, env=MALLOC_ENV)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        self.endpoint = ready.read_text().strip()
        self.ps = psutil.Process(self.proc.pid)

    def stop(self) -> list[dict[str, Any]]:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def source_cmd(endpoint: str, workload: str, mode: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "migrate", "source", "--to", endpoint, "--workload", workload,
            "--memory", "16M", "--mode", mode, "--after", "0.2", "--json", "--quiet", *extra]


def run_source(endpoint: str, workload: str, mode: str, *extra: str) -> dict[str, Any]:
    out = subprocess.run(source_cmd(endpoint, workload, mode, *extra), capture_output=True,
                         text=True, timeout=120, check=False)
    return json.loads(out.stdout)


def check_ok(report: dict[str, Any]) -> None:
    assert report["ok"], report.get("error")
    assert report["transfer_ok"] and report["digest"] == report["reference_digest"]


def test_four_guests_to_one_destination_at_once(tmp_path: Path) -> None:
    dest = Dest(tmp_path)
    try:
        check_ok(run_source(dest.endpoint, "kv", "hybrid"))  # warm-up
        before = settled(dest.ps)
        plan = [("kv", "hybrid"), ("stream", "postcopy"), ("chase", "precopy"),
                ("sparse", "hybrid")]
        procs = [subprocess.Popen(source_cmd(dest.endpoint, w, m), stdout=subprocess.PIPE,
                                  text=True) for w, m in plan]
        peak = 0
        while any(p.poll() is None for p in procs):
            peak = max(peak, len(dest.ps.children()))
            time.sleep(0.05)
        reports = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        after = settled(dest.ps)
    finally:
        dest_reports = dest.stop()
    for report, (w, m) in zip(reports, plan, strict=True):
        check_ok(report)
        assert (report["workload"], report["mode"]) == (w, m)
    assert len(dest_reports) == 5 and all(r["ok"] for r in dest_reports)
    assert peak >= 2, "the migrations never overlapped"
    check_back_to_baseline(before, after, "the destination daemon")


# The source side: one process, one thread, twenty migrations in a row.
TWENTY_IN_A_ROW = r"""
import json, sys, threading, psutil
from migrate import keys, source, transport

endpoint, count, keydir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pair = keys.load_secret(keydir + "/src.key")
curve = transport.CurveKeys(pair.public, pair.secret, keys.load_public(keydir + "/dest.key_public"))
plan = [("kv", "hybrid"), ("stream", "postcopy"), ("chase", "precopy"), ("sparse", "hybrid")]
me = psutil.Process()
out = {"reports": []}

def usage():
    return {"fds": me.num_fds(), "threads": me.num_threads(),
            "children": len(me.children(recursive=True)), "rss": me.memory_info().rss}

def one(i):
    w, m = plan[i % len(plan)]
    return source.SourceMigration(source.SourceOptions(
        to=endpoint, workload=w, mode=m, memory=16 << 20, after_s=0.1, progress=False,
        keys=curve)).run()

def worker():
    # Warm-up: one of each kind. The first frees of large buffers raise glibc's mmap threshold,
    # after which such buffers come from (and stay in) the heap: a one-time step, not a leak.
    out["warmup"] = [one(i) for i in range(len(plan))]
    out["before"] = usage()
    out["trace"] = []
    for i in range(count):
        out["reports"].append(one(i))
        out["trace"].append(usage())
    out["after"] = usage()

t = threading.Thread(target=worker)
t.start()
t.join()
print(json.dumps(out))
"""


def test_twenty_migrations_in_a_row(tmp_path: Path) -> None:
    """With CURVE keys, so the gatekeeper's per-migration state (a ZAP domain and a handshake
    monitor per channel) is part of what must not accumulate."""
    from migrate import keys

    d = tmp_path / "keys"
    keys.generate(d, "dest")
    keys.generate(d, "src")
    dest = Dest(tmp_path, "--key", str(d / "dest.key"), "--allow", str(d / "src.key_public"))
    try:
        check_ok(run_source(dest.endpoint, "kv", "hybrid", "--key", str(d / "src.key"),
                            "--server-key", str(d / "dest.key_public")))  # warm-up
        before = settled(dest.ps)
        out = subprocess.run([sys.executable, "-c", TWENTY_IN_A_ROW, dest.endpoint, "20",
                              str(d)], env=MALLOC_ENV,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout)
        after = settled(dest.ps)
    finally:
        dest_reports = dest.stop()
    for report in result["warmup"]:
        check_ok(report)
    assert len(result["reports"]) == 20
    for report in result["reports"]:
        check_ok(report)
    assert len(dest_reports) == 25 and all(r["ok"] for r in dest_reports)
    check_back_to_baseline(before, after, "the destination daemon")
    check_back_to_baseline(result["before"], result["after"], "the source process")
    rss = [u["rss"] for u in result["trace"]]
    print("source RSS after each migration, MiB:", [round(r / MIB, 1) for r in rss])
    # Retention by the allocator is a step, a leak is a slope: the second ten migrations may not
    # add more than LEAK_SLACK on top of the first ten.
    assert rss[-1] - rss[9] <= LEAK_SLACK, f"source RSS still growing: {rss}"
