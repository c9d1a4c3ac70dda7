"""A guest that discards, unmaps, moves or forks part of its region in the middle of a migration.

Each guest performs one event (migrate/regionevents.py's test hook) at a fixed count of work units;
``,hold`` pins the side: with pre-copy the source's guest performs it once pre-copy round 1 is
out, in post-copy mode the source pauses the guest just before it so the destination's guest
performs it right after resuming (while most pages are still at the source). Every test checks
where the event happened (the daemons' event counters), and that the guest ends with the digest of
a reference run that performs the same event and was never migrated. docs/region-events.md.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from migrate import dest, regionevents, source, workloads

MIB = 1 << 20
MEMORY = 16 * MIB  # 4096 pages
OPS = 60_000_000  # stream: ~0.3 s of work at full speed
AT = 5_000_000  # the event's work-unit count: reached early at the source

pytestmark = [pytest.mark.host, pytest.mark.usefixtures("migration_capable")]


def migrate(event: str, mode: str, *, push: bool = True, after_s: float = 0.1,
            backing: str = "anon") -> tuple[dict[str, Any], dict[str, Any]]:
    """One migration of a ``stream`` guest performing ``event``: (source report, dest report)."""
    daemon = dest.DestDaemon(dest.DestOptions(listen="tcp://127.0.0.1:*", max_migrations=1,
                                              quiet=True, peer_timeout_s=20))
    served = threading.Thread(target=daemon.serve, daemon=True)
    served.start()
    opts = source.SourceOptions(to=daemon.endpoint, workload="stream", memory=MEMORY, ops=OPS,
                                mode=mode, after_s=after_s, progress=False, peer_timeout_s=20,
                                push=push, event=event, backing=backing)
    report = source.SourceMigration(opts).run()
    served.join(60)
    assert not served.is_alive(), "the destination daemon hung"
    assert len(daemon.reports) == 1
    return report, daemon.reports[0]


def reference(event: str) -> tuple[str, str | None]:
    return regionevents.reference_run("stream", MEMORY, 0, OPS, event)


def plain_reference() -> str:
    return workloads.reference_digest("stream", MEMORY, seed=0, ops=OPS)


def assert_migrated(report: dict[str, Any], dest_report: dict[str, Any], event: str) -> None:
    assert report["ok"], report.get("error")
    assert dest_report["ok"], dest_report.get("error")
    assert report["transfer_ok"]
    expected, _child = reference(event)
    assert report["digest"] == report["reference_digest"] == expected


def performed_by(events: dict[str, Any]) -> list[str]:
    return [e["event"] for e in events.get("guest", [])]


# ---------------------------------------------------------------------------------------------
# At the destination, during post-copy


@pytest.mark.parametrize("backing", ["anon", "memfd"])  # memfd: MADV_REMOVE punches the hole
def test_remove_at_destination_zero_fills_locally(backing: str) -> None:
    event = f"remove@{AT}:8:1000,hold"
    report, d = migrate(event, "postcopy", backing=backing)
    assert_migrated(report, d, event)
    ev = d["events"]
    assert performed_by(ev) == [event] and ev["remove"] == 1  # it happened here...
    assert report["events"]["source"]["remove"] == 0  # ...not at the source
    # The discarded pages were faulted on again (the stream workload rewrites them) and got zero
    # pages here, never the source's copy: the final digest is the discarding reference run's.
    assert ev["zero_filled"] >= 1
    assert report["digest"] != plain_reference()


def test_unmap_at_destination_stops_installing_there() -> None:
    event = f"unmap@{AT}:100:500,hold"
    report, d = migrate(event, "postcopy")
    assert_migrated(report, d, event)
    ev = d["events"]
    assert performed_by(ev) == [event] and ev["unmap"] == 1
    # The guest mapped fresh memory in the hole (not registered): no fault comes from there, and
    # the pages that arrived for it went nowhere (an install there would have failed).
    assert ev["zero_filled"] == 0
    assert report["digest"] != plain_reference()


def test_remap_at_destination_translates_fault_addresses() -> None:
    event = f"remap@{AT},hold"
    report, d = migrate(event, "postcopy")
    assert_migrated(report, d, event)
    ev = d["events"]
    assert performed_by(ev) == [event] and ev["remap"] == 1
    # Every page still missing when the whole region moved was faulted on (or pushed) at its new
    # address and found by its original index: none was taken for foreign memory.
    assert ev["zero_filled"] == 0
    assert d["faults"] > 0
    assert report["digest"] == plain_reference()  # moving changes no byte


@pytest.mark.parametrize("backing", ["anon", "memfd"])  # memfd: the child shares the page cache
def test_fork_at_destination_serves_the_child(backing: str) -> None:
    event = f"fork@{AT},hold"
    # Demand paging only: the child digests its whole copy right after the fork, so nearly all
    # of its pages are missing and must come through its own userfaultfd.
    report, d = migrate(event, "postcopy", push=False, backing=backing)
    assert_migrated(report, d, event)
    ev = d["events"]
    assert performed_by(ev) == [event] and ev["fork"] == 1
    assert ev["child_missing"] > 4000  # of 4096 pages (the fault-around fills several a fault)
    assert ev["child_faults"] > 100
    _digest, child_reference = reference(event)
    assert ev["child_digest"] == ev["child_reference_digest"] == child_reference
    assert report["events"]["source"]["fork"] == 0


@pytest.mark.parametrize("event", [f"remove@{AT}:8:1000,dest", f"remap@{AT},dest"])
def test_event_at_destination_after_precopy_uses_no_stale_staging(event: str) -> None:
    # Hybrid: pre-copied pages wait in the destination daemon's staging memory, installed by
    # index at the region's original address. Once the guest discards or moves its region
    # there, the staged copies must not be installed any more (they would resurrect discarded
    # pages, or land at the old address); what is missing comes from the source instead.
    report, d = migrate(event, "hybrid")
    assert_migrated(report, d, event)
    ev = d["events"]
    assert performed_by(ev) == [event]  # at the destination
    assert report["events"]["source"][event.split("@")[0]] == 0
    assert report["pages"]["precopy"] >= MEMORY // 4096  # round 1 went to staging
    if event.startswith("remove"):
        assert report["digest"] != plain_reference()
    else:
        assert report["digest"] == plain_reference()


# ---------------------------------------------------------------------------------------------
# At the source, during pre-copy


def test_remove_at_source_during_precopy_is_sent_again() -> None:
    event = f"remove@{AT}:8:3000,hold"
    report, d = migrate(event, "hybrid")
    assert_migrated(report, d, event)
    src = report["events"]["source"]
    assert src["remove"] == 1 and src["seen"] == [["remove", "precopy"]]
    assert performed_by(src) == [event]
    assert d["events"]["remove"] == 0
    # Pre-copy round 1 had sent those pages with data; the guest then discarded them and stayed
    # idle until the pause: they are named at the switchover (discarded there, fetched again).
    assert report["pages"]["discarded"] >= 3000


def test_unmap_at_source_abandons_and_the_guest_finishes_there() -> None:
    event = f"unmap@{AT}:100:500,hold"
    report, d = migrate(event, "hybrid")
    assert not report["ok"] and not d["ok"]
    assert "UFFD_EVENT_UNMAP" in report["error"] and "abandoned" in report["error"]
    assert report["phase"] == "precopy"
    assert "UFFD_EVENT_UNMAP" in d["error"]
    local = report["guest_at_source"]
    assert local["resumed"] and local["finished"] and local["ok"], local
    expected, _child = reference(event)
    assert local["digest"] == local["reference_digest"] == expected


def test_remap_at_source_abandons_and_the_guest_finishes_there() -> None:
    event = f"remap@{AT},hold"
    report, _d = migrate(event, "hybrid")
    assert not report["ok"]
    assert "UFFD_EVENT_REMAP" in report["error"] and "abandoned" in report["error"]
    local = report["guest_at_source"]
    assert local["finished"] and local["ok"], local
    assert local["digest"] == plain_reference()


def test_fork_at_source_leaves_the_child_unmigrated() -> None:
    event = f"fork@{AT},hold"
    report, d = migrate(event, "hybrid")
    assert_migrated(report, d, event)
    src = report["events"]["source"]
    assert src["fork"] == 1 and src["seen"] == [["fork", "precopy"]]
    # The child's userfaultfd was closed at once: it read its region like any process.
    _digest, child_reference = reference(event)
    assert [e["child_digest"] for e in src["guest"]] == [child_reference]
    assert d["events"]["fork"] == 0


# ---------------------------------------------------------------------------------------------
# EVENT_FORK needs CAP_SYS_PTRACE


GUEST_WITHOUT_PTRACE = r"""
from migrate.guest import GuestError, GuestHandle
try:
    GuestHandle("dest", 1 << 20).close()
    print("started")
except GuestError as exc:
    print(exc)
"""


def test_a_guest_refused_event_fork_says_why() -> None:
    import os
    import shutil
    import subprocess
    import sys

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv(1) to drop CAP_SYS_PTRACE from a child")
    # Dropped from the bounding set, the capability is gone after exec even for root.
    out = subprocess.run(["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace",
                          sys.executable, "-c", GUEST_WITHOUT_PTRACE],
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == ("dest guest could not start: userfaultfd feature EVENT_FORK is "
                                  "not available here: the kernel allows it only with "
                                  "CAP_SYS_PTRACE"), out
