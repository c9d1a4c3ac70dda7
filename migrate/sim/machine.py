"""The simulated machine: cores sharing physical memory, and the kernel above them."""

from __future__ import annotations

from dataclasses import dataclass, field

from migrate.sim.devices import DmaMachineMixin
from migrate.sim.paging import DEFAULT_MAXPHYADDR, PageTable
from migrate.sim.physmem import PhysicalMemory
from migrate.sim.tlb import TLBConfig


@dataclass(frozen=True)
class MachineConfig:
    """Everything that shapes a Machine, as data."""

    cores: int = 2
    memory: int = 256 << 20
    maxphyaddr: int = DEFAULT_MAXPHYADDR
    la57: bool = False
    pcide: bool = True  # Linux enables PCIDs where the CPU has them (x86 tlb.c, 6 ASIDs used)
    tlb: TLBConfig = field(default_factory=TLBConfig)
    # Linux arch/x86/mm/tlb.c: tlb_single_page_flush_ceiling = 33 pages; bigger ranges flush all.
    tlb_flush_ceiling: int = 33
    seed: int = 0  # ASLR and any other randomness of the kernel model
    # Linux's mm->context ASIDs per CPU (TLB_NR_DYN_ASIDS = 6 in arch/x86/mm/tlb.c).
    dynamic_asids: int = 6


class Machine(DmaMachineMixin):  # iommu, add_device, dma_map/unmap, tick, cache
    """``Machine(cores=2, memory=SIZE)``: ``.cores`` (``Core``), ``.physmem``, ``.kernel``."""

    def __init__(self, cores: int | None = None, memory: int | None = None, *,
                 config: MachineConfig | None = None) -> None:
        from migrate.sim.kernel import Kernel
        from migrate.sim.mmu import Core

        cfg = config or MachineConfig()
        if cores is not None or memory is not None:
            cfg = MachineConfig(**{**cfg.__dict__,
                                   **({"cores": cores} if cores is not None else {}),
                                   **({"memory": memory} if memory is not None else {})})
        if not isinstance(cfg.cores, int) or cfg.cores < 1:
            raise ValueError(f"a machine needs at least one core, got {cfg.cores!r}")
        self.config = cfg
        self.physmem = PhysicalMemory(cfg.memory)
        self.cores = [Core(i, self.physmem, tlb_config=cfg.tlb, maxphyaddr=cfg.maxphyaddr)
                      for i in range(cfg.cores)]
        for core in self.cores:
            core.cr4_la57 = cfg.la57
        self.kernel = Kernel(self)

    def new_page_table(self, *, owner: str = "pagetable") -> PageTable:
        """An empty page table (4 or 5 levels per the config) in this machine's memory."""
        return PageTable(self.physmem, levels=5 if self.config.la57 else 4,
                         maxphyaddr=self.config.maxphyaddr, owner=owner)

    def __repr__(self) -> str:
        return (f"Machine(cores={len(self.cores)}, memory={self.config.memory:#x}, "
                f"free_frames={self.physmem.free_frames})")
