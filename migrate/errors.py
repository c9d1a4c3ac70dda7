"""Domain exceptions.

OS-level failures are plain ``OSError`` subclasses chosen by errno (``FileExistsError`` for EEXIST,
``BlockingIOError`` for EAGAIN, ...) and raised from one chokepoint in ``migrate._sys``. The classes
here are for failures that are the project's own: a capability this host lacks, a peer breaking the
protocol, a migration that could not finish.
"""

from __future__ import annotations


class MigrateError(Exception):
    """Base class of every error this package raises on purpose (besides OSError)."""


class CapabilityError(MigrateError):
    """The host lacks a kernel feature the operation needs; ``reason`` says which and why."""

    def __init__(self, feature: str, reason: str) -> None:
        super().__init__(f"{feature} is not available here: {reason}")
        self.feature = feature
        self.reason = reason


class ProtocolError(MigrateError):
    """A peer sent something the wire protocol does not allow (malformed, oversized, or out of
    order)."""


class MigrationError(MigrateError):
    """A migration failed; ``phase`` names where (handshake, precopy, switchover, postcopy,
    verify)."""

    def __init__(self, phase: str, cause: str) -> None:
        super().__init__(f"migration failed during {phase}: {cause}")
        self.phase = phase
        self.cause = cause


class InternalError(MigrateError):
    """An exception no code here expected (a bug): it still ends the migration the way any
    failure does, named by its type, so the peer hears of it at once and the guest is kept."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"internal error, {type(exc).__name__}: {exc}")
        self.original = exc
