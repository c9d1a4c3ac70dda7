#!/usr/bin/env python3
"""Run every lab scenario and print one line each: host status, both verdicts, and timing."""

import time

from migrate.lab import NAMES, run

t0 = time.monotonic()
for name in NAMES:
    r = run(name)
    h, s = r["host"], r["sim"]
    print(f"{name:<20} host {h['status']:<11} {'ok' if h['ok'] else 'FAIL':<4}  "
          f"sim {'ok' if s['ok'] else 'FAIL':<4}  {h['seconds'] + s['seconds']:5.1f} s")
print(f"total {time.monotonic() - t0:.1f} s")
