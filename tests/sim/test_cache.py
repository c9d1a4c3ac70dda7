"""The VIPT L1 model and page colouring.

Rules checked (Hennessy & Patterson, Computer Architecture 6th ed., appendix B.3 "Avoiding address
translation during indexing of the cache"; the colouring argument of the source document):
- the set index comes from virtual-address bits, the tag from the physical frame;
- colours = max(1, (size / ways) / page size); a way no larger than a page cannot alias;
- synonyms (one physical line, two virtual colours) land in two sets and a store through one leaves
  the other stale;
- with colouring (colour(vaddr) == colour(paddr) for every mapping) synonyms never happen.
"""

from __future__ import annotations

import pytest

from migrate.sim.cache import CacheGeometry, PageColouring, VIPTCache
from migrate.sim.physmem import PAGE_SIZE, PhysicalMemory


@pytest.mark.parametrize(
    ("size", "ways", "colours"),
    [
        (32 * 1024, 8, 1),    # typical x86 L1D (Intel since Nehalem): 4 KiB per way
        (48 * 1024, 12, 1),   # Golden Cove / Zen 5 style L1D: 4 KiB per way
        (16 * 1024, 4, 1),
        (32 * 1024, 4, 2),    # 8 KiB ways: one colour bit (e.g. ARM Cortex-A9 32 KiB 4-way)
        (64 * 1024, 2, 8),    # 32 KiB ways: three colour bits
        (4 * 1024, 1, 1),     # direct-mapped, one page
        (32 * 1024, 1, 8),    # direct-mapped 32 KiB
    ],
)
def test_colours_follow_from_geometry(size: int, ways: int, colours: int) -> None:
    g = CacheGeometry(size, ways, 64)
    assert g.colours == colours
    assert g.aliasing is (colours > 1)
    assert g.sets * g.ways * g.line_size == size


def test_index_bits_are_virtual_bits_above_the_line_offset() -> None:
    g = CacheGeometry(32 * 1024, 4, 64)        # 128 sets: index = bits 6..12
    assert g.sets == 128
    assert g.index_bits == (6, 12)
    assert g.set_index(0x1000) == 0x40          # bit 12 is an index bit: a colour bit
    assert g.colour(0x1000) == 1 and g.colour(0x2000) == 0


@pytest.mark.parametrize("bad", [{"size": 3000, "ways": 4}, {"size": 32768, "ways": 3},
                                 {"size": 0, "ways": 1}, {"size": 3 * 4096, "ways": 1},
                                 {"size": 32768, "ways": 8, "line_size": 48},
                                 {"size": 256, "ways": 8, "line_size": 64}])
def test_bad_geometry_is_a_clear_error(bad: dict) -> None:
    with pytest.raises(ValueError):
        CacheGeometry(**bad)


def test_access_with_mismatched_page_offset_is_rejected() -> None:
    mem = PhysicalMemory(1 << 20)
    cache = VIPTCache.build(mem, 32 * 1024, 4)
    with pytest.raises(ValueError, match="page offset"):
        cache.read(0x1004, 0x5008, 4)


def _two_synonyms(mem: PhysicalMemory,
                  geometry: tuple[int, int]) -> tuple[VIPTCache, int, int, int]:
    cache = VIPTCache.build(mem, *geometry)
    pfn = mem.alloc(owner="shared")
    assert isinstance(pfn, int)
    paddr = pfn * PAGE_SIZE
    va1 = 0x10_0000                     # colour 0
    va2 = 0x20_0000 + PAGE_SIZE         # colour 1 on a 2-colour cache
    return cache, paddr, va1, va2


def test_synonyms_on_an_aliasing_cache_give_a_stale_read() -> None:
    mem = PhysicalMemory(1 << 20)
    cache, paddr, va1, va2 = _two_synonyms(mem, (32 * 1024, 4))   # 2 colours
    mem.write(paddr, b"old!")
    assert cache.read(va1, paddr, 4) == b"old!"
    assert cache.read(va2, paddr, 4) == b"old!"
    # The same physical line now lives in two sets.
    assert cache.synonyms == 1
    assert cache.resident_synonyms() == 1
    assert cache.geometry.set_index(va1) != cache.geometry.set_index(va2)
    cache.write(va1, paddr, b"new!")
    assert cache.read(va1, paddr, 4) == b"new!"
    stale = cache.read(va2, paddr, 4)
    assert stale == b"old!"                      # the coherency problem synonyms cause
    assert cache.stats["stale_reads"] == 1


def test_same_access_pattern_on_a_non_aliasing_cache_is_coherent() -> None:
    mem = PhysicalMemory(1 << 20)
    cache, paddr, va1, va2 = _two_synonyms(mem, (32 * 1024, 8))   # 1 colour (x86-like)
    mem.write(paddr, b"old!")
    cache.read(va1, paddr, 4)
    cache.read(va2, paddr, 4)
    assert cache.geometry.set_index(va1) == cache.geometry.set_index(va2)
    cache.write(va1, paddr, b"new!")
    assert cache.read(va2, paddr, 4) == b"new!"
    assert cache.synonyms == 0 and cache.stats["stale_reads"] == 0


def test_write_back_reaches_memory_only_on_eviction_or_flush() -> None:
    mem = PhysicalMemory(1 << 20)
    cache = VIPTCache.build(mem, 32 * 1024, 8)
    pfn = mem.alloc(owner="t")
    assert isinstance(pfn, int)
    cache.write(0x4000, pfn * PAGE_SIZE, b"dirty")
    assert mem.read(pfn * PAGE_SIZE, 5) == bytes(5)
    assert cache.flush() == 1
    assert mem.read(pfn * PAGE_SIZE, 5) == b"dirty"


def test_lru_eviction_within_a_set() -> None:
    mem = PhysicalMemory(1 << 22)
    cache = VIPTCache.build(mem, 4 * 1024, 2, 64)     # 32 sets, 2 ways
    stride = cache.geometry.way_size                   # same set, different tags
    for i in range(3):
        cache.read(i * stride, i * stride, 1)
    assert cache.stats["evictions"] == 1
    cache.read(2 * stride, 2 * stride, 1)
    cache.read(1 * stride, 1 * stride, 1)
    assert cache.stats["hits"] == 2
    cache.read(0, 0, 1)                                # evicted first: a miss again
    assert cache.stats["misses"] == 4


def test_dma_write_snoops_the_cache() -> None:
    # x86 DMA is coherent: an external write invalidates cached copies (after writing back dirty
    # ones), so the CPU then reads what the device wrote.
    mem = PhysicalMemory(1 << 20)
    cache = VIPTCache.build(mem, 32 * 1024, 8)
    pfn = mem.alloc(owner="t")
    assert isinstance(pfn, int)
    pa = pfn * PAGE_SIZE
    cache.write(0x7000, pa, b"cpu")
    mem.write(pa + 8, b"dev", writer="dev:nic")
    assert cache.stats["snoop_invalidations"] == 1
    assert mem.read(pa, 3) == b"cpu"                    # written back before the DMA landed
    assert cache.read(0x7000, pa + 0, 3) == b"cpu"
    assert cache.read(0x7008, pa + 8, 3) == b"dev"


def test_colouring_picker_returns_frames_of_the_requested_colour() -> None:
    mem = PhysicalMemory(1 << 22)
    g = CacheGeometry(64 * 1024, 2)            # 8 colours
    picker = PageColouring(g, mem)
    for colour in [3, 0, 7, 3, 5, 1, 1, 6]:
        pfn = picker.pick(colour, owner="p")
        assert pfn % 8 == colour
        assert mem.frame(pfn).owner == "p"
    assert picker.stats["from_pool"] > 0       # frames met on the way are reused, not leaked
    pooled = picker.pooled()
    assert picker.release() == pooled and picker.pooled() == 0


def test_colouring_off_ignores_colour_and_bad_colour_is_rejected() -> None:
    mem = PhysicalMemory(1 << 22)
    g = CacheGeometry(64 * 1024, 2)
    picker = PageColouring(g, mem)
    with pytest.raises(ValueError, match="colour"):
        picker.pick(8)
    off = PageColouring(g, mem, enabled=False)
    first = off.pick(5)
    assert off.pick(5) == first + 1             # plain buddy order: lowest free frame next


def test_align_address_gives_the_colour_asked_for() -> None:
    mem = PhysicalMemory(1 << 22)
    g = CacheGeometry(64 * 1024, 2)
    picker = PageColouring(g, mem)
    for colour in range(8):
        addr = picker.align_address(0x7000_1234, colour)
        assert addr >= 0x7000_1234 and addr % PAGE_SIZE == 0
        assert g.colour(addr) == colour


# ----------------------------------------------------------------------------- on the machine
def test_machine_cache_defaults_to_a_non_aliasing_x86_l1d() -> None:
    from migrate.sim import Machine

    m = Machine(memory=16 << 20)
    assert (m.cache.geometry.size, m.cache.geometry.ways) == (32 * 1024, 8)
    assert m.cache.colours == 1 and m.cache.synonyms == 0
    assert set(m.cache.stats) >= {"hits", "misses", "synonyms", "stale_reads", "writebacks"}
    m.set_cache(64 * 1024, 2)
    assert m.cache.colours == 8


@pytest.mark.parametrize(("size", "ways"), [(32 * 1024, 4), (64 * 1024, 2)])
def test_shared_mappings_alias_without_colouring_and_not_with_it(size: int, ways: int) -> None:
    from migrate.sim import Machine
    from migrate.sim.cache import shared_mapping_experiment

    m = Machine(memory=64 << 20)
    m.set_cache(size, ways)
    off = shared_mapping_experiment(m, colouring=False)
    on = shared_mapping_experiment(m, colouring=True)
    assert len(set(off["mapping_colours"])) > 1
    assert off["synonyms"] > 0 and off["stale_reads"] > 0 and off["stale_values_seen"] > 0
    # Colouring: every mapping's virtual colour equals its frame's, so one set per line.
    assert all(fc == (mc + i) % m.cache.colours
               for mc in on["mapping_colours"] for i, fc in enumerate(on["frame_colours"]))
    assert on["synonyms"] == 0 and on["stale_reads"] == 0 and on["stale_values_seen"] == 0


@pytest.mark.parametrize(("size", "ways"), [(32 * 1024, 8), (48 * 1024, 12)])
def test_non_aliasing_geometry_has_no_synonyms_even_without_colouring(size: int, ways: int) -> None:
    from migrate.sim import Machine
    from migrate.sim.cache import shared_mapping_experiment

    m = Machine(memory=64 << 20)
    m.set_cache(size, ways)
    off = shared_mapping_experiment(m, colouring=False)
    assert off["geometry"]["colours"] == 1
    assert off["synonyms"] == 0 and off["stale_values_seen"] == 0


@pytest.mark.host
def test_host_l1d_geometry_from_sysfs() -> None:
    from pathlib import Path

    from migrate.sim.cache import host_l1d_geometry

    g = host_l1d_geometry()
    if g is None:
        pytest.skip("this kernel exposes no /sys/devices/system/cpu/cpu0/cache level-1 data entry")
    index0 = Path("/sys/devices/system/cpu/cpu0/cache/index0")
    if (index0 / "number_of_sets").exists() and (index0 / "level").read_text().strip() == "1":
        # The kernel's own set count agrees with size / (ways x line).
        assert g.sets == int((index0 / "number_of_sets").read_text())
    assert g.colours == max(1, g.size // g.ways // g.page_size)


def test_host_l1d_geometry_parses_a_fake_sysfs_tree(tmp_path: pytest.TempPathFactory) -> None:
    from migrate.sim.cache import host_l1d_geometry

    idx = tmp_path / "cpu0" / "cache" / "index0"  # type: ignore[operator]
    idx.mkdir(parents=True)
    for name, value in {"level": "1", "type": "Data", "size": "32K",
                        "ways_of_associativity": "4", "coherency_line_size": "64"}.items():
        (idx / name).write_text(value + "\n")
    g = host_l1d_geometry(root=str(tmp_path))
    assert g is not None and (g.size, g.ways, g.line_size) == (32768, 4, 64) and g.colours == 2
    assert host_l1d_geometry(root=str(tmp_path / "nowhere")) is None  # type: ignore[operator]


@pytest.mark.parametrize(("size", "ways"), [(32 * 1024, 4), (64 * 1024, 2)])
def test_kernel_colours_page_cache_and_shared_mappings(size: int, ways: int) -> None:
    # The OS model with the colouring hook: page-cache frames get colour = file index, shared
    # mmaps are colour-aligned to their offset (as arch_get_unmapped_area does with COLOUR_ALIGN
    # on aliasing architectures), so every mapping of a frame indexes the same set.
    from migrate.sim import Machine
    from migrate.sim.cache import kernel_shared_file_experiment

    off_machine = Machine(memory=64 << 20)
    off_machine.set_cache(size, ways)
    off = kernel_shared_file_experiment(off_machine, colouring=False)
    assert not off["colours_agree"] and off["synonyms"] > 0 and off["stale_values_seen"] > 0
    on_machine = Machine(memory=64 << 20)
    on_machine.set_cache(size, ways)
    on = kernel_shared_file_experiment(on_machine, colouring=True)
    assert on["colours_agree"] and on["synonyms"] == 0 and on["stale_reads"] == 0
    assert on["stale_values_seen"] == 0
    assert on_machine.kernel.frame_picker is on_machine.page_colouring
    on_machine.set_page_colouring(False)
    assert on_machine.kernel.frame_picker is None


def test_kernel_colouring_on_a_non_aliasing_cache_changes_nothing() -> None:
    from migrate.sim import Machine
    from migrate.sim.cache import kernel_shared_file_experiment

    m = Machine(memory=64 << 20)
    r = kernel_shared_file_experiment(m, colouring=False)     # default 32 KiB 8-way: 1 colour
    assert r["geometry"]["colours"] == 1 and r["synonyms"] == 0 and r["colours_agree"]
