"""Page hashes, zero detection and region digests (migrate.digest, native/wl_digest.c)."""

from __future__ import annotations

import hashlib
import mmap
import random
import struct
from array import array

import pytest
from migrate._native import ffi, lib

from migrate import digest

PAGE = 4096


# ---- XXH64 itself ----------------------------------------------------------------------------

_P1, _P2, _P3, _P4, _P5 = (
    0x9E3779B185EBCA87,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0x85EBCA77C2B2AE63,
    0x27D4EB2F165667C5,
)
_M = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M, 31) * _P1) & _M


def _xxh64_spec(data: bytes, seed: int = 0) -> int:
    """XXH64 written from the xxHash specification (doc/xxhash_spec.md, "XXH64 algorithm
    description"), step by step, to check the C kernel against something it was not built from."""
    n = len(data)
    i = 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed, (seed - _P1) & _M]
        while i + 32 <= n:
            for lane in range(4):
                v[lane] = _round(v[lane], struct.unpack_from("<Q", data, i + 8 * lane)[0])
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for lane in range(4):
            h ^= _round(0, v[lane])
            h = (h * _P1 + _P4) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h ^= _round(0, struct.unpack_from("<Q", data, i)[0])
        h = (_rotl(h, 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        h ^= (struct.unpack_from("<I", data, i)[0] * _P1) & _M
        h = (_rotl(h, 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M
        h = (_rotl(h, 11) * _P1) & _M
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M
    h ^= h >> 29
    h = (h * _P3) & _M
    h ^= h >> 32
    return h


def _c_xxh64(data: bytes, seed: int = 0) -> int:
    return int(lib.wl_xxh64(ffi.from_buffer("uint8_t[]", data), len(data), seed))


def test_xxh64_published_vectors():
    # Values published with the reference implementation (XXH64 of "" and "abc", seed 0).
    assert _c_xxh64(b"") == 0xEF46DB3751D8E999
    assert _c_xxh64(b"abc") == 0x44BC2CF5AD770999


@pytest.mark.parametrize("length", [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 100, 4096, 4099])
def test_xxh64_matches_the_specification(length):
    data = random.Random(length).randbytes(length)
    assert _c_xxh64(data) == _xxh64_spec(data)
    assert _c_xxh64(data, seed=12345) == _xxh64_spec(data, seed=12345)


def test_page_hashes_are_xxh64_of_each_page():
    data = random.Random(1).randbytes(4 * PAGE)
    hashes = digest.page_hashes(data)
    assert hashes.typecode == "Q"
    assert list(hashes) == [_xxh64_spec(data[i : i + PAGE]) for i in range(0, len(data), PAGE)]


def test_page_hashes_other_unit():
    data = random.Random(2).randbytes(8 * PAGE)
    hashes = digest.page_hashes(data, page_size=2 * PAGE)
    assert len(hashes) == 4
    assert hashes[1] == _xxh64_spec(data[2 * PAGE : 4 * PAGE])


# ---- single-byte sensitivity -----------------------------------------------------------------


def _positions(npages: int) -> list[int]:
    size = npages * PAGE
    fixed = [0, 1, 7, 8, PAGE - 1, PAGE, PAGE + 4095, size // 2, size - 8, size - 1]
    return fixed + random.Random(3).sample(range(size), 40)


@pytest.mark.parametrize("base_kind", ["zero", "random"])
def test_one_changed_byte_changes_its_page_hash_and_diff_names_it(base_kind):
    npages = 32
    base = (
        bytes(npages * PAGE) if base_kind == "zero" else random.Random(4).randbytes(npages * PAGE)
    )
    base_hashes = digest.page_hashes(base)
    base_digest = digest.region_digest(base)
    rng = random.Random(5)
    for pos in _positions(npages):
        changed = bytearray(base)
        changed[pos] ^= 1 << rng.randrange(8)
        hashes = digest.page_hashes(changed)
        assert digest.diff_pages(base_hashes, hashes) == [pos // PAGE]
        assert digest.region_digest(changed) != base_digest


def test_diff_pages_names_every_differing_page_across_chunks():
    npages = 10_000  # more than one 4096-hash comparison chunk
    a = array("Q", range(npages))
    b = array("Q", a)
    wanted = [0, 4095, 4096, 8191, 9999]
    for i in wanted:
        b[i] ^= 0xFF
    assert digest.diff_pages(a, b) == wanted
    assert digest.diff_pages(a.tobytes(), b.tobytes()) == wanted
    assert digest.diff_pages(a, a) == []


def test_diff_pages_rejects_mismatched_lengths_and_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        digest.diff_pages(array("Q", [1, 2]), array("Q", [1]))
    with pytest.raises(ValueError, match="multiple of 8"):
        digest.diff_pages(b"1234567", b"1234567")
    with pytest.raises(TypeError, match="array\\('Q'\\)"):
        digest.diff_pages(array("L", [1]), array("Q", [1]))


# ---- zero pages ------------------------------------------------------------------------------


def test_zero_detection_is_exact_for_every_byte_position():
    page = bytearray(PAGE)
    assert digest.is_zero(page)
    for pos in range(PAGE):  # every byte of a page, each set alone
        page[pos] = 0x80
        assert not digest.is_zero(page), pos
        page[pos] = 0
    assert digest.is_zero(page)


@pytest.mark.parametrize("length", [0, 1, 7, 9, 63, 65, 100])
def test_zero_detection_tails(length):
    buf = bytearray(length)
    assert digest.is_zero(buf)
    if length:
        buf[-1] = 1
        assert not digest.is_zero(buf)


def test_zero_map_marks_exactly_the_zero_pages():
    npages = 64
    rng = random.Random(6)
    buf = bytearray(npages * PAGE)
    nonzero = sorted(rng.sample(range(npages), 20))
    for i in nonzero:
        buf[i * PAGE + rng.randrange(PAGE)] = rng.randrange(1, 256)
    zmap = digest.zero_map(buf)
    assert [i for i in range(npages) if not zmap[i]] == nonzero
    pointer = ffi.from_buffer("uint8_t[]", buf)
    out = ffi.new("uint8_t[]", npages)
    assert lib.wl_zero_map(pointer, npages, PAGE, out) == npages - len(nonzero)


def test_untouched_private_mapping_is_all_zero_pages():
    region = mmap.mmap(-1, 256 * PAGE, flags=mmap.MAP_PRIVATE)
    try:
        assert set(digest.zero_map(region)) == {1}
        region[PAGE * 100 + 5] = 9
        zmap = digest.zero_map(region)
        assert [i for i, z in enumerate(zmap) if not z] == [100]
    finally:
        region.close()


# ---- the region digest -----------------------------------------------------------------------


def test_region_digest_definition():
    data = random.Random(7).randbytes(8 * PAGE)
    hashes = [_xxh64_spec(data[i : i + PAGE]) for i in range(0, len(data), PAGE)]
    want = hashlib.blake2b(struct.pack("<8Q", *hashes), digest_size=32).hexdigest()
    assert digest.region_digest(data) == f"{digest.DIGEST_ALGORITHM}:{want}"
    assert digest.DIGEST_ALGORITHM == "xxh64-4k+blake2b256"


def test_region_digest_same_bytes_same_digest_any_buffer_type():
    data = random.Random(8).randbytes(16 * PAGE)
    region = mmap.mmap(-1, len(data), flags=mmap.MAP_PRIVATE)
    try:
        region[:] = data
        assert digest.region_digest(region) == digest.region_digest(data)
        assert digest.region_digest(memoryview(bytearray(data))) == digest.region_digest(data)
    finally:
        region.close()


def test_region_digest_depends_on_page_order():
    a, b = bytes([1]) * PAGE, bytes([2]) * PAGE
    assert digest.region_digest(a + b) != digest.region_digest(b + a)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="not a multiple of the page size 4096"):
        digest.page_hashes(bytes(PAGE + 1))
    with pytest.raises(ValueError, match="page_size must be a positive multiple of 8"):
        digest.page_hashes(bytes(PAGE), page_size=0)
    with pytest.raises(ValueError, match="page_size must be a positive multiple of 8"):
        digest.zero_map(bytes(PAGE), page_size=100)
    with pytest.raises(TypeError, match="expected a buffer"):
        digest.region_digest("not a buffer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="array\\('Q'\\)"):
        digest.digest_of_hashes(array("B", b"12345678"))


def test_empty_buffer():
    assert len(digest.page_hashes(b"")) == 0
    assert digest.region_digest(b"").startswith(digest.DIGEST_ALGORITHM + ":")
