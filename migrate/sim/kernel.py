"""The OS model: processes, VMAs, the page-fault handler, TLB shootdown, page cache, pkeys.

Modelled on Linux (mm/memory.c, mm/mmap.c, mm/mprotect.c, arch/x86/mm/fault.c, arch/x86/mm/tlb.c):

- Faults: ``Process.read/write/execute`` drive a core's MMU; a ``PageFault`` goes to
  ``Kernel.handle_fault`` (do_user_addr_fault): find the VMA (or grow the stack), check the access
  against the VMA (access_error), then resolve: the shared zero page for reads of anonymous memory
  (do_anonymous_page), a zeroed frame on first write (demand-zero), copy-on-write (wp_page_copy) or
  reuse of an exclusive page (wp_page_reuse), page-cache pages for files, the zero page for file
  holes, SIGBUS beyond EOF. Every fault is logged with its error code and resolution.
- Signals are raised as the typed exception ``Signal`` (signo, si_code, address).
- TLB shootdown (flush_tlb_mm_range): each mm has a ``tlb_gen``; cores with the mm loaded get an
  IPI and flush, by INVLPG per page up to ``tlb_single_page_flush_ceiling`` (33) pages, else the
  whole PCID. Cores in lazy-TLB mode (idle, mm still loaded) get no IPI and flush when they next
  switch to the mm and see its tlb_gen moved. ``shootdown=False`` skips remote cores: the
  stale-TLB hazard made concrete.
- PCIDs: each core keeps 6 dynamic ASIDs (TLB_NR_DYN_ASIDS); switching to an mm whose ASID is
  still cached and current loads CR3 with the no-flush bit.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from migrate.sim.loader import STACK_GUARD_GAP, Layout, Loader
from migrate.sim.mmu import PF_P, PF_PK, PF_RSVD, PF_WR, Access, Core, PageFault
from migrate.sim.paging import (
    PKEY_MASK,
    PKEY_SHIFT,
    RW,
    LEAF_LEVEL,
    SIZE_1G,
    SIZE_2M,
    SW_PROTNONE,
    XD,
    Entry,
    P,
    PageTable,
    PagingError,
)
from migrate.sim.physmem import ORDER_1G, ORDER_2M, PAGE_SIZE, OutOfMemory

if TYPE_CHECKING:
    from migrate.sim.machine import Machine

PROT_NONE, PROT_READ, PROT_WRITE, PROT_EXEC = 0, 1, 2, 4
DEFAULT_PKRU = 0x5555_5554  # Linux init_pkru_value: every key but 0 access-disabled
STACK_INITIAL = 128 << 10  # fs/exec.c setup_arg_pages: stack_expand = 128 KiB
RLIMIT_STACK = 8 << 20


class KernelError(ValueError):
    """A system call got bad arguments (what Linux reports as EINVAL/ENOMEM/EEXIST...)."""

    def __init__(self, errno: str, message: str) -> None:
        super().__init__(f"{errno}: {message}")
        self.errno = errno


class Signal(Exception):
    """A signal delivered to the process: ``signo`` ("SIGSEGV"/"SIGBUS"), ``si_code``
    ("SEGV_MAPERR", "SEGV_ACCERR", "SEGV_PKUERR", "BUS_ADRERR"), ``address`` (si_addr) and the
    #PF ``error_code`` that led to it."""

    def __init__(self, signo: str, si_code: str, address: int, error_code: int,
                 reason: str = "", pkey: int | None = None) -> None:
        super().__init__(f"{signo} ({si_code}) at {address:#x}, #PF error code "
                         f"{error_code:#x}{': ' + reason if reason else ''}")
        self.signo = signo
        self.si_code = si_code
        self.address = address
        self.error_code = error_code
        self.reason = reason
        self.pkey = pkey


def parse_prot(prot: int | str) -> int:
    """``"rwx"``-style strings or PROT_* ints."""
    if isinstance(prot, int):
        if prot & ~7:
            raise KernelError("EINVAL", f"unknown PROT bits {prot:#x}")
        return prot
    if not isinstance(prot, str) or set(prot) - set("rwx-"):
        raise KernelError("EINVAL", f"prot must be PROT_* bits or a string of r/w/x, got "
                                    f"{prot!r}")
    return ((PROT_READ if "r" in prot else 0) | (PROT_WRITE if "w" in prot else 0)
            | (PROT_EXEC if "x" in prot else 0))


def prot_str(prot: int) -> str:
    return ("r" if prot & PROT_READ else "-") + ("w" if prot & PROT_WRITE else "-") + (
        "x" if prot & PROT_EXEC else "-")


@dataclass
class File:
    """A file with holes: ``extents`` hold data at byte offsets; everything else reads as zero.
    ``pages`` is its page cache (page index -> pfn)."""

    name: str
    size: int
    extents: dict[int, bytes] = field(default_factory=dict)
    pages: dict[int, int] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    written_blocks: set[int] = field(default_factory=set)  # holes filled through MAP_SHARED

    def page_has_data(self, index: int) -> bool:
        lo, hi = index * PAGE_SIZE, (index + 1) * PAGE_SIZE
        if index in self.written_blocks:
            return True
        return any(off < hi and off + len(data) > lo for off, data in self.extents.items())

    def page_bytes(self, index: int) -> bytes:
        lo = index * PAGE_SIZE
        buf = bytearray(PAGE_SIZE)
        for off, data in self.extents.items():
            start, end = max(off, lo), min(off + len(data), lo + PAGE_SIZE)
            if start < end:
                buf[start - lo:end - lo] = data[start - off:end - off]
        return bytes(buf)

    def allocated_blocks(self) -> int:
        """Pages backed by storage (like st_blocks / 8): holes count nothing."""
        return sum(1 for i in range((self.size + PAGE_SIZE - 1) // PAGE_SIZE)
                   if self.page_has_data(i))


@dataclass
class VMA:
    start: int
    end: int
    prot: int
    shared: bool = False
    file: File | None = None
    offset: int = 0
    name: str = ""
    growsdown: bool = False
    pkey: int = 0
    huge: int = 0  # page size of a huge-page mapping (2 MiB or 1 GiB), 0 for 4 KiB pages
    # userfaultfd-like missing-page handler: called with the faulting page's address, returns
    # the page's 4096 bytes (UFFDIO_COPY) or None (UFFDIO_ZEROPAGE). Anonymous private VMAs.
    userfault: Callable[[int], bytes | None] | None = None

    @property
    def anon(self) -> bool:
        return self.file is None

    def contains(self, addr: int) -> bool:
        return self.start <= addr < self.end

    def __repr__(self) -> str:
        kind = "s" if self.shared else "p"
        what = self.name or (self.file.name if self.file else "")
        return f"{self.start:012x}-{self.end:012x} {prot_str(self.prot)}{kind} {what}"


@dataclass
class FaultRecord:
    address: int
    error_code: int
    access: str  # read, write, fetch; "gup" for kernel-initiated faults (populate, poke)
    core: int  # -1 for kernel-initiated faults
    resolution: str  # zero-page, demand-zero, cow, reuse, file, file-hole, thp, spurious, segv...
    stack_grew: bool = False


@dataclass
class CoreState:
    """What the kernel knows about one core: who runs there, lazy-TLB mode, ASID slots."""

    current: Process | None = None
    loaded: Process | None = None  # mm in CR3 (kept in lazy mode)
    lazy: bool = False
    asids: list[tuple[int, int] | None] = field(default_factory=list)  # (pid, tlb_gen)
    next_asid: int = 0
    ipis_received: int = 0
    invlpgs: int = 0
    full_flushes: int = 0
    lazy_skips: int = 0
    switch_flushes: int = 0


class Process:
    """A process (one mm); threads are identified by the core they run on."""

    def __init__(self, kernel: Kernel, pid: int, name: str, layout: Layout) -> None:
        self.kernel = kernel
        self.pid = pid
        self.name = name
        self.layout = layout
        self.pt: PageTable = kernel.machine.new_page_table(owner=f"pt:{name}")
        self.vmas: list[VMA] = []
        self.fault_log: list[FaultRecord] = []
        self.tlb_gen = 0
        self.cpumask: set[int] = set()
        self.rss = 0  # pages mapping real frames (the zero page is not counted, as in Linux)
        self.pkru: dict[int, int] = {}  # per-thread PKRU, by core
        self.pkeys: set[int] = {0}
        self.home_core = 0
        self.brk_start = self.brk_end = layout.brk_start
        self.alive = True
        self._loader: Loader | None = None

    # ------------------------------------------------------------------ VMAs
    def find_vma(self, addr: int) -> VMA | None:
        i = bisect.bisect_right([v.start for v in self.vmas], addr) - 1
        if i >= 0 and self.vmas[i].contains(addr):
            return self.vmas[i]
        return None

    def _insert_vma(self, vma: VMA) -> None:
        starts = [v.start for v in self.vmas]
        self.vmas.insert(bisect.bisect_left(starts, vma.start), vma)

    def _overlaps(self, start: int, end: int) -> list[VMA]:
        return [v for v in self.vmas if v.start < end and start < v.end]

    def _split(self, addr: int) -> None:
        vma = self.find_vma(addr)
        if vma is None or vma.start == addr:
            return
        if vma.huge and addr % vma.huge:
            raise KernelError("EINVAL", f"cannot split a huge-page mapping at {addr:#x}")
        tail = VMA(addr, vma.end, vma.prot, vma.shared, vma.file,
                   vma.offset + (addr - vma.start), vma.name, vma.growsdown, vma.pkey, vma.huge,
                   vma.userfault)
        vma.end = addr
        self._insert_vma(tail)

    def maps(self) -> list[str]:
        """/proc/PID/maps-like lines."""
        return [repr(v) for v in self.vmas]

    def _occupied(self) -> list[tuple[int, int]]:
        """Mapped intervals, a stack's extended down by the guard gap (vm_start_gap)."""
        return sorted((v.start - (STACK_GUARD_GAP if v.growsdown else 0), v.end)
                      for v in self.vmas)

    def _free_range(self, length: int, hint: int | None) -> int:
        """Top-down search below mmap_base (arch_get_unmapped_area_topdown), honouring a hint
        when the hinted range is free."""
        occupied = self._occupied()
        if hint is not None:
            hint &= ~(PAGE_SIZE - 1)
            if (PAGE_SIZE * 16 <= hint and hint + length <= 1 << 47
                    and not any(lo < hint + length and hint < hi for lo, hi in occupied)):
                return hint
        end = self.layout.mmap_base
        for lo, hi in reversed(occupied):
            if lo >= end:
                continue
            if hi <= end - length:
                break
            end = lo
        if end - length < PAGE_SIZE * 16:
            raise KernelError("ENOMEM", "no free virtual range")
        return end - length

    # ------------------------------------------------------------------ system calls
    def mmap(self, addr: int | None, length: int, prot: int | str = "rw", *,
             shared: bool = False, file: File | str | None = None, offset: int = 0,
             fixed: bool = False, huge: bool | int = False, name: str = "",
             populate: bool = False, core: int | None = None) -> int:
        """mmap(2). ``addr`` is a hint unless ``fixed`` (MAP_FIXED replaces what is there).
        ``huge`` asks for 2 MiB pages (``True`` or ``SIZE_2M``, THP-like) or 1 GiB pages
        (``SIZE_1G``), falling back to 4 KiB pages when fragmentation leaves no such block."""
        if not isinstance(length, int) or length <= 0:
            raise KernelError("EINVAL", f"length must be positive, got {length!r}")
        if offset % PAGE_SIZE:
            raise KernelError("EINVAL", f"offset {offset:#x} is not page-aligned")
        prot_bits = parse_prot(prot)
        huge_size = SIZE_2M if huge is True else int(huge)
        if huge_size not in (0, SIZE_2M, SIZE_1G):
            raise KernelError("EINVAL", f"huge must be True, 2 MiB or 1 GiB, got {huge!r}")
        if huge_size and (shared or file is not None):
            raise KernelError("EINVAL", "huge pages are modelled for private anonymous memory")
        align = huge_size or PAGE_SIZE
        length = (length + align - 1) & ~(align - 1)
        if isinstance(file, str):
            if file not in self.kernel.files:
                raise KernelError("ENOENT", f"no file {file!r} (create_file it first)")
            file = self.kernel.files[file]
        if fixed:
            if addr is None or addr % align:
                raise KernelError("EINVAL", f"MAP_FIXED needs an aligned address, got {addr!r}")
            if addr + length > 1 << 47:
                raise KernelError("ENOMEM", "mapping beyond TASK_SIZE")
            self.munmap(addr, length, core=core)
            start = addr
        else:
            # Page colouring (migrate.sim.cache): shared mappings start on their offset's colour.
            picker = self.kernel.frame_picker if shared else None
            pad = (picker.colours - 1) * PAGE_SIZE if picker is not None else 0
            start = self._free_range(length + (align - PAGE_SIZE) + pad, addr)
            start = (start + align - 1) & ~(align - 1)
            if picker is not None:
                start = picker.align_address(start, picker.colour_of_pfn(offset // PAGE_SIZE))
        if shared and file is None:
            # MAP_SHARED|MAP_ANONYMOUS is shmem: an unnamed file, so fork shares its pages.
            file = self.kernel.create_file(f"shmem:{self.pid}:{start:#x}", length)
            name = name or "/dev/zero (deleted)"
        vma = VMA(start, start + length, prot_bits, shared, file, offset, name, huge=huge_size)
        self._insert_vma(vma)
        if populate:  # MAP_POPULATE: write-fault private writable memory, read-fault the rest
            write = bool(prot_bits & PROT_WRITE) and not shared
            step = huge_size or PAGE_SIZE
            for va in range(start, start + length, step):
                self.kernel.fault_in(self, va, write=write)
        return start

    def munmap(self, addr: int, length: int, *, core: int | None = None,
               shootdown: bool | None = None) -> None:
        if addr % PAGE_SIZE or length <= 0:
            raise KernelError("EINVAL", f"munmap({addr:#x}, {length:#x}) not page-aligned")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        if not self._overlaps(addr, end):
            return
        self._split(addr)
        self._split(end)
        victims = self._overlaps(addr, end)
        to_put: list[int] = []
        for vma in victims:
            for va, entry in list(self.pt.mappings(vma.start, vma.end,
                                                   include_protnone=True)):
                self.pt.unmap(va)
                self.kernel._rmap_remove(entry.pfn, self, va)
                to_put.append(entry.pfn)
                if entry.pfn != self.kernel.physmem.zero_frame:
                    self.rss -= entry.page_size // PAGE_SIZE
            self.vmas.remove(vma)
        # mmu_gather order: clear PTEs, flush TLBs everywhere, only then free the frames.
        self.kernel.flush_tlb_range(self, addr, end, core=self._core_id(core),
                                    shootdown=shootdown)
        for pfn in to_put:
            if pfn != self.kernel.physmem.zero_frame:
                self.kernel.physmem.put(pfn)

    def mprotect(self, addr: int, length: int, prot: int | str, *, core: int | None = None,
                 shootdown: bool | None = None, pkey: int | None = None) -> None:
        """mprotect(2) (pkey_mprotect(2) with ``pkey``): update VMAs and present PTEs, then
        flush the range on every core that may cache it."""
        if addr % PAGE_SIZE or length <= 0:
            raise KernelError("EINVAL", f"mprotect({addr:#x}, {length:#x}) not page-aligned")
        if pkey is not None and pkey not in self.pkeys:
            raise KernelError("EINVAL", f"protection key {pkey} is not allocated")
        end = addr + ((length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        prot_bits = parse_prot(prot)
        covered = sum(min(v.end, end) - max(v.start, addr) for v in self._overlaps(addr, end))
        if covered != end - addr:
            raise KernelError("ENOMEM", f"[{addr:#x}, {end:#x}) is not fully mapped")
        self._split(addr)
        self._split(end)
        for vma in self._overlaps(addr, end):
            vma.prot = prot_bits
            if pkey is not None:
                vma.pkey = pkey
            for va, entry in list(self.pt.mappings(vma.start, vma.end,
                                                   include_protnone=True)):
                self.kernel._set_leaf_rights(self, vma, va, entry)
        self.kernel.flush_tlb_range(self, addr, end, core=self._core_id(core),
                                    shootdown=shootdown)

    def brk(self, new_end: int | None = None) -> int:
        """brk(2): grow or shrink the heap VMA; returns the current break."""
        if new_end is None:
            return self.brk_end
        if new_end < self.brk_start:
            raise KernelError("EINVAL", "brk below the heap start")
        old_top = (self.brk_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        new_top = (new_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        heap = next((v for v in self.vmas if v.name == "[heap]"), None)
        if new_top > old_top:
            if self._overlaps(old_top, new_top):
                raise KernelError("ENOMEM", "heap would overlap another mapping")
            if heap is None:
                self._insert_vma(VMA(self.brk_start, new_top, PROT_READ | PROT_WRITE,
                                     name="[heap]"))
            else:
                heap.end = new_top
        elif new_top < old_top and heap is not None:
            self.munmap(new_top, old_top - new_top)
        self.brk_end = new_end
        return self.brk_end

    def fork(self, name: str | None = None) -> Process:
        return self.kernel.fork(self, name)

    def register_userfault(self, addr: int, length: int,
                           handler: Callable[[int], bytes | None]) -> None:
        """Register [addr, addr+length) (one private anonymous mapping) for missing-page
        faults, like UFFDIO_REGISTER with MODE_MISSING: every first touch of a page calls
        ``handler(page_address)``, whose bytes are installed in a fresh frame (post-copy
        demand paging). Resolution "userfault" in the fault log."""
        vma = self.find_vma(addr)
        if vma is None or vma.end < addr + length or not vma.anon or vma.shared:
            raise KernelError("EINVAL", "userfault needs one private anonymous mapping")
        self._split(addr & ~(PAGE_SIZE - 1))
        self._split((addr + length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        for v in self._overlaps(addr, addr + length):
            v.userfault = handler

    # ------------------------------------------------------------------ pkeys
    def pkey_alloc(self, access_rights: int = 0, *, core: int | None = None) -> int:
        """pkey_alloc(2): a free key 1..15; the calling thread's PKRU gets ``access_rights``
        (bit 0 PKEY_DISABLE_ACCESS, bit 1 PKEY_DISABLE_WRITE) for it."""
        for key in range(1, 16):
            if key not in self.pkeys:
                self.pkeys.add(key)
                self.pkey_set(key, access_rights, core=core)
                return key
        raise KernelError("ENOSPC", "no protection key left")

    def pkey_free(self, key: int) -> None:
        if key == 0 or key not in self.pkeys:
            raise KernelError("EINVAL", f"protection key {key} is not allocated")
        self.pkeys.discard(key)

    def pkey_mprotect(self, addr: int, length: int, prot: int | str, pkey: int, *,
                      core: int | None = None) -> None:
        self.mprotect(addr, length, prot, core=core, pkey=pkey)

    def pkey_set(self, key: int, access_rights: int, *, core: int | None = None) -> None:
        """glibc pkey_set: WRPKRU on the calling thread; no TLB flush, no IPI."""
        if not 0 <= key <= 15 or access_rights & ~3:
            raise KernelError("EINVAL", f"bad key {key} or rights {access_rights}")
        cid = self._core_id(core)
        value = self.pkru.get(cid, DEFAULT_PKRU)
        value = (value & ~(3 << (2 * key))) | (access_rights << (2 * key))
        self.pkru[cid] = value
        c = self.kernel.machine.cores[cid]
        if self.kernel.cores[cid].current is self:
            c.wrpkru(value)

    # ------------------------------------------------------------------ memory access
    def _core_id(self, core: int | None) -> int:
        cid = self.home_core if core is None else core
        if not 0 <= cid < len(self.kernel.machine.cores):
            raise KernelError("EINVAL", f"no core {cid}")
        return cid

    def _on_core(self, core: int | None) -> Core:
        cid = self._core_id(core)
        if not self.alive:
            raise KernelError("ESRCH", f"process {self.pid} has exited")
        if self.kernel.cores[cid].current is not self:
            self.kernel.switch_to(cid, self)
        c = self.kernel.machine.cores[cid]
        if c.cpl != 3:
            c.cpl = 3
        return c

    def _translate(self, c: Core, va: int, access: Access) -> int:
        for _ in range(8):
            try:
                return c.translate(va, access)
            except PageFault as fault:
                self.kernel.handle_fault(self, c, fault, access)
        raise RuntimeError(f"fault at {va:#x} not resolved after 8 attempts")

    def read(self, vaddr: int, n: int, *, core: int | None = None) -> bytes:
        """User-mode load of ``n`` bytes through the core's MMU; faults are handled by the
        kernel; an unresolvable one raises ``Signal``."""
        return self._access(vaddr, n, Access.READ, core)

    def execute(self, vaddr: int, n: int = 1, *, core: int | None = None) -> bytes:
        """User-mode instruction fetch of ``n`` bytes (NX and SMEP apply)."""
        return self._access(vaddr, n, Access.FETCH, core)

    def _access(self, vaddr: int, n: int, access: Access, core: int | None) -> bytes:
        c = self._on_core(core)
        mem = self.kernel.physmem
        out = bytearray()
        pos = 0
        while pos < n:
            va = vaddr + pos
            chunk = min(n - pos, PAGE_SIZE - (va & 0xFFF))
            out += mem.read(self._translate(c, va, access), chunk)
            pos += chunk
        return bytes(out)

    def write(self, vaddr: int, data: bytes, *, core: int | None = None) -> None:
        """User-mode store through the core's MMU (faults handled, ``Signal`` if fatal)."""
        c = self._on_core(core)
        mem = self.kernel.physmem
        pos = 0
        while pos < len(data):
            va = vaddr + pos
            chunk = min(len(data) - pos, PAGE_SIZE - (va & 0xFFF))
            mem.write(self._translate(c, va, Access.WRITE), data[pos:pos + chunk],
                      writer=c.name)
            pos += chunk

    def poke(self, vaddr: int, data: bytes) -> None:
        """A kernel write into this process's memory (like ptrace/ld.so's relocation with
        FOLL_FORCE): faults pages in, breaks COW, ignores the PTE's write permission."""
        pos = 0
        while pos < len(data):
            va = vaddr + pos
            chunk = min(len(data) - pos, PAGE_SIZE - (va & 0xFFF))
            paddr = self.kernel.fault_in(self, va, write=True)
            self.kernel.physmem.write(paddr, data[pos:pos + chunk], writer="kernel")
            pos += chunk

    # ------------------------------------------------------------------ introspection
    def rss_pages(self) -> int:
        return self.rss

    def translate(self, vaddr: int) -> int | None:
        """Software walk (no TLB, no fault): the physical address or None."""
        hit = self.pt.lookup(vaddr)
        return None if hit is None else hit[0]

    def frame_of(self, vaddr: int) -> int | None:
        paddr = self.translate(vaddr)
        return None if paddr is None else paddr >> 12

    def pte(self, vaddr: int) -> Entry | None:
        return self.pt.entry(vaddr)

    @property
    def loader(self) -> Loader:
        if self._loader is None:
            self._loader = Loader(self)
        return self._loader

    @property
    def stack_vma(self) -> VMA | None:
        return next((v for v in self.vmas if v.growsdown), None)

    def __repr__(self) -> str:
        return f"Process(pid={self.pid}, name={self.name!r}, vmas={len(self.vmas)}, rss={self.rss})"


class Kernel:
    """The OS above a ``Machine``: processes, files, the fault handler, shootdowns."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.physmem = machine.physmem
        cfg = machine.config
        self.rng = random.Random(cfg.seed)
        self.aslr = True
        self.shootdown = True
        self.flush_ceiling = cfg.tlb_flush_ceiling
        self.processes: dict[int, Process] = {}
        # Page colouring hook (Machine.set_page_colouring installs a cache.PageColouring).
        self.frame_picker: Any = None
        self.files: dict[str, File] = {}
        self._next_pid = 1
        self.cores = [CoreState(asids=[None] * cfg.dynamic_asids) for _ in machine.cores]
        self.rmap: dict[int, set[tuple[int, int]]] = {}
        self.stats = {"ipis": 0, "shootdowns": 0, "invlpg": 0, "full_flushes": 0,
                      "lazy_skips": 0, "skipped_remote": 0, "faults": 0, "cow_copies": 0,
                      "pages_transferred": 0}
        for core in machine.cores:
            with core.supervisor():
                core.cr4_pcide = cfg.pcide
                core.cr4_pke = True
        self.physmem.on_frame_moved(self._frame_moved)

    # ------------------------------------------------------------------ processes
    def spawn(self, name: str | None = None, *, core: int = 0,
              stack_size: int = STACK_INITIAL) -> Process:
        """A new process with a randomised layout and a stack VMA of ``stack_size`` below its
        randomised stack top (it grows down through faults)."""
        pid = self._next_pid
        self._next_pid += 1
        layout = Layout.randomize(self.rng if self.aslr else None)
        proc = Process(self, pid, name or f"proc{pid}", layout)
        proc.home_core = core
        top = layout.stack_top
        proc._insert_vma(VMA(top - stack_size, top, PROT_READ | PROT_WRITE, name="[stack]",
                             growsdown=True))
        self.processes[pid] = proc
        return proc

    def exit(self, proc: Process) -> None:
        """exit_mmap: unmap everything, take every core off the mm (flushing its PCID, as
        switching to init_mm would), forget its ASIDs, then free the page tables."""
        for vma in list(proc.vmas):
            proc.munmap(vma.start, vma.end - vma.start)
        for cid, cs in enumerate(self.cores):
            core = self.machine.cores[cid]
            slot = self._asid_slot(cid, proc)
            if cs.loaded is proc:
                with core.supervisor():
                    if core.cr4_pcide:
                        core.invpcid(1, pcid=core.pcid)
                    else:
                        core.invpcid(3)
                if cs.current is proc:
                    cs.current = None
                cs.loaded = None
                cs.lazy = False
                core.page_table = None
            if slot is not None:
                cs.asids[slot] = None
        proc.cpumask.clear()
        proc.alive = False
        proc.pt.destroy()
        del self.processes[proc.pid]

    def create_file(self, name: str, size: int,
                    data_extents: dict[int, bytes] | list[tuple[int, bytes]] | None = None
                    ) -> File:
        """A sparse file: ``data_extents`` maps byte offsets to data; the rest are holes."""
        if name in self.files:
            raise KernelError("EEXIST", f"file {name!r} exists")
        extents = dict(data_extents or {})
        for off, data in extents.items():
            if off < 0 or off + len(data) > size:
                raise KernelError("EINVAL", f"extent at {off:#x} beyond file size {size:#x}")
        f = File(name, size, extents)
        self.files[name] = f
        return f

    # ------------------------------------------------------------------ scheduling, ASIDs
    def switch_to(self, cid: int, proc: Process | None) -> None:
        """Run ``proc`` on core ``cid`` (switch_mm_irqs_off), or idle it (``None``: lazy TLB
        mode, the old mm stays in CR3)."""
        cs = self.cores[cid]
        core = self.machine.cores[cid]
        if proc is None:
            cs.current = None
            cs.lazy = cs.loaded is not None
            return
        prev = cs.loaded
        cs.current = proc
        cs.lazy = False
        if prev is proc:
            slot = self._asid_slot(cid, proc)
            held = cs.asids[slot] if slot is not None else None
            if held is not None and held[1] < proc.tlb_gen:
                # Lazy core coming back after shootdowns it skipped: flush now.
                self._flush_local(cid, proc, None)
                cs.switch_flushes += 1
        else:
            if prev is not None:
                prev.cpumask.discard(cid)
            slot = self._asid_slot(cid, proc)
            need_flush = True
            held = cs.asids[slot] if slot is not None else None
            if slot is not None and held is not None:
                need_flush = held[1] < proc.tlb_gen
            else:
                slot = cs.next_asid
                cs.next_asid = (cs.next_asid + 1) % len(cs.asids)
            cs.asids[slot] = (proc.pid, proc.tlb_gen)
            pcid = slot + 1 if core.cr4_pcide else 0
            with core.supervisor():
                core.load_cr3(proc.pt, pcid=pcid,
                              noflush=bool(core.cr4_pcide) and not need_flush)
            if need_flush:
                cs.switch_flushes += 1
            cs.loaded = proc
            proc.cpumask.add(cid)
        core.pkru = proc.pkru.get(cid, DEFAULT_PKRU)

    def _asid_slot(self, cid: int, proc: Process) -> int | None:
        for i, slot in enumerate(self.cores[cid].asids):
            if slot is not None and slot[0] == proc.pid:
                return i
        return None

    # ------------------------------------------------------------------ TLB shootdown
    def flush_tlb_range(self, proc: Process, start: int, end: int, *, core: int | None = None,
                        shootdown: bool | None = None) -> dict:
        """flush_tlb_mm_range: bump the mm's tlb_gen, flush locally, IPI every other core that
        has the mm loaded and is not lazy. Returns what was done."""
        proc.tlb_gen += 1
        do_remote = self.shootdown if shootdown is None else shootdown
        pages = (end - start + PAGE_SIZE - 1) // PAGE_SIZE
        full = pages > self.flush_ceiling
        self.stats["shootdowns"] += 1
        report: dict[str, Any] = {"pages": pages, "full": full, "ipis": [], "lazy_skipped": [],
                  "not_flushed": [], "local": None}
        for cid in sorted(proc.cpumask):
            cs = self.cores[cid]
            if cid == core and cs.loaded is proc:
                self._flush_local(cid, proc, None if full else (start, end))
                report["local"] = cid
            elif cs.lazy:
                cs.lazy_skips += 1
                self.stats["lazy_skips"] += 1
                report["lazy_skipped"].append(cid)
            elif not do_remote:
                self.stats["skipped_remote"] += 1
                report["not_flushed"].append(cid)
            else:
                cs.ipis_received += 1
                self.stats["ipis"] += 1
                report["ipis"].append(cid)
                self._flush_local(cid, proc, None if full else (start, end))
        return report

    def _flush_local(self, cid: int, proc: Process, rng: tuple[int, int] | None) -> None:
        cs = self.cores[cid]
        core = self.machine.cores[cid]
        with core.supervisor():
            if rng is None:
                if core.cr4_pcide:
                    core.invpcid(1, pcid=core.pcid)
                else:
                    core.load_cr3(proc.pt)
                cs.full_flushes += 1
                self.stats["full_flushes"] += 1
            else:
                for va in range(rng[0], rng[1], PAGE_SIZE):
                    core.invlpg(va)
                    cs.invlpgs += 1
                    self.stats["invlpg"] += 1
        slot = self._asid_slot(cid, proc)
        if slot is not None:
            cs.asids[slot] = (proc.pid, proc.tlb_gen)

    # ------------------------------------------------------------------ rmap, compaction
    def _rmap_add(self, pfn: int, proc: Process, va: int) -> None:
        if pfn != self.physmem.zero_frame:
            self.rmap.setdefault(pfn, set()).add((proc.pid, va))

    def _rmap_remove(self, pfn: int, proc: Process, va: int) -> None:
        users = self.rmap.get(pfn)
        if users is not None:
            users.discard((proc.pid, va))
            if not users:
                del self.rmap[pfn]

    def _frame_moved(self, old: int, new: int) -> None:
        """Compaction moved a frame: repoint every PTE (found through the rmap) and the page
        cache, then flush those translations (migration's try_to_migrate + remove_migration_ptes).
        """
        for pid, va in self.rmap.pop(old, set()):
            proc = self.processes.get(pid)
            if proc is None:
                continue
            entry = proc.pt.entry(va)
            if entry is None:
                continue
            mask = ((1 << proc.pt.maxphyaddr) - 1) & ~0xFFF
            proc.pt.set_raw(va, entry.level, (entry.raw & ~mask) | (new << 12))
            self.rmap.setdefault(new, set()).add((pid, va))
            self.flush_tlb_range(proc, va, va + PAGE_SIZE, core=None)
        for f in self.files.values():
            for idx, pfn in f.pages.items():
                if pfn == old:
                    f.pages[idx] = new

    # ------------------------------------------------------------------ fault handling
    def _set_leaf_rights(self, proc: Process, vma: VMA, va: int, entry: Entry) -> None:
        """Rewrite a leaf's R/W, XD, key and presence from its VMA (change_pte_range)."""
        raw = (entry.raw | P) & ~SW_PROTNONE
        raw &= ~(RW | XD | PKEY_MASK)
        if self._pte_writable(vma, entry.pfn):
            raw |= RW
        if not vma.prot & PROT_EXEC:
            raw |= XD
        raw |= vma.pkey << PKEY_SHIFT
        if vma.prot == PROT_NONE:
            raw = (raw & ~P) | SW_PROTNONE  # not present; the frame stays recorded
        proc.pt.set_raw(va, entry.level, raw)

    def _pte_writable(self, vma: VMA, pfn: int) -> bool:
        """Writable in the PTE only if the VMA allows writes and the page is not shared COW:
        shared mappings, or an exclusive anonymous page (Linux keeps COW pages read-only)."""
        if not vma.prot & PROT_WRITE or pfn == self.physmem.zero_frame:
            return False
        if vma.shared:
            return True
        frame = self.physmem.frame(pfn)
        return frame.kind == "anon" and frame.refcount == 1

    def _install(self, proc: Process, vma: VMA, va: int, pfn: int, *, writable: bool,
                 size: int = PAGE_SIZE, replace: bool = False) -> None:
        proc.pt.map(va, pfn << 12, size, writable=writable, user=True,
                    nx=not vma.prot & PROT_EXEC, pkey=vma.pkey, replace=replace)
        self._rmap_add(pfn, proc, va)
        if pfn != self.physmem.zero_frame:
            proc.rss += size // PAGE_SIZE

    def _replace(self, proc: Process, vma: VMA, va: int, old_pfn: int, new_pfn: int,
                 core: int | None) -> None:
        """Point a PTE at a new frame: clear, flush everywhere (ptep_clear_flush), install."""
        proc.pt.unmap(va)
        self._rmap_remove(old_pfn, proc, va)
        if old_pfn != self.physmem.zero_frame:
            proc.rss -= 1
        self.flush_tlb_range(proc, va, va + PAGE_SIZE, core=core)
        self._install(proc, vma, va, new_pfn, writable=self._pte_writable(vma, new_pfn))
        if old_pfn != self.physmem.zero_frame:
            self.physmem.put(old_pfn)

    def _new_anon(self, proc: Process, vma: VMA, order: int = 0) -> int:
        pfn = self.physmem.alloc(order, owner=f"{proc.name}:{vma.name or 'anon'}", kind="anon")
        assert isinstance(pfn, int)
        return pfn

    def _page_cache(self, f: File, index: int) -> int:
        pfn = f.pages.get(index)
        if pfn is None:
            if self.frame_picker is not None:     # page colouring: colour = file page index
                pfn = self.frame_picker.pick(index % self.frame_picker.colours,
                                             owner=f"pagecache:{f.name}", kind="pagecache")
            else:
                pfn = self.physmem.alloc(0, owner=f"pagecache:{f.name}", kind="pagecache")
            assert isinstance(pfn, int)
            if f.page_has_data(index):
                self.physmem.write(pfn << 12, f.page_bytes(index), writer="kernel")
            f.pages[index] = pfn
        return pfn

    def handle_fault(self, proc: Process, core: Core, fault: PageFault,
                     access: Access) -> str:
        """do_user_addr_fault: resolve ``fault`` or raise ``Signal``. Returns the resolution."""
        self.stats["faults"] += 1
        addr, code = fault.address, fault.error_code
        record = FaultRecord(addr, code, access.name.lower(), core.id, "")
        proc.fault_log.append(record)

        def deliver(signo: str, si_code: str, reason: str, pkey: int | None = None) -> NoReturn:
            record.resolution = {"SIGBUS": "sigbus", "SIGKILL": "sigkill"}.get(
                signo, "pkuerr" if si_code == "SEGV_PKUERR" else "segv")
            raise Signal(signo, si_code, addr, code, reason, pkey)

        if code & PF_RSVD:
            # arch/x86/mm/fault.c pgtable_bad(): a corrupted page table kills the task.
            deliver("SIGKILL", "SI_KERNEL", "reserved bit in a page-table entry (pgtable_bad)")
        vma = proc.find_vma(addr)
        if vma is None:
            vma = self._expand_stack(proc, addr)
            if vma is None:
                deliver("SIGSEGV", "SEGV_MAPERR", "no mapping")
            record.stack_grew = True
        # access_error() in arch/x86/mm/fault.c
        if code & PF_PK:
            entry = proc.pt.entry(addr)
            deliver("SIGSEGV", "SEGV_PKUERR", "protection key",
                    pkey=entry.pkey if entry else vma.pkey)
        if code & PF_WR:
            if not vma.prot & PROT_WRITE:
                deliver("SIGSEGV", "SEGV_ACCERR", "write to a non-writable mapping")
        elif code & PF_P:
            # A read/fetch protection fault on a present page (NX, PROT_NONE kept present...):
            # unless the PTE now allows it (stale TLB), it is an error.
            entry = proc.pt.entry(addr)
            if entry is None or not self._spurious(entry, access):
                deliver("SIGSEGV", "SEGV_ACCERR",
                        "execute from a non-executable page" if access == Access.FETCH
                        else "access not allowed")
        if vma.prot == PROT_NONE:
            deliver("SIGSEGV", "SEGV_ACCERR", "PROT_NONE mapping")
        resolution = self._handle_mm_fault(proc, vma, addr, access, core.id)
        record.resolution = "stack-grow" if record.stack_grew and resolution in (
            "zero-page", "demand-zero") else resolution
        return record.resolution

    @staticmethod
    def _spurious(entry: Entry, access: Access) -> bool:
        if access == Access.FETCH:
            return entry.present and not entry.nx and entry.user
        return entry.present and entry.user

    def _expand_stack(self, proc: Process, addr: int) -> VMA | None:
        """expand_downwards: grow the stack VMA down to ``addr`` unless that comes within
        stack_guard_gap (256 pages) of the mapping below, or beyond RLIMIT_STACK."""
        stack = proc.stack_vma
        if stack is None or addr >= stack.start:
            return None
        new_start = addr & ~(PAGE_SIZE - 1)
        if stack.end - new_start > RLIMIT_STACK:
            return None
        below = [v for v in proc.vmas if v.end <= stack.start and v is not stack]
        prev = max(below, key=lambda v: v.end, default=None)
        if prev is not None and prev.prot != PROT_NONE and new_start - prev.end < STACK_GUARD_GAP:
            return None
        if prev is not None and new_start < prev.end:
            return None
        stack.start = new_start
        return stack

    def _handle_mm_fault(self, proc: Process, vma: VMA, addr: int, access: Access,
                         cid: int) -> str:
        va = addr & ~(PAGE_SIZE - 1)
        hit = proc.pt.lookup(va)
        if hit is None or not hit[1].present:
            return self._fault_not_present(proc, vma, addr, access, cid)
        entry = hit[1]
        if access == Access.WRITE and not entry.writable:
            return self._wp_fault(proc, vma, va, entry, cid)
        return "spurious"  # the PTE already allows it: a stale TLB entry caused the fault

    def _fault_not_present(self, proc: Process, vma: VMA, addr: int, access: Access,
                           cid: int) -> str:
        va = addr & ~(PAGE_SIZE - 1)
        write = access == Access.WRITE
        zero = self.physmem.zero_frame
        if vma.anon and vma.userfault is not None:
            content = vma.userfault(va)
            if content is not None and len(content) != PAGE_SIZE:
                raise KernelError("EINVAL", f"userfault handler returned {len(content)} bytes")
            pfn = self._new_anon(proc, vma)
            if content is not None:
                self.physmem.write(pfn << 12, content, writer="kernel")
            self._install(proc, vma, va, pfn, writable=self._pte_writable(vma, pfn))
            return "userfault"
        if vma.anon:
            if vma.huge:
                size = vma.huge
                base = addr & ~(size - 1)
                last = proc.pt.entries(base)[-1]
                slot_free = not last.entry.present and last.level >= LEAF_LEVEL[size]
                if vma.start <= base and base + size <= vma.end and slot_free:
                    try:
                        pfn = self._new_anon(proc, vma, ORDER_2M if size == SIZE_2M else ORDER_1G)
                    except OutOfMemory:
                        # Fragmentation: no order-9 block. THP falls back to a 4 KiB page.
                        pfn = self._new_anon(proc, vma)
                        self._install(proc, vma, va, pfn, writable=self._pte_writable(vma, pfn))
                        return "thp-fallback"
                    else:
                        self._install(proc, vma, base, pfn, writable=bool(
                            vma.prot & PROT_WRITE), size=size)
                        return "thp" if size == SIZE_2M else "huge-1g"
            if not write:
                self._install(proc, vma, va, zero, writable=False)
                return "zero-page"
            pfn = self._new_anon(proc, vma)
            self._install(proc, vma, va, pfn, writable=self._pte_writable(vma, pfn))
            return "demand-zero"
        f = vma.file
        assert f is not None
        index = (va - vma.start + vma.offset) // PAGE_SIZE
        if index * PAGE_SIZE >= f.size:
            proc.fault_log[-1].resolution = "sigbus"
            raise Signal("SIGBUS", "BUS_ADRERR", addr, proc.fault_log[-1].error_code,
                         f"beyond end of file {f.name} ({f.size} bytes)")
        hole = index not in f.pages and not f.page_has_data(index)
        if hole and not (write and vma.shared):
            if not write:
                self._install(proc, vma, va, zero, writable=False)
                return "file-hole"
            pfn = self._new_anon(proc, vma)  # private write into a hole: a zeroed COW page
            self._install(proc, vma, va, pfn, writable=self._pte_writable(vma, pfn))
            self.stats["cow_copies"] += 1
            return "cow"
        cache_pfn = self._page_cache(f, index)
        if write and not vma.shared:
            pfn = self._new_anon(proc, vma)
            self.physmem.copy_frame(cache_pfn, pfn, writer="kernel")
            self._install(proc, vma, va, pfn, writable=self._pte_writable(vma, pfn))
            self.stats["cow_copies"] += 1
            return "cow"
        self.physmem.get(cache_pfn)
        if write and vma.shared:
            f.dirty.add(index)
            if hole:
                f.written_blocks.add(index)
        self._install(proc, vma, va, cache_pfn,
                      writable=vma.shared and bool(vma.prot & PROT_WRITE))
        return "file"

    def _wp_fault(self, proc: Process, vma: VMA, va: int, entry: Entry, cid: int) -> str:
        """do_wp_page: write to a present read-only page in a writable VMA."""
        old = entry.pfn
        zero = self.physmem.zero_frame
        if vma.shared:
            f = vma.file
            if old == zero and f is not None:
                index = (va - vma.start + vma.offset) // PAGE_SIZE
                cache_pfn = self._page_cache(f, index)
                self.physmem.get(cache_pfn)
                f.written_blocks.add(index)
                f.dirty.add(index)
                self._replace(proc, vma, va, old, cache_pfn, cid)
                return "file"
            proc.pt.protect(va, writable=True)
            if f is not None:
                f.dirty.add((va - vma.start + vma.offset) // PAGE_SIZE)
            return "write-notify"
        if old == zero:
            new = self._new_anon(proc, vma)
            self._replace(proc, vma, va, old, new, cid)
            self.stats["cow_copies"] += 1
            return "cow"
        frame = self.physmem.frame(old)
        if frame.kind == "anon" and frame.refcount == 1:
            proc.pt.protect(va, writable=True)  # wp_page_reuse: upgrade, no flush needed
            return "reuse"
        new = self._new_anon(proc, vma)
        self.physmem.copy_frame(old, new, writer="kernel")
        self._replace(proc, vma, va, old, new, cid)
        self.stats["cow_copies"] += 1
        return "cow"

    def fault_in(self, proc: Process, vaddr: int, *, write: bool) -> int:
        """get_user_pages(FOLL_FORCE)-like: make ``vaddr`` present (a private copy if
        ``write``, breaking COW) without the MMU or the PTE's permissions, as ptrace and the
        loader's relocation writes do. Returns the physical address."""
        vma = proc.find_vma(vaddr) or self._expand_stack(proc, vaddr)
        if vma is None or vma.prot == PROT_NONE:
            raise KernelError("EFAULT", f"{vaddr:#x} is not mapped accessibly")
        va = vaddr & ~(PAGE_SIZE - 1)
        hit = proc.pt.lookup(vaddr)
        record = FaultRecord(vaddr, PF_WR if write else 0, "gup", -1, "")
        if hit is None:
            proc.fault_log.append(record)
            record.resolution = self._fault_not_present(
                proc, vma, vaddr, Access.WRITE if write else Access.READ, proc.home_core)
        elif write and not hit[1].writable and not vma.shared:
            proc.fault_log.append(record)
            record.error_code |= PF_P
            saved = vma.prot
            vma.prot |= PROT_WRITE  # FOLL_FORCE: break COW as if the mapping were writable
            try:
                record.resolution = self._wp_fault(proc, vma, va, hit[1], proc.home_core)
            finally:
                vma.prot = saved
            leaf = proc.pt.leaf(va)
            assert leaf is not None
            self._set_leaf_rights(proc, vma, va & ~(leaf.page_size - 1), leaf)
        paddr = proc.translate(vaddr)
        assert paddr is not None
        return paddr

    # ------------------------------------------------------------------ fork, IPC
    def fork(self, parent: Process, name: str | None = None) -> Process:
        """fork(2): copy the VMAs; share every frame, write-protecting private ones in both
        processes (COW); then flush the parent's TLBs (dup_mmap's flush)."""
        child = self.spawn(name or f"{parent.name}-child", core=parent.home_core)
        child.vmas = []
        child.layout = parent.layout
        child.brk_start, child.brk_end = parent.brk_start, parent.brk_end
        child.pkeys = set(parent.pkeys)
        child.pkru = dict(parent.pkru)
        zero = self.physmem.zero_frame
        for vma in parent.vmas:
            cv = VMA(vma.start, vma.end, vma.prot, vma.shared, vma.file, vma.offset, vma.name,
                     vma.growsdown, vma.pkey, vma.huge, vma.userfault)
            child._insert_vma(cv)
            for va, entry in list(parent.pt.mappings(vma.start, vma.end,
                                                     include_protnone=True)):
                pfn = entry.pfn
                if entry.huge and not vma.shared:
                    # Private huge pages are copied at fork (no huge-page COW in this model).
                    order = ORDER_2M if entry.page_size == SIZE_2M else ORDER_1G
                    new = self._new_anon(child, cv, order)
                    for i in range(1 << order):
                        if self.physmem.is_materialised(pfn + i):
                            self.physmem.copy_frame(pfn + i, new + i, writer="kernel")
                    self._install(child, cv, va, new, writable=bool(cv.prot & PROT_WRITE),
                                  size=entry.page_size)
                    continue
                if pfn != zero:
                    self.physmem.get(pfn)
                raw = entry.raw
                if raw & RW and not vma.shared:  # COW: read-only in both
                    raw &= ~RW
                    parent.pt.set_raw(va, entry.level, raw)
                child.pt.map(va, pfn << 12, entry.page_size)  # builds the tables
                child.pt.set_raw(va, entry.level, raw)
                self._rmap_add(pfn, child, va)
                if pfn != zero:
                    child.rss += entry.page_size // PAGE_SIZE
        self.flush_tlb_range(parent, 0, 1 << 47, core=parent.home_core)
        return child

    def transfer_pages(self, src: Process, src_addr: int, dst: Process, dst_addr: int,
                       length: int, *, core: int | None = None) -> list[int]:
        """Zero-copy IPC: move the frames behind [src_addr, +length) of ``src`` into ``dst`` at
        ``dst_addr`` by rewriting PTEs (like vmsplice/mremap across processes). Nothing is
        copied; the source range becomes unmapped-but-valid (faults read zeros again). Returns
        the pfns moved, in order."""
        if src_addr % PAGE_SIZE or dst_addr % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise KernelError("EINVAL", "transfer_pages needs page-aligned addresses and length")
        dvma = dst.find_vma(dst_addr)
        if dvma is None or dvma.end < dst_addr + length or not dvma.anon or dvma.shared:
            raise KernelError("EFAULT", "destination must be one private anonymous mapping")
        svma = src.find_vma(src_addr)
        if svma is None or svma.end < src_addr + length or not svma.anon:
            raise KernelError("EFAULT", "source must be one anonymous mapping")
        moved: list[int] = []
        for off in range(0, length, PAGE_SIZE):
            s_entry = src.pt.entry(src_addr + off)
            if s_entry is None or s_entry.pfn == self.physmem.zero_frame or s_entry.huge:
                raise KernelError("EFAULT", f"source page {src_addr + off:#x} has no private "
                                            "4 KiB frame to move")
            if self.physmem.frame(s_entry.pfn).refcount != 1:
                raise KernelError("EBUSY", f"source page {src_addr + off:#x} is shared (COW)")
        for off in range(0, length, PAGE_SIZE):
            d_entry = dst.pt.entry(dst_addr + off)
            if d_entry is not None:
                dst.pt.unmap(dst_addr + off)
                self._rmap_remove(d_entry.pfn, dst, dst_addr + off)
                if d_entry.pfn != self.physmem.zero_frame:
                    dst.rss -= 1
                    self.physmem.put(d_entry.pfn)
        self.flush_tlb_range(dst, dst_addr, dst_addr + length, core=None)
        for off in range(0, length, PAGE_SIZE):
            entry = src.pt.unmap(src_addr + off)
            self._rmap_remove(entry.pfn, src, src_addr + off)
            src.rss -= 1
            moved.append(entry.pfn)
        self.flush_tlb_range(src, src_addr, src_addr + length, core=src.home_core)
        for off, pfn in zip(range(0, length, PAGE_SIZE), moved, strict=True):
            self.physmem.frame(pfn).owner = f"{dst.name}:{dvma.name or 'anon'}"
            self._install(dst, dvma, dst_addr + off, pfn,
                          writable=bool(dvma.prot & PROT_WRITE))
        self.stats["pages_transferred"] += len(moved)
        return moved

    # ------------------------------------------------------------------ reporting
    def core_stats(self) -> list[dict]:
        return [{"core": i, "current": cs.current.pid if cs.current else None,
                 "loaded": cs.loaded.pid if cs.loaded else None, "lazy": cs.lazy,
                 "ipis_received": cs.ipis_received, "invlpg": cs.invlpgs,
                 "full_flushes": cs.full_flushes, "lazy_skips": cs.lazy_skips,
                 "switch_flushes": cs.switch_flushes}
                for i, cs in enumerate(self.cores)]


__all__ = [
    "DEFAULT_PKRU",
    "PKEY_SHIFT",
    "PROT_EXEC",
    "PROT_NONE",
    "PROT_READ",
    "PROT_WRITE",
    "VMA",
    "CoreState",
    "FaultRecord",
    "File",
    "Kernel",
    "KernelError",
    "PagingError",
    "Process",
    "Signal",
]
