"""Lab tests: each scenario's host part (marked ``host``) and sim part run for real and the
assertions are on their evidence, so a scenario that stops showing what it claims fails here."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from migrate.lab import get


def _jsonable(evidence: dict[str, Any]) -> None:
    json.dumps(evidence)  # the CLI prints it: it must serialise without a default= hook


@pytest.fixture
def host_part() -> Callable[[str], Any]:
    """host_part(name) -> HostResult; skips with the scenario's reason when it could not run."""

    def run(name: str) -> Any:
        result = get(name).host()
        if result.status == "skipped":
            pytest.skip(f"{name}: {result.reason}")
        _jsonable(result.evidence)
        return result

    return run


@pytest.fixture
def sim_part() -> Callable[[str], Any]:
    def run(name: str) -> Any:
        result = get(name).sim()
        _jsonable(result.evidence)
        return result

    return run
