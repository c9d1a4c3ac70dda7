"""The scenario runner, the registry and the ``migrate lab`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from migrate.lab import NAMES, HostResult, Scenario, SimResult, UnknownScenario, get
from migrate.lab.aslr import parse_maps, varying_bits
from migrate.lab.elf import ElfError, read_elf
from migrate.lab.guard_page import GuardedAllocator
from migrate.lab.huge_pages import reserved_huge_pages


def test_fifteen_scenarios_in_document_order() -> None:
    assert len(NAMES) == 15
    assert NAMES[0] == "stack-growth" and NAMES[-1] == "live-migration"
    for name in NAMES:
        s = get(name)
        assert s.name == name and s.title and len(s.story) > 80


def test_unknown_scenario_names_the_known_ones() -> None:
    with pytest.raises(UnknownScenario, match="known: stack-growth"):
        get("no-such-thing")


def test_a_part_that_raises_is_a_failed_verdict_not_a_crash() -> None:
    def broken_host() -> HostResult:
        raise OSError("the kernel said no")

    s = Scenario("broken", "Broken", "x", broken_host, lambda: SimResult({"a": 1}, True))
    report = s.run()
    assert report["ok"] is False and report["host"]["ok"] is False
    assert "OSError: the kernel said no" in report["host"]["reason"]
    assert report["sim"]["ok"] is True


def test_host_status_is_checked() -> None:
    with pytest.raises(ValueError, match="host status"):
        HostResult("maybe", "", {}, True)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        GuardedAllocator().alloc(0)
    with pytest.raises(ValueError, match="count must be positive"):
        with reserved_huge_pages("/proc/sys/vm/nr_hugepages", 0):
            pass
    with pytest.raises(ElfError, match="not an ELF"):
        read_elf(__file__)


def test_maps_parsing_and_varying_bits() -> None:
    text = ("55d0a0000000-55d0a0002000 r--p 00000000 fe:00 1 /usr/bin/cat\n"
            "55d0b0000000-55d0b0021000 rw-p 00000000 00:00 0 [heap]\n"
            "7f0000000000-7f0000020000 r--p 00000000 fe:00 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
            "7f0000100000-7f0000101000 r--p 00000000 fe:00 3 /usr/lib/ld-linux-x86-64.so.2\n"
            "7f0000200000-7f0000202000 r-xp 00000000 00:00 0 [vdso]\n"
            "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]\n")
    got = parse_maps(text, "/usr/bin/cat")
    assert got == {"exe": 0x55D0A0000000, "heap": 0x55D0B0000000, "libc": 0x7F0000000000,
                   "mmap": 0x7F0000100000, "vdso": 0x7F0000200000, "stack": 0x7FFC00021000}
    assert varying_bits([0x1000, 0x3000, 0x1000]) == 1
    assert varying_bits([0x1000] * 5) == 0


def _lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migrate", "lab", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli_lists_the_scenarios() -> None:
    out = _lab()
    assert out.returncode == 0
    assert all(name in out.stdout for name in NAMES)


def test_cli_unknown_name_is_an_error() -> None:
    out = _lab("nope")
    assert out.returncode == 2 and "unknown scenario 'nope'" in out.stderr


def test_cli_all_json_shape_sim_only() -> None:
    out = _lab("--all", "--json", "--sim-only")
    reports = json.loads(out.stdout)
    assert [r["name"] for r in reports] == list(NAMES)
    for r in reports:
        assert set(r["sim"]) >= {"evidence", "ok"} and r["ok"] == r["sim"]["ok"]
    assert out.returncode == (0 if all(r["ok"] for r in reports) else 1)


@pytest.mark.host
def test_cli_one_scenario_json_and_human() -> None:
    out = _lab("wx-nx", "--json")
    report = json.loads(out.stdout)
    assert report["name"] == "wx-nx"
    assert set(report["host"]) >= {"status", "reason", "evidence", "ok"}
    assert report["ok"] is (out.returncode == 0)
    human = _lab("guard-page")
    assert "== guard-page" in human.stdout and "host (ran" in human.stdout
