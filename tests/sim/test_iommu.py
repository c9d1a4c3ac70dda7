"""The remapping hardware (VT-d) and Linux's IOVA allocator, rule by rule.

Spec references are to the Intel VT-d Architecture Specification (rev. 3.x/4.x):
ch. 3 "Second-Level Translation" (rights = AND of R/W across levels), ch. 6 caching mode and
ch. 6 IOTLB invalidation granularities, ch. 7 non-recoverable fault reasons (the table of
fault conditions), ch. 9 second-level paging entry formats. (Cited by title: section numbers
move between revisions.) Allocator references are to Linux drivers/iommu/iova.c
and dma-iommu.c (function names in the comments).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.sim.iommu import (
    FR_ADDR_BEYOND_AGAW,
    FR_CONTEXT_NOT_PRESENT,
    FR_PAGING_ENTRY_INVALID,
    FR_PAGING_ENTRY_RESERVED,
    FR_READ,
    FR_ROOT_NOT_PRESENT,
    FR_WRITE,
    IOTLB,
    MSI_WINDOW,
    SL_PS,
    SL_R,
    SL_W,
    DmaAccess,
    Iommu,
    IommuError,
    IoPageTable,
    IotlbEntry,
    IovaDomain,
    WalkFault,
)
from migrate.sim.physmem import PAGE_SHIFT, PAGE_SIZE, PhysicalMemory

MiB = 1 << 20


def _pt(agaw: int = 48) -> tuple[PhysicalMemory, IoPageTable]:
    mem = PhysicalMemory(64 * MiB)
    return mem, IoPageTable(mem, agaw, "iommu-pt:test")


def _frame(mem: PhysicalMemory, owner: str = "buf") -> int:
    pfn = mem.alloc(owner=owner)
    assert isinstance(pfn, int)
    return pfn


def _fault(pt: IoPageTable, iova: int, write: bool) -> WalkFault:
    with pytest.raises(WalkFault) as exc:
        pt.walk(iova, write)
    return exc.value


# ------------------------------------------------------------------------------ entry format (9)
def test_entry_bits_sit_at_their_architectural_positions() -> None:
    mem, pt = _pt()
    pfn = _frame(mem)
    pt.map(0x1234_5000, pfn << PAGE_SHIFT, read=True, write=False)
    walked = pt.entries(0x1234_5000)
    assert [lvl for lvl, _ in walked] == [4, 3, 2, 1]
    for _, raw in walked[:-1]:          # non-leaf entries carry R|W; the leaf restricts
        assert raw & (SL_R | SL_W) == SL_R | SL_W
    leaf = walked[-1][1]
    assert leaf & SL_R and not leaf & SL_W
    assert leaf & ~0xFFF == pfn << PAGE_SHIFT
    # The page tables themselves live in simulated RAM, owned by the IOMMU driver.
    assert mem.frame(pt.root).owner == "iommu-pt:test"
    assert len(pt.table_frames) == 4


def test_agaw_selects_the_number_of_levels() -> None:
    assert IoPageTable(PhysicalMemory(4 * MiB), 39, "t").levels == 3
    assert IoPageTable(PhysicalMemory(4 * MiB), 57, "t").levels == 5
    with pytest.raises(IommuError, match="AGAW"):
        IoPageTable(PhysicalMemory(4 * MiB), 40, "t")


# ------------------------------------------------------------------ rights across levels (3)
def test_rights_are_the_and_of_every_level() -> None:
    mem, pt = _pt()
    pfn = _frame(mem)
    iova = 0x4000_0000
    pt.map(iova, pfn << PAGE_SHIFT, read=True, write=True)
    # Clear W in the level-3 (PDPTE) entry: the leaf still says W, the translation must not.
    table = pt.root
    for level in (4, 3):
        ea = (table << PAGE_SHIFT) + 8 * IoPageTable.index(iova, level)
        raw = mem.read_u64(ea)
        if level == 3:
            mem.write_u64(ea, raw & ~SL_W)
        table = (raw & ~0xFFF & ((1 << 52) - 1)) >> PAGE_SHIFT
    tr = pt.walk(iova, write=False)
    assert tr.read and not tr.write
    err = _fault(pt, iova, write=True)
    assert err.reason == FR_WRITE and err.level == 3 and not err.not_present


def test_not_present_entry_faults_by_access_type_and_says_not_present() -> None:
    # Legacy second-level entries have no P bit: R=W=0 is not-present, and the fault reason is
    # the one for the access (0x6 read, 0x5 write), ch. 7.
    _, pt = _pt()
    r = _fault(pt, 0x1000, write=False)
    w = _fault(pt, 0x1000, write=True)
    assert (r.reason, r.not_present, r.level) == (FR_READ, True, 4)
    assert (w.reason, w.not_present) == (FR_WRITE, True)


def test_write_to_read_only_leaf_faults_0x5() -> None:
    mem, pt = _pt()
    pt.map(0x2000, _frame(mem) << PAGE_SHIFT, read=True, write=False)
    assert pt.walk(0x2000, write=False).read
    err = _fault(pt, 0x2abc, write=True)
    assert (err.reason, err.level, err.not_present) == (FR_WRITE, 1, False)


@pytest.mark.parametrize(("agaw", "ok", "bad"), [(39, (1 << 39) - 4096, 1 << 39),
                                                 (48, (1 << 48) - 4096, 1 << 48)])
def test_address_beyond_agaw_faults_0x4_before_any_walk(agaw: int, ok: int, bad: int) -> None:
    mem, pt = _pt(agaw)
    pt.map(ok, _frame(mem) << PAGE_SHIFT)
    assert pt.walk(ok, write=True).write
    err = _fault(pt, bad, write=False)
    assert err.reason == FR_ADDR_BEYOND_AGAW and err.level is None


# ------------------------------------------------------------------- reserved fields (0xC)
def _leaf_ea(pt: IoPageTable, iova: int) -> int:
    found = pt.leaf_address(iova)
    assert found is not None
    return found[0]


@pytest.mark.parametrize("bit", [11, 51, 46, 62])   # SNP without snoop control, > HAW, TM
def test_reserved_bit_in_a_present_leaf_faults_0xc(bit: int) -> None:
    mem, pt = _pt()
    pt.map(0x3000, _frame(mem) << PAGE_SHIFT)
    ea = _leaf_ea(pt, 0x3000)
    mem.write_u64(ea, mem.read_u64(ea) | (1 << bit))
    err = _fault(pt, 0x3000, write=False)
    assert (err.reason, err.level) == (FR_PAGING_ENTRY_RESERVED, 1)


def test_reserved_bits_in_a_not_present_entry_are_ignored() -> None:
    # 0xC applies to entries "with at least one of R and W set"; R=W=0 is simply not present.
    mem, pt = _pt()
    pt.map(0x3000, _frame(mem) << PAGE_SHIFT)
    ea = _leaf_ea(pt, 0x3000)
    mem.write_u64(ea, 1 << 11)
    err = _fault(pt, 0x3000, write=False)
    assert (err.reason, err.not_present) == (FR_READ, True)


def test_ps_in_the_top_level_and_unaligned_large_page_are_reserved() -> None:
    mem, pt = _pt()
    pt.map(0x5000, _frame(mem) << PAGE_SHIFT)
    ea4 = (pt.root << PAGE_SHIFT) + 8 * IoPageTable.index(0x5000, 4)
    mem.write_u64(ea4, mem.read_u64(ea4) | SL_PS)
    assert _fault(pt, 0x5000, write=False).reason == FR_PAGING_ENTRY_RESERVED
    # A 2 MiB leaf whose address has bits 20:12 set.
    mem2, pt2 = _pt()
    block = mem2.alloc(9, owner="huge")
    assert isinstance(block, int)
    pt2.map(0x4000_0000, block << PAGE_SHIFT, size=2 * MiB)
    ea = _leaf_ea(pt2, 0x4000_0000)
    mem2.write_u64(ea, mem2.read_u64(ea) | (1 << 13))
    assert _fault(pt2, 0x4000_0000, write=False).reason == FR_PAGING_ENTRY_RESERVED


def test_next_table_pointer_outside_memory_faults_0x7() -> None:
    mem, pt = _pt()
    pt.map(0x6000, _frame(mem) << PAGE_SHIFT)
    ea4 = (pt.root << PAGE_SHIFT) + 8 * IoPageTable.index(0x6000, 4)
    mem.write_u64(ea4, (mem.nframes + 5) << PAGE_SHIFT | SL_R | SL_W)
    err = _fault(pt, 0x6000, write=False)
    assert (err.reason, err.level) == (FR_PAGING_ENTRY_INVALID, 3)


def test_large_pages_translate_every_offset() -> None:
    mem, pt = _pt()
    block = mem.alloc(9, owner="huge")
    assert isinstance(block, int)
    pt.map(0x8000_0000, block << PAGE_SHIFT, size=2 * MiB, read=True, write=False)
    tr = pt.walk(0x8000_0000 + 0x12_3456, write=False)
    assert tr.page_size == 2 * MiB and tr.paddr_base == block << PAGE_SHIFT
    assert [lvl for lvl, _ in pt.entries(0x8000_0000)] == [4, 3, 2]


def test_map_refuses_bad_input() -> None:
    mem, pt = _pt()
    pfn = _frame(mem)
    with pytest.raises(IommuError, match="aligned"):
        pt.map(0x1001, pfn << PAGE_SHIFT)
    with pytest.raises(IommuError, match="page size"):
        pt.map(0x1000, pfn << PAGE_SHIFT, size=8192)
    with pytest.raises(IommuError, match="not-present"):
        pt.map(0x1000, pfn << PAGE_SHIFT, read=False, write=False)
    pt.map(0x1000, pfn << PAGE_SHIFT)
    with pytest.raises(IommuError, match="already mapped"):
        pt.map(0x1000, pfn << PAGE_SHIFT)


# ------------------------------------------------------------------------------------ IOTLB (6)
def _entry(did: int, iova: int, size: int = PAGE_SIZE) -> IotlbEntry:
    return IotlbEntry(did, iova, size, 0x10_0000, True, True, None)


def test_iotlb_hits_misses_and_page_selective_invalidation() -> None:
    tlb = IOTLB(8)
    assert tlb.lookup(1, 0x1000) is None
    tlb.fill(_entry(1, 0x1000))
    tlb.fill(_entry(1, 0x2000))
    assert tlb.lookup(1, 0x1fff) is not None
    assert tlb.stats["hits"] == 1 and tlb.stats["misses"] == 1
    assert tlb.lookup(2, 0x1000) is None            # tagged by domain id
    assert tlb.invalidate_page(1, 0x1000) == 1      # AM=0: one page only
    assert not tlb.contains(1, 0x1000) and tlb.contains(1, 0x2000)


def test_psi_address_mask_covers_aligned_block_and_overlapping_large_pages() -> None:
    tlb = IOTLB(16)
    for k in range(8):
        tlb.fill(_entry(1, k * PAGE_SIZE))
    tlb.fill(_entry(1, 0x20_0000, 2 * MiB))
    assert tlb.invalidate_page(1, 0x1000, am=2) == 4       # pages 0..3 (aligned down)
    assert tlb.contains(1, 0x4000) and not tlb.contains(1, 0x3000)
    assert tlb.invalidate_page(1, 0x20_5000) == 1          # 4 KiB PSI inside a 2 MiB entry
    assert not tlb.contains(1, 0x20_0000)


def test_domain_and_global_invalidation() -> None:
    tlb = IOTLB(16)
    for did in (1, 2):
        for k in range(3):
            tlb.fill(_entry(did, k * PAGE_SIZE))
    assert tlb.invalidate_domain(1) == 3
    assert len(tlb) == 3 and tlb.contains(2, 0)
    assert tlb.invalidate_global() == 3 and len(tlb) == 0
    s = tlb.stats
    assert (s["inv_domain"], s["inv_global"], s["entries_invalidated"]) == (1, 1, 6)


def test_iotlb_is_lru_with_bounded_capacity() -> None:
    tlb = IOTLB(2)
    tlb.fill(_entry(1, 0x1000))
    tlb.fill(_entry(1, 0x2000))
    tlb.lookup(1, 0x1000)
    tlb.fill(_entry(1, 0x3000))
    assert tlb.contains(1, 0x1000) and not tlb.contains(1, 0x2000)
    assert tlb.stats["evictions"] == 1


def test_a_cached_translation_survives_a_pte_change_until_invalidated() -> None:
    # Caching is architectural (ch. 6): clearing a PTE without invalidating leaves the IOTLB
    # translating; only the invalidation makes the change visible. Only successful translations
    # are cached with CM=0 (ch. 6, "Caching Mode"), so a fault is never cached.
    mem = PhysicalMemory(64 * MiB)
    iommu = Iommu(mem)
    dev = iommu.add_device("nic")
    pfn = _frame(mem)
    iova, _ = iommu.dma_map(dev, [pfn], "bidirectional")
    assert iommu.translate(dev, iova, DmaAccess.READ) is not None
    domain = iommu.domain_of(dev)
    domain.pagetable.unmap(iova)                    # behind the driver's back
    assert iommu.translate(dev, iova, DmaAccess.READ) is not None   # stale hit
    iommu.iotlb.invalidate_page(domain.did, iova)
    assert iommu.translate(dev, iova, DmaAccess.READ) is None
    assert iommu.translate(dev, iova, DmaAccess.READ) is None
    assert iommu.iotlb.stats["fills"] == 1          # neither fault was cached
    assert [f.reason for f in iommu.faults] == [FR_READ, FR_READ]


# ------------------------------------------------------------------- context and root entries
def test_detached_device_faults_context_not_present_and_removed_bus_root() -> None:
    mem = PhysicalMemory(64 * MiB)
    iommu = Iommu(mem)
    a = iommu.add_device("a")
    iommu.detach(a)
    assert iommu.translate(a, 0x1000, DmaAccess.READ) is None
    assert iommu.faults[-1].reason == FR_CONTEXT_NOT_PRESENT
    iommu2 = Iommu(PhysicalMemory(16 * MiB))
    b = iommu2.add_device("b")
    iommu2.remove_device(b)                          # the last device on bus 0
    assert iommu2.translate(b, 0x1000, DmaAccess.WRITE) is None
    assert iommu2.faults[-1].reason == FR_ROOT_NOT_PRESENT
    assert "0x1" in iommu2.faults[-1].describe()


# -------------------------------------------------------------------------- IOVA allocator
def test_iova_allocation_is_top_down_below_the_limit() -> None:
    iovad = IovaDomain()
    limit = (1 << 20) - 1                            # 4 GiB in pages, inclusive
    first = iovad.alloc_iova(1, limit)
    second = iovad.alloc_iova(1, limit)
    assert (first, second) == (0xFFFFF, 0xFFFFE)


def test_iova_allocation_is_size_aligned() -> None:
    # alloc_iova(): "the allocated address iova->pfn_lo will be naturally aligned on
    # roundup_power_of_two(size)".
    iovad = IovaDomain()
    iovad.alloc_iova(1, 0xFFFFF)                     # 0xfffff
    three = iovad.alloc_iova(3, 0xFFFFF)
    assert three == 0xFFFFC                          # pages 0xffffc..0xffffe, 4-aligned
    eight = iovad.alloc_iova(8, 0xFFFFF)
    assert eight is not None and eight % 8 == 0


def test_freed_hole_is_found_again_through_the_cached_node_update() -> None:
    iovad = IovaDomain(rcache=False)
    a = iovad.alloc_iova(64, 0xFFFFF)
    b = iovad.alloc_iova(64, 0xFFFFF)
    assert a is not None and b is not None and b < a
    iovad.free_iova(a)                               # __cached_rbnode_delete_update()
    assert iovad.alloc_iova(64, 0xFFFFF) == a


def test_exhaustion_below_a_limit_fails_cleanly() -> None:
    iovad = IovaDomain(start_pfn=1)
    assert iovad.alloc_iova(8, 15) == 8
    assert iovad.alloc_iova(4, 15) == 4
    assert iovad.alloc_iova(4, 15) is None           # pfns 1..3 are left, 4 do not fit
    assert iovad.alloc_iova(2, 15) == 2
    assert iovad.stats["failed"] == 1


def test_rcache_returns_recently_freed_small_ranges() -> None:
    iovad = IovaDomain()
    pfn = iovad.alloc_iova_fast(3, 0xFFFFF)          # rounded to 4 pages
    assert pfn is not None and pfn % 4 == 0
    iovad.free_iova_fast(pfn, 3)
    assert iovad.cached_count() == 1
    assert iovad.find(pfn) is not None               # still reserved in the tree while cached
    assert iovad.alloc_iova_fast(4, 0xFFFFF) == pfn
    assert iovad.stats["rcache_hits"] == 1
    # Above 32 pages the rcache is not used (IOVA_RANGE_CACHE_MAX_SIZE = 6).
    big = iovad.alloc_iova_fast(64, 0xFFFFF)
    assert big is not None
    iovad.free_iova_fast(big, 64)
    assert iovad.find(big) is None


def test_dma_domains_reserve_the_msi_window() -> None:
    mem = PhysicalMemory(64 * MiB)
    iommu = Iommu(mem)
    iommu.add_device("gpu", dma_bits=32)
    domain = iommu.domain_of("gpu")
    lo, hi = MSI_WINDOW[0] >> PAGE_SHIFT, MSI_WINDOW[1] >> PAGE_SHIFT
    assert domain.iovad.find(lo) == (lo, hi)
    # A 1 GiB range cannot sit at 0xc0000000 (it would cover the window): it goes lower.
    pfn = domain.iovad.alloc_iova_fast(1 << 18, (1 << 20) - 1)
    assert pfn == 0x80000


def test_32bit_device_gets_iovas_below_4g_and_64bit_prefers_them_too() -> None:
    mem = PhysicalMemory(64 * MiB)
    iommu = Iommu(mem)
    old = iommu.add_device("old", dma_bits=32)
    new = iommu.add_device("new", dma_bits=64)
    for dev in (old, new):
        iova, length = iommu.dma_map(dev, [_frame(mem)], "to_device")
        # iommu_dma_alloc_iova(): PCI devices try 32-bit IOVAs first (SAC), top-down.
        assert iova == 0xFFFF_F000 and length == PAGE_SIZE


def test_forcedac_allocates_at_the_top_of_the_domain() -> None:
    mem = PhysicalMemory(64 * MiB)
    iommu = Iommu(mem, forcedac=True)
    dev = iommu.add_device("nvme", dma_bits=64)
    iova, _ = iommu.dma_map(dev, [_frame(mem)], "to_device")
    assert iova == (1 << 48) - PAGE_SIZE             # aperture end of a 48-bit domain
    narrow = iommu.add_device("narrow", dma_bits=40)
    iova, _ = iommu.dma_map(narrow, [_frame(mem)], "to_device")
    assert iova == (1 << 40) - PAGE_SIZE             # the device's DMA mask is the limit


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([1, 2, 3, 5, 8, 17, 33, 64]),
                          st.sampled_from([0x3FF, 0xFFF, 0xFFFFF, (1 << 36) - 1]),
                          st.integers(0, 1 << 16)), max_size=80),
       st.booleans())
def test_iova_ranges_never_overlap_and_respect_the_limit(
        ops: list[tuple[bool, int, int, int]], rcache: bool) -> None:
    # iova.c invariants: every allocation lies in [start_pfn, limit_pfn], is aligned to its
    # rounded size, and never overlaps another allocation or a reserved range.
    iovad = IovaDomain(rcache=rcache)
    iovad.reserve(0x100, 0x10F)
    live: dict[int, int] = {}
    for alloc, size, limit, pick in ops:
        if not alloc and live:
            lo = sorted(live)[pick % len(live)]
            iovad.free_iova_fast(lo, live.pop(lo))
            continue
        pfn = iovad.alloc_iova_fast(size, limit)
        if pfn is None:
            continue
        span = IovaDomain._round(size)
        assert 1 <= pfn and pfn + span - 1 <= limit
        assert pfn % (1 << (span - 1).bit_length()) == 0
        assert pfn + span - 1 < 0x100 or pfn > 0x10F
        for lo, other in live.items():
            assert pfn + span - 1 < lo or lo + IovaDomain._round(other) - 1 < pfn
        live[pfn] = size
