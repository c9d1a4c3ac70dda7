"""userfaultfd(2): a Pythonic handle over the raw ioctls in ``native/uffd.c``.

Typical use (the faulting side must be C or another process, see migrate.memory)::

    with Userfaultfd.open(Feature.THREAD_ID) as uffd, Region.anonymous(1 << 20) as region:
        uffd.register(region.address, region.size, RegisterMode.MISSING)
        for event in uffd.read_events():          # after uffd.wait() or a zmq.Poller on uffd
            if isinstance(event, PageFault):
                uffd.copy(event.address & ~(PAGE_SIZE - 1), page_bytes)

Errors are ``OSError`` subclasses naming the ioctl (``FileExistsError`` from ``copy`` means the
page is already present); bad arguments raise ``ValueError`` before any syscall.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from migrate._sys import check, ffi, lib, oserror
from migrate.errors import CapabilityError
from migrate.memory import PAGE_SIZE, addr_array

__all__ = [
    "Event",
    "Feature",
    "Fork",
    "Ioctl",
    "PageFault",
    "RegisterMode",
    "Remap",
    "Remove",
    "Unmap",
    "Userfaultfd",
    "supported_features",
]


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits (include/uapi/linux/userfaultfd.h), values from the compiler."""

    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
    POISON = lib.UFFD_FEATURE_POISON
    WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
    MOVE = lib.UFFD_FEATURE_MOVE

    @classmethod
    def parse(cls, value: Feature | int | str | Iterable[str | Feature]) -> Feature:
        """A Feature from a flag, an int, a name ("WP_ASYNC", case-insensitive, "|" or ","
        separated) or an iterable of names; unknown names raise ValueError listing the known."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            unknown = value & ~int(ALL_FEATURES)
            if unknown:
                raise ValueError(f"unknown userfaultfd feature bits {unknown:#x}")
            return cls(value)
        parts: Iterable[Any]
        if isinstance(value, str):
            parts = [p for p in value.replace(",", "|").split("|") if p.strip()]
        else:
            parts = value  # type: ignore[assignment]
        result = cls(0)
        for part in parts:
            if isinstance(part, cls):
                result |= part
                continue
            if not isinstance(part, str):
                raise TypeError(f"feature must be a Feature or a name, not {part!r}")
            name = part.strip().upper().removeprefix("UFFD_FEATURE_")
            try:
                result |= cls[name]
            except KeyError:
                raise ValueError(
                    f"unknown userfaultfd feature {part!r}; known: {', '.join(cls.__members__)}"
                ) from None
        return result


ALL_FEATURES = Feature(sum(int(f) for f in Feature))


class RegisterMode(enum.IntFlag):
    MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
    WP = lib.UFFDIO_REGISTER_MODE_WP
    MINOR = lib.UFFDIO_REGISTER_MODE_MINOR


class Ioctl(enum.IntFlag):
    """Bits of the ioctl masks the kernel returns (1 << _UFFDIO_*)."""

    REGISTER = 1 << lib._UFFDIO_REGISTER
    UNREGISTER = 1 << lib._UFFDIO_UNREGISTER
    WAKE = 1 << lib._UFFDIO_WAKE
    COPY = 1 << lib._UFFDIO_COPY
    ZEROPAGE = 1 << lib._UFFDIO_ZEROPAGE
    MOVE = 1 << lib._UFFDIO_MOVE
    WRITEPROTECT = 1 << lib._UFFDIO_WRITEPROTECT
    CONTINUE = 1 << lib._UFFDIO_CONTINUE
    POISON = 1 << lib._UFFDIO_POISON
    API = 1 << lib._UFFDIO_API


# ---- events ------------------------------------------------------------------------------


class Event:
    """Base class of the typed userfaultfd events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class PageFault(Event):
    address: int
    write: bool
    wp: bool
    minor: bool
    thread_id: int  # 0 unless Feature.THREAD_ID was requested


@dataclass(frozen=True, slots=True)
class Fork(Event):
    uffd: int  # the child's new userfaultfd, already installed in this process's fd table


@dataclass(frozen=True, slots=True)
class Remap(Event):
    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove(Event):
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap(Event):
    start: int
    end: int


_EV_PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
_EV_FORK = lib.UFFD_EVENT_FORK
_EV_REMAP = lib.UFFD_EVENT_REMAP
_EV_REMOVE = lib.UFFD_EVENT_REMOVE
_EV_UNMAP = lib.UFFD_EVENT_UNMAP
_FL_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
_FL_WP = lib.UFFD_PAGEFAULT_FLAG_WP
_FL_MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR
_MAX_BATCH = 256


def _decode(e: Any) -> Event:
    kind = e.event
    if kind == _EV_PAGEFAULT:
        flags = e.flags
        return PageFault(e.a, bool(flags & _FL_WRITE), bool(flags & _FL_WP),
                         bool(flags & _FL_MINOR), e.ptid)
    if kind == _EV_FORK:
        return Fork(int(e.a))
    if kind == _EV_REMAP:
        return Remap(e.a, e.b, e.c)
    if kind == _EV_REMOVE:
        return Remove(e.a, e.b)
    if kind == _EV_UNMAP:
        return Unmap(e.a, e.b)
    raise OSError(f"userfaultfd read: unknown event type {kind:#x}")


# What an errno from a resolving ioctl means (fs/userfaultfd.c, mm/userfaultfd.c).
_RESOLVE_HINTS: dict[int, str] = {
    errno.ESRCH: "the process whose memory this userfaultfd serves has exited",
    errno.ENOENT: "the range is not registered with this userfaultfd, or its VMA changed",
    errno.EAGAIN: "the address space is changing (mremap/fork in progress): retry",
    errno.EINVAL: "range not registered in a mode that allows this ioctl, or bad alignment",
    errno.EEXIST: "the page is already present",
}

# ---- the handle ---------------------------------------------------------------------------

_O_NONBLOCK = os.O_NONBLOCK
_O_CLOEXEC = os.O_CLOEXEC


def _open_raw(flags: int, via: str) -> tuple[int, str]:
    if via not in ("auto", "dev", "syscall"):
        raise ValueError(f"via must be 'auto', 'dev' or 'syscall', not {via!r}")
    if via in ("auto", "dev"):
        fd = lib.mig_uffd_open_dev(flags)
        if fd >= 0:
            return fd, "dev"
        if via == "dev":
            raise oserror(-fd, "open(/dev/userfaultfd) + USERFAULTFD_IOC_NEW")
        dev_err = -fd
    fd = lib.mig_uffd_open_syscall(flags)
    if fd < 0:
        if via == "auto":
            raise oserror(-fd, "userfaultfd(2) (and /dev/userfaultfd: "
                               f"{os.strerror(dev_err)})")
        raise oserror(-fd, "userfaultfd(2)")
    return fd, "syscall"


def supported_features(via: str = "auto", user_mode_only: bool = False) -> Feature:
    """The features this kernel offers (a throwaway uffd's UFFDIO_API with features=0)."""
    flags = _O_CLOEXEC | (lib.UFFD_USER_MODE_ONLY if user_mode_only else 0)
    fd, _ = _open_raw(flags, via)
    try:
        feats = ffi.new("uint64_t *")
        ioctls = ffi.new("uint64_t *")
        check(lib.mig_uffd_api(fd, 0, feats, ioctls), "ioctl(UFFDIO_API)")
        return Feature(int(feats[0]) & int(ALL_FEATURES))
    finally:
        os.close(fd)


class Userfaultfd:
    """An open userfaultfd whose API handshake is done. Create it with :meth:`open`, or wrap one
    received from elsewhere with :meth:`adopt` (which takes ownership: close() closes the fd)."""

    def __init__(self, fd: int, features: Feature, ioctls: Ioctl, via: str,
                 nonblock: bool = True) -> None:
        self._fd = fd
        self.features = features  # enabled on this fd
        self.offered = features  # what the kernel offers (known after open())
        self.api_ioctls = ioctls
        self.via = via
        self.nonblock = nonblock
        # Per-thread scratch: the C calls run without the GIL, so two threads using one handle
        # (a fault thread and a bulk-install thread) must not share result buffers.
        self._tls = threading.local()
        # Allocated now for the creating thread: allocating later, while another thread sits in
        # a glibc fork() waiting for its EVENT_FORK to be read, could block on malloc's locks.
        self._tls.events = ffi.new("struct mig_uffd_event[]", _MAX_BATCH)
        # (start, end, mode) of what this handle registered, to reject ranges outside it early.
        self._registered: list[tuple[int, int, RegisterMode]] = []

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def open(cls, features: Feature | int | str | Iterable[str] = 0, *,
             nonblock: bool = True, cloexec: bool = True, user_mode_only: bool = False,
             via: Literal["auto", "dev", "syscall"] = "auto") -> Userfaultfd:
        """Create a userfaultfd (``/dev/userfaultfd`` when usable, else the syscall) and do the
        UFFDIO_API handshake asking for ``features``. A feature the kernel refuses raises
        :class:`CapabilityError` naming it."""
        wanted = Feature.parse(features)
        flags = (_O_NONBLOCK if nonblock else 0) | (_O_CLOEXEC if cloexec else 0)
        if user_mode_only:
            flags |= lib.UFFD_USER_MODE_ONLY
        try:
            fd, how = _open_raw(flags, via)
        except PermissionError as exc:
            raise CapabilityError(
                "userfaultfd",
                f"{exc}; as non-root set vm.unprivileged_userfaultfd=1, make /dev/userfaultfd "
                "accessible, or pass user_mode_only=True",
            ) from exc
        try:
            # Check first with a probe handshake so a refusal can name the missing features:
            # UFFDIO_API fails with EINVAL as a whole, and one fd allows only one handshake.
            feats = ffi.new("uint64_t *")
            ioctls = ffi.new("uint64_t *")
            ret = lib.mig_uffd_api(fd, int(wanted), feats, ioctls)
            if ret == -22 and wanted:  # EINVAL: some requested feature is not offered
                offered = supported_features(via=how, user_mode_only=user_mode_only)
                missing = wanted & ~offered
                names = ", ".join(f.name or str(int(f)) for f in Feature if f in missing)
                raise CapabilityError(
                    f"userfaultfd feature {names or wanted!s}",
                    f"kernel {os.uname().release} offers only {_names(offered)}",
                )
            if ret == -1 and wanted & Feature.EVENT_FORK:  # EPERM
                raise CapabilityError("userfaultfd feature EVENT_FORK",
                                      "the kernel allows it only with CAP_SYS_PTRACE")
            check(ret, "ioctl(UFFDIO_API)")
            # The kernel answers with every feature it offers; the ones enabled on this fd are
            # exactly those requested (fs/userfaultfd.c: ctx->features = requested).
            offered = Feature(int(feats[0]) & int(ALL_FEATURES))
            missing = wanted & ~offered
            if missing:
                raise CapabilityError(f"userfaultfd feature {_names(missing)}",
                                      f"kernel offers only {_names(offered)}")
            handle = cls(fd, wanted, Ioctl(int(ioctls[0])), how, nonblock)
            handle.offered = offered
            return handle
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, fd: int, features: Feature | int | str = 0, *,
              via: str = "adopted") -> Userfaultfd:
        """Wrap a uffd whose handshake was already done elsewhere (received over SCM_RIGHTS, or a
        Fork event's fd). No UFFDIO_API is sent again; ``features`` records what was granted."""
        if not isinstance(fd, int) or fd < 0:
            raise ValueError(f"fd must be a non-negative int, not {fd!r}")
        try:
            flags = os.get_blocking(fd)
        except OSError as exc:
            raise OSError(exc.errno, f"adopt uffd {fd}: {exc.strerror}") from None
        return cls(fd, Feature.parse(features), Ioctl(0), via, nonblock=not flags)

    @classmethod
    def supported_features(cls, via: str = "auto") -> Feature:
        return supported_features(via)

    # -- fd ---------------------------------------------------------------------------------
    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("operation on a closed Userfaultfd")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the fd. Threads waiting on its faults are woken and the ranges unregistered."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership of the fd (e.g. after sending it elsewhere) and return it."""
        fd, self._fd = self.fileno(), -1
        return fd

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.close()

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self._fd} via={self.via} features={_names(self.features)}>"

    # -- validation -------------------------------------------------------------------------
    @staticmethod
    def _aligned(addr: int, length: int, what: str, page_size: int = PAGE_SIZE) -> None:
        if not isinstance(addr, int) or not isinstance(length, int):
            raise TypeError(f"{what}: address and length must be ints")
        if addr % page_size:
            raise ValueError(f"{what}: address {addr:#x} is not page-aligned ({page_size})")
        if length <= 0 or length % page_size:
            raise ValueError(f"{what}: length {length:#x} is not a positive multiple of the page "
                             f"size ({page_size})")

    def _check_inside(self, addr: int, length: int, what: str) -> None:
        """Reject ranges outside what this handle registered (adopted handles can't know)."""
        if not self._registered:
            return
        end = addr + length
        for start, stop, _mode in self._registered:
            if start <= addr and end <= stop:
                return
        raise ValueError(f"{what}: range {addr:#x}-{end:#x} is outside every registered range "
                         f"of this userfaultfd")

    # -- registration -------------------------------------------------------------------------
    def register(self, addr: int, length: int, mode: RegisterMode | int | str = RegisterMode.MISSING
                 ) -> Ioctl:
        """UFFDIO_REGISTER; returns the ioctls the kernel allows on the range."""
        mode = _parse_mode(mode)
        self._aligned(addr, length, "register")
        ioctls = ffi.new("uint64_t *")
        check(lib.mig_uffd_register(self.fileno(), addr, length, int(mode), ioctls),
              f"ioctl(UFFDIO_REGISTER {mode!s} {addr:#x}+{length:#x})")
        self._registered.append((addr, addr + length, mode))
        return Ioctl(int(ioctls[0]))

    def unregister(self, addr: int, length: int) -> None:
        self._aligned(addr, length, "unregister")
        check(lib.mig_uffd_unregister(self.fileno(), addr, length),
              f"ioctl(UFFDIO_UNREGISTER {addr:#x}+{length:#x})")
        end = addr + length
        kept: list[tuple[int, int, RegisterMode]] = []
        for start, stop, mode in self._registered:
            if stop <= addr or start >= end:
                kept.append((start, stop, mode))
                continue
            if start < addr:
                kept.append((start, addr, mode))
            if stop > end:
                kept.append((end, stop, mode))
        self._registered = kept

    def forget_range(self, start: int, end: int) -> None:
        """Drop a range from the local bookkeeping (after an UNMAP/REMOVE event, or munmap)."""
        kept: list[tuple[int, int, RegisterMode]] = []
        for s, e, mode in self._registered:
            if e <= start or s >= end:
                kept.append((s, e, mode))
                continue
            if s < start:
                kept.append((s, start, mode))
            if e > end:
                kept.append((end, e, mode))
        self._registered = kept

    @property
    def registered(self) -> list[tuple[int, int, RegisterMode]]:
        return list(self._registered)

    # -- resolving ----------------------------------------------------------------------------
    def wake(self, addr: int, length: int) -> None:
        self._aligned(addr, length, "wake")
        check(lib.mig_uffd_wake(self.fileno(), addr, length), f"ioctl(UFFDIO_WAKE {addr:#x})",
              _RESOLVE_HINTS)

    def copy(self, dst: int, src: int | Any, length: int | None = None, *, dontwake: bool = False,
             wp: bool = False) -> int:
        """UFFDIO_COPY ``length`` bytes to ``dst`` from ``src``: an address, or any buffer (bytes,
        memoryview, a zmq.Frame's ``.buffer``: no copy in Python). Returns bytes copied, which is
        short for a partial copy. EEXIST (page already present) raises FileExistsError."""
        if isinstance(src, int):
            if length is None:
                raise ValueError("copy from an address needs a length")
            src_addr = src
        else:
            buf = ffi.from_buffer(src)
            if length is None:
                length = len(buf)
            elif length > len(buf):
                raise ValueError(f"copy length {length} exceeds the {len(buf)}-byte source buffer")
            src_addr = int(ffi.cast("uintptr_t", buf))
        self._aligned(dst, length, "copy")
        self._check_inside(dst, length, "copy")
        mode = (lib.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0) | (
            lib.UFFDIO_COPY_MODE_WP if wp else 0)
        copied = ffi.new("int64_t *")
        ret = lib.mig_uffd_copy(self._fd, dst, src_addr, length, mode, copied)
        if ret < 0:
            done = int(copied[0])
            if done > 0:
                return done  # partial copy: the caller continues from dst + done
            raise oserror(-done if done < 0 else -ret, f"ioctl(UFFDIO_COPY {dst:#x}+{length:#x})",
                          _RESOLVE_HINTS)
        return int(copied[0])

    def zeropage(self, addr: int, length: int, *, dontwake: bool = False) -> int:
        self._aligned(addr, length, "zeropage")
        self._check_inside(addr, length, "zeropage")
        done = ffi.new("int64_t *")
        ret = lib.mig_uffd_zeropage(self.fileno(), addr, length,
                                    lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0, done)
        return self._result(ret, int(done[0]), f"ioctl(UFFDIO_ZEROPAGE {addr:#x}+{length:#x})")

    def writeprotect(self, addr: int, length: int, enable: bool, *, dontwake: bool = False) -> None:
        self._aligned(addr, length, "writeprotect")
        self._check_inside(addr, length, "writeprotect")
        mode = (lib.UFFDIO_WRITEPROTECT_MODE_WP if enable else 0) | (
            lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0)
        check(lib.mig_uffd_writeprotect(self.fileno(), addr, length, mode),
              f"ioctl(UFFDIO_WRITEPROTECT {'on' if enable else 'off'} {addr:#x}+{length:#x})",
              _RESOLVE_HINTS)

    def continue_(self, addr: int, length: int, *, dontwake: bool = False, wp: bool = False) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages already there (MINOR faults)."""
        self._aligned(addr, length, "continue")
        self._check_inside(addr, length, "continue")
        mode = (lib.UFFDIO_CONTINUE_MODE_DONTWAKE if dontwake else 0) | (
            lib.UFFDIO_CONTINUE_MODE_WP if wp else 0)
        done = ffi.new("int64_t *")
        ret = lib.mig_uffd_continue(self.fileno(), addr, length, mode, done)
        return self._result(ret, int(done[0]), f"ioctl(UFFDIO_CONTINUE {addr:#x}+{length:#x})")

    def poison(self, addr: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_POISON: later accesses get SIGBUS (as for a hardware memory error)."""
        self._aligned(addr, length, "poison")
        self._check_inside(addr, length, "poison")
        done = ffi.new("int64_t *")
        ret = lib.mig_uffd_poison(self.fileno(), addr, length,
                                  lib.UFFDIO_POISON_MODE_DONTWAKE if dontwake else 0, done)
        return self._result(ret, int(done[0]), f"ioctl(UFFDIO_POISON {addr:#x}+{length:#x})")

    def move(self, dst: int, src: int, length: int, *, dontwake: bool = False,
             allow_src_holes: bool = False) -> int:
        """UFFDIO_MOVE: move the pages at ``src`` (private anonymous) to ``dst`` without copying."""
        self._aligned(dst, length, "move")
        self._aligned(src, length, "move source")
        self._check_inside(dst, length, "move")
        mode = (lib.UFFDIO_MOVE_MODE_DONTWAKE if dontwake else 0) | (
            lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0)
        done = ffi.new("int64_t *")
        ret = lib.mig_uffd_move(self.fileno(), dst, src, length, mode, done)
        return self._result(ret, int(done[0]), f"ioctl(UFFDIO_MOVE {src:#x}->{dst:#x}+{length:#x})")

    @staticmethod
    def _result(ret: int, done: int, call: str) -> int:
        if ret < 0:
            if done > 0:
                return done  # partial: the kernel did `done` bytes and said EAGAIN
            raise oserror(-done if done < 0 else -ret, call, _RESOLVE_HINTS)
        return done

    # -- batches --------------------------------------------------------------------------------
    def copy_pages(self, addrs: Sequence[int] | Any, src_buffer: Any, page_size: int = PAGE_SIZE,
                   *, wake: bool = True) -> int:
        """Install page i of ``src_buffer`` at ``addrs[i]`` with UFFDIO_COPY and DONTWAKE, then one
        WAKE per contiguous run of addresses. One C call. A run of consecutive addresses goes in
        one multi-page COPY (its source pages are consecutive too); a page found present (EEXIST)
        is counted as already there and skipped. Returns the pages this call installed."""
        arr = addr_array(addrs)
        n = len(arr)
        buf = ffi.from_buffer(src_buffer)
        if len(buf) < n * page_size:
            raise ValueError(f"source buffer of {len(buf)} bytes holds fewer than {n} pages")
        for a in (arr[0], arr[n - 1]) if n else ():
            self._aligned(int(a), page_size, "copy_pages", page_size)
        installed = ffi.new("uint64_t *")
        ret = lib.mig_uffd_copy_pages(self.fileno(), arr, n, buf, page_size, 1 if wake else 0,
                                      installed)
        check(ret, f"ioctl(UFFDIO_COPY batch of {n}, {int(installed[0])} installed)",
              _RESOLVE_HINTS)
        return int(installed[0])

    def zero_pages(self, addrs: Sequence[int] | Any, page_size: int = PAGE_SIZE, *,
                   wake: bool = True) -> int:
        """Like :meth:`copy_pages` with UFFDIO_ZEROPAGE."""
        arr = addr_array(addrs)
        n = len(arr)
        for a in (arr[0], arr[n - 1]) if n else ():
            self._aligned(int(a), page_size, "zero_pages", page_size)
        installed = ffi.new("uint64_t *")
        ret = lib.mig_uffd_zero_pages(self.fileno(), arr, n, page_size, 1 if wake else 0,
                                      installed)
        check(ret, f"ioctl(UFFDIO_ZEROPAGE batch of {n}, {int(installed[0])} installed)",
              _RESOLVE_HINTS)
        return int(installed[0])

    def copy_range(self, dst: int, src_buffer: Any, page_size: int = PAGE_SIZE, *,
                   dontwake: bool = False) -> int:
        """One UFFDIO_COPY of a contiguous multi-page buffer; if some pages are already present,
        they are skipped and the rest installed. Returns bytes installed."""
        buf = ffi.from_buffer(src_buffer)
        length = len(buf)
        self._aligned(dst, length, "copy_range", page_size)
        self._check_inside(dst, length, "copy_range")
        installed = ffi.new("uint64_t *")
        mode = lib.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0
        ret = lib.mig_uffd_copy_range(self.fileno(), dst, buf, length, page_size, mode, installed)
        check(ret, f"ioctl(UFFDIO_COPY {dst:#x}+{length:#x})", _RESOLVE_HINTS)
        return int(installed[0])

    # -- events ---------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block (GIL released) until events are readable or ``timeout`` seconds pass."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return check(lib.mig_uffd_wait(self.fileno(), ms), "poll(userfaultfd)") > 0

    def read_events(self, max_events: int = 64) -> list[Event]:
        """One read() of up to ``max_events`` messages; ``[]`` when none is pending."""
        if not 0 < max_events <= _MAX_BATCH:
            raise ValueError(f"max_events must be 1..{_MAX_BATCH}, not {max_events}")
        events = self.raw_events()
        n = check(lib.mig_uffd_read_events(self.fileno(), events, max_events),
                  "read(userfaultfd)")
        decoded = [_decode(events[i]) for i in range(n)]
        if self._registered:
            self._track(decoded)
        return decoded

    def wait_events(self, timeout: float | None = None, max_events: int = 64) -> list[Event]:
        """:meth:`wait` then :meth:`read_events` in one C call."""
        if not 0 < max_events <= _MAX_BATCH:
            raise ValueError(f"max_events must be 1..{_MAX_BATCH}, not {max_events}")
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        events = self.raw_events()
        n = check(lib.mig_uffd_wait_events(self.fileno(), events, max_events, ms),
                  "poll+read(userfaultfd)")
        decoded = [_decode(events[i]) for i in range(n)]
        if self._registered:
            self._track(decoded)
        return decoded

    def _track(self, events: list[Event]) -> None:
        """Keep the registered-range bookkeeping in step with the VMAs the events describe."""
        for ev in events:
            kind = type(ev)
            if kind is PageFault:
                continue
            if kind is Unmap:
                self.forget_range(ev.start, ev.end)  # type: ignore[attr-defined]
            elif kind is Remap:
                old, new, length = ev.old, ev.new, ev.length  # type: ignore[attr-defined]
                moved = [(max(s, old), min(e, old + length), m) for s, e, m in self._registered
                         if s < old + length and e > old]
                self.forget_range(old, old + length)
                self._registered.extend((s - old + new, e - old + new, m) for s, e, m in moved)

    def raw_events(self) -> Any:
        """This thread's preallocated ``struct mig_uffd_event[256]`` that read_events/wait_events
        fill, for hot loops calling ``lib.mig_uffd_wait_events(uffd.fileno(), buf, n, ms)``."""
        buf = getattr(self._tls, "events", None)
        if buf is None:
            buf = self._tls.events = ffi.new("struct mig_uffd_event[]", _MAX_BATCH)
        return buf


def _parse_mode(mode: RegisterMode | int | str) -> RegisterMode:
    if isinstance(mode, RegisterMode):
        value = mode
    elif isinstance(mode, str):
        value = RegisterMode(0)
        for part in mode.replace(",", "|").split("|"):
            try:
                value |= RegisterMode[part.strip().upper()]
            except KeyError:
                raise ValueError(f"unknown register mode {part!r}; known: MISSING, WP, MINOR"
                                 ) from None
    elif isinstance(mode, int) and not isinstance(mode, bool):
        if mode & ~int(RegisterMode.MISSING | RegisterMode.WP | RegisterMode.MINOR):
            raise ValueError(f"unknown register mode bits {mode:#x}")
        value = RegisterMode(mode)
    else:
        raise TypeError(f"mode must be a RegisterMode, an int or a name, not {mode!r}")
    if not value:
        raise ValueError("register mode must include MISSING, WP or MINOR")
    return value


def _names(flags: enum.IntFlag) -> str:
    names = [f.name for f in type(flags) if f in flags and f.name]
    return "|".join(names) if names else "none"
