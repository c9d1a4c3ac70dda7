"""End-to-end tests drive real daemons, guests and faults: they need what a migration needs."""

from __future__ import annotations

import pytest

from migrate.check import capabilities


@pytest.fixture(scope="session")
def migration_capable() -> None:
    """Skip, with the probed reason, on a host that cannot run a migration (userfaultfd with
    WP_ASYNC/WP_UNPOPULATED for dirty tracking, and PAGEMAP_SCAN)."""
    caps = capabilities()
    u = caps.get("userfaultfd") or {}
    if not u.get("available"):
        pytest.skip(f"userfaultfd unavailable: {u.get('error')}")
    missing = [f for f in ("WP_ASYNC", "WP_UNPOPULATED") if not u["features_supported"].get(f)]
    if missing:
        pytest.skip(f"kernel {caps['kernel']} lacks {missing} (needed for dirty tracking)")
    if not caps.get("pagemap_scan"):
        pytest.skip("PAGEMAP_SCAN unavailable (needed for dirty tracking)")
