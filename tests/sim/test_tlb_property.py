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
from migrate.sim.paging import RW, US, XD

# Pages spread over two PML4 slots and two page tables, so structure sharing varies.
PAGES = [0x0000_1000_0000_0000 + i * 0x1000 for i in range(4)] + \
        [0x0000_2000_0020_0000 + i * 0x1000 for i in range(4)]
HUGE = [0x0000_3000_0000_0000, 0x0000_3000_0020_0000]  # 2 MiB pages
HUGE_FRAMES = [0x40_0000, 0x60_0000, 0x80_0000]
# Global (kernel) pages: by the architecture's contract the same in every address space, so they
# are always changed in both tables, and a change needs INVLPG (or INVPCID type 2) at once.
KERNEL = [0xFFFF_8000_0000_0000, 0xFFFF_8000_0000_1000]
ALL = PAGES + HUGE + KERNEL


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
    return ("ok", last.address | (va & (last.page_size - 1)))


op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, 1), st.sampled_from(PAGES), st.integers(0, 5),
              st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("unmap"), st.integers(0, 1), st.sampled_from(PAGES)),
    st.tuples(st.just("protect"), st.integers(0, 1), st.sampled_from(PAGES), st.booleans(),
              st.booleans(), st.booleans()),
    st.tuples(st.just("switch"), st.integers(0, 1)),
    st.tuples(st.just("mode"), st.integers(0, 3), st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("map2m"), st.integers(0, 1), st.sampled_from(HUGE), st.integers(0, 2),
              st.booleans(), st.booleans(), st.booleans()),
    st.tuples(st.just("kmap"), st.sampled_from(KERNEL), st.integers(0, 5), st.booleans(),
              st.booleans(), st.sampled_from(["invlpg", "invpcid2"])),
    st.tuples(st.just("kunmap"), st.sampled_from(KERNEL), st.sampled_from(["invlpg",
                                                                          "invpcid2"])),
    # Change a non-leaf entry (PML4E/PDPTE/PDE) of a user page's walk: R/W, U/S or XD.
    st.tuples(st.just("upper"), st.integers(0, 1), st.sampled_from(PAGES + HUGE),
              st.integers(2, 4), st.sampled_from([RW, US, XD]), st.booleans()),
    st.tuples(st.just("access"), st.sampled_from(ALL), st.sampled_from(list(Access)),
              st.integers(0, 0x1F_FFFF)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=40),
       invalidation=st.sampled_from(["invlpg", "invpcid0", "cr3"]),
       sweep_access=st.sampled_from(list(Access)), start_cpl=st.sampled_from([0, 3]))
def test_tlb_never_changes_a_translation_given_required_invalidations(ops, invalidation,
                                                                      sweep_access, start_cpl):
    """Around every change the changed page is translated last before it (so its TLB and
    paging-structure-cache entries are warm: a fault on a neighbour would have dropped them,
    SDM 4.10.4.1) and first after it; then every page is checked against the software walk."""
    m = Machine(config=MachineConfig(cores=1, memory=16 << 20))
    core = m.cores[0]
    frames = [m.physmem.alloc() << 12 for _ in range(6)]
    tables = [m.new_page_table(), m.new_page_table()]
    pcids = [1, 2]
    current = 0
    pending: list[set[int]] = [set(), set()]  # pages changed while that PCID was not current
    # Start populated: every user page mapped (user, RW, executable) in both spaces.
    for i, t in enumerate(tables):
        for j, page in enumerate(PAGES):
            t.map(page, frames[(i + j) % 6])
        t.map(HUGE[0], HUGE_FRAMES[i], 1 << 21)
    core.load_cr3(tables[0], pcid=pcids[0])
    core.cpl = start_cpl

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

    def check(o, va, access) -> None:
        want = expected(tables[current], va, access, core)
        try:
            got = ("ok", core.translate(va, access))
        except PageFault as fault:
            got = ("fault", fault.error_code)
        assert got == want, (o, hex(va), access, invalidation)

    def users_of(space: int, level: int, entry_paddr: int) -> list[int]:
        """Pages whose walk in ``space`` goes through the entry at ``entry_paddr``."""
        out = []
        for page in PAGES + HUGE:
            steps = [st_ for st_ in tables[space].entries(page) if st_.level == level]
            if steps and steps[0].entry_paddr == entry_paddr:
                out.append(page)
        return out

    for o in ops:
        kind = o[0]
        target = o[2] if kind in ("map", "map2m", "unmap", "protect", "upper") else (
            o[1] if kind in ("kmap", "kunmap") else None)
        if target is not None:
            for page in ALL:
                check(o, page + 0x88, sweep_access)
            if kind == "upper":
                # Drop the target's TLB entry so the check below walks and fills the
                # paging-structure caches: they, not the TLB, are what this change tests.
                with core.supervisor():
                    core.invlpg(target)
            check(o, target + 0x88, sweep_access)
        if kind == "upper":
            _, space, va, level, bit, set_it = o
            steps = [st_ for st_ in tables[space].entries(va) if st_.level == level]
            if steps and steps[0].entry.present and not steps[0].entry.leaf:
                tables[space].update(va, level=level, set_bits=bit if set_it else 0,
                                     clear_bits=0 if set_it else bit)
                # SDM 4.10.4.2: invalidate every page whose translation used the entry.
                for page in users_of(space, level, steps[0].entry_paddr):
                    invalidate(space, page)
        elif kind in ("map", "map2m"):
            _, space, va, fi, writable, user, nx = o
            before = {st_.level: st_ for st_ in tables[space].entries(va)}
            if kind == "map":
                tables[space].map(va, frames[fi], writable=writable, user=user, nx=nx,
                                  replace=True)
            else:
                tables[space].map(va, HUGE_FRAMES[fi], 1 << 21, writable=writable, user=user,
                                  nx=nx, replace=True)
            invalidate(space, va)
            # map() may also have set U/S in an upper entry (as Linux does for user tables):
            # that changes every page below it, which must then be invalidated too.
            for st_ in tables[space].entries(va)[:-1]:
                old = before.get(st_.level)
                if old is not None and (old.entry.raw | 0x20) != (st_.entry.raw | 0x20):
                    for page in users_of(space, st_.level, st_.entry_paddr):
                        invalidate(space, page)
        elif kind in ("kmap", "kunmap"):
            va, how = o[1], o[-1]
            for t in tables:
                if kind == "kmap":
                    t.map(va, frames[o[2]], user=False, writable=o[3], nx=o[4], global_=True,
                          replace=True)
                elif t.entry(va) is not None:
                    t.unmap(va)
            with core.supervisor():
                if how == "invlpg":
                    core.invlpg(va)  # global entries for the page go, whatever their PCID
                else:
                    core.invpcid(2)
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
            check(o, page + (offset if page in HUGE else offset & 0xFFF), access)
        if target is not None:
            check(o, target + 0x88, sweep_access)
        for page in ALL:
            check(o, page + 0x88, sweep_access)


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
