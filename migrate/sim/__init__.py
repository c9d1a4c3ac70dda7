"""The simulated x86-64 machine: MMU, TLBs, physical memory and an OS model (pure Python).

Public API: ``from migrate.sim import Machine, Access, PageFault`` (see docs/sim.md).
"""

from __future__ import annotations

from migrate.sim.physmem import (
    PAGE_SHIFT,
    PAGE_SIZE,
    BadFrame,
    Frame,
    FramePinned,
    OutOfMemory,
    PhysicalMemory,
)

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "BadFrame",
    "Frame",
    "FramePinned",
    "OutOfMemory",
    "PhysicalMemory",
]
