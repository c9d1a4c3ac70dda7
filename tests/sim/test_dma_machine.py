"""The documented public API of issue 4, on a whole ``Machine``: ``add_device``, ``iommu`` (mode,
faults, iotlb.stats), ``dma_map``/``dma_unmap``, device ``dma_read``/``dma_write``/``wait``,
``tick``, ``cache``. Rules are those of test_dma.py; this checks they hold through the machine."""

from __future__ import annotations

import pytest

from migrate.sim import Machine
from migrate.sim.iommu import FR_WRITE, IommuError
from migrate.sim.physmem import PAGE_SHIFT, PAGE_SIZE


def test_worked_example_of_the_readme() -> None:
    # docs/iommu-cache.md "Worked example", line for line.
    m = Machine(cores=2, memory=64 << 20)
    nic = m.add_device("nic", dma_bits=32)
    frames = [m.physmem.alloc(owner="rx-buf") for _ in range(3)]
    iova, length = m.dma_map(nic, frames, "from_device")
    assert (iova, length) == (0xFFFF_C000, 3 * PAGE_SIZE)     # top-down below 4 GiB, aligned
    t = nic.dma_write(iova + 0xFF8, b"hello, DMA world")
    assert t.status == "in-flight"
    m.tick(5_000)
    assert t.status == "complete"
    assert m.physmem.read((frames[0] << PAGE_SHIFT) + 0xFF8, 8) == b"hello, D"
    assert m.physmem.read(frames[1] << PAGE_SHIFT, 8) == b"MA world"
    assert m.iommu.iotlb.stats["misses"] == 2
    m.dma_unmap(nic, iova, length)
    late = nic.dma_write(iova, b"too late")
    nic.wait()
    assert late.status == "error"
    fault = m.iommu.faults[-1]
    assert (fault.reason, fault.device, fault.iova, fault.not_present) == (FR_WRITE, "nic", iova,
                                                                           True)
    assert fault.describe().startswith("DMAR fault 0x5: write request to a page without write "
                                       "permission (entry not present) at level 1; device nic")
    assert m.iommu.mode == "strict"


def test_lazy_mode_on_the_machine_and_tick_drains_the_queue() -> None:
    m = Machine(memory=64 << 20)
    m.iommu.mode = "lazy"
    dev = m.add_device("ssd")
    pfn = m.physmem.alloc(owner="buf")
    iova, length = m.dma_map(dev, pfn, "bidirectional")
    dev.dma_read(iova, 8)
    dev.wait()
    m.dma_unmap(dev, iova, length)
    assert len(m.iommu.flush_queue) == 1
    m.tick(10_000_000)
    assert not m.iommu.flush_queue


def test_dma_read_returns_memory_contents() -> None:
    m = Machine(memory=16 << 20)
    dev = m.add_device("crypto")
    pfn = m.physmem.alloc(owner="key")
    assert isinstance(pfn, int)
    m.physmem.write(pfn << PAGE_SHIFT, b"secret")
    iova, _ = m.dma_map(dev, [pfn], "to_device")
    t = dev.dma_read(iova, 6)
    assert dev.wait() is t and bytes(t.data) == b"secret"


def test_machine_without_dma_installs_no_hooks() -> None:
    m = Machine(memory=16 << 20)
    assert "_iommu" not in m.__dict__ and "_cache" not in m.__dict__
    assert not m.physmem._write_hooks and not m.physmem._free_hooks


def test_bad_device_arguments() -> None:
    m = Machine(memory=16 << 20)
    with pytest.raises(IommuError, match="dma_bits"):
        m.add_device("x", dma_bits=8)
    with pytest.raises(IommuError, match="name"):
        m.add_device("")
    with pytest.raises(IommuError, match="no device"):
        m.dma_map("ghost", [1], "to_device")


def test_dma_into_a_process_buffer_is_seen_by_the_process() -> None:
    # pin_user_pages(FOLL_WRITE) semantics: pages faulted in writable, pinned, offsets kept.
    from migrate.sim.devices import UserBuffer

    m = Machine(memory=64 << 20)
    proc = m.kernel.spawn("app")
    buf = proc.mmap(None, 3 * PAGE_SIZE, "rw")
    nic = m.add_device("nic")
    iova, length = m.dma_map(nic, UserBuffer(proc, buf + 100, 8000), "from_device")
    assert iova & 0xFFF == 100 and length == 8000
    assert proc.rss_pages() == 2
    pfn = proc.frame_of(buf + 100)
    assert pfn is not None and m.physmem.frame(pfn).pinned == 1
    nic.dma_write(iova, b"Z" * length)
    nic.wait()
    assert proc.read(buf + 100, 4) == b"ZZZZ" and proc.read(buf + 8099, 2) == b"Z\x00"
    m.dma_unmap(nic, iova, length)
    assert m.physmem.frame(pfn).pinned == 0


def test_user_buffer_rights_are_checked_like_pin_user_pages() -> None:
    from migrate.sim.devices import UserBuffer

    m = Machine(memory=64 << 20)
    proc = m.kernel.spawn("app")
    ro = proc.mmap(None, PAGE_SIZE, "r")
    nic = m.add_device("nic")
    with pytest.raises(IommuError, match="not mapped writable"):
        m.dma_map(nic, UserBuffer(proc, ro, 16), "from_device")
    # Reading untouched anonymous memory maps the shared zero page, read-only: allowed.
    iova, _ = m.dma_map(nic, UserBuffer(proc, ro, 16), "to_device")
    t = nic.dma_read(iova, 16)
    nic.wait()
    assert t.ok and bytes(t.data) == bytes(16)
    with pytest.raises(IommuError, match="not mapped"):
        m.dma_map(nic, UserBuffer(proc, 0x1000, 16), "to_device")
