"""Just enough ELF64 (little-endian) to read a PIE binary's PLT relocations and dynamic flags.

Reference: the System V gABI (ELF header, section header table, .dynamic) and the x86-64 psABI
(R_X86_64_JUMP_SLOT = 7, the relocation type of a PLT's GOT slot).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ET_DYN = 3
R_X86_64_JUMP_SLOT = 7
R_X86_64_GLOB_DAT = 6
DT_FLAGS = 30
DT_FLAGS_1 = 0x6FFFFFFB
DT_BIND_NOW = 24
DF_BIND_NOW = 0x8
DF_1_NOW = 0x1
DF_1_PIE = 0x08000000


class ElfError(ValueError):
    """The file is not an ELF64 little-endian object this reader understands."""


@dataclass
class Section:
    name: str
    type: int
    addr: int
    offset: int
    size: int
    link: int
    entsize: int


@dataclass
class ElfInfo:
    path: str
    e_type: int
    machine: int
    sections: dict[str, Section]
    jump_slots: list[tuple[int, str]]  # (GOT slot r_offset, symbol name)
    dynamic: dict[int, int] = field(default_factory=dict)
    first_load_vaddr: int = 0

    @property
    def pie(self) -> bool:
        return self.e_type == ET_DYN and bool(self.dynamic.get(DT_FLAGS_1, 0) & DF_1_PIE)

    @property
    def bind_now(self) -> bool:
        return (DT_BIND_NOW in self.dynamic or bool(self.dynamic.get(DT_FLAGS, 0) & DF_BIND_NOW)
                or bool(self.dynamic.get(DT_FLAGS_1, 0) & DF_1_NOW))


def read_elf(path: str) -> ElfInfo:
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError(f"{path}: only ELF64 little-endian is supported (class {data[4]}, "
                       f"data {data[5]})")
    (e_type, e_machine, _ver, _entry, e_phoff, e_shoff, _flags, _ehsize, e_phentsize, e_phnum,
     e_shentsize, e_shnum, e_shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    if e_shoff == 0 or e_shnum == 0:
        raise ElfError(f"{path}: no section header table")
    raw = []
    for i in range(e_shnum):
        raw.append(struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize))
    strtab = raw[e_shstrndx]

    def cstr(offset: int) -> str:
        end = data.index(b"\0", offset)
        return data[offset:end].decode(errors="replace")

    sections: dict[str, Section] = {}
    by_index: list[Section] = []
    for sh in raw:
        name = cstr(strtab[4] + sh[0])
        s = Section(name, sh[1], sh[3], sh[4], sh[5], sh[6], sh[9])
        sections.setdefault(name, s)
        by_index.append(s)
    first_load = min((struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)[3]
                      for i in range(e_phnum)
                      if struct.unpack_from("<I", data, e_phoff + i * e_phentsize)[0] == 1),
                     default=0)
    dynamic: dict[int, int] = {}
    if ".dynamic" in sections:
        d = sections[".dynamic"]
        for off in range(d.offset, d.offset + d.size, 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            dynamic[tag] = val
    slots: list[tuple[int, str]] = []
    rela = sections.get(".rela.plt")
    if rela is not None:
        symtab = by_index[rela.link]
        symstr = by_index[symtab.link]
        for off in range(rela.offset, rela.offset + rela.size, 24):
            r_offset, r_info, _addend = struct.unpack_from("<QQq", data, off)
            if r_info & 0xFFFFFFFF != R_X86_64_JUMP_SLOT:
                continue
            sym = r_info >> 32
            st_name = struct.unpack_from("<I", data, symtab.offset + sym * 24)[0]
            slots.append((r_offset, cstr(symstr.offset + st_name)))
    return ElfInfo(path, e_type, e_machine, sections, slots, dynamic, first_load)
