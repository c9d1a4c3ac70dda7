"""The source daemon: runs a guest, then migrates it live to a destination daemon.

Phases (see ARCHITECTURE.md):

* **pre-copy** (modes precopy and hybrid): write-protect the whole region asynchronously
  (UFFD_FEATURE_WP_ASYNC), send every page on the bulk channel (pages that are not present are
  zero and travel as a flag), then round after round ask PAGEMAP_SCAN for the pages written since
  the last round (re-protecting them in the same walk) and send those, until the dirty set stops
  shrinking, is small enough, or the round budget is spent. A window of unacknowledged bulk
  messages bounds what is in flight.
* **switchover**: pause the guest at an operation boundary (it stops itself with SIGSTOP);
  precopy mode sends the final dirty set now (while paused); SWITCHOVER; the destination starts
  its guest and answers RESUMED. Hybrid mode then takes the final dirty set (after the resume, so
  the scan is not downtime) and names those pages in STALE: the destination, which holds every
  pre-copied page aside instead of installing it, never installs those and fetches them instead.
* **post-copy**: answer fault REQUESTs on the urgent channel first (the faulting page and its unsent
  neighbours), and push every page the destination lacks on the bulk channel, starting from the
  most recent fault and moving outward.
* **verify**: the destination reports the digest of the pages it received; the source compares it
  with its own digest of the paused region, then waits for the destination's final report (the
  guest's digest after finishing its workload against a reference run). Only then is the source's
  copy released.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
from array import array
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import zmq

from migrate import digest, fastpath, memory, protocol, regionevents, transport, uffd, workloads
from migrate.errors import InternalError, MigrateError, MigrationError, ProtocolError
from migrate.guest import STILL_MESSAGES, GuestError, GuestHandle
from migrate.protocol import Batch, MsgType
from migrate.snapshot import Snapshot, SnapshotError, SnapshotWriter
from migrate.stats import LatencyRecorder, Stopwatch

PRECOPY_BATCH_PAGES = 256  # 1 MiB of 4 KiB pages per bulk message
PUSH_BATCH_PAGES = 128  # 512 KiB: big enough to stay ahead of the guest, small enough to interleave
WINDOW = 16  # unacknowledged bulk messages in flight
MAX_ROUNDS = 8  # pre-copy mode: rounds until the dirty set stops shrinking, at most this many
# hybrid: one full pass, then switch. A second round re-sends pages the guest keeps writing and
# post-copy fetches what is left anyway: kv 1 GiB, 3 runs each, total 3.25 s (1 round) against
# 4.0 s (2 rounds), same downtime.
HYBRID_ROUNDS = 1
SMALL_DIRTY_PAGES = 64  # a dirty set this small ends the pre-copy rounds


@dataclass
class SourceOptions:
    to: str
    workload: str = "kv"
    memory: int = 512 << 20
    seed: int = 0
    ops: int = 0  # 0: the workload's default for the size
    mode: str = "hybrid"
    after_s: float = 1.0
    backing: str = "anon"
    max_rounds: int | None = None  # None: MAX_ROUNDS for precopy, HYBRID_ROUNDS for hybrid
    cpu: int | None = None
    keys: transport.CurveKeys | None = None
    peer_timeout_s: float = 10.0
    progress: bool = True
    push: bool = True  # background push in post-copy (off: pure demand paging, for diagnosis)
    throttle: bool = False  # pre-copy: the guest runs at SCHED_IDLE (cf. QEMU auto-converge)
    on_failure: str = "resume"  # "resume": a guest the destination never ran finishes here
    snapshot_dir: str | None = None  # write the paused region here once the destination runs it
    resume_dir: str | None = None  # take over a session from this snapshot (a restarted source)
    local_finish_timeout_s: float = 600.0
    event: str | None = None  # test hook: a region event the guest performs (regionevents.py)
    fast_path: bool = True  # post-copy loop in C (fastpath.py) when libzmq can be reached


class Progress:
    """Progress on a terminal (one rewritten line), plain log lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.last = 0.0

    def due(self) -> bool:
        """Whether an update now would be shown (so hot loops build the text only then)."""
        return self.enabled and time.monotonic() - self.last >= (0.1 if self.tty else 1.0)

    def update(self, phase: str, text: str, *, force: bool = False) -> None:
        if not self.enabled or not (force or self.due()):
            return
        self.last = time.monotonic()
        if self.tty:
            sys.stderr.write(f"\r\033[K[source] {phase:<10} {text}")
        else:
            sys.stderr.write(f"[source] {phase}: {text}\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class SourceMigration:
    def __init__(self, opts: SourceOptions) -> None:
        if opts.mode not in protocol.MODES:
            raise ValueError(f"mode must be one of {protocol.MODES}, not {opts.mode!r}")
        self.opts = opts
        self.progress = Progress(opts.progress)
        self.phase = "start"
        self.guest: GuestHandle | None = None
        self.fd: uffd.Userfaultfd | None = None
        self.ctx: zmq.Context | None = None
        self.sockets: list[zmq.Socket] = []
        self.conn = protocol.Connection(protocol.Side.SOURCE)
        self.seq = 0  # of every PAGES message (both channels)
        self.acked = 0
        # Bulk PAGES messages not yet acknowledged (the window). Counting seq - acked instead
        # let fault replies (urgent, never acknowledged) fill the window and stop the push.
        self.unacked: collections.deque[int] = collections.deque()
        self.last_sent = time.monotonic()
        self.paused = False  # the guest is stopped here for the switchover
        self.snapshot: Snapshot | None = None  # serving from disk (a restarted source)
        self.snapshot_writer: SnapshotWriter | None = None
        self.snapshot_announced = False
        self.dest_running = False  # the destination said RESUMED: its copy is the guest now
        self.bytes_sent = 0
        self.counts = {"precopy": 0, "final": 0, "pushed": 0, "demand": 0, "zero": 0}
        self.rounds: list[dict[str, Any]] = []
        self.requests = 0
        self.dest_report: dict[str, Any] | None = None
        # "finished" (its workload is done: still) or "done" (with its digest) before the pause
        self.guest_finished: dict[str, Any] | None = None
        self.mismatched: list[int] = []
        # Byte map: pages written since the last pre-copy round sent them (None: no round yet)
        self.pending_dirty: bytearray | None = None
        self.bulk_gbps: float | None = None  # pre-copy round 1 into the destination, GB/s
        self.postcopy_gbps: float | None = None  # sent from the resume to COMPLETE, GB/s
        self.resumed_at = (time.monotonic_ns(), 0)  # (ns, bytes sent) when the guest resumed
        self.service = LatencyRecorder()  # REQUEST received -> faulting page sent
        self.throttled = False  # the guest runs at SCHED_IDLE (pre-copy with opts.throttle)
        self.bulk_io_fifo = False  # the bulk I/O thread runs at SCHED_FIFO (pre-copy)
        self.bulk_io_fifo_used = False  # ... it did, for the report
        self.postcopy_send_buffer: int | None = None  # bulk SO_SNDBUF in post-copy, if set
        self.precopy_sender_fifo = False  # the pre-copy sender (this thread) ran at SCHED_FIFO
        self.ops_at_start = 0  # guest operations done when the migration started
        self.region_events: regionevents.SourceEventWatcher | None = None
        self.fast: fastpath.SourceFastPath | None = None  # the C side, when it can be used
        self.fast_off: str | None = None  # why not
        self.fast_path = False  # post-copy ran in the C loop (fastpath.py)
        self.fast_wakeups = 0
        self.fast_realtime = False  # ... at SCHED_FIFO (fastpath.realtime)
        self.push_batch_us: float | None = None  # mean time reading and sending one batch

    # -- helpers ----------------------------------------------------------------------------

    def _send(self, sock: zmq.Socket, msg: protocol.Message) -> None:
        frames = self.conn.send(msg)
        transport.send_frames(sock, frames)
        self.last_sent = time.monotonic()
        if isinstance(msg, protocol.Pages):
            self.bytes_sent += len(msg.data)
        self.bytes_sent += len(frames[0])

    def _recv(self, sock: zmq.Socket, timeout_s: float | None = None) -> protocol.Message:
        """The next message on ``sock`` that is not a PING; a PING restarts the deadline."""
        timeout = self.opts.peer_timeout_s if timeout_s is None else timeout_s
        while True:
            if not sock.poll(int(timeout * 1000)):
                raise MigrationError(self.phase,
                                     f"no answer from the destination in {timeout:.0f} s")
            msg = self.conn.receive(transport.recv_frames(sock))
            if msg.TYPE != MsgType.PING:
                return msg

    def _read_pages(self, indexes: array | list[int] | range) -> tuple[bytes | bytearray,
                                                                bytes | bytearray]:
        """(zero flags, data of the non-zero pages) for ``indexes`` of the guest's region."""
        page = self.page
        n = len(indexes)
        buf = bytearray(n * page)
        if isinstance(indexes, range) and indexes.step == 1:
            got = self._read_range(indexes.start, n, buf)
        else:
            got = self._read_list(list(indexes), buf)
        if got != n * page:
            raise MigrationError(self.phase, f"read {got} of {n * page} bytes of the guest's "
                                 f"pages starting at index {indexes[0]}")
        zero = digest.zero_map(buf, page)
        if zero.count(1) == 0:
            return zero, buf
        if zero.count(0) == 0:
            return zero, b""
        view = memoryview(buf)
        data = b"".join(view[i * page:(i + 1) * page] for i in range(n) if not zero[i])
        return zero, data

    def _rate(self, pages: int) -> float:
        """Pages per second since the migration started (for progress lines)."""
        clock = getattr(self, "migration_clock", None)
        elapsed = clock.elapsed_s() if clock is not None else 0.0
        return pages / elapsed if elapsed > 0 else 0.0

    def _read_range(self, first: int, count: int, buf: bytearray) -> int:
        """Pages first..first+count of the region into ``buf``: from the (paused) guest, or from
        the snapshot when this source was restarted from one. Returns bytes read."""
        if self.snapshot is not None:
            return self.snapshot.read_range(first, count, buf)
        assert self.guest is not None
        page = self.page
        return len(memory.read_process(self.guest.pid, self.base + first * page, count * page,
                                       into=buf))

    def _read_list(self, indexes: list[int], buf: bytearray) -> int:
        if self.snapshot is not None:
            return self.snapshot.read_list(indexes, buf)
        assert self.guest is not None
        page, base = self.page, self.base
        return memory.read_process_pages(self.guest.pid, [base + i * page for i in indexes],
                                         page, buf)

    def _send_pages(self, sock: zmq.Socket, kind: Batch, indexes: array | list[int] | range, *,
                    request: int = 0, round: int = 0, known_zero: bool = False) -> None:
        if self.fast is not None and not known_zero:
            # Read straight into the ZeroMQ message, in C (no page copy, no allocation here).
            sent, zeros = self.fast.send_batch(self.seq, bulk=sock is self.bulk, kind=int(kind),
                                               indexes=indexes, request=request, round=round)
            self.seq += 1
            if sock is self.bulk and sent:
                self.unacked.append(self.seq)
            self.last_sent = time.monotonic()
            self.bytes_sent += sent
            self.counts["zero"] += zeros
            return
        zero: bytes | bytearray
        data: bytes | bytearray
        if known_zero:
            zero, data = bytes([1]) * len(indexes), b""
        else:
            zero, data = self._read_pages(indexes)
        self.seq += 1
        packed = array("I", indexes).tobytes()
        frames = self.conn.send_fast(MsgType.PAGES, self.seq, int(kind), request, round, packed,
                                     bytes(zero), data=data)
        transport.send_frames(sock, frames)
        if sock is self.bulk:
            self.unacked.append(self.seq)
        self.last_sent = time.monotonic()
        self.bytes_sent += len(data) + len(frames[0])
        self.counts["zero"] += zero.count(1)
        for i in indexes:
            self.valid[i] = 1

    def _wait_window(self, limit: int) -> None:
        """Block until at most ``limit`` bulk messages are unacknowledged."""
        while len(self.unacked) > limit:
            self._handle_bulk(self._recv(self.bulk))

    def _handle_bulk(self, msg: protocol.Message) -> None:
        if isinstance(msg, protocol.Error):  # said on both channels: heard while waiting here
            raise MigrationError(msg.phase, f"the destination reported: {msg.message}")
        if msg.TYPE == MsgType.ACK:
            assert isinstance(msg, protocol.Ack)
            self.acked = max(self.acked, msg.seq)
            unacked = self.unacked
            while unacked and unacked[0] <= self.acked:
                unacked.popleft()
        else:
            raise ProtocolError(f"unexpected {msg.TYPE.name} on the bulk channel")

    # -- phases -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        if self.opts.resume_dir:
            return self._run_resumed()
        try:
            self._start_guest()
            self._connect()
            self.migration_clock = Stopwatch()
            self.ops_at_start = self.guest.progress_ops if self.guest else 0  # last report
            if self.opts.mode != "postcopy":
                self.phase = "precopy"
                # The sender at SCHED_FIFO like its bulk I/O thread (set_bulk_io_realtime): the
                # guest runs whenever both wait (for the window), never instead of a send.
                with fastpath.realtime() as sender:
                    self.precopy_sender_fifo = sender.applied
                    self._precopy()
            self.phase = "switchover"
            self._switchover()
            self.phase = "postcopy"
            self._postcopy()
            self.phase = "verify"
            return self._verify()
        except Exception as exc:
            cause: BaseException = exc
            if not isinstance(exc, (MigrateError, OSError, zmq.ZMQError)):
                traceback.print_exc()  # a bug: reported as one, the guest recovered all the same
                cause = InternalError(exc)
            elif self.region_events is not None and not self.dest_running:
                # An UNMAP/REMAP makes later steps fail obscurely (a scan or read of pages that
                # moved): name the event instead.
                try:
                    self.region_events.check(self.phase)
                except regionevents.RegionEventError as event_exc:
                    cause = event_exc
            report = self._failed(cause)
            report["guest_at_source"] = self._recover_at_source()
            return report
        finally:
            self.progress.done()
            self._cleanup()

    def _run_resumed(self) -> dict[str, Any]:
        """Take over a post-copy session from a snapshot left by a source that died."""
        try:
            self.phase = "resume"
            assert self.opts.resume_dir is not None
            snap = self.snapshot = Snapshot(self.opts.resume_dir)
            st = snap.state
            o = self.opts
            o.workload, o.mode, o.backing = st["workload"]["name"], st["mode"], st["backing"]
            o.seed, o.memory = st["workload"]["seed"], st["workload"]["size"]
            self.total_ops = st["workload"]["ops"]
            self.paused_ops = st.get("ops_at_switchover", 0)
            self.page, self.npages, self.base = snap.page_size, snap.npages, 0
            self.session = bytes.fromhex(st["session"])
            self.ctx = transport.make_context(o.cpu)
            self.urgent = transport.connect(self.ctx, st["urgent"], o.keys, channel="urgent")
            self.bulk = transport.connect(self.ctx, st["bulk"], o.keys, channel="bulk")
            self.endpoints = (st["urgent"], st["bulk"])
            self.sockets += [self.urgent, self.bulk]
            self.conn = protocol.Connection.resumed(
                protocol.Side.SOURCE, protocol.Limits(npages=self.npages, page_size=self.page))
            self._send(self.urgent, protocol.Resume(self.session))
            ack = self._recv(self.urgent)
            while not isinstance(ack, protocol.ResumeAck):
                if isinstance(ack, protocol.Error):
                    raise MigrationError(ack.phase, f"the destination reported: {ack.message}")
                ack = self._recv(self.urgent)  # requests sent before our RESUME: asked again later
            self.valid = bytearray(ack.present())
            self.dest_running = True
            self.downtime_ns = self.resume_ns = self.pause_at_ns = 0
            self.discarded = 0
            self.migration_clock = Stopwatch()
            self.phase = "postcopy"
            self._postcopy()
            self.phase = "verify"
            report = self._verify()
            report["resumed_from_snapshot"] = str(self.opts.resume_dir)
            return report
        except (MigrateError, OSError, zmq.ZMQError, SnapshotError) as exc:
            return self._failed(exc)
        finally:
            self.progress.done()
            self._cleanup()

    def _start_guest(self) -> None:
        o = self.opts
        if o.cpu is not None:
            os.sched_setaffinity(0, {o.cpu})
        if o.event:
            try:
                regionevents.EventSpec.parse(o.event).check_region(o.memory // memory.PAGE_SIZE)
            except ValueError as exc:
                raise regionevents.RegionEventError(f"the guest's event: {exc}") from None
        self.guest = GuestHandle("source", o.memory, backing=o.backing, workload=o.workload,
                                 seed=o.seed, ops=o.ops, event=o.event)
        layout = self.guest.layout
        self.fd = uffd.Userfaultfd.adopt(self.guest.uffd_fd, uffd.Feature(layout.features))
        self.guest.uffd_fd = -1
        self.base, self.page, self.npages = layout.address, layout.page_size, layout.npages
        # Read the guest's region events from now on: its madvise/munmap/mremap/fork waits
        # for us (docs/region-events.md).
        self.region_events = regionevents.SourceEventWatcher(
            self.fd, self.base, self.npages, self.page, phase=lambda: self.phase)
        self.total_ops = layout.total_ops
        self.valid = bytearray(self.npages)  # 1: the destination holds this page's current bytes
        self.scanner = memory.PagemapScanner(self.guest.pid)
        self.guest.start()
        deadline = time.monotonic() + o.after_s
        while time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            for msg in self.guest.poll_messages():
                if msg["type"] in STILL_MESSAGES:
                    self.guest_finished = msg
                    self.progress.update("running", "the workload finished before migration")
            if self.guest.progress_ops == 0 and self.guest.progress_init:
                self.progress.update("running", f"guest initialising its workload "
                                     f"({self.guest.progress_init:,} steps)")
            else:
                self.progress.update("running", f"guest ops {self.guest.progress_ops:,} of "
                                     f"{self.total_ops:,}")
        if not self.guest.alive():
            raise GuestError("the guest died before migration")

    def _connect(self) -> None:
        o = self.opts
        self.phase = "handshake"
        self.ctx = transport.make_context(o.cpu)
        control = transport.connect(self.ctx, o.to, o.keys, handshake_timeout=o.peer_timeout_s)
        self.sockets.append(control)
        size = self.npages * self.page
        self.session = transport.session_id()
        workload: dict[str, Any] = {"name": o.workload, "size": size, "seed": o.seed,
                                    "ops": self.total_ops}
        if o.event:
            workload["event"] = o.event
        hello = protocol.Hello(
            protocol.PROTOCOL_VERSION, self.session, self.page, self.npages,
            o.backing, o.mode, workload,
            ["fault-around", "zero-flag", "discard"], digest.DIGEST_ALGORITHM)
        self._send(control, hello)
        reply = self._recv(control)
        if isinstance(reply, protocol.Refuse):
            raise MigrationError("handshake", f"the destination refused: {reply.reason}")
        assert isinstance(reply, protocol.Welcome)
        self.urgent = transport.connect(self.ctx, reply.urgent_endpoint, o.keys,
                                        channel="urgent")
        self.bulk = transport.connect(self.ctx, reply.bulk_endpoint, o.keys, channel="bulk")
        self.endpoints = (reply.urgent_endpoint, reply.bulk_endpoint)
        self.sockets += [self.urgent, self.bulk]
        self._start_fast()

    def _start_fast(self) -> None:
        """The C side (fastpath.py) for reading and sending pages, when it can reach libzmq."""
        assert self.guest is not None
        if not self.opts.fast_path:
            self.fast_off = "disabled (--no-fast-path)"
            return
        usable, why = fastpath.available()
        if not usable or self.page != fastpath.PAGE_SIZE:
            self.fast_off = why or f"{self.page}-byte pages"
            print(f"[source] fast path unavailable ({self.fast_off}); pages are read and sent "
                  f"from Python", file=sys.stderr, flush=True)
            return
        self.fast = fastpath.SourceFastPath(
            urgent=self.urgent, bulk=self.bulk, pid=self.guest.pid, base=self.base,
            page_size=self.page, npages=self.npages, valid=self.valid)

    def _throttle_guest(self, on: bool) -> None:
        """Throttling during pre-copy: every thread of the guest at SCHED_IDLE, so it runs only
        on CPU time the daemon leaves (it dirties fewer pages and never delays a send); off
        again (SCHED_OTHER) at the pause or when the guest is resumed here."""
        assert self.guest is not None
        if not self.guest.set_idle(on):
            return  # the guest is gone; whoever waits on it reports that
        self.throttled = on

    def _lower_bulk_io(self) -> None:
        """The bulk I/O thread back to normal priority (see transport.set_bulk_io_realtime)."""
        if self.bulk_io_fifo and self.ctx is not None:
            transport.set_bulk_io_realtime(self.ctx, False)
            self.bulk_io_fifo = False

    def _precopy(self) -> None:
        assert self.fd is not None
        if self.opts.throttle:
            self._throttle_guest(True)
        assert self.ctx is not None
        self.bulk_io_fifo = self.bulk_io_fifo_used = transport.set_bulk_io_realtime(self.ctx, True)
        start, end, page = self.base, self.base + self.npages * self.page, self.page
        # Protect everything, then send everything: a write after the protect shows up as
        # PAGE_IS_WRITTEN in the next scan, so nothing written during the round is missed.
        self.fd.writeprotect(start, end - start, True)
        present = self.scanner.scan(start, end, require=memory.PageCategory.PRESENT,
                                    return_mask=memory.PageCategory.PRESENT)
        is_present = bytearray(self.npages)
        for s, e, _c in present:
            is_present[(s - start) // page:(e - start) // page] = b"\x01" * ((e - s) // page)
        round_no = 1
        t_round = time.perf_counter()
        bytes_before = self.bytes_sent
        sent = self._send_all(is_present, round_no)
        self._wait_window(0)  # round 1 measures transfer into the destination's region
        self.bulk_gbps = round((self.bytes_sent - bytes_before) / (time.perf_counter() - t_round)
                               / 1e9, 3)
        dirty = self._scan_dirty(reprotect=True)
        ndirty = dirty.count(1)
        self._round_end(round_no, sent, ndirty)
        self._check_region_events()
        spec = regionevents.EventSpec.parse(self.opts.event) if self.opts.event else None
        if spec is not None and spec.hold and not spec.at_dest:
            self._proceed_with_event()
            self._check_region_events()
        previous = None
        budget = self.opts.max_rounds or (HYBRID_ROUNDS if self.opts.mode == "hybrid"
                                          else MAX_ROUNDS)
        while round_no < budget:
            if ndirty <= SMALL_DIRTY_PAGES or (previous is not None and ndirty >= previous):
                break
            round_no += 1
            previous = ndirty
            memory.bytes_clear(self.valid, dirty)
            sent = self._send_indexes(memory.byte_indexes(dirty), Batch.PRECOPY, round_no)
            dirty = self._scan_dirty(reprotect=True)
            ndirty = dirty.count(1)
            self._round_end(round_no, sent, ndirty)
            self._check_region_events()
        # Pages written since the last scan have not been sent again: the switchover must send
        # or discard them together with whatever the final scan finds.
        self.pending_dirty = dirty
        memory.bytes_clear(self.valid, dirty)
        self._wait_window(0)  # everything sent so far is installed before the pause

    def _send_all(self, is_present: bytearray, round_no: int) -> int:
        n, batch = self.npages, PRECOPY_BATCH_PAGES
        for first in range(0, n, batch):
            last = min(n, first + batch)
            self._wait_window(WINDOW)
            self._check_region_events()
            known_zero = is_present.find(1, first, last) < 0
            self._send_pages(self.bulk, Batch.PRECOPY, range(first, last), round=round_no,
                             known_zero=known_zero)
            self.counts["precopy"] += last - first
            if self.progress.due():
                self.progress.update("precopy", f"round {round_no}: {last:,}/{n:,} pages, "
                                     f"{self.bytes_sent / 1e6:,.0f} MB sent, "
                                     f"{self._rate(self.counts['precopy']):,.0f} pages/s")
        return n

    def _send_indexes(self, indexes: array, kind: Batch, round_no: int) -> int:
        batch = PRECOPY_BATCH_PAGES
        for k in range(0, len(indexes), batch):
            self._wait_window(WINDOW)
            chunk = indexes[k:k + batch]
            self._send_pages(self.bulk, kind, chunk, round=round_no)
            self.counts["precopy" if kind == Batch.PRECOPY else "final"] += len(chunk)
        return len(indexes)

    def _scan_dirty(self, *, reprotect: bool) -> bytearray:
        """Byte map of the pages written since the last reprotecting scan (marked in C: a
        1 GiB kv guest leaves 60,000 runs, which took 60-160 ms to walk in Python)."""
        start, end = self.base, self.base + self.npages * self.page
        dirty = bytearray(self.npages)
        self.scanner.mark(start, end, dirty, require=memory.PageCategory.WRITTEN,
                          wp_matching=reprotect, check_wpasync=True)
        return dirty

    def _stale_map(self) -> bytearray:
        """Byte map of the pages the last round left unsent (written after it sent them) and
        those the guest discarded (REMOVE changed them though the dirty scan may not say so)."""
        stale = bytearray(self.npages) if self.pending_dirty is None \
            else bytearray(self.pending_dirty)
        for i in self._removed_pages():
            stale[i] = 1
        return stale

    def _round_end(self, round_no: int, sent: int, dirty: int) -> None:
        self.rounds.append({"round": round_no, "pages": sent, "dirty": dirty,
                            "end_s": round(self.migration_clock.elapsed_s(), 4)})
        self._send(self.bulk, protocol.RoundEnd(round_no, self.seq, sent, dirty))

    def _switchover(self) -> None:
        assert self.guest is not None
        t_pause = time.monotonic_ns()
        self.pause_at_ns = t_pause - self.migration_clock.start_ns
        if self.guest_finished is None:
            for msg in self.guest.poll_messages():
                if msg["type"] in STILL_MESSAGES:
                    self.guest_finished = msg
        # A guest that already finished its workload is as still as a paused one.
        # The region is still from PAUSED on; the guest's own SIGSTOP is awaited after SWITCHOVER.
        if self.throttled:  # first: a guest at SCHED_IDLE would answer the pause late
            self._throttle_guest(False)
        paused = self.guest_finished or self.guest.pause(wait_stopped=False)
        self._lower_bulk_io()
        self.paused_ops = paused.get("ops", 0)
        self._check_region_events()  # an UNMAP/REMAP just before the pause: stay here
        if self.opts.mode == "precopy":
            # Pre-copy: the pages written since the last round go now, while the guest is paused
            # (with those it discarded: REMOVE changed them though the dirty scan may not say so).
            final = self._stale_map()
            memory.bytes_set(final, self._scan_dirty(reprotect=False))
            memory.bytes_clear(self.valid, final)
            self._send_indexes(memory.byte_indexes(final), Batch.FINAL, len(self.rounds) + 1)
            self._wait_window(0)
        self.paused = True
        # Hybrid: which pre-copied pages are stale is found after the guest resumes there (the
        # destination installs none of them until it knows; until then it asks for each page).
        switchover = protocol.Switchover(self.seq, b"", self.paused_ops,
                                         time.monotonic_ns() - t_pause)
        self._send(self.urgent, switchover)
        self.guest.wait_stopped()
        reply = self._recv(self.urgent)
        if isinstance(reply, protocol.Error):
            raise MigrationError(reply.phase, f"the destination reported: {reply.message}")
        assert isinstance(reply, protocol.Resumed)
        self.dest_running = True
        self.resumed_at = (time.monotonic_ns(), self.bytes_sent)
        self.downtime_ns = time.monotonic_ns() - t_pause
        self.resume_ns = reply.resume_ns
        self.discarded = 0
        if self.opts.mode == "hybrid":
            stale = self._find_stale()
            self.discarded = len(stale)
            self._send(self.urgent, protocol.Stale(len(stale), stale.tobytes()))
        if self.opts.snapshot_dir:
            self._start_snapshot()

    def _removed_pages(self) -> set[int]:
        """Pages the guest discarded during pre-copy (REMOVE events)."""
        return self.region_events.removed_pages() if self.region_events else set()

    def _find_stale(self) -> array:
        """Pre-copied pages written since they were last sent (the guest is paused): no longer
        valid at the destination, so the push sends them again."""
        stale = self._stale_map()
        memory.bytes_clear(self.valid, stale)
        written = self._scan_dirty(reprotect=False)
        memory.bytes_keep(written, self.valid)  # written since sent (unsent ones are pushed anyway)
        memory.bytes_clear(self.valid, written)
        memory.bytes_set(stale, written)
        return memory.byte_indexes(stale)

    def _proceed_with_event(self, timeout_s: float = 5.0) -> None:
        """Test hook (regionevents.EventSpec ",hold"): let the guest, waiting at its event's
        unit count, perform the event now, during pre-copy, and wait until it says it did."""
        assert self.guest is not None
        self.guest.send({"type": "proceed"})
        deadline = time.monotonic() + timeout_s
        while not self.guest.events and time.monotonic() < deadline:
            for msg in self.guest.poll_messages():
                if msg["type"] in STILL_MESSAGES:
                    self.guest_finished = msg
            if self.guest_finished is not None:
                return
            time.sleep(0.002)

    def _check_region_events(self) -> None:
        if self.region_events is not None:
            self.region_events.check(self.phase)

    def _events_report(self) -> dict[str, Any]:
        """What the guest did to its region here (as the watcher saw it, and as the guest says
        it performed its test-hook event)."""
        out: dict[str, Any] = dict(self.region_events.report()) if self.region_events else {}
        if self.guest is not None and self.guest.events:
            out["guest"] = [{k: e.get(k) for k in ("event", "child_digest")}
                            for e in self.guest.events]
        return out

    def _start_snapshot(self) -> None:
        o = self.opts
        state = {"session": self.session.hex(), "urgent": self.endpoints[0],
                 "bulk": self.endpoints[1], "mode": o.mode, "backing": o.backing,
                 "workload": {"name": o.workload, "size": self.npages * self.page,
                              "seed": o.seed, "ops": self.total_ops},
                 "ops_at_switchover": self.paused_ops}
        assert o.snapshot_dir is not None
        self.snapshot_writer = SnapshotWriter(o.snapshot_dir, self.npages, self.page,
                                              self._read_range, state)
        self.snapshot_writer.start()

    def _announce_snapshot(self) -> None:
        """Tell the destination once the snapshot is on disk (it then waits for a restarted
        source instead of declaring the guest lost)."""
        w = self.snapshot_writer
        if w is None or self.snapshot_announced or w.is_alive():
            return
        self.snapshot_announced = True
        if w.error is not None:
            print(f"[source] snapshot failed: {w.error}", file=sys.stderr, flush=True)
            return
        assert w.digest is not None
        self._send(self.urgent, protocol.Snapshotted(w.digest))

    def _postcopy(self) -> None:
        """Serve faults first; push the rest between them; until the destination has it all."""
        assert self.bulk is not None
        # A smaller send buffer from here on: less bulk data in each uninterruptible copy a
        # fault reply may wait behind (transport.POSTCOPY_SEND_BUFFER).
        if transport.set_send_buffer(self.bulk, self.endpoints[1],
                                     transport.POSTCOPY_SEND_BUFFER):
            self.postcopy_send_buffer = transport.POSTCOPY_SEND_BUFFER
        if self.fast is not None:
            self._postcopy_fast(self.fast)
            return
        poller = zmq.Poller()
        poller.register(self.urgent, zmq.POLLIN)
        poller.register(self.bulk, zmq.POLLIN)
        valid, n = self.valid, self.npages
        cursor = 0
        push_done_sent = False
        last_heard = time.monotonic()
        while True:
            remaining = valid.find(0) >= 0
            if not remaining and not push_done_sent:
                self._send(self.bulk, protocol.PushDone(self.seq, n))
                push_done_sent = True
            can_push = self.opts.push and remaining and len(self.unacked) < WINDOW
            ready = dict(poller.poll(0 if can_push else 250))
            now = time.monotonic()
            if self.urgent in ready:
                last_heard = now
                while True:
                    try:
                        frames = transport.recv_frames(self.urgent, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    arrival = time.monotonic_ns()
                    done, served = self._postcopy_urgent(self.conn.receive(frames), arrival)
                    if done:
                        return
                    if served is not None:
                        cursor = served
            if self.bulk in ready:
                last_heard = now
                while True:
                    try:
                        frames = transport.recv_frames(self.bulk, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle_bulk(self.conn.receive(frames))
            # Requests were answered first; one push batch per turn still goes, or a guest that
            # faults continuously would starve the push (and finish only by demand paging).
            if can_push:
                cursor = self._push_from(cursor)
            elif not ready:
                self._keep_alive(now, last_heard)
            self._postcopy_progress(lambda: n - valid.count(0))

    def _keep_alive(self, now: float, last_heard: float) -> None:
        """A destination silent past the deadline is gone; a PING when we said nothing for 1 s."""
        if now - last_heard > self.opts.peer_timeout_s:
            raise MigrationError("postcopy", f"no word from the destination for "
                                             f"{self.opts.peer_timeout_s:.0f} s")
        if now - self.last_sent >= 1.0:
            self._send(self.urgent, protocol.Ping(time.monotonic_ns()))

    def _postcopy_progress(self, pages_there: Callable[[], int]) -> None:
        """Snapshot announcement and the progress line (its count only built when shown)."""
        self._announce_snapshot()
        if self.progress.due():
            rate = self._rate(self.counts["pushed"] + self.counts["demand"])
            self.progress.update("postcopy", f"{pages_there():,}/{self.npages:,} pages at the "
                                 f"destination, {self.requests:,} faults served, "
                                 f"{rate:,.0f} pages/s")

    def _postcopy_urgent(self, msg: protocol.Message, arrival_ns: int
                         ) -> tuple[bool, int | None]:
        """An urgent message during post-copy: (the migration's transfer is complete, where the
        push goes on after a request served)."""
        if isinstance(msg, protocol.Request):
            return False, self._serve_request(msg, arrival_ns)
        if isinstance(msg, protocol.Complete):
            self._completed(msg)
            return True, None
        if isinstance(msg, protocol.Error):
            raise MigrationError(msg.phase, f"the destination reported: {msg.message}")
        if msg.TYPE != MsgType.PING:
            raise ProtocolError(f"unexpected {msg.TYPE.name} during post-copy")
        return False, None

    def _completed(self, msg: protocol.Complete) -> None:
        self.complete = msg
        now_ns = time.monotonic_ns()
        self.total_ns = now_ns - self.migration_clock.start_ns
        t0, b0 = self.resumed_at
        if now_ns > t0:
            self.postcopy_gbps = round((self.bytes_sent - b0) / (now_ns - t0), 3)

    def _postcopy_fast(self, fast: fastpath.SourceFastPath) -> None:
        """The post-copy loop in C (fastpath.py): requests answered and pages pushed without
        the GIL; Python takes what it hands back (other messages), keeps the peer alive, writes
        progress."""
        n = self.npages
        fast.begin_postcopy(seq=self.seq, acked=self.acked, unacked=list(self.unacked),
                            push=self.opts.push, push_batch=PUSH_BATCH_PAGES, window=WINDOW,
                            max_around=64)
        st = fast.st
        self.fast_path = True
        seen = {"demand_pages": 0, "pushed_pages": 0, "zero_pages": 0, "requests": 0,
                "bytes_sent": 0}

        def collect() -> None:
            # The C counters since the last look go into ours (Python's own sends add to ours
            # directly), and our sequence number follows the C loop's.
            deltas = {k: int(getattr(st, k)) - v for k, v in seen.items()}
            for k in seen:
                seen[k] += deltas[k]
            self.counts["demand"] += deltas["demand_pages"]
            self.counts["pushed"] += deltas["pushed_pages"]
            self.counts["zero"] += deltas["zero_pages"]
            self.requests += deltas["requests"]
            self.bytes_sent += deltas["bytes_sent"]
            self.seq = int(st.seq)
            fast.service_lat.take(self.service)
            if st.last_sent_ns:
                self.last_sent = max(self.last_sent, st.last_sent_ns / 1e9)

        last_heard = time.monotonic()
        priority = fastpath.realtime().__enter__()
        self.fast_realtime = priority.applied
        try:
            while True:
                flags = fast.run(100)
                collect()
                if st.last_heard_ns:
                    last_heard = max(last_heard, st.last_heard_ns / 1e9)
                if flags & fastpath.PUSHED_ALL:
                    self._send(self.bulk, protocol.PushDone(self.seq, n))
                    st.push_done_sent = 1
                if flags & fastpath.BULK:
                    frames, _ = fast.take_bulk()
                    last_heard = time.monotonic()
                    msg = self.conn.receive(frames)
                    if not isinstance(msg, protocol.Ack):
                        raise ProtocolError(f"unexpected {msg.TYPE.name} on the bulk channel")
                    fast.ack(msg.seq)  # an ACK in an encoding the C loop leaves to us
                if flags & fastpath.URGENT:
                    frames, _ = fast.take_urgent()
                    arrival = time.monotonic_ns()
                    last_heard = time.monotonic()
                    done, served = self._postcopy_urgent(self.conn.receive(frames), arrival)
                    if done:
                        return
                    if served is not None:  # a request the C loop left to us
                        st.seq = self.seq
                        st.valid_count = n - self.valid.count(0)
                self._keep_alive(time.monotonic(), last_heard)
                self._postcopy_progress(lambda: int(st.valid_count))
        finally:
            priority.__exit__(None, None, None)
            collect()
            self.unacked = collections.deque(fast.unacked())
            self.acked = int(st.acked)
            self.fast_wakeups = int(st.wakeups)
            if st.push_batches:
                self.push_batch_us = round(st.push_ns / st.push_batches / 1000, 1)

    def _serve_request(self, msg: protocol.Request, arrival_ns: int) -> int:
        """The faulting page goes alone first, so the destination can wake the guest as soon
        as 4 KiB have crossed; its unsent neighbours (fault-around) follow in a second reply."""
        self.requests += 1
        valid, n = self.valid, self.npages
        index = msg.index
        self._send_pages(self.urgent, Batch.DEMAND, range(index, index + 1), request=msg.request)
        self.service.record_ns(time.monotonic_ns() - arrival_ns)
        j = index + 1
        limit = min(n, j + min(msg.around, 64))
        while j < limit and not valid[j]:
            j += 1
        if j > index + 1:
            self._send_pages(self.urgent, Batch.DEMAND, range(index + 1, j), request=msg.request)
        self.counts["demand"] += j - index
        return j

    def _push_from(self, cursor: int) -> int:
        """Push up to PUSH_BATCH_PAGES pages the destination lacks, from ``cursor`` onward
        (wrapping): one contiguous run when there is one, else the scattered pages gathered
        (after a hybrid switchover the missing pages are scattered)."""
        valid = self.valid
        first = valid.find(0, cursor)
        if first < 0:
            first = valid.find(0)
            if first < 0:
                return cursor
        batch: list[int] = []
        i = first
        while i >= 0 and len(batch) < PUSH_BATCH_PAGES:
            batch.append(i)
            i = valid.find(0, i + 1)
        if batch[-1] - batch[0] == len(batch) - 1:
            self._send_pages(self.bulk, Batch.PUSH, range(batch[0], batch[-1] + 1))
        else:
            self._send_pages(self.bulk, Batch.PUSH, batch)
        self.counts["pushed"] += len(batch)
        return batch[-1] + 1

    def _verify(self) -> dict[str, Any]:
        """Compare the destination's received digest with the paused region; final report."""
        source_hashes = self._region_hashes()
        source_digest = digest.digest_of_hashes(source_hashes)
        received = self.complete.hash_array()
        match = (source_digest == self.complete.received_digest
                 and digest.digest_of_hashes(received) == self.complete.received_digest)
        self.mismatched = [] if match else digest.diff_pages(source_hashes, received)
        verified = protocol.Verified(source_digest, match)
        self._send(self.urgent, verified)
        # The destination's guest now finishes its workload (it PINGs meanwhile); its REPORT
        # ends the migration. A repeated COMPLETE means our VERIFIED was lost: send it again.
        while True:
            msg = self._recv(self.urgent)
            if isinstance(msg, protocol.Report):
                self.dest_report = msg.body
                break
            if isinstance(msg, protocol.Complete):
                self._send(self.urgent, verified)
            elif isinstance(msg, protocol.Error):
                raise MigrationError(msg.phase, f"the destination reported: {msg.message}")
        self._send(self.urgent, protocol.Bye("done"))
        return self._report(source_digest, match)

    def _region_hashes(self) -> array:
        if self.snapshot is not None:
            return self.snapshot.hashes
        page, n = self.page, self.npages
        chunk = 4096
        hashes = array("Q")
        buf = bytearray(chunk * page)
        for first in range(0, n, chunk):
            count = min(chunk, n - first)
            if self._read_range(first, count, buf) != count * page:
                raise MigrationError("verify", f"short read of the paused region at page {first}")
            hashes.extend(digest.page_hashes(memoryview(buf)[:count * page], page))
        return hashes

    def _report(self, source_digest: str, match: bool) -> dict[str, Any]:
        d = self.dest_report or {}
        lat = d.get("fault_latency_us", {})
        error = d.get("error")
        if not match:
            shown = ", ".join(str(i) for i in self.mismatched[:20])
            error = (f"{len(self.mismatched)} pages at the destination differ from the paused "
                     f"source's: {shown}{' ...' if len(self.mismatched) > 20 else ''}")
        return {
            "ok": bool(match and d.get("ok")),
            "error": error,
            "mismatched_pages": self.mismatched[:1000],
            "mode": self.opts.mode,
            "workload": self.opts.workload,
            "memory_bytes": self.npages * self.page,
            "page_size": self.page,
            "backing": self.opts.backing,
            "downtime_ms": round(self.downtime_ns / 1e6, 3),
            "downtime_parts_ms": {
                "source_pause_to_switchover": round(self._switch_part_ns() / 1e6, 3),
                "dest_switchover_to_running": round(self.resume_ns / 1e6, 3),
            },
            "total_s": round(self.total_ns / 1e9, 4),
            "pause_at_s": round(self.pause_at_ns / 1e9, 4),
            "precopy_rounds": len(self.rounds),
            "throttled": self.opts.throttle and self.opts.mode != "postcopy",
            # Scheduling of pre-copy's sender and bulk I/O thread (see transport.py)
            "precopy_priority": {"sender": "fifo" if self.precopy_sender_fifo else "normal",
                                 "bulk_io": "fifo" if self.bulk_io_fifo_used else "normal"},
            "bulk_send_buffer": {"precopy": transport.BULK_SEND_BUFFER,
                                 "postcopy": self.postcopy_send_buffer},
            # What the guest got done while pre-copy ran (from its last progress report, at
            # most 0.25 s old, to the pause): what throttling costs it.
            "guest_ops_during_precopy": max(0, self.paused_ops - self.ops_at_start),
            "rounds": self.rounds,
            "bytes_sent": self.bytes_sent,
            "bulk_gbps": self.bulk_gbps,
            "postcopy_gbps": self.postcopy_gbps,
            "pages": {
                "precopy": self.counts["precopy"] + self.counts["final"],
                "pushed": self.counts["pushed"],
                "demand": self.counts["demand"],
                "zero": self.counts["zero"],
                "discarded": self.discarded,
                "staged_installed": d.get("pages", {}).get("local", 0),
            },
            "faults": d.get("faults", 0),
            "local_faults": d.get("local_faults", 0),
            "fast_path": {"source": self.fast_path, "dest": d.get("fast_path", False),
                          "source_wakeups": self.fast_wakeups,
                          "dest_wakeups": d.get("fast_wakeups", 0),
                          "source_off": self.fast_off,
                          "source_realtime": self.fast_realtime,
                          "source_push_batch_us": self.push_batch_us,
                          "dest_push_slice_us": d.get("push_slice_us"),
                          "dest_realtime": d.get("fast_realtime", False),
                          "dest_off": d.get("fast_off"),
                          "urgent_io": {"source": getattr(self.ctx, "urgent_io_priority", None),
                                        "dest": d.get("urgent_io")}},
            "fault_latency_us": {k: lat.get(k) for k in ("p50", "p90", "p99", "max", "histogram")},
            "fault_stages_us": dict(d.get("fault_stages_us", {}),
                                    source_service_p50=self.service.percentile_us(50),
                                    source_service_p99=self.service.percentile_us(99)),
            "guest_ops_at_switchover": self.paused_ops,
            "guest_ops": d.get("guest_ops"),
            "source_digest": source_digest,
            "received_digest": self.complete.received_digest,
            "transfer_ok": match,
            "digest": d.get("digest"),
            "reference_digest": d.get("reference_digest"),
            "events": {"source": self._events_report(), "dest": d.get("events", {})},
        }

    def _switch_part_ns(self) -> int:
        return self.downtime_ns - self.resume_ns

    def _failed(self, exc: BaseException) -> dict[str, Any]:
        cause = self.guest.explain(exc) if self.guest else f"{type(exc).__name__}: {exc}"
        phase = getattr(exc, "phase", self.phase)
        print(f"[source] migration failed during {phase}: {cause}", file=sys.stderr, flush=True)
        frames = self.conn.error_frames(self.phase, cause) if self.sockets else None
        if frames is not None:
            try:
                transport.send_frames(self.sockets[-2] if len(self.sockets) > 1
                                      else self.sockets[0], frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        return {"ok": False, "phase": phase, "error": cause, "mode": self.opts.mode,
                "workload": self.opts.workload, "memory_bytes": self.opts.memory,
                "events": {"source": self._events_report()}}

    def _recover_at_source(self) -> dict[str, Any] | None:
        """The destination never ran the guest, so the copy here is still the guest: continue
        it where it was (SIGCONT + resume if paused) and, with on_failure="resume", let it finish
        and check it against the reference run. Returns what happened, or None if nothing could
        be done (the guest is dead, or the destination already runs it)."""
        g = self.guest
        if g is None or self.dest_running or not g.alive():
            return None
        try:
            if self.throttled:
                self._throttle_guest(False)
            self._lower_bulk_io()
            if self.paused:
                g.resume_here()
                self.paused = False
            outcome: dict[str, Any] = {"resumed": True, "finished": False}
            print("[source] the guest continues here, unchanged", file=sys.stderr, flush=True)
            if self.opts.on_failure != "resume":
                return outcome
            done = self.guest_finished or g.receive(timeout=self.opts.local_finish_timeout_s)
            if done.get("type") == "finished":  # the digest follows
                done = g.receive(timeout=self.opts.local_finish_timeout_s)
            if done.get("type") != "done":
                return outcome | {"error": f"guest sent {done.get('type')}"}
            o = self.opts
            if o.event:
                reference, _child = regionevents.reference_run(
                    o.workload, self.npages * self.page, o.seed, self.total_ops, o.event)
            else:
                reference = workloads.reference_digest(o.workload, self.npages * self.page,
                                                       seed=o.seed, ops=self.total_ops)
            return outcome | {"finished": True, "digest": done["digest"],
                              "reference_digest": reference, "ok": done["digest"] == reference,
                              "events": self._events_report()}
        except (MigrateError, OSError) as exc:
            return {"resumed": False, "error": f"{type(exc).__name__}: {exc}"}

    def _cleanup(self) -> None:
        if self.guest is not None:
            self.guest.kill()  # the destination has it all (or the migration failed and said so)
            self.guest.close()
        if self.region_events is not None:
            self.region_events.stop()
        if self.fd is not None:
            self.fd.close()
        if self.snapshot_writer is not None and self.snapshot_writer.is_alive():
            self.snapshot_writer.join(60)  # the guest is gone; finish what is being written
        if self.snapshot is not None:
            self.snapshot.close()
        if getattr(self, "scanner", None) is not None:
            self.scanner.close()
        for sock in self.sockets:
            # an ERROR just sent still leaves (ctx.term waits for it at most this long)
            sock.close(linger=0 if self.dest_report is not None else transport.ERROR_LINGER_MS)
        if self.ctx is not None:
            self.ctx.term()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", default=None, help="destination daemon, tcp://HOST:PORT")
    parser.add_argument("--snapshot", default=None, metavar="DIR",
                        help="once the destination runs the guest, write the paused region and "
                             "the session to DIR, so a restarted source can finish the migration")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="finish a post-copy migration from the snapshot in DIR (after the "
                             "first source died); the destination and workload come from it")
    parser.add_argument("--workload", default="kv", choices=sorted(workloads.WORKLOADS))
    parser.add_argument("--memory", default="512M", help="guest region size (e.g. 512M, 1G)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", type=int, default=0, help="workload operations (0: default)")
    parser.add_argument("--mode", default="hybrid", choices=protocol.MODES)
    parser.add_argument("--after", type=float, default=1.0,
                        help="seconds the guest runs here before migration starts")
    parser.add_argument("--backing", default="anon", choices=protocol.BACKINGS)
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"pre-copy round budget (default {MAX_ROUNDS} for precopy, "
                             f"{HYBRID_ROUNDS} for hybrid)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the daemon and its guest")
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--peer-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="a destination silent this long is gone (default %(default)s s)")
    parser.add_argument("--throttle", action="store_true",
                        help="during pre-copy run the guest at SCHED_IDLE (only on CPU time the "
                             "daemon leaves), like QEMU's auto-converge: fewer dirty pages and a "
                             "faster round, at the cost of the guest's speed meanwhile")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="serve post-copy requests from the Python loop instead of the C "
                             "one (for comparison and diagnosis)")
    parser.add_argument("--no-push", action="store_true",
                        help="post-copy by demand faults only, no background push")
    parser.add_argument("--event", default=None, metavar="KIND@UNITS[:FIRST:COUNT][,hold|,dest]",
                        help="test hook: the guest discards (remove), unmaps, mremaps (remap) "
                             "or forks at that many work units (docs/region-events.md)")
    parser.add_argument("--key", default=None,
                        help="this daemon's CURVE secret key file (NAME.key from migrate keygen); "
                             "required unless --to is on loopback")
    parser.add_argument("--server-key", default=None, metavar="PUBKEY",
                        help="the destination's public key (.key_public file or z85 text); the "
                             "handshake fails unless the destination holds its secret")


def run(args: argparse.Namespace) -> int:
    from migrate import keys as keyfiles

    try:
        curve = None
        if args.key is not None or args.server_key is not None:
            if args.key is None or args.server_key is None:
                raise keyfiles.KeyFileError("CURVE needs both --key and --server-key")
            pair = keyfiles.load_secret(args.key)
            curve = transport.CurveKeys(pair.public, pair.secret,
                                        keyfiles.load_public(args.server_key))
        if args.resume:
            args.to = Snapshot(args.resume).state["urgent"]
        elif args.to is None:
            raise ValueError("--to tcp://HOST:PORT is required (or --resume DIR)")
        transport.require_keys_off_loopback(args.to, curve, "connect to")
        if args.event is not None:
            regionevents.EventSpec.parse(args.event)  # a bad spec is refused before anything runs
    except (keyfiles.KeyFileError, ValueError, SnapshotError) as exc:
        print(f"migrate source: {exc}", file=sys.stderr)
        return 2
    opts = SourceOptions(to=args.to, workload=args.workload,
                         memory=workloads.parse_size(args.memory), seed=args.seed, ops=args.ops,
                         mode=args.mode, after_s=args.after, backing=args.backing,
                         max_rounds=args.rounds, cpu=args.cpu, progress=not args.quiet,
                         push=not args.no_push, fast_path=not args.no_fast_path, keys=curve,
                         snapshot_dir=args.snapshot,
                         peer_timeout_s=args.peer_timeout, throttle=args.throttle,
                         resume_dir=args.resume, event=args.event)
    report = SourceMigration(opts).run()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report.get("ok") else 1


def print_report(report: dict[str, Any]) -> None:
    if not report.get("ok") and "downtime_ms" not in report:
        print(f"migration FAILED during {report.get('phase')}: {report.get('error')}")
        return
    lat = report["fault_latency_us"]
    print(f"migration {'ok' if report['ok'] else 'FAILED: ' + str(report.get('error'))}: "
          f"{report['workload']} {report['memory_bytes'] >> 20} MiB, mode {report['mode']}")
    print(f"  downtime {report['downtime_ms']} ms, total {report['total_s']} s, "
          f"{report['precopy_rounds']} pre-copy rounds, {report['bytes_sent'] / 1e6:,.1f} MB sent")
    pages = report["pages"]
    print(f"  pages: {pages['precopy']:,} pre-copy, {pages['pushed']:,} pushed, "
          f"{pages['demand']:,} on demand, {pages['zero']:,} zero, "
          f"{pages['discarded']:,} stale at switchover, "
          f"{pages.get('staged_installed', 0):,} installed from staging")
    print(f"  faults {report['faults']:,} remote: p50 {lat['p50']} us, p99 {lat['p99']} us, "
          f"max {lat['max']} us; {report.get('local_faults', 0):,} served from staging")
    events = report.get("events") or {}
    seen = [f"{side} {kind} {n}" for side in ("source", "dest")
            for kind, n in (events.get(side) or {}).items()
            if kind in ("remove", "unmap", "remap", "fork") and n]
    if seen:
        print(f"  guest region events: {', '.join(seen)} (docs/region-events.md)")
    print(f"  digest {report['digest']}")
    print(f"  reference {report['reference_digest']}  "
          f"({'match' if report['digest'] == report['reference_digest'] else 'MISMATCH'})")
