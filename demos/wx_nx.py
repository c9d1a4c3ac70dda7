#!/usr/bin/env python3
"""Write `mov eax, 42; ret` into a page, try to run it while writable, then after mprotect RX.

The fault is caught by the lab's native probe (sigsetjmp), which also reads the #PF error code
the kernel put in the signal frame.
"""

from migrate.lab.base import fault_probe, pf_bits
from migrate.memory import Region

code = bytes([0xB8, 42, 0, 0, 0, 0xC3])
with Region.anonymous(4096) as page:
    page.write(0, code)
    r = fault_probe(page.address, "fetch")
    print(f"RW page:  {r['signal']} {r['si_code']} at {r['si_addr']:#x} (code at "
          f"{page.address:#x}), error code {r['error_code']:#x} = {pf_bits(r['error_code'])}")
    page.protect("rx")
    r = fault_probe(page.address, "fetch")
    print(f"RX page:  ran, returned {r['ret']}")
