"""The OS model's behaviours, each after the Linux code it models (mm/, arch/x86/mm/)."""

from __future__ import annotations

import pytest

from migrate.sim import Machine
from migrate.sim.kernel import KernelError, Signal
from migrate.sim.mmu import PF_ID, PF_P, PF_PK, PF_US, PF_WR
from migrate.sim.physmem import PAGE_SIZE

PG = PAGE_SIZE


@pytest.fixture
def machine() -> Machine:
    return Machine(cores=2, memory=128 << 20)


# ------------------------------------------------------------------ anonymous memory
def test_reads_of_fresh_anonymous_memory_map_the_shared_zero_page(machine) -> None:
    """mm/memory.c do_anonymous_page: a read fault maps the zero page read-only; RSS (which does
    not count the zero page) stays 0; a write allocates exactly one frame per page written."""
    p = machine.kernel.spawn()
    a = p.mmap(None, 256 * PG, "rw")
    for i in range(256):
        assert p.read(a + i * PG, 8) == bytes(8)
    assert {p.frame_of(a + i * PG) for i in range(256)} == {machine.physmem.zero_frame}
    assert p.rss_pages() == 0
    assert {r.resolution for r in p.fault_log} == {"zero-page"}
    for i in range(0, 256, 4):
        p.write(a + i * PG, b"x")
    assert p.rss_pages() == 64
    assert p.fault_log[-1].resolution == "cow"  # wp fault on the zero page: a fresh frame
    assert p.fault_log[-1].error_code == PF_P | PF_WR | PF_US
    assert len({p.frame_of(a + i * PG) for i in range(0, 256, 4)}) == 64


def test_first_write_is_demand_zero(machine) -> None:
    p = machine.kernel.spawn()
    a = p.mmap(None, PG, "rw")
    p.write(a + 10, b"abc")
    rec = p.fault_log[-1]
    assert rec.resolution == "demand-zero"
    assert rec.error_code == PF_WR | PF_US  # not present
    assert p.read(a, 16) == bytes(10) + b"abc" + bytes(3)
    assert p.pte(a).dirty and p.pte(a).accessed  # set by the MMU on the store


def test_fork_shares_frames_copy_on_write(machine) -> None:
    """kernel/fork.c + mm/memory.c wp_page_copy: after fork both map the same frames read-only;
    the first write by either copies; the other keeps the original; an exclusive page is reused."""
    k = machine.kernel
    parent = k.spawn("parent")
    a = parent.mmap(None, 2 * PG, "rw")
    parent.write(a, b"original")
    parent.write(a + PG, b"second")
    frame = parent.frame_of(a)
    child = parent.fork()
    assert child.frame_of(a) == frame
    assert machine.physmem.frame(frame).refcount == 2
    assert not parent.pte(a).writable and not child.pte(a).writable
    child.write(a, b"CHILD")
    assert child.fault_log[-1].resolution == "cow"
    assert child.frame_of(a) != frame
    assert parent.read(a, 8) == b"original"
    assert child.read(a, 8) == b"CHILDnal"
    assert machine.physmem.frame(frame).refcount == 1
    parent.write(a, b"P")
    assert parent.fault_log[-1].resolution == "reuse"  # exclusive again: no copy
    assert parent.frame_of(a) == frame


def test_fork_write_protects_the_parents_cached_translation(machine) -> None:
    """After fork, the parent's TLB entry (writable, dirty) must not let it write the shared
    frame: fork flushes the parent's TLB, so the write faults and copies."""
    parent = machine.kernel.spawn()
    a = parent.mmap(None, PG, "rw")
    parent.write(a, b"before")
    child = parent.fork()
    parent.write(a, b"after!")
    assert parent.fault_log[-1].resolution == "cow"
    assert child.read(a, 6) == b"before"


# ------------------------------------------------------------------ files
def test_shared_and_private_file_mappings(machine) -> None:
    """MAP_SHARED writes go to the page-cache frame, seen by every mapper and the file;
    MAP_PRIVATE writes get a private copy (COW) and leave the file alone."""
    k = machine.kernel
    f = k.create_file("data.bin", 4 * PG, {0: b"file-content"})
    p1, p2 = k.spawn("p1"), k.spawn("p2")
    s1 = p1.mmap(None, 4 * PG, "rw", shared=True, file="data.bin")
    s2 = p2.mmap(None, 4 * PG, "rw", shared=True, file="data.bin")
    priv = p2.mmap(None, 4 * PG, "rw", file="data.bin")
    assert p1.read(s1, 12) == b"file-content"
    assert p1.fault_log[-1].resolution == "file"
    p1.write(s1, b"FILE")
    assert p2.read(s2, 12) == b"FILE-content"
    assert p1.frame_of(s1) == p2.frame_of(s2) == f.pages[0]
    assert p1.pte(s1).dirty  # writeback would find the page through the PTE's D bit
    assert machine.physmem.read(f.pages[0] << 12, 4) == b"FILE"
    assert p2.read(priv, 12) == b"FILE-content"  # private read maps the page-cache frame
    assert p2.frame_of(priv) == f.pages[0]
    p2.write(priv, b"mine")
    assert p2.fault_log[-1].resolution == "cow"
    assert p2.frame_of(priv) != f.pages[0]
    assert p1.read(s1, 12) == b"FILE-content"
    assert p2.read(priv, 12) == b"mine-content"


def test_sparse_file_holes_read_the_zero_page_and_eof_is_sigbus(machine) -> None:
    """Holes read as zeros without allocating (the model serves them from the zero frame);
    access past the page containing EOF raises SIGBUS (mm/filemap.c filemap_fault)."""
    k = machine.kernel
    size = 64 * PG + 100
    f = k.create_file("sparse", size, {10 * PG: b"island"})
    p = k.spawn()
    a = p.mmap(None, 80 * PG, "r", file="sparse")
    assert p.read(a + 3 * PG, 16) == bytes(16)
    assert p.frame_of(a + 3 * PG) == machine.physmem.zero_frame
    assert p.fault_log[-1].resolution == "file-hole"
    assert p.read(a + 10 * PG, 6) == b"island"
    assert f.allocated_blocks() == 1
    assert len(f.pages) == 1
    assert p.read(a + 64 * PG + 200, 4) == bytes(4)  # same page as EOF: zeros, no signal
    with pytest.raises(Signal) as info:
        p.read(a + 65 * PG, 1)
    assert info.value.signo == "SIGBUS" and info.value.si_code == "BUS_ADRERR"
    assert p.fault_log[-1].resolution == "sigbus"


def test_shared_write_into_hole_allocates_a_block(machine) -> None:
    k = machine.kernel
    f = k.create_file("holey", 8 * PG)
    p = k.spawn()
    a = p.mmap(None, 8 * PG, "rw", shared=True, file="holey")
    p.read(a + PG, 1)
    assert f.allocated_blocks() == 0
    p.write(a + PG, b"data")
    assert f.allocated_blocks() == 1
    assert p.frame_of(a + PG) == f.pages[1]


def test_shared_anonymous_memory_is_shared_across_fork(machine) -> None:
    p = machine.kernel.spawn()
    a = p.mmap(None, 2 * PG, "rw", shared=True)
    child = p.fork()
    child.write(a + PG, b"from child")  # page never touched before fork
    assert p.read(a + PG, 10) == b"from child"


# ------------------------------------------------------------------ signals and the stack
def test_segv_codes_and_error_codes(machine) -> None:
    """arch/x86/mm/fault.c: no VMA -> SEGV_MAPERR; VMA forbids the access -> SEGV_ACCERR; a
    fetch from a non-executable page faults with I/D=1 and is ACCERR (W^X / NX)."""
    p = machine.kernel.spawn()
    with pytest.raises(Signal) as info:
        p.read(0x10000, 1)
    assert (info.value.signo, info.value.si_code) == ("SIGSEGV", "SEGV_MAPERR")
    ro = p.mmap(None, PG, "r")
    with pytest.raises(Signal) as info:
        p.write(ro, b"x")
    assert info.value.si_code == "SEGV_ACCERR"
    data = p.mmap(None, PG, "rw")
    p.write(data, b"\xc3")
    with pytest.raises(Signal) as info:
        p.execute(data)
    assert info.value.si_code == "SEGV_ACCERR"
    assert info.value.error_code == PF_P | PF_US | PF_ID
    p.mprotect(data, PG, "rx")
    assert p.execute(data) == b"\xc3"


def test_guard_page_catches_a_one_byte_overflow_at_the_exact_address(machine) -> None:
    p = machine.kernel.spawn()
    region = p.mmap(None, 2 * PG, "rw")
    p.mprotect(region + PG, PG, "")
    buf = region + PG - 16
    p.write(buf, bytes(16))
    with pytest.raises(Signal) as info:
        p.write(buf, bytes(17))
    assert info.value.address == region + PG
    assert info.value.si_code == "SEGV_ACCERR"


def test_stack_grows_down_through_faults(machine) -> None:
    """mm/mmap.c expand_downwards: a fault below the stack VMA grows it."""
    p = machine.kernel.spawn(stack_size=PG)
    stack = p.stack_vma
    top = stack.end
    for depth in range(1, 20):
        p.write(top - depth * PG, b"frame")
    assert stack.start == top - 19 * PG
    assert sum(r.resolution == "stack-grow" for r in p.fault_log) == 18


def test_stack_refuses_to_grow_within_the_guard_gap(machine) -> None:
    """mm/mmap.c: stack_guard_gap = 256 pages; growth that would come closer than that to the
    mapping below fails, and the access is SIGSEGV (MAPERR)."""
    p = machine.kernel.spawn(stack_size=PG)
    stack = p.stack_vma
    below = p.mmap(stack.start - 300 * PG, PG, "rw", fixed=True)
    p.write(stack.start - 40 * PG, b"ok")  # 259 pages above the mapping: allowed
    with pytest.raises(Signal) as info:
        p.write(stack.start - 10 * PG, b"too close")  # within 256 pages of `below`
    assert info.value.si_code == "SEGV_MAPERR"
    assert below + PG + 256 * PG > stack.start - 10 * PG


def test_stack_growth_limited_by_rlimit(machine) -> None:
    p = machine.kernel.spawn(stack_size=PG)
    with pytest.raises(Signal):
        p.write(p.stack_vma.end - (9 << 20), b"x")  # beyond RLIMIT_STACK (8 MiB)


def test_mmap_does_not_place_mappings_in_the_stack_gap(machine) -> None:
    p = machine.kernel.spawn()
    stack = p.stack_vma
    hinted = p.mmap(stack.start - 10 * PG, PG, "rw")
    assert hinted != stack.start - 10 * PG  # the hint lies in the guard gap: not honoured


# ------------------------------------------------------------------ brk, mmap
def test_brk_grows_and_shrinks_the_heap(machine) -> None:
    p = machine.kernel.spawn()
    start = p.brk()
    p.brk(start + 3 * PG)
    p.write(start + 2 * PG, b"heap")
    assert any(v.name == "[heap]" for v in p.vmas)
    p.brk(start + PG)
    with pytest.raises(Signal):
        p.read(start + 2 * PG, 1)
    with pytest.raises(KernelError):
        p.brk(start - PG)


def test_mmap_fixed_replaces_and_hint_is_used_when_free(machine) -> None:
    p = machine.kernel.spawn()
    hint = 0x5000_0000
    assert p.mmap(hint, PG, "rw") == hint
    p.write(hint, b"old")
    assert p.mmap(hint, PG, "rw", fixed=True) == hint
    assert p.read(hint, 3) == bytes(3)
    assert p.mmap(hint, PG, "rw") != hint
    with pytest.raises(KernelError, match="EINVAL"):
        p.mmap(None, 0)
    with pytest.raises(KernelError, match="EINVAL"):
        p.mmap(None, PG, "rwq")


def test_munmap_frees_frames_and_signals_later_access(machine) -> None:
    p = machine.kernel.spawn()
    a = p.mmap(None, 4 * PG, "rw")
    for i in range(4):
        p.write(a + i * PG, b"x")
    free_before = machine.physmem.free_frames
    p.munmap(a, 4 * PG)
    assert machine.physmem.free_frames == free_before + 4
    assert p.rss_pages() == 0
    with pytest.raises(Signal):
        p.read(a, 1)


# ------------------------------------------------------------------ shootdowns
def two_core_process(machine):
    p = machine.kernel.spawn()
    a = p.mmap(None, 64 * PG, "rw")
    for cid in (0, 1):  # two threads of one mm, one per core, both dirtying the pages
        for i in range(64):
            p.write(a + i * PG, b"w", core=cid)
    return p, a


def test_mprotect_shootdown_ipis_the_other_core(machine) -> None:
    """arch/x86/mm/tlb.c flush_tlb_mm_range: the initiating core flushes locally, every other
    core running the mm gets an IPI; afterwards no core can write through an old entry."""
    k = machine.kernel
    p, a = two_core_process(machine)
    report = k.flush_tlb_range(p, a, a + PG, core=0)  # warm-up: check the report shape
    assert report["ipis"] == [1] and report["local"] == 0
    ipis = k.stats["ipis"]
    p.mprotect(a, PG, "r", core=0)
    assert k.stats["ipis"] == ipis + 1
    assert k.cores[1].ipis_received >= 2
    with pytest.raises(Signal):
        p.write(a, b"late", core=1)


def test_without_shootdown_the_other_core_writes_through_a_stale_entry(machine) -> None:
    """The hazard: mprotect(RO) without the IPI leaves core 1's writable+dirty TLB entry; its
    write succeeds and lands in the page that is now supposed to be read-only."""
    k = machine.kernel
    p, a = two_core_process(machine)
    p.mprotect(a, PG, "r", core=0, shootdown=False)
    assert not p.pte(a).writable
    p.write(a, b"STALE", core=1)  # no fault: served from core 1's TLB
    assert p.read(a, 5, core=0) == b"STALE"
    with pytest.raises(Signal):
        p.write(a, b"x", core=0)  # core 0 flushed locally and faults as it should
    assert k.stats["skipped_remote"] >= 1


def test_munmap_without_shootdown_is_a_use_after_free(machine) -> None:
    """munmap frees the frames after the flush; skip the remote flush and core 1 keeps writing
    into a frame the allocator has handed to another process."""
    k = machine.kernel
    p, a = two_core_process(machine)
    old_frames = {p.frame_of(a + i * PG): a + i * PG for i in range(64)}
    p.munmap(a, 64 * PG, core=0, shootdown=False)
    other = k.spawn("other")
    b = other.mmap(None, 64 * PG, "rw")
    for i in range(64):
        other.write(b + i * PG, b"mine", core=0)
    reused = [(b + i * PG, old_frames[other.frame_of(b + i * PG)]) for i in range(64)
              if other.frame_of(b + i * PG) in old_frames]
    assert reused, "freed frames were reallocated to the other process"
    other_va, stale_va = reused[0]
    # The old thread on core 1 still runs with its stale, writable, dirty entries.
    core1 = machine.cores[1]
    assert k.cores[1].current is p
    paddr = core1.translate(stale_va, 1)  # Access.WRITE: no fault
    machine.physmem.write(paddr, b"EVIL", writer="cpu1")
    assert other.read(other_va, 4, core=0) == b"EVIL"
    assert machine.physmem.frame(paddr >> 12).owner.startswith("other")


def test_single_page_invlpg_up_to_ceiling_then_full_flush(machine) -> None:
    """tlb_single_page_flush_ceiling = 33: up to 33 pages are flushed one INVLPG each, more
    with one full flush of the PCID."""
    k = machine.kernel
    p, a = two_core_process(machine)
    invlpg, full = k.stats["invlpg"], k.stats["full_flushes"]
    p.mprotect(a, 33 * PG, "r", core=0)
    assert k.stats["invlpg"] == invlpg + 2 * 33  # local + one remote core
    assert k.stats["full_flushes"] == full
    p.mprotect(a, 34 * PG, "rw", core=0)
    assert k.stats["full_flushes"] == full + 2
    assert k.stats["invlpg"] == invlpg + 2 * 33


def test_lazy_tlb_core_is_skipped_and_flushes_when_it_returns(machine) -> None:
    """A core that went idle keeps the mm loaded (lazy TLB): shootdowns skip it (no IPI); when
    it switches back, the mm's tlb_gen has moved and it flushes before running user code."""
    k = machine.kernel
    p, a = two_core_process(machine)
    k.switch_to(1, None)  # core 1 idles, mm stays loaded
    assert k.cores[1].lazy
    ipis = k.stats["ipis"]
    p.mprotect(a, PG, "r", core=0)
    assert k.stats["ipis"] == ipis
    assert k.cores[1].lazy_skips == 1
    with pytest.raises(Signal):
        p.write(a, b"x", core=1)  # switching back flushed the stale entry first
    assert k.cores[1].switch_flushes >= 1


def test_pcid_switch_back_keeps_tlb_entries(machine) -> None:
    """With PCIDs, switching between two processes does not flush: each has its ASID, and
    switching back to an unchanged mm loads CR3 with the no-flush bit."""
    k = machine.kernel
    a_proc, b_proc = k.spawn("a"), k.spawn("b")
    va = a_proc.mmap(None, PG, "rw")
    vb = b_proc.mmap(None, PG, "rw")
    a_proc.write(va, b"a")
    b_proc.write(vb, b"b")
    walks = machine.cores[0].tlb.counters.walks
    a_proc.read(va, 1)
    b_proc.read(vb, 1)
    assert machine.cores[0].tlb.counters.walks == walks
    assert machine.cores[0].pcid != 0


# ------------------------------------------------------------------ protection keys
def test_pkeys_change_rights_per_thread_without_flush(machine) -> None:
    """pkey_alloc/pkey_mprotect put the key in the PTEs (bits 62:59); pkey_set (WRPKRU) changes
    one thread's rights with no TLB flush or IPI; a violation is SIGSEGV/SEGV_PKUERR."""
    k = machine.kernel
    p = k.spawn()
    a = p.mmap(None, PG, "rw")
    p.write(a, b"secret", core=0)
    p.read(a, 1, core=1)
    key = p.pkey_alloc()
    p.pkey_mprotect(a, PG, "rw", key)
    assert p.pte(a).pkey == key
    shootdowns = k.stats["shootdowns"]
    p.pkey_set(key, 1, core=0)  # PKEY_DISABLE_ACCESS on thread 0 only
    with pytest.raises(Signal) as info:
        p.read(a, 1, core=0)
    assert info.value.si_code == "SEGV_PKUERR" and info.value.pkey == key
    assert info.value.error_code & PF_PK
    # Other threads start from init_pkru (keys 1-15 access-disabled) until they pkey_set.
    with pytest.raises(Signal):
        p.read(a, 1, core=1)
    p.pkey_set(key, 0, core=1)
    assert p.read(a, 6, core=1) == b"secret"
    p.pkey_set(key, 0, core=0)
    assert p.read(a, 6, core=0) == b"secret"
    assert k.stats["shootdowns"] == shootdowns


# ------------------------------------------------------------------ zero-copy, compaction
def test_transfer_pages_moves_frames_without_copying(machine) -> None:
    k = machine.kernel
    server, client = k.spawn("server"), k.spawn("client")
    src = server.mmap(None, 8 * PG, "rw")
    dst = client.mmap(None, 8 * PG, "rw")
    for i in range(8):
        server.write(src + i * PG, f"msg{i}".encode())
    frames = [server.frame_of(src + i * PG) for i in range(8)]
    copies = k.stats["cow_copies"]
    moved = k.transfer_pages(server, src, client, dst, 8 * PG)
    assert moved == frames
    assert [client.frame_of(dst + i * PG) for i in range(8)] == frames
    assert client.read(dst + 3 * PG, 4) == b"msg3"
    assert k.stats["cow_copies"] == copies
    assert server.frame_of(src) is None and server.read(src, 4) == bytes(4)
    assert machine.physmem.frame(frames[0]).owner.startswith("client")


def test_compaction_moves_process_pages_and_fixes_their_ptes() -> None:
    m = Machine(cores=1, memory=16 << 20)
    k = m.kernel
    p = k.spawn()
    a = p.mmap(None, 1024 * PG, "rw")
    for i in range(1024):
        p.write(a + i * PG, i.to_bytes(4, "little"))
    p.munmap(a, 512 * PG)  # free every other… (the first half) then scatter more
    for i in range(512, 1024, 2):
        p.munmap(a + i * PG, PG)
    before = {i: p.frame_of(a + i * PG) for i in range(513, 1024, 2)}
    m.physmem.compact()
    after = {i: p.frame_of(a + i * PG) for i in before}
    assert after != before
    for i in before:
        assert p.read(a + i * PG, 4) == i.to_bytes(4, "little")


def test_huge_page_mapping_and_fallback_under_fragmentation() -> None:
    m = Machine(cores=1, memory=8 << 20)
    k = m.kernel
    p = k.spawn()
    h = p.mmap(None, 2 << 20, "rw", huge=True)
    p.write(h + 5, b"huge")
    assert p.fault_log[-1].resolution == "thp"
    assert p.pte(h).huge and p.rss_pages() == 512
    # Fragment what is left: take every frame, free every other one.
    frames = []
    while m.physmem.free_frames:
        frames.append(m.physmem.alloc())
    for f in frames[::2]:
        m.physmem.free(f)
    h2 = p.mmap(None, 2 << 20, "rw", huge=True)
    p.write(h2, b"x")
    assert any(r.resolution == "thp-fallback" for r in p.fault_log)
    assert not p.pte(h2).huge


def test_userfault_serves_missing_pages_on_demand(machine) -> None:
    """Post-copy demand paging: a registered range asks its handler for each page at the first
    touch (like userfaultfd MODE_MISSING + UFFDIO_COPY); later accesses do not fault."""
    p = machine.kernel.spawn()
    a = p.mmap(None, 8 * PG, "rw")
    asked: list[int] = []

    def remote(page: int) -> bytes:
        asked.append(page)
        return f"page@{page - a:#x}".encode().ljust(PG, b".")

    p.register_userfault(a, 8 * PG, remote)
    assert p.read(a + 3 * PG, 10) == b"page@0x300"
    p.write(a + 5 * PG, b"local")
    assert p.read(a + 5 * PG, 11) == b"local0x5000"  # "page@0x5000" with 5 bytes overwritten
    assert asked == [a + 3 * PG, a + 5 * PG]
    p.read(a + 3 * PG, 1)
    assert len(asked) == 2
    assert [r.resolution for r in p.fault_log] == ["userfault", "userfault"]


def test_one_gigabyte_mapping_and_populate() -> None:
    m = Machine(cores=1, memory=2 << 30)
    p = m.kernel.spawn()
    g = p.mmap(None, 1 << 30, "rw", huge=1 << 30, populate=True)
    assert g % (1 << 30) == 0
    assert p.pte(g).page_size == 1 << 30 and p.rss_pages() == 1 << 18
    assert p.fault_log[-1].resolution == "huge-1g"
    p.write(g + (700 << 20), b"deep")
    assert p.read(g + (700 << 20), 4) == b"deep"
    assert m.cores[0].tlb.stats["l1d_1g"]["fills"] >= 1
    with pytest.raises(KernelError):
        p.mmap(None, 4096, huge=12345)


def test_populate_write_faults_private_writable_memory(machine) -> None:
    p = machine.kernel.spawn()
    a = p.mmap(None, 4 * PG, "rw", populate=True)
    assert p.rss_pages() == 4
    assert all(p.pte(a + i * PG).writable for i in range(4))


def test_corrupt_page_table_kills_the_process(machine) -> None:
    """arch/x86/mm/fault.c: a fault with RSVD set means a corrupted page table (pgtable_bad)."""
    p = machine.kernel.spawn()
    a = p.mmap(None, PG, "rw")
    p.write(a, b"x")
    p.pt.update(a, set_bits=1 << 50)  # a reserved address bit (MAXPHYADDR 46)
    with pytest.raises(Signal) as info:
        with machine.cores[0].supervisor():
            machine.cores[0].invlpg(a)
        p.read(a, 1)
    assert info.value.signo == "SIGKILL"
    assert info.value.error_code & 0x8  # RSVD


def test_munmap_shoots_down_every_core(machine) -> None:
    """munmap clears the PTEs, flushes every core running the mm (IPI), then frees the frames:
    the other core's next access faults and gets SIGSEGV (MAPERR)."""
    k = machine.kernel
    p, a = two_core_process(machine)
    ipis = k.stats["ipis"]
    p.munmap(a, 4 * PG, core=0)
    assert k.stats["ipis"] == ipis + 1
    with pytest.raises(Signal) as info:
        p.write(a, b"x", core=1)
    assert info.value.si_code == "SEGV_MAPERR"


def test_tlb_reach_huge_pages_versus_4k() -> None:
    """TLB reach: 32 MiB touched at random is 8192 4-KiB pages (beyond the 1536-entry STLB) but
    only 16 2-MiB pages (within the 32-entry L1 DTLB for 2 MiB)."""
    import random

    m = Machine(cores=1, memory=96 << 20)
    k = m.kernel
    rng = random.Random(5)
    offsets = [rng.randrange(32 << 20) & ~7 for _ in range(3000)]
    walks = {}
    for huge in (False, True):
        p = k.spawn()
        a = p.mmap(None, 32 << 20, "rw", huge=huge, populate=True)
        core = m.cores[0]
        for off in offsets[:200]:
            p.read(a + off, 8)  # warm up
        core.tlb.reset_stats()
        for off in offsets:
            p.read(a + off, 8)
        walks[huge] = core.tlb.stats["walks"]
    assert walks[True] == 0
    assert walks[False] > 1500  # most random 4 KiB accesses miss both TLB levels


def test_exit_frees_everything_and_leaves_no_translation(machine) -> None:
    k = machine.kernel
    free0 = machine.physmem.free_frames
    p = k.spawn()
    a = p.mmap(None, 8 * PG, "rw")
    for i in range(8):
        p.write(a + i * PG, b"x")
    k.exit(p)
    assert machine.physmem.free_frames == free0
    core = machine.cores[0]
    assert core.tlb.size() == 0
    with pytest.raises(KernelError, match="ESRCH"):
        p.read(a, 1)
