"""The scenarios, in the order of the source document; each module is imported when first used."""

from __future__ import annotations

import importlib

from migrate.lab.base import Scenario

# name -> module (one per scenario, each exposing SCENARIO)
MODULES: dict[str, str] = {
    "stack-growth": "migrate.lab.stack_growth",
    "zero-page": "migrate.lab.zero_page",
    "mmap-shared-private": "migrate.lab.mmap_shared_private",
    "sparse-file": "migrate.lab.sparse_file",
    "zero-copy-ipc": "migrate.lab.zero_copy_ipc",
    "wx-nx": "migrate.lab.wx_nx",
    "jit-shootdown": "migrate.lab.jit_shootdown",
    "guard-page": "migrate.lab.guard_page",
    "aslr": "migrate.lab.aslr",
    "pku": "migrate.lab.pku",
    "iommu-iova": "migrate.lab.iommu_iova",
    "dma-teardown": "migrate.lab.dma_teardown",
    "huge-pages": "migrate.lab.huge_pages",
    "page-colouring": "migrate.lab.page_colouring",
    "live-migration": "migrate.lab.live_migration",
}

NAMES: tuple[str, ...] = tuple(MODULES)


class UnknownScenario(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown scenario {self.name!r}; known: {', '.join(NAMES)}"


def get(name: str) -> Scenario:
    """The scenario called ``name`` (UnknownScenario, listing the names, if there is none)."""
    if name not in MODULES:
        raise UnknownScenario(name)
    scenario = importlib.import_module(MODULES[name]).SCENARIO
    if not isinstance(scenario, Scenario) or scenario.name != name:
        raise RuntimeError(f"{MODULES[name]}.SCENARIO is not the scenario {name!r}")
    return scenario


def all_scenarios() -> list[Scenario]:
    return [get(name) for name in NAMES]
