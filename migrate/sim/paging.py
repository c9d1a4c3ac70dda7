"""x86-64 paging structures living in simulated physical memory (Intel SDM vol. 3A, 4.5).

Every table is one 4 KiB frame allocated from ``PhysicalMemory``; entries are 8-byte little-endian
integers inside it, with the flag bits at their architectural positions (SDM tables 4-15 .. 4-20).
The MMU's walker reads these bytes, so editing a PTE here changes memory but not any TLB that has
already cached it: exactly the situation the invalidation instructions exist for.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from migrate.sim.physmem import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory

# Entry bits (SDM 4.5, tables 4-15..4-20). PS is bit 7 in PDPTE/PDE; in a PTE bit 7 is PAT.
P = 1 << 0
RW = 1 << 1
US = 1 << 2
PWT = 1 << 3
PCD = 1 << 4
A = 1 << 5
D = 1 << 6
PS = 1 << 7
PAT_4K = 1 << 7
G = 1 << 8
PAT_LARGE = 1 << 12  # PAT bit of a 2 MiB / 1 GiB leaf
PKEY_SHIFT = 59
PKEY_MASK = 0xF << PKEY_SHIFT  # bits 62:59, protection key of a leaf when CR4.PKE=1
XD = 1 << 63
# Software bit for a PROT_NONE leaf: P=0 makes the hardware ignore every other bit (SDM 4.5), so
# the OS may keep the frame number there (Linux uses _PAGE_PROTNONE for the same purpose).
SW_PROTNONE = 1 << 10

DEFAULT_MAXPHYADDR = 46
SIZE_4K = 1 << 12
SIZE_2M = 1 << 21
SIZE_1G = 1 << 30
PAGE_SIZES = (SIZE_4K, SIZE_2M, SIZE_1G)
LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
# The level whose entry maps a page of each size.
LEAF_LEVEL = {SIZE_4K: 1, SIZE_2M: 2, SIZE_1G: 3}

_FLAG_NAMES = ((P, "P"), (RW, "RW"), (US, "US"), (PWT, "PWT"), (PCD, "PCD"), (A, "A"), (D, "D"),
               (G, "G"), (XD, "XD"))


class PagingError(ValueError):
    """Bad arguments to a page-table operation (misaligned, non-canonical, already mapped...)."""


def level_shift(level: int) -> int:
    """Bit position of the index a level's table uses (PTE: 12, PDE: 21, PDPTE: 30, ...)."""
    return PAGE_SHIFT + 9 * (level - 1)


def address_mask(maxphyaddr: int) -> int:
    """Bits M-1:12 of an entry: the physical address of the next table or 4 KiB page."""
    return ((1 << maxphyaddr) - 1) & ~(PAGE_SIZE - 1)


def reserved_mask(level: int, ps: bool, maxphyaddr: int, nxe: bool) -> int:
    """Bits that must be 0 in a present entry at ``level`` (SDM 4.5, tables 4-14..4-20, and 4.7
    "reserved bit violation"): bits 51:MAXPHYADDR everywhere; XD when EFER.NXE=0; bit 7 in a
    PML5E/PML4E; bits 29:13 of a 1 GiB PDPTE and 20:13 of a 2 MiB PDE (between PAT and the
    address)."""
    mask = ((1 << 52) - 1) ^ ((1 << maxphyaddr) - 1)
    if not nxe:
        mask |= XD
    if level >= 4:
        mask |= PS
    elif ps and level == 3:
        mask |= ((1 << 30) - 1) ^ ((1 << 13) - 1)
    elif ps and level == 2:
        mask |= ((1 << 21) - 1) ^ ((1 << 13) - 1)
    return mask


def is_canonical(vaddr: int, la57: bool = False) -> bool:
    """Bits 63:47 (63:56 with LA57) all equal (SDM 3.3.7.1); ``vaddr`` as an unsigned 64-bit int."""
    width = 57 if la57 else 48
    top = vaddr >> (width - 1)
    return top == 0 or top == (1 << (65 - width)) - 1


@dataclass(frozen=True, slots=True)
class Entry:
    """One paging-structure entry: its raw integer and its named bits at ``level``."""

    raw: int
    level: int
    maxphyaddr: int = DEFAULT_MAXPHYADDR

    @property
    def name(self) -> str:
        return LEVEL_NAMES[self.level]

    present = property(lambda self: bool(self.raw & P))
    writable = property(lambda self: bool(self.raw & RW))
    user = property(lambda self: bool(self.raw & US))
    pwt = property(lambda self: bool(self.raw & PWT))
    pcd = property(lambda self: bool(self.raw & PCD))
    accessed = property(lambda self: bool(self.raw & A))
    dirty = property(lambda self: bool(self.raw & D))
    global_ = property(lambda self: bool(self.raw & G))
    nx = property(lambda self: bool(self.raw & XD))
    pkey = property(lambda self: (self.raw >> PKEY_SHIFT) & 0xF)

    @property
    def huge(self) -> bool:
        """PS=1 in a PDPTE or PDE: this entry maps a 1 GiB / 2 MiB page."""
        return self.level in (2, 3) and bool(self.raw & PS)

    @property
    def leaf(self) -> bool:
        return self.level == 1 or self.huge

    @property
    def page_size(self) -> int:
        return 1 << level_shift(self.level) if self.leaf else 0

    @property
    def pat(self) -> bool:
        if self.level == 1:
            return bool(self.raw & PAT_4K)
        return self.huge and bool(self.raw & PAT_LARGE)

    @property
    def address(self) -> int:
        """Physical address the entry points to (next table, or the page for a leaf)."""
        addr = self.raw & address_mask(self.maxphyaddr)
        if self.huge:
            addr &= ~(self.page_size - 1)
        return addr

    @property
    def pfn(self) -> int:
        return self.address >> PAGE_SHIFT

    def flags(self) -> list[str]:
        names = [n for bit, n in _FLAG_NAMES if self.raw & bit]
        if self.huge:
            names.insert(names.index("A") + 1 if "A" in names else len(names), "PS")
        if self.pkey:
            names.append(f"PKEY={self.pkey}")
        return names

    def __repr__(self) -> str:
        return (f"{self.name}({self.raw:#018x} [{' '.join(self.flags())}] -> {self.address:#x})")


@dataclass(frozen=True, slots=True)
class WalkStep:
    """One level of a software walk: where the entry lives and what it holds."""

    level: int
    table_paddr: int
    index: int
    entry_paddr: int
    entry: Entry

    @property
    def name(self) -> str:
        return LEVEL_NAMES[self.level]


class PageTable:
    """A 4-level (or 5-level, ``levels=5``) x86-64 page table whose tables are physical frames.

    ``cr3`` is the root table's physical address, to be loaded with ``Core.load_cr3``.
    """

    def __init__(self, physmem: PhysicalMemory, *, levels: int = 4,
                 maxphyaddr: int = DEFAULT_MAXPHYADDR, owner: str = "pagetable") -> None:
        if levels not in (4, 5):
            raise PagingError(f"levels must be 4 or 5, got {levels!r}")
        if not 36 <= maxphyaddr <= 52:
            raise PagingError(f"MAXPHYADDR must be in 36..52, got {maxphyaddr!r}")
        self.physmem = physmem
        self.levels = levels
        self.maxphyaddr = maxphyaddr
        self.owner = owner
        self._addr_mask = address_mask(maxphyaddr)
        self._tables: set[int] = set()  # pfns of every table frame this page table owns
        self.root = self._new_table()

    @property
    def cr3(self) -> int:
        return self.root << PAGE_SHIFT

    @property
    def la57(self) -> bool:
        return self.levels == 5

    @property
    def table_frames(self) -> frozenset[int]:
        return frozenset(self._tables)

    def _new_table(self) -> int:
        pfn = self.physmem.alloc(0, owner=self.owner, movable=False, kind="pagetable")
        assert isinstance(pfn, int)
        self.physmem.frame_bytes(pfn)  # materialise: the walker reads it directly
        self._tables.add(pfn)
        return pfn

    # ------------------------------------------------------------ raw entry access
    def read_entry(self, entry_paddr: int) -> int:
        return self.physmem.read_u64(entry_paddr)

    def write_entry(self, entry_paddr: int, raw: int) -> None:
        if not 0 <= raw < 1 << 64:
            raise PagingError(f"entry value {raw!r} is not a 64-bit unsigned integer")
        self.physmem.write_u64(entry_paddr, raw, writer=f"kernel:{self.owner}")

    def _check_vaddr(self, vaddr: int) -> None:
        if not isinstance(vaddr, int) or not 0 <= vaddr < 1 << 64:
            raise PagingError(f"virtual address {vaddr!r} is not a 64-bit unsigned integer")
        if not is_canonical(vaddr, self.la57):
            raise PagingError(f"virtual address {vaddr:#x} is not canonical")

    def entries(self, vaddr: int) -> list[WalkStep]:
        """Every level a walk of ``vaddr`` reads, from the root down to the leaf or the first
        non-present entry (software view: no permission or reserved-bit checks)."""
        self._check_vaddr(vaddr)
        steps: list[WalkStep] = []
        table = self.root << PAGE_SHIFT
        for level in range(self.levels, 0, -1):
            index = (vaddr >> level_shift(level)) & 511
            ea = table | (index << 3)
            entry = Entry(self.read_entry(ea), level, self.maxphyaddr)
            steps.append(WalkStep(level, table, index, ea, entry))
            if not entry.present or entry.leaf:
                break
            table = entry.raw & self._addr_mask
        return steps

    def entry(self, vaddr: int) -> Entry | None:
        """The present leaf entry mapping ``vaddr`` (PTE, or PDE/PDPTE with PS=1), else None."""
        last = self.entries(vaddr)[-1].entry
        return last if last.present and last.leaf else None

    def lookup(self, vaddr: int) -> tuple[int, Entry] | None:
        """Software translation ignoring permissions: (physical address, leaf) or None."""
        leaf = self.entry(vaddr)
        if leaf is None:
            return None
        return leaf.address | (vaddr & (leaf.page_size - 1)), leaf

    # ------------------------------------------------------------ map / unmap / edit
    def map(self, vaddr: int, paddr: int, size: int = SIZE_4K, *, writable: bool = True,
            user: bool = True, nx: bool = False, pkey: int = 0, global_: bool = False,
            pwt: bool = False, pcd: bool = False, accessed: bool = False, dirty: bool = False,
            replace: bool = False) -> Entry:
        """Install a leaf mapping ``vaddr`` -> ``paddr`` of ``size`` (4 KiB, 2 MiB or 1 GiB).

        Missing intermediate tables are allocated with P|RW (and US when ``user``): like Linux,
        intermediate entries grant everything and the leaf restricts. Returns the new leaf entry.
        """
        if size not in PAGE_SIZES:
            raise PagingError(f"page size must be 4 KiB, 2 MiB or 1 GiB, got {size:#x}")
        self._check_vaddr(vaddr)
        if vaddr & (size - 1) or paddr & (size - 1):
            raise PagingError(f"vaddr {vaddr:#x} and paddr {paddr:#x} must be {size:#x}-aligned")
        if not 0 <= paddr < 1 << self.maxphyaddr:
            raise PagingError(f"paddr {paddr:#x} is beyond MAXPHYADDR {self.maxphyaddr}")
        if not 0 <= pkey <= 15:
            raise PagingError(f"protection key must be 0..15, got {pkey!r}")
        leaf_level = LEAF_LEVEL[size]
        table = self.root << PAGE_SHIFT
        for level in range(self.levels, leaf_level, -1):
            ea = table | (((vaddr >> level_shift(level)) & 511) << 3)
            raw = self.read_entry(ea)
            if raw & P:
                if level in (2, 3) and raw & PS:
                    raise PagingError(f"{vaddr:#x} lies in an existing {LEVEL_NAMES[level]} huge "
                                      "page; unmap it first")
                if user and not raw & US:
                    self.write_entry(ea, raw | US)
                table = raw & self._addr_mask
            else:
                pfn = self._new_table()
                self.write_entry(ea, (pfn << PAGE_SHIFT) | P | RW | (US if user else 0))
                table = pfn << PAGE_SHIFT
        ea = table | (((vaddr >> level_shift(leaf_level)) & 511) << 3)
        old = self.read_entry(ea)
        if old & P and not replace:
            raise PagingError(f"{vaddr:#x} is already mapped ({Entry(old, leaf_level)!r})")
        if old & P and leaf_level > 1 and not old & PS:
            raise PagingError(f"{vaddr:#x}: a page table is mapped below this {size:#x} range")
        raw = paddr | P
        raw |= RW if writable else 0
        raw |= US if user else 0
        raw |= PWT if pwt else 0
        raw |= PCD if pcd else 0
        raw |= A if accessed else 0
        raw |= D if dirty else 0
        raw |= G if global_ else 0
        raw |= XD if nx else 0
        raw |= pkey << PKEY_SHIFT
        if leaf_level > 1:
            raw |= PS
        self.write_entry(ea, raw)
        return Entry(raw, leaf_level, self.maxphyaddr)

    def _leaf_step(self, vaddr: int) -> WalkStep:
        step = self.entries(vaddr)[-1]
        if not ((step.entry.present or step.entry.raw & SW_PROTNONE) and step.entry.leaf):
            raise PagingError(f"{vaddr:#x} is not mapped")
        return step

    def leaf(self, vaddr: int) -> Entry | None:
        """The leaf for ``vaddr`` including PROT_NONE ones (P=0 with ``SW_PROTNONE``)."""
        step = self.entries(vaddr)[-1]
        if (step.entry.present or step.entry.raw & SW_PROTNONE) and step.entry.leaf:
            return step.entry
        return None

    def unmap(self, vaddr: int) -> Entry:
        """Clear the leaf mapping ``vaddr`` and return the old entry. No TLB is touched: the
        caller invalidates (INVLPG / shootdown) as the architecture requires."""
        step = self._leaf_step(vaddr)
        self.write_entry(step.entry_paddr, 0)
        return step.entry

    def update(self, vaddr: int, *, set_bits: int = 0, clear_bits: int = 0,
               level: int | None = None) -> Entry:
        """Read-modify-write one entry on the walk of ``vaddr`` (the leaf by default, or the
        entry at ``level``), e.g. to make a PDE read-only. Returns the new entry."""
        if level is None:
            step = self._leaf_step(vaddr)
        else:
            steps = [s for s in self.entries(vaddr) if s.level == level]
            if not steps:
                raise PagingError(f"the walk of {vaddr:#x} does not reach level {level}")
            step = steps[0]
        raw = (step.entry.raw | set_bits) & ~clear_bits & ((1 << 64) - 1)
        self.write_entry(step.entry_paddr, raw)
        return Entry(raw, step.level, self.maxphyaddr)

    def set_raw(self, vaddr: int, level: int, raw: int) -> None:
        """Write any raw value into the entry at ``level`` on the walk of ``vaddr`` (tests use it
        to plant reserved bits)."""
        steps = [s for s in self.entries(vaddr) if s.level == level]
        if not steps:
            raise PagingError(f"the walk of {vaddr:#x} does not reach level {level}")
        self.write_entry(steps[0].entry_paddr, raw)

    def protect(self, vaddr: int, *, writable: bool | None = None, nx: bool | None = None,
                user: bool | None = None, pkey: int | None = None) -> Entry:
        """Change a leaf's permission bits, leaving the rest (address, A, D) alone."""
        set_bits = clear_bits = 0
        for flag, bit in ((writable, RW), (nx, XD), (user, US)):
            if flag is True:
                set_bits |= bit
            elif flag is False:
                clear_bits |= bit
        if pkey is not None:
            if not 0 <= pkey <= 15:
                raise PagingError(f"protection key must be 0..15, got {pkey!r}")
            clear_bits |= PKEY_MASK
            set_bits |= pkey << PKEY_SHIFT
        return self.update(vaddr, set_bits=set_bits, clear_bits=clear_bits)

    # ------------------------------------------------------------ enumeration / teardown
    def mappings(self, start: int = 0, end: int | None = None, *,
                 include_protnone: bool = False) -> Iterator[tuple[int, Entry]]:
        """Every present leaf as (vaddr, entry), in address order, within [start, end); with
        ``include_protnone`` also non-present leaves carrying ``SW_PROTNONE``."""
        top = 1 << (57 if self.la57 else 48)

        def internal(va: int) -> int:  # canonical address -> offset in the walked space
            if va >= 1 << 64:
                return top
            return va & (top - 1) if va >= 1 << 63 else min(va, top)

        lo_start = internal(start)
        lo_end = top if end is None else internal(end)

        def sign_extend(va: int) -> int:
            return va | (((1 << 64) - top) if va & (top >> 1) else 0)

        def rec(table: int, level: int, base: int) -> Iterator[tuple[int, Entry]]:
            shift = level_shift(level)
            data = self.physmem.frame_bytes(table >> PAGE_SHIFT)
            for index in range(512):
                lo = base | (index << shift)
                if lo + (1 << shift) <= lo_start or lo >= lo_end:
                    continue
                raw = int.from_bytes(data[index * 8:index * 8 + 8], "little")
                if not raw & P:
                    if include_protnone and raw & SW_PROTNONE and (level == 1 or raw & PS):
                        yield sign_extend(lo), Entry(raw, level, self.maxphyaddr)
                    continue
                entry = Entry(raw, level, self.maxphyaddr)
                if entry.leaf:
                    yield sign_extend(lo), entry
                else:
                    yield from rec(raw & self._addr_mask, level - 1, lo)

        yield from rec(self.root << PAGE_SHIFT, self.levels, 0)

    def prune(self, vaddr: int) -> list[int]:
        """Free the tables on the walk of ``vaddr`` that have become empty (Linux's
        free_pgtables); returns their pfns. Paging-structure caches may still point at them
        until invalidated: INVLPG flushes those caches for the current PCID (SDM 4.10.4.1)."""
        freed: list[int] = []
        steps = self.entries(vaddr)
        for step in reversed(steps[1:]):
            table_pfn = step.table_paddr >> PAGE_SHIFT
            data = self.physmem.frame_bytes(table_pfn)
            if any(data):
                break
            parent = steps[steps.index(step) - 1]
            self.write_entry(parent.entry_paddr, 0)
            self._tables.discard(table_pfn)
            self.physmem.free(table_pfn)
            freed.append(table_pfn)
        return freed

    def destroy(self) -> None:
        """Free every table frame (not the pages mapped)."""
        for pfn in list(self._tables):
            self.physmem.free(pfn)
        self._tables.clear()
