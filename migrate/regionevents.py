"""Guest region events during a migration: REMOVE, UNMAP, REMAP and FORK.

A guest may change its own address space while it is being migrated: discard pages
(``madvise(MADV_DONTNEED/MADV_REMOVE)``: UFFD_EVENT_REMOVE), unmap part of its region (``munmap``,
or ``mmap(MAP_FIXED)`` over it: UFFD_EVENT_UNMAP), move it (``mremap``: UFFD_EVENT_REMAP), or
fork (UFFD_EVENT_FORK, with a new userfaultfd for the child's copy of the region). Both guests'
userfaultfds are opened with these event features (``GUEST_EVENTS``); the thread doing the
syscall then blocks until the daemon has read the event, so the daemon always knows the layout
before it changes (Documentation/admin-guide/mm/userfaultfd.rst, "Non-cooperative userfaultfd").

This module holds what both daemons and the guest share:

* ``RegionMap``: for one address space (the guest, or a child it forked), where each page of the
  migrated region is now (address <-> page index, kept through REMAPs) and what the guest did with
  it (``LIVE``, ``REMOVED``: zero for the guest, served locally; ``UNMAPPED``: gone).
* ``EventSpec``: the test hook ``KIND@UNITS[:FIRST:COUNT]`` a guest performs at a fixed count of
  work units (init steps + operations), so a run with the event is deterministic.
* ``EventHook``: performs an ``EventSpec`` on a region (in the guest, and in the reference run).
* ``reference_run``: the digest a never-migrated run with the same event ends with (and, for a
  fork, the digest of the region the child saw).

docs/region-events.md describes the handling per event and side.
"""

from __future__ import annotations

import bisect
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from migrate import _native, memory, uffd, workloads
from migrate.errors import MigrateError

GUEST_EVENTS = (uffd.Feature.EVENT_REMOVE | uffd.Feature.EVENT_UNMAP | uffd.Feature.EVENT_REMAP
                | uffd.Feature.EVENT_FORK)

LIVE = 0  # the guest's page: still to be installed if missing
REMOVED = 1  # discarded by the guest: zero for it; a fault there is resolved locally
UNMAPPED = 2  # no longer part of the guest's region: never installed

KINDS = ("remove", "unmap", "remap", "fork")
_SPEC_RE = re.compile(r"^(remove|unmap|remap|fork)@(\d+)(?::(\d+):(\d+))?(,hold|,dest)?$")
MAX_SPEC_LEN = 64


class RegionEventError(MigrateError):
    """A region event the migration cannot follow (it is abandoned and names the event)."""


# ---------------------------------------------------------------------------------------------
# Where the region's pages are, in one address space


class RegionMap:
    """Page index <-> address for one address space, and each page's state (LIVE, REMOVED,
    UNMAPPED). Starts as one segment: page i at ``base + i * page_size``."""

    def __init__(self, base: int, npages: int, page_size: int) -> None:
        if npages <= 0 or page_size <= 0 or base % page_size:
            raise ValueError(f"bad region: base {base:#x}, {npages} pages of {page_size} bytes")
        self.page = page_size
        self.npages = npages
        # (address, first page index, page count), sorted by address, never overlapping.
        self.segments: list[tuple[int, int, int]] = [(base, 0, npages)]
        self.state = bytearray(npages)
        self.changed = False  # an event moved or retired pages: translate every address

    def copy(self) -> RegionMap:
        """The same view for a forked child (its region is a copy at the same addresses)."""
        other = RegionMap.__new__(RegionMap)
        other.page, other.npages = self.page, self.npages
        other.segments = list(self.segments)
        other.state = bytearray(self.state)
        other.changed = self.changed
        return other

    def _segment_at(self, address: int) -> tuple[int, int, int] | None:
        k = bisect.bisect_right(self.segments, (address, 1 << 64, 0)) - 1
        if k >= 0:
            start, first, count = self.segments[k]
            if address < start + count * self.page:
                return self.segments[k]
        return None

    def index_of(self, address: int) -> int | None:
        """The region page at ``address`` in this space, or None (not a page of the region:
        memory the guest mapped there itself, or the old range of an mremap(MREMAP_DONTUNMAP))."""
        seg = self._segment_at(address)
        if seg is None:
            return None
        return seg[1] + (address - seg[0]) // self.page

    def address_of(self, index: int) -> int | None:
        """Where page ``index`` is mapped now, or None once it is unmapped."""
        if not 0 <= index < self.npages:
            raise IndexError(f"page {index} outside the region of {self.npages} pages")
        if self.state[index] == UNMAPPED:
            return None
        for start, first, count in self.segments:
            if first <= index < first + count:
                return start + (index - first) * self.page
        return None

    def live(self, index: int) -> bool:
        return self.state[index] == LIVE

    def _check_range(self, start: int, end: int, what: str) -> None:
        if start % self.page or end % self.page or end <= start:
            raise ValueError(f"{what} range {start:#x}-{end:#x} is not a page-aligned range")

    def _cut(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """Take [start, end) out of the segments; returns the pieces taken (address order)."""
        page = self.page
        kept: list[tuple[int, int, int]] = []
        taken: list[tuple[int, int, int]] = []
        for s, first, count in self.segments:
            e = s + count * page
            if e <= start or s >= end:
                kept.append((s, first, count))
                continue
            if s < start:
                kept.append((s, first, (start - s) // page))
            lo, hi = max(s, start), min(e, end)
            taken.append((lo, first + (lo - s) // page, (hi - lo) // page))
            if e > end:
                kept.append((end, first + (end - s) // page, (e - end) // page))
        self.segments = kept
        return taken

    def _indexes_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """(first index, count) of the region pages mapped in [start, end)."""
        page = self.page
        runs = []
        for s, first, count in self.segments:
            e = s + count * page
            if e <= start or s >= end:
                continue
            lo, hi = max(s, start), min(e, end)
            runs.append((first + (lo - s) // page, (hi - lo) // page))
        return runs

    def remove(self, start: int, end: int) -> list[int]:
        """UFFD_EVENT_REMOVE: the pages mapped in [start, end) are zero for the guest now.
        Returns the indexes that were LIVE (now REMOVED)."""
        self._check_range(start, end, "REMOVE")
        changed = []
        for first, count in self._indexes_in(start, end):
            for i in range(first, first + count):
                if self.state[i] == LIVE:
                    self.state[i] = REMOVED
                    changed.append(i)
        self.changed = True
        return changed

    def unmap(self, start: int, end: int) -> list[int]:
        """UFFD_EVENT_UNMAP: the pages mapped in [start, end) left the region. Returns the
        indexes that were not yet UNMAPPED."""
        self._check_range(start, end, "UNMAP")
        gone = []
        for _addr, first, count in self._cut(start, end):
            for i in range(first, first + count):
                if self.state[i] != UNMAPPED:
                    self.state[i] = UNMAPPED
                    gone.append(i)
        self.changed = True
        return gone

    def remap(self, old: int, new: int, length: int) -> int:
        """UFFD_EVENT_REMAP: [old, old + length) now lives at [new, new + length) (the pages and
        their registration moved with the VMA). Whatever was mapped at the target before is gone
        (mremap(MREMAP_FIXED) unmaps it first). Returns how many region pages moved."""
        self._check_range(old, old + length, "REMAP")
        if new % self.page:
            raise ValueError(f"REMAP target {new:#x} is not page-aligned")
        moving = self._cut(old, old + length)
        for _addr, first, count in self._cut(new, new + length):
            for i in range(first, first + count):
                self.state[i] = UNMAPPED
        for addr, first, count in moving:
            bisect.insort(self.segments, (addr - old + new, first, count))
        self.changed = True
        return sum(count for _a, _f, count in moving)


class ChildSpace:
    """A process the guest forked during post-copy: its userfaultfd (owned here), its view of
    the region, and ``done[i]``: 1 when page i needs nothing more in the child (it was there at
    the fork, was installed since, or is not LIVE in the child)."""

    def __init__(self, fd: uffd.Userfaultfd, region: RegionMap, done: bytearray) -> None:
        self.fd = fd
        self.map = region
        self.done = done
        self.need = done.count(0)

    @classmethod
    def forked(cls, fd: uffd.Userfaultfd, parent_map: RegionMap, parent_has: bytes) -> ChildSpace:
        """The child of a space whose pages ``parent_has`` (1: in its memory) at the fork: the
        child's copy has the same pages (fork copies the page tables), the rest is missing."""
        region = parent_map.copy()
        done = bytearray(parent_has)
        state = region.state
        i = _find_nonzero(state, 0)
        while i >= 0:
            done[i] = 1
            i = _find_nonzero(state, i + 1)
        return cls(fd, region, done)

    def needs(self, index: int) -> bool:
        return not self.done[index]

    def got(self, index: int) -> None:
        if not self.done[index]:
            self.done[index] = 1
            self.need -= 1

    def first_needed(self, start: int = 0) -> int:
        return self.done.find(0, start)


def _find_nonzero(data: bytearray, start: int) -> int:
    a, b = data.find(REMOVED, start), data.find(UNMAPPED, start)
    if a < 0:
        return b
    return a if b < 0 else min(a, b)


# ---------------------------------------------------------------------------------------------
# The test hook: an event at a fixed count of work units


@dataclass(frozen=True)
class EventSpec:
    """``remove@UNITS:FIRST:COUNT`` (madvise away pages FIRST..FIRST+COUNT-1),
    ``unmap@UNITS:FIRST:COUNT`` (munmap them, then map fresh zero memory there so the workload
    keeps running), ``remap@UNITS`` (mremap the whole region to a new address and continue
    there), ``fork@UNITS`` (fork; the child digests its copy of the region and exits).
    UNITS counts the workload's init steps plus operations.

    A ``,hold`` suffix pins down which side performs the event. The source's guest stops working
    at UNITS and waits for one of two things: the daemon's PROCEED (sent once pre-copy round 1 is
    out, so the event happens during pre-copy; after a REMOVE the guest then waits, idle, for the
    pause, so the discarded pages stay as they are), or the pause for the switchover (post-copy
    mode: the event happens at the destination as soon as the guest resumes there, while most
    pages are still missing). ``,dest`` holds until the pause in every mode: the event happens at
    the destination right after the resume also after pre-copy (hybrid: while staged pages are
    still being installed). The reference run ignores both (waiting changes no bytes)."""

    kind: str
    at: int
    first: int = 0
    count: int = 0
    hold: bool = False
    at_dest: bool = False  # ",dest": no PROCEED after round 1; the pause releases the guest

    @classmethod
    def parse(cls, text: str) -> EventSpec:
        if not isinstance(text, str) or len(text) > MAX_SPEC_LEN:
            raise ValueError(f"region event spec must be a short string, not {text!r}")
        m = _SPEC_RE.match(text.strip())
        if m is None:
            raise ValueError(f"bad region event spec {text!r}: expected remove@UNITS:FIRST:COUNT,"
                             f" unmap@UNITS:FIRST:COUNT, remap@UNITS or fork@UNITS")
        kind, at = m.group(1), int(m.group(2))
        has_range = m.group(3) is not None
        hold = m.group(5) is not None
        at_dest = m.group(5) == ",dest"
        if kind in ("remove", "unmap"):
            if not has_range:
                raise ValueError(f"region event {text!r}: {kind} needs :FIRST:COUNT pages")
            first, count = int(m.group(3)), int(m.group(4))
            if first < 1:
                raise ValueError(f"region event {text!r}: page 0 holds the workload's control "
                                 f"block and cannot be {kind}d")
            if count < 1:
                raise ValueError(f"region event {text!r}: COUNT must be at least 1")
            return cls(kind, at, first, count, hold, at_dest)
        if has_range:
            raise ValueError(f"region event {text!r}: {kind} takes no page range")
        return cls(kind, at, hold=hold, at_dest=at_dest)

    def __str__(self) -> str:
        text = f"{self.kind}@{self.at}"
        if self.kind in ("remove", "unmap"):
            text += f":{self.first}:{self.count}"
        return text + (",dest" if self.at_dest else ",hold" if self.hold else "")

    def check_region(self, npages: int) -> None:
        """Raise ValueError if the page range does not fit a region of ``npages`` pages."""
        if self.count and self.first + self.count > npages:
            raise ValueError(f"region event {self}: pages {self.first}..."
                             f"{self.first + self.count - 1} are outside the region of "
                             f"{npages} pages")


def units_done(wl: Any) -> int:
    """Work units (init steps + operations) a workload has done, read through C."""
    info = wl.info()
    return int(info["init_done"]) + int(info["ops_done"])


class EventHook:
    """Performs one ``EventSpec`` on ``region`` when the workload reaches its unit count.

    ``fork_child=True`` (the guest) really forks and lets the child digest its copy through the
    child's own userfaultfd; ``False`` (the reference run) digests the region in place, which is
    what the child sees. ``perform`` returns the workload handle to continue with (a REMAP moves
    the region, so the workload is attached again at the new address). ``hold``: this is the
    source's guest, which honours the spec's ``,hold``."""

    def __init__(self, spec: EventSpec, region: memory.Region, *, fork_child: bool,
                 hold: bool = False, proceed: Any = None) -> None:
        spec.check_region(region.size // region.page_size)
        self.spec = spec
        self.region = region
        self.fork_child = fork_child
        self.hold = hold and spec.hold  # the source's guest waits at UNITS (once)
        self.proceed = proceed  # () -> True once the daemon said PROCEED
        self.done = False
        self.performed = False  # by this process (not before a migration)
        self.child_digest: str | None = None

    def budget(self, wl: Any) -> int:
        """Work units to run before the event (0: run without limit; the event is behind, or
        happened before this process got the region); -1: perform it now."""
        if self.done:
            return 0
        remaining = self.spec.at - units_done(wl)
        if remaining > 0:
            return remaining
        if remaining < 0:
            self.done = True  # the region already went past it (at the source)
            return 0
        return -1

    def perform(self, wl: Any) -> Any:
        """Do the event now; returns the workload handle to continue with."""
        spec, region = self.spec, self.region
        page = region.page_size
        self.done = self.performed = True
        if spec.kind == "remove":
            advice = memory.Advice.REMOVE if region.shared else memory.Advice.DONTNEED
            region.advise(advice, spec.first * page, spec.count * page)
        elif spec.kind == "unmap":
            addr, length = region.address + spec.first * page, spec.count * page
            memory.munmap(addr, length)
            # Fresh zero memory in the hole (not registered with any userfaultfd), so the
            # workload can keep using every page.
            lib = _native.lib
            memory.mmap(length, "rw", lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_FIXED,
                        address=addr)
        elif spec.kind == "remap":
            wl.close()
            size = region.size
            target = memory.mmap(size, "none")  # a free range of the right size
            region._release_views()
            region.address = memory.mremap(region.address, size, size, fixed_address=target)
            wl = workloads.Workload(region.view())
        elif spec.kind == "fork":
            if self.fork_child:
                self.child_digest = _fork_and_digest(region)
            else:
                self.child_digest = wl.digest()
        return wl


def _fork_and_digest(region: memory.Region) -> str:
    """Fork; the child digests its copy of the region (its missing pages arrive through the
    child's userfaultfd, from the daemon) and writes the digest to a pipe, then exits."""
    from migrate import digest
    from migrate._native import ffi

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: digest, report, exit (it never returns into the guest's code)
        code = 1
        try:
            os.close(r)
            import ctypes
            import signal

            ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
            d = digest.region_digest(ffi.buffer(ffi.cast("char *", region.address), region.size))
            os.write(w, d.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 256)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    _pid, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0 or not chunks:
        raise RegionEventError(f"the forked child failed (wait status {status:#x})")
    return b"".join(chunks).decode()


def run_with_hook(wl: Any, hook: EventHook | None, on_event: Any = None) -> Any:
    """Run ``wl`` until it is done or paused, performing the hook's event on the way; returns
    (status, workload handle). ``on_event(hook)`` is called after the event."""
    while True:
        budget = hook.budget(wl) if hook is not None else 0
        if budget < 0 and hook.hold:  # type: ignore[union-attr]
            # Wait (doing no work) for PROCEED or the migration's pause; after a pause the run
            # below returns PAUSED at once, before any operation. Once only: resumed here (an
            # abandoned migration), the event happens here.
            hook.hold = False  # type: ignore[union-attr]
            if _wait_for_pause(hook.proceed):  # type: ignore[union-attr]
                wl = hook.perform(wl)  # type: ignore[union-attr]
                if on_event is not None:
                    on_event(hook)
                _step_past(wl)
                if hook.spec.kind == "remove":  # type: ignore[union-attr]
                    _wait_for_pause(None)  # keep the discarded pages as they are until then
                continue
            budget = 1  # the pause wins over the budget (wl_should_stop checks it first)
        elif budget < 0:
            wl = hook.perform(wl)  # type: ignore[union-attr]
            if on_event is not None:
                on_event(hook)
            _step_past(wl)
            continue
        status = wl.run(budget)
        if status is workloads.RunStatus.BUDGET:
            continue  # the event is due: the next turn performs it
        return status, wl


def _step_past(wl: Any) -> None:
    """One work unit right after the event, even if a pause is pending (it is requested again
    after): a guest paused at exactly the event's count has *not* performed it (that is how the
    destination's guest tells, from the region alone, whether it still has to)."""
    repause = False
    while wl.run(1) is workloads.RunStatus.PAUSED:
        repause = True  # the pending pause was consumed before any work: run again
    if repause:
        _native.lib.wl_request_pause()


def _wait_for_pause(proceed: Any) -> bool:
    """Until a pause is pending (False) or ``proceed()`` says go on (True)."""
    while True:
        paused = _native.lib.wl_pause_pending()
        # PROCEED is sent before the pause signal: once a pause is seen, a PROCEED sent before it
        # is already readable, so it wins deterministically.
        if proceed is not None and proceed():
            return True
        if paused:
            return False
        time.sleep(0.002)


def reference_run(name: str, size: int, seed: int, ops: int,
                  event: str | EventSpec) -> tuple[str, str | None]:
    """(final digest, child's digest for a fork) of a never-migrated run performing ``event``."""
    spec = event if isinstance(event, EventSpec) else EventSpec.parse(event)
    region = memory.Region.anonymous(size)
    try:
        hook = EventHook(spec, region, fork_child=False)
        wl = workloads.Workload.init(region.view(), name, size, seed=seed, ops=ops)
        status, wl = run_with_hook(wl, hook)
        if status is not workloads.RunStatus.DONE:
            raise RuntimeError(f"reference run of {name} with {spec} stopped early: {status.name}")
        result = wl.digest(), hook.child_digest
        wl.close()
        return result
    finally:
        region.close()


# ---------------------------------------------------------------------------------------------
# The source side: a thread that reads the guest's events while it runs there


class SourceEventWatcher:
    """Reads the source guest's userfaultfd events in a thread for as long as the guest may run
    (its madvise/munmap/mremap/fork blocks until the event is read, so nobody may stop reading).

    * REMOVE: the pages changed (zero now) though the dirty scan may not report them written:
      they are named by ``removed_pages`` and sent again (or discarded) at the switchover, when
      the guest is paused and the discard is certainly done.
    * UNMAP, REMAP: the region the migration copies is not the guest's any more: ``failure``
      names the first one; the migration is abandoned and the guest continues here.
    * FORK: the child is not migrated; its userfaultfd is closed at once (which unregisters the
      child's copy of the region: it runs on as an ordinary process)."""

    MAX_SEEN = 64

    def __init__(self, fd: uffd.Userfaultfd, base: int, npages: int, page_size: int,
                 phase: Any = None) -> None:
        import threading

        self.fd = fd
        self._phase = phase  # () -> the migration's phase now, recorded with each event
        self.seen: list[list[str]] = []  # [kind, phase] of the first MAX_SEEN events
        self.map = RegionMap(base, npages, page_size)
        self.counts = {"remove": 0, "unmap": 0, "remap": 0, "fork": 0}
        self.failure: str | None = None
        self.error: BaseException | None = None
        self._removed: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="region-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.fd.wait(0.1):
                    continue
                with self._lock:  # a reader of the results sees every event read so far
                    for ev in self.fd.read_events(64):
                        self._record(ev)
        except (OSError, ValueError) as exc:  # ValueError: the fd was closed under us
            if not self._stop.is_set():
                self.error = exc

    def _record(self, ev: uffd.Event) -> None:
        page = self.map.page
        if not isinstance(ev, uffd.PageFault) and len(self.seen) < self.MAX_SEEN:
            self.seen.append([type(ev).__name__.lower(),
                              self._phase() if self._phase is not None else ""])
        if isinstance(ev, uffd.Remove):
            self.counts["remove"] += 1
            self._removed.update(self.map.remove(ev.start, ev.end))
        elif isinstance(ev, uffd.Unmap):
            self.counts["unmap"] += 1
            pages = self.map.unmap(ev.start, ev.end)
            if self.failure is None:
                self.failure = (f"the guest unmapped {len(pages)} pages of its region "
                                f"({ev.start:#x}-{ev.end:#x}, UFFD_EVENT_UNMAP)")
        elif isinstance(ev, uffd.Remap):
            self.counts["remap"] += 1
            moved = self.map.remap(ev.old, ev.new, ev.length)
            if self.failure is None:
                self.failure = (f"the guest moved {moved} pages of its region with mremap "
                                f"({ev.old:#x} -> {ev.new:#x}, {ev.length // page} pages, "
                                f"UFFD_EVENT_REMAP)")
        elif isinstance(ev, uffd.Fork):
            self.counts["fork"] += 1
            os.close(ev.uffd)  # the child stays here, unregistered
        # A PageFault cannot come (the region is registered for asynchronous WP only).

    def removed_pages(self) -> set[int]:
        """Every page the guest discarded so far (taken under the reader's lock)."""
        with self._lock:
            return set(self._removed)

    def check(self, phase: str) -> None:
        """Raise RegionEventError (abandon the migration) after an UNMAP or REMAP."""
        with self._lock:
            failure, error = self.failure, self.error
        if failure is not None:
            raise RegionEventError(f"{failure} during {phase}: the migration is abandoned, the "
                                   f"guest continues on the source")
        if error is not None:
            raise RegionEventError(f"reading the guest's region events failed: {error}")

    def report(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.counts, seen=[list(x) for x in self.seen])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        # join() returns when the thread's Python state is released; the kernel task exits a
        # moment later. Wait for that too, so the daemon is back to its threads when this returns.
        task = f"/proc/self/task/{self._thread.native_id}"
        deadline = time.monotonic() + 1.0
        while os.path.exists(task) and time.monotonic() < deadline:
            time.sleep(0.0005)
