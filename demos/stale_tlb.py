#!/usr/bin/env python3
"""In the simulated machine: what a skipped TLB shootdown lets a JIT's second thread do.

Two threads (cores) of one process have written a code page. mprotect flips it to RX. With the
shootdown, core 1's next write faults. Without it, core 1 still holds a writable TLB entry,
patches the "read-only" code, and core 0 executes the patch.
"""

from migrate.sim import Machine, Signal

for shootdown in (True, False):
    m = Machine(cores=2, memory=32 << 20)
    p = m.kernel.spawn("jit")
    page = p.mmap(None, 4096, "rw")
    for core in (0, 1):
        p.write(page, bytes([0xB8, 7, 0, 0, 0, 0xC3]), core=core)  # mov eax, 7; ret
    p.mprotect(page, 4096, "rx", core=0, shootdown=shootdown)
    try:
        p.write(page + 1, bytes([66]), core=1)
        late = "succeeded (stale writable TLB entry)"
    except Signal as s:
        late = f"{s.signo} {s.si_code}, #PF error code {s.error_code:#x}"
    print(f"shootdown={shootdown}: IPIs {m.kernel.stats['ipis']}, core 1's write {late}; "
          f"core 0 executes {p.execute(page, 6, core=0).hex()}")
