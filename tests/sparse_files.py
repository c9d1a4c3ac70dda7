"""Which pages of a file hold data, as the filesystem reports them (for the snapshot tests)."""

from __future__ import annotations

import os
from pathlib import Path


def allocated_pages(path: Path, page: int = 4096) -> set[int]:
    """Pages inside the file's data extents (SEEK_DATA/SEEK_HOLE); the rest are holes."""
    size, allocated = path.stat().st_size, set()
    with open(path, "rb") as f:
        off = 0
        while off < size:
            try:
                start = os.lseek(f.fileno(), off, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole from off to the end
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            allocated.update(range(start // page, -(-end // page)))
            off = end
    return allocated
