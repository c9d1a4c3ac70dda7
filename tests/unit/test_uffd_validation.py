"""Argument validation of the binding: bad input is a clear exception before any syscall."""

from __future__ import annotations

import pytest

from migrate import memory
from migrate._sys import check
from migrate.memory import PAGE_SIZE, Region
from migrate.uffd import Feature, RegisterMode, Userfaultfd, _parse_mode


def test_feature_parse_accepts_names_and_rejects_unknown():
    assert Feature.parse("wp_async|THREAD_ID") == Feature.WP_ASYNC | Feature.THREAD_ID
    assert Feature.parse(["UFFD_FEATURE_MOVE", "poison"]) == Feature.MOVE | Feature.POISON
    assert Feature.parse(0) == Feature(0)
    with pytest.raises(ValueError, match="unknown userfaultfd feature 'WP_SYNC'.*WP_ASYNC"):
        Feature.parse("WP_SYNC")
    with pytest.raises(ValueError, match="unknown userfaultfd feature bits 0x20000"):
        Feature.parse(1 << 17)
    with pytest.raises(TypeError):
        Feature.parse([3.5])  # type: ignore[list-item]


def test_all_seventeen_features_are_known_by_name():
    names = [f.name for f in Feature]
    assert len(names) == 17
    assert names[0] == "PAGEFAULT_FLAG_WP" and names[-1] == "MOVE"
    assert [int(f) for f in Feature] == [1 << i for i in range(17)]


def test_register_mode_parsing():
    assert _parse_mode("missing|wp") == RegisterMode.MISSING | RegisterMode.WP
    with pytest.raises(ValueError, match="unknown register mode 'MISSED'"):
        _parse_mode("MISSED")
    with pytest.raises(ValueError, match="must include"):
        _parse_mode(0)
    with pytest.raises(ValueError, match="unknown register mode bits"):
        _parse_mode(8)


def test_check_picks_the_oserror_subclass_and_names_the_call():
    with pytest.raises(FileExistsError, match=r"ioctl\(UFFDIO_COPY\): File exists"):
        check(-17, "ioctl(UFFDIO_COPY)")
    with pytest.raises(BlockingIOError):
        check(-11, "read")
    with pytest.raises(PermissionError):
        check(-1, "userfaultfd")
    assert check(5, "ok") == 5


def test_region_argument_errors():
    with pytest.raises(ValueError, match="positive"):
        Region.anonymous(0)
    with pytest.raises(ValueError, match="hugetlb"):
        Region.anonymous(PAGE_SIZE, hugetlb="4K")
    with pytest.raises(ValueError, match="not aligned"):
        Region.anonymous(PAGE_SIZE, address=PAGE_SIZE + 1)
    with Region.anonymous(2 * PAGE_SIZE) as region:
        with pytest.raises(ValueError, match="outside the region"):
            region.protect("r", PAGE_SIZE, 2 * PAGE_SIZE)
        with pytest.raises(ValueError, match="not aligned"):
            region.advise("DONTNEED", 100)
        with pytest.raises(ValueError, match="unknown madvise advice 'DONT'"):
            region.advise("DONT")
        with pytest.raises(ValueError, match="protection letter"):
            region.protect("rwq")
        with pytest.raises(IndexError):
            region.page_address(2)
    with pytest.raises(ValueError, match="closed"):
        region.protect("r")
    with pytest.raises(ValueError, match="not aligned"):
        memory.munmap(PAGE_SIZE + 3, PAGE_SIZE)


@pytest.fixture
def uffd():
    try:
        handle = Userfaultfd.open()
    except (OSError, Exception) as exc:  # noqa: BLE001 - any refusal means: not on this host
        pytest.skip(f"userfaultfd unavailable: {exc}")
    with handle:
        yield handle


def test_misaligned_and_outside_ranges_are_rejected(uffd):
    with Region.anonymous(4 * PAGE_SIZE) as region:
        with pytest.raises(ValueError, match="not page-aligned"):
            uffd.register(region.address + 1, PAGE_SIZE)
        with pytest.raises(ValueError, match="multiple of the page size"):
            uffd.register(region.address, 100)
        uffd.register(region.address, 2 * PAGE_SIZE, "MISSING")
        with pytest.raises(ValueError, match="outside every registered range"):
            uffd.copy(region.page_address(3), b"\0" * PAGE_SIZE)
        with pytest.raises(ValueError, match="outside every registered range"):
            uffd.zeropage(region.page_address(1), 2 * PAGE_SIZE)
        with pytest.raises(ValueError, match="exceeds"):
            uffd.copy(region.address, b"\0" * 10, PAGE_SIZE)
        with pytest.raises(ValueError, match="fewer than 2 pages"):
            uffd.copy_pages([region.address, region.page_address(1)], b"\0" * PAGE_SIZE)
        with pytest.raises(ValueError, match="max_events"):
            uffd.read_events(0)
        uffd.unregister(region.address, PAGE_SIZE)
        with pytest.raises(ValueError, match="outside every registered range"):
            uffd.copy(region.address, b"\0" * PAGE_SIZE)
    uffd.close()
    with pytest.raises(ValueError, match="closed"):
        uffd.fileno()


def test_kernel_errors_name_the_ioctl(uffd):
    # registering memory that is not mapped: the kernel says EINVAL/ENOMEM, we name the ioctl
    addr = memory.mmap(PAGE_SIZE)
    memory.munmap(addr, PAGE_SIZE)
    with pytest.raises(OSError, match=r"UFFDIO_REGISTER"):
        uffd.register(addr, PAGE_SIZE)
