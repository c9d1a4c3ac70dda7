"""Staged pre-copy pages at the destination (migrate.staging) on the real kernel: pages kept aside,
replaced when sent again, dropped when stale, installed into a MISSING-registered region with
UFFDIO_COPY/ZEROPAGE, and the staging memory released behind the install cursor."""

from __future__ import annotations

from array import array

import pytest

from migrate import digest
from migrate.memory import PAGE_SIZE, Region
from migrate.staging import DATA, FREE_CHUNK, ZERO, ZERO_PAGE_HASH, Staging
from migrate.uffd import RegisterMode, Userfaultfd

pytestmark = pytest.mark.host
NPAGES = 1024  # 4 MiB: two FREE_CHUNKs


def page(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (PAGE_SIZE // 4)


@pytest.fixture
def target(need):
    need()
    region = Region.anonymous(NPAGES * PAGE_SIZE)
    fd = Userfaultfd.open(0)
    fd.register(region.address, region.size, RegisterMode.MISSING)
    staging = Staging(NPAGES, PAGE_SIZE)
    yield region, fd, staging
    staging.close()
    fd.close()
    region.close()


def present_pages(region: Region) -> list[int]:
    return [i for i, e in enumerate(region.pagemap(0, NPAGES)) if e.present]


def test_store_keeps_the_latest_copy_and_the_hash_of_each_page(target):
    region, fd, st = target
    hashes = array("Q", bytes(8 * NPAGES))
    # A contiguous batch, then a scattered one with a zero page and two pages sent again.
    first, again = st.store(array("I", range(0, 8)), bytes(8),
                            b"".join(page(i) for i in range(8)), hashes)
    assert (first, again) == (8, 0)
    first, again = st.store(array("I", [3, 5, 700]), bytes([0, 1, 0]),
                            page(1003) + page(1700), hashes)
    assert (first, again) == (1, 2)
    assert st.state[3] == DATA and st.state[5] == ZERO and st.state[700] == DATA
    assert st.state[8] == 0 and st.remaining() == 9
    assert hashes[3] == digest.page_hashes(page(1003))[0]
    assert hashes[5] == ZERO_PAGE_HASH
    assert hashes[700] == digest.page_hashes(page(1700))[0]
    assert st.region.read(3 * PAGE_SIZE, PAGE_SIZE) == page(1003)
    assert present_pages(region) == []  # nothing reaches the guest's region by storing


def test_stale_pages_are_never_installed_and_the_rest_are(target):
    region, fd, st = target
    hashes = array("Q", bytes(8 * NPAGES))
    st.store(array("I", range(NPAGES)), bytes(NPAGES),
             b"".join(page(i) for i in range(NPAGES)), hashes)
    st.store(array("I", [10, 11]), bytes([1, 1]), b"", hashes)  # re-sent as zero pages
    assert st.drop(array("I", [4, 500, 501])) == 3
    assert st.drop(array("I", [4])) == 0  # already gone
    present = bytearray(NPAGES)
    total = 0
    while (newly := st.install_next(fd.fileno(), region.address, present, 100)) is not None:
        total += newly
    assert total == NPAGES - 3
    assert [i for i in range(NPAGES) if not present[i]] == [4, 500, 501]
    assert sorted(set(range(NPAGES)) - set(present_pages(region))) == [4, 500, 501]
    assert region.read(9 * PAGE_SIZE, PAGE_SIZE) == page(9)
    assert region.read(10 * PAGE_SIZE, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
    assert region.read((NPAGES - 1) * PAGE_SIZE, PAGE_SIZE) == page(NPAGES - 1)
    assert st.remaining() == 0


def test_a_page_already_in_the_guest_is_skipped_not_overwritten(target):
    region, fd, st = target
    hashes = array("Q", bytes(8 * NPAGES))
    st.store(array("I", range(4)), bytes(4), b"".join(page(i) for i in range(4)), hashes)
    fd.copy(region.address + 2 * PAGE_SIZE, page(777))  # arrived by a fault reply meanwhile
    present = bytearray(NPAGES)
    reached, newly = st.install(fd.fileno(), region.address, present, 0, 4, 64)
    assert (reached, newly) == (4, 4)
    assert region.read(2 * PAGE_SIZE, PAGE_SIZE) == page(777)
    assert region.read(3 * PAGE_SIZE, PAGE_SIZE) == page(3)


def test_install_stops_after_the_page_budget_and_releases_memory_behind_it(target):
    region, fd, st = target
    hashes = array("Q", bytes(8 * NPAGES))
    st.store(array("I", range(NPAGES)), bytes(NPAGES),
             b"".join(page(i) for i in range(NPAGES)), hashes)
    present = bytearray(NPAGES)
    chunk_pages = FREE_CHUNK // PAGE_SIZE
    assert st.install_next(fd.fileno(), region.address, present, chunk_pages + 8) == \
        chunk_pages + 8
    assert st.cursor == chunk_pages + 8
    # The first huge-page-sized piece of staging is given back; the rest is still resident.
    resident = [e.present for e in st.region.pagemap(0, NPAGES)]
    assert not any(resident[:chunk_pages])
    assert all(resident[chunk_pages:])


def test_a_failed_install_names_the_pages(target):
    region, fd, st = target
    hashes = array("Q", bytes(8 * NPAGES))
    st.store(array("I", [0]), bytes(1), page(1), hashes)
    present = bytearray(NPAGES)
    fd.unregister(region.address, region.size)
    with pytest.raises(OSError, match="installing staged pages 0..1"):
        st.install(fd.fileno(), region.address, present, 0, 1, 8)
