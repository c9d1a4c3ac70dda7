"""``migrate bench TARGET``: benchmarks, each a function returning a JSON-able dict of figures.

Speed goals live here, never in timed tests. Targets are registered as ``module:function`` so a
benchmark's module is imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any
from collections.abc import Callable

# target -> ("module:function", help). The function takes the parsed args and returns a dict.
TARGETS: dict[str, tuple[str, str]] = {
    "local": ("migrate.bench_local:run", "local fault service latency: Python vs C handler"),
    "migrate": ("migrate.bench_migrate:run", "loopback floor, then kv migrations in each mode"),
    "sim": ("migrate.sim.bench:run", "simulated MMU translation throughput"),
}


def _load(spec: str) -> Callable[[argparse.Namespace], dict[str, Any]]:
    module_name, func_name = spec.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=sorted(TARGETS), help="which benchmark to run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported")
    parser.add_argument("--memory", default=None, help="region size for migration benchmarks")


def run(args: argparse.Namespace) -> int:
    figures = _load(TARGETS[args.target][0])(args)
    if args.json:
        json.dump(figures, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_human(figures)
    return 0


def _print_human(figures: dict[str, Any], indent: str = "") -> None:
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{indent}{key}:")
            _print_human(value, indent + "  ")
        else:
            print(f"{indent}{key}: {value}")
