"""iommu-iova, dma-teardown, huge-pages, page-colouring, live-migration."""

from __future__ import annotations

import os

import pytest


@pytest.mark.host
def test_iommu_iova_host(host_part) -> None:
    r = host_part("iommu-iova")
    ev = r.evidence
    if ev["sys_class_iommu"]:
        assert r.status == "ran" and ev["iommu_groups"] > 0
    else:
        assert r.status == "not-exposed" and "no IOMMU" in r.reason
    assert r.ok


def test_iommu_iova_sim(sim_part) -> None:
    r = sim_part("iommu-iova")
    ev = r.evidence
    nic, gpu = ev["devices"]["demo-nic"], ev["devices"]["demo-gpu"]
    assert ev["same_iova_numbers"] and nic["frames"] != gpu["frames"]
    assert not nic["frames_contiguous"] and nic["landed_in_own_frames"]
    assert ev["cross_domain_probe"]["status"] == "error"
    assert r.ok


@pytest.mark.host
def test_dma_teardown_host(host_part) -> None:
    r = host_part("dma-teardown")
    ev = r.evidence
    assert ev["vmlck_locked"] - ev["vmlck_before"] == ev["size"]
    assert ev["pages_present_while_locked"] == ev["pages"]
    assert ev["vmlck_after"] == ev["vmlck_before"]
    assert r.ok


def test_dma_teardown_sim(sim_part) -> None:
    r = sim_part("dma-teardown")
    outcomes = {(row["mode"], tuple(row["order"])): row["outcome"] for row in r.evidence["orders"]}
    assert outcomes[("strict", ("wait", "unmap", "unpin", "free"))] == "safe"
    assert outcomes[("strict", ("unpin", "free", "wait", "unmap"))] == "use-after-free"
    assert outcomes[("lazy", ("wait", "unmap", "unpin", "free", "late_write"))] == "use-after-free"
    assert outcomes[("lazy", ("wait", "unmap", "flush", "unpin", "free", "late_write"))] == "safe"
    assert r.ok


@pytest.mark.host
@pytest.mark.skipif(os.geteuid() != 0, reason="hugetlb pools need root")
def test_huge_pages_host(host_part) -> None:
    r = host_part("huge-pages")
    ev = r.evidence
    c = ev["configs"]
    assert c["4k"]["anon_huge_bytes"] == 0
    assert c["thp"]["anon_huge_bytes"] >= ev["buffer"] // 2
    assert c["hugetlb_2m"]["first_huge_page_physically_contiguous"]
    # What was added to each pool was given back (compared per reservation: the pool totals
    # are shared with anything else on the machine).
    assert all(r["given_back"] == r["added"] for r in ev["reservations"])
    assert ev["reservations"][0]["added"] == ev["buffer"] >> 21  # the 2 MiB pool
    assert r.ok


def test_huge_pages_sim(sim_part) -> None:
    r = sim_part("huge-pages")
    tlb, frag = r.evidence["tlb"], r.evidence["fragmentation"]
    assert tlb["4k"]["walk_rate"] > 0.5 and tlb["2m"]["walks"] <= 16
    assert frag["huge_fault_before"] == "thp-fallback" and frag["huge_fault_after"] == "thp"
    assert frag["data_intact_after_compaction"]
    assert r.ok


@pytest.mark.host
def test_page_colouring_host(host_part) -> None:
    r = host_part("page-colouring")
    g = r.evidence["l1d"]
    assert g["colours"] == max(1, g["way_size"] // g["page_size"])
    assert r.status == ("ran" if g["colours"] > 1 else "not-exposed")
    assert r.ok


def test_page_colouring_sim(sim_part) -> None:
    r = sim_part("page-colouring")
    off, on = r.evidence["uncoloured"], r.evidence["coloured"]
    assert off["synonyms"] > 0 and off["stale_reads"] > 0
    assert on["synonyms"] == 0 and on["stale_reads"] == 0
    assert r.ok


@pytest.mark.host
def test_live_migration_host(host_part) -> None:
    from migrate.check import capabilities

    u = capabilities().get("userfaultfd") or {}
    if not u.get("available"):
        pytest.skip(f"userfaultfd unavailable: {u.get('error')}")
    r = host_part("live-migration")
    ev = r.evidence
    assert ev["digest"] == ev["reference_digest"] and ev["faults"] > 0
    assert ev["source_digest"] == ev["received_digest"]
    assert r.ok


def test_live_migration_sim(sim_part) -> None:
    r = sim_part("live-migration")
    ev = r.evidence
    assert ev["demand_requests"] == ev["distinct_pages_touched"]
    assert ev["demand_requests"] + ev["pushed"] == ev["pages"]
    assert ev["requested_twice"] == 0 and ev["digest_equals_reference"]
    assert r.ok
