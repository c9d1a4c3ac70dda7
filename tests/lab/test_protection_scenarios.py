"""wx-nx, jit-shootdown, guard-page, aslr, pku."""

from __future__ import annotations

import pytest

from migrate.sim import PF_ID, PF_P, PF_PK, PF_US, PF_WR


@pytest.mark.host
def test_wx_nx_host(host_part) -> None:
    r = host_part("wx-nx")
    c = r.evidence["child"]
    rw = c["fetch_from_rw"]
    assert (rw["signal"], rw["si_code"]) == ("SIGSEGV", "SEGV_ACCERR")
    assert rw["si_addr"] == c["address"] and rw["trapno"] == 14
    # SDM 4.7: an instruction fetch from a present user page with XD=1: P | U/S | I/D.
    assert rw["error_code"] == PF_P | PF_US | PF_ID
    assert c["fetch_from_rx"] == {"faulted": False, "ret": 42}
    assert c["store_to_rx"]["error_code"] == PF_P | PF_WR | PF_US
    assert r.evidence["raw_call"]["signal"] == "SIGSEGV"
    assert r.ok


def test_wx_nx_sim(sim_part) -> None:
    r = sim_part("wx-nx")
    ev = r.evidence
    assert ev["nx_bit_on_rw_page"] and not ev["nx_bit_after_rx"]
    assert ev["fetch_from_rw"]["error_code"] == PF_P | PF_US | PF_ID
    assert ev["fetch_unmapped"]["error_code"] == PF_US | PF_ID  # not present: P=0
    assert r.ok


@pytest.mark.host
def test_jit_shootdown_host(host_part) -> None:
    r = host_part("jit-shootdown")
    ev = r.evidence
    n = ev["iterations"]
    assert ev["child"]["alone"]["right"] == n and ev["child"]["with_thread"]["right"] == n
    # The second thread makes the other CPU receive TLB-flush IPIs; alone it (almost) does not.
    assert ev["ipis_to_other_cpu_with_thread"] >= 3
    assert ev["ipis_to_other_cpu_alone"] * 2 < ev["ipis_to_other_cpu_with_thread"]
    assert r.ok


def test_jit_shootdown_sim(sim_part) -> None:
    r = sim_part("jit-shootdown")
    safe, stale = r.evidence["with_shootdown"], r.evidence["without_shootdown"]
    assert safe["ipis"] >= 1 and safe["late_write_from_core1"].startswith("SIGSEGV")
    assert stale["late_write_from_core1"] == "succeeded" and not stale["pte_writable"]
    assert stale["core0_executes"] != r.evidence["code"]  # core 0 ran the patched code
    assert r.ok


@pytest.mark.host
def test_guard_page_host(host_part) -> None:
    r = host_part("guard-page")
    rows = r.evidence["prot_none"]
    assert len(rows) == 6
    assert all(row["si_code"] == "SEGV_ACCERR" for row in rows)
    assert all(int(row["fault_at"], 16) % 4096 == 0 for row in rows)  # the guard page's start
    assert r.evidence["raw_overflow"]["signal"] == "SIGSEGV"
    assert r.ok


def test_guard_page_sim(sim_part) -> None:
    r = sim_part("guard-page")
    rows = r.evidence["buffers"]
    assert all(row["si_code"] == "SEGV_ACCERR" for row in rows)
    assert all(row["error_code"] == hex(PF_WR | PF_US) for row in rows)  # PROT_NONE: P=0
    assert r.ok


@pytest.mark.host
def test_aslr_host(host_part) -> None:
    r = host_part("aslr")
    ev = r.evidence
    if ev["randomize_va_space"] != "2":
        pytest.skip(f"kernel.randomize_va_space is {ev['randomize_va_space']}")
    for name in ("exe", "heap", "mmap", "libc", "stack", "vdso"):
        reg = ev["regions"][name]
        assert reg["distinct"] >= 0.95 * reg["samples"], name
        assert reg["distinct_without_aslr"] == 1, name
    assert ev["regions"]["stack"]["varying_bits"] >= 21
    assert ev["regions"]["heap_above_exe"]["varying_bits"] >= 17
    assert ev["plt_got_static"]["pie"] and ev["plt_got_static"]["jump_slots"] > 0
    live = ev["plt_got_live"]
    assert live["bound_to_dlsym_address"] > 0
    assert all(x["holds"] == x["dlsym"] for x in live["examples"] if x["kind"] == "bound")
    assert r.ok


def test_aslr_sim(sim_part) -> None:
    r = sim_part("aslr")
    ev = r.evidence
    assert ev["layouts_without_aslr"] == 1
    for call in ev["lazy_binding"]:
        assert call["got_before"] == call["plt_entry_plus_6"]  # lazy: back into PLT[n]
        assert call["got_after"] == call["getpid"] and call["resolutions"] == 1
    assert r.ok


@pytest.mark.host
def test_pku_host(host_part) -> None:
    r = host_part("pku")
    ev = r.evidence
    if ev["cpu_flag_pku"]:
        assert r.status == "ran"
        assert r.evidence["child"]["read_denied"]["si_code"] == "SEGV_PKUERR"
    else:
        assert r.status == "not-exposed" and ev["pkey_alloc"] is None
        assert ev["pkey_alloc_errno"] in ("EINVAL", "ENOSPC") and "pku" in r.reason
    assert r.ok


def test_pku_sim(sim_part) -> None:
    r = sim_part("pku")
    ev = r.evidence
    assert all(v == 0 for v in ev["pkey_set_cost"].values())
    assert ev["denied_on_core0"]["si_code"] == "SEGV_PKUERR"
    assert ev["denied_on_core0"]["error_code"] & PF_PK
    assert ev["core1_reads"] == "data"
    assert ev["mprotect_cost"]["ipis"] >= 1
    assert r.ok
