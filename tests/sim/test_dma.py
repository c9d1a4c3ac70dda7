"""DMA through the IOMMU: mapping, pinning, asynchronous devices, strict and lazy unmap, the
teardown choreography and what goes wrong in every other order.

References: Linux drivers/iommu/dma-iommu.c (__iommu_dma_unmap: strict mode syncs the IOTLB before
the IOVA is freed; lazy mode queue_iova() into a 256-entry flush queue with a 10 ms timer),
iommu_dma_map_sg (one contiguous IOVA range for scattered pages), VFIO type1 vfio_unmap_unpin()
(unpin only after iommu_iotlb_sync), mm/gup.c pin_user_pages (a pinned page is neither freed nor
migrated), the VT-d fault reasons of ch. 7.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate.sim.devices import SAFE_ORDER, run_teardown
from migrate.sim.iommu import (
    FR_ADDR_BEYOND_AGAW,
    FR_READ,
    FR_WRITE,
    IOVA_DEFAULT_FQ_SIZE,
    IOVA_DEFAULT_FQ_TIMEOUT_NS,
    DmaAccess,
    Iommu,
    IommuError,
)
from migrate.sim.physmem import PAGE_SHIFT, PAGE_SIZE, FramePinned, PhysicalMemory

MiB = 1 << 20


def _setup(mode: str = "strict", **kw: object) -> tuple[PhysicalMemory, Iommu]:
    mem = PhysicalMemory(64 * MiB)
    return mem, Iommu(mem, mode=mode, **kw)  # type: ignore[arg-type]


def _frames(mem: PhysicalMemory, n: int, owner: str = "buf", scatter: bool = True) -> list[int]:
    out = []
    for _ in range(n):
        pfn = mem.alloc(owner=owner)
        assert isinstance(pfn, int)
        out.append(pfn)
        if scatter:
            mem.alloc(owner="other")          # a gap: the frames are not contiguous
    return out


# ---------------------------------------------------------------------------- mapping
def test_scattered_frames_get_one_contiguous_iova_range() -> None:
    mem, iommu = _setup()
    nic = iommu.add_device("nic")
    frames = _frames(mem, 3)
    assert all(b - a == 2 for a, b in itertools.pairwise(frames))
    iova, length = iommu.dma_map(nic, frames, "from_device")
    assert length == 3 * PAGE_SIZE
    data = bytes(range(256)) * (3 * PAGE_SIZE // 256)
    t = nic.dma_write(iova, data)
    nic.wait()
    assert t.ok
    for k, pfn in enumerate(frames):       # page k of the IOVA range lands in frame k
        assert mem.read(pfn << PAGE_SHIFT, PAGE_SIZE) == data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE]


def test_map_sg_keeps_segment_offsets_and_lengths() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("disk")
    a, b = _frames(mem, 2)
    m = iommu.dma_map_sg(dev, [((a << PAGE_SHIFT) + 0x100, 0xF00), (b << PAGE_SHIFT, 0x200)],
                         "bidirectional")
    (d0, l0), (d1, l1) = m.segments
    assert d0 & 0xFFF == 0x100 and l0 == 0xF00
    assert d1 == d0 - 0x100 + PAGE_SIZE and l1 == 0x200    # the next IOVA page
    assert m.iova == d0 and m.length == d1 + l1 - d0
    t = dev.dma_write(d0, b"A" * (0xF00 + 0x200))          # crosses into segment 2
    dev.wait()
    assert t.ok
    assert mem.read((b << PAGE_SHIFT), 0x200) == b"A" * 0x200


def test_direction_sets_the_rights_device_write_to_to_device_buffer_faults() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("nic")
    (pfn,) = _frames(mem, 1)
    mem.write(pfn << PAGE_SHIFT, b"payload")
    iova, _ = iommu.dma_map(dev, [pfn], "to_device")
    rd = dev.dma_read(iova, 7)
    wr = dev.dma_write(iova, b"scribble")
    dev.wait()
    assert rd.ok and bytes(rd.data) == b"payload"
    assert wr.status == "error"
    f = wr.faults[0]
    assert (f.reason, f.not_present, f.access, f.device) == (FR_WRITE, False, "write", "nic")
    assert mem.read(pfn << PAGE_SHIFT, 7) == b"payload"


def test_device_cannot_reach_iovas_it_was_not_given() -> None:
    mem, iommu = _setup()
    a = iommu.add_device("a")
    b = iommu.add_device("b")
    (pfn,) = _frames(mem, 1)
    iova, _ = iommu.dma_map(a, [pfn], "bidirectional")
    t = b.dma_read(iova, 16)               # same number, other domain: nothing there
    b.wait()
    assert t.status == "error" and t.faults[0].reason == FR_READ and t.faults[0].not_present


def test_address_beyond_the_domain_width_faults_0x4() -> None:
    _, iommu = _setup()
    dev = iommu.add_device("wide", dma_bits=64)
    t = dev.dma_read(1 << 48, 8)
    dev.wait()
    assert t.faults[0].reason == FR_ADDR_BEYOND_AGAW


def test_device_cannot_drive_more_address_bits_than_it_has() -> None:
    _, iommu = _setup()
    dev = iommu.add_device("old", dma_bits=32)
    with pytest.raises(IommuError, match="32 address bits"):
        dev.dma_write(1 << 32, b"x")


@pytest.mark.parametrize("bad", ["sideways", 3, None])
def test_bad_direction_is_a_clear_error(bad: object) -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("nic")
    with pytest.raises(IommuError, match="direction"):
        iommu.dma_map(dev, _frames(mem, 1), bad)  # type: ignore[arg-type]


def test_map_of_unowned_memory_or_zero_page_or_double_unmap_is_refused() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("nic")
    with pytest.raises(IommuError, match="not an allocated frame"):
        iommu.dma_map(dev, [mem.nframes - 1], "to_device")
    with pytest.raises(IommuError, match="zero page"):
        iommu.dma_map(dev, [0], "from_device")    # a device must never write the zero page
    iova, length = iommu.dma_map(dev, _frames(mem, 1), "to_device")
    iommu.dma_unmap(dev, iova, length)
    with pytest.raises(IommuError, match="not mapped"):
        iommu.dma_unmap(dev, iova, length)
    with pytest.raises(IommuError, match="already exists"):
        iommu.add_device("nic")


# ---------------------------------------------------------------------------- asynchrony
def test_transfers_progress_with_simulated_time_and_signal_completion() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("nic", bandwidth_bytes_per_ns=1.0, latency_ns=100)
    frames = _frames(mem, 2)
    iova, _ = iommu.dma_map(dev, frames, "from_device")
    t = dev.dma_write(iova, b"\x11" * (2 * PAGE_SIZE))
    assert t.status == "in-flight" and mem.read(frames[0] << PAGE_SHIFT, 1) == b"\x00"
    iommu.clock.advance(100 + PAGE_SIZE - 1)
    assert mem.read(frames[0] << PAGE_SHIFT, 1) == b"\x00"     # first burst not landed yet
    iommu.clock.advance(1)
    assert mem.read(frames[0] << PAGE_SHIFT, 1) == b"\x11"
    assert not t.done and mem.read(frames[1] << PAGE_SHIFT, 1) == b"\x00"
    assert dev.step()
    assert t.done and t.ok and t.completed_ns == 100 + 2 * PAGE_SIZE
    assert dev.completions == [t] and not dev.busy


def test_queued_transfers_run_in_order() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("nic")
    (pfn,) = _frames(mem, 1)
    iova, _ = iommu.dma_map(dev, [pfn], "bidirectional")
    first = dev.dma_write(iova, b"first")
    second = dev.dma_write(iova, b"SECOND")
    read = dev.dma_read(iova, 6)
    assert dev.wait() is read
    assert first.completed_ns is not None and second.completed_ns is not None
    assert first.completed_ns < second.completed_ns < (read.completed_ns or 0)
    assert bytes(read.data) == b"SECOND"


# ---------------------------------------------------------------------------- pinning
def test_mapped_frames_are_pinned_cannot_be_freed_or_migrated() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("nic")
    frames = _frames(mem, 2)
    iova, length = iommu.dma_map(dev, frames, "from_device")
    for pfn in frames:
        assert mem.frame(pfn).pinned == 1
        with pytest.raises(FramePinned):
            mem.free(pfn)
    free_frame = mem.alloc(owner="x")
    assert isinstance(free_frame, int)
    mem.free(free_frame)
    with pytest.raises(FramePinned):
        mem.migrate_frame(frames[0], free_frame)
    mem.compact()
    assert all(mem.frame(p).owner == "buf" for p in frames)    # compaction left them alone
    iommu.dma_unmap(dev, iova, length)
    assert all(mem.frame(p).pinned == 0 for p in frames)
    for pfn in frames:
        mem.free(pfn)


# ---------------------------------------------------------------------------- strict vs lazy
def _warm(iommu: Iommu, dev_name: str, mem: PhysicalMemory) -> tuple[int, int, list[int]]:
    dev = iommu.device(dev_name)
    frames = _frames(mem, 2)
    iova, length = iommu.dma_map(dev, frames, "from_device")
    dev.dma_write(iova, b"w" * length)
    dev.wait()                             # the IOTLB now caches both pages
    return iova, length, frames


def test_strict_unmap_flushes_before_returning() -> None:
    mem, iommu = _setup("strict")
    dev = iommu.add_device("nic")
    iova, length, frames = _warm(iommu, "nic", mem)
    did = iommu.domain_of(dev).did
    assert iommu.iotlb.contains(did, iova)
    iommu.dma_unmap(dev, iova, length)
    assert not iommu.iotlb.contains(did, iova)
    assert iommu.iotlb.stats["inv_page"] == 1                   # one PSI covering both pages
    t = dev.dma_write(iova, b"late")
    dev.wait()
    assert t.status == "error" and t.faults[0].not_present
    assert mem.read(frames[0] << PAGE_SHIFT, 4) == b"wwww"


def test_lazy_window_exists_and_closes_after_the_flush() -> None:
    mem, iommu = _setup("lazy")
    dev = iommu.add_device("nic")
    iova, length, frames = _warm(iommu, "nic", mem)
    did = iommu.domain_of(dev).did
    iommu.dma_unmap(dev, iova, length)
    # The PTEs are gone, the IOTLB still holds the translations: the window.
    assert iommu.domain_of(dev).pagetable.leaf_address(iova) is None
    assert iommu.iotlb.contains(did, iova)
    assert len(iommu.flush_queue) == 1 and iommu.clock.pending_timers() == 1
    t = dev.dma_write(iova, b"LATE")
    dev.wait()
    assert t.ok                                                  # reached the frame
    assert mem.read(frames[0] << PAGE_SHIFT, 4) == b"LATE"
    assert [v.kind for v in iommu.violations] == ["unmapped-window"]
    # The 10 ms timer (IOVA_DEFAULT_FQ_TIMEOUT) drains the queue with a domain flush.
    iommu.clock.advance(IOVA_DEFAULT_FQ_TIMEOUT_NS)
    assert not iommu.flush_queue and not iommu.iotlb.contains(did, iova)
    assert iommu.iotlb.stats["inv_domain"] == 1 and iommu.stats["fq_timer_flushes"] == 1
    t2 = dev.dma_write(iova, b"TOO LATE")
    dev.wait()
    assert t2.status == "error" and t2.faults[0].reason == FR_WRITE
    assert mem.read(frames[0] << PAGE_SHIFT, 4) == b"LATE"


def test_lazy_iova_is_not_reused_before_the_flush() -> None:
    mem, iommu = _setup("lazy")
    dev = iommu.add_device("nic")
    iova, length, _ = _warm(iommu, "nic", mem)
    iommu.dma_unmap(dev, iova, length)
    again, _ = iommu.dma_map(dev, _frames(mem, 2), "from_device")
    assert again != iova                   # still held by the flush queue
    iommu.flush_queue_drain()
    third, _ = iommu.dma_map(dev, _frames(mem, 2), "from_device")
    assert third == iova                   # freed into the rcache, handed out again


def test_lazy_flush_queue_drains_when_full() -> None:
    mem, iommu = _setup("lazy")
    dev = iommu.add_device("nic")
    (pfn,) = _frames(mem, 1)
    for _ in range(IOVA_DEFAULT_FQ_SIZE):
        iova, length = iommu.dma_map(dev, [pfn], "to_device")
        iommu.dma_unmap(dev, iova, length)
    assert len(iommu.flush_queue) == IOVA_DEFAULT_FQ_SIZE and iommu.stats["fq_flushes"] == 0
    iova, length = iommu.dma_map(dev, [pfn], "to_device")
    iommu.dma_unmap(dev, iova, length)
    assert iommu.stats["fq_full_flushes"] == 1 and len(iommu.flush_queue) == 1
    assert iommu.iotlb.stats["inv_domain"] == 1 and iommu.clock.now == 0   # no time needed


def test_lazy_with_deferred_unpin_keeps_frames_pinned_until_the_flush() -> None:
    mem, iommu = _setup("lazy")
    dev = iommu.add_device("nic")
    iova, length, frames = _warm(iommu, "nic", mem)
    iommu.dma_unmap(dev, iova, length, defer_unpin=True)      # VFIO's order
    assert all(mem.frame(p).pinned == 1 for p in frames)
    iommu.clock.advance(IOVA_DEFAULT_FQ_TIMEOUT_NS)
    assert all(mem.frame(p).pinned == 0 for p in frames)


def test_switching_to_strict_drains_the_queue() -> None:
    mem, iommu = _setup("lazy")
    dev = iommu.add_device("nic")
    iova, length, _ = _warm(iommu, "nic", mem)
    iommu.dma_unmap(dev, iova, length)
    iommu.mode = "strict"
    assert not iommu.flush_queue and not iommu.iotlb.contains(iommu.domain_of(dev).did, iova)
    with pytest.raises(IommuError, match="strict"):
        iommu.mode = "eager"


# ---------------------------------------------------------------------------- teardown orders
def test_safe_order_is_safe_in_both_modes() -> None:
    for mode in ("strict", "lazy"):
        _, iommu = _setup(mode)
        r = run_teardown(iommu, SAFE_ORDER)
        assert r.transfer_status == "complete" and r.bytes_delivered == r.length
        assert r.safe and not r.faults and not r.events
        assert r.victim_frames == r.frames      # the frames were reused, untouched


def test_unpin_and_free_before_completion_is_a_use_after_free_naming_both_owners() -> None:
    _, iommu = _setup("strict")
    r = run_teardown(iommu, ("unpin", "free", "wait", "unmap"))
    assert r.use_after_free
    v = r.violations[0]
    assert (v.device, v.mapped_owner, v.current_owner) == ("nic", "driver:rx-ring", "proc:victim")
    assert v.access == "write"
    assert sorted(r.victim_corrupted) == sorted(r.frames)     # the device wrote into them
    assert any("freed while still DMA-mapped" in e for e in r.events)


def test_unmap_before_completion_aborts_the_rest_of_the_transfer() -> None:
    _, iommu = _setup("strict")
    r = run_teardown(iommu, ("unmap", "unpin", "free", "wait"))
    assert r.transfer_status == "error" and r.bytes_delivered == 0
    assert len(r.faults) == 4 and all(f.not_present and f.reason == FR_WRITE for f in r.faults)
    assert not r.violations and not r.victim_corrupted        # lost data, but no corruption


def test_lazy_unmap_then_free_lets_a_late_write_corrupt_the_new_owner() -> None:
    _, iommu = _setup("lazy")
    r = run_teardown(iommu, ("wait", "unmap", "unpin", "free", "late_write"))
    assert r.use_after_free and r.victim_corrupted
    assert "stale IOTLB" in r.violations[0].detail
    _, strict = _setup("strict")
    s = run_teardown(strict, ("wait", "unmap", "unpin", "free", "late_write"))
    assert s.safe and [f.reason for f in s.faults] == [FR_WRITE] * 4


def test_unknown_teardown_step_is_rejected() -> None:
    _, iommu = _setup()
    with pytest.raises(IommuError, match="unknown teardown steps"):
        run_teardown(iommu, ("wait", "yolo"))


# ---------------------------------------------------------------------------- no IOMMU
def test_passthrough_device_scribbles_anywhere() -> None:
    mem, iommu = _setup()
    rogue = iommu.add_device("rogue", passthrough=True)
    secret = mem.alloc(owner="kernel:keyring")
    assert isinstance(secret, int)
    mem.write(secret << PAGE_SHIFT, b"hunter2")
    t = rogue.dma_write(secret << PAGE_SHIFT, b"pwned!!")    # a physical address, unchecked
    rogue.wait()
    assert t.ok and mem.read(secret << PAGE_SHIFT, 7) == b"pwned!!"
    v = iommu.violations[0]
    assert (v.kind, v.current_owner, v.device) == ("passthrough", "kernel:keyring", "rogue")
    assert not iommu.faults
    # The same attempt from a translated device faults and leaves memory alone.
    nic = iommu.add_device("nic")
    t2 = nic.dma_write(secret << PAGE_SHIFT, b"again")
    nic.wait()
    assert t2.status == "error" and mem.read(secret << PAGE_SHIFT, 7) == b"pwned!!"


def test_passthrough_needs_contiguous_frames_or_a_scatterlist() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("pt", passthrough=True)
    frames = _frames(mem, 2)
    with pytest.raises(IommuError, match="scattered"):
        iommu.dma_map(dev, frames, "to_device")
    m = iommu.dma_map_sg(dev, [(p << PAGE_SHIFT, PAGE_SIZE) for p in frames], "to_device")
    assert [a for a, _ in m.segments] == [p << PAGE_SHIFT for p in frames]


# ---------------------------------------------------------------------------- property
@st.composite
def _programs(draw: st.DrawFn) -> list[tuple[str, int]]:
    ops = draw(st.lists(st.tuples(st.sampled_from(["map", "unmap", "write", "tick"]),
                                  st.integers(0, 7)), min_size=1, max_size=40))
    return ops


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(_programs(), st.sampled_from([1, 3]))
def test_strict_device_never_reaches_a_frame_after_its_unmap_returned(
        program: list[tuple[str, int]], npages: int) -> None:
    """Strict mode: once dma_unmap has returned, no device access through that mapping's IOVAs
    changes its frames (each write is tagged; unmapped frames are checked byte for byte)."""
    mem = PhysicalMemory(32 * MiB)
    iommu = Iommu(mem, mode="strict", iotlb_entries=16)
    devs = [iommu.add_device("d0"), iommu.add_device("d1", dma_bits=32)]
    live: list[tuple[int, int, int, list[int]]] = []        # (dev idx, iova, length, frames)
    dead: list[tuple[int, int, int, list[int], bytes]] = []  # + snapshot at unmap time
    history: list[tuple[int, int, int]] = []                 # every IOVA range ever mapped
    tag = 0
    for op, k in program:
        if op == "map":
            frames = [mem.alloc(owner="buf") for _ in range(npages)]
            d = k % 2
            iova, length = iommu.dma_map(devs[d], frames, "bidirectional")  # type: ignore[arg-type]
            live.append((d, iova, length, frames))  # type: ignore[arg-type]
            history.append((d, iova, length))
        elif op == "unmap" and live:
            d, iova, length, frames = live.pop(k % len(live))
            iommu.dma_unmap(devs[d], iova, length)
            snap = b"".join(mem.read(p << PAGE_SHIFT, PAGE_SIZE) for p in frames)
            dead.append((d, iova, length, frames, snap))
        elif op == "write" and history:
            d, iova, length = history[k % len(history)]
            tag += 1
            devs[d].dma_write(iova, bytes([tag & 0xFF]) * length)
            if k % 2:
                devs[d].wait()             # completes now: the IOTLB is warm before any unmap
        elif op == "tick":
            iommu.clock.advance(1 << (k + 8))
    for dev in devs:
        dev.wait()
    live_frames = {p for _, _, _, fr in live for p in fr}
    for _, _, _, frames, snap in dead:
        if live_frames.intersection(frames):
            continue   # never happens (fresh frames per map), but a re-map would make it legal
        now = b"".join(mem.read(p << PAGE_SHIFT, PAGE_SIZE) for p in frames)
        assert now == snap
    assert not [v for v in iommu.violations if v.kind != "passthrough"]


def test_the_same_property_fails_in_lazy_mode() -> None:
    # A concrete counterexample: warm the IOTLB, unmap, write again before the flush.
    mem = PhysicalMemory(32 * MiB)
    iommu = Iommu(mem, mode="lazy")
    dev = iommu.add_device("d0")
    frames = [mem.alloc(owner="buf")]
    iova, length = iommu.dma_map(dev, frames, "bidirectional")  # type: ignore[arg-type]
    dev.dma_write(iova, b"\x01" * length)
    dev.wait()
    iommu.dma_unmap(dev, iova, length)
    snap = mem.read(frames[0] << PAGE_SHIFT, PAGE_SIZE)  # type: ignore[operator]
    dev.dma_write(iova, b"\x02" * length)
    dev.wait()
    assert mem.read(frames[0] << PAGE_SHIFT, PAGE_SIZE) != snap  # type: ignore[operator]


def test_iommu_access_api_reports_fault_without_raising() -> None:
    _mem, iommu = _setup()
    dev = iommu.add_device("nic")
    assert iommu.access(dev, 0x1000, 4, DmaAccess.READ) is None
    assert iommu.fault_counts() == {FR_READ: 1}


def test_iommu_disabled_means_physical_addresses_for_everyone() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("nic")
    victim = mem.alloc(owner="proc:bystander")
    assert isinstance(victim, int)
    iommu.enabled = False                    # intel_iommu=off: no remapping at all
    t = dev.dma_write(victim << PAGE_SHIFT, b"oops")
    dev.wait()
    assert t.ok and mem.read(victim << PAGE_SHIFT, 4) == b"oops"
    assert iommu.violations[-1].current_owner == "proc:bystander"


def test_describe_is_a_json_snapshot() -> None:
    import json

    mem, iommu = _setup()
    dev = iommu.add_device("nic", dma_bits=32)
    iommu.add_device("pt", passthrough=True)
    iommu.dma_map(dev, _frames(mem, 3), "to_device")
    snap = json.loads(json.dumps(iommu.describe()))
    assert snap["devices"]["nic"]["translation"] == "domain 1"
    assert snap["devices"]["pt"]["translation"] == "passthrough"
    assert snap["devices"]["nic"]["mappings"][0]["iova"] == "0xffffc000"
    assert snap["mode"] == "strict" and snap["maps"] == 1


def test_lazy_mode_is_safe_when_unpin_waits_for_the_flush() -> None:
    # VFIO type1's rule (vfio_unmap_unpin: unpin only after iommu_iotlb_sync) closes the window
    # even with a deferred-invalidation domain.
    _, iommu = _setup("lazy")
    r = run_teardown(iommu, ("wait", "unmap", "flush", "unpin", "free", "late_write"))
    assert r.safe and [f.reason for f in r.faults] == [FR_WRITE] * 4


def test_iova_spaces_demo_evidence() -> None:
    from migrate.sim.devices import iova_spaces_demo

    mem, iommu = _setup()
    before = mem.allocated_frames()
    ev = iova_spaces_demo(iommu)
    nic, gpu = ev["devices"]["demo-nic"], ev["devices"]["demo-gpu"]
    assert ev["same_iova_numbers"] and nic["frames"] != gpu["frames"]
    assert not nic["frames_contiguous"] and nic["length"] == 4 * PAGE_SIZE
    assert nic["landed_in_own_frames"] and gpu["landed_in_own_frames"]
    assert ev["cross_domain_probe"]["status"] == "error"
    assert mem.allocated_frames() == before      # page tables and buffers all given back


def test_dma_to_a_physical_address_with_no_memory_is_aborted_not_a_dmar_fault() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("pt", passthrough=True)
    t = dev.dma_write(mem.size + PAGE_SIZE, b"void")
    dev.wait()
    assert t.status == "error" and t.aborted_bursts == 1 and not t.faults
    assert not iommu.faults and "no memory" in iommu.events[-1]


def test_physically_contiguous_aligned_buffer_is_mapped_with_a_2m_superpage() -> None:
    # iommu_map() picks the largest page size both addresses are aligned to (iommu_pgsize()).
    mem, iommu = _setup(forcedac=True)
    dev = iommu.add_device("gpu")
    block = mem.alloc(9, owner="huge-buf")
    assert isinstance(block, int)
    frames = list(range(block, block + 512))
    iova, length = iommu.dma_map(dev, frames, "bidirectional")
    assert length == 2 * MiB and iova % (2 * MiB) == 0
    pt = iommu.domain_of(dev).pagetable
    assert [lvl for lvl, _ in pt.entries(iova)] == [4, 3, 2]     # a level-2 leaf (PS=1)
    t = dev.dma_write(iova, b"z" * length)
    dev.wait()
    assert t.ok and iommu.iotlb.stats["misses"] == 1 and iommu.iotlb.stats["hits"] == 511
    iommu.dma_unmap(dev, iova, length)
    assert pt.leaf_address(iova) is None


def test_unpinned_frame_moved_by_compaction_then_written_is_detected() -> None:
    mem, iommu = _setup()
    dev = iommu.add_device("nic")
    (pfn,) = _frames(mem, 1, owner="buf")
    iova, _ = iommu.dma_map(dev, [pfn], "from_device")
    m = iommu.find_mapping(dev, iova)
    iommu.unpin(m)                          # wrong: still mapped, no longer pinned
    assert mem.compact() > 0 and mem.frame(m.frame_objs[0].pfn).owner == "buf"
    moved_to = m.frame_objs[0].pfn
    assert moved_to != pfn
    t = dev.dma_write(iova, b"stale")
    dev.wait()
    v = iommu.violations[-1]
    assert t.ok and v.kind == "use-after-free" and "migrated" in v.detail
    assert mem.read(moved_to << PAGE_SHIFT, 5) != b"stale"    # the data went to the old place


def test_flush_timer_runs_from_the_first_queued_entry_per_domain() -> None:
    # queue_iova() arms the timer only when it is off: an entry queued 5 ms later is flushed
    # with the first one at t0 + 10 ms, not 15 ms. Queues and timers belong to a domain.
    mem, iommu = _setup("lazy")
    a = iommu.add_device("a")
    b = iommu.add_device("b")
    ia, la, _ = _warm(iommu, "a", mem)
    iommu.dma_unmap(a, ia, la)
    t0 = iommu.clock.now                        # a's timer is armed here
    iommu.clock.advance(5_000_000)
    ib, lb, _ = _warm(iommu, "b", mem)
    ia2, la2, _ = _warm(iommu, "a", mem)
    iommu.dma_unmap(a, ia2, la2)
    iommu.dma_unmap(b, ib, lb)
    did_a, did_b = iommu.domain_of(a).did, iommu.domain_of(b).did
    assert len(iommu.domain_of(a).fq) == 2
    iommu.clock.advance(t0 + IOVA_DEFAULT_FQ_TIMEOUT_NS - iommu.clock.now)   # t0 + 10 ms
    # a's timer (armed at t0) has fired and took the entry queued at 5 ms with it; b's timer
    # (armed after 5 ms) has not.
    assert not iommu.domain_of(a).fq and not iommu.iotlb.contains(did_a, ia2)
    assert iommu.domain_of(b).fq and iommu.iotlb.contains(did_b, ib)
    iommu.clock.advance(IOVA_DEFAULT_FQ_TIMEOUT_NS)
    assert not iommu.flush_queue and not iommu.iotlb.contains(did_b, ib)


def test_teardown_runs_can_be_repeated_on_one_iommu() -> None:
    mem, iommu = _setup("strict")
    before = None
    for order in [SAFE_ORDER, ("unpin", "free", "wait", "unmap"), SAFE_ORDER]:
        run_teardown(iommu, order)
        after = mem.allocated_frames()
        assert before is None or after == before      # nothing leaks between runs
        before = after
