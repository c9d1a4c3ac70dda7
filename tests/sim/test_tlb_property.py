"""Property (SDM 4.10.4): given the invalidations the architecture requires after each change to
the paging structures, a translation through the TLBs and paging-structure caches always equals a
fresh walk of the structures in memory. The expected result is computed here by software from
``PageTable.entries`` and the SDM 4.6 rules of the access-rights test (an oracle independent of
the MMU), for random maps, unmaps, permission changes, PCID switches and register settings."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sdm_rules import sdm_denied

from migrate.sim import Access, Machine, MachineConfig, PageFault
from migrate.sim.mmu import PF_ID, PF_P, PF_US, PF_WR

# Pages spread over two PML4 slots and two page tables, so structure sharing varies.
PAGES = [0x0000_1000_0000_0000 + i * 0x1000 for i in range(4)] + \
        [0x0000_2000_0020_0000 + i * 0x1000 for i in range(4)]


def expected(pt, va, access, core) -> tuple[str, int]:
    steps = pt.entries(va)
    last = steps[-1].entry
    user_mode = core.cpl == 3
    base = (PF_WR if access == Access.WRITE else 0) | (PF_US if user_mode else 0) | (
        PF_ID if access == Access.FETCH else 0)
    if not last.present:
        return ("fault", base)
    rw_all = all(s.entry.writable for s in steps)
    us_all = all(s.entry.user for s in steps)
    xd_any = any(s.entry.nx for s in steps)
    if sdm_denied(user_mode=user_mode, implicit=False, access=access, rw_all=rw_all,
                  us_all=us_all, xd_any=xd_any, wp=core.cr0_wp, nxe=core.efer_nxe,
                  smep=core.cr4_smep, smap=core.cr4_smap, ac=core.ac):
        return ("fault", base | PF_P)
    return ("ok", last.address | (va & 0xFFF))


op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, 1), st.sampled_from(PAGES), st.integers(0, 5),
              st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, 1), st.sampled_from(PAGES)),
    st.tuples(st.just("protect"), st.integers(0, 1), st.sampled_from(PAGES), st.booleans(),
              st.booleans(), st.booleans()),
    st.tuples(st.just("switch"), st.integers(0, 1)),
    st.tuples(st.just("mode"), st.integers(0, 3), st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("access"), st.sampled_from(PAGES), st.sampled_from(list(Access)),
              st.integers(0, 0xFFF)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=60),
       invalidation=st.sampled_from(["invlpg", "invpcid0", "cr3"]))
def test_tlb_never_changes_a_translation_given_required_invalidations(ops, invalidation):
    m = Machine(config=MachineConfig(cores=1, memory=16 << 20))
    core = m.cores[0]
    frames = [m.physmem.alloc() << 12 for _ in range(6)]
    tables = [m.new_page_table(), m.new_page_table()]
    pcids = [1, 2]
    current = 0
    pending: list[set[int]] = [set(), set()]  # pages changed while that PCID was not current
    core.load_cr3(tables[0], pcid=pcids[0])

    def invalidate(space: int, va: int) -> None:
        if space != current:
            pending[space].add(va)  # must be invalidated before that PCID is used again
            return
        with core.supervisor():
            if invalidation == "invlpg":
                core.invlpg(va)
            elif invalidation == "invpcid0":
                core.invpcid(0, pcid=pcids[space], vaddr=va)
            else:
                core.load_cr3(tables[space], pcid=pcids[space])

    for o in ops:
        kind = o[0]
        if kind == "map":
            _, space, va, fi, writable, user, nx = o
            tables[space].map(va, frames[fi], writable=writable, user=user, nx=nx, replace=True)
            invalidate(space, va)
        elif kind == "unmap":
            _, space, va = o
            if tables[space].entry(va) is not None:
                tables[space].unmap(va)
                invalidate(space, va)
        elif kind == "protect":
            _, space, va, writable, user, nx = o
            if tables[space].entry(va) is not None:
                tables[space].protect(va, writable=writable, user=user, nx=nx)
                invalidate(space, va)
        elif kind == "switch":
            target = o[1]
            with core.supervisor():
                for va in pending[target]:
                    core.invpcid(0, pcid=pcids[target], vaddr=va)
                core.load_cr3(tables[target], pcid=pcids[target], noflush=True)
            pending[target].clear()
            current = target
        elif kind == "mode":
            _, cpl, wp, smep, smap = o
            core.cpl, core.cr0_wp, core.cr4_smep, core.cr4_smap = cpl, wp, smep, smap
        else:
            _, page, access, offset = o
            va = page + offset
            want = expected(tables[current], va, access, core)
            try:
                got = ("ok", core.translate(va, access))
            except PageFault as fault:
                got = ("fault", fault.error_code)
            assert got == want, (o, invalidation)


def test_without_the_required_invalidation_the_tlb_result_differs() -> None:
    """The concrete counter-example: remap a cached page and skip INVLPG."""
    m = Machine(config=MachineConfig(cores=1, memory=16 << 20))
    core = m.cores[0]
    f1, f2 = (m.physmem.alloc() << 12 for _ in range(2))
    pt = m.new_page_table()
    pt.map(PAGES[0], f1, user=False)
    core.load_cr3(pt, pcid=1)
    assert core.translate(PAGES[0]) == f1
    pt.map(PAGES[0], f2, user=False, replace=True)
    assert expected(pt, PAGES[0], Access.READ, core) == ("ok", f2)
    assert core.translate(PAGES[0]) == f1  # through the TLB: the old frame
    assert core.walk(PAGES[0]) == f2  # a fresh walk: the new one
