#!/usr/bin/env python3
"""Buffers that end flush against a PROT_NONE page: a one-byte overflow faults at once."""

from migrate.lab.base import fault_probe
from migrate.lab.guard_page import GuardedAllocator

alloc = GuardedAllocator()
for size in (1, 100, 5000):
    buf = alloc.alloc(size)
    last = fault_probe(buf + size - 1, "write", 0x41)
    over = fault_probe(buf + size, "write", 0x41)
    print(f"{size:5d}-byte buffer at {buf:#x}: last byte faulted={last['faulted']}; "
          f"buf[{size}] -> {over['signal']} {over['si_code']} at {over['si_addr']:#x}")
