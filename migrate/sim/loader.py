"""Address-space layout randomisation and a tiny dynamic loader with PLT/GOT lazy binding.

Layout constants and formulas follow Linux (x86-64, 4-level paging):
- arch/x86/mm/mmap.c: ``arch_mmap_rnd`` = random(mmap_rnd_bits = 28) pages; ``mmap_base`` =
  PAGE_ALIGN(TASK_SIZE - gap - rnd) with gap = RLIMIT_STACK (8 MiB) + stack_guard_gap + the
  maximum stack randomisation, clamped to [128 MiB, 5/6 TASK_SIZE].
- fs/binfmt_elf.c ``randomize_stack_top``: STACK_RND_MASK = 0x3fffff pages (22 bits).
- fs/binfmt_elf.c PIE: load_bias = ELF_ET_DYN_BASE (2/3 of DEFAULT_MAP_WINDOW) + arch_mmap_rnd().
- arch/x86/kernel/process.c ``arch_randomize_brk``: randomize_page(brk, SZ_1G) for 64-bit tasks
  (18 bits of pages; Linux 6.9 raised it from the 32 MiB still used for ia32 tasks, which was the
  64-bit value before). ``BRK_RND_RANGE_IA32`` keeps the old figure for comparison.

The "machine code" is a five-instruction subset of x86-64, enough for position-independent calls
through the PLT: ``E8 rel32`` (call), ``FF 25 disp32`` (jmp *[rip+disp32]), ``FF 35 disp32``
(push [rip+disp32]), ``68 imm32`` (push), ``E9 rel32`` (jmp), ``B8 imm32 C3`` (mov eax, imm; ret).
It is fetched through the MMU (instruction fetches, so NX applies) and GOT slots are read and
written through it (data accesses), so every step is a real translation in the model.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from migrate.sim.kernel import Process

PAGE = 4096
TASK_SIZE = (1 << 47) - PAGE  # x86-64 TASK_SIZE_MAX with 4-level paging
DEFAULT_MAP_WINDOW = TASK_SIZE
STACK_RND_MASK = 0x3FFFFF  # pages
MMAP_RND_BITS = 28  # /proc/sys/vm/mmap_rnd_bits default on x86-64
BRK_RND_RANGE = 1 << 30  # SZ_1G (64-bit tasks, Linux >= 6.9)
BRK_RND_RANGE_IA32 = 32 << 20  # SZ_32M (ia32 tasks; 64-bit tasks before 6.9)
RLIMIT_STACK = 8 << 20
STACK_GUARD_GAP = 256 * PAGE  # mm/mmap.c stack_guard_gap
ELF_ET_DYN_BASE = (DEFAULT_MAP_WINDOW // 3 * 2) & ~(PAGE - 1)
SIZE_128M = 128 << 20

ENTROPY_BITS = {"stack": 22, "mmap": MMAP_RND_BITS, "pie": MMAP_RND_BITS, "brk": 18}


def page_align(x: int) -> int:
    return (x + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
class Layout:
    """Randomised bases of one process's address space."""

    stack_top: int
    mmap_base: int
    load_bias: int  # where a PIE executable is mapped
    brk_start: int

    @classmethod
    def randomize(cls, rng: random.Random | None, *, exe_size: int = 16 * PAGE,
                  brk_range: int = BRK_RND_RANGE) -> Layout:
        """Linux's layout; ``rng=None`` gives the non-randomised layout (norandmaps)."""
        def bits(n: int) -> int:
            return rng.getrandbits(n) if rng is not None else 0

        stack_rnd = (bits(64) & STACK_RND_MASK) << 12
        stack_top = page_align(TASK_SIZE) - stack_rnd
        gap = RLIMIT_STACK + STACK_GUARD_GAP + (STACK_RND_MASK << 12 if rng is not None else 0)
        gap = min(max(gap, SIZE_128M), TASK_SIZE // 6 * 5)
        mmap_rnd = (bits(64) & ((1 << MMAP_RND_BITS) - 1)) << 12
        mmap_base = page_align(TASK_SIZE - gap - mmap_rnd)
        load_bias = ELF_ET_DYN_BASE + ((bits(64) & ((1 << MMAP_RND_BITS) - 1)) << 12)
        end_of_exe = load_bias + page_align(exe_size)
        brk_start = end_of_exe + (bits(64) % (brk_range // PAGE)) * PAGE
        return cls(stack_top, mmap_base, load_bias, brk_start)


# ------------------------------------------------------------------ the mini ISA
OP_CALL = 0xE8
OP_JMP = 0xE9
OP_PUSH_IMM = 0x68
OP_MOV_EAX = 0xB8
OP_RET = 0xC3
OP_FF = 0xFF  # FF 25: jmp *[rip+disp32]; FF 35: push [rip+disp32]
PLT_ENTRY = 16
GOT_RESERVED = 3  # GOT[0] = _DYNAMIC, GOT[1] = link map id, GOT[2] = resolver
RESOLVER_MAGIC = 0x0F0B  # UD2 bytes at the resolver's address: the "ld.so" trap


def encode_function(value: int) -> bytes:
    return struct.pack("<BIB", OP_MOV_EAX, value & 0xFFFFFFFF, OP_RET)


@dataclass
class SharedObject:
    """A library or executable: exported functions (name -> return value of its body) and the
    symbols it imports through its PLT."""

    name: str
    exports: dict[str, int] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)

    def text_size(self) -> int:
        plt = PLT_ENTRY * (1 + len(self.imports))
        return page_align(plt + 16 * max(1, len(self.exports)) + 16)


@dataclass
class LoadedObject:
    obj: SharedObject
    base: int
    text: int  # start of text (PLT0 at text, PLT[i] at text + 16*(i+1))
    got: int  # start of GOT (its own RW page)
    symbols: dict[str, int]  # name -> absolute address of the function
    call_sites: dict[str, int]  # imported name -> address of a "call name@PLT" instruction

    def plt_entry(self, index: int) -> int:
        return self.text + PLT_ENTRY * (index + 1)

    def got_slot(self, index: int) -> int:
        return self.got + 8 * (GOT_RESERVED + index)

    def got_slot_for(self, name: str) -> int:
        return self.got_slot(self.obj.imports.index(name))


class Loader:
    """Maps shared objects into a process (text RX, GOT RW and NX) and runs calls through the
    PLT with lazy binding."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.loaded: dict[str, LoadedObject] = {}
        self.resolutions: list[tuple[str, str, int]] = []  # (object, symbol, address)
        # ld.so's resolver entry: one executable page holding a trap instruction.
        self.resolver = process.mmap(None, PAGE, "rx", name="ld.so")
        self._poke(self.resolver, struct.pack("<H", RESOLVER_MAGIC))

    def _poke(self, addr: int, data: bytes) -> None:
        """Kernel/loader write of code into a mapping (ignores PTE write permission)."""
        self.process.poke(addr, data)

    def load(self, obj: SharedObject, *, base: int | None = None) -> LoadedObject:
        """Map ``obj`` at ``base`` (an executable's load_bias) or the next mmap address (a
        library), writing its PLT, function bodies and GOT; relative offsets only, so the code
        works wherever it lands."""
        proc = self.process
        text_size = obj.text_size()
        total = text_size + PAGE  # text pages, then one GOT page
        start = proc.mmap(base, total, "rx", fixed=base is not None, name=obj.name)
        got = start + text_size
        proc.mprotect(got, PAGE, "rw")
        text = start
        # PLT0: push [GOT+8]; jmp *[GOT+16]   (rip-relative, so position-independent)
        plt0 = struct.pack("<BBi", OP_FF, 0x35, (got + 8) - (text + 6))
        plt0 += struct.pack("<BBi", OP_FF, 0x25, (got + 16) - (text + 12))
        code = bytearray(plt0.ljust(PLT_ENTRY, b"\x90"))
        for i, _name in enumerate(obj.imports):
            entry = text + PLT_ENTRY * (i + 1)
            slot = got + 8 * (GOT_RESERVED + i)
            e = struct.pack("<BBi", OP_FF, 0x25, slot - (entry + 6))  # jmp *GOT[i]
            e += struct.pack("<BI", OP_PUSH_IMM, i)  # push i
            e += struct.pack("<Bi", OP_JMP, text - (entry + 16))  # jmp PLT0
            code += e
        symbols: dict[str, int] = {}
        for name, value in obj.exports.items():
            symbols[name] = text + len(code)
            code += encode_function(value).ljust(16, b"\x90")
        call_sites: dict[str, int] = {}
        for i, name in enumerate(obj.imports):
            site = text + len(code)
            call_sites[name] = site
            code += struct.pack("<Bi", OP_CALL, (text + PLT_ENTRY * (i + 1)) - (site + 5))
            code += bytes([OP_RET])
        self._poke(text, bytes(code))
        got_init = bytearray()
        got_init += struct.pack("<QQQ", 0, len(self.loaded), self.resolver)
        for i in range(len(obj.imports)):
            # Lazy binding: GOT[i] points back at PLT[i]'s push, so the first call reaches PLT0.
            got_init += struct.pack("<Q", text + PLT_ENTRY * (i + 1) + 6)
        self._poke(got, bytes(got_init))
        loaded = LoadedObject(obj, start, text, got, symbols, call_sites)
        self.loaded[obj.name] = loaded
        return loaded

    def lookup(self, name: str) -> int:
        for lo in self.loaded.values():
            if name in lo.symbols:
                return lo.symbols[name]
        raise KeyError(f"undefined symbol {name!r}")

    def call(self, obj_name: str, symbol: str, *, core: int | None = None,
             max_steps: int = 64) -> int:
        """Execute ``call symbol@PLT`` in ``obj_name``'s code and return the value the callee
        put in EAX. Every instruction byte is fetched through the MMU."""
        lo = self.loaded[obj_name]
        return self.run(lo.call_sites[symbol], core=core, max_steps=max_steps)

    def run(self, pc: int, *, core: int | None = None, max_steps: int = 64) -> int:
        proc = self.process
        stack: list[int] = []
        for _ in range(max_steps):
            op = proc.execute(pc, 1, core=core)[0]
            if op == OP_CALL:
                rel = struct.unpack("<i", proc.execute(pc + 1, 4, core=core))[0]
                stack.append(pc + 5)
                pc = pc + 5 + rel
            elif op == OP_FF:
                modrm, disp = struct.unpack("<Bi", proc.execute(pc + 1, 5, core=core))
                target = struct.unpack("<Q", proc.read(pc + 6 + disp, 8, core=core))[0]
                if modrm == 0x25:
                    pc = target
                elif modrm == 0x35:
                    stack.append(target)
                    pc += 6
                else:
                    raise ValueError(f"unknown FF /{modrm:#x} at {pc:#x}")
            elif op == OP_PUSH_IMM:
                stack.append(struct.unpack("<I", proc.execute(pc + 1, 4, core=core))[0])
                pc += 5
            elif op == OP_JMP:
                rel = struct.unpack("<i", proc.execute(pc + 1, 4, core=core))[0]
                pc = pc + 5 + rel
            elif op == OP_MOV_EAX:
                value = struct.unpack("<I", proc.execute(pc + 1, 4, core=core))[0]
                if proc.execute(pc + 5, 1, core=core)[0] != OP_RET:
                    raise ValueError(f"expected ret at {pc + 5:#x}")
                return value
            elif op == OP_RET:
                pc = stack.pop()
            elif proc.execute(pc, 2, core=core) == struct.pack("<H", RESOLVER_MAGIC):
                # _dl_runtime_resolve: stack holds [..., link map id, reloc index].
                obj_id = stack.pop()  # pushed last, by PLT0
                index = stack.pop()  # pushed by PLT[i]
                lo = list(self.loaded.values())[obj_id]
                name = lo.obj.imports[index]
                addr = self.lookup(name)
                # Patch the GOT through the MMU (a user-mode data write by ld.so).
                proc.write(lo.got_slot(index), struct.pack("<Q", addr), core=core)
                self.resolutions.append((lo.obj.name, name, addr))
                pc = addr
            else:
                raise ValueError(f"unknown opcode {op:#x} at {pc:#x}")
        raise RuntimeError(f"no return within {max_steps} instructions")
