"""wx-nx: W^X. Code written into a writable page cannot be executed there.

Host (in a child process): the bytes of ``mov eax, 42; ret`` written into a RW page; calling
them faults (SIGSEGV, SEGV_ACCERR, si_addr = the code's address, and the signal frame's #PF
error code has I/D set: an instruction fetch); after mprotect to RX the same bytes run and return
42, and a store into the RX page faults. A second child calls the RW code with no handler and is
killed by SIGSEGV. The stack and heap mappings carry no x permission. Sim: NX in the PTE, and
the I/D bit of the error code.
"""

from __future__ import annotations

from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, fault_probe, pf_bits, read_text
from migrate.lab.child import run_child

CODE = bytes([0xB8, 42, 0, 0, 0, 0xC3])  # mov eax, 42 ; ret
PG = 4096


def child_wx() -> dict[str, Any]:
    from migrate.memory import Region

    region = Region.anonymous(PG)
    region.write(0, CODE)
    on_rw = fault_probe(region.address, "fetch")
    region.protect("rx")
    on_rx = fault_probe(region.address, "fetch")
    store_rx = fault_probe(region.address + 8, "write", 0x90)
    maps = read_text("/proc/self/maps") or ""
    perms = {name: line.split()[1] for line in maps.splitlines()
             for name in ("[stack]", "[heap]") if line.endswith(name)}
    return {"address": region.address, "fetch_from_rw": on_rw, "fetch_from_rx": on_rx,
            "store_to_rx": store_rx, "perms": perms}


def child_raw_call() -> dict[str, Any]:
    """Call code on a RW page with no handler: the process dies of SIGSEGV."""
    import ctypes

    from migrate.memory import Region

    region = Region.anonymous(PG)
    region.write(0, CODE)
    func = ctypes.CFUNCTYPE(ctypes.c_int)(region.address)
    return {"returned": func()}  # not reached on an NX-enforcing CPU


def host() -> HostResult:
    res = run_child("migrate.lab.wx_nx:child_wx")
    raw = run_child("migrate.lab.wx_nx:child_raw_call")
    r = res.result or {}
    rw, rx, st = r.get("fetch_from_rw", {}), r.get("fetch_from_rx", {}), r.get("store_to_rx", {})
    for probe in (rw, st):
        if probe.get("faulted"):
            probe["error_bits"] = pf_bits(probe["error_code"])
    ev = {"code": CODE.hex(), "child": r, "raw_call": {"signal": raw.signal,
                                                       "returncode": raw.returncode},
          "child_error": res.stderr[-400:] if res.returncode else None}
    rules = {
        "fetch_from_rw_faults": rw.get("signal") == "SIGSEGV"
        and rw.get("si_code") == "SEGV_ACCERR",
        "si_addr_is_the_code": rw.get("si_addr") == r.get("address"),
        "error_code_is_instruction_fetch": bool(rw.get("error_code", 0) & 0x10)
        and rw.get("trapno") == 14,
        "same_bytes_run_from_rx": rx.get("faulted") is False and rx.get("ret") == 42,
        "store_to_rx_faults": st.get("si_code") == "SEGV_ACCERR"
        and bool(st.get("error_code", 0) & 0x2),
        "raw_call_killed": raw.signal == "SIGSEGV",
        "stack_not_executable": "x" not in r.get("perms", {}).get("[stack]", "x"),
    }
    ev["rules"] = rules
    summary = (f"fetch from RW page: {rw.get('signal')} {rw.get('si_code')} at the code's "
               f"address, #PF error {rw.get('error_code', 0):#x} {rw.get('error_bits')}; from "
               f"RX: returned {rx.get('ret')}; unhandled: child killed by {raw.signal}")
    return HostResult("ran", "", ev, all(rules.values()), summary)


def sim() -> SimResult:
    from migrate.sim import PF_ID, PF_P, PF_US, PF_WR, Machine, Signal

    m = Machine(cores=1, memory=32 << 20)
    p = m.kernel.spawn()
    data = p.mmap(None, PG, "rw")
    p.write(data, CODE)
    out: dict[str, Any] = {}

    def attempt(key: str, fn: Any) -> None:
        try:
            out[key] = {"ran": fn().hex()}
        except Signal as s:
            out[key] = {"signo": s.signo, "si_code": s.si_code, "address": hex(s.address),
                        "error_code": s.error_code, "error_bits": pf_bits(s.error_code)}

    def store() -> bytes:
        p.write(data, b"\x90")
        return b""

    def nx() -> bool:
        pte = p.pte(data)
        return bool(pte is not None and pte.nx)

    attempt("fetch_from_rw", lambda: p.execute(data, len(CODE)))
    nx_bit = nx()
    p.mprotect(data, PG, "rx")
    attempt("fetch_from_rx", lambda: p.execute(data, len(CODE)))
    attempt("store_to_rx", store)
    attempt("fetch_unmapped", lambda: p.execute(0x10000, 1))
    nx_after = nx()
    ev = {"nx_bit_on_rw_page": nx_bit, "nx_bit_after_rx": nx_after, **out}
    ok = (nx_bit and not nx_after
          and out["fetch_from_rw"].get("error_code") == PF_P | PF_US | PF_ID
          and out["fetch_from_rw"].get("si_code") == "SEGV_ACCERR"
          and out["fetch_from_rx"].get("ran") == CODE.hex()
          and out["store_to_rx"].get("error_code") == PF_P | PF_WR | PF_US
          and out["fetch_unmapped"].get("error_code") == PF_US | PF_ID
          and out["fetch_unmapped"].get("si_code") == "SEGV_MAPERR")
    summary = (f"RW page has XD set; fetch -> #PF {out['fetch_from_rw'].get('error_code', 0):#x} "
               f"{out['fetch_from_rw'].get('error_bits')}; after mprotect RX the code is fetched; "
               f"store to RX -> #PF {out['store_to_rx'].get('error_code', 0):#x}")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "wx-nx", "W^X: the NX bit stops injected code",
    "Pages are writable or executable, never both: the stack and heap carry the NX bit, so "
    "code an attacker writes there faults on its first instruction fetch (the #PF error code "
    "says: a fetch, I/D=1) before it can run. The same bytes in an RX page run.",
    host, sim)
