"""The post-copy fast path: both daemons' hot loops in C (``native/xfer.c``).

During post-copy the destination daemon's work is a loop of: read a fault, send a REQUEST,
install the reply, install pushed pages and acknowledge them; the source's is: answer a REQUEST,
push the next batch, count acknowledgements. In Python each of those steps added tens of
microseconds to a remote fault and made a reply wait behind whole pushed batches (measured:
p50 ~750-870 us against a ~125 us ZeroMQ round trip). Here the loops run in C without the GIL,
on the daemons' own ZeroMQ sockets (the libzmq that pyzmq loaded, reached with ``dlopen``), and
return to Python every tick and for anything they do not handle:

* a message of another type, or one whose header is not in the canonical form msgpack-python
  writes, is handed back as received frames; Python decodes it with the full protocol (which
  raises the exact ProtocolError if it is bad);
* any region event of the guest (REMOVE, UNMAP, REMAP, FORK) or an install interrupted by one
  ends the fast path for the session: Python follows the events (docs/region-events.md);
* completion (every page present) goes back to Python, which sends COMPLETE.

Python never uses a session's sockets while a run is in progress: runs are called from the
session's only thread.
"""

from __future__ import annotations

import os
from array import array
from typing import Any

import zmq

from migrate._native import ffi, lib
from migrate._sys import check, oserror

TICK = lib.MIG_X_TICK
EVENTS = lib.MIG_X_EVENTS
URGENT = lib.MIG_X_URGENT
BULK = lib.MIG_X_BULK
COMPLETE = lib.MIG_X_COMPLETE
PUSHED_ALL = lib.MIG_X_PUSHED_ALL
OUTSIDE = lib.MIG_X_OUTSIDE

PAGE_SIZE = 4096  # the page size the C loops are built for
SAMPLES = 1 << 16  # latency samples a run may record before Python takes them
GATHER_PAGES = 512

_loaded: tuple[bool, str] | None = None

LOOP_PRIORITY = 1  # SCHED_FIFO of a thread running a fast loop (below the urgent I/O thread's)


class realtime:  # noqa: N801 (used as a context manager, like a function)
    """The calling thread at SCHED_FIFO ``LOOP_PRIORITY`` while inside, restored after.

    Why: the loop shares its CPU with the bulk I/O thread and, at the destination, with the guest.
    At normal priority a woken loop waits until the running task's slice ends: measured here,
    fault p99 7-10 ms and scheduling delays up to 9 ms. A FIFO loop runs as soon as a fault or a
    reply arrives, and still sleeps whenever it has nothing to do, so the others get the CPU then
    (and the kernel keeps 5% for them regardless: sched_rt_runtime_us). ``self.applied`` says
    whether it took effect (it needs CAP_SYS_NICE)."""

    def __init__(self) -> None:
        self.applied = False
        self._old: tuple[int, int] | None = None

    def __enter__(self) -> realtime:
        try:
            self._old = (os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(LOOP_PRIORITY))
            self.applied = True
        except PermissionError:
            self.applied = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self.applied and self._old is not None:
            os.sched_setscheduler(0, self._old[0], os.sched_param(self._old[1]))
            self.applied = False


def _libzmq_path() -> str | None:
    """The libzmq shared object pyzmq mapped into this process (bundled or the system's)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
            if "libzmq" in os.path.basename(path) and path.startswith("/"):
                return path
    return None


def available() -> tuple[bool, str]:
    """(usable, why not): the fast path needs the libzmq API from the library pyzmq uses."""
    global _loaded
    if _loaded is None:
        if os.environ.get("MIGRATE_NO_FASTPATH"):
            _loaded = (False, "disabled by MIGRATE_NO_FASTPATH")
            return _loaded
        zmq.zmq_version()  # make sure the backend (and libzmq) is loaded
        path = _libzmq_path()
        if path is None:
            _loaded = (False, "pyzmq has no separate libzmq shared object in this process "
                              "(statically linked?)")
        else:
            ret = lib.mig_zmq_load(path.encode())
            if ret < 0:
                _loaded = (False, ffi.string(lib.mig_zmq_error()).decode(errors="replace"))
            else:
                _loaded = (True, "")
    return _loaded


def _handoff_frames(hand: Any) -> tuple[list[bytes], bool]:
    """The frames of a handed-over message (copied out; the C side then releases them)."""
    kept = min(hand.nframes, lib.MIG_X_MAX_FRAMES)
    frames = [bytes(ffi.buffer(hand.data[i], hand.size[i])) for i in range(kept)]
    frames += [b""] * (hand.nframes - kept)  # counted, so decode reports the real frame count
    interrupted = bool(hand.interrupted)
    lib.mig_x_release(hand)
    return frames, interrupted


class _Samples:
    def __init__(self, slot: Any) -> None:
        self.buf = ffi.new("uint64_t[]", SAMPLES)
        self.slot = slot
        slot.ns, slot.cap, slot.count = self.buf, SAMPLES, 0

    def take(self, recorder: Any) -> None:
        n = self.slot.count
        if n:
            for v in ffi.unpack(self.buf, n):
                recorder.record_ns(v)
            self.slot.count = 0


class Reserve:
    """Memory the destination daemon faults in ahead of time and gives back, 2 MiB at a time,
    just before a migration needs fresh pages (``native/xfer.c``). Where free memory is cold
    (this VM's balloon reports free pages to the host, so the first touch of a page costs a
    host fault), this is what makes installing pages run at memory speed: measured here 0.29
    GB/s for fresh memory against 1.77 GB/s for pages just released from a reserve. The cost is
    the memory, held while no migration runs. ``fill`` runs in a thread (GIL released)."""

    CHUNK = 2 << 20
    MARGIN = 16 << 20  # given back this far ahead of use

    def __init__(self, size: int) -> None:
        size = (size + self.CHUNK - 1) // self.CHUNK * self.CHUNK
        self.size = size
        # Map one chunk more, then unmap the head and tail around a 2 MiB-aligned start, so the
        # reserve is exactly [start, start + size). Pieces are unmapped once each, by the C side:
        # an address range given back may be mapped again by anyone in this process.
        out = ffi.new("uint64_t *")
        check(lib.mig_mmap(0, size + self.CHUNK, lib.PROT_READ | lib.PROT_WRITE,
                           lib.MAP_PRIVATE | lib.MAP_ANONYMOUS, -1, 0, out), "mmap (reserve)")
        mapped = int(out[0])
        start = (mapped + self.CHUNK - 1) // self.CHUNK * self.CHUNK
        if start > mapped:
            check(lib.mig_munmap(mapped, start - mapped), "munmap")
        tail = mapped + size + self.CHUNK - (start + size)
        if tail:
            check(lib.mig_munmap(start + size, tail), "munmap")
        self.st = ffi.new("struct mig_reserve *")
        ret = lib.mig_reserve_init(self.st, ffi.cast("char *", start), size, self.MARGIN)
        if ret < 0:
            check(lib.mig_munmap(start, size), "munmap")
            raise oserror(-ret, "reserve")
        self.error: OSError | None = None

    def fill(self) -> None:
        """Fault the reserve in, 64 MiB per call into C (each releases the GIL)."""
        while self.st.filled < self.size and self.st.freed < self.size:
            ret = lib.mig_reserve_fill(self.st, 64 << 20)
            if ret < 0:
                self.error = oserror(-ret, "madvise(MADV_POPULATE_WRITE) of the reserve")
                return

    def take(self, nbytes: int) -> None:
        lib.mig_reserve_take(self.st, nbytes)

    def claim(self, address: int, nbytes: int) -> int:
        """Move up to ``nbytes`` (whole chunks) of faulted-in reserve to ``address`` (mremap):
        memory that is written at once (staging) then costs no page fault a page. Returns bytes
        moved; 0 when nothing filled is left."""
        moved = lib.mig_reserve_claim(self.st, ffi.cast("char *", address), nbytes)
        if moved < 0:
            raise oserror(-moved, "mremap (claiming reserve memory)")
        return int(moved)

    @property
    def depleted(self) -> bool:
        return bool(self.st.freed)

    def give_back(self) -> None:
        """Release everything still held (a fill in progress stops at its next chunk)."""
        lib.mig_reserve_release_all(self.st)

    def close(self) -> None:
        """Once no fill runs: everything given back (idempotent)."""
        lib.mig_reserve_release_all(self.st)


class DestFastPath:
    """The destination's post-copy loop for one session (its guest's uffd, urgent and bulk)."""

    def __init__(self, *, urgent: zmq.Socket, bulk: zmq.Socket, uffd: int, base: int,
                 page_size: int, npages: int, present: bytearray, hashes: Any,
                 zero_hash: int, around: int, slice_pages: int, local_around: int,
                 next_request: int, present_count: int, reserve: Reserve | None = None
                 ) -> None:
        st = self.st = ffi.new("struct mig_dest_x *")
        self._reserve = reserve  # kept alive while the loop may use it
        st.reserve = reserve.st if reserve is not None else ffi.NULL
        self._keep: list[Any] = []
        st.urgent = ffi.cast("void *", urgent.underlying)
        st.bulk = ffi.cast("void *", bulk.underlying)
        st.uffd, st.base, st.page_size, st.npages = uffd, base, page_size, npages
        st.present = self._buf("uint8_t[]", present)
        st.hashes = self._buf("uint64_t[]", hashes)
        st.zero_hash, st.around, st.slice, st.local_around = zero_hash, around, slice_pages, \
            local_around
        st.gather = self._new("char[]", GATHER_PAGES * page_size)
        st.pend_first = self._new("uint64_t[]", npages)
        st.pend_sent = self._new("uint64_t[]", npages)
        st.pend_req = self._new("uint64_t[]", npages)
        st.pend_fault = self._new("uint8_t[]", npages)
        st.pend_list = self._new("uint32_t[]", npages)
        st.pend_pos = self._new("uint32_t[]", npages)
        st.next_request, st.present_count = next_request, present_count
        self.fault_lat = _Samples(st.fault_lat)
        self.request_lat = _Samples(st.request_lat)
        self.install_lat = _Samples(st.install_lat)
        self._staging: Any = None

    def _buf(self, ctype: str, obj: Any) -> Any:
        ptr = ffi.from_buffer(ctype, obj, require_writable=True)
        self._keep.append(ptr)
        return ptr

    def _new(self, ctype: str, n: int) -> Any:
        ptr = ffi.new(ctype, n)
        self._keep.append(ptr)
        return ptr

    def set_staging(self, staging: Any, ready: bool) -> None:
        """Staged pages (hybrid) the loop may install on a fault, once their freshness is known;
        None once the staging is released."""
        st = self.st
        if staging is not self._staging:
            self._staging = staging
            if staging is None:
                st.staging, st.stage_state = ffi.NULL, ffi.NULL
            else:
                st.staging = ffi.cast("char *", staging.region.address)
                st.stage_state = staging._state_ptr
        st.stage_ready = int(ready and staging is not None)

    def run(self, timeout_ms: int) -> int:
        """One run (GIL released) until something needs Python or ``timeout_ms`` pass; the
        MIG_X_* flags of what happened."""
        ret = lib.mig_dest_x_run(self.st, timeout_ms)
        if ret < 0:
            raise oserror(-ret, "post-copy fast path")
        return ret

    def take_urgent(self) -> tuple[list[bytes], bool]:
        return _handoff_frames(self.st.hand + 0)

    def take_bulk(self) -> tuple[list[bytes], bool]:
        return _handoff_frames(self.st.hand + 1)

    def take_events(self) -> list[Any]:
        """The region events the run read from the uffd (after its faults), decoded, in order."""
        from migrate import uffd

        st = self.st
        events = [uffd._decode(st.events[i]) for i in range(st.nevents)]
        st.nevents = 0
        return events

    def take_samples(self, fault: Any, request: Any, install: Any) -> None:
        self.fault_lat.take(fault)
        self.request_lat.take(request)
        self.install_lat.take(install)

    def ask(self, index: int, *, fault: bool) -> None:
        ret = lib.mig_dest_x_ask(self.st, index, int(fault))
        if ret < 0:
            raise oserror(-ret, "REQUEST")

    def retry(self, now_ns: int, retry_ns: int) -> int:
        ret = lib.mig_dest_x_retry(self.st, now_ns, retry_ns)
        if ret < 0:
            raise oserror(-ret, "REQUEST")
        return int(ret)

    def resolve(self, first: int, end: int) -> None:
        lib.mig_dest_x_resolve(self.st, first, end)

    def stage_next(self, first: int, max_pages: int) -> tuple[int, int, int]:
        """Staged pages from ``first`` into the guest (GIL released), about ``max_pages``, with
        faults and replies served between slices: (MIG_X_* flags as from run, index reached,
        pages that became present)."""
        reached, newly = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        ret = lib.mig_dest_x_stage_next(self.st, first, max_pages, reached, newly)
        if ret < 0:
            raise oserror(-ret, "installing staged pages (fast path)")
        return ret, int(reached[0]), int(newly[0])

    def adopt_pending(self, pending: dict[int, tuple[int, int, int, bool]]) -> None:
        """Requests the Python loop had in flight when the fast path took over."""
        st = self.st
        for p, (req, first_ns, sent_ns, fault) in pending.items():
            if st.pend_first[p]:
                continue
            st.pend_first[p], st.pend_sent[p], st.pend_req[p] = first_ns, sent_ns, req
            st.pend_fault[p] = int(fault)
            st.pend_pos[p] = st.pend_n
            st.pend_list[st.pend_n] = p
            st.pend_n += 1

    def is_pending(self, index: int) -> bool:
        return bool(self.st.pend_first[index])

    def pending(self) -> dict[int, tuple[int, int, int, bool]]:
        """The requests in flight, as DestSession.pending holds them."""
        st = self.st
        out = {}
        for k in range(st.pend_n):
            p = st.pend_list[k]
            out[p] = (st.pend_req[p], st.pend_first[p], st.pend_sent[p], bool(st.pend_fault[p]))
        return out


class SourceFastPath:
    """The source's C side: batches read from the paused or running guest straight into ZeroMQ
    messages (``send_batch``, pre-copy too), and the post-copy loop (``run``): requests answered
    first, the rest pushed, acknowledgements counted."""

    def __init__(self, *, urgent: zmq.Socket, bulk: zmq.Socket, pid: int, base: int,
                 page_size: int, npages: int, valid: bytearray) -> None:
        if page_size != PAGE_SIZE:
            raise ValueError(f"the fast path serves {PAGE_SIZE}-byte pages, not {page_size}")
        st = self.st = ffi.new("struct mig_src_x *")
        self._keep: list[Any] = []
        st.urgent = ffi.cast("void *", urgent.underlying)
        st.bulk = ffi.cast("void *", bulk.underlying)
        st.pid, st.base, st.page_size, st.npages = pid, base, page_size, npages
        self._valid = ffi.from_buffer("uint8_t[]", valid, require_writable=True)
        st.valid = self._valid
        self.valid = valid
        batch = lib.MIG_X_BATCH_MAX
        for name, ctype in (("addrs", "uint64_t[]"), ("idx", "uint32_t[]"), ("zero", "uint8_t[]")):
            ptr = ffi.new(ctype, batch)
            self._keep.append(ptr)
            setattr(st, name, ptr)
        self._zeros = ffi.new("uint32_t *")
        self.service_lat = _Samples(st.service_lat)

    def send_batch(self, seq: int, *, bulk: bool, kind: int, indexes: Any, request: int = 0,
                   round: int = 0) -> tuple[int, int]:
        """Read ``indexes`` (a range, or sorted page indexes) of the guest and send them as the
        PAGES message number ``seq + 1``. Returns (bytes sent, 0 if the message was dropped;
        zero pages among them); the pages are marked valid."""
        st = self.st
        n = len(indexes)
        if not 0 < n <= lib.MIG_X_BATCH_MAX:
            raise ValueError(f"a batch has 1..{lib.MIG_X_BATCH_MAX} pages, not {n}")
        contiguous = isinstance(indexes, range) and indexes.step == 1
        packed = indexes if isinstance(indexes, array) and indexes.typecode == "I" \
            else array("I", indexes)
        ffi.memmove(st.idx, packed, 4 * n)
        st.seq = seq
        ret = lib.mig_src_x_send_batch(st, int(bulk), kind, request, round, n, int(contiguous),
                                       self._zeros)
        if ret < 0:
            raise self._error(-ret, "sending pages")
        return int(ret), int(self._zeros[0])

    def _error(self, err: int, what: str) -> OSError:
        st = self.st
        if st.read_error:
            st.read_error = 0
            return oserror(err, f"process_vm_readv of the guest's page {st.read_index}")
        return oserror(err, what)

    def begin_postcopy(self, *, seq: int, acked: int, unacked: Any, push: bool,
                       push_batch: int, window: int, max_around: int) -> None:
        if not 0 < push_batch <= lib.MIG_X_BATCH_MAX or not 0 < window <= 64:
            raise ValueError("push batch must be 1..512 pages and the window 1..64 messages")
        if len(unacked) > window:
            raise ValueError("more unacknowledged messages than the window")
        st = self.st
        st.valid_count = st.npages - self.valid.count(0)
        st.seq, st.acked = seq, acked
        for i, s in enumerate(unacked):
            st.unacked[i] = s
        st.unacked_head, st.unacked_n = 0, len(unacked)
        st.push, st.push_batch, st.window, st.max_around = int(push), push_batch, window, \
            max_around

    def run(self, timeout_ms: int) -> int:
        ret = lib.mig_src_x_run(self.st, timeout_ms)
        if ret < 0:
            raise self._error(-ret, "post-copy fast path")
        return ret

    def take_urgent(self) -> tuple[list[bytes], bool]:
        return _handoff_frames(self.st.hand + 0)

    def take_bulk(self) -> tuple[list[bytes], bool]:
        return _handoff_frames(self.st.hand + 1)

    def ack(self, seq: int) -> None:
        """An acknowledgement Python decoded: every bulk message up to ``seq`` is installed."""
        st = self.st
        st.acked = max(st.acked, seq)
        while st.unacked_n and st.unacked[st.unacked_head] <= st.acked:
            st.unacked_head = (st.unacked_head + 1) % 64
            st.unacked_n -= 1

    def unacked(self) -> list[int]:
        st = self.st
        return [st.unacked[(st.unacked_head + i) % 64] for i in range(st.unacked_n)]
