"""The simulated x86-64 machine: MMU, TLBs, physical memory and an OS model (pure Python).

Public API (see docs/sim.md)::

    from migrate.sim import Machine, Access, PageFault
    m = Machine(cores=2, memory=64 << 20)
    pt = m.new_page_table()
    pt.map(0x400000, m.physmem.alloc() << 12, writable=False)
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3
    core.translate(0x400010, Access.READ)      # -> physical address
    core.translate(0x400010, Access.WRITE)     # raises PageFault(error_code=0x7: P | W/R | U/S)
"""

from __future__ import annotations

from migrate.sim.kernel import File, Kernel, KernelError, Process, Signal
from migrate.sim.loader import Layout, SharedObject
from migrate.sim.machine import Machine, MachineConfig
from migrate.sim.mmu import (
    PF_ID,
    PF_P,
    PF_PK,
    PF_RSVD,
    PF_US,
    PF_WR,
    Access,
    Core,
    CPUException,
    GeneralProtection,
    InvalidOpcode,
    PageFault,
)
from migrate.sim.paging import Entry, PageTable, PagingError, WalkStep
from migrate.sim.physmem import (
    PAGE_SHIFT,
    PAGE_SIZE,
    BadFrame,
    Frame,
    FramePinned,
    OutOfMemory,
    PhysicalMemory,
)
from migrate.sim.tlb import TLB, ArrayConfig, TLBConfig

__all__ = [
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "PF_ID",
    "PF_P",
    "PF_PK",
    "PF_RSVD",
    "PF_US",
    "PF_WR",
    "TLB",
    "Access",
    "ArrayConfig",
    "BadFrame",
    "CPUException",
    "Core",
    "Entry",
    "File",
    "Frame",
    "FramePinned",
    "GeneralProtection",
    "InvalidOpcode",
    "Kernel",
    "KernelError",
    "Layout",
    "Machine",
    "MachineConfig",
    "OutOfMemory",
    "PageFault",
    "PageTable",
    "PagingError",
    "PhysicalMemory",
    "Process",
    "SharedObject",
    "Signal",
    "TLBConfig",
    "WalkStep",
]
