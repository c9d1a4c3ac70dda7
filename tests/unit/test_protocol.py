"""The wire protocol, driven without sockets (sans-IO)."""

import os
from array import array

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate import protocol as p
from migrate.errors import ProtocolError

SESSION = os.urandom(16)
NPAGES = 256


def hello(**over):
    fields = dict(version=p.PROTOCOL_VERSION, session=SESSION, page_size=4096, npages=NPAGES,
                  backing="anon", mode="hybrid",
                  workload={"name": "kv", "size": NPAGES * 4096, "seed": 1, "ops": 1000},
                  features=["fault-around", "zero-flag", "from-the-future"],
                  digest_algorithm="pagehash64+blake2b")
    fields.update(over)
    return p.Hello(**fields)


def welcome():
    return p.Welcome(p.PROTOCOL_VERSION, SESSION, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
                     ["fault-around", "zero-flag"])


def pair():
    """A source and a dest connection after a successful handshake."""
    src, dst = p.Connection(p.Side.SOURCE), p.Connection(p.Side.DEST)
    dst.receive(src.send(hello()))
    src.receive(dst.send(welcome()))
    return src, dst


def test_handshake_negotiates_known_features_and_sets_limits():
    src, dst = pair()
    assert src.state is dst.state is p.State.PRECOPY
    assert src.features == {"fault-around", "zero-flag"}
    assert dst.limits.npages == NPAGES and dst.limits.page_size == 4096


def test_pages_roundtrip_with_zero_flags():
    src, dst = pair()
    data = b"\x01" * 4096 + b"\x02" * 4096
    msg = p.Pages.build(1, p.Batch.PRECOPY, [3, 4, 5], [0, 1, 0], data, round=1)
    got = dst.receive(src.send(msg))
    assert isinstance(got, p.Pages)
    assert list(got.index_array()) == [3, 4, 5]
    assert got.zero == b"\x00\x01\x00" and bytes(got.data) == data


def test_full_lifecycle_reaches_done():
    src, dst = pair()
    for msg, sender in [
        (p.Pages.build(1, p.Batch.PRECOPY, [0], [1], b""), src),
        (p.RoundEnd(1, 1, 1, 0), src),
        (p.Ack(1), dst),
        (p.Switchover(1, array("I", [0]).tobytes(), 10, 500), src),
        (p.Resumed(800), dst),
        (p.Stale(2, array("I", [3, 9]).tobytes()), src),
        (p.Request(1, 7, 4), dst),
        (p.Pages.build(2, p.Batch.DEMAND, [7], [0], b"z" * 4096, request=1), src),
        (p.PushDone(3, NPAGES), src),
        (p.Complete(NPAGES, "d", bytes(8 * NPAGES)), dst),
        (p.Verified("d", True), src),
        (p.Bye("done"), src),
    ]:
        receiver = dst if sender is src else src
        receiver.receive(sender.send(msg))
    assert src.state is dst.state is p.State.DONE


@pytest.mark.parametrize("bad", [
    lambda: p.Request(1, 0, 0),  # a fault request before switchover
    lambda: p.Complete(NPAGES, "x", bytes(8 * NPAGES)),
    lambda: p.Verified("x", True),
])
def test_out_of_order_messages_are_refused_by_the_receiver(bad):
    src, dst = pair()
    msg = bad()
    from_dest = msg.TYPE in (p.MsgType.REQUEST, p.MsgType.COMPLETE)
    sender, receiver = (dst, src) if from_dest else (src, dst)
    frames = p.encode(msg)  # bypass the sender's own check: a lying peer
    with pytest.raises(ProtocolError, match="not allowed in state precopy"):
        receiver.receive(frames)
    assert receiver.state is p.State.FAILED


def _in_postcopy():
    src, dst = pair()
    for msg, sender in [(p.Switchover(0, b"", 0, 0), src), (p.Resumed(0), dst)]:
        (dst if sender is src else src).receive(sender.send(msg))
    return src, dst


@pytest.mark.parametrize("count, pages, match", [
    (3, [1, 2], "3 pages announced, 8 bytes"),
    (1, [NPAGES], f"page index {NPAGES} outside the region"),
    (NPAGES + 1, list(range(NPAGES)) + [0], "in a region of 256 pages"),
])
def test_stale_list_must_be_consistent_and_inside_the_region(count, pages, match):
    _, dst = _in_postcopy()
    with pytest.raises(ProtocolError, match=match):
        dst.receive(p.encode(p.Stale(count, array("I", pages).tobytes())))
    assert dst.state is p.State.FAILED


def test_stale_list_only_after_the_guest_resumed():
    _, dst = pair()
    with pytest.raises(ProtocolError, match="STALE from the source is not allowed in state pre"):
        dst.receive(p.encode(p.Stale(0, b"")))


def test_error_frames_tell_the_peer_even_after_it_broke_the_protocol():
    src, dst = _in_postcopy()
    with pytest.raises(ProtocolError):
        dst.receive(p.encode(p.Stale(1, array("I", [NPAGES + 5]).tobytes())))
    frames = dst.error_frames("postcopy", "STALE names a page outside the region")
    assert frames is not None
    msg = src.receive(frames)
    assert isinstance(msg, p.Error) and "outside" in msg.message
    assert src.state is p.State.FAILED
    assert dst.error_frames("postcopy", "again") is None  # said once
    assert src.error_frames("postcopy", "reply") is None  # the peer ended it: no reply


def test_sender_is_stopped_from_breaking_the_protocol_itself():
    src, _ = pair()
    with pytest.raises(ProtocolError, match="RESUMED from the source"):
        src.send(p.Resumed(1))


def test_page_index_outside_region_is_refused():
    src, dst = pair()
    msg = p.Pages.build(1, p.Batch.PRECOPY, [NPAGES], [1], b"")
    with pytest.raises(ProtocolError, match="outside the region"):
        dst.receive(p.encode(msg))


def test_fault_request_outside_the_region_is_refused():
    src, dst = pair()
    for m, s in [(p.Switchover(0, b"", 0, 0), src), (p.Resumed(0), dst)]:
        (dst if s is src else src).receive(s.send(m))
    with pytest.raises(ProtocolError, match="outside the region"):
        src.receive(p.encode(p.Request(1, NPAGES, 0)))
    assert src.state is p.State.FAILED


def test_pages_before_handshake_are_refused():
    msg = p.Pages.build(1, p.Batch.PRECOPY, [0], [1], b"")
    with pytest.raises(ProtocolError, match="before the region is known"):
        p.decode(p.encode(msg))


@pytest.mark.parametrize("data,zero,match", [
    (b"x" * 100, [0], "data frame is 100 bytes"),
    (b"", [0], "data frame is 0 bytes"),
    (b"x" * 4096, [1], "data frame is 4096 bytes"),
    (b"", [2], "zero flag 2"),
])
def test_data_frame_must_match_the_zero_flags(data, zero, match):
    src, dst = pair()
    msg = p.Pages(1, 0, 0, 0, array("I", [1]).tobytes(), bytes(zero), data)
    with pytest.raises(ProtocolError, match=match):
        dst.receive(p.encode(msg))


def test_demand_reply_must_name_its_request():
    src, dst = pair()
    for m, s in [(p.Switchover(0, b"", 0, 0), src), (p.Resumed(0), dst)]:
        (dst if s is src else src).receive(s.send(m))
    msg = p.Pages.build(1, p.Batch.DEMAND, [1], [1], b"", request=0)
    with pytest.raises(ProtocolError, match="must name its request"):
        dst.receive(p.encode(msg))


@pytest.mark.parametrize("over,match", [
    (dict(version=99), "protocol version 99"),
    (dict(npages=3), "do not make"),
    (dict(page_size=1234), "unsupported page size"),
    (dict(mode="teleport"), "not one of"),
    (dict(session=b"short"), "expected 16 bytes"),
    (dict(workload={"name": "kv"}), "expected a map"),
])
def test_bad_hello_is_refused(over, match):
    dst = p.Connection(p.Side.DEST)
    with pytest.raises(ProtocolError, match=match):
        dst.receive(p.encode(hello(**over)))


@pytest.mark.parametrize("frames,match", [
    ([], "empty message"),
    ([b"\xc1"], "undecodable"),
    ([msgpack.packb({"a": 1})], "not a non-empty array"),
    ([msgpack.packb([999])], "unknown message type"),
    ([msgpack.packb([True])], "unknown message type"),
    ([msgpack.packb([int(p.MsgType.ACK)])], "expected 1 fields"),
    ([msgpack.packb([int(p.MsgType.ACK), -1])], "expected an integer"),
    ([msgpack.packb([int(p.MsgType.ACK), 1]), b"extra"], "expected 1 frames"),
    ([b"\x00" * (p.MAX_HEADER_BYTES + 1)], "exceeds"),
])
def test_malformed_frames_give_protocol_errors(frames, match):
    with pytest.raises(ProtocolError, match=match):
        p.decode(frames, p.Limits(npages=NPAGES))


@settings(max_examples=2000, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=3))
def test_decoder_never_fails_other_than_protocol_error(frames):
    try:
        p.decode(frames, p.Limits(npages=NPAGES))
    except ProtocolError:
        pass
