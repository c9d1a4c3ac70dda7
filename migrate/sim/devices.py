"""DMA engines: devices that read and write memory through the IOMMU, asynchronously.

A device queues transfers (``dma_write(iova, data)``, ``dma_read(iova, n)``) and works through them
as simulated time advances (``machine.tick(ns)``, ``device.step()``), one page-sized burst at a
time: each burst is translated by the IOMMU when the device issues it, so an unmap in the middle of
a transfer is seen by the rest of it. A burst that faults is recorded in the IOMMU fault log and
dropped (the transfer carries on with the next page and completes with ``status == "error"``), the
way a real DMA engine reports a completion error rather than losing the evidence. Completion is
signalled by the transfer's ``done`` flag and by appending it to ``device.completions`` (the
interrupt). ``wait()`` runs simulated time until the device's queue is empty.

``run_teardown`` plays the pin / map / transfer / unmap / unpin / free choreography in any order,
so the safe order (wait for completion, unmap and flush the IOTLB, then unpin: the rule of the
source document and of VFIO's vfio_unmap_unpin()) can be compared with each wrong one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from migrate.sim.iommu import (
    DmaAccess,
    DmaDirection,
    DmaMapping,
    DmaViolation,
    IommuError,
    IommuFault,
)
from migrate.sim.physmem import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from migrate.sim.iommu import Iommu


@dataclass(eq=False)
class Transfer:
    """One queued DMA transfer and what became of it."""

    device: str
    kind: str                       # "read" (device reads memory) or "write" (device writes it)
    iova: int
    length: int
    data: bytearray                 # the payload (write) or what was read (read)
    submitted_ns: int
    started_ns: int | None = None
    completed_ns: int | None = None
    bytes_done: int = 0
    faults: list[IommuFault] = field(default_factory=list)
    aborted_bursts: int = 0         # bursts to addresses with no memory behind them
    chunks: list[tuple[int, int, int]] = field(default_factory=list)   # (iova, n, offset)
    next_chunk: int = 0

    @property
    def done(self) -> bool:
        return self.completed_ns is not None

    @property
    def ok(self) -> bool:
        return self.done and not self.faults and not self.aborted_bursts

    @property
    def status(self) -> str:
        if self.completed_ns is None:
            return "pending" if self.started_ns is None else "in-flight"
        return "error" if self.faults or self.aborted_bursts else "complete"


class DmaDevice:
    """A bus-mastering device behind the IOMMU (or beside it, in passthrough)."""

    def __init__(self, name: str, dma_bits: int, source_id: int, iommu: Iommu, *,
                 bandwidth_bytes_per_ns: float = 4.0, latency_ns: int = 1000) -> None:
        if bandwidth_bytes_per_ns <= 0 or latency_ns < 0:
            raise IommuError(f"device {name}: bandwidth must be > 0 and latency >= 0")
        self.name = name
        self.dma_bits = dma_bits
        self.source_id = source_id
        self.iommu = iommu
        self.bandwidth = bandwidth_bytes_per_ns
        self.latency_ns = latency_ns
        self.queue: deque[Transfer] = deque()
        self.completions: list[Transfer] = []
        self.direct_mappings: dict[int, DmaMapping] = {}   # passthrough mappings by address
        # dma-iommu's pci_32bit_workaround: try IOVAs below 4 GiB first (cleared on failure).
        self.pci_32bit_workaround = True
        self.stats = {"transfers": 0, "bursts": 0, "faulted_bursts": 0, "bytes": 0}
        self.aborted_bursts = 0

    def __repr__(self) -> str:
        return f"DmaDevice({self.name!r}, dma_bits={self.dma_bits}, sid={self.source_id:#06x})"

    @property
    def busy(self) -> bool:
        return bool(self.queue)

    @property
    def passthrough(self) -> bool:
        ctx = self.iommu._context.get(self.source_id)
        return not self.iommu.enabled or (ctx is not None and ctx.passthrough)

    # ------------------------------------------------------------------ submitting work
    def _submit(self, kind: str, iova: int, length: int, data: bytearray) -> Transfer:
        if not isinstance(iova, int) or iova < 0:
            raise IommuError(f"{self.name}: DMA address must be a non-negative int, got {iova!r}")
        if length <= 0:
            raise IommuError(f"{self.name}: DMA transfer of {length} bytes")
        if (iova + length - 1) >> self.dma_bits:
            raise IommuError(f"{self.name} drives {self.dma_bits} address bits: it cannot issue "
                             f"DMA to {iova:#x}+{length:#x}")
        now = self.iommu.clock.now
        t = Transfer(self.name, kind, iova, length, data, now)
        pos = 0
        while pos < length:
            addr = iova + pos
            n = min(length - pos, PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
            t.chunks.append((addr, n, pos))
            pos += n
        if not self.queue:
            t.started_ns = now
        self.queue.append(t)
        self.stats["transfers"] += 1
        return t

    def dma_write(self, iova: int, data: bytes | bytearray) -> Transfer:
        """Queue a write of ``data`` into memory at ``iova`` (device -> memory)."""
        return self._submit("write", iova, len(data), bytearray(data))

    def dma_read(self, iova: int, n: int) -> Transfer:
        """Queue a read of ``n`` bytes of memory at ``iova`` (memory -> device)."""
        return self._submit("read", iova, n, bytearray(n))

    # ------------------------------------------------------------------ progress in time
    def _chunk_time(self, t: Transfer, k: int) -> int:
        _, n, offset = t.chunks[k]
        assert t.started_ns is not None
        # A burst lands once the latency and all bytes up to its end have gone by.
        return t.started_ns + self.latency_ns + math.ceil((offset + n) / self.bandwidth)

    def next_event_time(self) -> int | None:
        if not self.queue:
            return None
        t = self.queue[0]
        if t.started_ns is None:
            t.started_ns = self.iommu.clock.now
        return self._chunk_time(t, t.next_chunk)

    def run_event(self) -> None:
        """Issue the next burst of the transfer at the head of the queue (clock already there)."""
        t = self.queue[0]
        addr, n, offset = t.chunks[t.next_chunk]
        t.next_chunk += 1
        self.stats["bursts"] += 1
        nfaults, naborted = len(self.iommu.faults), self.aborted_bursts
        if t.kind == "write":
            result = self.iommu.access(self, addr, n, DmaAccess.WRITE,
                                       bytes(t.data[offset:offset + n]))
        else:
            result = self.iommu.access(self, addr, n, DmaAccess.READ)
            if result is not None:
                t.data[offset:offset + n] = result
        if result is None:
            self.stats["faulted_bursts"] += 1
            t.faults.extend(self.iommu.faults[nfaults:])
            t.aborted_bursts += self.aborted_bursts - naborted
        else:
            t.bytes_done += n
            self.stats["bytes"] += n
        if t.next_chunk == len(t.chunks):
            now = self.iommu.clock.now
            t.completed_ns = now
            self.queue.popleft()
            self.completions.append(t)
            if self.queue:
                self.queue[0].started_ns = now

    def step(self) -> bool:
        """Advance simulated time to this device's next burst and run everything due until then
        (other devices, flush-queue timers). False if the device is idle."""
        when = self.next_event_time()
        if when is None:
            return False
        clock = self.iommu.clock
        mine = self.stats["bursts"]
        while self.stats["bursts"] == mine:
            if not clock.run_next(when):
                break
        return True

    def wait(self, timeout_ns: int | None = None) -> Transfer | None:
        """Run simulated time until this device's queue is empty (or ``timeout_ns`` passes);
        returns the last completed transfer."""
        clock = self.iommu.clock
        deadline = None if timeout_ns is None else clock.now + timeout_ns
        while self.queue:
            if not clock.run_next(deadline):
                break
        if deadline is not None and self.queue:
            clock.now = max(clock.now, deadline)
        return self.completions[-1] if self.completions else None


@dataclass
class UserBuffer:
    """``length`` bytes at ``vaddr`` in a process of the kernel model, for ``dma_map``: like
    pin_user_pages() the pages are faulted in first (for a device write, with a private copy:
    FOLL_WRITE breaks COW) and the VMA must allow the access; dma_map then pins each frame and
    maps the pieces at one IOVA range, keeping the first page's offset."""

    process: Any
    vaddr: int
    length: int

    def segments(self, direction: DmaDirection) -> list[tuple[int, int]]:
        from migrate.sim.kernel import PROT_READ, PROT_WRITE

        if self.length <= 0:
            raise IommuError(f"user buffer of {self.length} bytes")
        kernel = self.process.kernel
        write = direction is not DmaDirection.TO_DEVICE
        need = PROT_WRITE if write else PROT_READ
        out: list[tuple[int, int]] = []
        va, end = self.vaddr, self.vaddr + self.length
        while va < end:
            vma = self.process.find_vma(va)
            if vma is None or not vma.prot & need:
                raise IommuError(f"{va:#x} in {self.process.name} is not mapped "
                                 f"{'writable' if write else 'readable'}: pin_user_pages fails "
                                 "with EFAULT")
            n = min(end - va, PAGE_SIZE - (va & (PAGE_SIZE - 1)))
            paddr = kernel.fault_in(self.process, va, write=write)
            out.append((paddr, n))
            va += n
        return out


# ============================================================================ teardown orders
SAFE_ORDER = ("wait", "unmap", "unpin", "free")


@dataclass
class TeardownReport:
    """What one teardown order did: the evidence the lab's dma-teardown scenario shows."""

    order: tuple[str, ...]
    mode: str
    device: str
    buffer_owner: str
    victim_owner: str
    iova: int
    length: int
    frames: list[int]
    transfer_status: str
    bytes_delivered: int
    faults: list[IommuFault]
    violations: list[DmaViolation]
    victim_frames: list[int]
    victim_corrupted: list[int]
    events: list[str]

    @property
    def use_after_free(self) -> bool:
        return any(v.kind == "use-after-free" for v in self.violations)

    @property
    def safe(self) -> bool:
        return not self.violations and not self.victim_corrupted

    def evidence(self) -> dict[str, Any]:
        return {
            "order": list(self.order), "mode": self.mode, "device": self.device,
            "iova": hex(self.iova), "length": self.length,
            "frames": [hex(p) for p in self.frames],
            "transfer": self.transfer_status, "bytes_delivered": self.bytes_delivered,
            "faults": [f.describe() for f in self.faults],
            "violations": [v.describe() for v in self.violations],
            "victim_frames": [hex(p) for p in self.victim_frames],
            "victim_corrupted": [hex(p) for p in self.victim_corrupted],
            "events": list(self.events), "safe": self.safe,
        }


def run_teardown(iommu: Iommu, order: Sequence[str] = SAFE_ORDER, *, pages: int = 4,
                 device: str | DmaDevice = "nic", buffer_owner: str = "driver:rx-ring",
                 victim_owner: str = "proc:victim", late_write: bool = False,
                 settle_ns: int = 20_000_000) -> TeardownReport:
    """Map a receive buffer, start a device write into it, then tear down in ``order``.

    Steps: "wait" (for the transfer to complete), "unmap" (dma_unmap without unpinning), "flush"
    (drain the lazy flush queue: the IOTLB invalidation VFIO waits for), "unpin",
    "free" (the buffer's owner drops its reference; the frames really go back to the allocator only
    once no pin holds them), "late_write" (the device writes to the old IOVA again: a buggy or
    malicious device, or a descriptor the driver forgot). Steps not named are done at the end in
    the safe order. Memory is under pressure: as soon as a buffer frame is freed, another owner
    (``victim_owner``) allocates it and fills it. After the steps, ``settle_ns`` of simulated time
    passes (lazy flush timers fire) and the victim's frames are checked for the device's bytes.
    """
    dev = iommu.device(device) if not isinstance(device, str) or device in iommu.devices \
        else iommu.add_device(device)
    known = {"wait", "unmap", "flush", "unpin", "free", "late_write"}
    bad = [s for s in order if s not in known]
    if bad:
        raise IommuError(f"unknown teardown steps {bad}: use {sorted(known)}")
    steps = list(order)
    for s in SAFE_ORDER:
        if s not in steps:
            steps.append(s)
    if late_write and "late_write" not in steps:
        steps.append("late_write")
    memory = iommu.memory
    # A scattered buffer: every other frame, so the IOVA range is contiguous but the frames not.
    frames: list[int] = []
    spacers: list[int] = []
    for _ in range(pages):
        pfn = memory.alloc(0, owner=buffer_owner, kind="dma-buffer")
        spacer = memory.alloc(0, owner="spacer")
        assert isinstance(pfn, int) and isinstance(spacer, int)
        frames.append(pfn)
        spacers.append(spacer)
    direction = DmaDirection.FROM_DEVICE
    m = iommu.dma_map_sg(dev, [(p << PAGE_SHIFT, PAGE_SIZE) for p in frames], direction) \
        if not dev.passthrough else None
    if m is None:
        raise IommuError("run_teardown needs a translated device (not passthrough)")
    payload = bytes((0xA0 + i) & 0xFF for i in range(m.length))
    transfer = dev.dma_write(m.iova, payload)
    nfaults, nviol, nevents = len(iommu.faults), len(iommu.violations), len(iommu.events)
    victim: list[int] = []
    victim_pattern = b"VICTIM!!" * (PAGE_SIZE // 8)
    for step in steps:
        if step == "wait":
            dev.wait()
        elif step == "unmap":
            if not m.unmapped:
                iommu.dma_unmap(dev, m.iova, m.length, unpin=False)
        elif step == "flush":
            iommu.flush_queue_drain("teardown")     # lazy mode: end the window now
        elif step == "unpin":
            if m.pinned:
                iommu.unpin(m)
        elif step == "free":
            for pfn in frames:
                memory.put(pfn)     # the owner's reference; the frame goes only if unpinned
        elif step == "late_write":
            dev.dma_write(m.iova, b"\xEE" * m.length)
            dev.wait()
        # Memory pressure: whatever the step freed is reused at once by someone else.
        for pfn in _take_frames(memory, frames, victim_owner):
            memory.write(pfn << PAGE_SHIFT, victim_pattern)
            victim.append(pfn)
    dev.wait()
    iommu.clock.advance(settle_ns)
    corrupted = [pfn for pfn in victim
                 if memory.read(pfn << PAGE_SHIFT, PAGE_SIZE) != victim_pattern]
    for pfn in [*spacers, *victim]:
        memory.free(pfn)            # evidence taken; leave memory as it was for the next run
    return TeardownReport(tuple(order), iommu.mode, dev.name, buffer_owner, victim_owner, m.iova,
                          m.length, frames, transfer.status, transfer.bytes_done,
                          iommu.faults[nfaults:], iommu.violations[nviol:], victim, corrupted,
                          iommu.events[nevents:])


def _take_frames(memory: Any, wanted: list[int], owner: str) -> list[int]:
    """Allocate order-0 frames until every free frame of ``wanted`` belongs to ``owner``; frames
    allocated on the way that are not wanted are given back. Returns the frames obtained."""
    targets = {p for p in wanted if not memory.is_allocated(p)}
    got: list[int] = []
    others: list[int] = []
    while targets and memory.free_frames:
        pfn = memory.alloc(0, owner=owner, kind="victim")
        if pfn in targets:
            targets.discard(pfn)
            got.append(pfn)
        else:
            others.append(pfn)
    for pfn in others:
        memory.free(pfn)
    return got


# ============================================================================ Machine integration
class DmaMachineMixin:
    """What ``Machine`` gains from this module: ``iommu``, ``add_device``, ``dma_map``,
    ``dma_map_sg``, ``dma_unmap``, ``tick`` and the L1 data cache ``cache`` with optional page
    colouring. Everything is created on first use, so a machine that never does DMA or cache
    experiments pays nothing (no physical-memory hooks are installed until then)."""

    physmem: Any

    @property
    def iommu(self) -> Iommu:
        iommu = self.__dict__.get("_iommu")
        if iommu is None:
            from migrate.sim.iommu import Iommu

            iommu = self.__dict__["_iommu"] = Iommu(self.physmem)
        return iommu

    def add_device(self, name: str, dma_bits: int = 64, **kw: Any) -> DmaDevice:
        """A DMA-capable device with its own IOVA space (``passthrough=True``: none)."""
        return self.iommu.add_device(name, dma_bits, **kw)

    def dma_map(self, device: DmaDevice | str, frames_or_buffer: Any,
                direction: DmaDirection | str = DmaDirection.BIDIRECTIONAL) -> tuple[int, int]:
        """Pin ``frames_or_buffer`` (a pfn, pfns, or an object with ``.frames``) and map it for
        ``device`` at one contiguous IOVA range; returns ``(iova, length)``."""
        return self.iommu.dma_map(device, frames_or_buffer, direction)

    def dma_map_sg(self, device: DmaDevice | str, segments: Sequence[tuple[int, int]],
                   direction: DmaDirection | str = DmaDirection.BIDIRECTIONAL) -> DmaMapping:
        return self.iommu.dma_map_sg(device, segments, direction)

    def dma_unmap(self, device: DmaDevice | str, iova: int, length: int | None = None,
                  **kw: Any) -> DmaMapping:
        """Unmap (and by default unpin); strict mode flushes the IOTLB before returning."""
        return self.iommu.dma_unmap(device, iova, length, **kw)

    def tick(self, ns: int) -> None:
        """Advance simulated time: devices make progress, flush-queue timers fire."""
        self.iommu.clock.advance(ns)

    # ------------------------------------------------------------------ the L1 data cache
    @property
    def cache(self) -> Any:
        cache = self.__dict__.get("_cache")
        if cache is None:
            cache = self.set_cache()
        return cache

    def set_cache(self, size: int = 32 * 1024, ways: int = 8, line_size: int = 64) -> Any:
        """Install a VIPT L1D of this geometry (default: a typical x86 32 KiB 8-way, 1 colour)."""
        from migrate.sim.cache import CacheGeometry, VIPTCache

        old = self.__dict__.get("_cache")
        if old is not None:
            old.flush()
            old.detach()
        cache = self.__dict__["_cache"] = VIPTCache(CacheGeometry(size, ways, line_size),
                                                    self.physmem)
        picker = self.__dict__.get("_colouring")
        if picker is not None:
            self.set_page_colouring(picker.enabled)
        return cache

    @property
    def page_colouring(self) -> Any:
        """The colour-aware frame picker for this cache's geometry (None until enabled)."""
        return self.__dict__.get("_colouring")

    def set_page_colouring(self, enabled: bool = True) -> Any:
        """Make frame allocation for user mappings colour-aware (``colour(paddr) ==
        colour(vaddr)``). The kernel model asks ``frame_picker`` for frames if it has one."""
        from migrate.sim.cache import PageColouring

        picker = PageColouring(self.cache.geometry, self.physmem, enabled=enabled)
        self.__dict__["_colouring"] = picker
        kernel = getattr(self, "kernel", None)
        if kernel is not None and hasattr(kernel, "frame_picker"):
            kernel.frame_picker = picker if enabled else None
        return picker


def iova_spaces_demo(iommu: Iommu, pages: int = 4) -> dict[str, Any]:
    """Evidence for per-device IOVA spaces: two devices each map ``pages`` scattered frames;
    each gets one contiguous IOVA range (the same numbers, since each domain allocates top-down
    on its own) backed by different, non-contiguous frames; each device's writes land in its own
    frames; one device using the other's IOVA reaches only its own domain."""
    memory = iommu.memory
    a = iommu.add_device("demo-nic", dma_bits=32)
    b = iommu.add_device("demo-gpu", dma_bits=64)
    out: dict[str, Any] = {"devices": {}}
    frames_of: dict[str, list[int]] = {}
    spacers: list[int] = []
    for dev in (a, b):
        frames = []
        for _ in range(pages):
            pfn = memory.alloc(0, owner=f"{dev.name}:buf")
            gap = memory.alloc(0, owner="spacer")
            assert isinstance(pfn, int) and isinstance(gap, int)
            frames.append(pfn)
            spacers.append(gap)
        iova, length = iommu.dma_map(dev, frames, DmaDirection.BIDIRECTIONAL)
        payload = dev.name.encode().ljust(length, b".")
        t = dev.dma_write(iova, payload)
        dev.wait()
        frames_of[dev.name] = frames
        out["devices"][dev.name] = {
            "dma_bits": dev.dma_bits, "iova": hex(iova), "length": length,
            "frames": [hex(p) for p in frames],
            "frames_contiguous": all(q == p + 1 for p, q in pairwise(frames)),
            "transfer": t.status,
            "landed_in_own_frames": b"".join(memory.read(p << PAGE_SHIFT, PAGE_SIZE)
                                             for p in frames) == payload,
        }
    # The gpu maps one more buffer; the nic then uses that IOVA, which means nothing in its domain.
    extra = memory.alloc(0, owner="demo-gpu:buf2")
    assert isinstance(extra, int)
    iova_b2, _ = iommu.dma_map(b, [extra], DmaDirection.BIDIRECTIONAL)
    probe = a.dma_read(iova_b2, 8)
    a.wait()
    out["cross_domain_probe"] = {"iova": hex(iova_b2), "status": probe.status,
                                 "faults": [f.describe() for f in probe.faults]}
    out["same_iova_numbers"] = (out["devices"]["demo-nic"]["iova"]
                                == out["devices"]["demo-gpu"]["iova"])
    out["iotlb"] = dict(iommu.iotlb.stats)
    for dev in (a, b):
        for m in iommu.mapped(dev):
            iommu.dma_unmap(dev, m.iova, m.length)
        iommu.remove_device(dev)
    iommu.flush_queue_drain("demo")
    for pfn in [*frames_of["demo-nic"], *frames_of["demo-gpu"], extra, *spacers]:
        memory.free(pfn)
    return out
