"""TLB and paging-structure-cache semantics, each from Intel SDM vol. 3A 4.10.

"Stale" results below are the architecture's own: the SDM lets a processor keep using a cached
translation until software invalidates it (4.10.4.3), and this model always does.
"""

from __future__ import annotations

import pytest

from migrate.sim import Access, GeneralProtection, Machine, MachineConfig, PageFault
from migrate.sim.tlb import ArrayConfig, TLBConfig

A1 = 0x0000_1000_0000_0000
A2 = A1 + 0x1000


def world(pcide: bool = True, **cfg):
    m = Machine(config=MachineConfig(cores=1, memory=32 << 20, **cfg))
    core = m.cores[0]
    core.cr4_pcide = pcide
    return m, core


def frames(m, n):
    return [m.physmem.alloc() << 12 for _ in range(n)]


def test_stale_translation_until_invlpg() -> None:
    """SDM 4.10.4.3/4.10.4.1: after software changes a PTE, the old translation may be used until
    INVLPG for that page (current PCID)."""
    m, core = world()
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    core.load_cr3(pt)
    assert core.translate(A1) == f1
    pt.map(A1, f2, user=False, replace=True)
    assert core.translate(A1) == f1  # stale
    core.invlpg(A1)
    assert core.translate(A1) == f2


def test_invlpg_removes_global_entries_of_other_pcids_but_not_their_private_entries() -> None:
    """SDM 4.10.4.1: INVLPG invalidates the page's entries for the current PCID and any global
    entry for that page regardless of PCID. (Other PCIDs' non-global entries: not required;
    this model keeps them, showing why Linux flushes other ASIDs lazily.)"""
    m, core = world()
    f1, f2, f3 = frames(m, 3)
    pt_a, pt_b = m.new_page_table(), m.new_page_table()
    pt_a.map(A1, f1, user=False, global_=True)
    pt_a.map(A2, f1, user=False)
    pt_b.map(A1, f1, user=False, global_=True)
    pt_b.map(A2, f1, user=False)
    core.load_cr3(pt_a, pcid=1)
    core.translate(A1)
    core.translate(A2)
    core.load_cr3(pt_b, pcid=2)
    pt_a.map(A1, f2, user=False, global_=True, replace=True)
    pt_b.map(A1, f2, user=False, global_=True, replace=True)
    pt_a.map(A2, f3, user=False, replace=True)
    assert core.translate(A1) == f1  # the global entry made under PCID 1 serves PCID 2
    core.invlpg(A1)  # current PCID 2: the global entry goes
    assert core.translate(A1) == f2
    core.invlpg(A2)  # PCID 2 has no A2 entry; PCID 1's private A2 entry survives
    core.load_cr3(pt_a, pcid=1, noflush=True)
    assert core.translate(A2) == f1


def test_invlpg_flushes_all_paging_structure_caches_of_current_pcid() -> None:
    """SDM 4.10.4.1: INVLPG invalidates all paging-structure-cache entries of the current PCID,
    whatever linear address they are for. Observable: after a PDE is redirected, a translation of
    a different page under it uses the cached PDE until any INVLPG."""
    m, core = world()
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    pt.map(A1 + 0x5000, f1, user=False)
    core.load_cr3(pt)
    core.translate(A1)  # fills the PDE cache for A1's 2 MiB region
    # Build a second page table for the region and point the PDE at it.
    other = m.new_page_table()
    other.map(A1, f2, user=False)
    other.map(A1 + 0x5000, f2, user=False)
    new_pt_table = other.entries(A1)[2].entry.raw  # the other table's PDE value
    pt.set_raw(A1, 2, new_pt_table)
    assert core.translate(A1 + 0x5000) == f1  # walk started from the cached (stale) PDE
    core.invlpg(A1 + 0x1FF000)  # an unrelated page of the same PCID
    assert core.translate(A1 + 0x5000) == f1  # TLB entry still there (not that page)
    core.invlpg(A1 + 0x5000)
    assert core.translate(A1 + 0x5000) == f2


def test_invpcid_type0_individual_address_spares_globals_and_other_pcids() -> None:
    """SDM 4.10.4.1 INVPCID type 0: mappings for that address and PCID, except global ones."""
    m, core = world()
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    pt.map(A2, f1, user=False, global_=True)
    core.load_cr3(pt, pcid=3)
    core.translate(A1)
    core.translate(A2)
    pt.map(A1, f2, user=False, replace=True)
    pt.map(A2, f2, user=False, global_=True, replace=True)
    core.invpcid(0, pcid=4, vaddr=A1)  # another PCID: nothing for us
    assert core.translate(A1) == f1
    core.invpcid(0, pcid=3, vaddr=A1)
    assert core.translate(A1) == f2
    core.invpcid(0, pcid=3, vaddr=A2)  # global: not invalidated by type 0
    assert core.translate(A2) == f1


def test_invpcid_type1_single_context() -> None:
    """SDM 4.10.4.1 INVPCID type 1: every non-global mapping of one PCID."""
    m, core = world()
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    pt.map(A2, f1, user=False, global_=True)
    core.load_cr3(pt, pcid=5)
    core.translate(A1)
    core.translate(A2)
    core.load_cr3(pt, pcid=6)
    core.translate(A1)
    pt.map(A1, f2, user=False, replace=True)
    pt.map(A2, f2, user=False, global_=True, replace=True)
    core.invpcid(1, pcid=5)
    assert core.translate(A1) == f1  # PCID 6's entry untouched
    assert core.translate(A2) == f1  # global untouched
    core.load_cr3(pt, pcid=5, noflush=True)
    assert core.translate(A1) == f2


def test_invpcid_type2_all_including_globals() -> None:
    m, core = world()
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    pt.map(A2, f1, user=False, global_=True)
    core.load_cr3(pt, pcid=7)
    core.translate(A1)
    core.translate(A2)
    pt.map(A1, f2, user=False, replace=True)
    pt.map(A2, f2, user=False, global_=True, replace=True)
    core.invpcid(2)
    assert core.translate(A1) == f2
    assert core.translate(A2) == f2
    assert core.tlb.size() == 4  # the two refills (L1 + STLB each)


def test_invpcid_type3_all_except_globals() -> None:
    m, core = world()
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    pt.map(A2, f1, user=False, global_=True)
    core.load_cr3(pt, pcid=8)
    core.translate(A1)
    core.translate(A2)
    pt.map(A1, f2, user=False, replace=True)
    pt.map(A2, f2, user=False, global_=True, replace=True)
    core.invpcid(3)
    assert core.translate(A1) == f2
    assert core.translate(A2) == f1


def test_invpcid_operand_checks() -> None:
    """INVPCID #GP: type > 3, descriptor bits 63:12 set, non-canonical address for type 0, PCID
    != 0 with CR4.PCIDE=0, CPL > 0."""
    m, core = world(pcide=False)
    pt = m.new_page_table()
    core.load_cr3(pt)
    with pytest.raises(GeneralProtection):
        core.invpcid(4)
    with pytest.raises(GeneralProtection):
        core.invpcid(1, pcid=1)
    with pytest.raises(GeneralProtection):
        core.invpcid(0, pcid=0, vaddr=0x0000_8000_0000_0000)
    core.cr4_pcide = True
    with pytest.raises(GeneralProtection):
        core.invpcid(1, pcid=0x1000)
    core.cpl = 3
    with pytest.raises(GeneralProtection):
        core.invpcid(2)
    with pytest.raises(GeneralProtection):
        core.invlpg(A1)


def test_mov_cr3_without_pcide_flushes_non_global_keeps_global() -> None:
    """SDM 4.10.4.1 MOV to CR3, CR4.PCIDE=0: all non-global entries (PCID 000H) and all
    paging-structure caches go; global entries stay (with CR4.PGE=1)."""
    m, core = world(pcide=False)
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    pt.map(A2, f1, user=False, global_=True)
    core.load_cr3(pt)
    core.translate(A1)
    core.translate(A2)
    pt.map(A1, f2, user=False, replace=True)
    pt.map(A2, f2, user=False, global_=True, replace=True)
    core.load_cr3(pt)
    assert core.translate(A1) == f2
    assert core.translate(A2) == f1  # the global survives the CR3 load
    with pytest.raises(GeneralProtection):
        core.load_cr3(pt, noflush=True)  # bit 63 with PCIDE=0


def test_global_bit_ignored_without_pge() -> None:
    """SDM 4.10.2.4: an entry is global only if G=1 in the leaf and CR4.PGE=1."""
    m, core = world(pcide=False)
    core.cr4_pge = False
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A2, f1, user=False, global_=True)
    core.load_cr3(pt)
    core.translate(A2)
    pt.map(A2, f2, user=False, global_=True, replace=True)
    core.load_cr3(pt)
    assert core.translate(A2) == f2


def test_toggling_pge_flushes_everything_including_globals() -> None:
    """SDM 4.10.4.1 MOV to CR4: changing CR4.PGE invalidates all TLB entries, global included."""
    m, core = world()
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A2, f1, user=False, global_=True)
    core.load_cr3(pt, pcid=1)
    core.translate(A2)
    pt.map(A2, f2, user=False, global_=True, replace=True)
    core.cr4_pge = False
    core.cr4_pge = True
    assert core.translate(A2) == f2


def test_pcid_switch_with_noflush_keeps_entries_and_without_flushes_them() -> None:
    """SDM 4.10.1/4.10.4.1: entries are tagged with the PCID current when they were made; MOV CR3
    with bit 63 set keeps the new PCID's entries, without it flushes them."""
    m, core = world()
    f1, f2 = frames(m, 2)
    pt_a, pt_b = m.new_page_table(), m.new_page_table()
    pt_a.map(A1, f1, user=False)
    pt_b.map(A1, f2, user=False)
    core.load_cr3(pt_a, pcid=1)
    assert core.translate(A1) == f1
    core.load_cr3(pt_b, pcid=2)
    assert core.translate(A1) == f2  # a different PCID does not see PCID 1's entry
    core.load_cr3(pt_a, pcid=1, noflush=True)
    walks = core.tlb.counters.walks
    assert core.translate(A1) == f1
    assert core.tlb.counters.walks == walks  # served from the TLB, no walk
    core.load_cr3(pt_a, pcid=1)
    core.translate(A1)
    assert core.tlb.counters.walks == walks + 1


def test_same_pcid_for_two_address_spaces_is_a_hazard() -> None:
    """Reusing a PCID for another address space with no-flush serves the old space's mapping
    (why Linux flushes on ASID reuse)."""
    m, core = world()
    f1, f2 = frames(m, 2)
    pt_a, pt_b = m.new_page_table(), m.new_page_table()
    pt_a.map(A1, f1, user=False)
    pt_b.map(A1, f2, user=False)
    core.load_cr3(pt_a, pcid=1)
    core.translate(A1)
    core.load_cr3(pt_b, pcid=1, noflush=True)
    assert core.translate(A1) == f1  # wrong address space's frame


def test_clearing_pcide_flushes_every_pcid() -> None:
    """SDM 4.10.4.1 MOV to CR4: clearing CR4.PCIDE invalidates all TLB entries and all
    paging-structure-cache entries for all PCIDs; afterwards PCID 000H is in use."""
    m, core = world()
    f1, f2 = frames(m, 2)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    core.load_cr3(pt, pcid=9)
    core.translate(A1)
    pt.map(A1, f2, user=False, replace=True)
    core.cr4_pcide = False
    assert core.pcid == 0
    assert core.tlb.size() == 0
    assert core.translate(A1) == f2


def test_setting_pcide_requires_pcid_zero() -> None:
    """SDM 2.5 / MOV to CR4: setting CR4.PCIDE while CR3[11:0] != 0 is #GP; with PCIDE=0 a CR3
    load cannot carry a PCID in the first place."""
    m, core = world(pcide=False)
    pt = m.new_page_table()
    with pytest.raises(GeneralProtection):
        core.load_cr3(pt, pcid=9)
    core.load_cr3(pt)
    core.cr4_pcide = True
    assert core.cr4_pcide


def test_page_fault_invalidates_the_stale_entry_spurious_fault() -> None:
    """SDM 4.10.4.1: a #PF invalidates the TLB entries for the faulting page, so after software
    upgrades a PTE (RO -> RW) without INVLPG, the first write faults from the stale entry and the
    retry succeeds (Linux handles this as a spurious fault)."""
    m, core = world()
    (f1,) = frames(m, 1)
    pt = m.new_page_table()
    pt.map(A1, f1, writable=False)
    core.load_cr3(pt)
    core.cpl = 3
    core.translate(A1)
    pt.protect(A1, writable=True)
    with pytest.raises(PageFault):
        core.translate(A1, Access.WRITE)
    assert core.translate(A1, Access.WRITE) == f1


def test_set_associative_lru_eviction_and_stats() -> None:
    """The L1 DTLB is set-associative with LRU replacement: a 5th page mapping to a 4-way set
    evicts the least recently used one."""
    m, core = world(tlb=TLBConfig(l1d_4k=ArrayConfig(8, 4), stlb=ArrayConfig(24, 12)))
    (f1,) = frames(m, 1)
    pt = m.new_page_table()
    sets = core.tlb.l1d_4k.mask + 1  # 2 sets
    pages = [A1 + i * sets * 0x1000 for i in range(5)]  # all in set 0
    for va in pages:
        pt.map(va, f1, user=False)
    core.load_cr3(pt)
    for va in pages[:4]:
        core.translate(va)
    core.translate(pages[0])  # pages[1] becomes LRU
    core.translate(pages[4])
    stats = core.tlb.stats["l1d_4k"]
    assert stats["evictions"] == 1
    resident = {e[0] for e in core.tlb.l1d_4k.entries()}
    assert pages[1] not in resident and pages[0] in resident and pages[4] in resident
    hits = core.tlb.stats["l1d_4k"]["hits"]
    core.translate(pages[0])
    assert core.tlb.stats["l1d_4k"]["hits"] == hits + 1
    core.translate(pages[1])  # L1 miss, STLB hit: no walk
    assert core.tlb.stats["stlb"]["hits"] >= 1


def test_instruction_fetches_use_the_itlb() -> None:
    m, core = world()
    (f1,) = frames(m, 1)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    core.load_cr3(pt)
    core.translate(A1, Access.FETCH)
    assert core.tlb.stats["l1i_4k"]["fills"] == 1
    assert core.tlb.stats["l1d_4k"]["fills"] == 0


def test_default_geometry_is_skylake() -> None:
    cfg = TLBConfig()
    assert (cfg.l1d_4k.entries, cfg.l1d_4k.ways) == (64, 4)
    assert (cfg.stlb.entries, cfg.stlb.ways) == (1536, 12)
    _m, core = world()
    assert len(core.tlb.stlb.sets) == 128


def test_invlpg_of_any_address_in_a_2m_page_drops_its_entry() -> None:
    """SDM 4.10.4.1: INVLPG invalidates the TLB entries for the page containing the address,
    whatever the page size."""
    m, core = world()
    pt = m.new_page_table()
    pt.map(0x4000_0000, 0x20_0000, 1 << 21, user=False)
    core.load_cr3(pt)
    assert core.translate(0x4000_0000) == 0x20_0000
    pt.map(0x4000_0000, 0x60_0000, 1 << 21, user=False, replace=True)
    assert core.translate(0x4000_1234) == 0x20_1234
    core.invlpg(0x401F_F000)  # last 4 KiB of the 2 MiB page
    assert core.translate(0x4000_1234) == 0x60_1234


def test_explain_reports_the_source_of_a_translation() -> None:
    """A first access walks 4 levels; a neighbour in the same page table walks only the PTE
    thanks to the PDE cache (SDM 4.10.3); a repeat hits the L1 DTLB."""
    m, core = world()
    (f1,) = frames(m, 1)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    pt.map(A2, f1, user=False)
    core.load_cr3(pt)
    first = core.explain(A1)
    assert first["source"] == "walk" and first["entries_read"] == 4 and first["paddr"] == f1
    second = core.explain(A2)
    assert second["source"] == "walk" and second["entries_read"] == 1
    assert second["psc_hit"] == "pde_cache"
    third = core.explain(A2 + 8)
    assert third["source"] == "l1d_4k" and third["entries_read"] == 0
    fault = core.explain(A1 + 0x10000, Access.WRITE)
    assert fault["fault"]["error_code"] == 0x2


def test_freed_page_table_reached_through_a_stale_pde_cache_entry() -> None:
    """SDM 4.10.3 / 4.10.4.2: the PDE cache holds the address of a page table. If the OS frees
    that table and reuses the frame without invalidating (INVLPG flushes every PSC entry of the
    PCID), a walk still goes through the old table's frame and reads whatever is now there."""
    m, core = world()
    (f1,) = frames(m, 1)
    pt = m.new_page_table()
    pt.map(A1, f1, user=False)
    core.load_cr3(pt)
    core.translate(A1)  # fills TLB + PML4E/PDPTE/PDE caches
    table_pfn = pt.entries(A1)[-1].table_paddr >> 12  # the page table holding A1's PTE
    pt.unmap(A1)
    freed = pt.prune(A1)
    assert table_pfn in freed and len(freed) == 3  # PT, PD and PDPT went back to the allocator
    core.tlb.invalidate_page(A1, core.pcid, include_global=True)  # a TLB-only flush (not INVLPG)
    taken = []
    while (pfn := m.physmem.alloc(owner="someone-else")) != table_pfn:
        taken.append(pfn)  # the allocator hands out the lowest free frames first
        assert len(taken) < 16
    evil = m.physmem.alloc(owner="victim") << 12
    # The table's new owner writes what happens to look like a PTE for A2 into its frame.
    m.physmem.write_u64((table_pfn << 12) + ((A2 >> 12) & 511) * 8, evil | 0x3)
    seen = core.explain(A2)
    assert seen["paddr"] == evil and seen["psc_hit"] == "pde_cache"
    # The walk also cached A2 -> evil in the TLB; INVLPG A2 drops that and every PSC entry.
    core.invlpg(A2)
    with pytest.raises(PageFault) as info:
        core.translate(A2)
    assert not info.value.present
