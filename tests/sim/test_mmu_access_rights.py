"""Access rights, error codes and protection keys, each rule from Intel SDM vol. 3A 4.6 and 4.7.

The oracle below is written from the SDM's prose as *deny* rules, separately from the model's
implementation (which is a permission table built from its own transcription); every combination
is then driven through real page tables (bits cleared at each level in turn), the walk and the TLB.
"""

from __future__ import annotations

import itertools

import pytest
from sdm_rules import sdm_denied

from migrate.sim import Access, Machine, PageFault
from migrate.sim.mmu import PF_ID, PF_P, PF_PK, PF_US, PF_WR
from migrate.sim.paging import RW, US, XD

LEVEL_CHOICES = (None, 4, 3, 2, 1)  # None: the bit is permissive at every level


@pytest.fixture(scope="module")
def rights_world():
    """One address per (level where R/W is cleared, ... U/S ..., ... XD ...) combination."""
    m = Machine(cores=1, memory=64 << 20)
    pt = m.new_page_table()
    frame = m.physmem.alloc() << 12
    addrs = {}
    for slot, (rw_lv, us_lv, xd_lv) in enumerate(itertools.product(LEVEL_CHOICES, repeat=3), 1):
        va = slot << 39  # a PML4 slot each, so clearing a bit at level 4 affects only this one
        pt.map(va, frame)
        for level, bit in ((rw_lv, RW), (us_lv, US), (xd_lv, XD)):
            if level is not None:
                pt.update(va, level=level, clear_bits=bit if bit != XD else 0,
                          set_bits=bit if bit == XD else 0)
        addrs[(rw_lv, us_lv, xd_lv)] = va
    core = m.cores[0]
    core.load_cr3(pt)
    return m, core, addrs


@pytest.mark.parametrize("wp,smep,smap,ac", list(itertools.product((False, True), repeat=4)))
@pytest.mark.parametrize("mode", ["user", "supervisor", "implicit"])
def test_permission_matrix_sdm_4_6_1(rights_world, mode, wp, smep, smap, ac) -> None:
    """SDM 4.6.1: every row of user/supervisor(explicit/implicit) x read/write/fetch x R/W x U/S x
    XD (cleared or set at each level in turn) x CR0.WP x SMEP x SMAP x AC, NXE=1; and 4.7's error
    code for each denial (P=1, W/R, U/S, I/D)."""
    _m, core, addrs = rights_world
    with core.supervisor():
        core.cr0_wp, core.cr4_smep, core.cr4_smap, core.ac = wp, smep, smap, ac
        core.efer_nxe = True
    core.cpl = 3 if mode in ("user", "implicit") else 0
    implicit = mode == "implicit"
    user_mode = mode == "user"
    for (rw_lv, us_lv, xd_lv), va in addrs.items():
        for access in Access:
            denied = sdm_denied(user_mode=user_mode, implicit=implicit, access=access,
                                rw_all=rw_lv is None, us_all=us_lv is None,
                                xd_any=xd_lv is not None, wp=wp, nxe=True, smep=smep,
                                smap=smap, ac=ac)
            for attempt in ("walk", "tlb"):  # second time may be served from the TLB
                try:
                    core.translate(va + 8, access, implicit_supervisor=implicit)
                except PageFault as fault:
                    assert denied, (mode, access, rw_lv, us_lv, xd_lv, attempt)
                    expected = PF_P | (PF_WR if access == Access.WRITE else 0)
                    expected |= PF_US if user_mode else 0
                    expected |= PF_ID if access == Access.FETCH else 0  # NXE=1
                    assert fault.error_code == expected
                    assert fault.address == va + 8  # CR2 receives the linear address
                else:
                    assert not denied, (mode, access, rw_lv, us_lv, xd_lv, attempt)
    core.cpl = 0


def _single_page(**map_kwargs):
    m = Machine(cores=1, memory=16 << 20)
    pt = m.new_page_table()
    pt.map(0x7000_0000, m.physmem.alloc() << 12, **map_kwargs)
    core = m.cores[0]
    core.load_cr3(pt)
    return m, pt, core


def test_nxe_off_fetch_ignores_xd_semantics_and_id_bit_clear_without_smep() -> None:
    """SDM 4.7: I/D is set only if SMEP=1 or (PAE/IA-32e and NXE=1). With NXE=0 and SMEP=0 a
    fetch fault has I/D=0."""
    _m, _pt, core = _single_page(user=False)
    core.efer_nxe = False
    core.cr4_smep = False
    core.cpl = 3
    with pytest.raises(PageFault) as info:
        core.translate(0x7000_0000, Access.FETCH)
    assert info.value.error_code == PF_P | PF_US  # supervisor page, user fetch, no I/D
    core.cpl = 0
    core.cr4_smep = True
    core.cpl = 3
    with pytest.raises(PageFault) as info:
        core.translate(0x7000_0000, Access.FETCH)
    assert info.value.error_code == PF_P | PF_US | PF_ID


def test_not_present_error_code_has_p_clear_at_every_level() -> None:
    """SDM 4.7: P=0 when the fault is a not-present page, whatever the level that was absent."""
    _m, pt, core = _single_page()
    core.cpl = 3
    targets = {
        4: 0x0000_7F00_0000_0000,  # no PDPT
        3: 0x0000_0000_8000_0000,  # PDPT present, no PD for this 1 GiB
        2: 0x0000_0000_7020_0000,  # PD present, no PT for this 2 MiB
        1: 0x0000_0000_7000_1000,  # PT present, PTE absent
    }
    for level, va in targets.items():
        step = pt.entries(va)[-1]
        assert step.level == level and not step.entry.present
        for access, code in ((Access.READ, PF_US), (Access.WRITE, PF_US | PF_WR),
                             (Access.FETCH, PF_US | PF_ID)):
            with pytest.raises(PageFault) as info:
                core.translate(va, access)
            assert info.value.error_code == code


def test_supervisor_not_present_error_code_is_zero() -> None:
    """SDM 4.7: a supervisor-mode read of a not-present page pushes error code 0."""
    _m, _pt, core = _single_page()
    with pytest.raises(PageFault) as info:
        core.translate(0x1234_5000)
    assert info.value.error_code == 0


def test_implicit_supervisor_access_at_cpl3_has_us_clear() -> None:
    """SDM 4.6.1/4.7: implicit supervisor-mode accesses (GDT, IDT, TSS) are supervisor accesses
    regardless of CPL, so U/S=0 in the error code; with SMAP they may not touch user pages even
    with AC=1."""
    _m, _pt, core = _single_page(user=True)
    core.cr4_smap = True
    core.ac = True
    core.cpl = 3
    with pytest.raises(PageFault) as info:
        core.translate(0x7000_0000, Access.READ, implicit_supervisor=True)
    assert info.value.error_code == PF_P
    assert core.translate(0x7000_0000, Access.READ) >= 0  # the explicit user read is fine


# ------------------------------------------------------------------ protection keys (SDM 4.6.2)
def sdm_pkey_denied(*, user_mode: bool, access: Access, wp: bool, ad: bool, wd: bool) -> bool:
    """SDM 4.6.2: for data accesses to user-mode addresses, AD denies reads and writes; WD denies
    user-mode writes, and supervisor-mode writes only if CR0.WP=1. Fetches are not affected."""
    if access == Access.FETCH:
        return False
    if ad:
        return True
    return wd and access == Access.WRITE and (wp or user_mode)


@pytest.mark.parametrize("ad,wd,wp", list(itertools.product((False, True), repeat=3)))
@pytest.mark.parametrize("user_mode", [True, False])
def test_pkru_ad_wd_matrix(ad, wd, wp, user_mode) -> None:
    """SDM 4.6.2 and 4.7 (PK flag): PKRU bit 2i is AD, bit 2i+1 WD for key i; violations set
    PK=1 in the error code; supervisor pages are not subject to keys."""
    m = Machine(cores=1, memory=16 << 20)
    pt = m.new_page_table()
    frame = m.physmem.alloc() << 12
    pt.map(0x10000, frame, pkey=5)  # user page, key 5, RW, executable
    pt.map(0x20000, frame, pkey=5, user=False)  # supervisor page with the same key bits
    core = m.cores[0]
    core.load_cr3(pt)
    core.cr4_pke = True
    core.cr0_wp = wp
    core.cr4_smap = False  # isolate keys from SMAP
    core.cr4_smep = False
    core.wrpkru((int(ad) << 10) | (int(wd) << 11) | 0b11)  # key 0 fully disabled too
    core.cpl = 3 if user_mode else 0
    for access in Access:
        denied = sdm_pkey_denied(user_mode=user_mode, access=access, wp=wp, ad=ad, wd=wd)
        try:
            core.translate(0x10000, access)
        except PageFault as fault:
            assert denied, access
            assert fault.pk
            assert fault.error_code & PF_P
        else:
            assert not denied, access
    if not user_mode:
        # Keys apply only to user-mode addresses.
        for access in (Access.READ, Access.WRITE):
            core.translate(0x20000, access)


def test_pkru_change_needs_no_tlb_flush() -> None:
    """SDM 4.6.2: PKRU is consulted on every access, so WRPKRU takes effect without INVLPG."""
    _m, _pt, core = _single_page(pkey=3)
    core.cr4_pke = True
    core.cpl = 3
    core.translate(0x7000_0000, Access.WRITE)  # cached in the TLB
    core.wrpkru(1 << 7)  # WD for key 3
    with pytest.raises(PageFault) as info:
        core.translate(0x7000_0000, Access.WRITE)
    assert info.value.error_code == PF_P | PF_WR | PF_US | PF_PK
    assert core.translate(0x7000_0000, Access.READ) >= 0
    core.wrpkru(0)
    core.translate(0x7000_0000, Access.WRITE)


def test_pk_flag_set_alongside_ordinary_write_protection() -> None:
    """SDM 4.7: PK is 1 whenever its conditions hold, even if R/W=0 would fault anyway."""
    _m, _pt, core = _single_page(pkey=2, writable=False)
    core.cr4_pke = True
    core.cpl = 3
    core.wrpkru(1 << 5)  # WD for key 2
    with pytest.raises(PageFault) as info:
        core.translate(0x7000_0000, Access.WRITE)
    assert info.value.error_code == PF_P | PF_WR | PF_US | PF_PK


def test_pke_off_ignores_key_bits() -> None:
    """SDM 4.6.2: with CR4.PKE=0 no key is associated with addresses; bits 62:59 are ignored."""
    _m, _pt, core = _single_page(pkey=7)
    core.cr4_pke = False  # (the kernel model turns it on at boot)
    core.pkru = 0xFFFF_FFFF
    core.cpl = 3
    core.translate(0x7000_0000, Access.WRITE)


def test_wrpkru_without_pke_is_ud() -> None:
    from migrate.sim.mmu import InvalidOpcode

    _m, _pt, core = _single_page()
    core.cr4_pke = False
    with pytest.raises(InvalidOpcode):
        core.wrpkru(0)
