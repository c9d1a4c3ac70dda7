"""A simulated x86-64 core: control registers, linear-address translation, #PF and #GP.

Authority: Intel SDM vol. 3A chapter 4 (4.5 paging modes, 4.6 access rights, 4.7 page-fault
error code, 4.8 accessed/dirty flags, 4.10 TLBs and paging-structure caches) and 6.15 (#PF).

Hot path: a data access that hits the L1 DTLB for a 4 KiB page costs one canonical check, one dict
probe and one table lookup. Access rights are checked from the rights cached in the TLB entry
(SDM 4.10.2.2), through a permission table precomputed from the current CR0/CR4/EFER/CPL/AC/PKRU
(recomputed, or fetched from a memo, whenever one of them changes).
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import IntEnum
from typing import TYPE_CHECKING, cast

from migrate.sim.paging import (
    PageTable,
    PagingError,
    address_mask,
    is_canonical,
    reserved_mask,
)
from migrate.sim.physmem import PhysicalMemory
from migrate.sim.tlb import R_D, R_G, R_PKEY_SHIFT, R_U, R_W, R_XD, TLB, TLBConfig

if TYPE_CHECKING:
    from collections.abc import Iterator


class Access(IntEnum):
    READ = 0
    WRITE = 1
    FETCH = 2


# Page-fault error code bits (SDM 4.7, figure 4-12).
PF_P = 1 << 0  # 0: non-present page; 1: protection violation (or reserved bit)
PF_WR = 1 << 1  # the access was a write
PF_US = 1 << 2  # the access was a user-mode access
PF_RSVD = 1 << 3  # a reserved bit was set in some paging-structure entry
PF_ID = 1 << 4  # instruction fetch (only when EFER.NXE=1 or CR4.SMEP=1)
PF_PK = 1 << 5  # protection-key violation
PF_SS = 1 << 6  # shadow-stack access (not modelled)
PF_SGX = 1 << 15  # SGX access-control violation (not modelled)
_PF_NAMES = ((PF_P, "P"), (PF_WR, "W/R"), (PF_US, "U/S"), (PF_RSVD, "RSVD"), (PF_ID, "I/D"),
             (PF_PK, "PK"), (PF_SS, "SS"), (PF_SGX, "SGX"))


class CPUException(Exception):
    """An architectural exception raised by the simulated core."""


class PageFault(CPUException):
    """#PF (vector 14, SDM 6.15): ``address`` is what CR2 receives, ``error_code`` the pushed
    error code (bits in ``PF_*``)."""

    vector = 14

    def __init__(self, address: int, error_code: int, reason: str = "") -> None:
        self.address = address
        self.error_code = error_code
        self.reason = reason
        super().__init__(f"#PF at {address:#x}, error code {error_code:#x} "
                         f"[{' '.join(self.bits()) or 'not-present read, supervisor'}]"
                         + (f": {reason}" if reason else ""))

    def bits(self) -> list[str]:
        return [name for bit, name in _PF_NAMES if self.error_code & bit]

    present = property(lambda self: bool(self.error_code & PF_P))
    write = property(lambda self: bool(self.error_code & PF_WR))
    user = property(lambda self: bool(self.error_code & PF_US))
    rsvd = property(lambda self: bool(self.error_code & PF_RSVD))
    fetch = property(lambda self: bool(self.error_code & PF_ID))
    pk = property(lambda self: bool(self.error_code & PF_PK))


class GeneralProtection(CPUException):
    """#GP(0): non-canonical address, privileged instruction at CPL>0, invalid operand."""

    vector = 13

    def __init__(self, reason: str) -> None:
        super().__init__(f"#GP(0): {reason}")
        self.reason = reason


class InvalidOpcode(CPUException):
    """#UD: e.g. WRPKRU with CR4.PKE=0."""

    vector = 6


def access_error_code(rights: int, access: int, *, user_mode: bool, implicit: bool, wp: bool,
                      nxe: bool, smep: bool, smap: bool, pke: bool, ac: bool, pkru: int) -> int:
    """0 if the access is allowed by the combined ``rights`` (``R_*`` bits), else the #PF error
    code. A literal transcription of SDM 4.6.1 (determination of access rights), 4.6.2
    (protection keys) and 4.7 (error code), for IA-32e paging (EFER.LMA=1)."""
    w = bool(rights & R_W)
    user_address = bool(rights & R_U)
    xd = nxe and bool(rights & R_XD)
    write = access == Access.WRITE
    fetch = access == Access.FETCH
    if user_mode:  # CPL=3 and not an implicit supervisor access
        if not user_address:
            allowed = False  # user-mode accesses only reach user-mode addresses
        elif fetch:
            allowed = not xd
        else:
            allowed = w or not write  # CR0.WP does not matter for user-mode writes
    elif fetch:
        if user_address and smep:
            allowed = False
        else:
            allowed = not xd
    else:  # supervisor-mode data access
        if user_address and smap and (implicit or not ac) or write and wp and not w:
            allowed = False
        else:
            allowed = True
    pk = False
    if pke and user_address and not fetch:  # keys govern data accesses to user-mode addresses
        key = (rights >> R_PKEY_SHIFT) & 0xF
        access_disable = (pkru >> (2 * key)) & 1
        write_disable = (pkru >> (2 * key + 1)) & 1
        if access_disable or (write_disable and write and (wp or user_mode)):
            pk = True
            allowed = False
    if allowed:
        return 0
    code = PF_P
    if write:
        code |= PF_WR
    if user_mode:
        code |= PF_US
    if fetch and (nxe or smep):
        code |= PF_ID
    if pk:
        code |= PF_PK
    return code


_PERM_MEMO: dict[tuple, tuple[tuple[list[int], ...], tuple[list[int], ...]]] = {}
NEEDS_DIRTY = -1  # permission-table value: allowed, but the cached entry lacks D (SDM 4.8)


def _permission_tables(key: tuple) -> tuple[tuple[list[int], ...], tuple[list[int], ...]]:
    tables = _PERM_MEMO.get(key)
    if tables is not None:
        return tables
    user_cpl, wp, nxe, smep, smap, pke, ac, pkru = key

    def build(implicit: bool) -> tuple[list[int], ...]:
        out = []
        for access in (Access.READ, Access.WRITE, Access.FETCH):
            table = []
            for rights in range(256):
                code = access_error_code(rights, access, user_mode=user_cpl and not implicit,
                                         implicit=implicit, wp=wp, nxe=nxe, smep=smep, smap=smap,
                                         pke=pke, ac=ac, pkru=pkru)
                if code == 0 and access == Access.WRITE and not rights & R_D:
                    code = NEEDS_DIRTY
                table.append(code)
            out.append(table)
        return tuple(out)

    tables = (build(False), build(True))
    if len(_PERM_MEMO) > 4096:
        _PERM_MEMO.clear()
    _PERM_MEMO[key] = tables
    return tables


def _register(name: str, doc: str, on_change: str = "_modes_changed"):
    attr = "_" + name

    def get(self: Core):
        return getattr(self, attr)

    def set_(self: Core, value) -> None:
        old = getattr(self, attr)
        setattr(self, attr, value)
        getattr(self, on_change)(name, old, value)

    return property(get, set_, doc=doc)


class Core:
    """One logical processor in 64-bit mode with paging on (CR0.PG=1, CR4.PAE=1, EFER.LMA=1)."""

    cr0_wp = _register("cr0_wp", "CR0.WP: supervisor writes honour R/W")
    efer_nxe = _register("efer_nxe", "IA32_EFER.NXE: XD bit enabled (else reserved)")
    cr4_smep = _register("cr4_smep", "CR4.SMEP: no supervisor fetch from user pages",
                         "_cr4_changed")
    cr4_smap = _register("cr4_smap", "CR4.SMAP: no supervisor data access to user pages")
    cr4_pke = _register("cr4_pke", "CR4.PKE: protection keys for user pages")
    cr4_pge = _register("cr4_pge", "CR4.PGE: global pages", "_cr4_changed")
    cr4_pcide = _register("cr4_pcide", "CR4.PCIDE: process-context identifiers",
                          "_cr4_changed")
    cr4_la57 = _register("cr4_la57", "CR4.LA57: 5-level paging", "_cr4_changed")
    cpl = _register("cpl", "current privilege level (0..3)")
    ac = _register("ac", "EFLAGS.AC: with SMAP, explicit supervisor access to user pages")
    pkru = _register("pkru", "PKRU: AD (bit 2i) and WD (bit 2i+1) per protection key")

    def __init__(self, core_id: int, physmem: PhysicalMemory, *,
                 tlb_config: TLBConfig | None = None, maxphyaddr: int = 46) -> None:
        self.id = core_id
        self.name = f"cpu{core_id}"
        self.physmem = physmem
        self.maxphyaddr = maxphyaddr
        self.tlb = TLB(tlb_config)
        # Registers (Linux-like defaults: WP, NXE, PGE, SMEP, SMAP on; PCIDE off until asked).
        self._cr0_wp = True
        self._efer_nxe = True
        self._cr4_smep = True
        self._cr4_smap = True
        self._cr4_pke = False
        self._cr4_pge = True
        self._cr4_pcide = False
        self._cr4_la57 = False
        self._cpl = 0
        self._ac = False
        self._pkru = 0
        self.page_table: PageTable | None = None
        self._root = 0
        self._pcid = 0
        self._levels = 4
        self._addr_mask = address_mask(maxphyaddr)
        self._data = physmem._data  # frame storage, read directly by the walker
        self._l1 = self.tlb.l1d_4k
        self._l1_sets = self.tlb.l1d_4k.sets
        self._l1_mask = self.tlb.l1d_4k.mask
        self._l1_stats = self.tlb.l1d_4k.stats
        self.counters = {"cr3_loads": 0, "invlpg": 0, "invpcid": 0, "page_faults": 0,
                         "gp_faults": 0}
        self._modes_changed("init", None, None)

    # ---------------------------------------------------------------- register side effects
    def _modes_changed(self, name: str, old: object, new: object) -> None:
        if name == "cpl" and new not in (0, 1, 2, 3):
            self._cpl = cast(int, old)
            raise GeneralProtection(f"CPL must be 0..3, got {new!r}")
        if name == "pkru" and not (isinstance(new, int) and 0 <= new < 1 << 32):
            self._pkru = cast(int, old)
            raise ValueError(f"PKRU is a 32-bit register, got {new!r}")
        key = (self._cpl == 3, bool(self._cr0_wp), bool(self._efer_nxe), bool(self._cr4_smep),
               bool(self._cr4_smap), bool(self._cr4_pke), bool(self._ac),
               self._pkru if self._cr4_pke else 0)
        self._perm, self._perm_implicit = _permission_tables(key)
        self._perm_data = {0: self._perm[0], 1: self._perm[1]}
        nxe = bool(self._efer_nxe)
        m = self.maxphyaddr
        self._rsvd = [(0, 0)] + [(reserved_mask(lv, False, m, nxe), reserved_mask(lv, True, m, nxe))
                                 for lv in range(1, 6)]
        la57 = bool(self._cr4_la57)
        self._canon_shift = 56 if la57 else 47
        self._canon_hi = (1 << (64 - self._canon_shift)) - 1

    def _cr4_changed(self, name: str, old: object, new: object) -> None:
        old_b, new_b = bool(old), bool(new)
        if old_b != new_b:
            # SDM 4.10.4.1, MOV to CR4.
            if name == "cr4_pcide" and new_b and self._pcid != 0:
                self._cr4_pcide = cast(bool, old)
                raise GeneralProtection("setting CR4.PCIDE requires CR3[11:0] = 0")
            if name == "cr4_la57" and self.page_table is not None:
                self._cr4_la57 = cast(bool, old)
                raise GeneralProtection("CR4.LA57 cannot change while paging is enabled")
            if name == "cr4_pge" or (name == "cr4_pcide" and not new_b) or name == "cr4_la57":
                self.tlb.flush_pcid(None, keep_global=False)
                self.tlb.flush_pscs(None)
                if name == "cr4_pcide":
                    self._pcid = 0  # CR3[11:0] are PWT/PCD again; entries are tagged PCID 000H
            elif name == "cr4_smep" and new_b:
                self.tlb.flush_pcid(self._pcid, keep_global=True)
                self.tlb.flush_pscs(self._pcid)
        self._modes_changed(name, old, new)

    @contextmanager
    def supervisor(self) -> Iterator[Core]:
        """Run a block at CPL 0 (a kernel entry), restoring the previous CPL after."""
        saved = self._cpl
        if saved != 0:
            self.cpl = 0
        try:
            yield self
        finally:
            if saved != 0:
                self.cpl = saved

    def _require_cpl0(self, what: str) -> None:
        if self._cpl != 0:
            self.counters["gp_faults"] += 1
            raise GeneralProtection(f"{what} at CPL {self._cpl}")

    # ---------------------------------------------------------------- CR3, PCID, invalidation
    @property
    def cr3(self) -> int:
        return self._root | self._pcid

    @property
    def pcid(self) -> int:
        return self._pcid

    def load_cr3(self, page_table: PageTable, pcid: int = 0, noflush: bool = False) -> None:
        """MOV to CR3 (SDM 4.10.4.1). With CR4.PCIDE=0: flushes every non-global entry (PCID
        000H) and the paging-structure caches. With PCIDE=1: flushes the non-global entries and
        paging-structure caches of ``pcid`` unless ``noflush`` (bit 63 of the source)."""
        self._require_cpl0("MOV to CR3")
        if not isinstance(page_table, PageTable):
            raise TypeError(f"load_cr3 needs a PageTable, got {type(page_table).__name__}")
        if page_table.levels != (5 if self._cr4_la57 else 4):
            raise GeneralProtection(f"a {page_table.levels}-level table needs CR4.LA57="
                                    f"{int(page_table.levels == 5)}")
        if page_table.cr3 >> self.maxphyaddr:
            raise GeneralProtection("CR3 address beyond MAXPHYADDR")
        if not self._cr4_pcide:
            if pcid != 0:
                raise GeneralProtection("CR3[11:0] hold PWT/PCD with CR4.PCIDE=0; PCID must be 0")
            if noflush:
                raise GeneralProtection("CR3 bit 63 is reserved with CR4.PCIDE=0")
        elif not 0 <= pcid <= 0xFFF:
            raise GeneralProtection(f"PCID must be 12 bits, got {pcid!r}")
        self.counters["cr3_loads"] += 1
        self.page_table = page_table
        self._root = page_table.cr3
        self._levels = page_table.levels
        self._pcid = pcid
        if not noflush:
            self.tlb.flush_pcid(pcid, keep_global=True)
            self.tlb.flush_pscs(pcid)

    def invlpg(self, vaddr: int) -> None:
        """INVLPG (SDM 4.10.4.1): entries for the page of ``vaddr`` with the current PCID, global
        entries for that page whatever their PCID, and every paging-structure-cache entry of the
        current PCID. A non-canonical operand invalidates nothing."""
        self._require_cpl0("INVLPG")
        self.counters["invlpg"] += 1
        if not 0 <= vaddr < 1 << 64 or not is_canonical(vaddr, bool(self._cr4_la57)):
            return
        self.tlb.invalidate_page(vaddr, self._pcid, include_global=True)
        self.tlb.flush_pscs(self._pcid)

    def invpcid(self, kind: int, pcid: int = 0, vaddr: int = 0) -> None:
        """INVPCID types 0-3 (SDM 4.10.4.1 and the INVPCID instruction reference)."""
        self._require_cpl0("INVPCID")
        self.counters["invpcid"] += 1
        if kind not in (0, 1, 2, 3):
            raise GeneralProtection(f"INVPCID type {kind!r} is not 0..3")
        if kind in (0, 1):
            if not 0 <= pcid <= 0xFFF:
                raise GeneralProtection("INVPCID descriptor bits 63:12 must be 0")
            if not self._cr4_pcide and pcid != 0:
                raise GeneralProtection("INVPCID with CR4.PCIDE=0 and PCID != 0")
        if kind == 0:
            if not 0 <= vaddr < 1 << 64 or not is_canonical(vaddr, bool(self._cr4_la57)):
                raise GeneralProtection(f"INVPCID type 0 with non-canonical address {vaddr:#x}")
            self.tlb.invalidate_page(vaddr, pcid, include_global=False)
            self.tlb.flush_pscs(pcid)
        elif kind == 1:
            self.tlb.flush_pcid(pcid, keep_global=True)
            self.tlb.flush_pscs(pcid)
        elif kind == 2:
            self.tlb.flush_pcid(None, keep_global=False)
            self.tlb.flush_pscs(None)
        else:
            self.tlb.flush_pcid(None, keep_global=True)
            self.tlb.flush_pscs(None)

    def wrpkru(self, value: int) -> None:
        """WRPKRU: allowed at any CPL when CR4.PKE=1; no TLB invalidation (rights are checked
        against PKRU at access time, SDM 4.6.2)."""
        if not self._cr4_pke:
            raise InvalidOpcode("WRPKRU with CR4.PKE=0")
        self.pkru = value

    def rdpkru(self) -> int:
        if not self._cr4_pke:
            raise InvalidOpcode("RDPKRU with CR4.PKE=0")
        return self._pkru

    # ---------------------------------------------------------------- translation
    def translate(self, vaddr: int, access: int = Access.READ, *,
                  implicit_supervisor: bool = False) -> int:
        """Translate a linear address for ``access``; return the physical address or raise
        ``PageFault`` (or ``GeneralProtection`` for a non-canonical address, SDM 6.15)."""
        if (vaddr >> self._canon_shift) not in (0, self._canon_hi):
            self._noncanonical(vaddr)
        perm = self._perm_data.get(access)  # None for fetches (and for a bad ``access``)
        if perm is None or implicit_supervisor:  # fetches and implicit accesses: general path
            return self._translate_slow(vaddr, access, implicit_supervisor)
        # Data access: probe the L1 DTLB for a 4 KiB entry of this PCID, then a global one.
        vpn = vaddr >> 12
        s = self._l1_sets[vpn & self._l1_mask]
        key = (vpn << 15) | self._pcid
        value = s.get(key)
        if value is None:
            key = (vpn << 15) | 0x1000
            value = s.get(key)
        # Table value 0: allowed; >0: fault; NEEDS_DIRTY: a write through a clean entry.
        if value is not None and not perm[value & 0xFF]:
            del s[key]  # LRU
            s[key] = value
            self._l1_stats.hits += 1
            return (value & ~0xFFF) | (vaddr & 0xFFF)
        return self._translate_slow(vaddr, access, False)

    def _noncanonical(self, vaddr: int) -> None:
        if not isinstance(vaddr, int) or not 0 <= vaddr < 1 << 64:
            raise ValueError(f"linear address must be a 64-bit unsigned integer, got {vaddr!r}")
        self.counters["gp_faults"] += 1
        raise GeneralProtection(f"non-canonical address {vaddr:#x}")

    def _translate_slow(self, vaddr: int, access: int, implicit: bool) -> int:
        if access not in (0, 1, 2):
            raise ValueError(f"access must be Access.READ, WRITE or FETCH, got {access!r}")
        if self.page_table is None:
            raise GeneralProtection("no page table loaded (CR3)")
        fetch = access == Access.FETCH
        tag = self._pcid
        tlb = self.tlb
        perm = (self._perm_implicit if implicit else self._perm)[access]
        hit = None
        for array in tlb.l1_arrays(fetch):
            hit = array.lookup(vaddr, tag)
            if hit is not None:
                break
        else:
            hit = tlb.stlb.lookup(vaddr, tag) or tlb.stlb_1g.lookup(vaddr, tag)
            if hit is not None:
                l1 = tlb.l1_for(hit[1], fetch)
                if l1 is not None:
                    l1.insert(vaddr, hit[1], GLOBAL if hit[0] & R_G else tag, hit[0])
        if hit is not None:
            value, shift = hit
            code = perm[value & 0xFF]
            if code == 0:
                return (value & ~0xFFF) | (vaddr & ((1 << shift) - 1))
            if code > 0:  # the cached rights forbid it: fault (and drop the stale entries)
                self._fault(vaddr, code, "access rights (cached translation)")
            # NEEDS_DIRTY: a write through an entry cached without D walks to set D (SDM 4.8).
        return self._walk(vaddr, access, implicit, True)

    def walk(self, vaddr: int, access: int = Access.READ, *,
             implicit_supervisor: bool = False) -> int:
        """A full page walk from CR3, ignoring (and not filling) the TLBs and paging-structure
        caches; sets A/D like any walk. Returns the physical address or raises."""
        if (vaddr >> self._canon_shift) not in (0, self._canon_hi):
            self._noncanonical(vaddr)
        if self.page_table is None:
            raise GeneralProtection("no page table loaded (CR3)")
        if access not in (0, 1, 2):
            raise ValueError(f"access must be Access.READ, WRITE or FETCH, got {access!r}")
        return self._walk(vaddr, access, implicit_supervisor, False)

    def explain(self, vaddr: int, access: int = Access.READ, *,
                implicit_supervisor: bool = False) -> dict:
        """``translate`` with a report of where the translation came from (for teaching): the
        physical address or the fault, the TLB array that hit (or "walk"), and how many
        paging-structure entries the walk read (fewer when a paging-structure cache hit)."""
        tlb = self.tlb
        before = {a.name: a.stats.hits for a in tlb.arrays}
        walks, read = tlb.counters.walks, tlb.counters.entries_read
        psc_before = {c.name: c.stats.hits for c in tlb.pscs}
        out: dict = {"vaddr": vaddr, "access": Access(access).name}
        try:
            out["paddr"] = self.translate(vaddr, access,
                                          implicit_supervisor=implicit_supervisor)
        except PageFault as fault:
            out["fault"] = {"error_code": fault.error_code, "bits": fault.bits(),
                            "reason": fault.reason}
        hits = [a.name for a in tlb.arrays if a.stats.hits != before[a.name]]
        out["source"] = "walk" if tlb.counters.walks != walks else (hits[0] if hits else None)
        out["entries_read"] = tlb.counters.entries_read - read
        out["psc_hit"] = next((c.name for c in tlb.pscs if c.stats.hits != psc_before[c.name]),
                              None)
        return out

    def _fault(self, vaddr: int, code: int, reason: str) -> None:
        # SDM 4.10.4.1: a #PF invalidates the TLB entries for the faulting page number and the
        # paging-structure-cache entries that would be used for that address (current PCID).
        self.tlb.invalidate_page(vaddr, self._pcid, include_global=True)
        self.tlb.invalidate_psc_address(vaddr, self._pcid)
        self.tlb.counters.faults += 1
        self.counters["page_faults"] += 1
        raise PageFault(vaddr, code, reason)

    def _walk(self, vaddr: int, access: int, implicit: bool, use_caches: bool) -> int:
        """The page walk (SDM 4.5): read each entry from physical memory, check P and the
        reserved bits, combine R/W and U/S (AND over levels) and XD (OR), check the rights,
        then set A/D; fill the TLB and paging-structure caches if ``use_caches``."""
        tlb = self.tlb
        tlb.counters.walks += 1
        data = self._data
        level = self._levels
        table = self._root
        and_bits = -1  # AND of every entry used: R/W, U/S, and whether all A are set
        or_bits = 0  # OR of every entry used: XD
        if use_caches:
            pcid = self._pcid
            for psc, below in ((tlb.pde_cache, 1), (tlb.pdpt_cache, 2), (tlb.pml4_cache, 3)):
                cached = psc.get(vaddr, pcid)
                if cached is not None:
                    table, and_bits, or_bits = cached
                    level = below
                    break
        rsvd = self._rsvd
        addr_mask = self._addr_mask
        path: list[tuple[int, int, int, int, int]] = []  # (ea, level, entry, and, or)
        while True:
            ea = table | (((vaddr >> _LEVEL_SHIFT[level]) & 511) << 3)
            page = data.get(ea >> 12)
            if page is None:
                e = 0
            else:
                off = ea & 0xFFF
                e = int.from_bytes(page[off:off + 8], "little")
            if not e & 1:
                self._fault(vaddr, self._base_code(access, implicit),
                            f"not present at level {level}")
            if e & rsvd[level][0]:
                self._fault(vaddr, self._base_code(access, implicit) | 0x9,  # P | RSVD
                            f"reserved bit set at level {level}: {e & rsvd[level][0]:#x}")
            and_bits &= e
            or_bits |= e
            path.append((ea, level, e, and_bits, or_bits))
            if level == 1:
                break
            if e & 0x80:  # PS in a PDPTE/PDE (PS in a PML4E/PML5E is in the reserved mask)
                if e & rsvd[level][1]:
                    self._fault(vaddr, self._base_code(access, implicit) | 0x9,
                                f"reserved bit set at level {level}: {e & rsvd[level][1]:#x}")
                break
            table = e & addr_mask
            level -= 1
        tlb.counters.entries_read += len(path)
        pkey = (e >> 59) & 0xF
        rights = ((and_bits >> 1) & 3) | ((or_bits >> 61) & 4) | (pkey << R_PKEY_SHIFT)
        code = (self._perm_implicit if implicit else self._perm)[access][rights | R_D]
        if code:
            self._fault(vaddr, code, "access rights")
        # Success: set A in every entry used and D in the leaf for a write (SDM 4.8). Each is a
        # locked read-modify-write of the current memory value, so bits written meanwhile by
        # software are kept; nothing is set on a faulting access.
        write = access == Access.WRITE
        if not (and_bits & 0x20) or (write and not e & 0x40):
            mem = self.physmem
            hooks = mem._write_hooks
            last = path[-1][0]
            for ea, _lv, e_at, _a, _o in path:
                want = 0x20 if not e_at & 0x20 else 0
                if write and ea == last and not e_at & 0x40:
                    want |= 0x40
                if want:
                    page = data[ea >> 12]
                    off = ea & 0xFFF
                    cur = int.from_bytes(page[off:off + 8], "little")
                    if hooks:
                        mem.write_u64(ea, cur | want, writer=f"{self.name}:walk")
                    else:
                        page[off:off + 8] = (cur | want).to_bytes(8, "little")
        page_shift = _LEVEL_SHIFT[level]
        base = e & addr_mask & ~((1 << page_shift) - 1)
        if use_caches:
            pcid = self._pcid
            for _ea, lv, e_at, c_and, c_or in path[:-1]:
                # Cached rights are cumulative (with LA57 the PML4E entry includes the PML5E's);
                # A is recorded as set because it was just set in every entry used.
                cached = (e_at & addr_mask, c_and | 0x20, c_or)
                if lv == 4:
                    tlb.pml4_cache.put(vaddr, pcid, cached)
                elif lv == 3:
                    tlb.pdpt_cache.put(vaddr, pcid, cached)
                elif lv == 2:
                    tlb.pde_cache.put(vaddr, pcid, cached)
            dirty = R_D if (write or e & 0x40) else 0
            global_ = (e & 0x100) and self._cr4_pge
            value = base | rights | dirty | (R_G if global_ else 0)
            tlb.fill(vaddr, page_shift, GLOBAL if global_ else pcid, value,
                     access == Access.FETCH)
        return base | (vaddr & ((1 << page_shift) - 1))

    def _base_code(self, access: int, implicit: bool) -> int:
        code = 0
        if access == Access.WRITE:
            code |= PF_WR
        if self._cpl == 3 and not implicit:
            code |= PF_US
        if access == Access.FETCH and (self._efer_nxe or self._cr4_smep):
            code |= PF_ID
        return code

    # ---------------------------------------------------------------- memory accesses
    def read(self, vaddr: int, n: int, *, implicit_supervisor: bool = False) -> bytes:
        """A load of ``n`` bytes (page by page, as the hardware splits a crossing access)."""
        return self._access_bytes(vaddr, n, Access.READ, implicit_supervisor)

    def fetch(self, vaddr: int, n: int) -> bytes:
        return self._access_bytes(vaddr, n, Access.FETCH, False)

    def write(self, vaddr: int, data: bytes, *, implicit_supervisor: bool = False) -> None:
        """A store: every page is translated (and may fault) before any byte is written."""
        pieces = []
        pos = 0
        while pos < len(data):
            va = vaddr + pos
            chunk = min(len(data) - pos, 4096 - (va & 0xFFF))
            pieces.append((self.translate(va & ((1 << 64) - 1), Access.WRITE,
                                          implicit_supervisor=implicit_supervisor), pos, chunk))
            pos += chunk
        for paddr, pos, chunk in pieces:
            self.physmem.write(paddr, data[pos:pos + chunk], writer=self.name)

    def _access_bytes(self, vaddr: int, n: int, access: int, implicit: bool) -> bytes:
        out = bytearray()
        pos = 0
        while pos < n:
            va = vaddr + pos
            chunk = min(n - pos, 4096 - (va & 0xFFF))
            paddr = self.translate(va & ((1 << 64) - 1), access, implicit_supervisor=implicit)
            out += self.physmem.read(paddr, chunk)
            pos += chunk
        return bytes(out)

    def __repr__(self) -> str:
        return (f"Core({self.id}, cpl={self._cpl}, cr3={self.cr3:#x}, pcide={self._cr4_pcide}, "
                f"tlb_entries={self.tlb.size()})")


GLOBAL = 0x1000  # the TLB tag of global entries (matches tlb.GLOBAL_TAG)
_LEVEL_SHIFT = (0, 12, 21, 30, 39, 48)

__all__ = [
    "PF_ID",
    "PF_P",
    "PF_PK",
    "PF_RSVD",
    "PF_US",
    "PF_WR",
    "Access",
    "CPUException",
    "Core",
    "GeneralProtection",
    "InvalidOpcode",
    "PageFault",
    "PagingError",
    "access_error_code",
]
