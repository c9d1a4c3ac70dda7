"""The migration wire protocol, sans-IO (in the manner of h11).

Nothing here touches a socket. A message is a header frame (msgpack array: type code first, then
the fields in a fixed order) and, for page batches only, one raw data frame holding the non-zero
pages back to back, so the receiver can install them with UFFDIO_COPY straight from the frame.

``encode(msg) -> list of frames`` and ``decode(frames, limits) -> msg`` are pure and validate
everything (types, sizes, page indexes inside the region, frame lengths). ``Connection`` tracks one
migration from one side's point of view and checks every message sent or received against a table
of allowed transitions, so a peer that sends something out of order gets a ``ProtocolError`` naming
the state, the message and the direction, and the caller's own bugs are caught the same way.

Channels: the *control/urgent* channel carries handshake, switchover, fault requests and their
replies, completion and errors; the *bulk* channel carries pre-copy rounds, background push and
their flow-control acknowledgements. Messages on one channel arrive in order; nothing is assumed
about the order between channels, which is why SWITCHOVER names the last bulk sequence number.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from migrate.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # a header frame bigger than this is refused before msgpack sees it
MAX_PAGES_PER_BATCH = 4096  # 16 MiB of 4 KiB pages: bounds one data frame
MAX_STRING = 4096
SESSION_ID_BYTES = 16
PAGE_SIZES = (4096, 2 << 20, 1 << 30)
MODES = ("precopy", "postcopy", "hybrid")
BACKINGS = ("anon", "memfd")
KNOWN_FEATURES = frozenset({"fault-around", "zero-flag", "discard", "snapshot"})


class MsgType(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    REFUSE = 3
    PAGES = 4
    ROUND_END = 5
    ACK = 6
    SWITCHOVER = 7
    RESUMED = 8
    REQUEST = 9
    PUSH_DONE = 10
    COMPLETE = 11
    VERIFIED = 12
    ERROR = 13
    BYE = 14
    REPORT = 15
    PING = 16
    SNAPSHOTTED = 17
    RESUME = 18
    RESUME_ACK = 19
    STALE = 20


class Batch(enum.IntEnum):
    """Why a PAGES message was sent; decides how the destination installs it."""

    PRECOPY = 0  # a pre-copy round; the page may be re-sent later if written again
    FINAL = 1  # pre-copy mode: the last dirty pages, sent while the guest is paused
    DEMAND = 2  # the reply to a REQUEST (the faulting page first, then its neighbours)
    PUSH = 3  # post-copy background push


class Side(enum.Enum):
    SOURCE = "source"
    DEST = "dest"

    @property
    def peer(self) -> Side:
        return Side.DEST if self is Side.SOURCE else Side.SOURCE


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; set from the handshake once the region is known."""

    npages: int = 0  # 0 until the handshake: page-carrying messages are refused then
    page_size: int = 4096
    max_pages_per_batch: int = MAX_PAGES_PER_BATCH


# ---------------------------------------------------------------------------------------------
# Messages. Field order is the wire order. ``_schema`` gives each field's check.


def _u(bits: int = 64) -> tuple[str, int]:
    return ("uint", (1 << bits) - 1)


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[MsgType]
    _schema: ClassVar[dict[str, tuple[str, Any]]]
    HAS_DATA: ClassVar[bool] = False  # a raw data frame follows the header
    DATA_FIELD: ClassVar[str] = "data"  # the attribute that travels as that frame

    def header_fields(self) -> list[Any]:
        return [getattr(self, name) for name in self._schema]  # schema order is wire order


@dataclass(frozen=True)
class Hello(Message):
    """Source -> dest: who I am, what I am about to send."""

    TYPE = MsgType.HELLO
    version: int
    session: bytes
    page_size: int
    npages: int
    backing: str
    mode: str
    workload: dict  # {"name", "size", "seed", "ops"[, "event"]}: lets the dest start the guest and
    #                 check it
    features: list
    digest_algorithm: str
    _schema = {
        "version": _u(16), "session": ("session", None), "page_size": ("page_size", None),
        "npages": _u(32), "backing": ("choice", BACKINGS), "mode": ("choice", MODES),
        "workload": ("workload", None), "features": ("features", None),
        "digest_algorithm": ("str", MAX_STRING),
    }


@dataclass(frozen=True)
class Welcome(Message):
    """Dest -> source: the guest is ready to receive; here are the per-session channels."""

    TYPE = MsgType.WELCOME
    version: int
    session: bytes
    urgent_endpoint: str
    bulk_endpoint: str
    features: list
    _schema = {
        "version": _u(16), "session": ("session", None), "urgent_endpoint": ("endpoint", None),
        "bulk_endpoint": ("endpoint", None), "features": ("features", None),
    }


@dataclass(frozen=True)
class Refuse(Message):
    TYPE = MsgType.REFUSE
    session: bytes
    reason: str
    _schema = {"session": ("session", None), "reason": ("str", MAX_STRING)}


@dataclass(frozen=True)
class Pages(Message):
    """A batch of pages. ``indexes`` is a packed little-endian uint32 array; ``zero`` has one byte
    per page (1 = the page is all zeros and has no bytes in ``data``); ``data`` holds the non-zero
    pages in index order. ``request`` ties a DEMAND reply to its REQUEST (0 otherwise)."""

    TYPE = MsgType.PAGES
    HAS_DATA = True
    seq: int
    kind: int
    request: int
    round: int
    indexes: bytes
    zero: bytes
    data: Any = field(default=b"", compare=False, repr=False)
    _schema = {
        "seq": _u(), "kind": ("choice", tuple(int(b) for b in Batch)), "request": _u(),
        "round": _u(16), "indexes": ("indexes", None), "zero": ("bytes", MAX_PAGES_PER_BATCH),
    }

    def index_array(self) -> array:
        return _unpack_indexes(self.indexes)

    @staticmethod
    def build(seq: int, kind: Batch, indexes: Sequence[int], zero: Sequence[bool] | bytes,
              data: Any, *, request: int = 0, round: int = 0) -> Pages:
        packed = array("I", indexes).tobytes()
        zero_bytes = bytes(zero) if not isinstance(zero, bytes) else zero
        return Pages(seq, int(kind), request, round, packed, zero_bytes, data)


@dataclass(frozen=True)
class RoundEnd(Message):
    """Source -> dest (bulk): pre-copy round ``round`` is complete after ``seq``."""

    TYPE = MsgType.ROUND_END
    round: int
    seq: int
    pages: int
    dirty: int  # pages found written during this round (what the next round will send)
    _schema = {"round": _u(16), "seq": _u(), "pages": _u(32), "dirty": _u(32)}


@dataclass(frozen=True)
class Ack(Message):
    """Dest -> source (bulk): every bulk message up to ``seq`` is installed (flow control)."""

    TYPE = MsgType.ACK
    seq: int
    _schema = {"seq": _u()}


@dataclass(frozen=True)
class Switchover(Message):
    """Source -> dest (urgent): the guest is paused. Pages in ``discard`` (packed uint32) were
    written after they were sent and must be dropped before the guest resumes; ``bulk_seq`` is the
    last bulk message sent before the pause, which the dest must have installed first."""

    TYPE = MsgType.SWITCHOVER
    HAS_DATA = True
    DATA_FIELD = "discard"  # a data frame: bounded by the region (4 bytes a page), not the header
    bulk_seq: int
    discard: bytes
    ops_done: int
    paused_ns: int  # source-side time from pause request to this message (for downtime)
    _schema = {"bulk_seq": _u(), "ops_done": _u(), "paused_ns": _u()}

    def discard_array(self) -> array:
        return _unpack_indexes(self.discard)


@dataclass(frozen=True)
class Stale(Message):
    """Source -> dest (urgent), right after RESUMED: the pre-copied pages written at the source
    after they were last sent (packed uint32). The destination holds pre-copied pages aside and
    installs them itself once it knows which are stale; the stale ones it fetches like any missing
    page. Sent after the guest resumes, so finding them (a dirty scan) is not part of downtime."""

    TYPE = MsgType.STALE
    HAS_DATA = True
    DATA_FIELD = "pages"
    count: int
    pages: bytes
    _schema = {"count": _u(32)}

    def page_array(self) -> array:
        return _unpack_indexes(self.pages)


@dataclass(frozen=True)
class Resumed(Message):
    """Dest -> source (urgent): the guest runs here now; ``resume_ns`` is the dest-side time from
    SWITCHOVER received to the guest running."""

    TYPE = MsgType.RESUMED
    resume_ns: int
    _schema = {"resume_ns": _u()}


@dataclass(frozen=True)
class Request(Message):
    """Dest -> source (urgent): the guest faulted on ``index``; ``around`` asks for up to that many
    following pages too (fault-around), which the source sends only if not sent already."""

    TYPE = MsgType.REQUEST
    request: int
    index: int
    around: int
    _schema = {"request": _u(), "index": ("page", None), "around": _u(16)}


@dataclass(frozen=True)
class PushDone(Message):
    """Source -> dest (bulk): every page has now been sent at least once since switchover."""

    TYPE = MsgType.PUSH_DONE
    seq: int
    pages: int
    _schema = {"seq": _u(), "pages": _u(32)}


@dataclass(frozen=True)
class Complete(Message):
    """Dest -> source (urgent): every page is present; ``received_digest`` covers the bytes as
    installed (page hashes of the version each page holds), to compare with the source's copy.
    ``data`` is those page hashes (packed little-endian uint64, one per page), so a mismatch can
    be traced to the exact pages."""

    TYPE = MsgType.COMPLETE
    HAS_DATA = True
    pages: int
    received_digest: str
    data: Any = field(default=b"", compare=False, repr=False)
    _schema = {"pages": _u(32), "received_digest": ("str", MAX_STRING)}

    def hash_array(self) -> array:
        out = array("Q")
        out.frombytes(bytes(self.data.buffer if hasattr(self.data, "buffer") else self.data))
        return out


@dataclass(frozen=True)
class Verified(Message):
    """Source -> dest (urgent): the source's digest of the paused region and whether it matched."""

    TYPE = MsgType.VERIFIED
    source_digest: str
    match: bool
    _schema = {"source_digest": ("str", MAX_STRING), "match": ("bool", None)}


@dataclass(frozen=True)
class Error(Message):
    TYPE = MsgType.ERROR
    phase: str
    message: str
    _schema = {"phase": ("str", 64), "message": ("str", MAX_STRING)}


@dataclass(frozen=True)
class Bye(Message):
    TYPE = MsgType.BYE
    reason: str
    _schema = {"reason": ("str", MAX_STRING)}


@dataclass(frozen=True)
class Report(Message):
    """Dest -> source (urgent), after VERIFIED: the destination's figures and final digests."""

    TYPE = MsgType.REPORT
    body: dict
    _schema = {"body": ("report", None)}


@dataclass(frozen=True)
class Ping(Message):
    """Either side (urgent), when it has sent nothing for a while: "I am alive". Lets a peer tell
    a quiet migration from a dead one without waiting for TCP."""

    TYPE = MsgType.PING
    t_ns: int
    _schema = {"t_ns": _u()}


@dataclass(frozen=True)
class Snapshotted(Message):
    """Source -> dest (urgent): the paused region is safely on disk; if this source dies, a new
    one can resume the session from the snapshot, so the destination should wait for it."""

    TYPE = MsgType.SNAPSHOTTED
    digest: str
    _schema = {"digest": ("str", MAX_STRING)}


@dataclass(frozen=True)
class Resume(Message):
    """Source -> dest (urgent): a restarted source takes over ``session`` from its snapshot."""

    TYPE = MsgType.RESUME
    session: bytes
    _schema = {"session": ("session", None)}


@dataclass(frozen=True)
class ResumeAck(Message):
    """Dest -> source (urgent): which pages the destination already holds (``data``: one byte per
    page, 1 = present), so the new source sends only the rest."""

    TYPE = MsgType.RESUME_ACK
    HAS_DATA = True
    pages: int
    data: Any = field(default=b"", compare=False, repr=False)
    _schema = {"pages": _u(32)}

    def present(self) -> bytes:
        return bytes(self.data.buffer if hasattr(self.data, "buffer") else self.data)


MESSAGE_CLASSES: dict[MsgType, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, Refuse, Pages, RoundEnd, Ack, Switchover, Resumed, Request,
                PushDone, Complete, Verified, Error, Bye, Report, Ping, Snapshotted, Resume,
                ResumeAck, Stale)
}


# ---------------------------------------------------------------------------------------------
# Encoding and validation


def _unpack_indexes(packed: bytes) -> array:
    out = array("I")
    out.frombytes(packed)
    return out


def encode(msg: Message) -> list[Any]:
    """Frames for ``msg``: the msgpack header, plus the data frame for PAGES."""
    header = msgpack.packb([int(msg.TYPE), *msg.header_fields()], use_bin_type=True)
    if msg.HAS_DATA:
        return [header, getattr(msg, msg.DATA_FIELD)]
    return [header]


def decode(frames: Sequence[Any], limits: Limits = Limits()) -> Message:
    """Parse and validate one message. Raises ProtocolError saying what is wrong."""
    if not frames:
        raise ProtocolError("empty message")
    head = frames[0]
    head_bytes = head.bytes if hasattr(head, "bytes") else bytes(head)
    if len(head_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(head_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        raw = msgpack.unpackb(
            head_bytes, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=MAX_HEADER_BYTES, max_str_len=MAX_STRING, max_array_len=4096,
            max_map_len=64,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable header: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("header is not a non-empty array")
    code = raw[0]
    if (not isinstance(code, int) or isinstance(code, bool)
            or code not in MsgType._value2member_map_):
        raise ProtocolError(f"unknown message type {code!r}")
    cls = MESSAGE_CLASSES[MsgType(code)]
    names = list(cls._schema)
    if len(raw) - 1 != len(names):
        raise ProtocolError(
            f"{cls.TYPE.name}: expected {len(names)} fields, got {len(raw) - 1}")
    values = {}
    for name, value in zip(names, raw[1:], strict=True):
        kind, arg = cls._schema[name]
        values[name] = _check_field(cls.TYPE.name, name, kind, arg, value, limits)
    expected_frames = 2 if cls.HAS_DATA else 1
    if len(frames) != expected_frames:
        raise ProtocolError(
            f"{cls.TYPE.name}: expected {expected_frames} frames, got {len(frames)}")
    if cls is Pages:
        values["data"] = frames[1]
        msg = Pages(**values)
        _check_pages(msg, limits)
        return msg
    if cls is Switchover:
        packed = frames[1].bytes if hasattr(frames[1], "bytes") else bytes(frames[1])
        if len(packed) > 4 * limits.npages:
            raise ProtocolError(f"SWITCHOVER: {len(packed) // 4} pages to discard in a region of "
                                f"{limits.npages} pages")
        values["discard"] = _check_field("SWITCHOVER", "discard", "discard", None, packed, limits)
    if cls is Stale:
        packed = frames[1].bytes if hasattr(frames[1], "bytes") else bytes(frames[1])
        if len(packed) > 4 * limits.npages or values["count"] * 4 != len(packed):
            raise ProtocolError(f"STALE: {values['count']} pages announced, {len(packed)} bytes "
                                f"of indexes, in a region of {limits.npages} pages")
        values["pages"] = _check_field("STALE", "pages", "discard", None, packed, limits)
    if cls is ResumeAck:
        present = frames[1].bytes if hasattr(frames[1], "bytes") else bytes(frames[1])
        if values["pages"] != limits.npages or len(present) != limits.npages:
            raise ProtocolError(f"RESUME_ACK: {values['pages']} pages, {len(present)} flags, "
                                f"for a region of {limits.npages} pages")
        if present and max(present) > 1:
            raise ProtocolError("RESUME_ACK: present flags must be 0 or 1")
        values["data"] = present
    if cls is Complete:
        size = _frame_len(frames[1])
        if size != 8 * limits.npages or values["pages"] != limits.npages:
            raise ProtocolError(f"COMPLETE: {values['pages']} pages and {size} bytes of page "
                                f"hashes for a region of {limits.npages} pages")
        values["data"] = frames[1]
    return cls(**values)


def _frame_len(frame: Any) -> int:
    return len(frame.buffer if hasattr(frame, "buffer") else memoryview(frame))


def _check_field(mtype: str, name: str, kind: str, arg: Any, value: Any, limits: Limits) -> Any:
    where = f"{mtype}.{name}"
    if kind == "uint":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= arg:
            raise ProtocolError(f"{where}: expected an integer in 0..{arg}, got {value!r}")
        return value
    if kind == "page":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limits.npages:
            raise ProtocolError(f"{where}: page index {value!r} outside the region of "
                                f"{limits.npages} pages")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ProtocolError(f"{where}: expected a boolean, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str) or len(value) > arg:
            raise ProtocolError(f"{where}: expected a string of at most {arg} characters")
        return value
    if kind == "bytes":
        if not isinstance(value, bytes) or len(value) > arg:
            raise ProtocolError(f"{where}: expected at most {arg} bytes")
        return value
    if kind == "choice":
        # Exact types: 1.0 == 1 and True == 1 in Python, but neither is a valid code here.
        if not any(type(value) is type(c) and value == c for c in arg):
            raise ProtocolError(f"{where}: {value!r} is not one of {list(arg)}")
        return value
    if kind == "session":
        if not isinstance(value, bytes) or len(value) != SESSION_ID_BYTES:
            raise ProtocolError(f"{where}: expected {SESSION_ID_BYTES} bytes")
        return value
    if kind == "page_size":
        if type(value) is not int or value not in PAGE_SIZES:
            raise ProtocolError(f"{where}: unsupported page size {value!r}")
        return value
    if kind == "endpoint":
        if not isinstance(value, str) or len(value) > 256 or not value.startswith(
                ("tcp://", "ipc://", "inproc://")):
            raise ProtocolError(f"{where}: not a ZeroMQ endpoint: {value!r}")
        return value
    if kind == "features":
        if not isinstance(value, list) or len(value) > 64 or not all(
                isinstance(f, str) and len(f) <= 64 for f in value):
            raise ProtocolError(f"{where}: expected a list of feature names")
        return value  # unknown names are ignored by negotiation, not refused: forward compatible
    if kind == "report":
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ProtocolError(f"{where}: expected a map with string keys")
        return value
    if kind == "workload":
        return _check_workload(where, value)
    if kind in ("indexes", "discard"):
        limit = limits.max_pages_per_batch if kind == "indexes" else (1 << 32) - 1
        if not isinstance(value, bytes) or len(value) % 4 or len(value) // 4 > limit:
            raise ProtocolError(f"{where}: expected a packed uint32 array of at most {limit}")
        if value:
            if limits.npages == 0:
                raise ProtocolError(f"{where}: page indexes before the region is known")
            highest = max(_unpack_indexes(value))
            if highest >= limits.npages:
                raise ProtocolError(
                    f"{where}: page index {highest} outside the region of {limits.npages} pages")
        return value
    raise AssertionError(f"unknown schema kind {kind}")  # a bug in this module, not in the input


def _check_workload(where: str, value: Any) -> dict:
    if not isinstance(value, dict) or set(value) - {"event"} != {"name", "size", "seed", "ops"}:
        raise ProtocolError(f"{where}: expected a map with name, size, seed, ops (and an optional "
                            f"event)")
    if not isinstance(value["name"], str) or len(value["name"]) > 64:
        raise ProtocolError(f"{where}.name: expected a short string")
    for key in ("size", "seed", "ops"):
        v = value[key]
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (1 << 64):
            raise ProtocolError(f"{where}.{key}: expected an unsigned 64-bit integer")
    if "event" in value:
        # The guest's test-hook region event (migrate/regionevents.py) travels with the workload:
        # the destination's guest and its reference run perform the same one.
        from migrate.regionevents import EventSpec

        try:
            EventSpec.parse(value["event"]).check_region(value["size"] // 4096)
        except ValueError as exc:
            raise ProtocolError(f"{where}.event: {exc}") from None
    return value


def _check_pages(msg: Pages, limits: Limits) -> None:
    n = len(msg.indexes) // 4
    if n == 0:
        raise ProtocolError("PAGES: empty batch")
    if len(msg.zero) != n:
        raise ProtocolError(f"PAGES: {n} indexes but {len(msg.zero)} zero flags")
    if max(msg.zero) > 1:
        raise ProtocolError(f"PAGES: zero flag {max(msg.zero)} is not 0 or 1")
    zeros = msg.zero.count(1)
    size = _frame_len(msg.data)
    expected = (n - zeros) * limits.page_size
    if size != expected:
        raise ProtocolError(
            f"PAGES: data frame is {size} bytes, {n - zeros} non-zero pages need {expected}")
    if msg.kind == Batch.DEMAND and msg.request == 0:
        raise ProtocolError("PAGES: a DEMAND batch must name its request")


# ---------------------------------------------------------------------------------------------
# The state machine


class State(enum.Enum):
    START = "start"
    NEGOTIATING = "negotiating"  # HELLO sent, WELCOME not yet
    PRECOPY = "precopy"
    SWITCHING = "switching"  # SWITCHOVER sent, RESUMED not yet
    POSTCOPY = "postcopy"
    COMPLETING = "completing"  # COMPLETE sent, VERIFIED not yet
    DONE = "done"
    FAILED = "failed"


S, D = Side.SOURCE, Side.DEST
_ANY_LIVE = (State.NEGOTIATING, State.PRECOPY, State.SWITCHING, State.POSTCOPY, State.COMPLETING)

# (state, sender, message type) -> next state. Anything absent is a protocol violation.
TRANSITIONS: dict[tuple[State, Side, MsgType], State] = {
    (State.START, S, MsgType.HELLO): State.NEGOTIATING,
    (State.NEGOTIATING, D, MsgType.WELCOME): State.PRECOPY,
    (State.NEGOTIATING, D, MsgType.REFUSE): State.FAILED,
    (State.PRECOPY, S, MsgType.PAGES): State.PRECOPY,
    (State.PRECOPY, S, MsgType.ROUND_END): State.PRECOPY,
    (State.PRECOPY, D, MsgType.ACK): State.PRECOPY,
    (State.PRECOPY, S, MsgType.SWITCHOVER): State.SWITCHING,
    # Bulk and urgent are separate channels: acks and pushed pages may cross SWITCHOVER/RESUMED.
    (State.SWITCHING, S, MsgType.PAGES): State.SWITCHING,
    (State.SWITCHING, D, MsgType.ACK): State.SWITCHING,
    (State.SWITCHING, D, MsgType.RESUMED): State.POSTCOPY,
    (State.POSTCOPY, S, MsgType.PAGES): State.POSTCOPY,
    (State.POSTCOPY, D, MsgType.ACK): State.POSTCOPY,
    (State.POSTCOPY, D, MsgType.REQUEST): State.POSTCOPY,
    (State.POSTCOPY, S, MsgType.PUSH_DONE): State.POSTCOPY,
    (State.POSTCOPY, S, MsgType.STALE): State.POSTCOPY,
    (State.POSTCOPY, D, MsgType.COMPLETE): State.COMPLETING,
    # A late bulk message or ack may still be in flight when the dest reports completion.
    (State.COMPLETING, S, MsgType.PAGES): State.COMPLETING,
    (State.COMPLETING, S, MsgType.PUSH_DONE): State.COMPLETING,
    (State.COMPLETING, D, MsgType.ACK): State.COMPLETING,
    (State.COMPLETING, S, MsgType.VERIFIED): State.DONE,
    # Repeats after a lost message (a connection dropped and re-established): idempotent.
    (State.COMPLETING, D, MsgType.COMPLETE): State.COMPLETING,
    (State.DONE, D, MsgType.COMPLETE): State.DONE,
    (State.DONE, S, MsgType.VERIFIED): State.DONE,
    (State.DONE, D, MsgType.REPORT): State.DONE,
    (State.DONE, S, MsgType.BYE): State.DONE,
    (State.DONE, D, MsgType.BYE): State.DONE,
}
for _state in _ANY_LIVE:
    for _side in Side:
        TRANSITIONS[(_state, _side, MsgType.ERROR)] = State.FAILED
        TRANSITIONS[(_state, _side, MsgType.BYE)] = State.FAILED
# Bulk messages are read after urgent ones: the last pre-copy round's ROUND_END may be read
# after SWITCHOVER was handled (even after COMPLETE), and pushed pages or PUSH_DONE after VERIFIED.
# They carry nothing the destination still needs; rejecting them failed good migrations.
for _state in (State.SWITCHING, State.POSTCOPY, State.COMPLETING, State.DONE):
    TRANSITIONS[(_state, S, MsgType.ROUND_END)] = _state
for _mtype in (MsgType.PAGES, MsgType.PUSH_DONE):
    TRANSITIONS[(State.DONE, S, _mtype)] = State.DONE
for _state in (*_ANY_LIVE, State.DONE):
    for _side in Side:
        TRANSITIONS[(_state, _side, MsgType.PING)] = _state
for _state in (State.SWITCHING, State.POSTCOPY, State.COMPLETING, State.DONE):
    TRANSITIONS[(_state, S, MsgType.SNAPSHOTTED)] = _state
for _state in (State.POSTCOPY, State.COMPLETING):
    TRANSITIONS[(_state, S, MsgType.RESUME)] = _state
    TRANSITIONS[(_state, D, MsgType.RESUME_ACK)] = _state


class Connection:
    """One migration seen from ``side``. Call ``send(msg)`` before putting a message on the wire
    (returns its frames) and ``receive(frames)`` for each message taken off it (returns the
    validated message). Both enforce TRANSITIONS; a violation moves the connection to FAILED."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.state = State.START
        self.limits = Limits()
        self.hello: Hello | None = None
        self.welcome: Welcome | None = None
        self.features: frozenset[str] = frozenset()
        self.closed_by: Side | None = None  # who sent ERROR or BYE first

    def error_frames(self, phase: str, message: str) -> list[Any] | None:
        """Frames of an ERROR telling the peer why this side gives up, in any state (also after a
        message from the peer broke the protocol: it should hear why, not time out); None when
        an ERROR or BYE was already exchanged, or nothing was ever said."""
        if self.closed_by is not None or self.state is State.START:
            return None
        self.closed_by = self.side
        self.state = State.FAILED
        return encode(Error(phase, message[:MAX_STRING]))

    @classmethod
    def resumed(cls, side: Side, limits: Limits, state: State = State.POSTCOPY) -> Connection:
        """A connection taking over a session mid-way (a source restarted from a snapshot)."""
        conn = cls(side)
        conn.state, conn.limits = state, limits
        return conn

    def __repr__(self) -> str:
        return f"<Connection {self.side.value} {self.state.value}>"

    def send(self, msg: Message) -> list[Any]:
        self._advance(self.side, msg)
        return encode(msg)

    def send_fast(self, mtype: MsgType, *fields: Any, data: Any = None) -> list[Any]:
        """Hot-path send of our own message: the transition is checked exactly as in ``send``,
        but the header is packed straight from ``fields`` (wire order) without building a message
        object. Only for REQUEST and PAGES, whose fields need no handshake bookkeeping; the
        receiver validates everything as usual."""
        key = (self.state, self.side, mtype)
        nxt = TRANSITIONS.get(key)
        if nxt is None or mtype not in (MsgType.REQUEST, MsgType.PAGES):
            previous, self.state = self.state, State.FAILED
            raise ProtocolError(f"{mtype.name} from the {self.side.value} is not allowed in state "
                                f"{previous.value} (seen by the {self.side.value})")
        self.state = nxt
        header = msgpack.packb([int(mtype), *fields], use_bin_type=True)
        return [header] if data is None else [header, data]

    def receive(self, frames: Sequence[Any]) -> Message:
        try:
            msg = decode(frames, self.limits)
        except ProtocolError:
            self.state = State.FAILED
            raise
        self._advance(self.side.peer, msg)
        return msg

    def _advance(self, sender: Side, msg: Message) -> None:
        if msg.TYPE in (MsgType.ERROR, MsgType.BYE) and self.closed_by is None:
            self.closed_by = sender
        key = (self.state, sender, msg.TYPE)
        nxt = TRANSITIONS.get(key)
        if nxt is None:
            previous, self.state = self.state, State.FAILED
            raise ProtocolError(
                f"{msg.TYPE.name} from the {sender.value} is not allowed in state "
                f"{previous.value} (seen by the {self.side.value})")
        if isinstance(msg, Hello):
            if msg.version != PROTOCOL_VERSION:
                self.state = State.FAILED
                raise ProtocolError(
                    f"protocol version {msg.version} is not supported (this side speaks "
                    f"{PROTOCOL_VERSION})")
            if msg.npages == 0 or msg.npages * msg.page_size != msg.workload["size"]:
                self.state = State.FAILED
                raise ProtocolError(
                    f"HELLO: {msg.npages} pages of {msg.page_size} bytes do not make the "
                    f"workload's {msg.workload['size']} bytes")
            self.hello = msg
            self.limits = Limits(npages=msg.npages, page_size=msg.page_size)
        elif isinstance(msg, Welcome):
            if msg.version != PROTOCOL_VERSION:
                self.state = State.FAILED
                raise ProtocolError(f"peer answered with protocol version {msg.version}")
            if self.hello is not None and msg.session != self.hello.session:
                self.state = State.FAILED
                raise ProtocolError("WELCOME names another session")
            self.welcome = msg
            offered = set(self.hello.features) if self.hello else set()
            self.features = frozenset(offered & set(msg.features) & KNOWN_FEATURES)
        self.state = nxt

    @property
    def finished(self) -> bool:
        return self.state in (State.DONE, State.FAILED)


def negotiate_features(offered: Sequence[str]) -> list[str]:
    """The dest's answer to a HELLO: the offered features this implementation knows."""
    return sorted(set(offered) & KNOWN_FEATURES)
