"""Page hashes and region digests: how both ends prove a migrated region is byte-identical.

Algorithm (``DIGEST_ALGORITHM``):

* every 4 KiB unit of the region is hashed with XXH64 (seed 0, the algorithm of Yann Collet's
  "xxHash fast digest algorithm" spec; native/wl_digest.c) into a 64-bit page hash;
* the region digest is BLAKE2b-256 over the page hashes as little-endian 64-bit integers, in page
  order, written ``"xxh64-4k+blake2b256:<64 hex digits>"``.

The region digest always hashes 4 KiB units, whatever page size the region is mapped with, so a
region backed by huge pages on one host and small pages on the other still compares equal.
``page_hashes`` can use another unit (e.g. 2 MiB) for per-page comparisons.

All hashing runs in C with the GIL released, so it may read pages that are still arriving by
userfaultfd (the faulting thread blocks, not the interpreter).
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from typing import Any

from migrate._native import ffi, lib

DIGEST_ALGORITHM = "xxh64-4k+blake2b256"
DIGEST_UNIT = 4096

_Buffer = Any  # anything exporting the buffer protocol: bytes, bytearray, mmap, memoryview


def _byte_pointer(buffer: _Buffer) -> tuple[Any, int]:
    """A uint8_t* over ``buffer`` (no copy) and its length in bytes."""
    try:
        pointer = ffi.from_buffer("uint8_t[]", buffer)
    except TypeError as exc:
        raise TypeError(f"expected a buffer (bytes, bytearray, mmap, memoryview): {exc}") from None
    return pointer, len(pointer)


def _check_page_size(page_size: int, length: int) -> int:
    if not isinstance(page_size, int) or page_size <= 0 or page_size % 8 != 0:
        raise ValueError(f"page_size must be a positive multiple of 8, got {page_size!r}")
    if length % page_size != 0:
        raise ValueError(f"buffer length {length} is not a multiple of the page size {page_size}")
    return length // page_size


def page_hashes(buffer: _Buffer, page_size: int = DIGEST_UNIT) -> array:
    """The XXH64 of every ``page_size`` bytes of ``buffer``, as ``array('Q')`` in page order."""
    pointer, length = _byte_pointer(buffer)
    npages = _check_page_size(page_size, length)
    out = array("Q", bytes(8 * npages))
    if npages:
        out_pointer = ffi.from_buffer("uint64_t[]", out, require_writable=True)
        lib.wl_hash_pages(pointer, npages, page_size, out_pointer)
        ffi.release(out_pointer)
    ffi.release(pointer)
    return out


def zero_map(buffer: _Buffer, page_size: int = DIGEST_UNIT) -> bytearray:
    """One byte per page: 1 if every byte of that page is zero, else 0 (exact, not hashed)."""
    pointer, length = _byte_pointer(buffer)
    npages = _check_page_size(page_size, length)
    out = bytearray(npages)
    if npages:
        out_pointer = ffi.from_buffer("uint8_t[]", out, require_writable=True)
        lib.wl_zero_map(pointer, npages, page_size, out_pointer)
        ffi.release(out_pointer)
    ffi.release(pointer)
    return out


def is_zero(buffer: _Buffer) -> bool:
    """True if every byte of ``buffer`` is zero."""
    pointer, length = _byte_pointer(buffer)
    result = bool(lib.wl_page_is_zero(pointer, length))
    ffi.release(pointer)
    return result


def digest_of_hashes(hashes: array | bytes) -> str:
    """The region digest from its 4 KiB page hashes (as returned by ``page_hashes``)."""
    if isinstance(hashes, array):
        if hashes.typecode != "Q":
            raise TypeError(f"page hashes must be array('Q'), got array({hashes.typecode!r})")
        if sys.byteorder != "little":
            hashes = array("Q", hashes)
            hashes.byteswap()
        data = hashes.tobytes()
    else:
        data = bytes(hashes)
        if len(data) % 8:
            raise ValueError(f"page hash bytes must be a multiple of 8 long, got {len(data)}")
    return f"{DIGEST_ALGORITHM}:{hashlib.blake2b(data, digest_size=32).hexdigest()}"


def region_digest(buffer: _Buffer) -> str:
    """``"xxh64-4k+blake2b256:<hex>"`` for the whole buffer (length a multiple of 4 KiB)."""
    return digest_of_hashes(page_hashes(buffer, DIGEST_UNIT))


def diff_pages(hashes_a: array | bytes, hashes_b: array | bytes) -> list[int]:
    """Indexes of the pages whose hashes differ (both lists must cover the same pages)."""
    a = _as_hash_array(hashes_a, "hashes_a")
    b = _as_hash_array(hashes_b, "hashes_b")
    if len(a) != len(b):
        raise ValueError(f"page hash lists differ in length: {len(a)} pages vs {len(b)}")
    # Compare in 4096-hash chunks as bytes first: identical chunks (the normal case) cost one
    # memcmp each instead of a Python-level loop over every page.
    differing: list[int] = []
    chunk = 4096
    for start in range(0, len(a), chunk):
        stop = min(start + chunk, len(a))
        if a[start:stop] != b[start:stop]:
            differing.extend(i for i in range(start, stop) if a[i] != b[i])
    return differing


def _as_hash_array(hashes: array | bytes, name: str) -> array:
    if isinstance(hashes, array):
        if hashes.typecode != "Q":
            raise TypeError(f"{name} must be array('Q'), got array({hashes.typecode!r})")
        return hashes
    data = bytes(hashes)
    if len(data) % 8:
        raise ValueError(f"{name} must be a multiple of 8 bytes long, got {len(data)}")
    return array("Q", data)
