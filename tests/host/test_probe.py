"""The fault probe against real page protections (x86-64: SDM Vol. 3A 4.6 access rights, 4.7
page-fault error code; Linux reports them as SIGSEGV with SEGV_MAPERR for a non-present mapping
and SEGV_ACCERR for a present one the access is not allowed on)."""

from __future__ import annotations

import pytest

from migrate import memory
from migrate.memory import PAGE_SIZE, Region
from migrate.probe import probe, touch_pages

pytestmark = pytest.mark.host


def test_prot_none_guard_page_gives_accerr_at_the_exact_address():
    with Region.anonymous(2 * PAGE_SIZE) as region:
        region.protect("none", PAGE_SIZE, PAGE_SIZE)
        assert not probe(region.address + PAGE_SIZE - 1, "write").faulted
        result = probe(region.address + PAGE_SIZE + 5, "read")
        assert result.faulted and result.signal_name == "SIGSEGV"
        assert result.si_code_name == "SEGV_ACCERR"
        assert result.si_addr == region.address + PAGE_SIZE + 5


def test_write_to_read_only_page_gives_accerr_and_reads_still_work():
    with Region.anonymous(PAGE_SIZE) as region:
        region[0] = 0x5A
        region.protect("r")
        assert not probe(region.address, "read").faulted
        result = probe(region.address + 8, "write")
        assert (result.signal_name, result.si_code_name) == ("SIGSEGV", "SEGV_ACCERR")
        assert result.si_addr == region.address + 8
        assert region[0] == 0x5A


@pytest.mark.skipif(__import__("platform").machine() != "x86_64",
                    reason="the #PF error code comes from the x86-64 signal frame")
def test_probe_reports_the_page_fault_error_code_from_the_signal_frame():
    # SDM Vol. 3A 4.7: P (bit 0) = 1 for a protection violation on a present page, W/R (bit 1)
    # for a write, U/S (bit 2) for user mode. A PROT_NONE PTE is not present to the hardware.
    with Region.anonymous(PAGE_SIZE) as region:
        region[0] = 1
        region.protect("r")
        ro_write = probe(region.address, "write")
        region.protect("none")
        none_read = probe(region.address, "read")
    assert (ro_write.trapno, ro_write.error_code) == (14, 0x7)
    assert (none_read.trapno, none_read.error_code) == (14, 0x4)


def test_unmapped_address_gives_maperr():
    addr = memory.mmap(PAGE_SIZE)
    memory.munmap(addr, PAGE_SIZE)
    result = probe(addr + 16, "read")
    assert (result.signal_name, result.si_code_name, result.si_addr) == (
        "SIGSEGV", "SEGV_MAPERR", addr + 16)
    assert probe(0, "write").si_code_name == "SEGV_MAPERR"


def test_fetch_from_rw_page_faults_and_from_rx_page_returns():
    with Region.anonymous(2 * PAGE_SIZE) as region:
        region[0] = 0xC3  # ret
        region[PAGE_SIZE] = 0xC3
        # NX (SDM 4.6: instruction fetch from a page with XD=1): RW data is not executable
        result = probe(region.address, "fetch")
        assert (result.signal_name, result.si_code_name) == ("SIGSEGV", "SEGV_ACCERR")
        assert result.si_addr == region.address
        region.protect("rx", PAGE_SIZE, PAGE_SIZE)
        assert not probe(region.address + PAGE_SIZE, "fetch").faulted


def test_write_probe_keeps_the_value_and_the_process_survives_many_faults():
    with Region.anonymous(PAGE_SIZE) as region:
        region[100] = 0x77
        assert not probe(region.address + 100, "write").faulted
        assert region[100] == 0x77
        region.protect("none")
        codes = {probe(region.address + i, "read").si_code_name for i in range(0, 4096, 512)}
        assert codes == {"SEGV_ACCERR"}


def test_bad_probe_arguments_are_rejected():
    with pytest.raises(ValueError, match="probe kind"):
        probe(0x1000, "execute")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        probe(-1, "read")


def test_toucher_reports_one_latency_per_page_and_populates():
    with Region.anonymous(8 * PAGE_SIZE) as region:
        lat = touch_pages((region.address, 8, PAGE_SIZE), write=True)
        assert len(lat) == 8 and all(v > 0 for v in lat)
        assert all(e.present for e in region.pagemap())


def test_madvise_guard_region_faults_and_shows_in_pagemap():
    from migrate.memory import PageCategory, pagemap_scan

    with Region.anonymous(4 * PAGE_SIZE) as region:
        region.populate(write=True)
        try:
            region.advise("GUARD_INSTALL", PAGE_SIZE, PAGE_SIZE)
        except OSError as exc:  # EINVAL before Linux 6.13
            pytest.skip(f"MADV_GUARD_INSTALL unsupported: {exc}")
        # a guard marker replaces the page: the fault is SIGSEGV as for no mapping at all
        result = probe(region.page_address(1) + 9, "read")
        assert (result.signal_name, result.si_code_name) == ("SIGSEGV", "SEGV_MAPERR")
        assert result.si_addr == region.page_address(1) + 9
        assert [(e.present, e.guard) for e in region.pagemap()] == [
            (True, False), (False, True), (True, False), (True, False)]
        runs = pagemap_scan("self", region.address, region.end, require=PageCategory.GUARD)
        assert [(s, e) for s, e, _ in runs] == [(region.page_address(1), region.page_address(2))]
        region.advise("GUARD_REMOVE", PAGE_SIZE, PAGE_SIZE)
        assert not probe(region.page_address(1), "write").faulted
