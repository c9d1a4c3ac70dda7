"""page-colouring: when a virtually indexed cache can hold one physical line twice.

Host: this CPU's L1 data cache geometry from sysfs. A VIPT L1 can alias only if one way is larger
than a page (size / ways > 4 KiB): then some set-index bits come from the virtual page number.
x86 L1Ds are built so that it cannot (here: one colour), so the aliasing itself is not exposed.
Sim: a 32 KiB 4-way VIPT L1 (two colours): four processes map one file MAP_SHARED at addresses
of different colours; without colouring the same line is cached twice and loads see stale data;
with a colour-aware allocator and colour-aligned mappings there are no synonyms.
"""

from __future__ import annotations

from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult


def host() -> HostResult:
    from migrate.sim.cache import host_l1d_geometry

    g = host_l1d_geometry()
    if g is None:
        return HostResult("skipped", "the kernel exposes no cache geometry in sysfs", {}, True,
                          "skipped: no /sys/devices/system/cpu/cpu0/cache")
    d = g.describe()
    ev: dict[str, Any] = {"l1d": d, "way_size_over_page": d["way_size"] / d["page_size"]}
    consistent = d["colours"] == max(1, d["way_size"] // d["page_size"]) and d["sets"] > 0
    if g.aliasing:
        return HostResult("ran", "", ev, consistent,
                          f"L1D {d['size'] >> 10} KiB {d['ways']}-way: {d['colours']} colours, "
                          f"synonyms possible")
    reason = (f"L1D {d['size'] >> 10} KiB, {d['ways']}-way, {d['line_size']} B lines: "
              f"{d['way_size']} bytes per way <= the {d['page_size']}-byte page, so the set "
              f"index lies in the page offset (one colour): this cache cannot alias")
    return HostResult("not-exposed", reason, ev, consistent, reason)


def sim() -> SimResult:
    from migrate.sim import Machine
    from migrate.sim.cache import kernel_shared_file_experiment

    results = {}
    for colouring in (False, True):
        m = Machine(cores=1, memory=64 << 20)
        m.set_cache(32 * 1024, 4)
        results["coloured" if colouring else "uncoloured"] = kernel_shared_file_experiment(
            m, colouring=colouring)
    off, on = results["uncoloured"], results["coloured"]
    ok = (off["geometry"]["colours"] == 2 and off["synonyms"] > 0 and off["stale_reads"] > 0
          and on["synonyms"] == 0 and on["stale_reads"] == 0 and on["colours_agree"]
          and on["stale_values_seen"] == 0)
    summary = (f"32 KiB 4-way VIPT (2 colours), 4 sharers: without colouring {off['synonyms']} "
               f"synonyms, {off['stale_reads']} stale reads; with colouring {on['synonyms']} and "
               f"{on['stale_reads']}")
    return SimResult(results, ok, summary)


SCENARIO = Scenario(
    "page-colouring", "Page colouring for a VIPT cache",
    "A virtually indexed, physically tagged cache picks the set from virtual address bits. If "
    "one way is larger than a page, two virtual addresses of one physical line can pick "
    "different sets (synonyms), and a store through one leaves the other stale. The OS fixes "
    "it by colouring: it only pairs virtual and physical pages whose colour bits agree.",
    host, sim)
