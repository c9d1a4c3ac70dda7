"""The destination daemon: receives guests, serves their faults from the network, installs pages.

One listening ROUTER takes HELLOs. Each migration gets a ``DestSession`` in its own thread:

1. pre-start a guest process on an empty region registered for MISSING faults (so downtime is not
   a process spawn) and adopt its uffd;
2. bind the per-session urgent and bulk channels and answer WELCOME;
3. keep pre-copy pages aside as they arrive (``staging.Staging``: the daemon's own memory; a page
   sent again replaces its staged copy);
4. at SWITCHOVER, take every bulk message up to the named sequence number, let the guest run,
   answer RESUMED; in hybrid mode the source then names the stale staged pages (STALE);
5. post-copy: one thread polls the uffd and both channels; a fault on a staged page is resolved
   here from the staged copy, any other fault becomes a REQUEST whose reply is installed with
   UFFDIO_COPY straight from the received frame; pushed pages are installed the same way (DONTWAKE
   per page, one WAKE per run), and staged pages in whole runs between them; EEXIST (a race
   between push and fault) is success;
6. when every page is present: COMPLETE with the digest of the pages as received, then wait for
   the guest to finish its workload and compare its digest with a reference run's.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import select
import sys
import threading
import time
import traceback
from array import array
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from migrate import digest, fastpath, protocol, regionevents, transport, uffd
from migrate.errors import InternalError, MigrateError, MigrationError, ProtocolError
from migrate.guest import GuestError, GuestHandle
from migrate.protocol import Batch, MsgType
from migrate.staging import ZERO_PAGE_HASH, Staging
from migrate.stats import LatencyRecorder

FAULT_AROUND = 8  # pages asked for beyond the faulting one; the source sends only unsent ones
DEFAULT_PEER_TIMEOUT_S = 10.0
TICK_S = 0.25  # housekeeping period: liveness, retries, sweeps
PING_AFTER_S = 1.0  # send a PING when nothing was sent for this long
REQUEST_RETRY_S = 1.0  # a fault request unanswered this long is sent again (reply lost)
SWEEP_IDLE_S = 1.0  # bulk quiet this long in post-copy with pages missing: ask for them
SWEEP_PAGES = 256  # at most this many missing pages requested per sweep
REPEAT_S = 1.0  # COMPLETE / REPORT repeated at this period until answered
REPORT_REPEATS = 5
REPORT_HISTORY = 1000  # reports a long-running destination daemon keeps
LOCAL_BATCH_PAGES = 128  # staged pages installed per loop turn (C: INSTALL_SLICE per ioctl)
LOCAL_AROUND = 16  # staged pages installed with a faulting one
INSTALL_SLICE = 16  # pages per UFFDIO_COPY batch of a push; faults are served between slices
DEFAULT_RESUME_TIMEOUT_S = 60.0  # how long a source with a snapshot may take to come back
FILL_RETRIES = 2000  # UFFDIO_COPY tries while the guest's layout changes (EAGAIN/ENOENT)
FILL_RETRY_SLEEP_S = 0.0005


@dataclass
class DestOptions:
    listen: str
    keys: transport.CurveKeys | None = None
    allowed_clients: list[bytes] | None = None
    cpu: int | None = None
    peer_timeout_s: float = DEFAULT_PEER_TIMEOUT_S
    resume_timeout_s: float = DEFAULT_RESUME_TIMEOUT_S
    verify_reference: bool = True
    fault_around: int = FAULT_AROUND
    max_migrations: int | None = None
    json_reports: bool = False
    advertise: str | None = None  # host named in WELCOME when listening on every address
    quiet: bool = False
    max_sessions: int = 16  # migrations in progress at once; more HELLOs are refused
    fast_path: bool = True  # post-copy loop in C (fastpath.py) when libzmq can be reached
    reserve: int = 0  # bytes of memory faulted in ahead for incoming guests (fastpath.Reserve)


@dataclass
class SessionReport:
    ok: bool = False
    phase: str = "handshake"
    error: str | None = None
    workload: dict[str, Any] = field(default_factory=dict)
    mode: str = ""
    pages: dict[str, int] = field(default_factory=lambda: {
        "precopy": 0, "resent": 0, "pushed": 0, "demand": 0, "zero": 0, "discarded": 0,
        "local": 0})
    faults: int = 0
    fault_latency: LatencyRecorder = field(default_factory=LatencyRecorder)
    request_latency: LatencyRecorder = field(default_factory=LatencyRecorder)  # event -> sent
    install_latency: LatencyRecorder = field(default_factory=LatencyRecorder)  # reply -> woken
    resume_ns: int = 0
    received_digest: str = ""
    source_digest: str = ""
    transfer_ok: bool = False
    digest: str = ""
    reference_digest: str = ""
    guest_ops: int = 0
    postcopy_s: float = 0.0
    snapshot: bool = False  # the source announced a snapshot on disk
    source_restarts: int = 0  # sources that resumed the session from the snapshot
    retries: int = 0  # fault requests sent again because no reply came
    swept: int = 0  # missing pages asked for by the sweep
    local_faults: int = 0  # faults resolved from staged pages, without asking the source
    fast_path: bool = False  # post-copy ran (at least partly) in the C loop (fastpath.py)
    fast_off: str | None = None  # why it did not, or stopped
    fast_wakeups: int = 0  # times that loop slept and was woken
    fast_realtime: bool = False  # that loop ran at SCHED_FIFO (fastpath.realtime)
    urgent_io: str = ""  # the urgent channel's I/O thread priority (transport.make_context)
    push_slice_us: float | None = None  # mean time installing one slice of a pushed batch
    # Region events the guest caused here (docs/region-events.md), pages zero-filled locally
    # (discarded, or not the region's), faults of forked children and the pages they lacked at
    # the fork.
    events: dict[str, Any] = field(default_factory=lambda: {
        "remove": 0, "unmap": 0, "remap": 0, "fork": 0, "zero_filled": 0, "child_faults": 0,
        "child_missing": 0})

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "phase": self.phase, "error": self.error, "mode": self.mode,
            "workload": self.workload, "pages": dict(self.pages), "faults": self.faults,
            "local_faults": self.local_faults, "fast_path": self.fast_path,
            "fast_off": self.fast_off,
            "fast_wakeups": self.fast_wakeups, "fast_realtime": self.fast_realtime,
            "urgent_io": self.urgent_io, "push_slice_us": self.push_slice_us,
            "fault_latency_us": self.fault_latency.report(), "resume_ns": self.resume_ns,
            "fault_stages_us": {
                "dest_request_p50": self.request_latency.percentile_us(50),
                "dest_request_p99": self.request_latency.percentile_us(99),
                "dest_install_p50": self.install_latency.percentile_us(50),
                "dest_install_p99": self.install_latency.percentile_us(99),
            },
            "received_digest": self.received_digest, "source_digest": self.source_digest,
            "transfer_ok": self.transfer_ok, "digest": self.digest,
            "reference_digest": self.reference_digest, "guest_ops": self.guest_ops,
            "postcopy_s": round(self.postcopy_s, 4), "retries": self.retries,
            "swept": self.swept, "snapshot": self.snapshot,
            "source_restarts": self.source_restarts, "events": dict(self.events),
        }


class DestSession:
    """One incoming migration."""

    def __init__(self, daemon: DestDaemon, router_id: bytes, hello_frames: list[Any],
                 reserve: fastpath.Reserve | None = None) -> None:
        self.daemon = daemon
        self.reserve = reserve
        self.opts = daemon.opts
        self.router_id = router_id
        self.conn = protocol.Connection(protocol.Side.DEST)
        self.report = SessionReport()
        self.report.urgent_io = getattr(daemon.ctx, "urgent_io_priority", "")
        self.guest: GuestHandle | None = None
        self.fd: uffd.Userfaultfd | None = None
        self.urgent: zmq.Socket | None = None
        self.bulk: zmq.Socket | None = None
        self.hello_frames = hello_frames
        self.present = bytearray()
        self._present_count = 0
        # The post-copy fast path (fastpath.py): None while Python runs the loop. Once it stops
        # (a region event), it does not start again for this session.
        self.fast: fastpath.DestFastPath | None = None
        self.fast_off: str | None = None if self.opts.fast_path else "disabled (--no-fast-path)"
        self.report.fast_off = self.fast_off
        self.hashes = array("Q")
        self.staging: Staging | None = None  # pre-copied pages not yet in the guest
        # page index -> (request id, first sent ns, last sent ns, asked because of a fault)
        self.pending: dict[int, tuple[int, int, int, bool]] = {}
        self.next_request = 1
        self.bulk_seq = 0
        self.guest_done: dict[str, Any] | None = None
        self.completed_sent = False
        self.complete_at = 0.0
        self.report_sent_at = 0.0
        self.report_repeats = 0
        self.finished = False
        self.last_sent = time.monotonic()
        self.push_done = False
        self.pushed_messages = 0  # PUSH batches received: the source is pushing
        self.reference_thread: threading.Thread | None = None
        self.reference_result: str | BaseException | None = None
        self.snapshot_digest = ""  # the source announced a snapshot: it can be restarted
        self.waiting_for_resume = False
        # Region events (docs/region-events.md): where the guest's pages are now, the children
        # it forked here, and whether any event happened (then pages take the translated path).
        self.regmap: regionevents.RegionMap | None = None
        self.children: list[regionevents.ChildSpace] = []
        self._events_active = False
        self.reference_child: str | None = None
        self._poller: zmq.Poller | None = None

    @property
    def present_count(self) -> int:
        """Pages the guest has (with the fast path running, its count is the one kept)."""
        return int(self.fast.st.present_count) if self.fast is not None else self._present_count

    @present_count.setter
    def present_count(self, value: int) -> None:
        if self.fast is not None:
            self.fast.st.present_count = value
        else:
            self._present_count = value

    @property
    def events_active(self) -> bool:
        """The guest changed its region here (pages then take the translated path)."""
        return self._events_active

    @events_active.setter
    def events_active(self, value: bool) -> None:
        # Whoever notices the change first (the C loop, a staged install meeting EAGAIN, a
        # pushed batch), the C loop must not install again: it knows only original addresses and
        # would bring back pages the guest discarded.
        self._events_active = value
        if value and self.fast is not None:
            self.fast_off = self.report.fast_off = "the guest changed its region"
            self._stop_fast()

    # -- setup ------------------------------------------------------------------------------

    def handshake(self) -> bool:
        try:
            hello = self.conn.receive(self.hello_frames)
        except ProtocolError as exc:
            self.daemon.log(f"refused a HELLO: {exc}")
            self.report.error = str(exc)
            return False
        assert isinstance(hello, protocol.Hello)
        self.hello = hello
        self.report.workload = dict(hello.workload)
        self.report.mode = hello.mode
        self.base = 0
        self.page = hello.page_size
        self.npages = hello.npages
        try:
            self.guest = GuestHandle("dest", hello.npages * hello.page_size,
                                     backing=hello.backing, workload=hello.workload["name"],
                                     seed=hello.workload["seed"], ops=hello.workload["ops"],
                                     event=hello.workload.get("event"))
        except (GuestError, OSError) as exc:
            self._refuse(f"could not start a guest here: {exc}")
            return False
        layout = self.guest.layout
        if layout.size != hello.npages * hello.page_size or layout.page_size != hello.page_size:
            self._refuse(f"guest region {layout.size} bytes does not match the source's")
            return False
        self.base = layout.address
        self.regmap = regionevents.RegionMap(self.base, self.npages, self.page)
        self.fd = uffd.Userfaultfd.adopt(self.guest.uffd_fd, uffd.Feature(layout.features))
        self.guest.uffd_fd = -1  # owned by self.fd now
        self.present = bytearray(self.npages)
        self.hashes = array("Q", bytes(8 * self.npages))
        host = transport.host_of(self.opts.listen)
        client = transport.peer_key(self.hello_frames[0])  # only the HELLO's sender may join
        self.urgent, urgent_ep = transport.bind_channel(self.daemon.ctx, host, self.opts.keys,
                                                        peer=client, advertise=self.opts.advertise,
                                                        channel="urgent")
        self.bulk, bulk_ep = transport.bind_channel(self.daemon.ctx, host, self.opts.keys,
                                                    peer=client, advertise=self.opts.advertise,
                                                    channel="bulk")
        welcome = protocol.Welcome(protocol.PROTOCOL_VERSION, hello.session, urgent_ep, bulk_ep,
                                   protocol.negotiate_features(hello.features))
        self.daemon.reply(self.router_id, self.conn.send(welcome))
        self.report.phase = "precopy"
        return True

    def _refuse(self, reason: str) -> None:
        self.report.error = reason
        self.daemon.log(f"refused migration: {reason}")
        try:
            frames = self.conn.send(protocol.Refuse(self.hello.session, reason))
            self.daemon.reply(self.router_id, frames)
        except ProtocolError:
            pass

    # -- installing pages -------------------------------------------------------------------

    def install(self, msg: protocol.Pages, *, wake: bool) -> int:
        """Take one PAGES batch (``_install_direct``); when the guest turns out to be changing
        its region meanwhile (EAGAIN: an event is pending), follow its events and install the
        batch the translated way."""
        try:
            return self._install_direct(msg, wake=wake)
        except (BlockingIOError, FileNotFoundError):
            if msg.kind in (Batch.PRECOPY, Batch.FINAL):
                raise  # the guest does not run yet: nothing may change its region
            self._drain(None)
            self.events_active = True
            return self._install_translated(msg)

    def _install_direct(self, msg: protocol.Pages, *, wake: bool) -> int:
        """Pre-copy pages are staged (kept aside until the guest may have them); pages sent
        after the switchover go into the guest with UFFDIO_COPY/ZEROPAGE straight from the
        frame, except those already present (the guest owns them now: a late copy is dropped).
        Returns how many pages became present."""
        assert self.fd is not None and self.guest is not None
        if self.events_active and msg.kind not in (Batch.PRECOPY, Batch.FINAL):
            return self._install_translated(msg)
        idx = msg.index_array()
        zero = msg.zero
        buf = msg.data.buffer if hasattr(msg.data, "buffer") else memoryview(msg.data)
        if msg.kind in (Batch.PRECOPY, Batch.FINAL):
            if self.report.phase not in ("precopy", "switchover"):
                raise ProtocolError(f"a {Batch(msg.kind).name} batch after the guest runs here")
            if self.staging is None:
                self.staging = Staging(self.npages, self.page, self.reserve)
            first_time, again = self.staging.store(idx, zero, buf, self.hashes)
            self.report.pages["zero"] += zero.count(1)
            self.report.pages["precopy"] += first_time
            self.report.pages["resent"] += again
            return 0
        page, base, present = self.page, self.base, self.present
        stage = self.staging.state if self.staging is not None else None
        new_addrs, new_off = array("Q"), []
        new_zero = array("Q")
        off = 0
        for i, p in enumerate(idx):
            if zero[i]:
                if not present[p]:
                    new_zero.append(base + p * page)
                continue
            if not present[p]:
                new_addrs.append(base + p * page)
                new_off.append(off)
            off += page
        installed = 0
        if new_addrs:
            if self.reserve is not None:
                self.reserve.take(len(new_addrs) * page)
            if len(new_off) == off // page:  # every data page is new: the frame is already in order
                data = buf
            else:
                data = b"".join(buf[o:o + page] for o in new_off)
            if msg.kind == Batch.PUSH and len(new_addrs) > INSTALL_SLICE:
                installed += self._install_sliced(new_addrs, data, wake)
            else:
                installed += self.fd.copy_pages(new_addrs, data, page, wake=wake)
        if new_zero:
            installed += self.fd.zero_pages(new_zero, page, wake=wake)
        # Remember what is installed (hash of the version each page holds) for the transfer check:
        # a page already present keeps the version it got first.
        if off:
            data_hashes = digest.page_hashes(buf[:off], page)
        k = 0
        hashes, zero_hash = self.hashes, ZERO_PAGE_HASH
        for i, p in enumerate(idx):
            if zero[i]:
                h = zero_hash
            else:
                h = data_hashes[k]
                k += 1
            if not present[p]:
                present[p] = 1
                self.present_count += 1
                hashes[p] = h
                if stage is not None:
                    stage[p] = 0  # a staged copy (stale, or not yet known fresh) is now moot
        if self.pending:
            self._resolved(idx)
        n = len(idx)
        self.report.pages["zero"] += zero.count(1)
        if msg.kind == Batch.DEMAND:
            self.report.pages["demand"] += n
        else:
            self.report.pages["pushed"] += n
        return installed

    def _replied(self, index: int) -> None:
        """The reply naming ``index`` first is installed: its request is answered, and timed if
        a fault asked (not the sweep)."""
        pending = self.pending.pop(index, None)
        if pending is not None and pending[3]:
            done = time.monotonic_ns()
            self.report.fault_latency.record_ns(done - pending[1])
            self.report.install_latency.record_ns(done - self.urgent_arrival_ns)

    def _resolved(self, indexes: Any) -> None:
        """Pages just installed (pushed, from staging, or another fault's neighbours): a fault
        waiting on one of them is over (the install woke it), whenever its own reply comes."""
        pending, now_ns = self.pending, time.monotonic_ns()
        for p in indexes:
            entry = pending.pop(p, None)
            if entry is not None and entry[3]:
                self.report.fault_latency.record_ns(now_ns - entry[1])

    def _install_sliced(self, addrs: array, data: Any, wake: bool) -> int:
        """A pushed batch in slices, with waiting faults and fault replies handled between them:
        installing 128 fresh pages can take a millisecond here, too long for a fault to wait.
        (Anything installed meanwhile is found present: UFFDIO_COPY's EEXIST, skipped.)"""
        assert self.fd is not None and self.urgent is not None
        page, n, installed = self.page, len(addrs), 0
        view = memoryview(data)
        for k in range(0, n, INSTALL_SLICE):
            installed += self.fd.copy_pages(addrs[k:k + INSTALL_SLICE],
                                            view[k * page:(k + INSTALL_SLICE) * page], page,
                                            wake=wake)
            if k + INSTALL_SLICE < n:
                if self.fd.wait(0):
                    self._on_faults()
                if int(self.urgent.get(zmq.EVENTS)) & zmq.POLLIN:
                    self._drain_urgent()
                if self.events_active:
                    # The guest changed its region meanwhile: addresses computed for this batch
                    # may be stale. install() takes it again the translated way (what went in
                    # already is found present).
                    raise BlockingIOError(errno.EAGAIN, "the guest changed its region during "
                                                        "a pushed batch")
        return installed

    def _install_first(self, msg: protocol.Pages, index: int) -> None:
        """One page, one ioctl, woken at once: the fault path's only work before the guest runs."""
        assert self.fd is not None
        page = self.page
        addr = self.base + index * page
        try:
            if msg.zero[0]:
                self.fd.zeropage(addr, page)
                h = ZERO_PAGE_HASH
            else:
                buf = msg.data.buffer if hasattr(msg.data, "buffer") else memoryview(msg.data)
                self.fd.copy(addr, buf[:page])
                h = digest.page_hashes(buf[:page], page)[0]
        except FileExistsError:
            self.fd.wake(addr, page)
            return
        except (BlockingIOError, FileNotFoundError):
            self._drain(None)  # the guest is changing its region: follow, then translate
            self.events_active = True
            self._install_translated(msg, count=False)
            return
        self.present[index] = 1
        self.present_count += 1
        self.hashes[index] = h
        if self.staging is not None:
            self.staging.state[index] = 0

    def _installable_here(self, index: int) -> bool:
        """A fresh staged copy of the page is here (no need to ask the source)."""
        st = self.staging
        return (st is not None and st.stale_known and not self.events_active
                and st.state[index] != 0)

    def _install_staged(self, first: int, limit: int) -> None:
        """A fault on a staged page: install the staged pages of [first, first + limit) (the
        faulting one wakes its thread), no round trip."""
        assert self.fd is not None and self.staging is not None
        end = min(self.npages, first + limit)
        try:
            _, newly = self.staging.install(self.fd.fileno(), self.base, self.present, first,
                                            end, limit)
        except (BlockingIOError, FileNotFoundError) as exc:
            self._staging_interrupted(exc)  # the fault is asked of the source when it recurs
            return
        self._staged_in(newly, first, end)

    def _install_staged_batch(self) -> bool:
        """Background: a batch of staged pages into the guest. False when none is left."""
        st = self.staging
        if st is None or not st.stale_known or self.events_active:
            return False
        assert self.fd is not None
        if self.fast is not None:
            return self._install_staged_fast(self.fast, st)
        before = st.cursor
        try:
            newly = st.install_next(self.fd.fileno(), self.base, self.present, LOCAL_BATCH_PAGES)
        except (BlockingIOError, FileNotFoundError) as exc:
            self._staging_interrupted(exc)
            return False
        if newly is None:
            self._release_staging()
            return False
        self._staged_in(newly, before, st.cursor)
        self._maybe_complete()
        return True

    def _install_staged_fast(self, fast: fastpath.DestFastPath, st: Staging) -> bool:
        """The background install with the fast path running: in C, a slice at a time with
        faults and replies served between slices (installed from Python, a fault or a reply
        arriving meanwhile waited for the whole 128-page batch before it was even read)."""
        if st.cursor >= self.npages:
            self._release_staging()
            fast.set_staging(None, False)
            return False
        before = st.cursor
        # present_count and pages["local"] (local_pages) are counted by the C side
        flags, reached, _newly = fast.stage_next(before, LOCAL_BATCH_PAGES)
        st.advance(max(before, reached))
        if self.pending:
            self._resolved([p for p in self.pending if before <= p < reached])
        if flags:
            self._fast_handle(fast, flags)
        self._maybe_complete()
        return True

    def _staged_in(self, newly: int, first: int, end: int) -> None:
        """Staged pages of [first, end) went in (``newly`` of them were missing)."""
        self.present_count += newly
        self.report.pages["local"] += newly
        if self.fast is not None:
            self.fast.resolve(first, end)
        if self.pending:
            self._resolved([p for p in self.pending if first <= p < end])

    def _staging_interrupted(self, exc: OSError) -> None:
        """A staged install met the guest changing its region (an event pending: EAGAIN, or
        a range gone: ENOENT). Staged pages are installed by their index's original address
        only, so from now on they are not used: what is missing is asked of the source (its
        paused copy is current) and installed the translated way (docs/region-events.md)."""
        self.present_count += getattr(exc, "newly", 0)
        self._drain(None)
        self.events_active = True
        self.daemon.log("the guest changed its region: staged pages are fetched from the "
                        "source instead")

    def _release_staging(self) -> None:
        if self.staging is not None:
            self.staging.close()
            self.staging = None

    # -- the session loop -------------------------------------------------------------------

    def run(self) -> SessionReport:
        try:
            if not self.handshake():
                return self.report
            self._loop()
        except Exception as exc:
            if not isinstance(exc, (MigrateError, OSError, zmq.ZMQError)):
                traceback.print_exc()  # a bug: the source hears of it now, not after its timeout
                exc = InternalError(exc)
            self._fail(exc)
        finally:
            self._cleanup()
        return self.report

    def _fail(self, exc: BaseException) -> None:
        phase = self.report.phase
        cause = self.guest.explain(exc) if self.guest else f"{type(exc).__name__}: {exc}"
        self.report.error = cause
        self.report.ok = False
        self.daemon.log(f"migration failed during {phase}: {cause}")
        frames = self.conn.error_frames(phase, cause)
        # On both channels: the source may be waiting on either (pre-copy: for acknowledgements).
        for sock in (self.urgent, self.bulk):
            if sock is not None and frames is not None:
                try:
                    transport.send_frames(sock, frames, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def _cleanup(self) -> None:
        self._stop_fast()
        for child in self.children:
            child.fd.close()  # a child still faulting gets zero pages from the kernel now
        self.children = []
        if self.guest is not None:
            if not self.report.ok:
                self.guest.kill()  # never leave a guest waiting on a fault nobody will serve
            self.guest.close()
        if self.fd is not None:
            self.fd.close()
        self._release_staging()
        for sock in (self.urgent, self.bulk):
            if sock is not None:
                # an ERROR just sent still leaves (the daemon's context lives on)
                sock.close(linger=0 if self.report.ok else transport.ERROR_LINGER_MS)

    def _recv(self, sock: zmq.Socket) -> protocol.Message:
        return self.conn.receive(transport.recv_frames(sock))

    def _send(self, sock: zmq.Socket, msg: protocol.Message) -> None:
        transport.send_frames(sock, self.conn.send(msg))
        self.last_sent = time.monotonic()

    def _request(self, index: int, req: int, around: int | None = None) -> None:
        assert self.urgent is not None
        transport.send_frames(self.urgent, self.conn.send_fast(
            MsgType.REQUEST, req, index, self.opts.fault_around if around is None else around))
        self.last_sent = time.monotonic()

    _last_fault_index = -1

    def _fault_around(self, index: int) -> int:
        """Neighbours a fault asks for: fault-around follows locality as the C loop's does
        (native/xfer.c, mig_dest_x_faults): a fault just after the previous one asks for the
        pages that follow, an isolated one for its page alone."""
        last, self._last_fault_index = self._last_fault_index, index
        around = self.opts.fault_around
        return around if last >= 0 and last < index <= last + 2 * (around + 1) else 0

    def _loop(self) -> None:
        assert self.fd is not None and self.guest is not None
        assert self.urgent is not None and self.bulk is not None
        poller = zmq.Poller()
        poller.register(self.urgent, zmq.POLLIN)
        poller.register(self.bulk, zmq.POLLIN)
        poller.register(self.fd.fileno(), zmq.POLLIN)
        poller.register(self.guest.fileno(), zmq.POLLIN)
        self._poller = poller  # forked children's userfaultfds join it
        urgent, bulk = self.urgent, self.bulk
        uffd_fd, guest_fd = self.fd.fileno(), self.guest.fileno()
        self.last_heard = time.monotonic()
        last_bulk = self.last_heard
        last_tick = 0.0
        local_work = False
        while not self.finished:
            if self.fast is None and self._fast_wanted():
                self._start_fast()
            if self.fast is not None:
                local_work = self._fast_turn(local_work)
                now = time.monotonic()
                last_bulk = max(last_bulk, self._fast_last_bulk)
                if now - last_tick >= TICK_S:
                    last_tick = now
                    self._tick(now, last_bulk)
                continue
            ready = dict(poller.poll(0 if local_work else int(TICK_S * 1000)))
            now = time.monotonic()
            if uffd_fd in ready:
                self._on_faults()
            for child in list(self.children):
                if child.fd.fileno() in ready:
                    self._on_space_events(child, child.fd.read_events(64))
            if urgent in ready:
                self._drain_urgent()
            if bulk in ready:
                # One bulk message per turn: a fault reply never waits behind more than one.
                try:
                    frames = transport.recv_frames(bulk, flags=zmq.NOBLOCK)
                except zmq.Again:
                    frames = None
                if frames is not None:
                    self.last_heard = last_bulk = now
                    self._on_bulk(self.conn.receive(frames))
            # Staged pages go in between network messages, one run per turn.
            local_work = self._install_staged_batch()
            if guest_fd in ready:
                for msg in self.guest.poll_messages():
                    if msg["type"] == "done":
                        self.guest_done = msg
                        self._finish_if_done()
            if now - last_tick >= TICK_S:
                last_tick = now
                self._tick(now, last_bulk)

    # -- the post-copy fast path (fastpath.py) ------------------------------------------------

    _fast_last_bulk = 0.0

    def _fast_wanted(self) -> bool:
        if self.fast_off is not None:
            return False
        if (self.report.phase != "postcopy" or self.events_active or self.children
                or self.completed_sent):
            return False
        usable, why = fastpath.available()
        if not usable:
            self.fast_off = self.report.fast_off = f"unavailable: {why}"
            self.daemon.log(f"post-copy fast path {self.fast_off}; the Python loop serves faults")
            return False
        return True

    def _start_fast(self) -> None:
        assert self.fd is not None and self.urgent is not None and self.bulk is not None
        fast = fastpath.DestFastPath(
            urgent=self.urgent, bulk=self.bulk, uffd=self.fd.fileno(), base=self.base,
            page_size=self.page, npages=self.npages, present=self.present, hashes=self.hashes,
            zero_hash=ZERO_PAGE_HASH, around=self.opts.fault_around, slice_pages=INSTALL_SLICE,
            local_around=LOCAL_AROUND, next_request=self.next_request,
            present_count=self._present_count, reserve=self.reserve)
        fast.adopt_pending(self.pending)
        self.pending = {}
        self.fast = fast
        self.report.fast_path = True
        self._realtime = fastpath.realtime().__enter__()
        self.report.fast_realtime = self._realtime.applied

    def _stop_fast(self) -> None:
        """Back to the Python loop for good: its counters, requests and pages are taken over."""
        fast = self.fast
        if fast is None:
            return
        self._fast_collect(fast)
        st = fast.st
        self.fast = None
        self._realtime.__exit__(None, None, None)
        self._present_count = int(st.present_count)
        self.pending.update(fast.pending())
        self.next_request = int(st.next_request)
        self.bulk_seq = max(self.bulk_seq, int(st.bulk_seq))
        self.pushed_messages += int(st.pushed_msgs)
        r = self.report
        r.faults += st.faults
        r.local_faults += st.local_faults
        for key, value in (("demand", st.demand_pages), ("pushed", st.pushed_pages),
                           ("zero", st.zero_pages), ("local", st.local_pages)):
            r.pages[key] += int(value)
        r.fast_wakeups = int(st.wakeups)
        if st.push_slices:
            r.push_slice_us = round(st.push_install_ns / st.push_slices / 1000, 1)

    def _fast_collect(self, fast: fastpath.DestFastPath) -> None:
        """Latency samples and liveness times of the last run."""
        r, st = self.report, fast.st
        fast.take_samples(r.fault_latency, r.request_latency, r.install_latency)
        if st.last_heard_ns:
            self.last_heard = max(self.last_heard, st.last_heard_ns / 1e9)
        if st.last_sent_ns:
            self.last_sent = max(self.last_sent, st.last_sent_ns / 1e9)
        if st.last_bulk_ns:
            self._fast_last_bulk = st.last_bulk_ns / 1e9

    def _fast_turn(self, local_work: bool) -> bool:
        """One run of the C loop, then what it handed back; staged pages go in between runs.
        Returns whether staged pages remain to install (the next run must not wait)."""
        fast = self.fast
        assert fast is not None and self.guest is not None
        st = self.staging
        fast.set_staging(st, st is not None and st.stale_known and not self.events_active)
        self._fast_handle(fast, fast.run(0 if local_work else int(TICK_S * 1000)))
        more = self._install_staged_batch()
        guest_fd = self.guest.fileno()
        if select.select([guest_fd], [], [], 0)[0]:
            for msg in self.guest.poll_messages():
                if msg["type"] == "done":
                    self.guest_done = msg
                    self._finish_if_done()
        return more

    def _fast_handle(self, fast: fastpath.DestFastPath, flags: int) -> None:
        """What a run (or a staged install) of the C loop handed back."""
        self._fast_collect(fast)
        if flags & fastpath.OUTSIDE:
            raise MigrationError("postcopy", f"fault at {fast.st.bad_address:#x} outside the "
                                             f"region")
        events = fast.take_events() if flags & fastpath.EVENTS else []
        urgent = fast.take_urgent() if flags & fastpath.URGENT else None
        bulk = fast.take_bulk() if flags & fastpath.BULK else None
        interrupted = (bool(fast.st.staging_interrupted) or (urgent is not None and urgent[1])
                       or (bulk is not None and bulk[1]))
        if events or interrupted:
            # The guest is changing its region: Python follows its events from here on (the
            # events_active setter stops the fast path).
            self.events_active = True
            if fast.st.staging_interrupted:
                self.daemon.log("the guest changed its region: staged pages are fetched from "
                                "the source instead")
            if events:
                self._on_space_events(None, events)
            if interrupted:
                self._drain(None)
        if urgent is not None:
            self.urgent_arrival_ns = time.monotonic_ns()
            self._on_urgent(self.conn.receive(urgent[0]))
        if bulk is not None:
            self._on_bulk(self.conn.receive(bulk[0]))
        if (urgent is not None or bulk is not None) and self.fast is not None:
            self.fast.resolve(0, self.npages)  # Python may have installed pages
        if flags & fastpath.COMPLETE:
            self._maybe_complete()
        if self.completed_sent:
            self._stop_fast()  # the rest (VERIFIED, late pushes) is the Python loop's

    def _drain_urgent(self) -> None:
        """Every message waiting on the urgent channel. Readiness alone proves nothing (a
        dropped connection can wake the poller): only a message received counts as word from
        the source."""
        assert self.urgent is not None
        while not self.finished:
            try:
                frames = transport.recv_frames(self.urgent, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            self.urgent_arrival_ns = time.monotonic_ns()
            self.last_heard = time.monotonic()
            self._on_urgent(self.conn.receive(frames))

    def _tick(self, now: float, last_bulk: float) -> None:
        """Housekeeping: liveness, lost replies, missing pages, repeated final messages."""
        assert self.guest is not None and self.urgent is not None
        timeout_s = self.opts.peer_timeout_s
        if self.report_sent_at:
            if now - self.report_sent_at >= REPEAT_S:
                if self.report_repeats >= REPORT_REPEATS:
                    self.finished = True  # the source got it or is gone; the report stands
                    return
                self.report_repeats += 1
                self.report_sent_at = now
                self._send(self.urgent, protocol.Report(self.report.as_dict()))
            return
        silent = now - self.last_heard
        if not self.conn.finished and silent > timeout_s:
            if not self.snapshot_digest:
                raise MigrationError(
                    self.report.phase,
                    f"no word from the source for {timeout_s:.0f} s and it announced no "
                    f"snapshot: the pages still at the source are lost, so the guest cannot "
                    f"continue and is stopped")
            if silent > timeout_s + self.opts.resume_timeout_s:
                raise MigrationError(
                    self.report.phase,
                    f"the source has been silent for {silent:.0f} s and no source resumed from "
                    f"its snapshot within {self.opts.resume_timeout_s:.0f} s; the guest is "
                    f"stopped")
            if not self.waiting_for_resume:
                self.waiting_for_resume = True
                self.daemon.log(f"the source is silent; waiting up to "
                                f"{self.opts.resume_timeout_s:.0f} s for a source to resume "
                                f"from its snapshot")
        if not self.guest.alive():
            raise MigrationError(self.report.phase, "the guest died")
        # Keep pinging after VERIFIED too: the source waits for our REPORT while the guest
        # finishes its workload, and must be able to tell that wait from a dead destination.
        if now - self.last_sent >= PING_AFTER_S and self.conn.state is not protocol.State.FAILED:
            self._send(self.urgent, protocol.Ping(time.monotonic_ns()))
        if self.report.phase == "postcopy":
            retry_ns = int(REQUEST_RETRY_S * 1e9)
            now_ns = time.monotonic_ns()
            if self.fast is not None:
                self.report.retries += self.fast.retry(now_ns, retry_ns)
            for index, (req, first_ns, sent_ns, fault) in list(self.pending.items()):
                if now_ns - sent_ns >= retry_ns:
                    self.pending[index] = (req, first_ns, now_ns, fault)
                    self.report.retries += 1
                    self._request(index, req)
            # Sweep only where pages were lost: after PUSH_DONE, or when a push that had begun
            # went quiet (a dropped connection). Without push (demand only) nothing is swept.
            stalled = self.pushed_messages and now - last_bulk >= SWEEP_IDLE_S
            if (self.push_done or stalled or self._only_discarded_missing()) \
                    and self.present_count < self.npages:
                self._sweep_missing()
            if self.children and self.present_count == self.npages:
                self._request_for_children()
        if self.completed_sent and not self.report.source_digest:
            if now - self.complete_at >= REPEAT_S:
                self._send_complete()
        if self.reference_thread is not None and not self.reference_thread.is_alive():
            self._finish_if_done()

    def _sweep_missing(self) -> None:
        """Ask for pages nobody faulted on that have not arrived: pushes lost with a dropped
        connection, or a PUSH_DONE that never came."""
        present, pending = self.present, self.pending
        asked = 0
        index = present.find(0)
        now_ns = time.monotonic_ns()
        while 0 <= index and asked < SWEEP_PAGES:
            if self.fast is not None:
                if not self.fast.is_pending(index) and not self._installable_here(index):
                    self.fast.ask(index, fault=False)
                    self.report.swept += 1
                    asked += 1
            elif index not in pending and not self._installable_here(index):
                req = self.next_request
                self.next_request += 1
                pending[index] = (req, now_ns, now_ns, False)
                self.report.swept += 1
                self._request(index, req)
                asked += 1
            index = present.find(0, index + 1 + self.opts.fault_around)

    def _on_faults(self) -> None:
        assert self.fd is not None and self.urgent is not None
        page, base = self.page, self.base
        events = self.fd.read_events(64)
        if self.events_active or any(not isinstance(ev, uffd.PageFault) for ev in events):
            self._on_space_events(None, events)
            return
        for ev in events:
            assert isinstance(ev, uffd.PageFault)  # any other event took the branch above
            index = (ev.address - base) // page
            if not 0 <= index < self.npages:
                raise MigrationError("postcopy", f"fault at {ev.address:#x} outside the region")
            if self.present[index]:
                self.fd.wake(base + index * page, page)  # installed meanwhile: just wake it
                continue
            if self._installable_here(index):
                self.report.local_faults += 1
                self._install_staged(index, LOCAL_AROUND)
                self._maybe_complete()
                continue
            if index in self.pending:
                continue
            req = self.next_request
            self.next_request += 1
            t_ns = time.monotonic_ns()
            self.pending[index] = (req, t_ns, t_ns, True)
            self.report.faults += 1
            self._request(index, req, self._fault_around(index))
            self.report.request_latency.record_ns(time.monotonic_ns() - t_ns)

    # -- region events (docs/region-events.md) ----------------------------------------------

    def _space(self, space: regionevents.ChildSpace | None
               ) -> tuple[uffd.Userfaultfd, regionevents.RegionMap]:
        """The userfaultfd and region view of the guest (None) or of a child it forked."""
        if space is None:
            assert self.fd is not None and self.regmap is not None
            return self.fd, self.regmap
        return space.fd, space.map

    def _on_space_events(self, space: regionevents.ChildSpace | None,
                         events: list[uffd.Event]) -> None:
        """Faults and region events of the guest or of a child, in the order the kernel queued
        them (the layout a fault refers to is the one after the events before it)."""
        _fd, region = self._space(space)
        counts = self.report.events
        for ev in events:
            if isinstance(ev, uffd.PageFault):
                self._space_fault(space, ev)
                continue
            self.events_active = True
            if isinstance(ev, uffd.Remove):
                counts["remove"] += 1
                changed = region.remove(ev.start, ev.end)
                if space is not None:
                    for i in changed:
                        space.got(i)  # zero in the child now: nothing to install there
            elif isinstance(ev, uffd.Unmap):
                counts["unmap"] += 1
                changed = region.unmap(ev.start, ev.end)
                if space is not None:
                    for i in changed:
                        space.got(i)
            elif isinstance(ev, uffd.Remap):
                counts["remap"] += 1
                region.remap(ev.old, ev.new, ev.length)
            elif isinstance(ev, uffd.Fork):
                counts["fork"] += 1
                assert self.fd is not None
                child_fd = uffd.Userfaultfd.adopt(ev.uffd, self.fd.features)
                has = bytes(self.present) if space is None else bytes(space.done)
                child = regionevents.ChildSpace.forked(child_fd, region, has)
                self.children.append(child)
                counts["child_missing"] += child.need
                if self._poller is not None:
                    self._poller.register(child_fd.fileno(), zmq.POLLIN)
                self.daemon.log(f"the guest forked: serving the child's {child.need:,} missing "
                                f"pages too")

    def _space_fault(self, space: regionevents.ChildSpace | None, ev: uffd.PageFault) -> None:
        fd, region = self._space(space)
        page = self.page
        addr = ev.address - ev.address % page
        index = region.index_of(addr)
        if index is None or not region.live(index):
            # Discarded by the guest (zero for it), or memory that is not the region's (the old
            # range of an mremap(MREMAP_DONTUNMAP), a grown mremap): fresh anonymous memory.
            self._zero_fill(space, addr)
            return
        has = self.present[index] if space is None else space.done[index]
        if space is not None:
            self.report.events["child_faults"] += 1
        if has:
            try:
                fd.wake(addr, page)  # installed meanwhile
            except ProcessLookupError:
                if space is None:
                    raise
                self._drop_child(space)
            return
        if index in self.pending:
            return  # asked already: the reply is installed in every space that lacks it
        if space is None:
            self.report.faults += 1
        self._ask(index, fault=space is None)

    def _ask(self, index: int, *, fault: bool) -> None:
        req = self.next_request
        self.next_request += 1
        t_ns = time.monotonic_ns()
        self.pending[index] = (req, t_ns, t_ns, fault)
        self._request(index, req)

    def _drain(self, space: regionevents.ChildSpace | None) -> None:
        """Read (and follow) the events of a space whose layout is changing: the kernel makes
        UFFDIO_COPY fail with EAGAIN until its pending event has been read."""
        fd, _region = self._space(space)
        try:
            events = fd.read_events(64)
        except ProcessLookupError:
            events = []
        if events:
            self._on_space_events(space, events)

    def _drop_child(self, child: regionevents.ChildSpace) -> None:
        """The child exited (ESRCH): nothing more to serve."""
        if child in self.children:
            self.children.remove(child)
            if self._poller is not None:
                self._poller.unregister(child.fd.fileno())
            child.fd.close()

    def _fill(self, space: regionevents.ChildSpace | None, index: int | None, addr: int,
              src: Any) -> bool:
        """UFFDIO_COPY ``src`` (UFFDIO_ZEROPAGE when None) at ``addr`` of a space, following the
        space's events on EAGAIN/ENOENT (its layout is changing). ``index`` is the region page
        (None: not a region page); its address is looked up again after each event. Returns
        False when the page or the child went away meanwhile."""
        fd, region = self._space(space)
        page = self.page
        for _attempt in range(FILL_RETRIES):
            if index is not None:
                if not region.live(index):
                    return False
                where = region.address_of(index)
                if where is None:
                    return False
                addr = where
            try:
                if src is None:
                    fd.zeropage(addr, page)
                else:
                    fd.copy(addr, src)
                return True
            except FileExistsError:
                fd.wake(addr, page)
                return True
            except (BlockingIOError, FileNotFoundError):
                # EAGAIN: an event is in flight; ENOENT: the range went away and its event is
                # about to be queued. Read it, then try again where the page is now.
                self._drain(space)
                time.sleep(FILL_RETRY_SLEEP_S)
            except ProcessLookupError:
                if space is None:
                    raise
                self._drop_child(space)
                return False
        raise MigrationError(self.report.phase,
                             f"could not install page {index} at {addr:#x}: the guest's layout "
                             f"kept changing without an event that explains it")

    def _zero_fill(self, space: regionevents.ChildSpace | None, addr: int) -> None:
        if self._fill(space, None, addr, None):
            self.report.events["zero_filled"] += 1

    def _install_translated(self, msg: protocol.Pages, *, count: bool = True) -> int:
        buf = msg.data.buffer if hasattr(msg.data, "buffer") else memoryview(msg.data)
        return self._install_translated_pages(msg.index_array(), msg.zero, buf, msg.kind,
                                              count=count)

    def _install_translated_pages(self, idx: Any, zero: Any, buf: Any, kind: int, *,
                                  count: bool = True) -> int:
        """Install pages (``buf`` holds the non-zero ones in order) once the guest has changed
        its region: each page at its current address, not in pages the guest discarded or
        unmapped (they still count as arrived, with the hash of what arrived: the source's paused
        copy), and in every forked child still missing it. Returns pages installed in the
        guest."""
        page, present, hashes = self.page, self.present, self.hashes
        assert self.regmap is not None
        ndata = len(idx) - zero.count(1)
        data_hashes = digest.page_hashes(buf[:ndata * page], page) if ndata else array("Q")
        installed = 0
        off = k = 0
        for i, p in enumerate(idx):
            if zero[i]:
                src, h = None, ZERO_PAGE_HASH
            else:
                src, h = buf[off:off + page], data_hashes[k]
                off += page
                k += 1
            if not present[p]:
                present[p] = 1
                self.present_count += 1
                hashes[p] = h
                if self.regmap.live(p) and self._fill(None, p, 0, src):
                    installed += 1
            for child in list(self.children):
                if child.needs(p) and child.map.live(p) and self._fill(child, p, 0, src):
                    child.got(p)
        if count:
            self.report.pages["zero"] += zero.count(1)
            self.report.pages["demand" if kind == Batch.DEMAND else "pushed"] += len(idx)
        return installed

    def _on_pages_translated(self, msg: protocol.Pages) -> None:
        idx = msg.index_array()
        self._install_translated(msg)
        self._replied(idx[0])
        self._resolved(idx)
        self._maybe_complete()

    def _only_discarded_missing(self) -> bool:
        """Every page still to arrive was discarded or unmapped by the guest: no fault will ask
        for them, so they are asked for (their hashes complete the transfer check)."""
        if not self.events_active or self.present_count >= self.npages:
            return False
        assert self.regmap is not None
        present, region = self.present, self.regmap
        i = present.find(0)
        while i >= 0:
            if region.live(i):
                return False
            i = present.find(0, i + 1)
        return True

    def _request_for_children(self) -> None:
        """Every page reached the guest, but a forked child still misses some (its install
        failed, or the pages arrived before the fork while discarded): ask for them before
        COMPLETE, while the source still serves."""
        asked = 0
        for child in self.children:
            i = child.first_needed()
            while i >= 0 and asked < SWEEP_PAGES:
                if i not in self.pending:
                    self._ask(i, fault=False)
                    asked += 1
                i = child.first_needed(i + 1)

    def _check_guest_events(self) -> bool:
        """The guest's own account of the region event it performed here; a child it forked
        must have seen the region the reference run had at the fork."""
        assert self.guest_done is not None and self.guest is not None
        if self.guest.events:
            self.report.events["guest"] = [{k: e.get(k) for k in ("event", "child_digest")}
                                           for e in self.guest.events]
        child = self.guest_done.get("child_digest")
        if child is None or not self.opts.verify_reference:
            return True
        self.report.events["child_digest"] = child
        self.report.events["child_reference_digest"] = self.reference_child
        return child == self.reference_child

    def _on_urgent(self, msg: protocol.Message) -> None:
        t = msg.TYPE
        if t == MsgType.PAGES:
            assert isinstance(msg, protocol.Pages)
            idx = msg.index_array()
            first = idx[0]
            if self.events_active:
                self._on_pages_translated(msg)
                return
            if msg.kind == Batch.DEMAND and not self.present[first]:
                self._install_first(msg, first)  # wake the faulting guest before anything else
            self._replied(first)
            if len(idx) > 1 or msg.kind != Batch.DEMAND:
                self.install(msg, wake=True)
            else:
                self.report.pages["demand"] += 1
                self.report.pages["zero"] += msg.zero[0]
            self._maybe_complete()
        elif t == MsgType.SWITCHOVER:
            assert isinstance(msg, protocol.Switchover)
            self._switchover(msg)
        elif t == MsgType.STALE:
            assert isinstance(msg, protocol.Stale)
            if self.staging is not None and not self.staging.stale_known:
                self.report.pages["discarded"] = self.staging.drop(msg.page_array())
                self.staging.stale_known = True
        elif t == MsgType.VERIFIED:
            assert isinstance(msg, protocol.Verified)
            if not self.report.source_digest:
                self.report.source_digest = msg.source_digest
                self.report.transfer_ok = (msg.match
                                           and msg.source_digest == self.report.received_digest)
                self._finish_if_done()
        elif t == MsgType.SNAPSHOTTED:
            assert isinstance(msg, protocol.Snapshotted)
            self.snapshot_digest = msg.digest
            self.report.snapshot = True
        elif t == MsgType.RESUME:
            assert isinstance(msg, protocol.Resume)
            if msg.session != self.hello.session:
                raise ProtocolError("RESUME names another session")
            self.waiting_for_resume = False
            self.report.source_restarts += 1
            self.daemon.log("a source resumed the session from its snapshot")
            assert self.urgent is not None
            transport.send_frames(self.urgent, self.conn.send(
                protocol.ResumeAck(self.npages, bytes(self.present))))
            now_ns = time.monotonic_ns()
            if self.fast is not None:
                self.fast.retry(now_ns, 0)  # asked of the old source: ask the new one
            for index, (req, first_ns, _sent, fault) in list(self.pending.items()):
                self.pending[index] = (req, first_ns, now_ns, fault)
                self._request(index, req)  # asked of the old source: ask the new one
            if self.completed_sent and not self.report.source_digest:
                self._send_complete()
        elif t == MsgType.ERROR:
            assert isinstance(msg, protocol.Error)
            raise MigrationError(msg.phase, f"the source reported: {msg.message}")
        elif t == MsgType.BYE:
            if self.report_sent_at:
                self.finished = True
            else:
                raise MigrationError(self.report.phase, "the source hung up")

    def _on_bulk(self, msg: protocol.Message) -> None:
        assert self.bulk is not None
        t = msg.TYPE
        if t == MsgType.PAGES:
            assert isinstance(msg, protocol.Pages)
            if msg.kind == Batch.PUSH:
                self.pushed_messages += 1
            self.install(msg, wake=self.report.phase == "postcopy")
            self.bulk_seq = msg.seq
            self._send(self.bulk, protocol.Ack(msg.seq))
            self._maybe_complete()
        elif t == MsgType.ROUND_END:
            assert isinstance(msg, protocol.RoundEnd)
            self.bulk_seq = msg.seq
        elif t == MsgType.PUSH_DONE:
            assert isinstance(msg, protocol.PushDone)
            self.bulk_seq = msg.seq
            self.push_done = True
            self._maybe_complete()
            if self.present_count < self.npages and self.report.phase == "postcopy":
                self._sweep_missing()  # every page was sent once: what is missing was lost

    def _switchover(self, msg: protocol.Switchover) -> None:
        """Take everything sent before the pause, let the guest run here."""
        assert self.guest is not None and self.bulk is not None
        t0 = time.monotonic_ns()
        self.report.phase = "switchover"
        while self.bulk_seq < msg.bulk_seq:
            if not self.bulk.poll(int(self.opts.peer_timeout_s * 1000)):
                raise MigrationError("switchover", "bulk pages named by SWITCHOVER never came")
            self._on_bulk(self.conn.receive(transport.recv_frames(self.bulk)))
        if self.staging is not None:
            # A SWITCHOVER may name stale pages itself; pre-copy mode sent the last ones while
            # the source was paused, so everything staged is current and may go in now.
            self.report.pages["discarded"] = self.staging.drop(msg.discard_array())
            if self.report.mode == "precopy":
                self.staging.stale_known = True
        self.guest.go()
        reply = self.guest.receive(timeout=self.opts.peer_timeout_s)
        if reply["type"] != "running":
            raise GuestError(f"guest answered {reply['type']} to go")
        self.report.resume_ns = time.monotonic_ns() - t0
        self.report.phase = "postcopy"
        self.postcopy_start = time.monotonic()
        assert self.urgent is not None
        self._send(self.urgent, protocol.Resumed(self.report.resume_ns))
        staged = self.staging.remaining() if self.staging is not None else 0
        self.daemon.log(f"guest {self.guest.pid} runs here now ({staged:,} of {self.npages:,} "
                        f"pages staged here, the rest at the source)")
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if (self.completed_sent or self.present_count < self.npages
                or self.report.phase != "postcopy"):
            return
        if any(child.need for child in self.children):
            return  # the source must still serve a forked child's missing pages
        assert self.urgent is not None
        self.report.postcopy_s = time.monotonic() - self.postcopy_start
        self.report.received_digest = digest.digest_of_hashes(self.hashes)
        self.completed_sent = True
        self.report.phase = "verify"
        self._send_complete()

    def _send_complete(self) -> None:
        assert self.urgent is not None
        self.complete_at = time.monotonic()
        self._send(self.urgent, protocol.Complete(self.npages, self.report.received_digest,
                                                  self.hashes.tobytes()))

    def _compute_reference(self) -> None:
        from migrate import workloads

        w = self.report.workload
        try:
            if w.get("event"):
                self.reference_result, self.reference_child = regionevents.reference_run(
                    w["name"], w["size"], w["seed"], w["ops"], w["event"])
                return
            self.reference_result = workloads.reference_digest(
                w["name"], w["size"], seed=w["seed"], ops=w["ops"])
        except Exception as exc:  # reported by the session loop as a verify failure
            self.reference_result = exc

    def _finish_if_done(self) -> None:
        """Once the transfer is verified and the guest has finished: final digests, REPORT
        (repeated until the source says BYE, a few times at most)."""
        if self.guest_done is None or not self.report.source_digest or self.report_sent_at:
            return
        assert self.urgent is not None
        self.report.digest = self.guest_done["digest"]
        self.report.guest_ops = self.guest_done["ops"]
        if self.opts.verify_reference:
            # The reference run can take seconds (it is the whole workload, unless cached): it
            # runs in a thread (the C workload releases the GIL) while this loop keeps pinging.
            if self.reference_thread is None:
                self.reference_thread = threading.Thread(target=self._compute_reference,
                                                         name="reference-run", daemon=True)
                self.reference_thread.start()
                return
            if self.reference_thread.is_alive():
                return
            if isinstance(self.reference_result, BaseException):
                raise MigrationError("verify", f"the reference run failed: "
                                               f"{self.reference_result}")
            self.report.reference_digest = str(self.reference_result)
            reference_ok = self.report.digest == self.report.reference_digest
        else:
            reference_ok = True
        child_ok = self._check_guest_events()
        self.report.ok = self.report.transfer_ok and reference_ok and child_ok
        if not self.report.transfer_ok:
            self.report.error = "the pages received differ from the source's copy"
        elif not reference_ok:
            self.report.error = "the guest's final region differs from the reference run's"
        elif not child_ok:
            self.report.error = ("the region a child forked here saw differs from the reference "
                                 "run's region at the fork")
        self.report.phase = "done"
        self._send(self.urgent, protocol.Report(self.report.as_dict()))
        self.report_sent_at = time.monotonic()


class DestDaemon:
    """Accepts migrations on ``opts.listen`` until stopped (or ``max_migrations`` are done)."""

    def __init__(self, opts: DestOptions) -> None:
        self.opts = opts
        if opts.cpu is not None:
            os.sched_setaffinity(0, {opts.cpu})
        self.ctx = transport.make_context(opts.cpu)
        self.router = transport.listen(self.ctx, opts.listen, opts.keys,
                                       allowed=opts.allowed_clients, log=self.log)
        self.endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._reply_lock = threading.Lock()
        self._stop = threading.Event()
        # The latest reports (a daemon that serves forever must not grow without bound) and a
        # count of every failure, for the exit status.
        self.reports: collections.deque[dict[str, Any]] = collections.deque(maxlen=REPORT_HISTORY)
        self.failures = 0
        self.sessions: list[threading.Thread] = []
        self.reserve: fastpath.Reserve | None = None
        self._reserve_thread: threading.Thread | None = None
        if opts.reserve:
            self._refill_reserve()

    def _refill_reserve(self) -> None:
        """A new reserve of ``opts.reserve`` bytes, faulted in by a background thread (the
        daemon listens meanwhile; a migration that starts early uses what is filled so far)."""
        self._close_reserve()
        self.reserve = reserve = fastpath.Reserve(self.opts.reserve)

        def fill() -> None:
            started = time.monotonic()
            reserve.fill()
            if reserve.error is not None:
                self.log(f"reserve: {reserve.error}")
            else:
                self.log(f"reserve: {reserve.size >> 20} MiB faulted in "
                         f"({time.monotonic() - started:.1f} s)")

        self._reserve_thread = threading.Thread(target=fill, name="reserve-fill", daemon=True)
        self._reserve_thread.start()

    def _close_reserve(self) -> None:
        """Give the reserve back; its fill thread stops at the next chunk and is awaited (it
        writes into the reserve's state)."""
        if self.reserve is not None:
            self.reserve.give_back()
            if self._reserve_thread is not None:
                self._reserve_thread.join()
            self.reserve.close()
            self.reserve = None

    def _reserve_for(self) -> fastpath.Reserve | None:
        """The reserve a new session may draw from; a used one is replaced once no migration
        is in progress (its memory was given back to the guests that arrived)."""
        if self.reserve is not None and self.reserve.depleted and not self.sessions:
            self._refill_reserve()
        return self.reserve

    def log(self, text: str) -> None:
        if not self.opts.quiet:
            print(f"[dest] {text}", file=sys.stderr, flush=True)

    def reply(self, router_id: bytes, frames: list[Any]) -> None:
        with self._reply_lock:
            self.router.send_multipart([router_id, *frames])

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> list[dict[str, Any]]:
        self.log(f"listening on {self.endpoint}")
        started = 0
        try:
            while not self._stop.is_set():
                if self.opts.max_migrations is not None and started >= self.opts.max_migrations:
                    break
                if not self.router.poll(200):
                    continue
                with self._reply_lock:
                    frames = self.router.recv_multipart(copy=False)
                router_id = frames[0].bytes
                region_bytes = self._admissible(router_id, frames[1:])
                if not region_bytes:
                    continue  # malformed, replayed or too big: not a migration, not counted
                session = DestSession(self, router_id, frames[1:], self._reserve_for())
                thread = threading.Thread(target=self._run_session, args=(session,),
                                          name="dest-session", daemon=True)
                thread.region_bytes = region_bytes  # type: ignore[attr-defined]
                started += 1
                thread.start()
                self.sessions.append(thread)
            for thread in self.sessions:
                thread.join()
        finally:
            self._close_reserve()
            self.router.close(linger=0)
            self.ctx.term()
        return list(self.reports)

    def _admissible(self, router_id: bytes, frames: list[Any]) -> int:
        """Only a valid first HELLO with a new session id starts a session; returns its region's
        size, or 0. Anything else on the listen port (garbage, a replayed HELLO) is dropped here
        with a rate-limited log line, so a flood neither spawns threads and guests nor counts
        towards --count. Garbage gets no answer: replying to a peer that never reads would block
        this loop once its queue is full. A valid HELLO beyond max_sessions migrations in
        progress, or whose region would not fit in this host's memory beside theirs, gets a
        REFUSE (never blocking)."""
        from migrate import keys as keyfiles

        if not hasattr(self, "_seen_sessions"):
            self._seen_sessions: dict[bytes, None] = {}
            self._drop_log = keyfiles.RateLimitedLog(self.log)
        try:
            hello = protocol.Connection(protocol.Side.DEST).receive(frames)
        except ProtocolError as exc:
            self._drop_log(f"dropped a message on the listen port: {exc}")
            return 0
        assert isinstance(hello, protocol.Hello)
        if hello.session in self._seen_sessions:
            self._drop_log(f"dropped a replayed HELLO of session {hello.session.hex()}")
            return 0
        self._seen_sessions[hello.session] = None
        if len(self._seen_sessions) > 4096:  # bounded: forget the oldest
            del self._seen_sessions[next(iter(self._seen_sessions))]
        size = hello.npages * hello.page_size
        self.sessions = [t for t in self.sessions if t.is_alive()]  # finished: nothing to join
        committed = sum(getattr(t, "region_bytes", 0) for t in self.sessions)
        reason = None
        if len(self.sessions) >= self.opts.max_sessions:
            reason = f"busy: {len(self.sessions)} migrations in progress here (the limit)"
        elif committed + size > psutil.virtual_memory().total:
            reason = (f"a region of {size} bytes does not fit in this host's memory beside the "
                      f"{committed} bytes of the migrations in progress")
        if reason is not None:
            self._drop_log(f"refused migration: {reason}")
            try:
                with self._reply_lock:
                    self.router.send_multipart(
                        [router_id, *protocol.encode(protocol.Refuse(hello.session, reason))],
                        flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the peer is gone or not reading: it gets no answer
            return 0
        return size

    def _run_session(self, session: DestSession) -> None:
        report = session.run().as_dict()
        self.reports.append(report)
        if not report["ok"]:
            self.failures += 1
        w = report["workload"]
        self.log(f"migration of {w.get('name')} {w.get('size')} bytes: "
                 f"{'ok' if report['ok'] else 'FAILED: ' + str(report['error'])}")
        if self.opts.json_reports:
            print(json.dumps(report), flush=True)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default="tcp://127.0.0.1:7070",
                        help="ZeroMQ endpoint to accept migrations on (tcp://HOST:PORT)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the daemon (and its guests)")
    parser.add_argument("--count", type=int, default=None,
                        help="exit after this many migrations (default: serve forever)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference run the final digest is compared with")
    parser.add_argument("--json", action="store_true", help="print each migration's report as JSON")
    parser.add_argument("--ready-file", default=None,
                        help="write the bound endpoint to this file once listening")
    parser.add_argument("--quiet", action="store_true", help="no log lines on stderr")
    parser.add_argument("--advertise", default=None, metavar="HOST",
                        help="address sources reach this host at; needed when --listen binds "
                             "every address (tcp://*:PORT or tcp://0.0.0.0:PORT)")
    parser.add_argument("--peer-timeout", type=float, default=DEFAULT_PEER_TIMEOUT_S,
                        metavar="SECONDS",
                        help="a source silent this long is gone (default %(default)s s)")
    parser.add_argument("--resume-timeout", type=float, default=DEFAULT_RESUME_TIMEOUT_S,
                        metavar="SECONDS",
                        help="after that, how long to wait for a source to resume from its "
                             "snapshot, if it announced one (default %(default)s s)")
    parser.add_argument("--reserve", default=None, metavar="SIZE",
                        help="fault this much memory in ahead of time (e.g. 1G) and give it back "
                             "just before incoming pages need it: on a host whose free memory "
                             "is cold (a VM with free page reporting) installs then run at "
                             "memory speed; the memory is held while no migration runs")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="serve post-copy faults from the Python loop instead of the C one "
                             "(for comparison and diagnosis)")
    parser.add_argument("--max-sessions", type=int, default=DestOptions.max_sessions,
                        help="migrations in progress at once; further HELLOs are refused")
    parser.add_argument("--key", default=None,
                        help="this daemon's CURVE secret key file (NAME.key from migrate keygen); "
                             "required unless --listen is on loopback")
    parser.add_argument("--allow", action="append", default=[], metavar="PUBKEY",
                        help="a source public key allowed to connect: a .key_public file, a "
                             "directory of them, or a z85 key (repeatable; needed with --key)")


def run(args: argparse.Namespace) -> int:
    from migrate import keys as keyfiles
    from migrate import workloads

    try:
        reserve = workloads.parse_size(args.reserve) if args.reserve else 0
        curve, allowed = None, None
        if args.key is not None:
            pair = keyfiles.load_secret(args.key)
            curve = transport.CurveKeys(pair.public, pair.secret)
            allowed = sorted(keyfiles.load_allowed(args.allow))
        elif args.allow:
            raise keyfiles.KeyFileError("--allow needs --key (this daemon's own key pair)")
        transport.require_keys_off_loopback(args.listen, curve, "listen on")
        if transport.host_of(args.listen) in transport.WILDCARD_HOSTS and not args.advertise:
            raise ValueError(f"--listen {args.listen} binds every address: say which one sources "
                             f"reach this host at with --advertise HOST")
    except (keyfiles.KeyFileError, ValueError) as exc:
        print(f"migrate dest: {exc}", file=sys.stderr)
        return 2
    opts = DestOptions(listen=args.listen, cpu=args.cpu, max_migrations=args.count,
                       verify_reference=not args.no_reference, json_reports=args.json,
                       quiet=args.quiet, keys=curve, allowed_clients=allowed,
                       peer_timeout_s=args.peer_timeout, resume_timeout_s=args.resume_timeout,
                       max_sessions=args.max_sessions, advertise=args.advertise,
                       fast_path=not args.no_fast_path,
                       reserve=reserve)
    daemon = DestDaemon(opts)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(daemon.endpoint)
        os.replace(tmp, args.ready_file)
    daemon.serve()
    return 0 if daemon.failures == 0 else 1
