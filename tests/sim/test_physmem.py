"""Physical memory and the buddy allocator (Linux mm/page_alloc.c semantics)."""

from __future__ import annotations

import pytest

from migrate.sim.physmem import (
    PAGE_SIZE,
    BadFrame,
    FramePinned,
    OutOfMemory,
    PhysicalMemory,
)


def test_sparse_storage_costs_nothing_until_written() -> None:
    mem = PhysicalMemory(64 << 30)
    assert mem.read(5 << 30, 16) == bytes(16)
    assert not mem.is_materialised((5 << 30) >> 12)
    mem.write((5 << 30) + PAGE_SIZE - 2, b"abcd")  # crosses a frame boundary
    assert mem.read((5 << 30) + PAGE_SIZE - 2, 4) == b"abcd"
    assert len(mem._data) == 2


def test_out_of_range_access_is_a_clear_error() -> None:
    mem = PhysicalMemory(1 << 20)
    with pytest.raises(BadFrame, match="outside memory"):
        mem.read((1 << 20) - 2, 4)


def test_zero_frame_is_reserved_and_reads_zero() -> None:
    mem = PhysicalMemory(1 << 20)
    assert mem.zero_frame == 0
    assert mem.frame(0).owner == "zero-page"
    pfns = {mem.alloc() for _ in range(mem.free_frames)}
    assert 0 not in pfns
    with pytest.raises(BadFrame):
        mem.free(0)


def test_buddy_split_and_merge_restores_large_block() -> None:
    mem = PhysicalMemory(8 << 20)
    before = mem.free_blocks_by_order()
    a = mem.alloc(0, owner="a")
    b = mem.alloc(9, owner="b")
    assert b % 512 == 0  # naturally aligned 2 MiB block
    mem.free(a)
    mem.free(b, 9)
    assert mem.free_blocks_by_order() == before


def test_free_with_wrong_order_or_twice_is_rejected() -> None:
    mem = PhysicalMemory(8 << 20)
    p = mem.alloc(2)
    with pytest.raises(BadFrame, match="order 2"):
        mem.free(p, 0)
    mem.free(p)
    with pytest.raises(BadFrame, match="double free"):
        mem.free(p)


def test_huge_allocation_fails_under_fragmentation_and_compaction_fixes_it() -> None:
    mem = PhysicalMemory(8 << 20)  # 2048 frames
    moved_log: list[tuple[int, int]] = []
    mem.on_frame_moved(lambda old, new: moved_log.append((old, new)))
    pfns = [mem.alloc(0, owner=f"p{i}") for i in range(mem.free_frames)]
    # Free every other frame: half the memory is free, no two free frames are buddies.
    for p in pfns[1::2]:
        mem.free(p)
    assert mem.free_frames >= 512
    with pytest.raises(OutOfMemory) as info:
        mem.alloc(9)
    assert "fragmented" in info.value.reason
    assert mem.fragmentation()[9] == 1.0
    assert mem.fragmentation_index(9) > 0.9
    kept = pfns[0::2]
    mem.write(kept[0] * PAGE_SIZE, b"payload")
    moved = mem.compact()
    assert moved == len(moved_log) > 0
    new_of = dict(moved_log)
    where = new_of.get(kept[0], kept[0])
    assert mem.read(where * PAGE_SIZE, 7) == b"payload"
    assert mem.frame(where).owner == "p0"
    huge = mem.alloc(9)
    assert huge % 512 == 0


def test_pinned_frames_cannot_be_freed_nor_moved() -> None:
    mem = PhysicalMemory(4 << 20)
    p = mem.alloc(0, owner="dma-buffer")
    mem.pin(p)
    with pytest.raises(FramePinned):
        mem.free(p)
    assert mem.put(p) is False  # the pin holds a reference
    lows = [mem.alloc() for _ in range(10)]
    for q in lows:
        mem.free(q)
    mem.compact()
    assert mem.frame(p).pfn == p
    assert mem.unpin(p) is True  # last reference gone with the pin
    assert not mem.is_allocated(p)


def test_hooks_report_owner_on_reuse() -> None:
    mem = PhysicalMemory(1 << 20)
    events: list[tuple] = []
    mem.on_alloc(lambda pfn, order, owner: events.append(("alloc", pfn, owner)))
    unsub = mem.on_free(lambda pfn, order, owner: events.append(("free", pfn, owner)))
    mem.on_write(lambda paddr, n, writer: events.append(("write", paddr, writer)))
    p = mem.alloc(owner="proc1")
    mem.free(p)
    q = mem.alloc(owner="proc2")
    assert q == p  # lowest free frame is reused first
    mem.write(q * PAGE_SIZE, b"x", writer="dev:nic0")
    assert events == [("alloc", p, "proc1"), ("free", p, "proc1"), ("alloc", p, "proc2"),
                      ("write", p * PAGE_SIZE, "dev:nic0")]
    unsub()
    mem.free(q)
    assert events[-1][0] == "write"


def test_exhaustion_reason_differs_from_fragmentation() -> None:
    mem = PhysicalMemory(1 << 20)
    while mem.free_frames:
        mem.alloc()
    with pytest.raises(OutOfMemory, match="exhausted"):
        mem.alloc()


def test_scattered_allocation_returns_order0_frames() -> None:
    mem = PhysicalMemory(1 << 20)
    pfns = mem.alloc(3, contiguous=False, owner="vmalloc")
    assert isinstance(pfns, list) and len(pfns) == 8
    assert all(mem.frame(p).order == 0 for p in pfns)
