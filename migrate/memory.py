"""Memory the kernel maps for us: regions, protections, advice, pagemap and PAGEMAP_SCAN, and
reading or writing another process's memory.

A :class:`Region` is an mmap'd range (anonymous, memfd-backed or from any fd) with a memoryview
onto it (``.view()``; on Python 3.12+ the region itself supports the buffer protocol). Careful: a
thread holding the GIL must never touch a page of a userfaultfd-registered region that may be
missing, or a Python fault handler in the same process can never run. Touch such memory from C
(``migrate.probe.touch_pages``) or from another process.
"""

from __future__ import annotations

import array
import contextlib
import enum
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Self

from migrate._sys import check, ffi, lib

__all__ = [
    "HUGE_PAGE_SIZES",
    "PAGE_SIZE",
    "Advice",
    "PageCategory",
    "PagemapEntry",
    "PagemapScanner",
    "Prot",
    "Region",
    "addr_array",
    "madvise",
    "memfd_create",
    "mmap",
    "mprotect",
    "mremap",
    "munmap",
    "pagemap",
    "pagemap_scan",
    "read_process",
    "read_process_pages",
    "write_process",
    "write_process_pages",
]

PAGE_SIZE: int = int(lib.mig_page_size())
IOV_MAX: int = int(lib.IOV_MAX)
HUGE_PAGE_SIZES: dict[str, int] = {"2M": 2 << 20, "1G": 1 << 30}
_MAP_HUGE = {"2M": lib.MAP_HUGE_2MB, "1G": lib.MAP_HUGE_1GB}
_MFD_HUGE = {"2M": lib.MFD_HUGE_2MB, "1G": lib.MFD_HUGE_1GB}


class Prot(enum.IntFlag):
    NONE = lib.PROT_NONE
    READ = lib.PROT_READ
    WRITE = lib.PROT_WRITE
    EXEC = lib.PROT_EXEC


class Advice(enum.IntEnum):
    """madvise(2) advice values this kernel understands (values from the compiler)."""

    NORMAL = lib.MADV_NORMAL
    RANDOM = lib.MADV_RANDOM
    SEQUENTIAL = lib.MADV_SEQUENTIAL
    WILLNEED = lib.MADV_WILLNEED
    DONTNEED = lib.MADV_DONTNEED
    FREE = lib.MADV_FREE
    REMOVE = lib.MADV_REMOVE
    DONTFORK = lib.MADV_DONTFORK
    DOFORK = lib.MADV_DOFORK
    MERGEABLE = lib.MADV_MERGEABLE
    UNMERGEABLE = lib.MADV_UNMERGEABLE
    HUGEPAGE = lib.MADV_HUGEPAGE
    NOHUGEPAGE = lib.MADV_NOHUGEPAGE
    DONTDUMP = lib.MADV_DONTDUMP
    DODUMP = lib.MADV_DODUMP
    WIPEONFORK = lib.MADV_WIPEONFORK
    KEEPONFORK = lib.MADV_KEEPONFORK
    COLD = lib.MADV_COLD
    PAGEOUT = lib.MADV_PAGEOUT
    POPULATE_READ = lib.MADV_POPULATE_READ
    POPULATE_WRITE = lib.MADV_POPULATE_WRITE
    DONTNEED_LOCKED = lib.MADV_DONTNEED_LOCKED
    COLLAPSE = lib.MADV_COLLAPSE
    GUARD_INSTALL = lib.MADV_GUARD_INSTALL
    GUARD_REMOVE = lib.MADV_GUARD_REMOVE


class PageCategory(enum.IntFlag):
    """PAGEMAP_SCAN categories (include/uapi/linux/fs.h, PAGE_IS_*)."""

    WPALLOWED = lib.PAGE_IS_WPALLOWED
    WRITTEN = lib.PAGE_IS_WRITTEN
    FILE = lib.PAGE_IS_FILE
    PRESENT = lib.PAGE_IS_PRESENT
    SWAPPED = lib.PAGE_IS_SWAPPED
    PFNZERO = lib.PAGE_IS_PFNZERO
    HUGE = lib.PAGE_IS_HUGE
    SOFT_DIRTY = lib.PAGE_IS_SOFT_DIRTY
    GUARD = lib.PAGE_IS_GUARD


ALL_CATEGORIES = PageCategory(sum(int(c) for c in PageCategory))


def _enum_value(enum_cls: type[enum.Enum], value: Any, what: str) -> int:
    """Accept an enum member, its name (any case) or a raw int; reject anything else clearly."""
    if isinstance(value, enum.Enum):
        return int(value.value)
    if isinstance(value, str):
        try:
            return int(enum_cls[value.upper()].value)
        except KeyError:
            names = ", ".join(enum_cls.__members__)
            raise ValueError(f"unknown {what} {value!r}; known: {names}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    raise TypeError(f"{what} must be a {enum_cls.__name__}, a name or an int, not {value!r}")


def _prot_value(prot: Any) -> int:
    if isinstance(prot, str):
        # "rw", "rx", "r", "" / "none"
        letters = {"r": Prot.READ, "w": Prot.WRITE, "x": Prot.EXEC}
        if prot.lower() == "none":
            return 0
        value = 0
        for ch in prot.lower():
            if ch not in letters:
                raise ValueError(f"unknown protection letter {ch!r} in {prot!r} (use r, w, x)")
            value |= letters[ch]
        return value
    if isinstance(prot, int) and not isinstance(prot, bool):
        if prot & ~int(Prot.READ | Prot.WRITE | Prot.EXEC):
            raise ValueError(f"unknown protection bits in {prot:#x}")
        return int(prot)
    raise TypeError(f"prot must be a Prot flag, an int or a string like 'rw', not {prot!r}")


def addr_array(addrs: Any) -> Any:
    """A ``uint64_t[]`` cdata for a sequence of addresses, without copying when it is already an
    ``array('Q')`` (or any buffer of 8-byte items)."""
    if isinstance(addrs, array.array):
        if addrs.itemsize != 8:
            raise TypeError(
                f"address array must have 8-byte items, not typecode {addrs.typecode!r}")
        return ffi.from_buffer("uint64_t[]", addrs)
    if isinstance(addrs, memoryview):
        if addrs.itemsize != 8:
            raise TypeError("address memoryview must have 8-byte items")
        return ffi.from_buffer("uint64_t[]", addrs)
    if isinstance(addrs, ffi.CData):
        return addrs
    return ffi.new("uint64_t[]", [int(a) for a in addrs])


# ---------------------------------------------------------------------------------------------
# thin functions


def mmap(
    length: int, prot: Any = "rw", flags: int | None = None, fd: int = -1, offset: int = 0,
    address: int = 0,
) -> int:
    """mmap(2); returns the address. Default flags: MAP_PRIVATE|MAP_ANONYMOUS."""
    if length <= 0:
        raise ValueError(f"mmap length must be positive, not {length}")
    if flags is None:
        flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS
    out = ffi.new("uint64_t *")
    check(lib.mig_mmap(address, length, _prot_value(prot), flags, fd, offset, out), "mmap")
    return int(out[0])


def munmap(address: int, length: int) -> None:
    _check_aligned(address, "munmap address")
    check(lib.mig_munmap(address, length), "munmap")


def mprotect(address: int, length: int, prot: Any) -> None:
    _check_aligned(address, "mprotect address")
    check(lib.mig_mprotect(address, length, _prot_value(prot)), "mprotect")


def madvise(address: int, length: int, advice: Any) -> None:
    _check_aligned(address, "madvise address")
    value = _enum_value(Advice, advice, "madvise advice")
    check(lib.mig_madvise(address, length, value), f"madvise({_advice_name(value)})")


def mremap(
    address: int, old_length: int, new_length: int, *, may_move: bool = True,
    fixed_address: int | None = None, dontunmap: bool = False,
) -> int:
    """mremap(2); returns the (possibly new) address."""
    _check_aligned(address, "mremap address")
    flags = lib.MREMAP_MAYMOVE if may_move else 0
    new_addr = 0
    if fixed_address is not None:
        flags |= lib.MREMAP_FIXED | lib.MREMAP_MAYMOVE
        new_addr = fixed_address
    if dontunmap:
        flags |= lib.MREMAP_DONTUNMAP | lib.MREMAP_MAYMOVE
    out = ffi.new("uint64_t *")
    check(lib.mig_mremap(address, old_length, new_length, flags, new_addr, out), "mremap")
    return int(out[0])


def memfd_create(name: str = "migrate", *, hugetlb: str | None = None, cloexec: bool = True,
                 allow_sealing: bool = False) -> int:
    flags = lib.MFD_CLOEXEC if cloexec else 0
    if allow_sealing:
        flags |= lib.MFD_ALLOW_SEALING
    if hugetlb is not None:
        flags |= lib.MFD_HUGETLB | _huge_flag(hugetlb, _MFD_HUGE)
    return check(lib.mig_memfd_create(name.encode(), flags), "memfd_create")


def _huge_flag(hugetlb: str, table: dict[str, int]) -> int:
    try:
        return table[hugetlb.upper()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"hugetlb must be one of {sorted(table)} or None, not {hugetlb!r}") from None


def _check_aligned(address: int, what: str, page_size: int = PAGE_SIZE) -> None:
    if address % page_size:
        raise ValueError(f"{what} {address:#x} is not aligned to the page size ({page_size})")


# ---------------------------------------------------------------------------------------------
# Region


class _MemfdAttribute:
    """``Region.memfd(size, ...)`` is a constructor; ``region.memfd`` is that region's fd (or
    None). One name for both, as the API promises, via this descriptor."""

    def __get__(self, obj: Region | None, objtype: type[Region]) -> Any:
        if obj is None:
            return objtype._new_memfd
        return obj._memfd


class Region:
    """An mmap'd range. Use the constructors :meth:`anonymous`, :meth:`memfd`, :meth:`from_fd`."""

    def __init__(self, address: int, size: int, *, page_size: int = PAGE_SIZE,
                 memfd: int | None = None, owns_fd: bool = False, shared: bool = False,
                 kind: str = "anonymous") -> None:
        self.address = address
        self.size = size
        self.page_size = page_size
        self._memfd = memfd
        self.shared = shared
        self.kind = kind
        self._owns_fd = owns_fd
        self._views: list[memoryview] = []
        self._closed = False

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def anonymous(cls, size: int, *, hugetlb: str | None = None, thp: bool | None = None,
                  populate: bool = False, address: int | None = None,
                  fixed_noreplace: bool = False, shared: bool = False,
                  prot: Any = "rw") -> Region:
        """Anonymous memory, private by default. ``hugetlb="2M"|"1G"`` uses MAP_HUGETLB (needs
        reserved pages in /proc/sys/vm/nr_hugepages); ``thp`` sets MADV_HUGEPAGE/NOHUGEPAGE;
        ``address`` with ``fixed_noreplace`` maps exactly there or fails with EEXIST."""
        page_size = HUGE_PAGE_SIZES[_norm_huge(hugetlb)] if hugetlb else PAGE_SIZE
        size = _round_size(size, page_size)
        flags = lib.MAP_ANONYMOUS | (lib.MAP_SHARED if shared else lib.MAP_PRIVATE)
        if hugetlb:
            flags |= lib.MAP_HUGETLB | _huge_flag(hugetlb, _MAP_HUGE)
        if populate:
            flags |= lib.MAP_POPULATE
        if address is not None:
            _check_aligned(address, "Region address", page_size)
            if fixed_noreplace:
                flags |= lib.MAP_FIXED_NOREPLACE
        elif fixed_noreplace:
            raise ValueError("fixed_noreplace needs an address")
        addr = mmap(size, prot, flags, -1, 0, address or 0)
        region = cls(addr, size, page_size=page_size, shared=shared,
                     kind="hugetlb" if hugetlb else "anonymous")
        if thp is not None and not hugetlb:
            region.advise(Advice.HUGEPAGE if thp else Advice.NOHUGEPAGE)
        return region

    @classmethod
    def _new_memfd(cls, size: int, name: str = "migrate", hugetlb: str | None = None,
                   shared: bool = True, prot: Any = "rw") -> Region:
        """Memory backed by a new memfd (shmem, or hugetlbfs with ``hugetlb``), mapped shared by
        default; ``.memfd`` is the fd (closed with the region), e.g. to send over SCM_RIGHTS."""
        page_size = HUGE_PAGE_SIZES[_norm_huge(hugetlb)] if hugetlb else PAGE_SIZE
        size = _round_size(size, page_size)
        fd = memfd_create(name, hugetlb=hugetlb)
        try:
            check(lib.mig_ftruncate(fd, size), "ftruncate(memfd)")
            flags = lib.MAP_SHARED if shared else lib.MAP_PRIVATE
            addr = mmap(size, prot, flags, fd, 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(addr, size, page_size=page_size, memfd=fd, owns_fd=True, shared=shared,
                   kind="memfd")

    @classmethod
    def from_fd(cls, fd: int, size: int, shared: bool = True, *, offset: int = 0,
                prot: Any = "rw", page_size: int = PAGE_SIZE) -> Region:
        """Map ``size`` bytes of an existing fd (e.g. a memfd received from another process).
        The fd stays the caller's (it is not closed with the region)."""
        size = _round_size(size, page_size)
        _check_aligned(offset, "offset", page_size)
        flags = lib.MAP_SHARED if shared else lib.MAP_PRIVATE
        addr = mmap(size, prot, flags, fd, offset)
        return cls(addr, size, page_size=page_size, memfd=fd, owns_fd=False, shared=shared,
                   kind="fd")

    memfd = _MemfdAttribute()

    # -- geometry -------------------------------------------------------------------------
    @property
    def npages(self) -> int:
        return self.size // self.page_size

    @property
    def end(self) -> int:
        return self.address + self.size

    def page_address(self, index: int) -> int:
        if not 0 <= index < self.npages:
            raise IndexError(f"page {index} outside region of {self.npages} pages")
        return self.address + index * self.page_size

    def pages(self) -> Iterator[int]:
        """Addresses of the region's pages, in order."""
        return iter(range(self.address, self.end, self.page_size))

    def __contains__(self, address: object) -> bool:
        return isinstance(address, int) and self.address <= address < self.end

    def _range(self, offset: int, length: int | None) -> tuple[int, int]:
        self._check_open()
        if length is None:
            length = self.size - offset
        if offset % self.page_size:
            raise ValueError(f"offset {offset:#x} is not aligned to the page size {self.page_size}")
        if length <= 0 or offset < 0 or offset + length > self.size:
            raise ValueError(
                f"range offset={offset:#x} length={length:#x} is outside the region "
                f"(size {self.size:#x})"
            )
        return self.address + offset, length

    # -- operations -------------------------------------------------------------------------
    def protect(self, prot: Any, offset: int = 0, length: int | None = None) -> None:
        addr, length = self._range(offset, length)
        check(lib.mig_mprotect(addr, length, _prot_value(prot)), "mprotect")

    def advise(self, advice: Any, offset: int = 0, length: int | None = None) -> None:
        addr, length = self._range(offset, length)
        value = _enum_value(Advice, advice, "madvise advice")
        check(lib.mig_madvise(addr, length, value), f"madvise({_advice_name(value)})")

    def populate(self, write: bool = False, offset: int = 0, length: int | None = None) -> None:
        """Fault the range in now (MADV_POPULATE_READ/WRITE)."""
        self.advise(Advice.POPULATE_WRITE if write else Advice.POPULATE_READ, offset, length)

    def remap(self, new_size: int, may_move: bool = True) -> int:
        """mremap the region to ``new_size``; returns (and adopts) the new address."""
        self._check_open()
        new_size = _round_size(new_size, self.page_size)
        self._release_views()
        self.address = mremap(self.address, self.size, new_size, may_move=may_move)
        self.size = new_size
        return self.address

    def view(self) -> memoryview:
        """A writable memoryview of the whole region (no copy). Released when the region closes."""
        self._check_open()
        mv = memoryview(ffi.buffer(ffi.cast("char *", self.address), self.size))
        self._views.append(mv)
        return mv

    def __buffer__(self, flags: int) -> memoryview:  # PEP 688 (Python 3.12+)
        return self.view()

    def __len__(self) -> int:
        return self.size

    def _raw_view(self) -> memoryview:
        self._check_open()
        return memoryview(ffi.buffer(ffi.cast("char *", self.address), self.size)).cast("B")

    def __getitem__(self, key: int | slice) -> Any:
        """An int for one index, ``bytes`` (a copy) for a slice."""
        item = self._raw_view()[key]
        return item.tobytes() if isinstance(item, memoryview) else item

    def __setitem__(self, key: int | slice, value: Any) -> None:
        self._raw_view()[key] = value

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset:#x} is outside the region")
        return self[offset:offset + length]

    def write(self, offset: int, data: Any) -> None:
        data = memoryview(data).cast("B")
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset:#x} is outside the region")
        self[offset:offset + len(data)] = data

    def pagemap(self, first_page: int = 0, npages: int | None = None,
                pid: int | str = "self") -> list[PagemapEntry]:
        """/proc/PID/pagemap entries of this region's pages."""
        if npages is None:
            npages = self.npages - first_page
        if first_page < 0 or npages < 0 or first_page + npages > self.npages:
            raise ValueError(f"pages {first_page}..{first_page + npages} outside the region")
        return pagemap(pid, self.address + first_page * self.page_size, npages)

    # -- lifetime ---------------------------------------------------------------------------
    def _release_views(self) -> None:
        for mv in self._views:
            # BufferError: something still exports it; the caller must not use it after close
            with contextlib.suppress(BufferError):
                mv.release()
        self._views.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("operation on a closed Region")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._release_views()
        self._closed = True
        check(lib.mig_munmap(self.address, self.size), "munmap")
        if self._owns_fd and self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten region is unmapped rather than leaked; errors here are unreportable.
        with contextlib.suppress(OSError, AttributeError):
            if not self._closed:
                self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.address:#x}+{self.size:#x}"
        return f"<Region {self.kind} {state} page_size={self.page_size}>"


def _norm_huge(hugetlb: str) -> str:
    key = str(hugetlb).upper()
    if key not in HUGE_PAGE_SIZES:
        raise ValueError(
            f"hugetlb must be one of {sorted(HUGE_PAGE_SIZES)} or None, not {hugetlb!r}")
    return key


def _round_size(size: int, page_size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"region size must be a positive int, not {size!r}")
    return (size + page_size - 1) // page_size * page_size


def _advice_name(value: int) -> str:
    try:
        return Advice(value).name
    except ValueError:
        return str(value)


# ---------------------------------------------------------------------------------------------
# pagemap


@dataclass(frozen=True, slots=True)
class PagemapEntry:
    """One /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst)."""

    raw: int

    @property
    def present(self) -> bool:
        return bool(self.raw >> 63 & 1)

    @property
    def swapped(self) -> bool:
        return bool(self.raw >> 62 & 1)

    @property
    def file_shared(self) -> bool:
        """Bit 61: a file page or shared anonymous page."""
        return bool(self.raw >> 61 & 1)

    @property
    def guard(self) -> bool:
        """Bit 58: the PTE is a guard region marker (MADV_GUARD_INSTALL, 6.15+)."""
        return bool(self.raw >> 58 & 1)

    @property
    def uffd_wp(self) -> bool:
        """Bit 57: the PTE is userfaultfd write-protected."""
        return bool(self.raw >> 57 & 1)

    @property
    def exclusive(self) -> bool:
        """Bit 56: the page is mapped exclusively."""
        return bool(self.raw >> 56 & 1)

    @property
    def soft_dirty(self) -> bool:
        return bool(self.raw >> 55 & 1)

    @property
    def pfn(self) -> int | None:
        """The frame number when present and visible (needs CAP_SYS_ADMIN; 0 otherwise -> None)."""
        if not self.present:
            return None
        value = self.raw & ((1 << 55) - 1)
        return value or None


def _pid_arg(pid: int | str) -> int:
    if pid == "self":
        return 0
    if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        return pid
    raise ValueError(f"pid must be a positive int or 'self', not {pid!r}")


def pagemap(pid: int | str = "self", start: int = 0, npages: int = 1,
            page_size: int = PAGE_SIZE) -> list[PagemapEntry]:
    """Entries of ``npages`` pages from ``start`` (page-aligned) in /proc/PID/pagemap."""
    _check_aligned(start, "pagemap start", page_size)
    if npages < 0:
        raise ValueError(f"npages must be >= 0, not {npages}")
    fd = check(lib.mig_open_pagemap(_pid_arg(pid), 0), f"open /proc/{pid}/pagemap")
    try:
        out = ffi.new("uint64_t[]", max(npages, 1))
        got = check(lib.mig_pagemap_read(fd, start, npages, PAGE_SIZE, out), "pread(pagemap)")
    finally:
        os.close(fd)
    # pagemap is indexed by base (4 KiB) pages even inside huge pages
    return [PagemapEntry(int(out[i])) for i in range(got)]


class PagemapScanner:
    """The PAGEMAP_SCAN ioctl on an open /proc/PID/pagemap, one ioctl per :meth:`scan` round.

    For write tracking, register the range with a uffd opened with Feature.WP_ASYNC in WP mode,
    then call ``scan(start, end, require=PageCategory.WRITTEN, wp_matching=True,
    check_wpasync=True)`` each round: it returns the runs written since the last round and
    write-protects them again in the same walk.
    """

    def __init__(self, pid: int | str = "self", capacity: int = 4096) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.pid = pid
        self._fd = check(lib.mig_open_pagemap(_pid_arg(pid), 0), f"open /proc/{pid}/pagemap")
        self._vec = ffi.new("struct mig_page_region[]", capacity)
        self._capacity = capacity
        self._walk_end = ffi.new("uint64_t *")
        self.walk_end = 0

    def fileno(self) -> int:
        return self._fd

    def _walk_flags(self, what: str, start: int, end: int, require: int, anyof: int,
                    exclude: int, wp_matching: bool, check_wpasync: bool) -> int:
        """The checks scan and mark share; the ioctl's flags."""
        if self._fd < 0:
            raise ValueError(f"{what} on a closed PagemapScanner")
        _check_aligned(start, "scan start")
        _check_aligned(end, "scan end")
        if end <= start:
            raise ValueError(f"scan end {end:#x} must be above start {start:#x}")
        for name, mask in (("require", require), ("anyof", anyof), ("exclude", exclude)):
            if int(mask) & ~int(ALL_CATEGORIES):
                raise ValueError(f"{name} has unknown category bits {int(mask):#x}")
        return (lib.PM_SCAN_WP_MATCHING if wp_matching else 0) | (
            lib.PM_SCAN_CHECK_WPASYNC if check_wpasync else 0)

    def scan(self, start: int, end: int, *, require: int = 0, anyof: int = 0, exclude: int = 0,
             return_mask: int | None = None, wp_matching: bool = False,
             check_wpasync: bool = False, max_pages: int = 0
             ) -> list[tuple[int, int, PageCategory]]:
        """Runs ``(start, end, categories)`` of pages that have every ``require`` category, at
        least one ``anyof`` category (if given) and none of ``exclude``."""
        flags = self._walk_flags("scan", start, end, require, anyof, exclude, wp_matching,
                                 check_wpasync)
        if return_mask is None:
            return_mask = int(ALL_CATEGORIES)
        mask = int(require) | int(exclude)
        result: list[tuple[int, int, PageCategory]] = []
        pos = start
        found_pages = 0
        while pos < end:
            limit = 0
            if max_pages:
                limit = max_pages - found_pages
                if limit <= 0:
                    break
            n = lib.mig_pagemap_scan(self._fd, pos, end, flags, limit, int(exclude), mask,
                                     int(anyof), int(return_mask), self._vec, self._capacity,
                                     self._walk_end)
            check(n, "ioctl(PAGEMAP_SCAN)")
            vec = self._vec
            for i in range(n):
                r = vec[i]
                result.append((int(r.start), int(r.end), PageCategory(int(r.categories))))
                found_pages += (int(r.end) - int(r.start)) // PAGE_SIZE
            walk_end = int(self._walk_end[0])
            self.walk_end = walk_end
            # The walk stops early only when the vector filled up or max_pages was reached.
            if walk_end >= end or walk_end <= pos or n < self._capacity and not max_pages:
                break
            pos = walk_end
        return result

    def mark(self, start: int, end: int, out: bytearray, *, require: int = 0, anyof: int = 0,
             exclude: int = 0, wp_matching: bool = False, check_wpasync: bool = False) -> int:
        """Like :meth:`scan`, but each matching page's byte in ``out`` (one a page from
        ``start``) is set to 1 in C, however many runs there are. Returns the pages marked."""
        flags = self._walk_flags("mark", start, end, require, anyof, exclude, wp_matching,
                                 check_wpasync)
        if len(out) < (end - start) // PAGE_SIZE:
            raise ValueError(f"the byte map has {len(out)} bytes for "
                             f"{(end - start) // PAGE_SIZE} pages")
        n = lib.mig_pagemap_mark(self._fd, start, end, flags, int(exclude),
                                 int(require) | int(exclude), int(anyof),
                                 # runs merge across categories not asked about
                                 int(require) | int(anyof) or int(ALL_CATEGORIES),
                                 self._vec, self._capacity, PAGE_SIZE,
                                 ffi.from_buffer("uint8_t[]", out, require_writable=True))
        return int(check(n, "ioctl(PAGEMAP_SCAN)"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.close()


def pagemap_scan(pid: int | str, start: int, end: int, **kwargs: Any
                 ) -> list[tuple[int, int, PageCategory]]:
    """One-shot :meth:`PagemapScanner.scan` (opens and closes /proc/PID/pagemap)."""
    with PagemapScanner(pid) as scanner:
        return scanner.scan(start, end, **kwargs)


# ---------------------------------------------------------------------------------------------
# another process's memory


def _writable_buffer(into: Any, length: int) -> Any:
    buf = ffi.from_buffer(into, require_writable=True)
    if len(buf) < length:
        raise ValueError(f"buffer of {len(buf)} bytes is smaller than the {length} requested")
    return buf


def byte_indexes(byte_map: bytes | bytearray) -> array.array:
    """Indexes of the 1 bytes of a byte map (one byte a page, each 0 or 1), in order."""
    out = array.array("I", bytes(4 * byte_map.count(1)))
    if out:
        lib.mig_bytes_indexes(ffi.from_buffer("uint8_t[]", byte_map), len(byte_map),
                              ffi.from_buffer("uint32_t[]", out, require_writable=True))
    return out


def _byte_op(op: Any, dst: bytearray, src: bytes | bytearray) -> None:
    if len(dst) != len(src):
        raise ValueError(f"byte maps of {len(dst)} and {len(src)} bytes")
    op(ffi.from_buffer("uint8_t[]", dst, require_writable=True), ffi.from_buffer("uint8_t[]", src),
       len(dst))


def bytes_clear(dst: bytearray, where: bytes | bytearray) -> None:
    """dst[i] = 0 wherever where[i] is 1 (byte maps of equal length)."""
    _byte_op(lib.mig_bytes_andnot, dst, where)


def bytes_keep(dst: bytearray, where: bytes | bytearray) -> None:
    """dst[i] = 0 wherever where[i] is 0."""
    _byte_op(lib.mig_bytes_and, dst, where)


def bytes_set(dst: bytearray, where: bytes | bytearray) -> None:
    """dst[i] = 1 wherever where[i] is 1."""
    _byte_op(lib.mig_bytes_or, dst, where)


def read_process(pid: int, address: int, length: int, into: Any = None) -> memoryview:
    """process_vm_readv of one range into ``into`` (any writable buffer) or a new bytearray.
    Returns a memoryview of the bytes actually read (short if the range hits unmapped memory)."""
    if length < 0:
        raise ValueError(f"length must be >= 0, not {length}")
    target = bytearray(length) if into is None else into
    buf = _writable_buffer(target, length)
    n = check(lib.mig_process_read(pid, int(ffi.cast("uintptr_t", buf)), address, length),
              f"process_vm_readv(pid {pid})")
    return memoryview(target).cast("B")[:n]


def write_process(pid: int, address: int, data: Any) -> int:
    """process_vm_writev of ``data`` (any buffer) to ``address`` in ``pid``; returns bytes
    written."""
    buf = ffi.from_buffer(data)
    return check(lib.mig_process_write(pid, address, int(ffi.cast("uintptr_t", buf)), len(buf)),
                 f"process_vm_writev(pid {pid})")


def read_process_pages(pid: int, addrs: Sequence[int] | Any, page_size: int, into: Any) -> int:
    """Gather the pages at ``addrs`` in ``pid`` into ``into`` (page i at offset i*page_size),
    IOV_MAX pages per syscall. Returns bytes read (short at the first unreadable page)."""
    arr = addr_array(addrs)
    n = len(arr)
    buf = _writable_buffer(into, n * page_size)
    return check(lib.mig_process_read_pages(pid, arr, n, page_size,
                                            int(ffi.cast("uintptr_t", buf))),
                 f"process_vm_readv(pid {pid}, {n} pages)")


def write_process_pages(pid: int, addrs: Sequence[int] | Any, page_size: int, data: Any) -> int:
    """Scatter page i of ``data`` to ``addrs[i]`` in ``pid``. Returns bytes written."""
    arr = addr_array(addrs)
    n = len(arr)
    buf = ffi.from_buffer(data)
    if len(buf) < n * page_size:
        raise ValueError(f"data of {len(buf)} bytes is smaller than {n} pages")
    return check(lib.mig_process_write_pages(pid, arr, n, page_size,
                                             int(ffi.cast("uintptr_t", buf))),
                 f"process_vm_writev(pid {pid}, {n} pages)")

