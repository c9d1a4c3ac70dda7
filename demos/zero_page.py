#!/usr/bin/env python3
"""Read 1 GiB of fresh memory, then write 4096 pages of it: what RSS and pagemap say.

    .dev/bin/python demos/zero_page.py        (as root, pagemap shows frame numbers)
"""

from migrate._sys import ffi, lib
from migrate.lab.base import proc_status
from migrate.lab.zero_page import kpageflags, pagemap_raw
from migrate.memory import PAGE_SIZE, Region

GIB = 1 << 30
with Region.anonymous(GIB, thp=False) as region:
    npages = GIB // PAGE_SIZE
    rss0 = proc_status()["RssAnon"]
    lib.mig_touch_range(region.address, npages, PAGE_SIZE, 0, ffi.NULL)  # read every page
    rss1 = proc_status()["RssAnon"]
    frames = {v & ((1 << 55) - 1) for v in pagemap_raw(region.address, npages) if v >> 63}
    print(f"read 1 GiB:   RSS +{(rss1 - rss0) >> 10} KiB, "
          f"frames behind {npages} pages: {len(frames)}")
    if len(frames) == 1:
        pfn = next(iter(frames))
        flags = kpageflags(pfn) or 0
        print(f"              that frame is {pfn:#x}; kpageflags says zero page: "
              f"{bool(flags >> 24 & 1)}")
    rss2 = proc_status()["RssAnon"]
    lib.mig_touch_range(region.address, 4096, PAGE_SIZE, 1, ffi.NULL)  # write 4096 pages
    rss3 = proc_status()["RssAnon"]
    print(f"write 4096 pages: RSS +{(rss3 - rss2) // PAGE_SIZE} pages")
