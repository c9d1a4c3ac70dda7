"""The fast path's wire code (native/xfer.c) against the protocol module, without sockets.

The C loops parse PAGES, REQUEST and ACK headers themselves and hand anything else to Python. The
rule checked here: C never accepts a header that ``protocol.decode`` would refuse, and when both
accept they read the same fields; what C writes is byte for byte what msgpack-python writes.
"""

from __future__ import annotations

import random
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate import protocol as p
from migrate._native import ffi, lib
from migrate.errors import ProtocolError

NPAGES = 1000
PAGE = 4096
LIMITS = p.Limits(npages=NPAGES, page_size=PAGE)


def c_parse_pages(head: bytes, data_len: int, npages: int = NPAGES):
    out = ffi.new("struct mig_x_pages *")
    rc = lib.mig_x_parse_pages(head, len(head), npages, PAGE, data_len, out)
    if rc:
        return None
    idx = bytes(ffi.buffer(out.indexes, 4 * out.n))
    zero = bytes(ffi.buffer(out.zero, out.n))
    return (out.seq, out.kind, out.request, out.round, idx, zero, out.zeros)


def c_parse_request(head: bytes, npages: int = NPAGES):
    req, index, around = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
    if lib.mig_x_parse_request(head, len(head), npages, req, index, around):
        return None
    return (req[0], index[0], around[0])


def c_parse_ack(head: bytes):
    seq = ffi.new("uint64_t *")
    return None if lib.mig_x_parse_ack(head, len(head), seq) else seq[0]


def py_decode(frames: list[bytes]):
    try:
        return p.decode(frames, LIMITS)
    except ProtocolError:
        return None


def pages_frames(seq=1, kind=p.Batch.PUSH, request=0, round=0, indexes=(1, 2, 3),
                 zero=(0, 1, 0)):
    msg = p.Pages.build(seq, kind, list(indexes), bytes(zero),
                        bytes(PAGE * (len(indexes) - sum(zero))), request=request, round=round)
    return p.encode(msg)


# -- what C writes is what Python writes ---------------------------------------------------------

@pytest.mark.parametrize("seq", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32,
                                 2**64 - 1])
def test_pack_pages_is_msgpack_python(seq):
    for n in (1, 63, 64, 65, 4096):
        idx = array("I", range(n))
        zero = bytes(i % 3 == 0 for i in range(n))
        out = ffi.new("uint8_t[]", 64 + 5 * n)
        length = lib.mig_x_pack_pages(out, seq, p.Batch.DEMAND, seq, 7, ffi.from_buffer(
            "uint32_t[]", idx), zero, n)
        ours = bytes(ffi.buffer(out, length))
        theirs = p.encode(p.Pages(seq, int(p.Batch.DEMAND), seq, 7, idx.tobytes(), zero))[0]
        assert ours == theirs


@given(st.integers(0, 2**64 - 1), st.integers(0, NPAGES - 1), st.integers(0, 65535))
def test_pack_request_and_ack_are_msgpack_python(request, index, around):
    out = ffi.new("uint8_t[]", 64)
    n = lib.mig_x_pack_request(out, request, index, around)
    assert bytes(ffi.buffer(out, n)) == p.encode(p.Request(request, index, around))[0]
    n = lib.mig_x_pack_ack(out, request)
    assert bytes(ffi.buffer(out, n)) == p.encode(p.Ack(request))[0]


# -- C accepts exactly what it should --------------------------------------------------------------

def test_valid_pages_parse_the_same():
    frames = pages_frames(seq=300, kind=p.Batch.DEMAND, request=9, round=2,
                          indexes=(5, 999, 0), zero=(1, 0, 0))
    got = c_parse_pages(frames[0], len(frames[1]))
    msg = py_decode(frames)
    assert msg is not None and got is not None
    assert got == (msg.seq, msg.kind, msg.request, msg.round, msg.indexes, msg.zero, 1)


@pytest.mark.parametrize("frames, why", [
    (pages_frames(indexes=(1, NPAGES), zero=(0, 0)), "index outside the region"),
    (pages_frames(kind=p.Batch.DEMAND, request=0), "DEMAND without its request"),
    (pages_frames(zero=(0, 2, 0)), "zero flag 2"),
    (pages_frames(indexes=(), zero=()), "empty batch"),
    ([pages_frames()[0], b"x" * PAGE], "data frame too short"),
    ([pages_frames()[0] + b"\x00", bytes(2 * PAGE)], "trailing byte after the header"),
    ([p.encode(p.Pages(1, 3, 0, 0, b"\x01\x00\x00", b"\x00"))[0], bytes(PAGE)],
     "indexes not a multiple of 4 bytes"),
    ([p.encode(p.Pages(1, 3, 0, 0, array("I", [1, 2]).tobytes(), b"\x00"))[0],
      bytes(2 * PAGE)], "fewer zero flags than indexes"),
])
def test_c_refuses_what_python_refuses(frames, why):
    assert py_decode(frames) is None, why
    assert c_parse_pages(frames[0], len(frames[1])) is None, why


def test_other_encodings_are_left_to_python():
    # A valid message in a non-canonical encoding (seq as int16) is Python's to decode: C
    # declines rather than guess, so nothing is accepted on a second reading of the format.
    head = bytearray(pages_frames(seq=5)[0])
    assert head[1] == 0x04 and head[2] == 0x05
    odd = bytes(head[:2]) + b"\xd1\x00\x05" + bytes(head[3:])
    assert py_decode([odd, bytes(2 * PAGE)]) is not None
    assert c_parse_pages(odd, 2 * PAGE) is None


def test_requests_and_acks():
    assert c_parse_request(p.encode(p.Request(7, 999, 8))[0]) == (7, 999, 8)
    assert c_parse_request(p.encode(p.Request(7, NPAGES, 8))[0]) is None  # outside the region
    assert c_parse_request(p.encode(p.Ack(7))[0]) is None
    assert c_parse_ack(p.encode(p.Ack(2**64 - 1))[0]) == 2**64 - 1
    assert c_parse_ack(p.encode(p.Ping(5))[0]) is None
    assert c_parse_ack(b"") is None and c_parse_request(b"") is None


def _mutations(data: bytes, rng: random.Random, count: int):
    for _ in range(count):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            if op == 0 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op == 1 and b:
                del b[rng.randrange(len(b))]
            elif op == 2:
                b.insert(rng.randrange(len(b) + 1), rng.randrange(256))
            elif b:
                b = b[:rng.randrange(len(b))]
        yield bytes(b)


def test_mutated_headers_never_accepted_by_c_alone():
    """20,000 mutations of real headers: whenever C accepts, Python accepts the same fields."""
    rng = random.Random(0xFA57)
    seeds = [pages_frames(seq=s, kind=k, request=r, indexes=i, zero=z)
             for s, k, r, i, z in ((1, p.Batch.PUSH, 0, (1, 2, 3), (0, 1, 0)),
                                   (70000, p.Batch.DEMAND, 3, (999,), (0,)),
                                   (2**40, p.Batch.PUSH, 0, tuple(range(100)), (0,) * 100))]
    accepted = 0
    for head, data in seeds:
        for mutant in _mutations(head, rng, 4000):
            for dlen in (len(data), len(data) - PAGE, len(data) + PAGE):
                got = c_parse_pages(mutant, dlen)
                if got is None:
                    continue
                accepted += 1
                msg = py_decode([mutant, bytes(max(dlen, 0))])
                assert msg is not None, mutant.hex()
                assert got[:6] == (msg.seq, msg.kind, msg.request, msg.round, msg.indexes,
                                   msg.zero)
    req = p.encode(p.Request(12345, 17, 8))[0]
    for mutant in _mutations(req, rng, 4000):
        got = c_parse_request(mutant)
        if got is not None:
            msg = py_decode([mutant])
            assert isinstance(msg, p.Request) and (msg.request, msg.index, msg.around) == got
    ack = p.encode(p.Ack(99999))[0]
    for mutant in _mutations(ack, rng, 4000):
        got = c_parse_ack(mutant)
        if got is not None:
            msg = py_decode([mutant])
            assert isinstance(msg, p.Ack) and msg.seq == got
    assert accepted > 0  # some mutations stay valid (a changed page index, a flag)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes(head):
    for got, decoded in ((c_parse_request(head), lambda: py_decode([head])),
                         (c_parse_ack(head), lambda: py_decode([head]))):
        if got is not None:
            assert decoded() is not None
    got = c_parse_pages(head, 0)
    if got is not None:
        assert py_decode([head, b""]) is not None
