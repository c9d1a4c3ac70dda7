"""A source snapshot on disk (migrate/snapshot.py): zero pages are holes of a sparse file, every
other page is data, and the snapshot reads back as the region it was written from."""

from __future__ import annotations

from pathlib import Path

from sparse_files import allocated_pages

from migrate.snapshot import Snapshot, SnapshotWriter

PAGE = 4096


def test_zero_pages_are_holes_and_the_rest_reads_back(tmp_path: Path) -> None:
    npages = 600  # more than two of the writer's 256-page chunks
    region = bytearray(npages * PAGE)
    nonzero = {0, 1, 2, 255, 256, 300, 301, 599} | set(range(400, 420))
    for i in nonzero:
        region[i * PAGE + (i % PAGE)] = 1 + i % 255  # one non-zero byte, somewhere in the page

    def read(first: int, count: int, buf: bytearray) -> int:
        buf[:count * PAGE] = region[first * PAGE:(first + count) * PAGE]
        return count * PAGE

    writer = SnapshotWriter(tmp_path, npages, PAGE, read, {"session": "00"})
    writer.start()
    writer.join(60)
    assert writer.error is None and writer.digest is not None

    assert allocated_pages(tmp_path / "pages.bin") == nonzero
    snap = Snapshot(tmp_path)
    try:
        back = bytearray(npages * PAGE)
        assert snap.read_range(0, npages, back) == npages * PAGE
        assert back == region
    finally:
        snap.close()
