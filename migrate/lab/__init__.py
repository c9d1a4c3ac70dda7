"""The lab: each use of address translation from the source document, shown twice.

Every scenario has a host part (this Linux kernel: real faults, mappings and measurements) and a
sim part (the simulated machine of :mod:`migrate.sim`, showing what the host hides). Both return
evidence and a verdict computed from it::

    from migrate.lab import get, run
    report = run("zero-page")   # {"name", "title", "story", "host": {...}, "sim": {...}, "ok"}
    get("wx-nx").sim().evidence

``migrate lab`` lists them, ``migrate lab NAME [--json]`` runs one, ``migrate lab --all --json``
runs all. See docs/lab.md.
"""

from __future__ import annotations

from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult
from migrate.lab.registry import NAMES, UnknownScenario, all_scenarios, get

__all__ = ["NAMES", "HostResult", "Scenario", "SimResult", "UnknownScenario", "all_scenarios",
           "get", "run"]


def run(name: str, *, host: bool = True, sim: bool = True) -> dict[str, Any]:
    """Run one scenario and return its report dict."""
    return get(name).run(host=host, sim=sim)
