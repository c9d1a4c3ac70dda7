"""The range bookkeeping that follows a guest's region events (migrate/regionevents.py).

The expected layouts follow the kernel's documented behaviour of the events
(Documentation/admin-guide/mm/userfaultfd.rst, "Non-cooperative userfaultfd"): REMOVE leaves
the range mapped (and registered) with its pages zero; UNMAP takes the range away; REMAP moves
the range, registration included, to the new address; mremap(MREMAP_FIXED) first unmaps whatever
was at the target, and after a move the old range is reported unmapped as well.
"""

from __future__ import annotations

import pytest

from migrate import protocol
from migrate.regionevents import (
    LIVE,
    REMOVED,
    UNMAPPED,
    ChildSpace,
    EventSpec,
    RegionMap,
)

PAGE = 4096
BASE = 0x7F00_0000_0000


def region(npages: int = 16) -> RegionMap:
    return RegionMap(BASE, npages, PAGE)


def at(index: int) -> int:
    return BASE + index * PAGE


def test_fresh_map_is_the_identity() -> None:
    m = region()
    assert [m.index_of(at(i)) for i in range(16)] == list(range(16))
    assert m.index_of(at(3) + 123) == 3  # any byte of the page
    assert m.index_of(at(16)) is None and m.index_of(BASE - PAGE) is None
    assert [m.address_of(i) for i in range(16)] == [at(i) for i in range(16)]
    assert not m.changed


def test_remove_keeps_pages_mapped_but_not_live() -> None:
    m = region()
    assert m.remove(at(2), at(5)) == [2, 3, 4]
    assert [m.state[i] for i in range(1, 6)] == [LIVE, REMOVED, REMOVED, REMOVED, LIVE]
    assert m.index_of(at(3)) == 3 and m.address_of(3) == at(3)  # still there, zero
    assert m.remove(at(3), at(7)) == [5, 6]  # only the pages that were live
    assert m.changed


def test_unmap_takes_pages_away() -> None:
    m = region()
    assert m.unmap(at(4), at(8)) == [4, 5, 6, 7]
    assert m.index_of(at(5)) is None  # memory mapped there later is not the region's
    assert m.address_of(5) is None
    assert m.index_of(at(3)) == 3 and m.index_of(at(8)) == 8
    assert m.unmap(at(0), at(16)) == [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]
    assert m.segments == []


def test_remap_moves_the_range_and_translates_both_ways() -> None:
    m = region()
    new = BASE + 0x1000_0000
    assert m.remap(at(4), new, 4 * PAGE) == 4
    assert m.index_of(at(5)) is None
    assert [m.index_of(new + k * PAGE) for k in range(4)] == [4, 5, 6, 7]
    assert m.address_of(6) == new + 2 * PAGE
    assert m.address_of(3) == at(3) and m.address_of(8) == at(8)
    # The kernel then reports the old range unmapped: nothing of the region is there any more.
    assert m.unmap(at(4), at(8)) == []
    assert m.address_of(6) == new + 2 * PAGE


def test_remap_of_the_whole_region_then_back() -> None:
    m = region()
    new = BASE + 0x4000_0000
    m.remap(BASE, new, 16 * PAGE)
    assert m.index_of(at(0)) is None and m.index_of(new + 15 * PAGE) == 15
    m.remap(new + 8 * PAGE, at(8), 8 * PAGE)  # half of it comes back
    assert m.index_of(at(9)) == 9 and m.index_of(new + 9 * PAGE) is None
    assert m.index_of(new + 7 * PAGE) == 7


def test_remap_onto_region_pages_unmaps_them() -> None:
    m = region()
    m.remap(at(0), at(8), 4 * PAGE)  # MREMAP_FIXED over pages 8..11: those are gone
    assert [m.state[i] for i in (8, 9, 10, 11)] == [UNMAPPED] * 4
    assert [m.index_of(at(8 + k)) for k in range(4)] == [0, 1, 2, 3]
    assert m.index_of(at(12)) == 12


def test_removed_pages_keep_their_state_when_moved() -> None:
    m = region()
    m.remove(at(2), at(3))
    m.remap(BASE, BASE + 0x100_0000, 16 * PAGE)
    index = m.index_of(BASE + 0x100_0000 + 2 * PAGE)
    assert index == 2 and m.state[2] == REMOVED


def test_events_reject_unaligned_ranges() -> None:
    m = region()
    with pytest.raises(ValueError, match="REMOVE"):
        m.remove(at(1) + 1, at(2))
    with pytest.raises(ValueError, match="UNMAP"):
        m.unmap(at(2), at(2))
    with pytest.raises(ValueError, match="REMAP target"):
        m.remap(at(1), BASE + 5, PAGE)
    with pytest.raises(IndexError):
        m.address_of(16)


def test_a_forked_copy_is_independent() -> None:
    m = region()
    m.remove(at(1), at(2))
    child = m.copy()
    child.unmap(at(4), at(6))
    assert m.index_of(at(4)) == 4 and child.index_of(at(4)) is None
    assert child.state[1] == REMOVED


def test_child_space_needs_what_the_parent_lacked_at_the_fork() -> None:
    m = region(8)
    m.remove(at(6), at(7))  # discarded by the parent before the fork: zero in the child too
    has = bytes([1, 1, 0, 0, 1, 0, 0, 0])
    child = ChildSpace.forked(None, m, has)  # type: ignore[arg-type]
    assert child.need == 4 and child.first_needed() == 2
    assert [child.needs(i) for i in range(8)] == [False, False, True, True, False, True, False,
                                                  True]
    child.got(2)
    child.got(2)  # counted once
    assert child.need == 3 and child.first_needed() == 3


@pytest.mark.parametrize("text, expected", [
    ("remove@100:1:5", EventSpec("remove", 100, 1, 5)),
    ("unmap@0:7:1,hold", EventSpec("unmap", 0, 7, 1, True)),
    ("remap@3", EventSpec("remap", 3)),
    ("fork@9,hold", EventSpec("fork", 9, hold=True)),
])
def test_event_spec_round_trips(text: str, expected: EventSpec) -> None:
    spec = EventSpec.parse(text)
    assert spec == expected and str(spec) == text


@pytest.mark.parametrize("text, message", [
    ("remove@100", "needs :FIRST:COUNT"),
    ("remove@100:0:4", "control block"),
    ("unmap@1:2:0", "at least 1"),
    ("fork@1:2:3", "takes no page range"),
    ("madvise@1", "bad region event spec"),
    ("remove@-1:1:1", "bad region event spec"),
    ("x" * 100, "short string"),
])
def test_event_spec_rejects_bad_input(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EventSpec.parse(text)


def test_event_spec_must_fit_the_region() -> None:
    EventSpec.parse("remove@1:10:6").check_region(16)
    with pytest.raises(ValueError, match="outside the region of 16 pages"):
        EventSpec.parse("remove@1:10:7").check_region(16)


def hello(workload: dict) -> protocol.Hello:
    return protocol.Hello(protocol.PROTOCOL_VERSION, b"s" * 16, 4096, 16, "anon", "hybrid",
                          workload, [], "xxh64-4k+blake2b256")


def test_hello_carries_a_valid_event_and_refuses_a_bad_one() -> None:
    base = {"name": "stream", "size": 16 * 4096, "seed": 0, "ops": 10}
    frames = protocol.encode(hello(dict(base, event="remove@5:1:3")))
    decoded = protocol.decode(frames)
    assert isinstance(decoded, protocol.Hello) and decoded.workload["event"] == "remove@5:1:3"
    for bad in ("remove@5:1:30", "remove@5", 7):
        with pytest.raises(protocol.ProtocolError, match="workload.event"):
            protocol.decode(protocol.encode(hello(dict(base, event=bad))))
    with pytest.raises(protocol.ProtocolError, match="optional event"):
        protocol.decode(protocol.encode(hello(dict(base, extra=1))))


def test_source_refuses_an_event_outside_its_region_before_starting_a_guest() -> None:
    from migrate import source

    opts = source.SourceOptions(to="tcp://127.0.0.1:1", memory=1 << 20, progress=False,
                                event="remove@1:200:100")
    migration = source.SourceMigration(opts)
    report = migration.run()
    assert not report["ok"] and report["phase"] == "start"
    assert "outside the region of 256 pages" in report["error"]
    assert migration.guest is None
