"""aslr: where things land, run after run, and how code finds them anyway.

Host: a short PIE program (/bin/cat of /proc/self/maps) run many times; the bases of its
executable, [heap], the mmap area (ld.so), libc, [stack] and [vdso] are collected and the
entropy estimated two ways: log2(distinct bases), bounded by log2(runs), and the number of
address bits that varied. The same runs with ADDR_NO_RANDOMIZE (setarch -R) are the control.
PLT/GOT: a PIE binary's R_X86_64_JUMP_SLOT relocations (pure-Python ELF reading), and live in
this process: the GOT slots of the interpreter's shared library hold either the function's
address (already bound: equal to dlsym) or an address in its own PLT (lazy, not called yet).
Sim: the loader with Linux's ASLR formulas and lazy binding through PLT0 and the resolver.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from typing import Any

from migrate.lab.base import (
    HostResult,
    Scenario,
    SimResult,
    entropy_bits,
    read_text,
)
from migrate.lab.elf import ElfError, read_elf

RUNS = 200
CONTROL_RUNS = 10
PROGRAM = "/bin/cat"
REGIONS = ("exe", "heap", "mmap", "libc", "stack", "vdso")
ADDR_NO_RANDOMIZE = 0x0040000


def parse_maps(text: str, exe: str) -> dict[str, int]:
    """Bases from /proc/PID/maps: the first mapping of exe, libc and ld.so, [heap] start,
    [stack] end (its top), [vdso] start."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        path = fields[5] if len(fields) > 5 else ""
        if path == exe:
            out.setdefault("exe", lo)
        elif path == "[heap]":
            out.setdefault("heap", lo)
        elif path == "[stack]":
            out["stack"] = hi
        elif path == "[vdso]":
            out.setdefault("vdso", lo)
        elif "/libc.so" in path:
            out.setdefault("libc", lo)
        elif "/ld-linux" in path:
            out.setdefault("mmap", lo)
    return out


def _no_randomize() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.personality(ADDR_NO_RANDOMIZE)


def sample(runs: int, randomize: bool = True) -> list[dict[str, int]]:
    exe = os.path.realpath(PROGRAM)
    out = []
    for _ in range(runs):
        text = subprocess.run([PROGRAM, "/proc/self/maps"], capture_output=True, text=True,
                              check=True, preexec_fn=None if randomize else _no_randomize).stdout
        out.append(parse_maps(text, exe))
    return out


def varying_bits(values: list[int]) -> int:
    """Bits that differ in at least one sample from the first."""
    if not values:
        return 0
    acc = 0
    for v in values[1:]:
        acc |= v ^ values[0]
    return bin(acc).count("1")


def theoretical_bits() -> dict[str, int | None]:
    """Linux x86-64 (arch/x86/mm/mmap.c, fs/binfmt_elf.c, arch/x86/kernel/process.c):
    mmap_base and a PIE's load address: vm.mmap_rnd_bits pages; stack top: STACK_RND_MASK
    (22 bits of pages); brk: within 1 GiB above the executable (Linux >= 6.9, SZ_1G: 18 bits of
    pages), so [heap] moves with the executable and heap - exe has 18 bits; the vDSO is placed
    in the mmap area on this kernel."""
    rnd = read_text("/proc/sys/vm/mmap_rnd_bits")
    mmap_bits = int(rnd) if rnd else None
    return {"exe": mmap_bits, "mmap": mmap_bits, "libc": mmap_bits, "stack": 22,
            "heap": mmap_bits, "heap_above_exe": 18, "vdso": mmap_bits}


def got_live() -> dict[str, Any]:
    """The GOT of this interpreter's shared library (or executable), read in place."""
    target = None
    maps = read_text("/proc/self/maps") or ""
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) > 5 and "libpython" in fields[5] and int(fields[2], 16) == 0:
            target = (fields[5], int(fields[0].split("-")[0], 16))
            break
    if target is None:
        exe = os.path.realpath(sys.executable)
        for line in maps.splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[5] == exe:
                target = (exe, int(fields[0].split("-")[0], 16))
                break
    if target is None:
        return {"error": "could not find the interpreter's image in /proc/self/maps"}
    path, start = target
    info = read_elf(path)
    bias = start - info.first_load_vaddr
    plt_ranges = [(bias + s.addr, bias + s.addr + s.size) for n, s in info.sections.items()
                  if n in (".plt", ".plt.sec")]
    libc = ctypes.CDLL(None)
    bound = lazy = other = 0
    examples: list[dict[str, str]] = []
    for r_offset, name in info.jump_slots:
        value = ctypes.c_uint64.from_address(bias + r_offset).value
        try:
            target_addr = ctypes.cast(getattr(libc, name), ctypes.c_void_p).value
        except AttributeError:
            target_addr = None
        if target_addr is not None and value == target_addr:
            bound += 1
            kind = "bound"
        elif any(lo <= value < hi for lo, hi in plt_ranges):
            lazy += 1
            kind = "lazy"
        else:
            other += 1  # bound to a definition dlsym does not return (e.g. another library)
            kind = "other"
        if len(examples) < 6 and (kind != "other"):
            examples.append({"symbol": name, "got_slot": hex(bias + r_offset),
                             "holds": hex(value), "dlsym": hex(target_addr or 0), "kind": kind})
    return {"object": path, "load_bias": hex(bias), "bind_now": info.bind_now,
            "jump_slots": len(info.jump_slots), "bound_to_dlsym_address": bound,
            "still_pointing_into_own_plt": lazy, "other": other, "examples": examples}


def host() -> HostResult:
    setting = (read_text("/proc/sys/kernel/randomize_va_space") or "").strip()
    runs = sample(RUNS)
    control = sample(CONTROL_RUNS, randomize=False)
    theory = theoretical_bits()
    for r in runs:
        if "heap" in r and "exe" in r:
            r["heap_above_exe"] = r["heap"] - r["exe"]
    regions: dict[str, Any] = {}
    for name in (*REGIONS, "heap_above_exe"):
        values = [r[name] for r in runs if name in r]
        fixed = {r.get(name) for r in control}
        regions[name] = {
            "samples": len(values), "distinct": len(set(values)),
            "entropy_bits_lower_bound": entropy_bits(len(set(values)), len(values)),
            "varying_bits": varying_bits(values), "theoretical_bits": theory.get(name),
            "example": hex(values[0]) if values else None,
            "distinct_without_aslr": len(fixed),
        }
    elf_path = PROGRAM
    info = read_elf(os.path.realpath(elf_path))
    static = {"binary": os.path.realpath(elf_path), "pie": info.pie, "bind_now": info.bind_now,
              "jump_slots": len(info.jump_slots),
              "first_slots": [{"got_offset": hex(o), "symbol": s} for o, s in
                              info.jump_slots[:5]]}
    # Debian's /usr/bin/python3 is a non-PIE (ET_EXEC) binary: same PLT/GOT, fixed address.
    others: dict[str, dict[str, Any]] = {}
    for other in ("/usr/bin/python3",):
        try:
            o = read_elf(os.path.realpath(other))
        except (OSError, ElfError) as exc:
            others[other] = {"error": str(exc)}
        else:
            others[other] = {"pie": o.pie, "e_type": o.e_type, "bind_now": o.bind_now,
                             "jump_slots": len(o.jump_slots)}
    static["other_binaries"] = others
    live = got_live()
    ev = {"randomize_va_space": setting, "runs": RUNS, "regions": regions,
          "plt_got_static": static, "plt_got_live": live}
    rules: dict[str, bool] = {}
    if setting == "2":
        for name, r in regions.items():
            rules[f"{name}_randomised"] = r["samples"] == RUNS and r["distinct"] >= RUNS * 0.95
            rules[f"{name}_fixed_without_aslr"] = r["distinct_without_aslr"] == 1
            if name != "vdso" and r["theoretical_bits"]:
                rules[f"{name}_varying_bits_match"] = r["varying_bits"] >= r["theoretical_bits"] - 1
    rules["pie_has_plt_relocations"] = info.pie and len(info.jump_slots) > 0
    rules["live_got_bound_slots_match_dlsym"] = live.get("bound_to_dlsym_address", 0) > 0
    ev["rules"] = rules
    status_reason = "" if setting == "2" else f"kernel.randomize_va_space = {setting}"
    summary = (f"bits that varied over {RUNS} runs: " + ", ".join(
        f"{n} {r['varying_bits']} (theory {r['theoretical_bits']})" for n, r in regions.items())
        + f"; all fixed with setarch -R; {static['binary']}: {len(info.jump_slots)} JUMP_SLOTs; "
        f"live GOT of {os.path.basename(live.get('object', '?'))}: "
        f"{live.get('bound_to_dlsym_address')} bound, {live.get('still_pointing_into_own_plt')} "
        f"still lazy")
    return HostResult("ran", status_reason, ev, all(rules.values()), summary)


def sim() -> SimResult:
    import struct

    from migrate.sim import Machine, MachineConfig
    from migrate.sim.loader import ENTROPY_BITS, SharedObject

    m = Machine(config=MachineConfig(cores=1, memory=64 << 20, seed=5))
    layouts = [m.kernel.spawn(f"p{i}").layout for i in range(RUNS)]
    fields = {"stack": [x.stack_top for x in layouts], "mmap": [x.mmap_base for x in layouts],
              "pie": [x.load_bias for x in layouts],
              "brk": [x.brk_start - x.load_bias for x in layouts]}  # brk above the executable
    bases = {k: {"distinct": len(set(v)), "varying_bits": varying_bits(v),
                 "theoretical_bits": ENTROPY_BITS[k]} for k, v in fields.items()}
    m.kernel.aslr = False
    fixed = {m.kernel.spawn("fixed-a").layout, m.kernel.spawn("fixed-b").layout}
    m.kernel.aslr = True
    calls = []
    for i in range(2):  # two processes, the same code at two random addresses
        proc = m.kernel.spawn(f"app{i}")
        lo = proc.loader
        libc = lo.load(SharedObject("libc.so.6", exports={"getpid": 0x1234, "puts": 0x77}))
        app = lo.load(SharedObject("app", imports=["getpid", "puts"]),
                      base=proc.layout.load_bias)
        slot = app.got_slot_for("getpid")
        before = struct.unpack("<Q", proc.read(slot, 8))[0]
        first = lo.call("app", "getpid")
        after = struct.unpack("<Q", proc.read(slot, 8))[0]
        second = lo.call("app", "getpid")
        calls.append({"app_base": hex(app.base), "libc_text": hex(libc.text),
                      "got_before": hex(before), "plt_entry_plus_6": hex(app.plt_entry(0) + 6),
                      "got_after": hex(after), "getpid": hex(libc.symbols["getpid"]),
                      "first_call": hex(first), "second_call": hex(second),
                      "resolutions": len(lo.resolutions)})
    ev = {"processes": RUNS, "bases": bases, "layouts_without_aslr": len(fixed),
          "lazy_binding": calls}
    ok = (all(b["distinct"] >= RUNS * 0.95 for b in bases.values())
          and all(b["varying_bits"] >= b["theoretical_bits"] - 1 for b in bases.values())
          and len(fixed) == 1
          and all(c["got_before"] == c["plt_entry_plus_6"] and c["got_after"] == c["getpid"]
                  and c["first_call"] == c["second_call"] == "0x1234" and c["resolutions"] == 1
                  for c in calls)
          and calls[0]["app_base"] != calls[1]["app_base"])
    summary = (f"bits that varied over {RUNS} model processes: " + ", ".join(
        f"{k} {b['varying_bits']} (formula {b['theoretical_bits']})" for k, b in bases.items())
        + "; GOT slot -> PLT+6 before the first call, -> getpid after; same code works at two "
        "bases")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "aslr", "ASLR and position-independent calls through PLT/GOT",
    "Each process gets its stack, heap, libraries and executable at fresh random addresses, so "
    "an attacker cannot know where anything is. Code still works because it only uses "
    "relative addresses: calls into other libraries go through the PLT and an absolute address "
    "the dynamic linker writes into the GOT (lazily, on the first call).",
    host, sim)
