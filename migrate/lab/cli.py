"""``migrate lab``: list the scenarios, run one, several or all; human stories or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from migrate.lab.registry import NAMES, UnknownScenario, get


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"scenario(s) to run: {', '.join(NAMES)}")
    parser.add_argument("--all", action="store_true", help="run every scenario")
    parser.add_argument("--json", action="store_true",
                        help="print the reports as JSON (a list with --all or several names)")
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--host-only", action="store_true", help="run only the host parts")
    part.add_argument("--sim-only", action="store_true", help="run only the sim parts")


def _wrap(text: str, indent: str = "    ") -> str:
    return textwrap.fill(text, width=96, initial_indent=indent, subsequent_indent=indent)


def print_report(report: dict[str, Any]) -> None:
    verdict = "ok" if report["ok"] else "FAILED"
    print(f"== {report['name']}: {report['title']}  [{verdict}]")
    print(_wrap(report["story"]))
    host = report.get("host")
    if host is not None:
        mark = "ok" if host["ok"] else "FAILED"
        print(f"  host ({host['status']}, {mark}, {host['seconds']} s):")
        print(_wrap(host["summary"] or host["reason"], "      "))
        if host["reason"] and host["reason"] != host["summary"]:
            print(_wrap(f"note: {host['reason']}", "      "))
        failed = [k for k, v in (host["evidence"].get("rules") or {}).items() if not v]
        if failed:
            print(_wrap(f"rules not met: {', '.join(failed)}", "      "))
    sim = report.get("sim")
    if sim is not None:
        mark = "ok" if sim["ok"] else "FAILED"
        print(f"  sim ({mark}, {sim['seconds']} s):")
        print(_wrap(sim["summary"], "      "))
    print()


def run(args: argparse.Namespace) -> int:
    if not args.names and not args.all:
        print("scenarios (migrate lab NAME [--json], migrate lab --all [--json]):")
        for name in NAMES:
            print(f"  {name:<20} {get(name).title}")
        return 0
    if args.all and args.names:
        print("give scenario names or --all, not both", file=sys.stderr)
        return 2
    names = list(NAMES) if args.all else args.names
    try:
        scenarios = [get(n) for n in names]
    except UnknownScenario as exc:
        print(str(exc), file=sys.stderr)
        return 2
    reports = []
    for scenario in scenarios:
        report = scenario.run(host=not args.sim_only, sim=not args.host_only)
        reports.append(report)
        if not args.json:
            print_report(report)
            sys.stdout.flush()
    if args.json:
        out: Any = reports if (args.all or len(reports) > 1) else reports[0]
        print(json.dumps(out, indent=2, default=str))
    elif len(reports) > 1:
        passed = sum(r["ok"] for r in reports)
        print(f"{passed}/{len(reports)} scenarios ok")
    return 0 if all(r["ok"] for r in reports) else 1
