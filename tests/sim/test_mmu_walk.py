"""Page walks: accessed/dirty flags (SDM 4.8), reserved bits (4.5, 4.7 RSVD), page sizes (4.5),
canonical addresses (3.3.7.1, 6.15: #GP not #PF), 5-level paging (4.5.1)."""

from __future__ import annotations

import pytest

from migrate.sim import Access, GeneralProtection, Machine, MachineConfig, PageFault, PagingError
from migrate.sim.mmu import PF_ID, PF_P, PF_RSVD, PF_US, PF_WR
from migrate.sim.paging import PS, SIZE_1G, SIZE_2M, XD

VA = 0x0000_5555_0000_0000


def invlpg(core, va: int) -> None:
    """INVLPG is privileged (#GP at CPL>0): enter the kernel for it."""
    with core.supervisor():
        core.invlpg(va)


def setup(**map_kwargs):
    m = Machine(cores=1, memory=32 << 20)
    pt = m.new_page_table()
    frame = m.physmem.alloc() << 12
    pt.map(VA, frame, **map_kwargs)
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3  # user pages, user-mode accesses (SMAP stays on as in Linux)
    return m, pt, core, frame


# ------------------------------------------------------------------ 4.8 accessed and dirty
def test_read_sets_accessed_at_every_level_but_not_dirty() -> None:
    """SDM 4.8: every entry used in a translation gets A=1; D only on a write, only in the leaf."""
    _m, pt, core, _ = setup()
    assert not any(s.entry.accessed for s in pt.entries(VA))
    core.translate(VA, Access.READ)
    steps = pt.entries(VA)
    assert all(s.entry.accessed for s in steps)
    assert not steps[-1].entry.dirty


def test_write_sets_dirty_in_leaf_only() -> None:
    _m, pt, core, _ = setup()
    core.translate(VA + 100, Access.WRITE)
    steps = pt.entries(VA)
    assert steps[-1].entry.dirty
    assert not any(s.entry.raw & 0x40 for s in steps[:-1])  # bit 6 of non-leaf entries untouched


def test_faulting_access_sets_neither_accessed_nor_dirty() -> None:
    """SDM 4.8 with 4.7: a write to a read-only page faults and leaves A and D as they were."""
    _m, pt, core, _ = setup(writable=False)
    core.cpl = 3
    with pytest.raises(PageFault):
        core.translate(VA, Access.WRITE)
    assert not pt.entry(VA).accessed
    assert not pt.entry(VA).dirty


def test_write_through_read_created_tlb_entry_walks_to_set_dirty() -> None:
    """SDM 4.8 / 4.10.2.2: a TLB entry created by a read has no D; a later write does not just use
    it but walks the paging structures (setting D in memory)."""
    _m, pt, core, _ = setup()
    core.translate(VA, Access.READ)
    walks = core.tlb.counters.walks
    assert not pt.entry(VA).dirty
    core.translate(VA, Access.WRITE)
    assert pt.entry(VA).dirty
    assert core.tlb.counters.walks == walks + 1
    core.translate(VA, Access.WRITE)  # now cached with D: no walk
    assert core.tlb.counters.walks == walks + 1


def test_write_through_clean_entry_sees_pte_changed_in_memory() -> None:
    """Because the D-setting write re-walks, it observes a PTE that software made not-present
    even though a read through the same stale TLB entry still succeeds."""
    _m, pt, core, frame = setup()
    core.translate(VA, Access.READ)
    pt.unmap(VA)  # no INVLPG
    assert core.translate(VA, Access.READ) == frame  # stale TLB entry still used for reads
    with pytest.raises(PageFault) as info:
        core.translate(VA, Access.WRITE)
    assert info.value.error_code == PF_WR | PF_US  # not present (P=0), user write


def test_cleared_dirty_flag_is_not_set_again_through_cached_dirty_entry() -> None:
    """SDM 4.8: if software clears D while a TLB entry caches D=1, a write may not set it again
    until the entry is invalidated (4.10.4.2 recommends INVLPG after clearing D)."""
    _m, pt, core, _ = setup()
    core.translate(VA, Access.WRITE)
    pt.update(VA, clear_bits=0x40)
    core.translate(VA, Access.WRITE)
    assert not pt.entry(VA).dirty
    invlpg(core, VA)
    core.translate(VA, Access.WRITE)
    assert pt.entry(VA).dirty


def test_accessed_dirty_updates_keep_concurrent_software_bits() -> None:
    """A/D updates are locked read-modify-writes of the entry (SDM 4.8): bits software changed
    before the update (here: the ignored bit 9) survive."""
    _m, pt, core, _ = setup()
    pt.update(VA, set_bits=1 << 9)
    core.translate(VA, Access.WRITE)
    assert pt.entry(VA).raw & (1 << 9)


# ------------------------------------------------------------------ reserved bits (4.5, 4.7)
@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_bits_above_maxphyaddr_are_reserved_at_every_level(level) -> None:
    """SDM 4.5 tables 4-15..4-20: bits 51:MAXPHYADDR are reserved; 4.7: RSVD=1 and P=1."""
    _m, pt, core, _ = setup()
    pt.update(VA, level=level, set_bits=1 << 46)  # MAXPHYADDR defaults to 46
    core.cpl = 3
    with pytest.raises(PageFault) as info:
        core.translate(VA, Access.WRITE)
    assert info.value.error_code == PF_P | PF_WR | PF_US | PF_RSVD
    assert not pt.entries(VA)[0].entry.accessed  # a fault sets no accessed flag


def test_maxphyaddr_is_configurable() -> None:
    m = Machine(config=MachineConfig(cores=1, memory=16 << 20, maxphyaddr=40))
    pt = m.new_page_table()
    pt.map(VA, m.physmem.alloc() << 12)
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3  # user pages, user-mode accesses (SMAP stays on as in Linux)
    pt.update(VA, set_bits=1 << 45)
    with pytest.raises(PageFault) as info:
        core.translate(VA)
    assert info.value.rsvd
    with pytest.raises(PagingError, match="MAXPHYADDR"):
        pt.map(VA + 4096, 1 << 41)


def test_bit_51_reserved_only_below_52_bit_maxphyaddr() -> None:
    m = Machine(config=MachineConfig(cores=1, memory=16 << 20, maxphyaddr=52))
    pt = m.new_page_table()
    pt.map(VA, m.physmem.alloc() << 12)
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3  # user pages, user-mode accesses (SMAP stays on as in Linux)
    pt.update(VA, set_bits=1 << 51)
    assert core.translate(VA) == 1 << 51 | pt.entry(VA).address  # an address bit now


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_xd_is_reserved_when_nxe_is_off(level) -> None:
    """SDM 4.5: with IA32_EFER.NXE=0 bit 63 is reserved in every paging-structure entry."""
    _m, pt, core, _ = setup()
    core.efer_nxe = False
    pt.update(VA, level=level, set_bits=XD)
    with pytest.raises(PageFault) as info:
        core.translate(VA, Access.FETCH)
    # I/D is set because SMEP=1 (Linux's default) even though NXE=0 (SDM 4.7).
    assert info.value.error_code == PF_P | PF_US | PF_RSVD | PF_ID
    core.cr4_smep = False
    with pytest.raises(PageFault) as info:
        core.translate(VA, Access.FETCH)
    assert not info.value.fetch


def test_ps_in_pml4e_is_reserved() -> None:
    """SDM 4.5 table 4-15: bit 7 of a PML4E is reserved (must be 0)."""
    _m, pt, core, _ = setup()
    pt.update(VA, level=4, set_bits=PS)
    with pytest.raises(PageFault) as info:
        core.translate(VA)
    assert info.value.rsvd and info.value.present


def test_ps_in_pml5e_and_pml4e_reserved_with_la57() -> None:
    m = Machine(config=MachineConfig(cores=1, memory=16 << 20, la57=True))
    pt = m.new_page_table()
    va = 0x00F0_0000_0000_0000  # beyond 48 bits: only reachable with 5-level paging
    pt.map(va, m.physmem.alloc() << 12)
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3  # user pages, user-mode accesses (SMAP stays on as in Linux)
    assert core.translate(va) == pt.entry(va).address
    for level in (5, 4):
        pt.update(va, level=level, set_bits=PS)
        invlpg(core, va)
        with pytest.raises(PageFault) as info:
            core.translate(va)
        assert info.value.rsvd
        pt.update(va, level=level, clear_bits=PS)
        invlpg(core, va)


def test_large_page_address_bits_between_pat_and_frame_are_reserved() -> None:
    """SDM 4.5 tables 4-17/4-18: bits 29:13 of a 1-GiB PDPTE and 20:13 of a 2-MiB PDE are
    reserved; bit 12 is PAT and is not."""
    m = Machine(cores=1, memory=8 << 30)
    pt = m.new_page_table()
    pt.map(SIZE_1G, SIZE_1G, SIZE_1G)
    pt.map(4 * SIZE_2M, 2 * SIZE_2M, SIZE_2M)
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3  # user pages, user-mode accesses (SMAP stays on as in Linux)
    for va in (SIZE_1G, 4 * SIZE_2M):
        pt.update(va, set_bits=1 << 12)  # PAT
        core.translate(va + 5)
        pt.update(va, set_bits=1 << 13)
        invlpg(core, va)
        with pytest.raises(PageFault) as info:
            core.translate(va + 5)
        assert info.value.rsvd
    pt.update(SIZE_1G, set_bits=1 << 29, clear_bits=1 << 13)
    invlpg(core, SIZE_1G)
    with pytest.raises(PageFault):
        core.translate(SIZE_1G)


def test_reserved_bits_in_not_present_entry_are_ignored() -> None:
    """SDM 4.7: RSVD is reported only for present entries; P=0 entries are ignored entirely."""
    _m, pt, core, _ = setup()
    pt.set_raw(VA, 1, (1 << 50) | XD)  # P=0 with junk
    core.efer_nxe = False
    with pytest.raises(PageFault) as info:
        core.translate(VA)
    assert info.value.error_code == PF_US  # P=0, RSVD=0


# ------------------------------------------------------------------ page sizes (4.5)
def test_2m_and_1g_pages_translate_offsets_and_use_their_tlb_arrays() -> None:
    m = Machine(cores=1, memory=4 << 30)
    pt = m.new_page_table()
    pt.map(0x4000_0000, 0x8000_0000, SIZE_1G, global_=False)
    pt.map(0x20_0000, 0x60_0000, SIZE_2M)
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3  # user pages, user-mode accesses (SMAP stays on as in Linux)
    assert core.translate(0x4000_0000 + 0x1234_5678) == 0x8000_0000 + 0x1234_5678
    assert core.translate(0x20_0000 + 0x1F_FFFF) == 0x60_0000 + 0x1F_FFFF
    assert pt.entry(0x20_0000).huge and pt.entry(0x20_0000).raw & PS
    assert pt.entry(0x4000_0000).page_size == SIZE_1G
    stats = core.tlb.stats
    assert stats["l1d_1g"]["fills"] == 1 and stats["stlb_1g"]["fills"] == 1
    assert stats["l1d_2m"]["fills"] == 1 and stats["stlb"]["fills"] == 1
    # Another 4 KiB inside the same 2 MiB page: one TLB entry serves it, no walk.
    walks = stats["walks"]
    core.translate(0x20_0000 + 0x10_0000)
    assert core.tlb.stats["walks"] == walks


def test_huge_mappings_need_alignment() -> None:
    m = Machine(cores=1, memory=16 << 20)
    pt = m.new_page_table()
    with pytest.raises(PagingError, match="aligned"):
        pt.map(0x20_1000, 0x40_0000, SIZE_2M)
    with pytest.raises(PagingError, match="aligned"):
        pt.map(0x20_0000, 0x40_1000, SIZE_2M)
    with pytest.raises(PagingError, match="page size"):
        pt.map(0x20_0000, 0x40_0000, 8192)


def test_4k_map_inside_existing_huge_page_is_refused() -> None:
    m = Machine(cores=1, memory=16 << 20)
    pt = m.new_page_table()
    pt.map(0x20_0000, 0x40_0000, SIZE_2M)
    with pytest.raises(PagingError, match="huge"):
        pt.map(0x20_1000, 0x1000)


# ------------------------------------------------------------------ canonical addresses
def test_non_canonical_address_is_general_protection_not_page_fault() -> None:
    """SDM 3.3.7.1 / 6.15: a non-canonical linear address raises #GP, never #PF."""
    _m, _pt, core, _ = setup()
    for va in (0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_F000, 0x0001_0000_0000_0000):
        with pytest.raises(GeneralProtection):
            core.translate(va)
    with pytest.raises(PageFault):
        core.translate(0xFFFF_8000_0000_0000)  # canonical (high half), just unmapped


def test_la57_widens_canonical_range() -> None:
    m = Machine(config=MachineConfig(cores=1, memory=16 << 20, la57=True))
    pt = m.new_page_table()
    core = m.cores[0]
    core.load_cr3(pt)
    core.cpl = 3  # user pages, user-mode accesses (SMAP stays on as in Linux)
    with pytest.raises(PageFault):
        core.translate(0x0000_8000_0000_0000)  # canonical with 57-bit addresses
    with pytest.raises(GeneralProtection):
        core.translate(0x0100_0000_0000_0000)


def test_bad_addresses_are_clear_errors() -> None:
    _m, pt, core, _ = setup()
    with pytest.raises(ValueError, match="64-bit"):
        core.translate(-1)
    with pytest.raises(PagingError, match="canonical"):
        pt.map(0x0000_8000_0000_0000, 0)


def test_user_fetch_fault_error_code() -> None:
    _m, _pt, core, _ = setup(nx=True)
    core.cpl = 3
    with pytest.raises(PageFault) as info:
        core.translate(VA, Access.FETCH)
    assert info.value.error_code == PF_P | PF_US | PF_ID


def test_bad_access_kind_is_a_clear_error() -> None:
    _m, _pt, core, _ = setup()
    with pytest.raises(ValueError, match="access must be"):
        core.translate(VA, 7)


def test_entry_bits_are_at_their_architectural_positions() -> None:
    """SDM 4.5, tables 4-19/4-20 (4-KByte PTE) and 4-17/4-18 (large pages): P 0, R/W 1, U/S 2,
    PWT 3, PCD 4, A 5, D 6, PS/PAT 7, G 8, PAT (large) 12, protection key 62:59, XD 63."""
    from migrate.sim import paging

    assert (paging.P, paging.RW, paging.US, paging.PWT, paging.PCD, paging.A, paging.D) == (
        1, 2, 4, 8, 16, 32, 64)
    assert paging.PS == paging.PAT_4K == 1 << 7 and paging.G == 1 << 8
    assert paging.PAT_LARGE == 1 << 12 and paging.XD == 1 << 63
    assert paging.PKEY_MASK == 0xF << 59
    m = Machine(cores=1, memory=16 << 20)
    pt = m.new_page_table()
    e = pt.map(VA, 0x5000, writable=True, user=True, nx=True, pkey=9, global_=True, pwt=True,
               pcd=True)
    assert e.raw == 0x5000 | 1 | 2 | 4 | 8 | 16 | (1 << 8) | (9 << 59) | (1 << 63)
    assert (e.present, e.writable, e.user, e.pwt, e.pcd, e.global_, e.nx, e.pkey) == (
        True, True, True, True, True, True, True, 9)
