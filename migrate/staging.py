"""Pre-copied pages held by the destination daemon until the guest may have them.

Pre-copy rounds send pages that the running source guest may write again. Installing them in the
destination guest's region at once (as the first version of this daemon did) means a page sent
again must be overwritten in the guest's memory, and a page written after the last round must be
*dropped* from it at the switchover (madvise in the guest, ~3.5 us a page, all of it downtime).

Instead the daemon keeps every pre-copied page in its own memory (``Staging``, one anonymous
mapping the size of the region, filled at the offset of each page). A page sent again just
replaces its staged copy. After the guest runs at the destination and the source has said which
staged pages are stale (STALE), the daemon installs the others itself: on a fault (no network
round trip) and in the background, whole runs per UFFDIO_COPY; each installed run is released from
the staging mapping, so the two together stay about one region in size.
"""

from __future__ import annotations

from array import array
from typing import Any

from migrate import digest, memory
from migrate._native import ffi, lib
from migrate._sys import oserror

DATA = 1  # a staged page with data
ZERO = 2  # a staged page that is all zero (installed with UFFDIO_ZEROPAGE)
FREE_CHUNK = 2 << 20  # staging memory is given back in pieces this big (a huge page)

ZERO_PAGE_HASH = digest.page_hashes(bytes(memory.PAGE_SIZE))[0]


class Staging:
    """Pages of one region received before the guest runs; ``state[p]`` is 0 (nothing to install
    from here), DATA or ZERO. Installing proceeds from a cursor upward (faults take pages ahead
    of it), so everything below the cursor is done and its memory is released."""

    def __init__(self, npages: int, page_size: int, reserve: Any = None) -> None:
        self.npages = npages
        self.page = page_size
        # fastpath.Reserve (or None): each 2 MiB piece of staging is, before its first store,
        # faulted-in memory moved over from the reserve. Stores into fresh memory fault once a
        # page: that was 40% of the destination's CPU time during pre-copy (perf, kv 1 GiB).
        self.reserve = reserve
        self.chunk_pages = FREE_CHUNK // page_size
        self.backed = bytearray(-(-npages // self.chunk_pages))  # 1: chunk claimed or touched
        # No MADV_HUGEPAGE: first touch of madvised THP here ran at 0.66 GB/s against 2.5 GB/s
        # for 4 KiB pages (THP defrag=madvise compacts synchronously).
        self.region = memory.Region.anonymous(npages * page_size)
        self.state = bytearray(npages)
        self.stale_known = False  # installing from here is allowed only once stale pages are known
        self.cursor = 0  # the background install has handled every page below this
        self.freed = 0  # bytes of staging released from the start
        self._state_ptr = ffi.from_buffer("uint8_t[]", self.state, require_writable=True)
        self._base = ffi.cast("char *", self.region.address)

    def store(self, indexes: array, zero: Any, data: Any, hashes: array) -> tuple[int, int]:
        """Keep the pages of one PAGES batch (``data`` holds the non-zero ones in order) and record
        the hash of each in ``hashes``. Returns (pages seen for the first time, pages replaced)."""
        n = len(indexes)
        ndata = n - zero.count(1)
        if ndata:
            self._back(indexes)
        data_hashes = digest.page_hashes(data[:ndata * self.page], self.page) if ndata \
            else array("Q")
        first_time = lib.mig_stage_store(
            self._base, self._state_ptr, ffi.from_buffer("uint64_t[]", hashes),
            ffi.from_buffer("uint32_t[]", indexes), ffi.from_buffer("uint8_t[]", zero), n,
            ffi.from_buffer(data) if ndata else ffi.NULL,
            ffi.from_buffer("uint64_t[]", data_hashes) if ndata else ffi.NULL,
            ZERO_PAGE_HASH, self.page)
        return first_time, n - first_time

    def _back(self, indexes: array) -> None:
        """Reserve memory under the chunks these pages go to, where there is some."""
        backed, per = self.backed, self.chunk_pages
        first, last = indexes[0] // per, indexes[-1] // per
        chunks = range(first, last + 1) if 0 <= last - first <= 1 else sorted({i // per for i in
                                                                          indexes})
        for c in chunks:
            if backed[c]:
                continue
            backed[c] = 1
            if self.reserve is None or (c + 1) * per > self.npages:
                continue  # fresh memory (a partial last chunk stays that way too)
            if not self.reserve.claim(self.region.address + c * FREE_CHUNK, FREE_CHUNK):
                self.reserve.take(FREE_CHUNK)  # none left filled: hot frames for the faults

    def install(self, fd: int, dst: int, present: bytearray, first: int, end: int,
                max_pages: int) -> tuple[int, int]:
        """Install the staged pages of [first, end) into the guest's region at ``dst`` (uffd
        ``fd``), stopping after about ``max_pages``; marks them in ``present``. Returns (index
        reached, pages that became present)."""
        newly = ffi.new("uint64_t *")
        reached = lib.mig_stage_install(fd, dst, self._base, self._state_ptr,
                                        ffi.from_buffer("uint8_t[]", present,
                                                        require_writable=True),
                                        first, end, self.page, max_pages, newly)
        if reached < 0:
            exc = oserror(-reached, f"installing staged pages {first}..{end} "
                                    f"(ioctl UFFDIO_COPY/ZEROPAGE)")
            exc.newly = int(newly[0])  # type: ignore[attr-defined]  # installed before the error
            raise exc
        return reached, int(newly[0])

    def install_next(self, fd: int, dst: int, present: bytearray, max_pages: int) -> int | None:
        """Background: install the next ``max_pages`` or so staged pages from the cursor; give
        back the staging memory below it. Returns pages that became present, None when done."""
        if self.cursor >= self.npages:
            return None
        reached, newly = self.install(fd, dst, present, self.cursor, self.npages, max_pages)
        self.advance(reached)
        return newly

    def advance(self, reached: int) -> None:
        """The background install has handled every page below ``reached``: move the cursor and
        give back the staging memory below it, in whole chunks."""
        self.cursor = reached
        done_bytes = (reached * self.page) // FREE_CHUNK * FREE_CHUNK
        if reached >= self.npages:
            done_bytes = self.npages * self.page
        if done_bytes > self.freed:
            self.region.advise(memory.Advice.DONTNEED, self.freed, done_bytes - self.freed)
            self.freed = done_bytes

    def drop(self, indexes: array) -> int:
        """Forget staged pages (stale: written at the source since they were sent). Returns how
        many were staged."""
        if not len(indexes):
            return 0
        return int(lib.mig_bytes_clear_indexes(self._state_ptr, ffi.from_buffer("uint32_t[]",
                                                                                indexes),
                                               len(indexes), self.npages))

    def remaining(self) -> int:
        return self.npages - self.state.count(0)

    def close(self) -> None:
        self.region.close()
