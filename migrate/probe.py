"""Touch memory from C: the fault probe, the toucher and a native fault handler.

``probe(addr, "read"|"write"|"fetch")`` performs one access in this process and reports whether it
raised SIGSEGV or SIGBUS (and with which si_code and si_addr) without dying: the C side installs
its handlers for the duration and jumps back with siglongjmp. A "write" probe is a locked add of
zero, so it never changes the byte; a "fetch" calls the address (put a 0xC3 ``ret`` there for an
executable page to return).

``touch_pages`` and :class:`Toucher` access pages from C with the GIL released, timing each first
touch, so a Python thread of the same process can serve userfaultfd faults meanwhile.
"""

from __future__ import annotations

import array
import errno
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from migrate._sys import check, ffi, lib
from migrate.memory import PAGE_SIZE, addr_array

__all__ = [
    "SI_CODE_NAMES",
    "NativeHandler",
    "ProbeResult",
    "Toucher",
    "fork_paused",
    "fork_touch",
    "gettid",
    "now_ns",
    "probe",
    "touch_pages",
]

_KINDS = {"read": lib.MIG_PROBE_READ, "write": lib.MIG_PROBE_WRITE, "fetch": lib.MIG_PROBE_FETCH}

# si_code names per signal (asm-generic/siginfo.h); values from the compiler.
SI_CODE_NAMES: dict[int, dict[int, str]] = {
    lib.SIGSEGV: {
        lib.SEGV_MAPERR: "SEGV_MAPERR",
        lib.SEGV_ACCERR: "SEGV_ACCERR",
        lib.SEGV_BNDERR: "SEGV_BNDERR",
        lib.SEGV_PKUERR: "SEGV_PKUERR",
        5: "SEGV_ACCADI",
        6: "SEGV_ADIDERR",
        7: "SEGV_ADIPERR",
        8: "SEGV_MTEAERR",
        9: "SEGV_MTESERR",
        10: "SEGV_CPERR",
    },
    lib.SIGBUS: {
        lib.BUS_ADRALN: "BUS_ADRALN",
        lib.BUS_ADRERR: "BUS_ADRERR",
        lib.BUS_OBJERR: "BUS_OBJERR",
        lib.BUS_MCEERR_AR: "BUS_MCEERR_AR",
        lib.BUS_MCEERR_AO: "BUS_MCEERR_AO",
    },
}
_SIGNAL_NAMES = {lib.SIGSEGV: "SIGSEGV", lib.SIGBUS: "SIGBUS"}


@dataclass(frozen=True, slots=True)
class ProbeResult:
    faulted: bool
    signal: int  # 0 when it did not fault
    signal_name: str | None
    si_code: int
    si_code_name: str | None
    si_addr: int | None
    trapno: int | None = None  # x86-64: the trap number from the signal frame (14 = #PF)
    error_code: int | None = None  # x86-64: the #PF error code from the signal frame

    @property
    def code(self) -> str | None:
        return self.si_code_name


def probe(address: int, kind: Literal["read", "write", "fetch"] = "read") -> ProbeResult:
    """Access ``address`` once in this process and report whether (and how) it faulted."""
    if kind not in _KINDS:
        raise ValueError(f"probe kind must be 'read', 'write' or 'fetch', not {kind!r}")
    if not isinstance(address, int) or isinstance(address, bool) or address < 0:
        raise ValueError(f"probe address must be a non-negative int, not {address!r}")
    out = ffi.new("struct mig_probe_result *")
    check(lib.mig_probe(address, _KINDS[kind], out), f"probe({kind} {address:#x})")
    if not out.faulted:
        return ProbeResult(False, 0, None, 0, None, None)
    signo, code = int(out.signo), int(out.code)
    name = SI_CODE_NAMES.get(signo, {}).get(code, f"si_code {code}")
    return ProbeResult(True, signo, _SIGNAL_NAMES.get(signo, str(signo)), code, name,
                       int(out.addr), int(out.trapno), int(out.err))


def now_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds (the clock the toucher uses)."""
    return int(lib.mig_now_ns())


def gettid() -> int:
    return int(lib.mig_gettid())


def _addresses(target: Sequence[int] | tuple[int, int, int] | Any) -> tuple[Any, int]:
    """(uint64_t[] cdata, n) for a list of addresses or a (start, npages, stride) triple."""
    if isinstance(target, tuple) and len(target) == 3:
        start, npages, stride = (int(v) for v in target)
        if npages < 0 or stride <= 0:
            raise ValueError(f"(start, npages, stride) needs npages >= 0 and stride > 0: {target}")
        return ffi.new("uint64_t[]", [start + i * stride for i in range(npages)]), npages
    arr = addr_array(target)
    return arr, len(arr)


def touch_pages(target: Sequence[int] | tuple[int, int, int] | Any, write: bool = False
                ) -> array.array:
    """Touch each address once from C (GIL released) and return each touch's latency in ns.

    ``target`` is a sequence of addresses or ``(start, npages, stride)``. A write touch is a
    locked add of zero: it takes a write fault but keeps the byte's value.
    """
    if isinstance(target, tuple) and len(target) == 3:
        start, npages, stride = (int(v) for v in target)
        if npages < 0 or stride <= 0:
            raise ValueError(f"(start, npages, stride) needs npages >= 0 and stride > 0: {target}")
        lat = array.array("Q", bytes(8 * npages))
        lib.mig_touch_range(start, npages, stride, 1 if write else 0,
                            ffi.from_buffer("uint64_t[]", lat) if npages else ffi.NULL)
        return lat
    arr, n = _addresses(target)
    lat = array.array("Q", bytes(8 * n))
    lib.mig_touch_pages(arr, n, 1 if write else 0,
                        ffi.from_buffer("uint64_t[]", lat) if n else ffi.NULL)
    return lat


class Toucher:
    """A C thread touching pages (see :func:`touch_pages`); ``join(timeout)`` never hangs."""

    def __init__(self, target: Sequence[int] | tuple[int, int, int] | Any, write: bool = False
                 ) -> None:
        self._addrs, self.n = _addresses(target)
        self.latencies = array.array("Q", bytes(8 * max(self.n, 1)))
        self._lat = ffi.from_buffer("uint64_t[]", self.latencies)
        self.write = write
        self._handle: Any = None

    @classmethod
    def start(cls, target: Sequence[int] | tuple[int, int, int] | Any, write: bool = False
              ) -> Toucher:
        t = cls(target, write)
        handle = lib.mig_toucher_start(t._addrs, t.n, 1 if write else 0, t._lat)
        if handle == ffi.NULL:
            raise OSError(errno.EAGAIN, "pthread_create(toucher) failed")
        t._handle = handle
        return t

    @property
    def running(self) -> bool:
        return self._handle is not None

    @property
    def done(self) -> int:
        """Pages touched so far."""
        return self.n if self._handle is None else int(lib.mig_toucher_done(self._handle))

    def thread_id(self, timeout: float = 5.0) -> int:
        """The toucher thread's kernel tid (waits until the thread has started)."""
        if self._handle is None:
            raise ValueError("toucher is not running")
        deadline = time.monotonic() + timeout
        while True:
            tid = int(lib.mig_toucher_tid(self._handle))
            if tid or time.monotonic() > deadline:
                return tid
            time.sleep(0.0005)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (GIL released). False if it is still running after ``timeout``."""
        if self._handle is None:
            return True
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        ret = lib.mig_toucher_join(self._handle, ms)
        if ret == -errno.ETIMEDOUT or ret == -errno.EBUSY:
            return False
        check(ret, "pthread_join(toucher)")
        self._handle = None
        return True

    def result(self) -> array.array:
        if self._handle is not None:
            raise ValueError("toucher still running: join() it first")
        return self.latencies[: self.n]


class NativeHandler:
    """A C thread serving MISSING faults on ``uffd`` with UFFDIO_COPY of one source page
    (or UFFDIO_ZEROPAGE when ``src`` is None). For benchmarks and tests."""

    def __init__(self, uffd: int | Any, src: Any = None, page_size: int = PAGE_SIZE) -> None:
        fd = uffd if isinstance(uffd, int) else uffd.fileno()
        if src is None:
            self._src_buf = None
            src_addr = 0
        else:
            self._src_buf = ffi.from_buffer(src)
            if len(self._src_buf) < page_size:
                raise ValueError(f"source buffer must hold a page ({page_size} bytes)")
            src_addr = int(ffi.cast("uintptr_t", self._src_buf))
        self._handle = lib.mig_handler_start(fd, src_addr, page_size)
        if self._handle == ffi.NULL:
            raise OSError(errno.EAGAIN, "pthread_create(native handler) failed")

    def stop(self) -> int:
        """Stop the thread; returns how many faults it served."""
        if self._handle is None:
            raise ValueError("native handler already stopped")
        handle, self._handle = self._handle, None
        return check(lib.mig_handler_stop(handle), "native uffd handler")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self.stop()



def fork_touch(target: Sequence[int] | tuple[int, int, int] | Any, write: bool = False,
               out_fd: int = -1) -> int:
    """fork() in C; the child touches the pages, writes the byte it read at each to ``out_fd``
    and exits. Returns the child's pid (reap it with os.waitpid). The call runs without the GIL,
    so a Python thread can read the FORK event the kernel makes fork() wait for."""
    arr, n = _addresses(target)
    return check(lib.mig_fork_touch(arr, n, 1 if write else 0, out_fd), "fork")


def fork_paused() -> int:
    """fork() a child that just sleeps (it shares nothing with Python); kill and reap it."""
    return check(lib.mig_fork_pause(), "fork")
