"""Simulated physical memory: sparse frame storage, a buddy allocator, per-frame metadata, hooks.

Storage is sparse: a frame's 4 KiB of bytes exist only once something writes to it (or a page table
is placed in it), so ``PhysicalMemory(64 << 30)`` costs nothing until touched. Untouched frames read
as zeros, like freshly zeroed RAM.

The allocator is a binary buddy system in the manner of Linux's mm/page_alloc.c: free blocks of
2**order frames, naturally aligned, split on allocation and merged with their buddy on free.
Orders run from 0 (4 KiB) to 18 (1 GiB) so that 2 MiB (order 9) and 1 GiB (order 18) huge pages
can be allocated directly (Linux takes gigantic pages from memblock/CMA rather than the buddy
lists; here one allocator serves both, which makes fragmentation defeat huge allocations
observably).

Frame 0 is reserved as the shared zero page (Linux's ``empty_zero_page``): never allocated, never
moved, always reading as zeros unless something writes to physical memory behind the kernel's back.

Hooks are plain callbacks registered with ``on_alloc``/``on_free``/``on_write``/``on_frame_moved``;
each returns a function that unsubscribes. With no subscribers the hot paths test one empty list.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
MAX_ORDER = 18  # 2**18 frames of 4 KiB = 1 GiB
ORDER_2M = 9
ORDER_1G = 18
ZERO_PFN = 0

AllocHook = Callable[[int, int, "str | None"], None]
WriteHook = Callable[[int, int, str], None]
MoveHook = Callable[[int, int], None]


class PhysMemError(Exception):
    """Base class of the physical-memory model's errors."""


class OutOfMemory(PhysMemError):
    """No free block of ``order`` exists. ``reason`` says whether memory is exhausted or merely too
    fragmented (enough free frames, but none of them contiguous and aligned at that order)."""

    def __init__(self, order: int, reason: str) -> None:
        super().__init__(f"cannot allocate an order-{order} block: {reason}")
        self.order = order
        self.reason = reason


class FramePinned(PhysMemError):
    """A pinned frame (e.g. under DMA) was freed or asked to move."""

    def __init__(self, pfn: int, pinned: int, owner: str | None) -> None:
        super().__init__(f"frame {pfn:#x} (owner {owner!r}) is pinned {pinned} time(s)")
        self.pfn = pfn
        self.pinned = pinned
        self.owner = owner


class BadFrame(PhysMemError, ValueError):
    """A pfn/paddr/order argument that names no allocated frame or lies outside memory."""


@dataclass(slots=True, eq=False)
class Frame:
    """Metadata of one allocated block, keyed by its first pfn (the head, like a compound page).

    ``refcount`` counts users (mappings, the page cache, pins); ``pinned`` counts pins alone. A
    frame whose refcount drops to zero through ``put``/``unpin`` goes back to the allocator.
    """

    pfn: int
    order: int
    owner: str | None
    refcount: int = 1
    pinned: int = 0
    movable: bool = True
    # Free-form tag for the kernel model ("anon", "pagecache", "pagetable", ...).
    kind: str = ""


class PhysicalMemory:
    """Frames of simulated RAM with a buddy allocator. ``size`` is in bytes (multiple of 4 KiB)."""

    def __init__(self, size: int, *, max_order: int = MAX_ORDER) -> None:
        if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise BadFrame(f"memory size must be a positive multiple of {PAGE_SIZE}, got {size!r}")
        if size < 2 * PAGE_SIZE:
            raise BadFrame("memory needs at least two frames (one is the reserved zero page)")
        if not 0 <= max_order <= MAX_ORDER:
            raise BadFrame(f"max_order must be in 0..{MAX_ORDER}, got {max_order}")
        self.size = size
        self.nframes = size >> PAGE_SHIFT
        self.max_order = max_order
        # pfn -> bytearray(PAGE_SIZE); absent means all zeros.
        self._data: dict[int, bytearray] = {}
        # Buddy state: head pfn -> order for every free block, plus one min-heap per order
        # (lazy deletion: entries not matching _free_order are stale) so allocation is deterministic
        # (lowest address first) without scanning.
        self._free_order: dict[int, int] = {}
        self._heaps: list[list[int]] = [[] for _ in range(max_order + 1)]
        self._free_count = [0] * (max_order + 1)
        self._frames: dict[int, Frame] = {}
        self.free_frames = 0
        self._alloc_hooks: list[AllocHook] = []
        self._free_hooks: list[AllocHook] = []
        self._write_hooks: list[WriteHook] = []
        self._move_hooks: list[MoveHook] = []
        self.stats = {"allocs": 0, "frees": 0, "failed_allocs": 0, "compactions": 0, "moved": 0}
        # The zero page: frame 0, reserved. Everything above it goes to the free lists.
        self.zero_frame = ZERO_PFN
        self._frames[ZERO_PFN] = Frame(ZERO_PFN, 0, "zero-page", refcount=1, movable=False,
                                       kind="zero")
        self._seed_free_range(1, self.nframes)

    # ----------------------------------------------------------------- buddy internals
    def _seed_free_range(self, start: int, end: int) -> None:
        pfn = start
        while pfn < end:
            order = self.max_order
            while order > 0 and (pfn & ((1 << order) - 1) or pfn + (1 << order) > end):
                order -= 1
            self._push_free(pfn, order)
            pfn += 1 << order

    def _push_free(self, pfn: int, order: int) -> None:
        self._free_order[pfn] = order
        heapq.heappush(self._heaps[order], pfn)
        self._free_count[order] += 1
        self.free_frames += 1 << order

    def _remove_free(self, pfn: int, order: int) -> None:
        del self._free_order[pfn]  # its heap entry becomes stale
        self._free_count[order] -= 1
        self.free_frames -= 1 << order

    def _pop_free(self, order: int) -> int | None:
        heap = self._heaps[order]
        free_order = self._free_order
        while heap:
            pfn = heapq.heappop(heap)
            if free_order.get(pfn) == order:
                self._remove_free(pfn, order)
                return pfn
        return None

    def _take_block(self, order: int) -> int | None:
        for o in range(order, self.max_order + 1):
            if self._free_count[o]:
                pfn = self._pop_free(o)
                assert pfn is not None
                while o > order:  # split, returning the upper halves to the free lists
                    o -= 1
                    self._push_free(pfn + (1 << o), o)
                return pfn
        return None

    def _release_block(self, pfn: int, order: int) -> None:
        while order < self.max_order:
            buddy = pfn ^ (1 << order)
            if self._free_order.get(buddy) != order:
                break
            self._remove_free(buddy, order)
            pfn = min(pfn, buddy)
            order += 1
        self._push_free(pfn, order)

    def _free_block_containing(self, pfn: int) -> tuple[int, int] | None:
        for order in range(self.max_order + 1):
            head = pfn & ~((1 << order) - 1)
            if self._free_order.get(head) == order:
                return head, order
        return None

    def _take_specific(self, pfn: int) -> None:
        """Remove the free frame ``pfn`` from its free block, returning the rest to the lists."""
        found = self._free_block_containing(pfn)
        if found is None:
            raise BadFrame(f"frame {pfn:#x} is not free")
        head, order = found
        self._remove_free(head, order)
        while order > 0:
            order -= 1
            half = 1 << order
            if pfn >= head + half:
                self._push_free(head, order)
                head += half
            else:
                self._push_free(head + half, order)

    # ----------------------------------------------------------------- allocation API
    def alloc(self, order: int = 0, *, owner: str | None = None, contiguous: bool = True,
              movable: bool = True, kind: str = "") -> int | list[int]:
        """Allocate 2**order frames and return the first pfn.

        With ``contiguous=False`` the 2**order frames may be scattered (like vmalloc): a list of
        order-0 pfns is returned instead. Raises ``OutOfMemory`` with a reason distinguishing
        exhaustion from fragmentation.
        """
        if not isinstance(order, int) or not 0 <= order <= self.max_order:
            raise BadFrame(f"order must be an int in 0..{self.max_order}, got {order!r}")
        if not contiguous:
            count = 1 << order
            if self.free_frames < count:
                self.stats["failed_allocs"] += 1
                raise OutOfMemory(order, f"only {self.free_frames} free frames, {count} needed")
            return [self.alloc(0, owner=owner, movable=movable, kind=kind)  # type: ignore[misc]
                    for _ in range(count)]
        pfn = self._take_block(order)
        if pfn is None:
            self.stats["failed_allocs"] += 1
            need = 1 << order
            if self.free_frames >= need:
                reason = (f"fragmented: {self.free_frames} frames free but no free block of "
                          f"order >= {order} (largest free order {self.largest_free_order()})")
            else:
                reason = f"exhausted: {self.free_frames} frames free, {need} needed"
            raise OutOfMemory(order, reason)
        self._frames[pfn] = Frame(pfn, order, owner, movable=movable, kind=kind)
        self.stats["allocs"] += 1
        if self._alloc_hooks:
            for hook in self._alloc_hooks:
                hook(pfn, order, owner)
        return pfn

    def free(self, pfn: int, order: int | None = None) -> None:
        """Return an allocated block to the allocator (whatever its refcount). Raises
        ``FramePinned`` if pinned and ``BadFrame`` if ``pfn`` is not an allocated block head or
        ``order`` does not match the allocation."""
        frame = self._frames.get(pfn)
        if frame is None or pfn == ZERO_PFN:
            raise BadFrame(f"frame {pfn:#x} is not an allocated block (double free?)")
        if order is not None and order != frame.order:
            raise BadFrame(f"frame {pfn:#x} was allocated at order {frame.order}, freed at {order}")
        if frame.pinned:
            raise FramePinned(pfn, frame.pinned, frame.owner)
        del self._frames[pfn]
        for p in range(pfn, pfn + (1 << frame.order)):
            self._data.pop(p, None)  # freed memory reads as zeros when reallocated
        self._release_block(pfn, frame.order)
        self.stats["frees"] += 1
        if self._free_hooks:
            for hook in self._free_hooks:
                hook(pfn, frame.order, frame.owner)

    def frame(self, pfn: int) -> Frame:
        """The metadata of the allocated block containing ``pfn`` (its head's Frame)."""
        frame = self._frames.get(pfn)
        if frame is not None:
            return frame
        for order in range(1, self.max_order + 1):
            head = pfn & ~((1 << order) - 1)
            frame = self._frames.get(head)
            if frame is not None and frame.order >= order:
                return frame
        raise BadFrame(f"frame {pfn:#x} is not allocated")

    def is_allocated(self, pfn: int) -> bool:
        try:
            self.frame(pfn)
        except BadFrame:
            return False
        return True

    def get(self, pfn: int) -> Frame:
        """Take one more reference on an allocated block (``get_page``)."""
        frame = self.frame(pfn)
        frame.refcount += 1
        return frame

    def put(self, pfn: int) -> bool:
        """Drop one reference (``put_page``); the block is freed at zero. Returns True if freed."""
        frame = self.frame(pfn)
        if frame.pfn == ZERO_PFN:
            return False  # the zero page is never freed
        if frame.refcount <= 0:
            raise BadFrame(f"frame {pfn:#x} refcount underflow")
        frame.refcount -= 1
        if frame.refcount == 0:
            self.free(frame.pfn)
            return True
        return False

    def pin(self, pfn: int) -> Frame:
        """Pin a frame (``pin_user_pages``): it holds a reference, cannot be freed or migrated."""
        frame = self.frame(pfn)
        frame.pinned += 1
        frame.refcount += 1
        return frame

    def unpin(self, pfn: int) -> bool:
        """Drop a pin and its reference; returns True if that freed the frame."""
        frame = self.frame(pfn)
        if frame.pinned <= 0:
            raise BadFrame(f"frame {pfn:#x} is not pinned")
        frame.pinned -= 1
        return self.put(frame.pfn)

    # ----------------------------------------------------------------- introspection
    def free_blocks_by_order(self) -> dict[int, int]:
        return {order: self._free_count[order] for order in range(self.max_order + 1)}

    def largest_free_order(self) -> int:
        for order in range(self.max_order, -1, -1):
            if self._free_count[order]:
                return order
        return -1

    def allocated_frames(self) -> int:
        return self.nframes - self.free_frames

    def fragmentation(self) -> dict[int, float]:
        """Unusable free space index per order, as Linux's /sys/kernel/debug/extfrag/unusable_index
        (mm/vmstat.c unusable_free_index): the fraction of free memory that cannot satisfy an
        allocation of that order. 0.0 = all free memory usable, 1.0 = none."""
        total = self.free_frames
        out: dict[int, float] = {}
        for order in range(self.max_order + 1):
            if total == 0:
                out[order] = 0.0
                continue
            suitable = sum(self._free_count[o] << o for o in range(order, self.max_order + 1))
            out[order] = (total - suitable) / total
        return out

    def fragmentation_index(self, order: int) -> float:
        """Linux's extfrag fragmentation index (mm/vmstat.c __fragmentation_index): -1.0 if an
        allocation of ``order`` would succeed; otherwise towards 0 means failure from lack of
        memory, towards 1 means failure from fragmentation."""
        if self.largest_free_order() >= order:
            return -1.0
        blocks = sum(self._free_count)
        if blocks == 0:
            return 0.0
        requested = 1 << order
        return 1.0 - (1.0 + self.free_frames / requested) / blocks

    # ----------------------------------------------------------------- compaction
    def compact(self) -> int:
        """Migrate movable, unpinned order-0 frames from the bottom of memory into free frames at
        the top (Linux's two-scanner compaction, mm/compaction.c), so free space coalesces into
        large blocks. Data and metadata move; ``on_frame_moved(old, new)`` subscribers (the owners'
        page tables) are told so they can rewrite their mappings. Returns the number moved."""
        self.stats["compactions"] += 1
        candidates = sorted(p for p, f in self._frames.items()
                            if f.order == 0 and f.movable and not f.pinned and p != ZERO_PFN)
        moved = 0
        ci = 0
        free_pfn = self.nframes - 1
        while ci < len(candidates):
            # Free scanner: the highest free frame above the migrate scanner.
            while free_pfn > candidates[ci] and self._free_block_containing(free_pfn) is None:
                free_pfn -= 1
            if free_pfn <= candidates[ci]:
                break
            old = candidates[ci]
            ci += 1
            self._move_frame(old, free_pfn)
            moved += 1
            free_pfn -= 1
        self.stats["moved"] += moved
        return moved

    def _move_frame(self, old: int, new: int) -> None:
        frame = self._frames.pop(old)
        self._take_specific(new)
        data = self._data.pop(old, None)
        if data is not None:
            self._data[new] = data
        frame.pfn = new
        self._frames[new] = frame
        self._release_block(old, 0)
        for hook in self._move_hooks:
            hook(old, new)

    def migrate_frame(self, old: int, new: int) -> None:
        """Move one allocated order-0 frame to the free frame ``new`` (used by compaction and by
        NUMA-style migration in scenarios). Refuses pinned or unmovable frames."""
        frame = self.frame(old)
        if frame.pfn != old or frame.order != 0:
            raise BadFrame(f"frame {old:#x} is not an order-0 block head")
        if frame.pinned:
            raise FramePinned(old, frame.pinned, frame.owner)
        if not frame.movable:
            raise BadFrame(f"frame {old:#x} is not movable")
        self._move_frame(old, new)

    # ----------------------------------------------------------------- data access
    def _check_range(self, paddr: int, n: int) -> None:
        if paddr < 0 or n < 0 or paddr + n > self.size:
            raise BadFrame(f"physical range {paddr:#x}+{n:#x} outside memory of {self.size:#x}")

    def frame_bytes(self, pfn: int) -> bytearray:
        """The backing bytearray of a frame, materialised if needed (for page tables/hot paths)."""
        data = self._data.get(pfn)
        if data is None:
            if not 0 <= pfn < self.nframes:
                raise BadFrame(f"pfn {pfn:#x} outside memory")
            data = self._data[pfn] = bytearray(PAGE_SIZE)
        return data

    def is_materialised(self, pfn: int) -> bool:
        return pfn in self._data

    def read(self, paddr: int, n: int) -> bytes:
        self._check_range(paddr, n)
        out = bytearray()
        while n > 0:
            pfn, off = paddr >> PAGE_SHIFT, paddr & PAGE_MASK
            chunk = min(n, PAGE_SIZE - off)
            data = self._data.get(pfn)
            out += data[off:off + chunk] if data is not None else bytes(chunk)
            paddr += chunk
            n -= chunk
        return bytes(out)

    def write(self, paddr: int, data: bytes | bytearray | memoryview, *,
              writer: str = "cpu") -> None:
        n = len(data)
        self._check_range(paddr, n)
        if self._write_hooks:
            for hook in self._write_hooks:
                hook(paddr, n, writer)
        pos = 0
        while pos < n:
            pfn, off = (paddr + pos) >> PAGE_SHIFT, (paddr + pos) & PAGE_MASK
            chunk = min(n - pos, PAGE_SIZE - off)
            buf = self._data.get(pfn)
            if buf is None:
                buf = self._data[pfn] = bytearray(PAGE_SIZE)
            buf[off:off + chunk] = data[pos:pos + chunk]
            pos += chunk

    def read_u64(self, paddr: int) -> int:
        data = self._data.get(paddr >> PAGE_SHIFT)
        if data is None:
            return 0
        off = paddr & PAGE_MASK
        return int.from_bytes(data[off:off + 8], "little")

    def write_u64(self, paddr: int, value: int, *, writer: str = "cpu") -> None:
        if self._write_hooks:
            for hook in self._write_hooks:
                hook(paddr, 8, writer)
        off = paddr & PAGE_MASK
        self.frame_bytes(paddr >> PAGE_SHIFT)[off:off + 8] = value.to_bytes(8, "little")

    def zero(self, pfn: int, order: int = 0) -> None:
        """Zero a block (drops the backing storage: absent frames read as zeros)."""
        for p in range(pfn, pfn + (1 << order)):
            self._data.pop(p, None)

    def copy_frame(self, src: int, dst: int, *, writer: str = "cpu") -> None:
        if self._write_hooks:
            for hook in self._write_hooks:
                hook(dst << PAGE_SHIFT, PAGE_SIZE, writer)
        data = self._data.get(src)
        if data is None:
            self._data.pop(dst, None)
        else:
            self._data[dst] = bytearray(data)

    # ----------------------------------------------------------------- hooks
    def _subscribe(self, hooks: list, callback: Callable) -> Callable[[], None]:
        hooks.append(callback)

        def unsubscribe() -> None:
            if callback in hooks:
                hooks.remove(callback)
        return unsubscribe

    def on_alloc(self, callback: AllocHook) -> Callable[[], None]:
        """Call ``callback(pfn, order, owner)`` after every allocation."""
        return self._subscribe(self._alloc_hooks, callback)

    def on_free(self, callback: AllocHook) -> Callable[[], None]:
        """Call ``callback(pfn, order, owner)`` after every free (owner = the one that had it)."""
        return self._subscribe(self._free_hooks, callback)

    def on_write(self, callback: WriteHook) -> Callable[[], None]:
        """Call ``callback(paddr, n, writer)`` before every write (CPU stores, A/D updates by the
        page walker with writer "mmu", device DMA with writer "dev:NAME")."""
        return self._subscribe(self._write_hooks, callback)

    def on_frame_moved(self, callback: MoveHook) -> Callable[[], None]:
        """Call ``callback(old_pfn, new_pfn)`` whenever compaction/migration moves a frame."""
        return self._subscribe(self._move_hooks, callback)


# The brief's alternative name: the allocator lives on PhysicalMemory itself.
BuddyAllocator = PhysicalMemory
