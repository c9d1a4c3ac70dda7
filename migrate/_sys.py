"""The one place where a failed system call becomes a Python exception.

The C wrappers in ``native/`` return ``-errno`` on failure (EINTR is already retried there), so a
negative return is enough to know both that the call failed and why. ``OSError(errno, message)``
makes Python pick the matching subclass itself: ``FileExistsError`` for EEXIST, ``BlockingIOError``
for EAGAIN, ``PermissionError`` for EPERM/EACCES, ``ProcessLookupError`` for ESRCH, and so on.
"""

from __future__ import annotations

import os

from migrate._native import ffi, lib

__all__ = ["check", "check_errno", "ffi", "lib", "oserror"]


def oserror(err: int, call: str, hints: dict[int, str] | None = None) -> OSError:
    """An ``OSError`` (subclass chosen by errno) whose message names the call that failed, plus
    what that errno means for this call when ``hints`` knows it."""
    hint = hints.get(err) if hints else None
    suffix = f" ({hint})" if hint else ""
    return OSError(err, f"{call}: {os.strerror(err)}{suffix}")


def check(ret: int, call: str, hints: dict[int, str] | None = None) -> int:
    """Return ``ret`` if it is >= 0; otherwise raise the ``OSError`` for errno ``-ret``.

    Every ``mig_*`` wrapper reports failure as ``-errno``. For a raw libc call that returns -1 and
    sets errno, use :func:`check_errno` instead.
    """
    if ret < 0:
        raise oserror(-ret, call, hints)
    return ret


def check_errno(ret: int, call: str) -> int:
    """For raw libc calls: ``ret == -1`` means failure, the reason is in errno (saved by cffi)."""
    if ret == -1:
        raise oserror(ffi.errno, call)
    return ret
