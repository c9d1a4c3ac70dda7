"""``migrate`` command line: one sub-command per module, imported only when chosen.

Each command module exposes ``configure(parser)`` and ``run(args) -> int``. Importing lazily keeps
``migrate --help`` fast and lets ``migrate check`` explain a missing native build instead of
crashing on import.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("migrate.check", "report what this host's kernel offers and what will work here"),
    "bench": ("migrate.bench", "run a benchmark (local, sim, migrate) and print its figures"),
    "source": ("migrate.source", "run a guest here and migrate it live to a destination daemon"),
    "dest": ("migrate.dest", "accept live migrations: start guests, serve their faults"),
    "demo": ("migrate.demo", "start both daemons on loopback and migrate one guest live"),
    "lab": ("migrate.lab.cli", "address-translation scenarios, on this host and in the model"),
    "keygen": ("migrate.keys", "make a CURVE key pair (NAME.key, NAME.key_public) for the daemons"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrate",
        description="userfaultfd live migration for Linux, and a simulated MMU/IOMMU lab.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        args = parser.parse_args(argv)
        if args.version:
            from migrate import __version__

            print(__version__)
            return 0
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"migrate {name}", description=COMMANDS[name][1])
    module.configure(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
