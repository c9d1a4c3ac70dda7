"""stack-growth, zero-page, mmap-shared-private, sparse-file, zero-copy-ipc."""

from __future__ import annotations

import os

import pytest

PG = 4096
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="PFNs in pagemap need CAP_SYS_ADMIN")


@pytest.mark.host
def test_stack_growth_host(host_part) -> None:
    r = host_part("stack-growth")
    u, s = r.evidence["uffd_region"], r.evidence["kernel_stack"]
    assert u["faults"] == u["pages"] and u["fault_order_is_touch_order"]
    assert u["present_grew_one_per_fault"] and u["present_after"] == u["pages"]
    assert s["monotonic"] and s["covers_depth"] and s["vma_size_last"] > s["vma_size_first"]
    # mm/mmap.c acct_stack_growth: growth beyond RLIMIT_STACK fails, the access is SIGSEGV.
    assert r.evidence["beyond_rlimit"]["child_signal"] == "SIGSEGV"
    assert r.ok


def test_stack_growth_sim(sim_part) -> None:
    r = sim_part("stack-growth")
    g = r.evidence["guard_gap"]
    assert r.evidence["stack_grow_faults"] == 31
    assert g["refused"]["si_code"] == "SEGV_MAPERR" and g["stack_start_unchanged"]
    assert r.ok


@pytest.mark.host
def test_zero_page_host(host_part) -> None:
    r = host_part("zero-page")
    ev = r.evidence
    assert ev["pages_present_after_read"] == (1 << 30) // PG
    assert ev["rss_anon_growth_read"] < 4 << 20
    assert abs(ev["rss_anon_growth_write_pages"] - ev["write_pages"]) <= 64
    if os.geteuid() == 0:
        assert ev["distinct_pfns_after_read"] == 1 and ev["kpageflags_zero_page"]
        assert ev["distinct_pfns_written"] == ev["write_pages"]
    assert r.ok


def test_zero_page_sim(sim_part) -> None:
    r = sim_part("zero-page")
    ev = r.evidence
    assert ev["all_zero_frame"] and ev["rss_pages_after_read"] == 0
    # SDM 4.7: a write to a present read-only user page: P | W/R | U/S.
    assert ev["first_write"] == {"error_code": "0x7", "resolution": "cow"}
    # After fork both map the frame (refcount 2); the child's write copies: 1 and 1.
    assert ev["refcount_after_fork"] == 2 and ev["refcounts_after_child_write"] == [1, 1]
    assert r.ok


@pytest.mark.host
def test_mmap_shared_private_host(host_part) -> None:
    r = host_part("mmap-shared-private")
    rules = r.evidence["rules"]
    assert rules["shared_write_seen_by_other_process"] and rules["shared_write_in_file"]
    assert rules["private_write_not_in_file"] and rules["private_write_not_seen_by_other"]
    if os.geteuid() == 0:
        assert rules["shared_same_frame"] and rules["private_write_gets_new_frame"]
    assert r.ok


def test_mmap_shared_private_sim(sim_part) -> None:
    r = sim_part("mmap-shared-private")
    ev = r.evidence
    assert len(set(ev["shared_frames"])) == 1
    assert ev["private_frame_before_write"] == ev["page_cache_frame1"]
    assert ev["private_frame_after_write"] != ev["page_cache_frame1"]
    assert ev["page_cache_page1"] == "file-content"
    assert r.ok


@pytest.mark.host
def test_sparse_file_host(host_part) -> None:
    r = host_part("sparse-file")
    ev = r.evidence
    assert ev["st_blocks_after_reading_all"] == ev["st_blocks_before"]
    assert ev["sampled_nonzero_pages"] == []
    past = ev["past_eof"]["read_after_eof_page"]
    # mm/filemap.c filemap_fault: beyond i_size -> VM_FAULT_SIGBUS -> SIGBUS/BUS_ADRERR.
    assert (past["signal"], past["si_code"]) == ("SIGBUS", "BUS_ADRERR")
    assert past["si_addr"] == ev["past_eof"]["expected_si_addr"]
    assert r.ok


def test_sparse_file_sim(sim_part) -> None:
    r = sim_part("sparse-file")
    ev = r.evidence
    assert ev["hole_frames"] == [ev["zero_frame"]] and ev["allocated_blocks"] == 1
    assert ev["past_eof"]["signo"] == "SIGBUS"
    assert r.ok


@pytest.mark.host
def test_zero_copy_ipc_host(host_part) -> None:
    r = host_part("zero-copy-ipc")
    m, p = r.evidence["memfd"], r.evidence["pipe"]
    assert m["digest_matches"] and p["digest_matches"]
    assert m["child_rchar"] < PG  # only the fd travelled
    assert p["bytes_copied"] >= 2 * r.evidence["size"]  # into the pipe and out again
    if os.geteuid() == 0:
        assert m["pages_on_same_frames"] == m["pages"]
    assert r.ok


def test_zero_copy_ipc_sim(sim_part) -> None:
    r = sim_part("zero-copy-ipc")
    ev = r.evidence
    assert ev["frames_moved"] and ev["client_reads_messages"]
    assert ev["data_bytes_written_during_transfer"] == 0
    assert ev["data_frames_allocated_during_transfer"] == 0 and ev["cow_copies"] == 0
    assert r.ok
