"""Source snapshots: the paused guest's pages and the session state on disk, so a restarted source
can finish a post-copy migration whose first source died.

Layout of a snapshot directory:

* ``pages.bin``  the region at switchover, page i at offset i * page_size; all-zero pages are
                 left as holes (a sparse file), so a mostly-empty guest costs little disk;
* ``hashes.bin`` the per-page hashes (little-endian uint64), the source's side of the final check;
* ``state.json`` written last, atomically: the session id and channels to reconnect to, the
                 region's geometry, the workload and the digest. A directory without it is an
                 unfinished snapshot and is refused.
"""

from __future__ import annotations

import json
import os
import threading
from array import array
from pathlib import Path
from typing import Any
from collections.abc import Callable

from migrate import digest
from migrate.errors import MigrateError

STATE_VERSION = 1
CHUNK_PAGES = 256


class SnapshotError(MigrateError):
    """A snapshot directory that is missing, unfinished or inconsistent."""


class SnapshotWriter(threading.Thread):
    """Writes a snapshot in the background while the source keeps serving faults.

    ``read(first, count, buf) -> bytes read`` supplies pages (from the paused guest). The heavy
    calls (process_vm_readv, pwrite, hashing) release the GIL."""

    def __init__(self, directory: str | os.PathLike[str], npages: int, page_size: int,
                 read: Callable[[int, int, bytearray], int], state: dict[str, Any]) -> None:
        super().__init__(name="snapshot-writer", daemon=True)
        self.dir = Path(directory)
        self.npages, self.page_size = npages, page_size
        self.read = read
        self.state = dict(state)
        self.digest: str | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            self._write()
        except Exception as exc:  # reported to the caller, which decides what it means
            self.error = f"{type(exc).__name__}: {exc}"

    def _write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state_path = self.dir / "state.json"
        if state_path.exists():
            state_path.unlink()  # an older snapshot here is replaced, never mixed with this one
        page, n = self.page_size, self.npages
        hashes = array("Q")
        buf = bytearray(CHUNK_PAGES * page)
        fd = os.open(self.dir / "pages.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, n * page)
            for first in range(0, n, CHUNK_PAGES):
                count = min(CHUNK_PAGES, n - first)
                got = self.read(first, count, buf)
                if got != count * page:
                    raise SnapshotError(f"read {got} of {count * page} bytes at page {first}")
                view = memoryview(buf)[:count * page]
                hashes.extend(digest.page_hashes(view, page))
                zero = digest.zero_map(view, page)
                i = 0
                while i < count:  # write runs of non-zero pages; zero pages stay holes
                    if zero[i]:
                        i += 1
                        continue
                    j = i
                    while j < count and not zero[j]:
                        j += 1
                    os.pwrite(fd, view[i * page:j * page], (first + i) * page)
                    i = j
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(self.dir / "hashes.bin", "wb") as f:
            hashes.tofile(f)
            f.flush()
            os.fsync(f.fileno())
        self.digest = digest.digest_of_hashes(hashes)
        state = dict(self.state, version=STATE_VERSION, npages=n, page_size=page,
                     digest=self.digest, digest_algorithm=digest.DIGEST_ALGORITHM)
        tmp = self.dir / "state.json.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class Snapshot:
    """A finished snapshot, opened for serving pages."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        try:
            self.state = json.loads((self.dir / "state.json").read_text())
        except FileNotFoundError:
            raise SnapshotError(f"{self.dir} holds no finished snapshot (no state.json)") from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{self.dir}/state.json is unreadable: {exc}") from None
        if self.state.get("version") != STATE_VERSION:
            raise SnapshotError(f"snapshot version {self.state.get('version')} is not "
                                f"{STATE_VERSION}")
        if self.state.get("digest_algorithm") != digest.DIGEST_ALGORITHM:
            raise SnapshotError("snapshot made with another digest algorithm")
        self.npages = int(self.state["npages"])
        self.page_size = int(self.state["page_size"])
        self.hashes = array("Q")
        with open(self.dir / "hashes.bin", "rb") as f:
            self.hashes.frombytes(f.read())
        if len(self.hashes) != self.npages:
            raise SnapshotError(f"hashes.bin has {len(self.hashes)} entries for "
                                f"{self.npages} pages")
        if digest.digest_of_hashes(self.hashes) != self.state["digest"]:
            raise SnapshotError("hashes.bin does not match the digest in state.json")
        self.fd = os.open(self.dir / "pages.bin", os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        if size != self.npages * self.page_size:
            os.close(self.fd)
            raise SnapshotError(f"pages.bin is {size} bytes, expected "
                                f"{self.npages * self.page_size}")

    def read_range(self, first: int, count: int, buf: bytearray) -> int:
        return os.preadv(self.fd, [memoryview(buf)[:count * self.page_size]],
                         first * self.page_size)

    def read_list(self, indexes: list[int], buf: bytearray) -> int:
        page, view, total = self.page_size, memoryview(buf), 0
        for k, i in enumerate(indexes):
            total += os.preadv(self.fd, [view[k * page:(k + 1) * page]], i * page)
        return total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
