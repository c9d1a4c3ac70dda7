"""ASLR (Linux arch/x86/mm/mmap.c, fs/binfmt_elf.c) and PLT/GOT lazy binding."""

from __future__ import annotations

import struct

from migrate.sim import Machine, MachineConfig
from migrate.sim.loader import (
    BRK_RND_RANGE,
    BRK_RND_RANGE_IA32,
    ELF_ET_DYN_BASE,
    ENTROPY_BITS,
    MMAP_RND_BITS,
    STACK_RND_MASK,
    TASK_SIZE,
    Layout,
    SharedObject,
)


def test_layout_ranges_follow_linux_entropy() -> None:
    """Stack top randomised by up to STACK_RND_MASK pages (22 bits), PIE base by 28 bits of
    pages above ELF_ET_DYN_BASE, brk within 1 GiB above the executable (arch_randomize_brk,
    SZ_1G for 64-bit tasks since Linux 6.9; SZ_32M before and for ia32); mmap_base below the
    stack gap by up to 2**28 pages."""
    import random

    rng = random.Random(1)
    layouts = [Layout.randomize(rng) for _ in range(200)]
    for lay in layouts:
        assert TASK_SIZE - (STACK_RND_MASK << 12) <= lay.stack_top <= TASK_SIZE
        assert ELF_ET_DYN_BASE <= lay.load_bias < ELF_ET_DYN_BASE + (1 << (MMAP_RND_BITS + 12))
        assert lay.load_bias <= lay.brk_start < lay.load_bias + (16 << 12) + BRK_RND_RANGE
        assert lay.mmap_base < lay.stack_top - (128 << 20) + (STACK_RND_MASK << 12)
        assert all(x % 4096 == 0 for x in (lay.stack_top, lay.mmap_base, lay.load_bias))
    assert len({lay.mmap_base for lay in layouts}) == 200
    assert len({lay.stack_top for lay in layouts}) == 200
    assert ENTROPY_BITS == {"stack": 22, "mmap": 28, "pie": 28, "brk": 18}
    old = Layout.randomize(random.Random(2), brk_range=BRK_RND_RANGE_IA32)
    assert old.brk_start - old.load_bias < (16 << 12) + (32 << 20)
    fixed = Layout.randomize(None)
    assert fixed == Layout.randomize(None)  # norandmaps: deterministic


def test_kernel_aslr_is_seeded_and_differs_between_processes() -> None:
    def bases(seed):
        k = Machine(config=MachineConfig(cores=1, memory=16 << 20, seed=seed)).kernel
        return [k.spawn().layout for _ in range(3)]

    assert bases(7) == bases(7)
    assert bases(7) != bases(8)
    assert len({lay.mmap_base for lay in bases(7)}) == 3


def _load(proc):
    lo = proc.loader
    libc = lo.load(SharedObject("libc.so.6", exports={"puts": 0x1111, "getpid": 0x2222}))
    app = lo.load(SharedObject("app", imports=["getpid", "puts"]), base=proc.layout.load_bias)
    return lo, libc, app


def test_plt_calls_bind_lazily_and_patch_the_got() -> None:
    """Lazy binding: GOT[n] starts pointing back into PLT[n] (after its jmp), so the first call
    goes PLT0 -> resolver, which patches GOT[n] with the function's address; later calls jump
    straight through the GOT."""
    m = Machine(cores=1, memory=32 << 20)
    proc = m.kernel.spawn()
    lo, libc, app = _load(proc)
    slot = app.got_slot_for("puts")
    assert struct.unpack("<Q", proc.read(slot, 8))[0] == app.plt_entry(1) + 6
    assert lo.call("app", "puts") == 0x1111
    assert struct.unpack("<Q", proc.read(slot, 8))[0] == libc.symbols["puts"]
    assert lo.resolutions == [("app", "puts", libc.symbols["puts"])]
    assert lo.call("app", "puts") == 0x1111
    assert len(lo.resolutions) == 1  # bound once
    assert lo.call("app", "getpid") == 0x2222
    # The GOT is data (RW, NX); the text is RX: executing the GOT faults.
    assert proc.pte(app.got).nx and proc.pte(app.got).writable
    assert proc.pte(app.text).nx is False and not proc.pte(app.text).writable


def test_position_independent_code_works_wherever_it_lands() -> None:
    m = Machine(config=MachineConfig(cores=1, memory=64 << 20, seed=3))
    results = []
    for _ in range(3):
        proc = m.kernel.spawn()
        lo, libc, app = _load(proc)
        results.append((app.base, libc.base, lo.call("app", "getpid")))
    assert len({r[0] for r in results}) == 3 and len({r[1] for r in results}) == 3
    assert {r[2] for r in results} == {0x2222}
