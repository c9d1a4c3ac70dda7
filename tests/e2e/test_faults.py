"""What happens when a daemon or the link fails mid-migration (see README, "Guarantees")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from sparse_files import allocated_pages

from migrate import source
from migrate.check import capabilities

MIB = 1 << 20
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("migration_capable")]



class DestProcess(subprocess.Popen):
    """A destination daemon whose log lines are collected (stderr) while it runs."""

    log: list[str]

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.log):
            assert self.poll() is None, f"destination exited; log: {self.log}"
            assert time.monotonic() < deadline, f"no {text!r} in the log: {self.log}"
            time.sleep(0.005)


def start_dest(tmp_path: Any, *extra: str) -> tuple[DestProcess, str]:
    ready = tmp_path / "dest.endpoint"
    proc = DestProcess([sys.executable, "-m", "migrate", "dest", "--listen",
                        "tcp://127.0.0.1:*", "--count", "1", "--ready-file", str(ready),
                        "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    proc.log = []
    threading.Thread(target=lambda: proc.log.extend(iter(proc.stderr.readline, "")),
                     daemon=True).start()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, "destination daemon exited"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc, ready.read_text().strip()


class SourceThread:
    def __init__(self, **opts: Any) -> None:
        self.migration = source.SourceMigration(source.SourceOptions(progress=False, **opts))
        self.report: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.report = self.migration.run()

    def wait_for_phase(self, phase: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.migration.phase != phase:
            assert self.thread.is_alive(), f"finished before {phase}: {self.report}"
            assert time.monotonic() < deadline, f"never reached {phase}"
            time.sleep(0.001)

    def join(self, timeout: float = 300) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the source hung"
        assert self.report is not None
        return self.report


def test_destination_killed_before_switchover_leaves_the_guest_running_here(tmp_path):
    dest, endpoint = start_dest(tmp_path)
    try:
        src = SourceThread(to=endpoint, workload="kv", memory=256 * MIB, mode="hybrid",
                           after_s=0.2, peer_timeout_s=3)
        src.wait_for_phase("precopy")
        dest.send_signal(signal.SIGKILL)
        report = src.join()
    finally:
        dest.kill()
        dest.wait()
    assert not report["ok"]
    assert report["phase"] == "precopy"
    assert "destination" in report["error"]
    local = report["guest_at_source"]
    # The guest kept its state: it finished here with the digest of a never-migrated run.
    assert local["resumed"] and local["finished"] and local["ok"], local
    assert local["digest"] == local["reference_digest"]


def _dest_guests(daemon_pid: int) -> list[str]:
    """Guests started by this destination daemon (each names its daemon with --parent)."""
    out = subprocess.run(["pgrep", "-f", f"migrate.guest --role dest .*--parent {daemon_pid}$"],
                         capture_output=True, text=True, check=False).stdout
    return out.split()


def _source_cmd(endpoint: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "migrate", "source", "--to", endpoint, "--json", "--quiet",
            "--peer-timeout", "3", *extra]


def test_source_killed_in_postcopy_with_snapshot_is_resumed_from_disk(tmp_path):
    snap = tmp_path / "snap"
    dest, endpoint = start_dest(tmp_path, "--peer-timeout", "2", "--resume-timeout", "60")
    try:
        # No background push: the destination depends on the source for every page it touches.
        first = subprocess.Popen(_source_cmd(endpoint, "--workload", "chase", "--memory", "64M",
                                             "--mode", "postcopy", "--after", "0.2",
                                             "--ops", "30000000", "--no-push",
                                             "--snapshot", str(snap)),
                                 stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (snap / "state.json").exists():
            assert first.poll() is None, "the first source ended before its snapshot"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # let it serve some faults after announcing the snapshot
        first.kill()
        first.wait()
        second = subprocess.run(_source_cmd("unused", "--resume", str(snap)),
                                capture_output=True, text=True, timeout=300)
        report = json.loads(second.stdout)
        dest.wait(timeout=120)
        dest_report = json.loads(dest.stdout.read().strip().splitlines()[-1])
    finally:
        if dest.poll() is None:
            dest.kill()
    assert report["ok"], report.get("error")
    assert report["resumed_from_snapshot"] == str(snap)
    assert report["digest"] == report["reference_digest"] and report["transfer_ok"]
    assert dest_report["ok"] and dest_report["snapshot"] and dest_report["source_restarts"] == 1
    # Zero pages are holes, every other page is data. (Checked page by page: how many pages
    # are still zero depends on how far the guest got, and with none the file's own metadata
    # blocks made "allocated <= region size" fail by 4 KiB; tests/host/test_snapshot.py checks
    # the same with a known set of zero pages.)
    pages = (snap / "pages.bin").read_bytes()
    zero_pages = {i for i in range(len(pages) // 4096) if not any(pages[i * 4096:(i + 1) * 4096])}
    data_pages = allocated_pages(snap / "pages.bin")
    assert data_pages.isdisjoint(zero_pages)
    assert len(data_pages) + len(zero_pages) == 64 * MIB // 4096


def test_source_killed_in_postcopy_without_snapshot_stops_the_guest_cleanly(tmp_path):
    dest, endpoint = start_dest(tmp_path, "--peer-timeout", "2")
    try:
        first = subprocess.Popen(_source_cmd(endpoint, "--workload", "chase", "--memory", "128M",
                                             "--mode", "postcopy", "--after", "0.2",
                                             "--ops", "30000000", "--no-push"),
                                 stdout=subprocess.PIPE, text=True)
        dest.wait_for_log("runs here now")  # post-copy has begun: kill the source
        time.sleep(0.2)
        assert first.poll() is None
        first.kill()
        first.wait()
        dest.wait(timeout=60)
        out = dest.stdout.read()
    finally:
        if dest.poll() is None:
            dest.kill()
    assert dest.returncode == 1
    dest_report = json.loads(out.strip().splitlines()[-1])
    assert not dest_report["ok"]
    assert "announced no snapshot" in dest_report["error"]
    assert "guest cannot continue and is stopped" in dest_report["error"]
    assert not _dest_guests(dest.pid), "a destination guest was left running"


# ---------------------------------------------------------------------------------------------
# A cut link: two network namespaces joined by veth, the link set down mid-post-copy.


class TwoHosts:
    """Namespaces src and dst joined by a veth pair (10.232.x.1 and .2), with CURVE keys."""

    def __init__(self, tmp_path: Any) -> None:
        import shutil
        import uuid

        caps = capabilities()
        if not caps.get("netns") or os.geteuid() != 0 or shutil.which("ip") is None:
            pytest.skip(f"network namespaces unavailable: "
                        f"{caps.get('netns_detail', {}).get('reason') or 'needs root and ip'}")
        tag = uuid.uuid4().hex[:6]
        self.src, self.dst = f"mig-s-{tag}", f"mig-d-{tag}"
        self.vsrc, self.vdst = f"cs{tag}", f"cd{tag}"
        self.keys = tmp_path / "keys"
        self._ip("netns", "add", self.src)
        self._ip("netns", "add", self.dst)
        self._ip("link", "add", self.vsrc, "type", "veth", "peer", "name", self.vdst)
        self._ip("link", "set", self.vsrc, "netns", self.src)
        self._ip("link", "set", self.vdst, "netns", self.dst)
        self._ip("-n", self.src, "addr", "add", "10.232.0.1/24", "dev", self.vsrc)
        self._ip("-n", self.dst, "addr", "add", "10.232.0.2/24", "dev", self.vdst)
        for ns, dev in ((self.src, self.vsrc), (self.dst, self.vdst)):
            self._ip("-n", ns, "link", "set", dev, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        for name in ("src", "dst"):
            subprocess.run([sys.executable, "-m", "migrate", "keygen", name, "--dir",
                            str(self.keys)], check=True, capture_output=True)

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def link(self, up: bool) -> None:
        self._ip("-n", self.src, "link", "set", self.vsrc, "up" if up else "down")

    def dest(self, tmp_path: Any, *extra: str) -> tuple[DestProcess, str]:
        ready = tmp_path / "dest.endpoint"
        proc = DestProcess(["ip", "netns", "exec", self.dst, sys.executable, "-m", "migrate",
                            "dest", "--listen", "tcp://10.232.0.2:*", "--count", "1",
                            "--ready-file", str(ready), "--json", "--key",
                            str(self.keys / "dst.key"), "--allow",
                            str(self.keys / "src.key_public"), *extra],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.log = []
        threading.Thread(target=lambda: proc.log.extend(iter(proc.stderr.readline, "")),
                         daemon=True).start()
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, f"destination exited: {proc.log}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return proc, ready.read_text().strip()

    def source(self, endpoint: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.src, sys.executable, "-m",
                                 "migrate", "source", "--to", endpoint, "--json", "--quiet",
                                 "--key", str(self.keys / "src.key"), "--server-key",
                                 str(self.keys / "dst.key_public"), *extra],
                                stdout=subprocess.PIPE, text=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.src], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.dst], capture_output=True, check=False)


@pytest.fixture
def hosts(tmp_path):
    h = TwoHosts(tmp_path)
    yield h
    h.close()


MIGRATION = ("--workload", "chase", "--memory", "128M", "--mode", "postcopy", "--after", "0.2",
             "--ops", "30000000", "--no-push")


@pytest.mark.netns
def test_link_cut_for_seconds_mid_postcopy_recovers(hosts, tmp_path):
    dest, endpoint = hosts.dest(tmp_path, "--peer-timeout", "15")
    try:
        src = hosts.source(endpoint, "--peer-timeout", "15", *MIGRATION)
        dest.wait_for_log("runs here now")
        time.sleep(0.2)
        hosts.link(up=False)
        time.sleep(5)  # longer than ZeroMQ's heartbeat timeout: connections are dropped
        hosts.link(up=True)
        out, _ = src.communicate(timeout=300)
        dest.wait(timeout=60)
        dest_report = json.loads(dest.stdout.read().strip().splitlines()[-1])
    finally:
        for p in (dest, src):
            if p.poll() is None:
                p.kill()
    report = json.loads(out)
    assert report["ok"], report.get("error")
    assert report["digest"] == report["reference_digest"] and report["transfer_ok"]
    # faults waited through the cut and were asked again once the link was back
    assert dest_report["ok"] and dest_report["retries"] > 0
    assert dest_report["fault_latency_us"]["max"] > 4_000_000


@pytest.mark.netns
def test_link_cut_past_the_deadline_fails_clearly_on_both_sides(hosts, tmp_path):
    dest, endpoint = hosts.dest(tmp_path, "--peer-timeout", "3")
    try:
        src = hosts.source(endpoint, "--peer-timeout", "3", *MIGRATION)
        dest.wait_for_log("runs here now")
        hosts.link(up=False)
        out, _ = src.communicate(timeout=120)
        dest.wait(timeout=60)
        dest_out = dest.stdout.read()
    finally:
        hosts.link(up=True)
        for p in (dest, src):
            if p.poll() is None:
                p.kill()
    report = json.loads(out)
    assert not report["ok"] and report["phase"] == "postcopy"
    assert "no word from the destination" in report["error"]
    dest_report = json.loads(dest_out.strip().splitlines()[-1])
    assert not dest_report["ok"] and "no word from the source" in dest_report["error"]
    assert dest.returncode == 1 and src.returncode == 1
