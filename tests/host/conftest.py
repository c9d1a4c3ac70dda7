"""Host tests: real faults on the real kernel. Each feature is probed (migrate.check) and a test
that needs a missing one is skipped with the probed reason. Nothing here may hang: fault serving
runs against a deadline, and a stuck toucher is released by closing its userfaultfd."""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from migrate.check import capabilities
from migrate.probe import Toucher
from migrate.uffd import Event, Userfaultfd

HANG_GUARD_S = 60


@pytest.fixture(scope="session")
def caps() -> dict[str, Any]:
    return capabilities()


@pytest.fixture
def need(caps: dict[str, Any]) -> Callable[..., None]:
    """need("WP_ASYNC", "MINOR_SHMEM", pagemap_scan=True): skip with the probed reason if absent."""

    def check(*features: str, pagemap_scan: bool = False) -> None:
        u = caps.get("userfaultfd")
        if not caps.get("native"):
            pytest.skip(f"native binding missing: {caps.get('native_error')}")
        if not u or not u["available"]:
            pytest.skip(f"userfaultfd unavailable here: {u and u['error']}")
        if u["user_mode_only_required"]:
            pytest.skip("only user-mode-only userfaultfds here (not root, "
                        f"vm.unprivileged_userfaultfd={u['unprivileged_userfaultfd']}, "
                        "/dev/userfaultfd not accessible)")
        missing = [f for f in features if not u["features_supported"].get(f)]
        if missing:
            pytest.skip(f"kernel {caps['kernel']} lacks userfaultfd features {missing}")
        if pagemap_scan and not caps["pagemap_scan"]:
            pytest.skip(f"PAGEMAP_SCAN unavailable: {caps['pagemap_scan_detail']['error']}")

    return check


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    # Last resort: a test stuck in the kernel dumps every thread's stack and exits.
    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def serve() -> Callable[..., list[Event]]:
    """serve(uffd, toucher, resolve, timeout=10): read events until the toucher finishes, calling
    resolve(event) for each; fail (and free the toucher by closing the uffd) on the deadline."""

    def run(uffd: Userfaultfd, toucher: Toucher, resolve: Callable[[Event], None],
            timeout: float = 10.0) -> list[Event]:
        seen: list[Event] = []
        deadline = time.monotonic() + timeout
        while toucher.running:
            for event in uffd.wait_events(timeout=0.05):
                seen.append(event)
                resolve(event)
            if toucher.join(timeout=0):
                break
            if time.monotonic() > deadline:
                uffd.close()  # wakes the toucher: its range is unregistered, it faults normally
                toucher.join(timeout=5)
                pytest.fail(f"toucher still blocked after {timeout}s; events seen: {seen}")
        if not uffd.closed:
            seen.extend(uffd.read_events())
        return seen

    return run


@pytest.fixture
def reap() -> Iterator[Callable[[int], int]]:
    """reap(pid) -> exit status, waiting at most 10 s; every child is killed and reaped at the
    end of the test either way, so no zombie or hung child survives."""
    pids: list[int] = []

    def wait(pid: int, timeout: float = 10.0) -> int:
        if pid not in pids:
            pids.append(pid)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pids.remove(pid)
                return status
            if time.monotonic() > deadline:
                pytest.fail(f"child {pid} did not exit within {timeout}s")
            time.sleep(0.005)

    wait.track = pids.append  # type: ignore[attr-defined]
    yield wait
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        except ProcessLookupError:
            os.waitpid(pid, 0)


@pytest.fixture
def hugepages_2m() -> Iterator[Callable[[int], None]]:
    """hugepages_2m(n): make sure n free 2 MiB huge pages exist (reserving them as root, and
    giving them back afterwards), or skip with the reason."""
    import pathlib

    base = pathlib.Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
    nr_path = base / "nr_hugepages"
    original: list[int] = []

    def ensure(n: int) -> None:
        if not base.is_dir():
            pytest.skip("no 2 MiB hugetlb support in this kernel")
        free = int((base / "free_hugepages").read_text())
        if free >= n:
            return
        if os.geteuid() != 0:
            pytest.skip(f"{free} free 2 MiB huge pages, need {n}, and not root to reserve more")
        before = int(nr_path.read_text())
        original.append(before)
        nr_path.write_text(str(before + n - free))
        if int((base / "free_hugepages").read_text()) < n:
            pytest.skip("the kernel could not reserve 2 MiB huge pages (memory fragmented)")

    yield ensure
    if original:
        nr_path.write_text(str(original[0]))
