"""stack-growth: memory that appears as it is touched, page by page, downwards.

Host: (1) a child process registers a region with a userfaultfd, hands the uffd to this process
(SCM_RIGHTS, as a migrated guest does) and touches the region from the top page down, the way
a stack is used; every first touch is a fault this process serves, so the child's region grows
one page per fault (pagemap of the child before each fault). (2) The kernel's own [stack] VMA
of a child's main thread, sampled from /proc/self/maps while a C recursion deepens: it grows
with the recursion; a recursion past RLIMIT_STACK kills the child with SIGSEGV. Sim: stack VMA
growth through faults, and the stack_guard_gap refusing growth close to another mapping.
"""

from __future__ import annotations

import json
import resource
import socket
import time
from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult
from migrate.lab.child import Child, receive, run_child

UFFD_PAGES = 64
GROW_BYTES = 4 << 20
FRAME_BYTES = 16 << 10


def child_stack_grow(total: int, frame: int, every: int) -> dict[str, Any]:
    """In a child (main thread): recurse and sample the [stack] VMA size."""
    from migrate._sys import ffi, lib

    cap = 4096
    depth = ffi.new("uint64_t[]", cap)
    size = ffi.new("uint64_t[]", cap)
    n = lib.lab_stack_grow(total, frame, every, depth, size, cap)
    if n < 0:
        return {"error": f"lab_stack_grow: errno {-n}"}
    return {"depth": [int(depth[i]) for i in range(n)],
            "vma_size": [int(size[i]) for i in range(n)]}


def child_uffd_grower(sock_fd: int, pages: int) -> dict[str, Any]:
    """In a child: map a region, register it MISSING on a new userfaultfd, hand the uffd to the
    parent (SCM_RIGHTS), then touch the pages top-down from C. Each first touch blocks until
    the parent installs the page."""
    from migrate.memory import PAGE_SIZE, Region
    from migrate.probe import touch_pages
    from migrate.uffd import RegisterMode, Userfaultfd

    sock = socket.socket(fileno=sock_fd)
    region = Region.anonymous(pages * PAGE_SIZE)
    uffd = Userfaultfd.open()
    uffd.register(region.address, region.size, RegisterMode.MISSING)
    socket.send_fds(sock, [json.dumps({"address": region.address}).encode()], [uffd.fileno()])
    receive()  # the parent is ready to serve
    top_down = [region.page_address(i) for i in reversed(range(pages))]
    touch_pages(top_down, write=True)  # C, GIL released; the parent serves each fault
    marks = [int.from_bytes(region.read(a - region.address, 4), "little") for a in top_down]
    return {"marks": marks, "present": sum(e.present for e in region.pagemap())}


def _uffd_growth() -> dict[str, Any]:
    from migrate.memory import PAGE_SIZE, pagemap
    from migrate.uffd import PageFault, Userfaultfd

    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = Child("migrate.lab.stack_growth:child_uffd_grower",
                  {"sock_fd": theirs.fileno(), "pages": UFFD_PAGES}, pass_fds=(theirs.fileno(),))
    theirs.close()
    faults: list[int] = []
    present_before: list[int] = []
    try:
        msg, fds, _flags, _addr = socket.recv_fds(mine, 4096, 1)
        base = json.loads(msg)["address"]
        top_down = [base + i * PAGE_SIZE for i in reversed(range(UFFD_PAGES))]
        with Userfaultfd.adopt(fds[0]) as uffd:
            child.send({"go": True})
            deadline = time.monotonic() + 10
            while len(faults) < UFFD_PAGES:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(faults)} of {UFFD_PAGES} faults in 10 s")
                for event in uffd.wait_events(timeout=0.05):
                    if isinstance(event, PageFault):
                        page = event.address & ~(PAGE_SIZE - 1)
                        present_before.append(sum(
                            e.present for e in pagemap(child.proc.pid, base, UFFD_PAGES)))
                        faults.append(page)
                        uffd.copy(page, len(faults).to_bytes(4, "little") * (PAGE_SIZE // 4))
            res = child.finish(timeout=30)
    finally:
        child.kill()
        mine.close()
    marks = (res.result or {}).get("marks", [])
    present_after = (res.result or {}).get("present")
    return {
        "pages": UFFD_PAGES, "faults": len(faults), "child_pid": child.proc.pid,
        "first_fault": hex(faults[0]) if faults else None,
        "last_fault": hex(faults[-1]) if faults else None,
        "fault_order_is_touch_order": faults == top_down,
        "present_before_each_fault_head": present_before[:8],
        "present_grew_one_per_fault": present_before == list(range(len(faults))),
        "present_after": present_after,
        "child_saw_fault_numbers": marks == list(range(1, UFFD_PAGES + 1)),
    }


def host() -> HostResult:
    uffd = _uffd_growth()
    grow = run_child("migrate.lab.stack_growth:child_stack_grow",
                     {"total": GROW_BYTES, "frame": FRAME_BYTES, "every": 16})
    soft, _hard = resource.getrlimit(resource.RLIMIT_STACK)
    over = soft * 2 if soft != resource.RLIM_INFINITY else 64 << 20
    crash = run_child("migrate.lab.stack_growth:child_stack_grow",
                      {"total": over, "frame": FRAME_BYTES, "every": 1 << 30})
    r = grow.result or {}
    sizes, depths = r.get("vma_size", []), r.get("depth", [])
    stack = {
        "samples": len(sizes),
        "vma_size_first": sizes[0] if sizes else None,
        "vma_size_last": sizes[-1] if sizes else None,
        "depth_last": depths[-1] if depths else None,
        "samples_head": [{"depth": d, "vma_size": s} for d, s in zip(depths[:4], sizes[:4],
                                                                        strict=False)],
        "monotonic": all(b >= a for a, b in zip(sizes, sizes[1:], strict=False)),
        "covers_depth": all(s >= d for d, s in zip(depths, sizes, strict=False)),
        "child_error": grow.stderr[-500:] if grow.returncode else None,
    }
    beyond = {"rlimit_stack": soft, "recursion_bytes": over, "child_signal": crash.signal,
              "child_returncode": crash.returncode}
    ev = {"uffd_region": uffd, "kernel_stack": stack, "beyond_rlimit": beyond}
    ok = bool(uffd["faults"] == UFFD_PAGES and uffd["fault_order_is_touch_order"]
          and uffd["present_grew_one_per_fault"] and uffd["child_saw_fault_numbers"]
          and uffd["present_after"] == UFFD_PAGES
          and bool(sizes) and stack["monotonic"] and stack["covers_depth"]
          and sizes[-1] > sizes[0] and sizes[-1] >= GROW_BYTES * 3 // 4
          and crash.signal == "SIGSEGV")
    summary = (f"child's uffd region grew 1 page per fault, {uffd['faults']} faults top-down; "
               f"[stack] VMA {stack['vma_size_first']} -> {stack['vma_size_last']} bytes as the "
               f"recursion reached {stack['depth_last']} bytes; past RLIMIT_STACK the child got "
               f"{crash.signal}")
    return HostResult("ran", "", ev, ok, summary)


def sim() -> SimResult:
    from migrate.sim import Machine, Signal

    pg = 4096
    m = Machine(cores=1, memory=64 << 20)
    p = m.kernel.spawn("deep", stack_size=pg)
    stack = p.stack_vma
    assert stack is not None
    top, start0 = stack.end, stack.start
    sizes = []
    for depth in range(1, 33):
        p.write(top - depth * pg, b"frame")
        sizes.append(stack.end - stack.start)
    grows = [r for r in p.fault_log if r.resolution == "stack-grow"]
    # Guard gap: a mapping 300 pages below the stack; growth to 259 pages above it is allowed,
    # growth within 256 pages (stack_guard_gap) is refused.
    q = m.kernel.spawn("gap", stack_size=pg)
    qs = q.stack_vma
    assert qs is not None
    below = q.mmap(qs.start - 300 * pg, pg, "rw", fixed=True)
    q.write(qs.start - 40 * pg, b"ok")
    allowed_start = qs.start
    refused: dict[str, Any] = {}
    try:
        q.write(qs.start - 10 * pg, b"too close")
    except Signal as s:
        refused = {"signo": s.signo, "si_code": s.si_code, "address": hex(s.address),
                   "error_code": hex(s.error_code)}
    gap_pages = (allowed_start - (below + pg)) // pg
    ev = {
        "stack_start_before": hex(start0), "stack_start_after": hex(stack.start),
        "vma_sizes_head": sizes[:4], "vma_size_last": sizes[-1],
        "stack_grow_faults": len(grows),
        "grow_error_codes": sorted({hex(r.error_code) for r in grows}),
        "guard_gap": {"mapping_below": hex(below), "stack_start": hex(allowed_start),
                      "pages_between": gap_pages, "refused": refused,
                      "stack_start_unchanged": qs.start == allowed_start},
    }
    ok = (stack.start == top - 32 * pg and len(grows) == 31
          and all(b == a + pg for a, b in zip(sizes[1:], sizes[2:], strict=False))
          and refused.get("si_code") == "SEGV_MAPERR" and qs.start == allowed_start
          and gap_pages >= 256)
    summary = (f"32 pages deep: {len(grows)} stack-grow faults, VMA {sizes[0]} -> {sizes[-1]} "
               f"bytes; growth within the guard gap of a mapping below: "
               f"{refused.get('signo')} {refused.get('si_code')}")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "stack-growth", "Stacks that grow on demand",
    "A stack is reserved address space that becomes memory only when touched: each touch below "
    "the mapped part faults and the kernel extends the stack by a page, until RLIMIT_STACK or "
    "the guard gap to the next mapping says no. userfaultfd hands the same per-page growth to a "
    "user-space handler.",
    host, sim)
