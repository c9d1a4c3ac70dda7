#!/usr/bin/env python3
"""Migrate a running guest to another process lazily (post-copy) and check its memory.

Two daemons start on loopback; a 32 MiB guest running the kv workload is switched over almost at
once, so nearly all of its memory is still at the source: every page it touches at the
destination is a userfaultfd fault, served over the network, while the rest is pushed behind.

    .dev/bin/python demos/lazy_migration.py [MEMORY_MIB]
"""

import sys

from migrate.demo import run_demo

mib = int(sys.argv[1]) if len(sys.argv) > 1 else 32
report = run_demo("kv", mib << 20, "postcopy", after=0.3, quiet=True)
lat = report["fault_latency_us"]
print(f"guest memory        {mib} MiB, workload kv, mode {report['mode']}")
print(f"downtime            {report['downtime_ms']} ms")
print(f"demand faults       {report['faults']} (p50 {lat['p50']} us, p99 {lat['p99']} us)")
print(f"pages               {report['pages']}")
print(f"digest              {report['digest']}")
print(f"never-migrated run  {report['reference_digest']}")
print("identical:", report["digest"] == report["reference_digest"], "| ok:", report["ok"])
sys.exit(0 if report["ok"] else 1)
