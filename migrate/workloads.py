"""The catalogue of deterministic guest workloads, and a handle to drive one in a region.

A workload keeps its whole state in its region: a control block in the first 4 KiB (parameters,
operation counter, RNG state, cursors, both checksummed) and its data after it, linked by 64-bit
indices only. Its final region depends only on (name, size, seed, ops): run it in one go or in many
pieces, paused anywhere, copied to another process at another address in between, and it ends
byte-identical. ``reference_digest`` gives the digest a migrated guest must end with.

The kernels are C (native/wl_workloads.c) and run with the GIL released. Nothing here reads the
region from Python: every access goes through a C call, so the region may have pages that are
still missing (arriving by userfaultfd) while this code runs.

Pausing: ``request_pause()`` (any thread) or the signal installed by ``install_pause_signal``
(a C handler, so it works while ``run`` is inside C) makes ``run`` return ``RunStatus.PAUSED`` at
the next operation boundary, with the control block consistent. Freeze a guest that way before
copying its region; a SIGSTOP in the middle of ``run`` leaves the live state in CPU registers.
"""

from __future__ import annotations

import enum
import json
import math
import mmap
import os
import re
import signal
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from migrate._native import ffi, lib
from migrate.digest import DIGEST_ALGORITHM, region_digest
from migrate.errors import MigrateError

# Bumped (in native/wl_workloads.c) whenever a workload's semantics change: it is stored in every
# control block and is part of every cached reference digest's key.
WL_VERSION: int = lib.WL_VERSION
CONTROL_SIZE: int = lib.WL_CONTROL_SIZE
MIN_SIZE: int = lib.WL_MIN_SIZE
PAGE_SIZE: int = lib.WL_PAGE_SIZE

_MIB = 1024 * 1024
_CALIBRATION_SIZE = 512 * _MIB


class RunStatus(enum.IntEnum):
    """Why ``Workload.run`` returned."""

    DONE = lib.WL_DONE  # total_ops operations are done
    PAUSED = lib.WL_PAUSED  # a pause was requested; resumable
    BUDGET = lib.WL_BUDGET  # max_ops work units were done; resumable


class WorkloadError(MigrateError):
    """A region's control block or data is not a valid workload state (corrupt, foreign, other
    version, wrong size). ``code`` is the native WL_E* value."""

    def __init__(self, code: int, context: str) -> None:
        self.code = code
        reason = ffi.string(lib.wl_strerror(code)).decode()
        super().__init__(f"{context}: {reason} (code {code})")


@dataclass(frozen=True)
class WorkloadSpec:
    """One entry of the catalogue."""

    name: str
    kind: int  # WL_KIND_* of native/wl_workloads.c
    description: str
    access_pattern: str
    # Operations that take about 3 s at 512 MiB after init on the reference machine (2-core AMD
    # EPYC VM; measured with ``benchmark``, medians of 3 runs).
    ops_per_512mib: int
    min_ops: int = 10_000

    def default_ops(self, size: int | str) -> int:
        """A count that keeps the guest busy long enough to be migrated mid-run.

        It grows with the square root of the size (4x the memory, 2x the operations): each
        operation also gets slower in a bigger region (more cache and TLB misses), so a linear
        rule would turn 3 s at 512 MiB into about a minute at 4 GiB. Measured here: about 3 s at
        512 MiB, 0.2-0.5 s at 16 MiB, 10-20 s at 4.5 GiB."""
        nbytes = parse_size(size)
        scaled = self.ops_per_512mib * math.isqrt(nbytes * _CALIBRATION_SIZE) // _CALIBRATION_SIZE
        return max(self.min_ops, scaled)

    def init_steps(self, size: int | str) -> int:
        """Work units of the init phase (preloading, permutation building, page marking)."""
        return int(lib.wl_init_steps(self.kind, parse_size(size)))


WORKLOADS: dict[str, WorkloadSpec] = {
    spec.name: spec
    for spec in (
        WorkloadSpec(
            name="kv",
            kind=lib.WL_KIND_KV,
            description="open-addressing hash table of 64-byte slots at 50% load; "
            "Zipf(0.99)-ranked gets (80%) and in-place puts (20%)",
            access_pattern="init writes every page in address order; then random, skewed: "
            "a few hot slots scattered over the whole region, reads with some writes",
            ops_per_512mib=15_000_000,
        ),
        WorkloadSpec(
            name="stream",
            kind=lib.WL_KIND_STREAM,
            description="sequential read-modify-write sweeps: each adds a constant to every "
            "word of a window of 1/4 of the region that advances by 1/16 per sweep",
            access_pattern="sequential writes, a moving window; one operation = one 64-byte line",
            ops_per_512mib=750_000_000,
        ),
        WorkloadSpec(
            name="chase",
            kind=lib.WL_KIND_CHASE,
            description="pointer chasing along one random cycle through every 64-byte node "
            "(Sattolo's permutation); one hop per operation, a write one hop in 16",
            access_pattern="random, dependent reads over the whole region; few writes",
            ops_per_512mib=15_000_000,
        ),
        WorkloadSpec(
            name="sparse",
            kind=lib.WL_KIND_SPARSE,
            description="random read-modify-writes confined to 10% of the pages, chosen by a "
            "keyed permutation; the other 90% are never touched",
            access_pattern="random within a fixed 10% of pages; the rest stay zero/unpopulated",
            ops_per_512mib=24_000_000,
        ),
    )
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(size: int | str) -> int:
    """Bytes from ``512M``, ``1G``, ``16MiB``, ``4096`` or an int. Units are binary (K = 1024)."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise TypeError(f"size must be an int or a string like '512M', got {size!r}")
    if isinstance(size, int):
        nbytes = size
    else:
        match = _SIZE_RE.match(size)
        if match is None:
            raise ValueError(
                f"bad size {size!r}: expected a number with an optional unit K, M, G or T "
                "(binary; 'MiB', 'MB' and 'M' all mean 2**20), e.g. '512M' or '1GiB'"
            )
        number, unit, _suffix = match.groups()
        if "." in number:
            value = float(number) * _SIZE_UNITS[unit.lower()]
            if value != int(value):
                raise ValueError(f"bad size {size!r}: not a whole number of bytes")
            nbytes = int(value)
        else:
            nbytes = int(number) * _SIZE_UNITS[unit.lower()]
    if nbytes <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return nbytes


def workload_spec(name: str) -> WorkloadSpec:
    """The catalogue entry for ``name``, or a ValueError listing the known names."""
    try:
        return WORKLOADS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown workload {name!r}; known: {', '.join(sorted(WORKLOADS))}"
        ) from None


def _name_of_kind(kind: int) -> str:
    for spec in WORKLOADS.values():
        if spec.kind == kind:
            return spec.name
    raise WorkloadError(lib.WL_EKIND, f"kind {kind}")


def _check_region_size(nbytes: int) -> None:
    if nbytes < MIN_SIZE:
        raise ValueError(f"region of {nbytes} bytes is too small: the minimum is {MIN_SIZE}")
    if nbytes % PAGE_SIZE:
        raise ValueError(f"region size {nbytes} is not a multiple of the {PAGE_SIZE}-byte page")


class Workload:
    """A workload living in ``buffer`` (an mmap, or anything writable exporting the buffer
    protocol). ``Workload(buffer)`` attaches to an initialised region (e.g. the destination's
    copy); ``Workload.init(buffer, name, ...)`` starts a new one."""

    def __init__(self, buffer: Any) -> None:
        self._pointer = self._writable_pointer(buffer)
        self.size = len(self._pointer)
        code = lib.wl_check_control(self._pointer, self.size)
        if code != 0:
            ffi.release(self._pointer)
            raise WorkloadError(code, f"region of {self.size} bytes")
        self.kind = int(lib.wl_kind(self._pointer))
        self.name = _name_of_kind(self.kind)

    @classmethod
    def init(
        cls,
        buffer: Any,
        name: str,
        size: int | str | None = None,
        seed: int = 0,
        ops: int | None = None,
    ) -> Workload:
        """Write a fresh control block for workload ``name`` into ``buffer`` and attach to it.

        ``size`` defaults to the buffer's length and must equal it when given; ``ops`` defaults
        to the workload's ``default_ops(size)``. The data part must start zero-filled (a fresh
        mapping): the init phase, run by ``run``, relies on it."""
        spec = workload_spec(name)
        pointer = cls._writable_pointer(buffer)
        try:
            nbytes = len(pointer)
            if size is not None and parse_size(size) != nbytes:
                raise ValueError(
                    f"size {size!r} ({parse_size(size)} bytes) differs from the buffer's "
                    f"{nbytes} bytes"
                )
            _check_region_size(nbytes)
            if not isinstance(seed, int) or not 0 <= seed < 2**64:
                raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
            total = spec.default_ops(nbytes) if ops is None else ops
            if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total < 2**64:
                raise ValueError(f"ops must be an integer in [0, 2**64), got {ops!r}")
            code = lib.wl_init(pointer, nbytes, spec.kind, seed, total)
            if code != 0:
                raise WorkloadError(code, f"initialising {name} in {nbytes} bytes")
        finally:
            ffi.release(pointer)
        return cls(buffer)

    @staticmethod
    def _writable_pointer(buffer: Any) -> Any:
        try:
            pointer = ffi.from_buffer("uint8_t[]", buffer, require_writable=True)
        except (TypeError, BufferError) as exc:
            raise TypeError(
                f"a workload needs a writable buffer (mmap, bytearray): {exc}"
            ) from None
        if int(ffi.cast("uintptr_t", pointer)) % 8:
            ffi.release(pointer)
            raise ValueError("a workload region must start on an 8-byte boundary")
        return pointer

    # ---- running ----

    def run(self, max_ops: int = 0) -> RunStatus:
        """Continue the workload (GIL released) until it is done, paused, or ``max_ops`` more
        work units (init steps and operations) are done; 0 means no limit."""
        if isinstance(max_ops, bool) or not isinstance(max_ops, int) or not 0 <= max_ops < 2**64:
            raise ValueError(f"max_ops must be an integer in [0, 2**64), got {max_ops!r}")
        code = lib.wl_run(self._live_pointer(), max_ops)
        if code < 0:
            raise WorkloadError(code, f"running {self.name}")
        return RunStatus(code)

    @staticmethod
    def request_pause() -> None:
        """Ask the ``run`` in progress (any thread, this process) to return PAUSED; if none is
        running, the next ``run`` returns PAUSED at once."""
        lib.wl_request_pause()

    @staticmethod
    def clear_pause() -> None:
        """Withdraw a pause request that no ``run`` has consumed yet."""
        lib.wl_clear_pause()

    @staticmethod
    def install_pause_signal(signo: int = signal.SIGUSR1) -> None:
        """Make ``signo`` request a pause, through a C sigaction handler (SA_RESTART) that works
        while ``run`` holds no GIL. This replaces any Python handler for ``signo``."""
        code = lib.wl_install_pause_signal(int(signo))
        if code != 0:
            raise OSError(-code, f"sigaction({int(signo)}): {os.strerror(-code)}")

    @staticmethod
    def progress() -> int:
        """Operations done by the latest ``run`` in this process, published on entry, every 4096
        units and on return; reads a process-global counter, never the region."""
        return int(lib.wl_progress())

    @staticmethod
    def reset_progress() -> None:
        """Zero the progress counters (each ``run`` republishes its region's own on entry)."""
        lib.wl_progress_reset()

    @staticmethod
    def progress_init() -> int:
        """Init steps done by the latest ``run`` in this process (same rules as ``progress``)."""
        return int(lib.wl_progress_init())

    # ---- state ----

    @property
    def ops_done(self) -> int:
        return int(lib.wl_ops_done(self._live_pointer()))

    @property
    def total_ops(self) -> int:
        return int(lib.wl_total_ops(self._live_pointer()))

    def info(self) -> dict[str, Any]:
        """The control block's fields, read through C (safe while pages may be missing)."""
        info = ffi.new("struct wl_info *")
        lib.wl_get_info(self._live_pointer(), info)
        return {
            "name": self.name,
            "kind": int(info.kind),
            "version": int(info.version),
            "size": int(info.size),
            "seed": int(info.seed),
            "total_ops": int(info.total_ops),
            "ops_done": int(info.ops_done),
            "init_total": int(info.init_total),
            "init_done": int(info.init_done),
            "phase": ("init", "run", "done")[int(info.phase)],
        }

    def check(self) -> None:
        """Raise WorkloadError if the control block is no longer consistent."""
        code = lib.wl_check_control(self._live_pointer(), self.size)
        if code != 0:
            raise WorkloadError(code, f"region of {self.size} bytes")

    def digest(self) -> str:
        """The region digest (``migrate.digest.region_digest``) of the whole region."""
        return region_digest(ffi.buffer(self._live_pointer(), self.size))

    def close(self) -> None:
        """Release the buffer (so an mmap can be closed); the handle is unusable afterwards."""
        if self._pointer is not None:
            ffi.release(self._pointer)
            self._pointer = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live_pointer(self) -> Any:
        if self._pointer is None:
            raise ValueError("this Workload handle is closed")
        return self._pointer


def new_region(size: int | str) -> mmap.mmap:
    """A fresh private anonymous mapping: zero-filled, pages populated only when written."""
    nbytes = parse_size(size)
    _check_region_size(nbytes)
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def run_to_completion(name: str, size: int | str, seed: int = 0, ops: int | None = None) -> str:
    """Run a workload start to finish in a fresh private mapping and return its region digest."""
    region = new_region(size)
    try:
        with Workload.init(region, name, seed=seed, ops=ops) as workload:
            status = workload.run()
            if status is not RunStatus.DONE:
                # Only a stray pause request can stop an unlimited run; that is a caller bug here.
                raise RuntimeError(f"reference run of {name} stopped early: {status.name}")
            return workload.digest()
    finally:
        region.close()


# ---- reference digests, cached ----

_CACHE_FORMAT = 1
_DIGEST_RE = re.compile(r"^" + re.escape(DIGEST_ALGORITHM) + r":[0-9a-f]{64}$")


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/migrate/reference-digests.json`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "migrate" / "reference-digests.json"


def _cache_key(name: str, size: int, seed: int, ops: int) -> str:
    return f"{name}|size={size}|seed={seed}|ops={ops}|{DIGEST_ALGORITHM}|wl{WL_VERSION}"


def _load_cache(path: Path) -> dict[str, str]:
    """The valid entries of the cache file; anything malformed is ignored with a warning."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"ignoring unreadable reference digest cache {path}: {exc}", stacklevel=3)
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        warnings.warn(f"ignoring corrupt reference digest cache {path}: {exc}", stacklevel=3)
        return {}
    if (
        not isinstance(data, dict)
        or data.get("format") != _CACHE_FORMAT
        or not isinstance(data.get("entries"), dict)
    ):
        warnings.warn(f"ignoring reference digest cache {path}: unexpected layout", stacklevel=3)
        return {}
    entries: dict[str, str] = {}
    for key, value in data["entries"].items():
        if isinstance(key, str) and isinstance(value, str) and _DIGEST_RE.match(value):
            entries[key] = value
        else:
            warnings.warn(f"ignoring malformed cache entry {key!r} in {path}", stacklevel=3)
    return entries


def _store_cache(path: Path, key: str, digest: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _load_cache(path)
        entries[key] = digest
        # Write a temporary file and rename it over the old one: readers never see half a file.
        fd, tmp = tempfile.mkstemp(prefix=".reference-digests.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(
                    {"format": _CACHE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True
                )
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        warnings.warn(f"could not write reference digest cache {path}: {exc}", stacklevel=3)


def reference_digest(
    name: str,
    size: int | str,
    seed: int = 0,
    ops: int | None = None,
    *,
    cache: bool = True,
) -> str:
    """The digest a never-migrated run of (name, size, seed, ops) ends with.

    Computed in a fresh anonymous mapping in this process (GIL released), and cached by
    (name, size, seed, ops, digest algorithm, WL_VERSION) in ``cache_path()``; ``cache=False``
    neither reads nor writes the cache.

    The progress counter and the pause request are process-global: call this in a daemon, not in
    a guest process whose own workload may be running or about to be paused."""
    spec = workload_spec(name)
    nbytes = parse_size(size)
    _check_region_size(nbytes)
    total = spec.default_ops(nbytes) if ops is None else ops
    key = _cache_key(name, nbytes, seed, total)
    path = cache_path()
    if cache:
        hit = _load_cache(path).get(key)
        if hit is not None:
            return hit
    digest = run_to_completion(name, nbytes, seed=seed, ops=total)
    if cache:
        _store_cache(path, key, digest)
    return digest


# ---- benchmark (for ``migrate bench``; registered by whoever owns migrate/bench.py) ----


def benchmark(args: Any) -> dict[str, Any]:
    """Per workload at ``args.memory`` (default 512M): init seconds, seconds for default_ops,
    operations per second; and the digest's speed over the final region. Medians of
    ``args.runs``."""
    import statistics
    import time

    from migrate.digest import page_hashes

    nbytes = parse_size(getattr(args, "memory", None) or "512M")
    runs = max(1, int(getattr(args, "runs", 3) or 3))
    figures: dict[str, Any] = {"memory_bytes": nbytes, "runs": runs, "workloads": {}}
    digest_rates: list[float] = []
    for spec in WORKLOADS.values():
        init_s, ops_s = [], []
        ops = spec.default_ops(nbytes)
        for _ in range(runs):
            region = new_region(nbytes)
            try:
                with Workload.init(region, spec.name, ops=ops) as workload:
                    t0 = time.perf_counter()
                    if spec.init_steps(nbytes):
                        workload.run(max_ops=spec.init_steps(nbytes))
                    t1 = time.perf_counter()
                    status = workload.run()
                    t2 = time.perf_counter()
                    if status is not RunStatus.DONE:
                        raise RuntimeError(f"{spec.name} stopped early: {status.name}")
                    init_s.append(t1 - t0)
                    ops_s.append(t2 - t1)
                    t3 = time.perf_counter()
                    page_hashes(region)
                    digest_rates.append(nbytes / (time.perf_counter() - t3) / 1e9)
            finally:
                region.close()
        run_s = statistics.median(ops_s)
        figures["workloads"][spec.name] = {
            "default_ops": ops,
            "init_s": round(statistics.median(init_s), 3),
            "ops_s": round(run_s, 3),
            "mops_per_s": round(ops / run_s / 1e6, 2),
        }
    figures["digest_gb_per_s"] = round(statistics.median(digest_rates), 2)
    return figures
