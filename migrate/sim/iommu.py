"""An Intel VT-d style IOMMU: per-device domains, second-level I/O page tables, an IOTLB, a fault
log, Linux's IOVA allocator and the DMA-API layer above it (strict and lazy invalidation).

Authorities (cited by section/function in the tests):
- Intel VT-d specification (rev. 3.x/4.x; cited by chapter and title since section numbers move
  between revisions): legacy-mode root and context entries (ch. 3, "Mapping Devices to
  Domains"), the second-level paging entries (ch. 9, "Second-Level Paging Entries": R bit 0, W
  bit 1, PS bit 7, SNP bit 11, TM bit 62, address 51:12), the access rights of a translation
  being the AND of R and W across every level walked (ch. 3, "Second-Level Translation"), the
  non-recoverable fault reasons (ch. 7, the table of fault conditions and reason codes): 0x1 root
  entry not present, 0x2 context entry not present, 0x4 address beyond the AGAW, 0x5 write without
  write permission, 0x6 read without read permission, 0x7 error fetching a paging entry, 0xC
  non-zero reserved field in a paging entry with R or W set. A legacy second-level entry has no
  present bit: R=W=0 *is* not-present, and the fault for touching it is 0x5/0x6 by access type; the
  fault record here says ``not_present=True`` in that case so nothing is lost. IOTLB invalidation is
  global, domain-selective or page-selective with an address mask (ch. 6, "Invalidation of
  Translation Caches"). Caching mode 0: only successful translations are cached (ch. 6, "Caching
  Mode"), so mapping a not-present IOVA needs no flush.
- Linux drivers/iommu/iova.c: alloc_iova() top-down below limit_pfn, size-aligned, with the
  cached-node search and the one retry from the top; the per-size "rcache" of freed ranges up to
  2**(IOVA_RANGE_CACHE_MAX_SIZE-1) = 32 pages, in magazines of IOVA_MAG_SIZE = 127.
- Linux drivers/iommu/dma-iommu.c: iommu_dma_alloc_iova() (32-bit IOVAs first for PCI devices
  unless iommu.forcedac, the device's DMA mask and the domain aperture as limits),
  iommu_dma_map_sg() (one contiguous IOVA range for scattered pages), __iommu_dma_unmap() (strict:
  iommu_iotlb_sync() before the IOVA is freed; lazy: queue_iova() into a flush queue of
  IOVA_DEFAULT_FQ_SIZE = 256 entries drained when full or by a timer of IOVA_DEFAULT_FQ_TIMEOUT =
  10 ms, flushing the whole domain), the MSI window 0xfee00000-0xfeefffff reserved in every domain.
- VFIO type1 (drivers/vfio/vfio_iommu_type1.c, vfio_unmap_unpin()): unpin pages only after
  iommu_iotlb_sync(). ``dma_unmap(..., defer_unpin=True)`` gives that order in lazy mode too.

The I/O page tables live in frames of the simulated physical memory (owner ``iommu-pt:<device>``),
so a raw write into them is seen by the hardware walk, exactly like a buggy driver's would be.
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from migrate.sim.physmem import PAGE_SHIFT, PAGE_SIZE, BadFrame, PhysicalMemory

if TYPE_CHECKING:
    from migrate.sim.devices import DmaDevice

# ----------------------------------------------------------------------------- entry bits (ch 9)
SL_R = 1 << 0
SL_W = 1 << 1
SL_PS = 1 << 7
SL_SNP = 1 << 11
SL_TM = 1 << 62
SL_ADDR_MASK = ((1 << 52) - 1) & ~(PAGE_SIZE - 1)

# --------------------------------------------------------------------- fault reasons (ch 7)
FR_ROOT_NOT_PRESENT = 0x1
FR_CONTEXT_NOT_PRESENT = 0x2
FR_CONTEXT_INVALID = 0x3
FR_ADDR_BEYOND_AGAW = 0x4
FR_WRITE = 0x5
FR_READ = 0x6
FR_PAGING_ENTRY_INVALID = 0x7
FR_PAGING_ENTRY_RESERVED = 0xC

FAULT_REASONS = {
    FR_ROOT_NOT_PRESENT: "present bit in root entry is clear",
    FR_CONTEXT_NOT_PRESENT: "present bit in context entry is clear",
    FR_CONTEXT_INVALID: "invalid context entry",
    FR_ADDR_BEYOND_AGAW: "input address beyond the domain's address width (AGAW)",
    FR_WRITE: "write request to a page without write permission",
    FR_READ: "read request to a page without read permission",
    FR_PAGING_ENTRY_INVALID: "error accessing a second-level paging entry",
    FR_PAGING_ENTRY_RESERVED: "non-zero reserved field in a second-level paging entry",
}

# Supported adjusted guest address widths and their page-table depths (CAP.SAGAW).
AGAW_LEVELS = {39: 3, 48: 4, 57: 5}
PAGE_SIZES = {PAGE_SIZE: 1, 2 << 20: 2, 1 << 30: 3}   # page size -> leaf level

# Linux constants (see module docstring for where each comes from).
IOVA_RANGE_CACHE_MAX_SIZE = 6
IOVA_MAG_SIZE = 127
MAX_GLOBAL_MAGS = 32
IOVA_DEFAULT_FQ_SIZE = 256
IOVA_DEFAULT_FQ_TIMEOUT_NS = 10_000_000
MSI_WINDOW = (0xFEE0_0000, 0xFEEF_FFFF)
DMA_BIT_MASK_32 = (1 << 32) - 1


class IommuError(Exception):
    """A misuse of the IOMMU/DMA API (bad argument, double unmap, no IOVA space)."""


class DmaDirection(Enum):
    TO_DEVICE = "to_device"            # device reads memory   -> IOMMU_READ
    FROM_DEVICE = "from_device"        # device writes memory  -> IOMMU_WRITE (+READ, see below)
    BIDIRECTIONAL = "bidirectional"    # both

    @classmethod
    def parse(cls, value: DmaDirection | str) -> DmaDirection:
        if isinstance(value, DmaDirection):
            return value
        if isinstance(value, str):
            key = value.strip().lower().removeprefix("dma_")
            for d in cls:
                if d.value == key:
                    return d
        raise IommuError(f"unknown DMA direction {value!r}: use to_device, from_device or "
                         "bidirectional")

    def rights(self) -> tuple[bool, bool]:
        """(read, write) for the I/O PTE. Linux's dma_info_to_prot() gives FROM_DEVICE write-only
        rights, but the VT-d driver always sets R as well (commit eea53c5816, "Remove WO permissions
        on second-level paging entries"), so FROM_DEVICE maps read+write."""
        if self is DmaDirection.TO_DEVICE:
            return True, False
        return True, True


class DmaAccess(Enum):
    READ = "read"
    WRITE = "write"


# ============================================================================ simulated time
class SimClock:
    """Simulated time in nanoseconds with one-shot timers and "actors" (devices) that have
    events at known times. ``advance(ns)`` runs everything due, in time order."""

    def __init__(self) -> None:
        self.now = 0
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._seq = 0
        self.actors: list[Any] = []   # objects with next_event_time() -> int | None, run_event()

    def add_timer(self, deadline: int, callback: Callable[[], None]) -> int:
        self._seq += 1
        heapq.heappush(self._timers, (deadline, self._seq, callback))
        return self._seq

    def cancel(self, handle: int) -> None:
        self._cancelled.add(handle)

    def _next(self) -> tuple[int, Any] | None:
        while self._timers and self._timers[0][1] in self._cancelled:
            self._cancelled.discard(heapq.heappop(self._timers)[1])
        best: tuple[int, Any] | None = None
        if self._timers:
            best = (self._timers[0][0], None)
        for actor in self.actors:
            t = actor.next_event_time()
            if t is not None and (best is None or t < best[0]):
                best = (t, actor)
        return best

    def run_next(self, limit: int | None = None) -> bool:
        """Run the earliest pending event if it is due by ``limit``; False if there is none."""
        nxt = self._next()
        if nxt is None or (limit is not None and nxt[0] > limit):
            return False
        when, actor = nxt
        self.now = max(self.now, when)
        if actor is None:
            _, _, callback = heapq.heappop(self._timers)
            callback()
        else:
            actor.run_event()
        return True

    def advance(self, ns: int) -> None:
        if not isinstance(ns, int) or ns < 0:
            raise ValueError(f"time advances by a non-negative int of ns, got {ns!r}")
        target = self.now + ns
        while self.run_next(target):
            pass
        self.now = target

    def pending_timers(self) -> int:
        return sum(1 for _, seq, _ in self._timers if seq not in self._cancelled)


# ============================================================================ IOVA allocator
class IovaDomain:
    """Linux's iova.c allocator over page frame numbers of one IOVA space.

    Allocated ranges (pfn_lo, pfn_hi) are kept sorted (the kernel's rbtree); an anchor node at
    IOVA_ANCHOR sits above everything. Allocation walks down from a cached node (one for 32-bit
    limits, one for the rest), takes the first gap that fits below ``limit_pfn`` with the start
    aligned to the size rounded up to a power of two, and retries once from the top if the cached
    walk falls off the bottom. Freed ranges of up to 32 pages go to the rcache and are handed out
    again (LIFO) before the tree is searched."""

    ANCHOR = (1 << 64) - 1

    def __init__(self, start_pfn: int = 1, *, rcache: bool = True) -> None:
        self.start_pfn = start_pfn
        self.dma_32bit_pfn = 1 << (32 - PAGE_SHIFT)
        self.max32_alloc_size = self.dma_32bit_pfn
        self._lo: list[int] = [self.ANCHOR]
        self._hi: list[int] = [self.ANCHOR]
        self._cached = self.ANCHOR       # pfn_lo of the cached node (anchor = top)
        self._cached32 = self.ANCHOR
        self.rcache_enabled = rcache
        # Per size order: the CPU's loaded and previous magazines and the global depot.
        self._loaded: list[list[int]] = [[] for _ in range(IOVA_RANGE_CACHE_MAX_SIZE)]
        self._prev: list[list[int]] = [[] for _ in range(IOVA_RANGE_CACHE_MAX_SIZE)]
        self._depot: list[list[list[int]]] = [[] for _ in range(IOVA_RANGE_CACHE_MAX_SIZE)]
        self.stats = {"tree_allocs": 0, "rcache_hits": 0, "rcache_misses": 0, "tree_frees": 0,
                      "rcache_inserts": 0, "failed": 0, "retries": 0}

    # ------------------------------------------------------------------ tree
    def _index(self, pfn_lo: int) -> int:
        i = bisect.bisect_left(self._lo, pfn_lo)
        if i == len(self._lo) or self._lo[i] != pfn_lo:
            raise IommuError(f"no IOVA range starts at pfn {pfn_lo:#x}")
        return i

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._lo[:-1], self._hi[:-1], strict=True))

    def find(self, pfn: int) -> tuple[int, int] | None:
        i = bisect.bisect_right(self._lo, pfn) - 1
        if 0 <= i < len(self._lo) - 1 and self._lo[i] <= pfn <= self._hi[i]:
            return self._lo[i], self._hi[i]
        return None

    def reserve(self, pfn_lo: int, pfn_hi: int) -> None:
        """reserve_iova(): take a range out of the allocatable space (MSI window, holes)."""
        for lo, hi in self.ranges():
            if lo <= pfn_hi and pfn_lo <= hi:
                raise IommuError(f"reserved range {pfn_lo:#x}-{pfn_hi:#x} overlaps {lo:#x}-{hi:#x}")
        self._insert(pfn_lo, pfn_hi)

    def _insert(self, lo: int, hi: int) -> None:
        i = bisect.bisect_left(self._lo, lo)
        self._lo.insert(i, lo)
        self._hi.insert(i, hi)

    def alloc_iova(self, size: int, limit_pfn: int, size_aligned: bool = True) -> int | None:
        """alloc_iova(): returns pfn_lo of ``size`` pages at or below ``limit_pfn``, or None."""
        if size <= 0:
            raise IommuError(f"IOVA allocation of {size} pages")
        limit = limit_pfn + 1            # __alloc_and_insert_iova_range() works with limit + 1
        align_mask = ~0 if not size_aligned else ~((1 << (size - 1).bit_length()) - 1)
        if limit <= self.dma_32bit_pfn and size >= self.max32_alloc_size:
            self.stats["failed"] += 1
            return None
        cached = self._cached32 if limit <= self.dma_32bit_pfn else self._cached
        i = bisect.bisect_left(self._lo, cached)
        retry_pfn = self._hi[i]
        high_pfn, low_pfn = limit, self.start_pfn
        while True:
            # The do/while walking the tree backwards from node i.
            while True:
                high_pfn = min(high_pfn, self._lo[i])
                new_pfn = (high_pfn - size) & align_mask
                i -= 1
                if i < 0 or new_pfn > self._hi[i] or new_pfn < low_pfn:
                    break
            if high_pfn < size or new_pfn < low_pfn:
                if low_pfn == self.start_pfn and retry_pfn < limit:
                    # One retry over the part of the space above the cached node.
                    self.stats["retries"] += 1
                    high_pfn, low_pfn = limit, retry_pfn + 1
                    i = bisect.bisect_left(self._hi, limit)   # iova_find_limit()
                    continue
                self.max32_alloc_size = size
                self.stats["failed"] += 1
                return None
            break
        self._insert(new_pfn, new_pfn + size - 1)
        # __cached_rbnode_insert_update()
        if new_pfn + size - 1 < self.dma_32bit_pfn:
            self._cached32 = new_pfn
        else:
            self._cached = new_pfn
        self.stats["tree_allocs"] += 1
        return new_pfn

    def free_iova(self, pfn_lo: int) -> None:
        i = self._index(pfn_lo)
        if self._lo[i] == self.ANCHOR:
            raise IommuError("cannot free the anchor")
        lo, hi = self._lo[i], self._hi[i]
        nxt = self._lo[i + 1]          # rb_next(): the node above the freed one
        # __cached_rbnode_delete_update(): move a cached node above the hole so it is found again.
        if self._cached32 == lo or (hi < self.dma_32bit_pfn and lo >= self._cached32):
            self._cached32 = nxt
        if lo < self.dma_32bit_pfn:
            self.max32_alloc_size = self.dma_32bit_pfn
        if lo >= self._cached:
            self._cached = nxt
        del self._lo[i]
        del self._hi[i]
        self.stats["tree_frees"] += 1

    # ------------------------------------------------------------------ rcache (fast paths)
    @staticmethod
    def _round(size: int) -> int:
        if size < (1 << (IOVA_RANGE_CACHE_MAX_SIZE - 1)):
            return 1 << (size - 1).bit_length()
        return size

    def alloc_iova_fast(self, size: int, limit_pfn: int, flush_rcache: bool = True) -> int | None:
        """alloc_iova_fast(): round small sizes to a power of two, try the rcache, then the tree;
        on failure flush the rcaches back into the tree and try once more."""
        size = self._round(size)
        order = (size - 1).bit_length()
        if self.rcache_enabled and order < IOVA_RANGE_CACHE_MAX_SIZE:
            pfn = self._rcache_get(order, size, limit_pfn)
            if pfn is not None:
                self.stats["rcache_hits"] += 1
                return pfn
            self.stats["rcache_misses"] += 1
        pfn = self.alloc_iova(size, limit_pfn, True)
        if pfn is None and flush_rcache and self.rcache_enabled and self.flush_rcaches():
            pfn = self.alloc_iova(size, limit_pfn, True)
        return pfn

    def free_iova_fast(self, pfn_lo: int, size: int) -> None:
        size = self._round(size)
        order = (size - 1).bit_length()
        if self.rcache_enabled and order < IOVA_RANGE_CACHE_MAX_SIZE:
            self._rcache_insert(order, pfn_lo)
            return
        self.free_iova(pfn_lo)

    def _rcache_get(self, order: int, size: int, limit_pfn: int) -> int | None:
        """__iova_rcache_get(): one magazine is chosen (loaded, else prev, else one from the
        depot) and popped for a pfn that fits under the limit; none suitable means the tree."""
        if self._loaded[order]:
            pass
        elif self._prev[order]:
            self._loaded[order], self._prev[order] = self._prev[order], self._loaded[order]
        elif self._depot[order]:
            self._loaded[order] = self._depot[order].pop()
        else:
            return None
        mag = self._loaded[order]
        # iova_magazine_pop(): the newest suitable entry, swapped out with the last.
        for k in range(len(mag) - 1, -1, -1):
            if mag[k] + size - 1 <= limit_pfn:
                pfn = mag[k]
                mag[k] = mag[-1]
                mag.pop()
                return pfn
        return None

    def _rcache_insert(self, order: int, pfn: int) -> None:
        self.stats["rcache_inserts"] += 1
        if len(self._loaded[order]) < IOVA_MAG_SIZE:
            self._loaded[order].append(pfn)
            return
        if len(self._prev[order]) < IOVA_MAG_SIZE:
            self._loaded[order], self._prev[order] = self._prev[order], self._loaded[order]
            self._loaded[order].append(pfn)
            return
        full = self._loaded[order]
        if len(self._depot[order]) < MAX_GLOBAL_MAGS:
            self._depot[order].append(full)
        else:
            for p in full:
                self.free_iova(p)
        self._loaded[order] = [pfn]

    def flush_rcaches(self) -> int:
        """free_cpu_cached_iovas() + free_global_cached_iovas(): back into the tree."""
        n = 0
        for order in range(IOVA_RANGE_CACHE_MAX_SIZE):
            mags = [self._loaded[order], self._prev[order], *self._depot[order]]
            for mag in mags:
                for pfn in mag:
                    self.free_iova(pfn)
                    n += 1
            self._loaded[order], self._prev[order], self._depot[order] = [], [], []
        return n

    def cached_count(self) -> int:
        return sum(len(m) for o in range(IOVA_RANGE_CACHE_MAX_SIZE)
                   for m in [self._loaded[o], self._prev[o], *self._depot[o]])


# ============================================================================ faults
@dataclass(frozen=True, slots=True)
class IommuFault:
    """One recorded DMA-remapping fault (the content of a VT-d fault recording register plus what
    the model knows besides: device name, level of the entry, not-present)."""

    time_ns: int
    device: str
    source_id: int
    iova: int
    access: str
    reason: int
    level: int | None = None
    not_present: bool = False

    @property
    def reason_text(self) -> str:
        return FAULT_REASONS.get(self.reason, "unknown")

    def describe(self) -> str:
        np = " (entry not present)" if self.not_present else ""
        lvl = f" at level {self.level}" if self.level is not None else ""
        return (f"DMAR fault {self.reason:#x}: {self.reason_text}{np}{lvl}; device {self.device} "
                f"[{self.source_id >> 8:02x}:{(self.source_id >> 3) & 0x1f:02x}."
                f"{self.source_id & 7}] {self.access} at IOVA {self.iova:#x}")


@dataclass(frozen=True, slots=True)
class DmaViolation:
    """A device access that reached memory it should not have: ``kind`` is "use-after-free" (the
    frame was freed/reallocated since it was DMA-mapped for this device), "unmapped-window" (lazy
    mode: reached through a stale IOTLB entry after dma_unmap returned) or "passthrough" (no
    translation: the device wrote straight into physical memory owned by someone else)."""

    time_ns: int
    kind: str
    device: str
    iova: int
    paddr: int
    access: str
    mapped_owner: str | None
    current_owner: str | None
    detail: str = ""

    def describe(self) -> str:
        return (f"{self.kind}: device {self.device} {self.access} at IOVA {self.iova:#x} -> "
                f"paddr {self.paddr:#x}; mapped for {self.mapped_owner!r}, now owned by "
                f"{self.current_owner!r}. {self.detail}").strip()


class WalkFault(Exception):
    """Internal: a translation failed with a VT-d fault reason."""

    def __init__(self, reason: int, level: int | None = None, not_present: bool = False) -> None:
        super().__init__(FAULT_REASONS.get(reason, hex(reason)))
        self.reason = reason
        self.level = level
        self.not_present = not_present


@dataclass(frozen=True, slots=True)
class Translation:
    paddr_base: int     # physical base of the (possibly large) page
    page_size: int
    read: bool
    write: bool


# ============================================================================ I/O page tables
class IoPageTable:
    """A second-level I/O page table in simulated physical memory (VT-d ch. 9, "Second-Level
    Paging Entries")."""

    def __init__(self, memory: PhysicalMemory, agaw: int, owner: str, *, haw: int = 46,
                 snoop_control: bool = False) -> None:
        if agaw not in AGAW_LEVELS:
            raise IommuError(f"AGAW must be one of {sorted(AGAW_LEVELS)}, got {agaw}")
        self.memory = memory
        self.agaw = agaw
        self.levels = AGAW_LEVELS[agaw]
        self.owner = owner
        self.haw = haw
        self.snoop_control = snoop_control
        self.table_frames: list[int] = []
        self.root = self._new_table()

    def _new_table(self) -> int:
        pfn = self.memory.alloc(0, owner=self.owner, movable=False, kind="iommu-pagetable")
        assert isinstance(pfn, int)
        self.memory.zero(pfn)
        self.table_frames.append(pfn)
        return pfn

    @staticmethod
    def index(iova: int, level: int) -> int:
        return (iova >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF

    def _entry_addr(self, table_pfn: int, iova: int, level: int) -> int:
        return (table_pfn << PAGE_SHIFT) + 8 * self.index(iova, level)

    def reserved_mask(self, level: int, large: bool) -> int:
        """Bits that must be zero in an entry with R or W set (QEMU's vtd_spte_rsvd* derive the
        same from the spec): address bits 51:HAW, SNP (bit 11) without snoop control, TM (bit 62)
        without device-TLB support, PS at the top levels, low address bits of large pages."""
        mask = ((1 << 52) - 1) & ~((1 << self.haw) - 1)
        mask |= SL_TM
        if not self.snoop_control or not (level == 1 or large):
            mask |= SL_SNP
        if level >= 4:
            mask |= SL_PS
        if large:
            mask |= ((1 << (PAGE_SHIFT + 9 * (level - 1))) - 1) & ~(PAGE_SIZE - 1)
        return mask

    def map(self, iova: int, paddr: int, size: int = PAGE_SIZE, *, read: bool = True,
            write: bool = True) -> None:
        """Install one leaf. Non-leaf entries get R|W: rights are restricted at the leaf."""
        leaf_level = PAGE_SIZES.get(size)
        if leaf_level is None:
            raise IommuError(f"page size must be one of {sorted(PAGE_SIZES)}, got {size}")
        if iova % size or paddr % size:
            raise IommuError(f"IOVA {iova:#x} and paddr {paddr:#x} must be {size:#x}-aligned")
        if iova >> self.agaw:
            raise IommuError(f"IOVA {iova:#x} is beyond the {self.agaw}-bit domain")
        if not (read or write):
            raise IommuError("a mapping needs read or write permission (R=W=0 is not-present)")
        table = self.root
        for level in range(self.levels, leaf_level, -1):
            ea = self._entry_addr(table, iova, level)
            entry = self.memory.read_u64(ea)
            if entry & (SL_R | SL_W):
                if entry & SL_PS:
                    raise IommuError(f"IOVA {iova:#x} is inside a large page mapped at level "
                                     f"{level}")
                table = (entry & SL_ADDR_MASK) >> PAGE_SHIFT
            else:
                new = self._new_table()
                self.memory.write_u64(ea, (new << PAGE_SHIFT) | SL_R | SL_W, writer="iommu-driver")
                table = new
        ea = self._entry_addr(table, iova, leaf_level)
        if self.memory.read_u64(ea) & (SL_R | SL_W):
            raise IommuError(f"IOVA {iova:#x} is already mapped")
        leaf = paddr | (SL_R if read else 0) | (SL_W if write else 0)
        if leaf_level > 1:
            leaf |= SL_PS
        self.memory.write_u64(ea, leaf, writer="iommu-driver")

    def entries(self, iova: int) -> list[tuple[int, int]]:
        """(level, raw entry) for each level a walk of ``iova`` reads, top first."""
        out = []
        table = self.root
        for level in range(self.levels, 0, -1):
            raw = self.memory.read_u64(self._entry_addr(table, iova, level))
            out.append((level, raw))
            if not raw & (SL_R | SL_W) or level == 1 or raw & SL_PS:
                break
            table = (raw & SL_ADDR_MASK) >> PAGE_SHIFT
        return out

    def leaf_address(self, iova: int) -> tuple[int, int] | None:
        """(physical address of the leaf entry, page size) for a mapped IOVA, else None."""
        table = self.root
        for level in range(self.levels, 0, -1):
            ea = self._entry_addr(table, iova, level)
            raw = self.memory.read_u64(ea)
            if not raw & (SL_R | SL_W):
                return None
            if level == 1 or raw & SL_PS:
                return ea, PAGE_SIZE << (9 * (level - 1))
            table = (raw & SL_ADDR_MASK) >> PAGE_SHIFT
        return None

    def unmap(self, iova: int) -> int:
        """Clear the leaf covering ``iova``; returns the size it mapped (0 if none)."""
        found = self.leaf_address(iova)
        if found is None:
            return 0
        ea, size = found
        self.memory.write_u64(ea, 0, writer="iommu-driver")
        return size

    def walk(self, iova: int, write: bool) -> Translation:
        """The hardware walk (VT-d ch. 3, "Second-Level Translation"): rights are the AND over
        all levels; the first level lacking the requested right faults (0x5/0x6), then reserved
        bits (0xC)."""
        if iova < 0 or iova >> self.agaw:
            raise WalkFault(FR_ADDR_BEYOND_AGAW)
        need = SL_W if write else SL_R
        read_ok = write_ok = True
        table = self.root
        for level in range(self.levels, 0, -1):
            if not 0 <= table < self.memory.nframes:
                raise WalkFault(FR_PAGING_ENTRY_INVALID, level)
            raw = self.memory.read_u64(self._entry_addr(table, iova, level))
            read_ok = read_ok and bool(raw & SL_R)
            write_ok = write_ok and bool(raw & SL_W)
            if not raw & need:
                raise WalkFault(FR_WRITE if write else FR_READ, level,
                                not_present=not raw & (SL_R | SL_W))
            large = bool(raw & SL_PS) and level in (2, 3)
            if raw & self.reserved_mask(level, large):
                raise WalkFault(FR_PAGING_ENTRY_RESERVED, level)
            if level == 1 or large:
                size = PAGE_SIZE << (9 * (level - 1))
                base = raw & SL_ADDR_MASK & ~(size - 1)
                return Translation(base, size, read_ok, write_ok)
            table = (raw & SL_ADDR_MASK) >> PAGE_SHIFT
        raise AssertionError("unreachable")

    def free_tables(self) -> None:
        for pfn in self.table_frames:
            self.memory.free(pfn)
        self.table_frames.clear()


# ============================================================================ IOTLB
@dataclass(slots=True)
class IotlbEntry:
    did: int
    iova_base: int
    size: int
    paddr_base: int
    read: bool
    write: bool
    mapped_frame: Any      # physmem Frame object the mapping was made for (None if unknown)


class IOTLB:
    """The IOMMU's translation cache: fully associative, LRU, tagged by domain id. Holds only
    successful translations (caching mode 0)."""

    def __init__(self, capacity: int = 128) -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"IOTLB capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, int, int], IotlbEntry] = OrderedDict()
        self.stats = {"hits": 0, "misses": 0, "fills": 0, "evictions": 0,
                      "inv_page": 0, "inv_domain": 0, "inv_global": 0, "entries_invalidated": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, did: int, iova: int) -> IotlbEntry | None:
        for size in PAGE_SIZES:
            key = (did, iova & ~(size - 1), size)
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.stats["hits"] += 1
                return entry
        self.stats["misses"] += 1
        return None

    def contains(self, did: int, iova: int) -> bool:
        """Peek without touching statistics or LRU order (for tests and evidence)."""
        return any((did, iova & ~(s - 1), s) in self._entries for s in PAGE_SIZES)

    def fill(self, entry: IotlbEntry) -> None:
        key = (entry.did, entry.iova_base, entry.size)
        if key not in self._entries and len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)
            self.stats["evictions"] += 1
        self._entries[key] = entry
        self.stats["fills"] += 1

    def invalidate_page(self, did: int, iova: int, am: int = 0) -> int:
        """Page-selective invalidation: 2**am pages at ``iova`` (aligned down to that size) in
        domain ``did``, including any large page overlapping them (VT-d ch. 6, page-selective
        IOTLB invalidation)."""
        span = PAGE_SIZE << am
        lo = iova & ~(span - 1)
        hi = lo + span
        victims = [k for k, e in self._entries.items()
                   if e.did == did and e.iova_base < hi and lo < e.iova_base + e.size]
        for k in victims:
            del self._entries[k]
        self.stats["inv_page"] += 1
        self.stats["entries_invalidated"] += len(victims)
        return len(victims)

    def invalidate_domain(self, did: int) -> int:
        victims = [k for k, e in self._entries.items() if e.did == did]
        for k in victims:
            del self._entries[k]
        self.stats["inv_domain"] += 1
        self.stats["entries_invalidated"] += len(victims)
        return len(victims)

    def invalidate_global(self) -> int:
        n = len(self._entries)
        self._entries.clear()
        self.stats["inv_global"] += 1
        self.stats["entries_invalidated"] += n
        return n


# ============================================================================ domains, mappings
@dataclass(eq=False)
class DmaMapping:
    """One dma_map()/dma_map_sg(): an IOVA range, the frames behind it, their pin state."""

    device: str
    iova: int                  # DMA address handed to the device (includes the first offset)
    length: int
    iova_pfn: int              # first IOVA page of the allocation
    iova_pages: int            # pages allocated (rounded as alloc_iova_fast rounds)
    mapped_pages: int          # pages actually mapped
    frames: list[int]
    direction: DmaDirection
    frame_objs: list[Any] = field(default_factory=list)
    segments: list[tuple[int, int]] = field(default_factory=list)   # (dma_addr, length)
    pinned: bool = True
    unmapped: bool = False

    def describe(self) -> dict[str, Any]:
        return {"iova": hex(self.iova), "length": self.length,
                "direction": self.direction.value, "pinned": self.pinned,
                "frames": [hex(p) for p in self.frames],
                "segments": [(hex(a), n) for a, n in self.segments]}


class Domain:
    """A DMA domain: its I/O page table, IOVA space and the bookkeeping of live mappings."""

    def __init__(self, did: int, memory: PhysicalMemory, agaw: int, owner: str) -> None:
        self.did = did
        self.pagetable = IoPageTable(memory, agaw, owner)
        self.iovad = IovaDomain(start_pfn=1)
        self.iovad.reserve(MSI_WINDOW[0] >> PAGE_SHIFT, MSI_WINDOW[1] >> PAGE_SHIFT)
        # IOVA page -> (pfn, physmem Frame object) it was mapped to; kept after unmap so a stale
        # IOTLB entry can still be traced to the allocation it was made for.
        self.frame_of_page: dict[int, tuple[int, Any]] = {}
        self.mappings: dict[int, DmaMapping] = {}   # iova_pfn -> mapping
        self.fq: list[FlushQueueEntry] = []          # lazy mode's flush queue
        self.fq_timer: int | None = None

    @property
    def agaw(self) -> int:
        return self.pagetable.agaw

    @property
    def aperture_end(self) -> int:
        return (1 << self.agaw) - 1


@dataclass
class ContextEntry:
    """Legacy-mode context entry: translation through a domain, or pass-through (TT=10b)."""

    device: str
    domain: Domain | None
    passthrough: bool = False
    present: bool = True


@dataclass
class FlushQueueEntry:
    did: int
    iova_pfn: int
    pages: int
    mapping: DmaMapping | None
    unpin_after: bool


class Iommu:
    """One DMA-remapping unit plus the OS's DMA-API layer above it.

    ``mode``: "strict" (iommu.strict=1: the IOTLB is invalidated before dma_unmap returns) or
    "lazy" (iommu.strict=0: unmapped IOVAs wait in a flush queue; the IOTLB is invalidated for the
    whole domain when the queue fills or its 10 ms timer fires)."""

    def __init__(self, memory: PhysicalMemory, *, mode: str = "strict",
                 clock: SimClock | None = None, iotlb_entries: int = 128, agaw: int = 48,
                 forcedac: bool = False, fq_size: int = IOVA_DEFAULT_FQ_SIZE,
                 fq_timeout_ns: int = IOVA_DEFAULT_FQ_TIMEOUT_NS) -> None:
        if agaw not in AGAW_LEVELS:
            raise IommuError(f"AGAW must be one of {sorted(AGAW_LEVELS)}, got {agaw}")
        self.memory = memory
        self.clock = clock if clock is not None else SimClock()
        self.iotlb = IOTLB(iotlb_entries)
        self.agaw = agaw
        self.forcedac = forcedac
        self.enabled = True
        self.faults: list[IommuFault] = []
        self.violations: list[DmaViolation] = []
        self.events: list[str] = []          # DMA-API debug style warnings
        self.devices: dict[str, DmaDevice] = {}
        self._context: dict[int, ContextEntry] = {}    # source id -> context
        self._domains: dict[int, Domain] = {}
        self._next_did = 1
        self._next_devfn = 8                           # bus 0, device 1, function 0
        self.fq_size = fq_size
        self.fq_timeout_ns = fq_timeout_ns
        self.stats = {"maps": 0, "unmaps": 0, "fq_flushes": 0, "fq_full_flushes": 0,
                      "fq_timer_flushes": 0, "pinned_frames": 0}
        self._mode = "strict"
        self.mode = mode
        # frames currently DMA-mapped (pfn -> count) for the freed-while-mapped warning.
        self._mapped_frames: dict[int, int] = {}
        memory.on_free(self._on_frame_freed)

    # ------------------------------------------------------------------ mode
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("strict", "lazy"):
            raise IommuError(f"IOMMU mode must be 'strict' or 'lazy', got {value!r}")
        if value == "strict" and self._mode == "lazy":
            self.flush_queue_drain("mode change")
        self._mode = value

    # ------------------------------------------------------------------ devices
    def add_device(self, name: str, dma_bits: int = 64, *, passthrough: bool = False,
                   agaw: int | None = None, **engine: Any) -> DmaDevice:
        from migrate.sim.devices import DmaDevice

        if not isinstance(name, str) or not name:
            raise IommuError(f"device name must be a non-empty string, got {name!r}")
        if name in self.devices:
            raise IommuError(f"a device named {name!r} already exists")
        if not isinstance(dma_bits, int) or not 12 < dma_bits <= 64:
            raise IommuError(f"dma_bits must be an int in 13..64, got {dma_bits!r}")
        sid = self._next_devfn
        self._next_devfn += 8
        if self._next_devfn > 0xFFFF:
            raise IommuError("out of PCI requester ids")
        domain = None
        if not passthrough:
            domain = Domain(self._next_did, self.memory, agaw or self.agaw, f"iommu-pt:{name}")
            self._domains[domain.did] = domain
            self._next_did += 1
        self._context[sid] = ContextEntry(name, domain, passthrough)
        device = DmaDevice(name, dma_bits, sid, self, **engine)
        self.devices[name] = device
        self.clock.actors.append(device)
        return device

    def device(self, device: DmaDevice | str) -> DmaDevice:
        name = device if isinstance(device, str) else getattr(device, "name", None)
        if name not in self.devices:
            raise IommuError(f"no device {device!r}")
        return self.devices[name]  # type: ignore[index]

    def domain_of(self, device: DmaDevice | str) -> Domain:
        dev = self.device(device)
        ctx = self._context.get(dev.source_id)
        if ctx is None or ctx.domain is None:
            raise IommuError(f"device {dev.name} has no translated DMA domain (passthrough?)")
        return ctx.domain

    def detach(self, device: DmaDevice | str) -> None:
        """Clear the device's context entry: its requests now fault with reason 0x2."""
        dev = self.device(device)
        self._context[dev.source_id].present = False
        self.iotlb.invalidate_global()

    def remove_device(self, device: DmaDevice | str) -> None:
        """Hot-unplug: drop the context entry (and the root entry with it if the device was the
        last on its bus). A device object still issuing DMA then faults with 0x1 or 0x2."""
        dev = self.device(device)
        if self.mapped(dev):
            raise IommuError(f"{dev.name} still has live DMA mappings")
        ctx = self._context[dev.source_id]
        if ctx.domain is not None and ctx.domain.fq:
            self._fq_flush(ctx.domain)
        del self._context[dev.source_id]
        if ctx.domain is not None:
            self.iotlb.invalidate_domain(ctx.domain.did)
            ctx.domain.pagetable.free_tables()
            del self._domains[ctx.domain.did]
        del self.devices[dev.name]
        self.clock.actors.remove(dev)

    # ------------------------------------------------------------------ hardware translation
    def _fault(self, dev: DmaDevice, iova: int, access: DmaAccess, err: WalkFault) -> None:
        self.faults.append(IommuFault(self.clock.now, dev.name, dev.source_id, iova, access.value,
                                      err.reason, err.level, err.not_present))

    def translate(self, dev: DmaDevice, iova: int, access: DmaAccess) -> tuple[int, Any] | None:
        """What the remapping hardware does for one request: returns (paddr, frame the mapping was
        made for) or records a fault and returns None."""
        write = access is DmaAccess.WRITE
        if not self.enabled:
            return iova, None
        bus = dev.source_id >> 8
        if not any((sid >> 8) == bus for sid in self._context):
            self._fault(dev, iova, access, WalkFault(FR_ROOT_NOT_PRESENT))
            return None
        ctx = self._context.get(dev.source_id)
        if ctx is None or not ctx.present:
            self._fault(dev, iova, access, WalkFault(FR_CONTEXT_NOT_PRESENT))
            return None
        if ctx.passthrough:
            return iova, None
        domain = ctx.domain
        assert domain is not None
        entry = self.iotlb.lookup(domain.did, iova)
        if entry is not None:
            # The cached rights are the ones used (software must invalidate after changing a
            # present entry, ch. 6); the fault names no level since no walk happened.
            if (write and not entry.write) or (not write and not entry.read):
                self._fault(dev, iova, access, WalkFault(FR_WRITE if write else FR_READ))
                return None
            return entry.paddr_base + (iova - entry.iova_base), entry.mapped_frame
        try:
            tr = domain.pagetable.walk(iova, write)
        except WalkFault as err:
            self._fault(dev, iova, access, err)
            return None
        base = iova & ~(tr.page_size - 1)
        record = domain.frame_of_page.get(iova >> PAGE_SHIFT)
        frame = None
        # Trust the record only if the PTE still names the page it was made for (a raw PTE
        # rewrite makes the target unknown).
        if record is not None and record[0] == (tr.paddr_base + (iova - base)) >> PAGE_SHIFT:
            frame = record[1]
        self.iotlb.fill(IotlbEntry(domain.did, base, tr.page_size, tr.paddr_base, tr.read,
                                   tr.write, frame))
        return tr.paddr_base + (iova - base), frame

    def access(self, dev: DmaDevice, iova: int, n: int, access: DmaAccess,
               data: bytes | None = None) -> bytes | None:
        """One device access within a page: translate, check, perform. None if it faulted."""
        result = self.translate(dev, iova, access)
        if result is None:
            return None
        paddr, mapped_frame = result
        if paddr + n > self.memory.size:
            # No memory there: the memory controller aborts the request. Not a remapping fault,
            # so it is not in the fault log; the device sees an aborted burst.
            self.events.append(f"{dev.name}: {access.value} of {n} bytes at paddr {paddr:#x} "
                               f"(IOVA {iova:#x}) aborted: no memory at that address")
            dev.aborted_bursts += 1
            return None
        self._check_reach(dev, iova, paddr, access, mapped_frame)
        if access is DmaAccess.WRITE:
            assert data is not None
            self.memory.write(paddr, data, writer=f"dev:{dev.name}")
            return b""
        return self.memory.read(paddr, n)

    def _check_reach(self, dev: DmaDevice, iova: int, paddr: int, access: DmaAccess,
                     mapped_frame: Any) -> None:
        pfn = paddr >> PAGE_SHIFT
        try:
            current = self.memory.frame(pfn)
        except BadFrame:
            current = None
        now_owner = current.owner if current is not None else None
        ctx = self._context.get(dev.source_id)
        if not self.enabled or (ctx is not None and ctx.passthrough):
            if not self._is_mapped_for(dev, pfn):
                self.violations.append(DmaViolation(
                    self.clock.now, "passthrough", dev.name, iova, paddr, access.value, None,
                    now_owner, "no IOMMU translation: the device reached a frame nobody mapped "
                               "for it"))
            return
        if mapped_frame is None:
            return
        domain = ctx.domain if ctx is not None else None
        live = domain is not None and self._iova_live(domain, iova)
        if current is not mapped_frame:
            state = "reallocated" if current is not None else "free"
            if mapped_frame.pfn != pfn & ~((1 << mapped_frame.order) - 1):
                # Unpinned too early, the frame was moved (compaction): the mapping is stale.
                state += f" (its contents migrated to pfn {mapped_frame.pfn:#x})"
            self.violations.append(DmaViolation(
                self.clock.now, "use-after-free", dev.name, iova, paddr, access.value,
                mapped_frame.owner, now_owner,
                f"frame was {state} after being DMA-mapped for {dev.name}"
                + ("" if live else "; reached after dma_unmap returned (stale IOTLB entry)")))
        elif not live:
            self.violations.append(DmaViolation(
                self.clock.now, "unmapped-window", dev.name, iova, paddr, access.value,
                now_owner, now_owner,
                "reached after dma_unmap returned, through a stale IOTLB entry"))

    def _iova_live(self, domain: Domain, iova: int) -> bool:
        for m in domain.mappings.values():
            lo = m.iova_pfn << PAGE_SHIFT
            if lo <= iova < lo + (m.mapped_pages << PAGE_SHIFT) and not m.unmapped:
                return True
        return False

    def _is_mapped_for(self, dev: DmaDevice, pfn: int) -> bool:
        ctx = self._context.get(dev.source_id)
        domain = ctx.domain if ctx is not None else None
        maps = domain.mappings.values() if domain is not None else dev.direct_mappings.values()
        return any(pfn in m.frames and not m.unmapped for m in maps)

    # ------------------------------------------------------------------ the DMA API
    def _alloc_iova(self, domain: Domain, dev: DmaDevice, pages: int) -> int:
        """iommu_dma_alloc_iova(): the device mask and the aperture limit; 32-bit first."""
        dma_limit = min((1 << dev.dma_bits) - 1, domain.aperture_end)
        if dma_limit > DMA_BIT_MASK_32 and not self.forcedac and dev.pci_32bit_workaround:
            pfn = domain.iovad.alloc_iova_fast(pages, DMA_BIT_MASK_32 >> PAGE_SHIFT, False)
            if pfn is not None:
                return pfn
            dev.pci_32bit_workaround = False
            self.events.append(f"{dev.name}: Using {dma_limit.bit_length()}-bit DMA addresses")
        pfn = domain.iovad.alloc_iova_fast(pages, dma_limit >> PAGE_SHIFT)
        if pfn is None:
            raise IommuError(f"no IOVA space for {pages} pages below {dma_limit:#x} "
                             f"for {dev.name}")
        return pfn

    def _frames_of(self, frames_or_buffer: Any, direction: DmaDirection) -> list[int]:
        if isinstance(frames_or_buffer, int):
            frames = [frames_or_buffer]
        elif hasattr(frames_or_buffer, "frames"):
            frames = list(frames_or_buffer.frames)
        elif isinstance(frames_or_buffer, Iterable) and not isinstance(frames_or_buffer,
                                                                       (bytes, str)):
            frames = list(frames_or_buffer)
        else:
            raise IommuError("dma_map takes a pfn, a sequence of pfns or an object with .frames, "
                             f"got {type(frames_or_buffer).__name__}")
        if not frames:
            raise IommuError("dma_map of zero frames")
        for pfn in frames:
            if not isinstance(pfn, int) or not self.memory.is_allocated(pfn):
                raise IommuError(f"frame {pfn!r} is not an allocated frame: DMA to memory nobody "
                                 "owns is refused")
            if pfn == self.memory.zero_frame and direction is not DmaDirection.TO_DEVICE:
                raise IommuError("refusing to let a device write the shared zero page")
        return frames

    def dma_map(self, device: DmaDevice | str, frames_or_buffer: Any,
                direction: DmaDirection | str = DmaDirection.BIDIRECTIONAL) -> tuple[int, int]:
        """Pin the frames and map them at one contiguous IOVA range; returns (iova, length)."""
        dev = self.device(device)
        direction = DmaDirection.parse(direction)
        if hasattr(frames_or_buffer, "segments") and callable(frames_or_buffer.segments):
            # A user buffer (devices.UserBuffer): pinned page by page, offsets kept.
            m = self.dma_map_sg(dev, frames_or_buffer.segments(direction), direction)
            return m.iova, m.length
        frames = self._frames_of(frames_or_buffer, direction)
        ctx = self._context[dev.source_id]
        if (not self.enabled or ctx.passthrough) and any(
                b != a + 1 for a, b in pairwise(frames)):
            # Without remapping the DMA address is the physical address: one contiguous range
            # exists only if the frames are physically contiguous.
            raise IommuError(f"{dev.name} has no IOMMU translation: scattered frames have no "
                             "single DMA address (use dma_map_sg for one address per segment)")
        segments = [(pfn << PAGE_SHIFT, PAGE_SIZE) for pfn in frames]
        m = self._map_segments(dev, segments, direction)
        return m.iova, m.length

    def dma_map_sg(self, device: DmaDevice | str, segments: Sequence[tuple[int, int]],
                   direction: DmaDirection | str = DmaDirection.BIDIRECTIONAL) -> DmaMapping:
        """iommu_dma_map_sg(): scattered (paddr, length) segments -> one contiguous IOVA range.
        Each segment keeps its offset within its page; the mapping's ``segments`` gives each
        one's DMA address. Returns the DmaMapping (``.iova``, ``.length``, ``.segments``)."""
        dev = self.device(device)
        if not segments:
            raise IommuError("dma_map_sg of an empty scatterlist")
        for seg in segments:
            if (not isinstance(seg, tuple) or len(seg) != 2 or seg[1] <= 0
                    or not self.memory.is_allocated(seg[0] >> PAGE_SHIFT)):
                raise IommuError(f"bad scatterlist segment {seg!r}: want (paddr, length > 0) in "
                                 "allocated memory")
        return self._map_segments(dev, list(segments), DmaDirection.parse(direction))

    def _map_segments(self, dev: DmaDevice, segments: list[tuple[int, int]],
                      direction: DmaDirection) -> DmaMapping:
        read, write = direction.rights()
        # The pages each segment covers (a segment may span several pages).
        seg_pages: list[list[int]] = []
        for paddr, length in segments:
            first, last = paddr >> PAGE_SHIFT, (paddr + length - 1) >> PAGE_SHIFT
            seg_pages.append(list(range(first, last + 1)))
        frames = [pfn for pages in seg_pages for pfn in pages]
        for pfn in frames:
            if not self.memory.is_allocated(pfn):
                raise IommuError(f"segment page {pfn:#x} is not allocated")
        # Pin first: a pinned frame can be neither freed nor migrated while the device uses it.
        pinned: list[int] = []
        try:
            for pfn in frames:
                self.memory.pin(pfn)
                pinned.append(pfn)
        except Exception:
            for pfn in pinned:
                self.memory.unpin(pfn)
            raise
        self.stats["pinned_frames"] += len(frames)
        frame_objs = [self.memory.frame(pfn) for pfn in frames]
        ctx = self._context[dev.source_id]
        if not self.enabled or ctx.passthrough:
            # No translation: the DMA address *is* the physical address (one per segment).
            seg_addrs = [(paddr, length) for paddr, length in segments]
            m = DmaMapping(dev.name, segments[0][0], sum(s[1] for s in segments),
                           segments[0][0] >> PAGE_SHIFT, len(frames), len(frames), frames,
                           direction, frame_objs, seg_addrs)
            dev.direct_mappings[m.iova] = m
            self._track(frames, +1)
            self.stats["maps"] += 1
            return m
        domain = ctx.domain
        assert domain is not None
        npages = len(frames)
        try:
            iova_pfn = self._alloc_iova(domain, dev, npages)
        except IommuError:
            for pfn in frames:
                self.memory.unpin(pfn)
            raise
        iova_pages = IovaDomain._round(npages)
        page = iova_pfn
        seg_addrs = []
        for (paddr, length), pages in zip(segments, seg_pages, strict=True):
            seg_addrs.append(((page << PAGE_SHIFT) | (paddr & (PAGE_SIZE - 1)), length))
            page += len(pages)
        # Install the leaves with the largest page size that fits (iommu_map()/iommu_pgsize():
        # IOVA and physical address both aligned, and a run of contiguous frames that long).
        k = 0
        while k < npages:
            page, pfn = iova_pfn + k, frames[k]
            span = 1
            for size, level in sorted(PAGE_SIZES.items(), reverse=True):
                n = size >> PAGE_SHIFT
                if (level > 1 and page % n == 0 and pfn % n == 0 and k + n <= npages
                        and frames[k + n - 1] == pfn + n - 1
                        and all(frames[k + j] == pfn + j for j in range(n))):
                    span = n
                    break
            domain.pagetable.map(page << PAGE_SHIFT, pfn << PAGE_SHIFT, span << PAGE_SHIFT,
                                 read=read, write=write)
            for j in range(span):
                domain.frame_of_page[page + j] = (pfn + j, self.memory.frame(pfn + j))
            k += span
        first_addr = seg_addrs[0][0]
        # The contiguous IOVA span from the first segment's start to the last one's end.
        total = seg_addrs[-1][0] + seg_addrs[-1][1] - first_addr
        m = DmaMapping(dev.name, first_addr, total, iova_pfn,
                       iova_pages, npages, frames, direction, frame_objs, seg_addrs)
        domain.mappings[iova_pfn] = m
        self._track(frames, +1)
        self.stats["maps"] += 1
        return m

    def _track(self, frames: list[int], delta: int) -> None:
        for pfn in frames:
            n = self._mapped_frames.get(pfn, 0) + delta
            if n:
                self._mapped_frames[pfn] = n
            else:
                self._mapped_frames.pop(pfn, None)

    def _on_frame_freed(self, pfn: int, order: int, owner: str | None) -> None:
        if not self._mapped_frames:
            return
        for p in range(pfn, pfn + (1 << order)):
            if p in self._mapped_frames:
                self.events.append(f"DMA-API: frame {p:#x} (owner {owner!r}) freed while still "
                                   "DMA-mapped")

    def find_mapping(self, device: DmaDevice | str, iova: int) -> DmaMapping:
        dev = self.device(device)
        ctx = self._context[dev.source_id]
        maps = ctx.domain.mappings if ctx.domain is not None else dev.direct_mappings
        for m in maps.values():
            if ctx.domain is not None:
                lo, hi = m.iova_pfn << PAGE_SHIFT, (m.iova_pfn + m.mapped_pages) << PAGE_SHIFT
            else:
                lo, hi = m.iova, m.iova + m.length
            if lo <= iova < hi and not m.unmapped:
                return m
        raise IommuError(f"IOVA {iova:#x} is not mapped for {dev.name} (double unmap?)")

    def unpin(self, mapping: DmaMapping) -> None:
        """Drop the mapping's pins (the last step of a correct teardown)."""
        if not mapping.pinned:
            raise IommuError(f"mapping at IOVA {mapping.iova:#x} is not pinned")
        mapping.pinned = False
        for obj in mapping.frame_objs:
            self.memory.unpin(obj.pfn)

    def dma_unmap(self, device: DmaDevice | str, iova: int, length: int | None = None, *,
                  unpin: bool = True, defer_unpin: bool = False) -> DmaMapping:
        """__iommu_dma_unmap(): clear the PTEs; strict: invalidate the IOTLB for the range, then
        free the IOVA and unpin; lazy: queue the IOVA for a later domain-wide flush and unpin at
        once (what the kernel DMA API does) -- or, with ``defer_unpin``, only after that flush
        (the VFIO order)."""
        dev = self.device(device)
        m = self.find_mapping(dev, iova)
        if length is not None and length != m.length:
            raise IommuError(f"dma_unmap length {length:#x} does not match the mapping's "
                             f"{m.length:#x} at IOVA {m.iova:#x}")
        ctx = self._context[dev.source_id]
        m.unmapped = True
        self._track(m.frames, -1)
        self.stats["unmaps"] += 1
        if ctx.domain is None:
            del dev.direct_mappings[m.iova]
            if unpin and m.pinned:
                self.unpin(m)
            return m
        domain = ctx.domain
        k = 0
        while k < m.mapped_pages:
            size = domain.pagetable.unmap((m.iova_pfn + k) << PAGE_SHIFT)
            k += max(1, size >> PAGE_SHIFT)
        if self._mode == "strict":
            self._flush_range(domain, m.iova_pfn, m.mapped_pages)
            domain.iovad.free_iova_fast(m.iova_pfn, m.iova_pages)
            del domain.mappings[m.iova_pfn]
            if unpin and m.pinned:
                self.unpin(m)
            return m
        # Lazy: queue_iova(). The IOVA stays allocated until the flush, so it cannot be reused
        # while a stale IOTLB entry may still translate it.
        self._fq_add(domain, FlushQueueEntry(domain.did, m.iova_pfn, m.iova_pages, m,
                                     unpin and defer_unpin))
        if unpin and not defer_unpin and m.pinned:
            self.unpin(m)
        return m

    def _flush_range(self, domain: Domain, iova_pfn: int, pages: int) -> None:
        """iommu_iotlb_sync() for a range: one PSI with the smallest address mask covering it
        (VT-d PSI invalidates 2**AM naturally aligned pages), or a domain flush above MAMV."""
        am = 0
        while True:
            span = 1 << am
            base = iova_pfn & ~(span - 1)
            if base + span >= iova_pfn + pages:
                break
            am += 1
        if am > 9:   # CAP.MAMV on common hardware; beyond it the driver falls back to DSI
            self.iotlb.invalidate_domain(domain.did)
        else:
            self.iotlb.invalidate_page(domain.did, iova_pfn << PAGE_SHIFT, am)

    # ------------------------------------------------------------------ flush queue (lazy)
    # One queue and one timer per domain (dma-iommu.c keeps them in the domain's cookie; the
    # per-CPU rings are one ring here since the model has one CPU issuing DMA-API calls).
    @property
    def flush_queue(self) -> list[FlushQueueEntry]:
        """Every queued entry, all domains."""
        return [e for did in sorted(self._domains) for e in self._domains[did].fq]

    def _fq_add(self, domain: Domain, entry: FlushQueueEntry) -> None:
        """queue_iova(): a full ring is flushed first; the timer is armed only if it is off
        (so entries wait at most fq_timeout from the first one queued after the last expiry)."""
        if len(domain.fq) >= self.fq_size:
            self.stats["fq_full_flushes"] += 1
            self._fq_flush(domain)
        domain.fq.append(entry)
        if domain.fq_timer is None:
            domain.fq_timer = self.clock.add_timer(self.clock.now + self.fq_timeout_ns,
                                                   lambda: self._fq_timeout(domain))

    def _fq_timeout(self, domain: Domain) -> None:
        """fq_flush_timeout(): timer off, flush the domain's IOTLB, free what was queued."""
        domain.fq_timer = None
        if self._domains.get(domain.did) is not domain:
            return                                   # the domain went away meanwhile
        self.stats["fq_timer_flushes"] += 1
        self._fq_flush(domain)

    def _fq_flush(self, domain: Domain) -> int:
        """fq_flush_iotlb() + fq_ring_free(): one domain-selective invalidation, then the queued
        IOVAs go back to the allocator (and the deferred unpins happen)."""
        entries, domain.fq = domain.fq, []
        self.iotlb.invalidate_domain(domain.did)
        self.stats["fq_flushes"] += 1
        for e in entries:
            domain.iovad.free_iova_fast(e.iova_pfn, e.pages)
            if e.mapping is not None:
                domain.mappings.pop(e.iova_pfn, None)
                if e.unpin_after and e.mapping.pinned:
                    self.unpin(e.mapping)
        return len(entries)

    def flush_queue_drain(self, why: str = "explicit") -> int:
        """Flush every domain that has queued entries now (the timers stay armed, as in Linux,
        and find nothing left). Returns the number of entries drained."""
        return sum(self._fq_flush(d) for d in list(self._domains.values()) if d.fq)

    # ------------------------------------------------------------------ introspection
    def mapped(self, device: DmaDevice | str) -> list[DmaMapping]:
        dev = self.device(device)
        ctx = self._context[dev.source_id]
        maps = ctx.domain.mappings if ctx.domain is not None else dev.direct_mappings
        return [m for m in maps.values() if not m.unmapped]

    def describe(self) -> dict[str, Any]:
        """A JSON-able snapshot: mode, devices with their domains and live mappings, IOTLB and
        flush-queue state, fault and violation counts."""
        devices = {}
        for name, dev in self.devices.items():
            ctx = self._context.get(dev.source_id)
            dom = ctx.domain if ctx is not None else None
            devices[name] = {
                "source_id": f"{dev.source_id >> 8:02x}:{(dev.source_id >> 3) & 0x1f:02x}."
                             f"{dev.source_id & 7}",
                "dma_bits": dev.dma_bits,
                "translation": "passthrough" if dom is None else f"domain {dom.did}",
                "agaw": dom.agaw if dom is not None else None,
                "mappings": [m.describe() for m in self.mapped(dev)],
            }
        return {"mode": self.mode, "enabled": self.enabled, "devices": devices,
                "iotlb": {"entries": len(self.iotlb), "capacity": self.iotlb.capacity,
                          **self.iotlb.stats},
                "flush_queue": len(self.flush_queue), "faults": len(self.faults),
                "fault_reasons": {hex(k): v for k, v in sorted(self.fault_counts().items())},
                "violations": [v.describe() for v in self.violations], **self.stats}

    def fault_counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for f in self.faults:
            out[f.reason] = out.get(f.reason, 0) + 1
        return out
