"""A virtually indexed, physically tagged (VIPT) L1 data cache, and page colouring.

Geometry: ``size`` bytes in ``ways`` ways of ``line_size``-byte lines, so ``sets = size / (ways *
line_size)``. The set index comes from the *virtual* address bits just above the line offset; the
tag is the *physical* frame number (what real VIPT L1s compare after the TLB lookup that runs in
parallel with indexing). While one way (``size / ways``) fits in a page, every index bit is a page-
offset bit, identical in the virtual and the physical address: the cache behaves as if physically
indexed and cannot alias. When a way is larger than a page, the index uses virtual bits above the
page offset: the *colour* bits. ``colours = max(1, (size / ways) / page_size)``.

Two virtual addresses of one physical line that differ in their colour bits (synonyms) index
different sets, so the line can be cached twice. A store through one copy leaves the other stale:
a later load through the other virtual address returns old data. The model detects and counts both
(``stats["synonyms"]``, ``stats["stale_reads"]``) but, like the hardware it models, does not fix
them; the cure is the OS's: page colouring, which keeps ``colour(vaddr) == colour(paddr)`` for every
mapping so all mappings of a frame index the same sets. (Hennessy & Patterson, "Computer
Architecture", appendix B.3, "avoiding address translation during indexing of the cache"; Linux
does this on aliasing architectures with SHMLBA-aligned shared mappings, e.g.
arch/arm/mm/mmap.c COLOUR_ALIGN, arch/sparc/kernel/sys_sparc_64.c.)

x86 L1Ds are built so they never alias (a 32 KiB 8-way or 48 KiB 12-way L1D has 4 KiB ways: one
colour); the aliasing geometries here are those of older ARM/MIPS/SPARC parts.

Stores are write-back, write-allocate. Memory writes by anyone other than this cache (DMA, the
page walker, uncached CPU stores) snoop it: dirty copies are written back, then all copies
invalidated, as on a coherent x86 system.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

PAGE_SIZE = 4096
CACHE_WRITER = "cache"


class PhysicalMemoryPort(Protocol):
    """What the cache needs from physical memory (``migrate.sim.physmem.PhysicalMemory`` fits)."""

    def read(self, paddr: int, n: int) -> bytes: ...

    def write(self, paddr: int, data: bytes | bytearray | memoryview, *,
              writer: str = "cpu") -> None: ...


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class CacheGeometry:
    """Size, associativity and line size of a cache; everything else is derived."""

    size: int
    ways: int
    line_size: int = 64
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        for name in ("size", "ways", "line_size", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"cache {name} must be a positive int, got {value!r}")
        for name in ("line_size", "page_size"):
            if not _is_pow2(getattr(self, name)):
                raise ValueError(f"cache {name} must be a power of two, got {getattr(self, name)}")
        if self.line_size > self.page_size:
            raise ValueError(f"line size {self.line_size} exceeds the page size {self.page_size}")
        if self.size % (self.ways * self.line_size):
            raise ValueError(f"a {self.size}-byte cache cannot hold a whole number of sets of "
                             f"{self.ways} ways of {self.line_size}-byte lines")
        # Ways need not be a power of two (48 KiB 12-way L1Ds exist), the number of sets must be:
        # it is indexed by address bits.
        if not _is_pow2(self.size // (self.ways * self.line_size)):
            sets = self.size // (self.ways * self.line_size)
            raise ValueError(f"{self.size} bytes / ({self.ways} ways x {self.line_size} B) gives "
                             f"{sets} sets, not a power of two")

    @property
    def sets(self) -> int:
        return self.size // (self.ways * self.line_size)

    @property
    def way_size(self) -> int:
        return self.size // self.ways

    @property
    def colours(self) -> int:
        """Page colours: how many pages one way spans (1 = no aliasing possible)."""
        return max(1, self.way_size // self.page_size)

    @property
    def aliasing(self) -> bool:
        return self.colours > 1

    @property
    def line_shift(self) -> int:
        return self.line_size.bit_length() - 1

    @property
    def page_shift(self) -> int:
        return self.page_size.bit_length() - 1

    @property
    def index_bits(self) -> tuple[int, int]:
        """(lowest, highest) address bit used as the set index (inclusive); empty if one set."""
        low = self.line_shift
        return low, low + (self.sets.bit_length() - 1) - 1

    def set_index(self, vaddr: int) -> int:
        return (vaddr >> self.line_shift) & (self.sets - 1)

    def colour(self, addr: int) -> int:
        """The colour of a virtual or physical address: the index bits above the page offset."""
        return (addr >> self.page_shift) & (self.colours - 1)

    def describe(self) -> dict[str, int | bool]:
        return {"size": self.size, "ways": self.ways, "line_size": self.line_size,
                "page_size": self.page_size, "sets": self.sets, "way_size": self.way_size,
                "colours": self.colours, "aliasing": self.aliasing}


def host_l1d_geometry(cpu: int = 0,
                      root: str = "/sys/devices/system/cpu") -> CacheGeometry | None:
    """This host's level-1 data cache from sysfs (Documentation/ABI/testing/
    sysfs-devices-system-cpu, cache/indexN/{level,type,size,ways_of_associativity,
    coherency_line_size}); None if the kernel does not expose it. ``.colours`` then says
    whether it can alias."""
    import os

    base = os.path.join(root, f"cpu{cpu}", "cache")
    try:
        indexes = sorted(d for d in os.listdir(base) if d.startswith("index"))
    except OSError:
        return None

    def read(d: str, name: str) -> str:
        with open(os.path.join(base, d, name)) as f:
            return f.read().strip()

    for d in indexes:
        try:
            if read(d, "level") != "1" or read(d, "type") not in ("Data", "Unified"):
                continue
            size_text = read(d, "size")
            ways = int(read(d, "ways_of_associativity"))
            line = int(read(d, "coherency_line_size"))
        except (OSError, ValueError):
            continue
        units = {"K": 1024, "M": 1024 * 1024}
        size = int(size_text[:-1]) * units[size_text[-1]] if size_text[-1] in units \
            else int(size_text)
        return CacheGeometry(size, ways, line, os.sysconf("SC_PAGE_SIZE"))
    return None


@dataclass(slots=True)
class _Line:
    pline: int          # physical line number (paddr >> line_shift); the tag is pline's frame bits
    data: bytearray
    dirty: bool
    version: int        # the physical line's write version this copy holds


@dataclass(slots=True)
class SynonymEvent:
    """One fill that found the same physical line already cached in another set."""

    paddr: int
    vaddr: int
    set_index: int
    other_sets: tuple[int, ...]


@dataclass
class VIPTCache:
    """A VIPT, write-back L1 over a physical memory. Accesses give the virtual *and* the physical
    address (the translation the TLB supplies in parallel with indexing)."""

    geometry: CacheGeometry
    memory: PhysicalMemoryPort
    stats: dict[str, int] = field(default_factory=lambda: {
        "reads": 0, "writes": 0, "hits": 0, "misses": 0, "fills": 0, "evictions": 0,
        "writebacks": 0, "snoop_invalidations": 0, "synonyms": 0, "stale_reads": 0})
    synonym_log: list[SynonymEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = self.geometry
        # One LRU-ordered dict per set: tag (physical line number) -> line; oldest first.
        self._sets: list[OrderedDict[int, _Line]] = [OrderedDict() for _ in range(g.sets)]
        # Latest write version of each physical line, bumped by every store that reaches it, and
        # the version memory itself holds (changed by write-backs and outside writes).
        self._version: dict[int, int] = {}
        self._mem_version: dict[int, int] = {}
        # Where each physical line currently sits: pline -> set indexes holding a copy.
        self._where: dict[int, set[int]] = {}
        self._unsubscribe: Callable[[], None] | None = None
        on_write = getattr(self.memory, "on_write", None)
        if callable(on_write):
            self._unsubscribe = on_write(self._snoop)

    @classmethod
    def build(cls, memory: PhysicalMemoryPort, size: int = 32 * 1024, ways: int = 8,
              line_size: int = 64, page_size: int = PAGE_SIZE) -> VIPTCache:
        return cls(CacheGeometry(size, ways, line_size, page_size), memory)

    # ----------------------------------------------------------------- geometry shortcuts
    @property
    def colours(self) -> int:
        return self.geometry.colours

    @property
    def synonyms(self) -> int:
        """Synonym fills counted so far (a physical line cached in a second set)."""
        return self.stats["synonyms"]

    def resident_synonyms(self) -> int:
        """Physical lines that are cached in more than one set right now."""
        return sum(1 for sets in self._where.values() if len(sets) > 1)

    # ----------------------------------------------------------------- accesses
    def _check(self, vaddr: int, paddr: int, n: int) -> None:
        if not isinstance(vaddr, int) or not isinstance(paddr, int) or vaddr < 0 or paddr < 0:
            raise ValueError(f"addresses must be non-negative ints, got {vaddr!r}, {paddr!r}")
        mask = self.geometry.page_size - 1
        if vaddr & mask != paddr & mask:
            raise ValueError(f"vaddr {vaddr:#x} and paddr {paddr:#x} differ in their page offset: "
                             "not a translation")
        if n < 0:
            raise ValueError(f"negative length {n}")

    def _lookup(self, vaddr: int, pline: int, *, for_write: bool) -> _Line:
        g = self.geometry
        index = g.set_index(vaddr)
        cset = self._sets[index]
        line = cset.get(pline)
        if line is not None:
            self.stats["hits"] += 1
            cset.move_to_end(pline)
            if not for_write and line.version < self._version.get(pline, 0):
                # The copy predates a store made through a synonym in another set.
                self.stats["stale_reads"] += 1
            return line
        self.stats["misses"] += 1
        if len(cset) >= g.ways:
            victim_tag, victim = cset.popitem(last=False)
            self.stats["evictions"] += 1
            self._forget(victim_tag, index)
            if victim.dirty:
                self._writeback(victim)
        paddr_line = pline << g.line_shift
        data = bytearray(self.memory.read(paddr_line, g.line_size))
        line = _Line(pline, data, False, self._mem_version.get(pline, 0))
        if not for_write and line.version < self._version.get(pline, 0):
            # Filled from memory while a newer dirty copy sits in a synonym's set.
            self.stats["stale_reads"] += 1
        cset[pline] = line
        self.stats["fills"] += 1
        others = self._where.setdefault(pline, set())
        if others:
            self.stats["synonyms"] += 1
            offset = paddr_line & (g.page_size - 1)
            self.synonym_log.append(SynonymEvent(paddr_line, (vaddr & ~(g.page_size - 1)) | offset,
                                                 index, tuple(sorted(others))))
        others.add(index)
        return line

    def _forget(self, pline: int, index: int) -> None:
        sets = self._where.get(pline)
        if sets is not None:
            sets.discard(index)
            if not sets:
                del self._where[pline]

    def _writeback(self, line: _Line) -> None:
        self.stats["writebacks"] += 1
        self._mem_version[line.pline] = line.version
        self.memory.write(line.pline << self.geometry.line_shift, bytes(line.data),
                          writer=CACHE_WRITER)

    def read(self, vaddr: int, paddr: int, n: int) -> bytes:
        """Load ``n`` bytes; ``paddr`` is the translation of ``vaddr`` (same page offset)."""
        self._check(vaddr, paddr, n)
        self.stats["reads"] += 1
        g = self.geometry
        out = bytearray()
        while n > 0:
            off = paddr & (g.line_size - 1)
            chunk = min(n, g.line_size - off)
            line = self._lookup(vaddr, paddr >> g.line_shift, for_write=False)
            out += line.data[off:off + chunk]
            vaddr += chunk
            paddr += chunk
            n -= chunk
        return bytes(out)

    def write(self, vaddr: int, paddr: int, data: bytes | bytearray) -> None:
        """Store ``data`` (write-back, write-allocate): only the copy in vaddr's set changes."""
        self._check(vaddr, paddr, len(data))
        self.stats["writes"] += 1
        g = self.geometry
        pos = 0
        while pos < len(data):
            off = paddr & (g.line_size - 1)
            chunk = min(len(data) - pos, g.line_size - off)
            pline = paddr >> g.line_shift
            line = self._lookup(vaddr, pline, for_write=True)
            line.data[off:off + chunk] = data[pos:pos + chunk]
            line.dirty = True
            version = self._version.get(pline, 0) + 1
            self._version[pline] = version
            line.version = version
            vaddr += chunk
            paddr += chunk
            pos += chunk

    # ----------------------------------------------------------------- maintenance
    def flush(self) -> int:
        """Write back every dirty line and invalidate everything; returns lines written back.
        (Dirty synonyms are written back in set order: the last one wins, as on real parts.)"""
        written = 0
        for cset in self._sets:
            for line in cset.values():
                if line.dirty:
                    self._writeback(line)
                    written += 1
            cset.clear()
        self._where.clear()
        return written

    def _snoop(self, paddr: int, n: int, writer: str) -> None:
        """Physical memory is about to be written by someone else: write back and drop copies."""
        if writer == CACHE_WRITER or n <= 0:
            return
        g = self.geometry
        first, last = paddr >> g.line_shift, (paddr + n - 1) >> g.line_shift
        if last - first + 1 > len(self._where):
            plines = [p for p in self._where if first <= p <= last]
        else:
            plines = [p for p in range(first, last + 1) if p in self._where]
        for pline in plines:
            for index in sorted(self._where.get(pline, ())):
                line = self._sets[index].pop(pline)
                if line.dirty:
                    self._writeback(line)
                self.stats["snoop_invalidations"] += 1
            self._where.pop(pline, None)
        # The outside write makes memory the newest copy of every line it touches.
        # Only lines the cache has ever seen carry versions; untouched ones need none.
        if last - first < 4096:
            touched = [p for p in range(first, last + 1) if p in self._version]
        else:
            touched = [p for p in self._version if first <= p <= last]
        for pline in touched:
            version = self._version[pline] + 1
            self._version[pline] = self._mem_version[pline] = version

    def detach(self) -> None:
        """Stop snooping the memory (e.g. before replacing this cache with another)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def describe(self) -> dict[str, object]:
        return {**self.geometry.describe(), "stats": dict(self.stats),
                "resident_synonyms": self.resident_synonyms()}


# ===================================================================== page colouring
class ColourAllocator(Protocol):
    """What the colouring picker needs from an allocator (``PhysicalMemory`` fits)."""

    def alloc(self, order: int = 0, *, owner: str | None = None, **kw: object) -> object: ...

    def free(self, pfn: int, order: int | None = None) -> None: ...

    def frame(self, pfn: int) -> object: ...


class PageColouring:
    """A colour-aware frame picker: ``pick(colour, owner=...)`` returns a free frame whose colour
    (pfn mod colours) is the one asked for.

    Frames of other colours met on the way are kept in per-colour pools, like the per-colour free
    lists of colouring allocators (FreeBSD's vm_phys, the Solaris page_freelists), and handed out
    first next time. Pool frames are allocated from the buddy allocator under the owner
    ``"colour-pool"``; ``release()`` gives them back. With ``enabled=False`` the picker is a plain
    order-0 allocation (colour ignored).
    """

    POOL_OWNER = "colour-pool"

    def __init__(self, geometry: CacheGeometry, memory: ColourAllocator, *,
                 enabled: bool = True) -> None:
        self.geometry = geometry
        self.memory = memory
        self.enabled = enabled
        self._pools: dict[int, list[int]] = {c: [] for c in range(geometry.colours)}
        self.stats = {"picks": 0, "pooled": 0, "from_pool": 0}

    @property
    def colours(self) -> int:
        return self.geometry.colours

    def colour_of_pfn(self, pfn: int) -> int:
        return pfn & (self.geometry.colours - 1)

    def colour_of_vaddr(self, vaddr: int) -> int:
        return self.geometry.colour(vaddr)

    def pick(self, colour: int | None, *, owner: str | None = None, kind: str = "") -> int:
        """Allocate one frame of ``colour`` (None or colouring off: any colour)."""
        self.stats["picks"] += 1
        if not self.enabled or colour is None or self.colours == 1:
            return self._alloc(owner, kind)
        if not isinstance(colour, int) or not 0 <= colour < self.colours:
            raise ValueError(f"colour must be in 0..{self.colours - 1}, got {colour!r}")
        pool = self._pools[colour]
        if pool:
            pfn = pool.pop()
            self.stats["from_pool"] += 1
            frame = self.memory.frame(pfn)
            frame.owner = owner  # type: ignore[attr-defined]
            frame.kind = kind  # type: ignore[attr-defined]
            return pfn
        for _ in range(self.colours * 4):
            pfn = self._alloc(owner, kind)
            if self.colour_of_pfn(pfn) == colour:
                return pfn
            frame = self.memory.frame(pfn)
            frame.owner = self.POOL_OWNER  # type: ignore[attr-defined]
            self._pools[self.colour_of_pfn(pfn)].append(pfn)
            self.stats["pooled"] += 1
        raise RuntimeError(f"no frame of colour {colour} found in {self.colours * 4} allocations")

    def pick_for(self, vaddr: int, *, owner: str | None = None, kind: str = "") -> int:
        """A frame whose colour matches the virtual address it will be mapped at."""
        return self.pick(self.colour_of_vaddr(vaddr), owner=owner, kind=kind)

    def _alloc(self, owner: str | None, kind: str) -> int:
        pfn = self.memory.alloc(0, owner=owner, kind=kind)
        assert isinstance(pfn, int)
        return pfn

    def pooled(self) -> int:
        return sum(len(p) for p in self._pools.values())

    def release(self) -> int:
        """Return every pooled frame to the allocator; returns how many."""
        n = 0
        for pool in self._pools.values():
            while pool:
                self.memory.free(pool.pop())
                n += 1
        return n

    def align_address(self, addr: int, colour: int) -> int:
        """The lowest page-aligned address >= ``addr`` whose colour is ``colour`` (what an
        aliasing architecture's ``arch_get_unmapped_area`` does for shared mappings: COLOUR_ALIGN
        to SHMLBA plus the file offset's colour)."""
        page = self.geometry.page_size
        addr = (addr + page - 1) & ~(page - 1)
        if self.colours == 1:
            return addr
        delta = (colour - self.geometry.colour(addr)) % self.colours
        return addr + delta * page


# ===================================================================== shared-mapping experiment
def shared_mapping_experiment(machine: Any, *, colouring: bool, sharers: int = 4,
                              pages: int = 4) -> dict[str, Any]:
    """Several address spaces map one shared object (a file or shm segment of ``pages`` pages)
    and read it through ``machine.cache`` with a core's MMU; then one of them stores to every
    page and every other one reads the page back.

    Without colouring the object's frames come from the plain buddy allocator and each mapping
    lands where a top-down mmap puts it, right below the previous region with a one-page gap,
    without regard to colour.
    With colouring the page-cache frame of file page ``i`` has colour ``i mod colours`` and each
    mapping address is colour-aligned (``align_address``), so virtual and physical colours agree.
    Returns the evidence: colours, synonyms, stale reads and the colours each mapping used.
    """
    from migrate.sim.mmu import Access

    cache = machine.cache
    g = cache.geometry
    picker = PageColouring(g, machine.physmem, enabled=colouring)
    frames = [picker.pick(i % g.colours if colouring else None, owner="shm:object",
                          kind="pagecache") for i in range(pages)]
    core = machine.cores[0]
    tables = []
    bases = []
    for k in range(sharers):
        pt = machine.new_page_table(owner=f"pt:proc{k}")
        hint = 0x7F00_0000_0000 - (k + 1) * (pages + 1) * g.page_size
        base = picker.align_address(hint, 0) if colouring else hint
        for i, pfn in enumerate(frames):
            pt.map(base + i * g.page_size, pfn * g.page_size, writable=True, user=True)
        tables.append(pt)
        bases.append(base)
    before = dict(cache.stats)

    def access(k: int, i: int, data: bytes | None = None) -> bytes:
        core.cpl = 0                      # MOV to CR3 is privileged; the access is a user one
        core.load_cr3(tables[k], pcid=0)
        core.cpl = 3
        vaddr = bases[k] + i * g.page_size + 0x40
        paddr = core.translate(vaddr, Access.WRITE if data is not None else Access.READ)
        if data is not None:
            cache.write(vaddr, paddr, data)
            return data
        return cache.read(vaddr, paddr, 8)

    saved_cpl = core.cpl
    for k in range(sharers):
        for i in range(pages):
            access(k, i)
    stale_values = 0
    for i in range(pages):
        value = f"gen{i:05d}".encode()           # 8 bytes, what access() reads back
        access(0, i, value)
        for k in range(1, sharers):
            if access(k, i) != value:
                stale_values += 1
    result = {
        "geometry": g.describe(),
        "colouring": colouring,
        "sharers": sharers,
        "pages": pages,
        "frame_colours": [picker.colour_of_pfn(p) for p in frames],
        "mapping_colours": [g.colour(b) for b in bases],
        "synonyms": cache.stats["synonyms"] - before["synonyms"],
        "stale_reads": cache.stats["stale_reads"] - before["stale_reads"],
        "stale_values_seen": stale_values,
        "resident_synonyms": cache.resident_synonyms(),
    }
    core.cpl = 0
    cache.flush()
    core.cpl = saved_cpl
    for pt in tables:
        pt.destroy()
    for pfn in frames:
        machine.physmem.free(pfn)
    picker.release()
    return result


def kernel_shared_file_experiment(machine: Any, *, colouring: bool, sharers: int = 4,
                                  pages: int = 4) -> dict[str, Any]:
    """The same question asked of the OS model: ``sharers`` processes ``mmap`` one file
    MAP_SHARED, each with an address hint one page further along (so, left alone, the mappings
    fall on different colours), fault it in, and read it through ``machine.cache``; one process
    then stores to each page and the others load it back.

    With ``colouring`` the kernel allocates page-cache frames through the colouring picker
    (colour = file page index) and colour-aligns shared mappings to their file offset, as
    aliasing architectures do; the synonym count must then be zero."""
    kernel = machine.kernel
    if not hasattr(kernel, "frame_picker"):
        raise RuntimeError("this kernel model has no frame_picker hook: page colouring "
                           "cannot be switched on")
    picker = machine.set_page_colouring(colouring)
    cache = machine.cache
    g = cache.geometry
    size = pages * g.page_size
    name = f"coloured-{len(kernel.files)}"
    f = kernel.create_file(name, size, {0: bytes(range(256)) * (size // 256)})
    procs, bases = [], []
    for k in range(sharers):
        proc = kernel.spawn(f"sharer{k}")
        hint = 0x7E00_0000_0000 + k * (pages + 2) * g.page_size + k * g.page_size
        bases.append(proc.mmap(hint, size, "rw", shared=True, file=f.name))
        procs.append(proc)
    before = dict(cache.stats)

    def paddr_of(k: int, va: int) -> int:
        procs[k].read(va, 1)                     # fault the page in through the MMU
        paddr = procs[k].translate(va)
        assert paddr is not None
        return paddr

    mapping_colours = []
    frame_colours = []
    for k in range(sharers):
        mapping_colours.append(g.colour(bases[k]))
        for i in range(pages):
            va = bases[k] + i * g.page_size + 0x80
            pa = paddr_of(k, va)
            if k == 0:
                frame_colours.append(g.colour(pa))
            cache.read(va, pa, 8)
    stale_values = 0
    for i in range(pages):
        value = f"page{i:04d}".encode()
        va0 = bases[0] + i * g.page_size + 0x80
        cache.write(va0, paddr_of(0, va0), value)
        for k in range(1, sharers):
            va = bases[k] + i * g.page_size + 0x80
            if cache.read(va, paddr_of(k, va), 8) != value:
                stale_values += 1
    result = {
        "geometry": g.describe(), "colouring": colouring, "sharers": sharers, "pages": pages,
        "mapping_colours": mapping_colours, "frame_colours": frame_colours,
        "colours_agree": all(g.colour(bases[k] + i * g.page_size)
                             == g.colour(procs[k].translate(bases[k] + i * g.page_size) or 0)
                             for k in range(sharers) for i in range(pages)),
        "synonyms": cache.stats["synonyms"] - before["synonyms"],
        "stale_reads": cache.stats["stale_reads"] - before["stale_reads"],
        "stale_values_seen": stale_values,
        "picker": dict(picker.stats),
    }
    cache.flush()
    for proc in procs:
        kernel.exit(proc)
    return result
