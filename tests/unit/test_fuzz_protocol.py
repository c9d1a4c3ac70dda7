"""Hostile input for the wire protocol: hypothesis strategies, mutations of real recorded traffic.

Every input must end in one of two ways: a validated message, or a ``ProtocolError`` (never another
exception, never a hang). Accepted messages are checked further: they re-encode to frames that
decode to the same message, and page batches only name pages inside the region with a data frame
of exactly the right length, so "accepted" means "safe to act on".

The recorded traffic comes from a real migration between the real daemons (``transport.send_frames``
wrapped while it runs). Without userfaultfd here, an equivalent session scripted with ``encode`` is
used instead, so the mutation test still runs (and says so in its output).
"""

from __future__ import annotations

import copy
import random
from array import array
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrate import protocol as p
from migrate.errors import ProtocolError

MIB = 1 << 20
MUTATION_INPUTS = 100_000
SEED = 0x5EC0


@dataclass
class Sent:
    sender: p.Side
    channel: str  # "control", "urgent" or "bulk"
    frames: list[bytes]


# ---------------------------------------------------------------------------------------------
# Recording real traffic


def _migration_features_missing() -> str | None:
    from migrate.check import capabilities

    caps = capabilities()
    u = caps.get("userfaultfd") or {}
    if not u.get("available"):
        return f"userfaultfd unavailable: {u.get('error')}"
    missing = [f for f in ("WP_ASYNC", "WP_UNPOPULATED") if not u["features_supported"].get(f)]
    if missing or not caps.get("pagemap_scan"):
        return f"no dirty tracking here ({missing or 'PAGEMAP_SCAN'})"
    return None


def record_migration(**source_opts: Any) -> list[Sent]:
    """Run one real migration in this process and return every message both daemons sent, in
    the order they were sent (the destination's WELCOME, sent on its ROUTER, included)."""
    from migrate import dest, source, transport

    log: list[tuple[str, Any, list[bytes]]] = []
    lock = threading.Lock()
    original = transport.send_frames

    def recording(sock: Any, frames: Any, *, flags: int = 0) -> None:
        copied = [bytes(f.buffer if hasattr(f, "buffer") else f) for f in frames]
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        with lock:
            log.append((threading.current_thread().name, endpoint, copied))
        original(sock, frames, flags=flags)

    # The Python loops on both sides: the C fast path sends PAGES, REQUESTs and ACKs itself, not
    # through transport.send_frames (its bytes are msgpack-python's, test_fastpath_wire.py).
    daemon = dest.DestDaemon(dest.DestOptions(listen="tcp://127.0.0.1:*", max_migrations=1,
                                              quiet=True, peer_timeout_s=20, fast_path=False))
    original_reply = daemon.reply

    def recording_reply(router_id: bytes, frames: list[Any]) -> None:
        with lock:
            log.append(("dest-session", "control", [bytes(f) for f in frames]))
        original_reply(router_id, frames)

    daemon.reply = recording_reply  # type: ignore[method-assign]
    transport.send_frames = recording  # type: ignore[assignment]
    try:
        server = threading.Thread(target=daemon.serve, daemon=True)
        server.start()
        migration = source.SourceMigration(source.SourceOptions(
            to=daemon.endpoint, progress=False, peer_timeout_s=20, fast_path=False,
            **source_opts))
        report = migration.run()
        server.join(60)
    finally:
        transport.send_frames = original  # type: ignore[assignment]
    assert report["ok"], report.get("error")
    welcome = migration.conn.welcome
    assert welcome is not None
    out = []
    for thread, endpoint, frames in log:
        sender = p.Side.DEST if thread == "dest-session" else p.Side.SOURCE
        channel = ("control" if endpoint in ("control", daemon.endpoint) else
                   "urgent" if endpoint == welcome.urgent_endpoint else "bulk")
        out.append(Sent(sender, channel, frames))
    return out


def scripted_traffic() -> list[Sent]:
    """A whole migration's messages built with encode(): the stand-in without userfaultfd."""
    npages, page = 64, 4096
    session = bytes(range(16))
    S, D = p.Side.SOURCE, p.Side.DEST
    msgs: list[tuple[p.Side, str, p.Message]] = [
        (S, "control", p.Hello(1, session, page, npages, "anon", "hybrid",
                               {"name": "kv", "size": npages * page, "seed": 0, "ops": 10},
                               ["fault-around", "zero-flag", "discard"], "xxh64")),
        (D, "control", p.Welcome(1, session, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
                                 ["fault-around", "zero-flag"])),
    ]
    for seq, first in enumerate(range(0, npages, 16), start=1):
        zero = [i % 3 == 0 for i in range(16)]
        data = b"".join(bytes([first + i]) * page for i in range(16) if not zero[i])
        msgs.append((S, "bulk", p.Pages.build(seq, p.Batch.PRECOPY, range(first, first + 16),
                                              zero, data, round=1)))
        msgs.append((D, "bulk", p.Ack(seq)))
    msgs += [
        (S, "bulk", p.RoundEnd(1, 4, npages, 3)),
        (S, "urgent", p.Switchover(4, array("I", [1, 2, 3]).tobytes(), 5, 1000)),
        (D, "urgent", p.Resumed(2000)),
        (D, "urgent", p.Request(1, 2, 8)),
        (S, "urgent", p.Pages.build(5, p.Batch.DEMAND, [2], [0], b"\x07" * page, request=1)),
        (S, "urgent", p.Pages.build(6, p.Batch.DEMAND, [3], [1], b"", request=1)),
        (S, "bulk", p.Pages.build(7, p.Batch.PUSH, [1], [0], b"\x08" * page)),
        (D, "bulk", p.Ack(7)),
        (S, "bulk", p.PushDone(7, npages)),
        (D, "urgent", p.Complete(npages, "xxh64:00", bytes(8 * npages))),
        (S, "urgent", p.Verified("xxh64:00", True)),
        (D, "urgent", p.Report({"ok": True, "digest": "x"})),
        (S, "urgent", p.Bye("done")),
    ]
    return [Sent(side, ch, [bytes(f) for f in p.encode(m)]) for side, ch, m in msgs]


@pytest.fixture(scope="module")
def traffic() -> list[Sent]:
    missing = _migration_features_missing()
    if missing is not None:
        print(f"recorded traffic unavailable ({missing}); fuzzing a scripted session")
        return scripted_traffic()
    # Hybrid with a guest still running at switchover: pre-copy rounds, a discard list, demand
    # faults and their replies, background push, completion: every message type of a migration.
    return record_migration(workload="chase", memory=16 * MIB, mode="hybrid", after_s=0.1,
                            ops=3_000_000)


# ---------------------------------------------------------------------------------------------
# Checking one input


def _view(frame: Any) -> bytes:
    return bytes(frame.buffer if hasattr(frame, "buffer") else frame)


def check_accepted(msg: p.Message, limits: p.Limits) -> None:
    """What acceptance promises: the message re-encodes and decodes to itself, and a page batch
    is safe to install."""
    assert isinstance(msg, p.Message)
    again = p.decode(p.encode(msg), limits)
    assert again == msg
    if isinstance(msg, p.Pages):
        idx = msg.index_array()
        assert 0 < len(idx) <= limits.max_pages_per_batch
        assert max(idx) < limits.npages
        nonzero = len(idx) - msg.zero.count(1)
        assert len(_view(msg.data)) == nonzero * limits.page_size
        assert set(msg.zero) <= {0, 1}
    if isinstance(msg, p.Switchover) and msg.discard:
        assert max(msg.discard_array()) < limits.npages
    for name, (kind, arg) in msg._schema.items():
        value = getattr(msg, name)
        if kind == "uint":
            assert type(value) is int and 0 <= value <= arg, (name, value)
        if kind in ("choice", "page_size"):
            assert type(value) in (int, str), (name, value)


def feed(target: Callable[[list[Any]], p.Message], frames: list[Any], limits: p.Limits,
         outcome: dict[str, int]) -> None:
    try:
        msg = target(frames)
    except ProtocolError as exc:
        assert str(exc), "a ProtocolError must say what was wrong"
        outcome["rejected"] += 1
        return
    outcome["accepted"] += 1
    check_accepted(msg, limits)


# ---------------------------------------------------------------------------------------------
# Mutations of recorded messages

INTERESTING = [0, 1, -1, 2**16, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64, -(2**63), 4096.0, 1.5,
               True, False, None, "", "x" * 5000, "tcp://", b"", b"\x00" * 16, b"\xff" * 17,
               [], [1, 2], {}, {"a": 1}, {1: 2}, msgpack.ExtType(5, b"xy"), "anon", "hybrid",
               4096, 2 << 20, 1 << 30]


HUGE_HEADER = b"\x00" * (p.MAX_HEADER_BYTES + 1)


def _raw_header(frames: list[bytes]) -> list[Any] | None:
    try:
        raw = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    except Exception:
        return None
    return raw if isinstance(raw, list) else None


def _pack(raw: list[Any], fallback: bytes) -> bytes:
    try:
        return msgpack.packb(raw, use_bin_type=True)
    except (OverflowError, ValueError):  # e.g. 2**64 has no msgpack encoding: keep the original
        return fallback


def mutate(rng: random.Random, frames: list[Any], corpus: list[Sent]) -> list[Any]:
    frames = list(frames)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not frames:
            frames = [b""]
        op = rng.randrange(13)
        head = bytearray(frames[0]) if frames else bytearray()
        if op == 0 and head:  # flip a few bits of the header
            for _ in range(rng.randint(1, 4)):
                head[rng.randrange(len(head))] ^= 1 << rng.randrange(8)
            frames[0] = bytes(head)
        elif op == 1 and head:  # truncate the header
            frames[0] = bytes(head[:rng.randrange(len(head))])
        elif op == 2:  # garbage appended to the header
            frames[0] = bytes(head) + rng.randbytes(rng.randint(1, 16))
        elif op == 3:  # splice: this header's start, another's end
            other = rng.choice(corpus).frames[0]
            cut_a, cut_b = rng.randint(0, len(head)), rng.randint(0, len(other))
            frames[0] = bytes(head[:cut_a]) + other[cut_b:]
        elif op == 4:  # change the message type
            raw = _raw_header(frames)
            if raw:
                raw[0] = rng.choice([*range(0, 20), -1, 2**40, "4", None])
                frames[0] = _pack(raw, frames[0])
        elif op in (5, 6, 7):  # one field replaced by an awkward value
            raw = _raw_header(frames)
            if raw and len(raw) > 1:
                i = rng.randrange(1, len(raw))
                if op == 7 and isinstance(raw[i], int) and not isinstance(raw[i], bool):
                    raw[i] += rng.choice((-1, 1, 2**32, -(2**32)))
                elif op == 6 and isinstance(raw[i], bytes) and raw[i]:
                    b = bytearray(raw[i])
                    b[rng.randrange(len(b))] ^= 0xFF  # e.g. a page index pushed out of range
                    if rng.random() < 0.3:
                        b = b[:rng.randrange(len(b))]
                    raw[i] = bytes(b)
                else:
                    raw[i] = rng.choice(INTERESTING)
                frames[0] = _pack(raw, frames[0])
        elif op == 8:  # add or drop a field
            raw = _raw_header(frames)
            if raw:
                if rng.random() < 0.5 and len(raw) > 1:
                    del raw[rng.randrange(1, len(raw))]
                else:
                    raw.insert(rng.randrange(1, len(raw) + 1), rng.choice(INTERESTING))
                frames[0] = _pack(raw, frames[0])
        elif op == 9 and len(frames) > 1:  # data frame shortened or lengthened
            data = memoryview(frames[1])
            frames[1] = data[:rng.randrange(len(data))] if len(data) and rng.random() < 0.7 \
                else bytes(data[:8192]) + b"\x00" * rng.choice((1, 4095, 4096))
        elif op == 10:  # frames dropped, duplicated or added
            choice = rng.randrange(3)
            if choice == 0 and frames:
                del frames[rng.randrange(len(frames))]
            elif choice == 1 and frames:
                frames.append(frames[rng.randrange(len(frames))])
            else:
                frames.insert(rng.randint(0, len(frames)), rng.randbytes(rng.randint(0, 64)))
        elif op == 11:  # a header from another message with this message's data (or none)
            frames[0:1] = [rng.choice(corpus).frames[0]]
        else:  # a header that is not msgpack at all, or a huge one
            frames[0] = rng.choice([b"", b"\xc1", b"\xdd\xff\xff\xff\xff", rng.randbytes(32),
                                    b"\x91" * 200 + b"\x01", HUGE_HEADER])
    return frames


def _snapshots(traffic: list[Sent], side: p.Side) -> list[p.Connection]:
    """The ``side`` connection after each prefix of the real traffic (index k: k messages)."""
    conn = p.Connection(side)
    out = [copy.copy(conn)]
    for sent in traffic:
        frames = sent.frames
        if sent.sender is side:
            conn._advance(side, p.decode(frames, conn.limits))
        else:
            conn.receive(frames)
        out.append(copy.copy(conn))
    return out


def test_recorded_traffic_replays_cleanly(traffic: list[Sent]) -> None:
    """The corpus itself is valid from both points of view and covers the whole lifecycle."""
    for side in p.Side:
        assert _snapshots(traffic, side)[-1].state is p.State.DONE
    limits = _snapshots(traffic, p.Side.DEST)[1].limits
    types = {p.decode(s.frames, limits).TYPE for s in traffic}
    assert {p.MsgType.PAGES, p.MsgType.ACK, p.MsgType.SWITCHOVER, p.MsgType.RESUMED,
            p.MsgType.COMPLETE, p.MsgType.VERIFIED, p.MsgType.REPORT} <= types


def test_mutated_recorded_traffic_is_rejected_cleanly(traffic: list[Sent]) -> None:
    """MUTATION_INPUTS mutated real messages through decode and through a Connection at a random
    point of the real session (from the receiver's side): out-of-order replays of real messages
    included. Deterministic (fixed seed); prints how many were accepted."""
    rng = random.Random(SEED)
    snaps = {side: _snapshots(traffic, side) for side in p.Side}
    limits = snaps[p.Side.DEST][2].limits  # the region as the handshake set it
    outcome = {"accepted": 0, "rejected": 0}
    t0 = time.perf_counter()
    for n in range(MUTATION_INPUTS):
        k = rng.randrange(len(traffic))
        sent = traffic[k]
        receiver = sent.sender.peer
        if n % 10 == 9:  # a real message replayed at another point of the session, unmutated
            frames = list(sent.frames)
            k = rng.randrange(len(traffic))
            receiver = rng.choice(list(p.Side))
        else:
            frames = mutate(rng, sent.frames, traffic)
        if n % 2:
            feed(lambda f: p.decode(f, limits), frames, limits, outcome)
        else:
            conn = copy.copy(snaps[receiver][k])
            feed(conn.receive, frames, conn.limits, outcome)
            if conn.state is not p.State.FAILED:  # a second message on the same connection
                feed(conn.receive, mutate(rng, rng.choice(traffic).frames, traffic),
                     conn.limits, outcome)
    elapsed = time.perf_counter() - t0
    print(f"{MUTATION_INPUTS} mutated inputs in {elapsed:.1f} s: {outcome}")
    assert outcome["accepted"] + outcome["rejected"] >= MUTATION_INPUTS
    assert outcome["rejected"] > MUTATION_INPUTS // 2  # the mutations really are hostile


# ---------------------------------------------------------------------------------------------
# Hypothesis: arbitrary headers, and well-formed messages with one field gone wrong

NPAGES = 1024
LIMITS = p.Limits(npages=NPAGES, page_size=4096)

scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.binary(max_size=40))
msgpack_values = (scalars | st.lists(scalars, max_size=4)
                  | st.dictionaries(st.text(max_size=8), scalars, max_size=4))


@settings(max_examples=1500, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(code=st.integers(0, 18), fields=st.lists(msgpack_values, max_size=10),
       data=st.none() | st.binary(max_size=64) | st.sampled_from([bytes(4096), bytes(8192)]))
def test_arbitrary_headers_are_rejected_or_valid(code: int, fields: list[Any],
                                                 data: bytes | None) -> None:
    frames: list[Any] = [msgpack.packb([code, *fields], use_bin_type=True)]
    if data is not None:
        frames.append(data)
    feed(lambda f: p.decode(f, LIMITS), frames, LIMITS, {"accepted": 0, "rejected": 0})


@settings(max_examples=3000, derandomize=True, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_rejected_or_valid(raw: bytes) -> None:
    feed(lambda f: p.decode(f, LIMITS), [raw], LIMITS, {"accepted": 0, "rejected": 0})


BIG_ZERO = memoryview(bytes(14 * 4096 + 4096))


@st.composite
def page_batches(draw: st.DrawFn) -> list[Any]:
    n = draw(st.integers(0, 12))
    indexes = draw(st.lists(st.integers(0, 2 * NPAGES), min_size=n, max_size=n))
    zero = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    nonzero = draw(st.integers(0, n + 1))
    extra = draw(st.sampled_from([0, 0, 0, 1, -1, 4096]))
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, -1]))
    request = draw(st.sampled_from([0, 1, 2**64 - 1]))
    header = msgpack.packb([int(p.MsgType.PAGES), draw(st.integers(0, 2**64 - 1)), kind, request,
                            draw(st.integers(0, 2**16)), array("I", indexes).tobytes(),
                            bytes(zero)], use_bin_type=True)
    return [header, BIG_ZERO[:max(0, nonzero * 4096 + extra)]]


@settings(max_examples=2000, derandomize=True, deadline=None)
@given(frames=page_batches())
def test_page_batches_name_only_pages_inside_the_region(frames: list[Any]) -> None:
    feed(lambda f: p.decode(f, LIMITS), frames, LIMITS, {"accepted": 0, "rejected": 0})


@settings(max_examples=3000, derandomize=True, deadline=None)
@given(page_size=st.sampled_from([4096, 4096.0, 2 << 20, 12345, True, "4096"]),
       npages=st.integers(0, 2**33), size=st.integers(-1, 2**45), version=st.integers(0, 3),
       name=st.text(max_size=70), extra_key=st.booleans(), consistent=st.booleans())
def test_hellos_set_limits_only_when_consistent(page_size: Any, npages: int, size: int,
                                                version: int, name: str, extra_key: bool,
                                                consistent: bool) -> None:
    if consistent and isinstance(page_size, int | float):
        size = int(npages * page_size)  # sizes agree: only the types can be wrong
    workload = {"name": name, "size": size, "seed": 0, "ops": 0}
    if extra_key:
        workload["evil"] = 1
    header = msgpack.packb([1, version, bytes(16), page_size, npages, "anon", "postcopy",
                            workload, [], "d"], use_bin_type=True)
    conn = p.Connection(p.Side.DEST)
    try:
        hello = conn.receive([header])
    except ProtocolError:
        assert conn.state is p.State.FAILED
        return
    assert isinstance(hello, p.Hello)
    assert type(hello.page_size) is int and hello.page_size in p.PAGE_SIZES
    assert hello.version == p.PROTOCOL_VERSION and 0 < hello.npages < 2**32
    assert hello.npages * hello.page_size == hello.workload["size"]
    assert conn.limits.npages == hello.npages and conn.state is p.State.NEGOTIATING


# ---------------------------------------------------------------------------------------------
# The destination's message handlers, on a real session (guest process, uffd, sockets)

HANDLER_INPUTS = 5000  # per phase (pre-copy, post-copy)


@pytest.mark.host
def test_destination_handlers_survive_mutated_traffic(traffic: list[Sent]) -> None:
    """Mutated source messages go through a real DestSession's receive and handlers, before and
    after a real switchover: each ends handled or in one of the errors the session loop reports
    cleanly (MigrateError, OSError, ZMQError); never another exception, never a hang."""
    missing = _migration_features_missing()
    if missing is not None:
        pytest.skip(missing)
    from migrate import dest
    from migrate.errors import MigrateError

    daemon = dest.DestDaemon(dest.DestOptions(listen="tcp://127.0.0.1:*", quiet=True,
                                              peer_timeout_s=2, verify_reference=False))
    ctx = zmq.Context()
    sockets: list[zmq.Socket] = []

    def dealer(endpoint: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(endpoint)
        sockets.append(s)
        return s

    client = dealer(daemon.endpoint)
    client.send_multipart(traffic[0].frames)
    assert daemon.router.poll(5000)
    frames = daemon.router.recv_multipart(copy=False)
    session = dest.DestSession(daemon, frames[0].bytes, frames[1:])
    rng = random.Random(SEED + 1)
    from_source = [s for s in traffic[1:] if s.sender is p.Side.SOURCE]
    limits = _snapshots(traffic, p.Side.DEST)[1].limits
    switchover = next(s for s in from_source
                      if p.decode(s.frames, limits).TYPE is p.MsgType.SWITCHOVER)
    outcome: dict[str, int] = {"handled": 0, "rejected": 0, "failed": 0}
    failures: set[str] = set()

    def drain() -> None:
        for s in sockets:
            while s.poll(0):
                s.recv_multipart()

    def fuzz(state: p.State) -> None:
        for _ in range(HANDLER_INPUTS):
            sent = rng.choice(from_source)
            frames = mutate(rng, sent.frames, traffic) if rng.random() < 0.8 else sent.frames
            session.conn.state = state
            session.urgent_arrival_ns = time.monotonic_ns()
            try:
                msg = session.conn.receive(frames)
                if msg.TYPE in (p.MsgType.SWITCHOVER, p.MsgType.RESUME):
                    outcome["handled"] += 1  # would change the session's phase: not here
                    continue
                urgent = (sent.channel == "urgent") != (rng.random() < 0.3)
                (session._on_urgent if urgent else session._on_bulk)(msg)
                outcome["handled"] += 1
            except ProtocolError:
                outcome["rejected"] += 1
            except (MigrateError, OSError, zmq.ZMQError) as exc:
                outcome["failed"] += 1
                failures.add(f"{type(exc).__name__}: {str(exc)[:80]}")
            drain()

    try:
        assert session.handshake()
        welcome = p.decode(client.recv_multipart())
        assert isinstance(welcome, p.Welcome)
        dealer(welcome.urgent_endpoint)
        dealer(welcome.bulk_endpoint)
        fuzz(p.State.PRECOPY)
        # The real switchover: everything it names is taken as installed, the guest resumes.
        msg = p.decode(switchover.frames, session.conn.limits)
        assert isinstance(msg, p.Switchover)
        session.conn.state = p.State.PRECOPY
        session.bulk_seq = max(session.bulk_seq, msg.bulk_seq)
        session._on_urgent(session.conn.receive(switchover.frames))
        assert session.report.phase in ("postcopy", "verify")
        fuzz(p.State.POSTCOPY)
    finally:
        session._cleanup()
        for s in sockets:
            s.close(linger=0)
        daemon.router.close(linger=0)
        daemon.ctx.term()
        ctx.term()
    print(f"handler fuzz, {2 * HANDLER_INPUTS} inputs: {outcome}; failures: {failures}")
    assert sum(outcome.values()) == 2 * HANDLER_INPUTS
    assert outcome["handled"] > HANDLER_INPUTS // 10
