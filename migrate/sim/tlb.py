"""Per-core TLBs and paging-structure caches (Intel SDM vol. 3A, 4.10).

Geometry is data (``TLBConfig``). The defaults are Intel Skylake client's, from the Intel 64 and
IA-32 Architectures Optimization Reference Manual (Skylake microarchitecture, "TLB parameters"):

  L1 DTLB  4 KiB: 64 entries, 4-way    2 MiB: 32 entries, 4-way    1 GiB: 4 entries, 4-way (full)
  L1 ITLB  4 KiB: 128 entries, 8-way   2 MiB: 8 entries per thread, fully associative
  STLB     4 KiB + 2 MiB shared: 1536 entries, 12-way;  1 GiB: 16 entries, 4-way

The ITLB has no 1 GiB array on Skylake; an instruction fetch through a 1 GiB page is cached in the
STLB only here. Intel does not document paging-structure-cache sizes; the defaults (PML4E 4,
PDPTE 4, PDE 32, fully associative) are assumptions and configurable.

Each array is a list of sets; a set is a dict used as an LRU list (insertion order = age). Keys pack
(virtual page number, page-size code, tag) into one int; the tag is the 12-bit PCID, or
``GLOBAL_TAG`` for global entries, which match every PCID (SDM 4.10.2.4). The value is one int:
the page's physical base address with the cached rights in its low bits (see ``R_*``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GLOBAL_TAG = 0x1000  # above every 12-bit PCID
KEY_SHIFT = 15  # key = vpn << 15 | size_code << 13 | tag
SIZE_CODE = {12: 0, 21: 1, 30: 2}

# Cached rights in the low bits of a TLB value (SDM 4.10.2.2: a TLB entry holds the physical
# address, the combined R/W, U/S and XD of every level, the dirty flag and the protection key).
R_W = 1 << 0  # R/W=1 in every level
R_U = 1 << 1  # U/S=1 in every level: a user-mode address
R_XD = 1 << 2  # XD=1 in some level (and EFER.NXE=1)
R_D = 1 << 3  # leaf dirty flag was 1 when cached
R_PKEY_SHIFT = 4  # bits 7:4, the leaf's protection key
R_G = 1 << 8  # global entry
RIGHTS_INDEX_MASK = 0xFF  # W, U, XD, D and PKEY index the MMU's permission tables


@dataclass(frozen=True)
class ArrayConfig:
    entries: int
    ways: int

    def __post_init__(self) -> None:
        if self.entries <= 0 or self.ways <= 0 or self.entries % self.ways:
            raise ValueError(f"TLB array needs entries a positive multiple of ways, got {self}")
        sets = self.entries // self.ways
        if sets & (sets - 1):
            raise ValueError(f"TLB array set count must be a power of two, got {sets}")


@dataclass(frozen=True)
class TLBConfig:
    """Sizes of each array (defaults: Intel Skylake client, see module docstring)."""

    l1d_4k: ArrayConfig = ArrayConfig(64, 4)
    l1d_2m: ArrayConfig = ArrayConfig(32, 4)
    l1d_1g: ArrayConfig = ArrayConfig(4, 4)
    l1i_4k: ArrayConfig = ArrayConfig(128, 8)
    l1i_2m: ArrayConfig = ArrayConfig(8, 8)
    stlb: ArrayConfig = ArrayConfig(1536, 12)  # shared 4 KiB and 2 MiB
    stlb_1g: ArrayConfig = ArrayConfig(16, 4)
    pml4_cache: ArrayConfig = ArrayConfig(4, 4)
    pdpt_cache: ArrayConfig = ArrayConfig(4, 4)
    pde_cache: ArrayConfig = ArrayConfig(32, 32)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ArrayStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0  # entries removed by INVLPG/INVPCID/CR3/CR4/fault invalidation
    flushes: int = 0  # whole-PCID or whole-array flush operations (CR3 load, INVPCID 1-3, CR4)
    fills: int = 0


class TLBArray:
    """One set-associative, LRU array. ``shifts`` are the page sizes (as shifts) it holds."""

    __slots__ = ("mask", "name", "sets", "shifts", "stats", "ways")

    def __init__(self, name: str, config: ArrayConfig, shifts: tuple[int, ...]) -> None:
        self.name = name
        nsets = config.entries // config.ways
        self.sets: list[dict[int, int]] = [{} for _ in range(nsets)]
        self.mask = nsets - 1
        self.ways = config.ways
        self.shifts = shifts
        self.stats = ArrayStats()

    def lookup(self, vaddr: int, tag: int) -> tuple[int, int] | None:
        """(value, shift) of an entry covering ``vaddr`` for PCID ``tag`` or a global entry."""
        for shift in self.shifts:
            vpn = vaddr >> shift
            s = self.sets[vpn & self.mask]
            base = (vpn << KEY_SHIFT) | (SIZE_CODE[shift] << 13)
            key = base | tag
            value = s.get(key)
            if value is None:
                key = base | GLOBAL_TAG
                value = s.get(key)
            if value is not None:
                del s[key]  # LRU: most recently used goes last
                s[key] = value
                self.stats.hits += 1
                return value, shift
        self.stats.misses += 1
        return None

    def insert(self, vaddr: int, shift: int, tag: int, value: int) -> None:
        vpn = vaddr >> shift
        s = self.sets[vpn & self.mask]
        key = (vpn << KEY_SHIFT) | (SIZE_CODE[shift] << 13) | tag
        if key in s:
            del s[key]
        elif len(s) >= self.ways:
            del s[next(iter(s))]
            self.stats.evictions += 1
        s[key] = value
        self.stats.fills += 1

    def invalidate_page(self, vaddr: int, tag: int | None, *, include_global: bool) -> int:
        """Remove entries for the page containing ``vaddr``: for PCID ``tag`` (every PCID if
        None) and, if ``include_global``, global ones."""
        removed = 0
        for shift in self.shifts:
            vpn = vaddr >> shift
            s = self.sets[vpn & self.mask]
            base = (vpn << KEY_SHIFT) | (SIZE_CODE[shift] << 13)
            for key in list(s):
                if key >> 13 != base >> 13:
                    continue
                ktag = key & 0x1FFF
                if ktag == GLOBAL_TAG:
                    if include_global:
                        del s[key]
                        removed += 1
                elif tag is None or ktag == tag:
                    del s[key]
                    removed += 1
        self.stats.invalidations += removed
        return removed

    def flush(self, *, tag: int | None = None, keep_global: bool) -> int:
        """Remove every entry of PCID ``tag`` (all PCIDs if None), global ones unless kept."""
        self.stats.flushes += 1
        removed = 0
        for s in self.sets:
            for key in list(s):
                ktag = key & 0x1FFF
                if ktag == GLOBAL_TAG:
                    if keep_global:
                        continue
                elif tag is not None and ktag != tag:
                    continue
                del s[key]
                removed += 1
        self.stats.invalidations += removed
        return removed

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets)

    def entries(self) -> list[tuple[int, int, int, int]]:
        """(vaddr of page, shift, tag, value) of every entry, for inspection."""
        out = []
        for s in self.sets:
            for key, value in s.items():
                code = (key >> 13) & 3
                shift = (12, 21, 30)[code]
                out.append(((key >> KEY_SHIFT) << shift, shift, key & 0x1FFF, value))
        return out


class PagingStructureCache:
    """A PML4E, PDPTE or PDE cache (SDM 4.10.3): maps the linear-address bits above ``shift``
    (and a PCID) to the physical address of the next table and the rights combined so far.
    Fully associative LRU. Values are (table_paddr, AND of the entries so far, OR of them):
    the AND carries R/W and U/S, the OR carries XD."""

    __slots__ = ("data", "entries_max", "name", "shift", "stats")

    def __init__(self, name: str, config: ArrayConfig, shift: int) -> None:
        self.name = name
        self.shift = shift  # entries cover bits 47:shift (56:shift with LA57)
        self.entries_max = config.entries
        self.data: dict[int, tuple[int, int, int]] = {}
        self.stats = ArrayStats()

    def get(self, vaddr: int, pcid: int) -> tuple[int, int, int] | None:
        key = ((vaddr >> self.shift) << 12) | pcid
        value = self.data.get(key)
        if value is None:
            self.stats.misses += 1
            return None
        del self.data[key]
        self.data[key] = value
        self.stats.hits += 1
        return value

    def put(self, vaddr: int, pcid: int, value: tuple[int, int, int]) -> None:
        key = ((vaddr >> self.shift) << 12) | pcid
        if key in self.data:
            del self.data[key]
        elif len(self.data) >= self.entries_max:
            del self.data[next(iter(self.data))]
            self.stats.evictions += 1
        self.data[key] = value
        self.stats.fills += 1

    def invalidate_address(self, vaddr: int, pcid: int) -> int:
        key = ((vaddr >> self.shift) << 12) | pcid
        if self.data.pop(key, None) is None:
            return 0
        self.stats.invalidations += 1
        return 1

    def flush(self, pcid: int | None = None) -> int:
        self.stats.flushes += 1
        if pcid is None:
            removed = len(self.data)
            self.data.clear()
        else:
            keys = [k for k in self.data if k & 0xFFF == pcid]
            for k in keys:
                del self.data[k]
            removed = len(keys)
        self.stats.invalidations += removed
        return removed

    def __len__(self) -> int:
        return len(self.data)


@dataclass
class TLBCounters:
    walks: int = 0
    entries_read: int = 0  # paging-structure entries read from memory by successful walks
    full_flushes: int = 0  # operations that dropped every entry of at least one PCID
    page_invalidations: int = 0  # INVLPG / INVPCID type 0 / fault invalidations
    faults: int = 0


class TLB:
    """The TLBs and paging-structure caches of one core."""

    def __init__(self, config: TLBConfig | None = None) -> None:
        self.config = config = config or TLBConfig()
        self.l1d_4k = TLBArray("l1d_4k", config.l1d_4k, (12,))
        self.l1d_2m = TLBArray("l1d_2m", config.l1d_2m, (21,))
        self.l1d_1g = TLBArray("l1d_1g", config.l1d_1g, (30,))
        self.l1i_4k = TLBArray("l1i_4k", config.l1i_4k, (12,))
        self.l1i_2m = TLBArray("l1i_2m", config.l1i_2m, (21,))
        self.stlb = TLBArray("stlb", config.stlb, (12, 21))
        self.stlb_1g = TLBArray("stlb_1g", config.stlb_1g, (30,))
        self.arrays = (self.l1d_4k, self.l1d_2m, self.l1d_1g, self.l1i_4k, self.l1i_2m,
                       self.stlb, self.stlb_1g)
        # PSCs keyed by the bits above the index of the table they point to.
        self.pml4_cache = PagingStructureCache("pml4_cache", config.pml4_cache, 39)
        self.pdpt_cache = PagingStructureCache("pdpt_cache", config.pdpt_cache, 30)
        self.pde_cache = PagingStructureCache("pde_cache", config.pde_cache, 21)
        self.pscs = (self.pde_cache, self.pdpt_cache, self.pml4_cache)
        self.counters = TLBCounters()

    # L1 arrays searched for data (0) and instruction (1) accesses, smallest page first.
    def l1_arrays(self, fetch: bool) -> tuple[TLBArray, ...]:
        return (self.l1i_4k, self.l1i_2m) if fetch else (self.l1d_4k, self.l1d_2m, self.l1d_1g)

    def l1_for(self, shift: int, fetch: bool) -> TLBArray | None:
        if fetch:
            return {12: self.l1i_4k, 21: self.l1i_2m}.get(shift)
        return {12: self.l1d_4k, 21: self.l1d_2m, 30: self.l1d_1g}[shift]

    def l2_for(self, shift: int) -> TLBArray:
        return self.stlb_1g if shift == 30 else self.stlb

    def fill(self, vaddr: int, shift: int, tag: int, value: int, fetch: bool) -> None:
        l1 = self.l1_for(shift, fetch)
        if l1 is not None:
            l1.insert(vaddr, shift, tag, value)
        self.l2_for(shift).insert(vaddr, shift, tag, value)

    # -------------------------------------------------------------- invalidation primitives
    def invalidate_page(self, vaddr: int, pcid: int | None, *, include_global: bool) -> int:
        self.counters.page_invalidations += 1
        return sum(a.invalidate_page(vaddr, pcid, include_global=include_global)
                   for a in self.arrays)

    def flush_pcid(self, pcid: int | None, *, keep_global: bool) -> int:
        self.counters.full_flushes += 1
        return sum(a.flush(tag=pcid, keep_global=keep_global) for a in self.arrays)

    def flush_pscs(self, pcid: int | None) -> int:
        return sum(c.flush(pcid) for c in self.pscs)

    def invalidate_psc_address(self, vaddr: int, pcid: int) -> int:
        return sum(c.invalidate_address(vaddr, pcid) for c in self.pscs)

    def size(self) -> int:
        return sum(len(a) for a in self.arrays)

    @property
    def stats(self) -> dict:
        """Per-array hits, misses, evictions, invalidations and fills, plus core-level counts."""
        out: dict = {a.name: asdict(a.stats) for a in self.arrays}
        for c in self.pscs:
            out[c.name] = asdict(c.stats)
        out["walks"] = self.counters.walks
        out["entries_read"] = self.counters.entries_read
        out["full_flushes"] = self.counters.full_flushes
        out["page_invalidations"] = self.counters.page_invalidations
        out["faults"] = self.counters.faults
        return out

    def reset_stats(self) -> None:
        for a in self.arrays:
            a.stats = ArrayStats()
        for c in self.pscs:
            c.stats = ArrayStats()
        self.counters = TLBCounters()
