"""``migrate demo``: both daemons as separate processes on loopback, one guest migrated live.

The destination daemon is started first and writes its endpoint to a ready file once it listens;
the source daemon then starts the guest, lets it run, migrates it and prints the report. With two
or more CPUs each daemon (and its guest) gets its own CPU, as two hosts would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from migrate import protocol, workloads


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="kv", choices=sorted(workloads.WORKLOADS))
    parser.add_argument("--memory", default="512M", help="guest region size (default 512M)")
    parser.add_argument("--mode", default="hybrid", choices=protocol.MODES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", type=int, default=0, help="workload operations (0: default)")
    parser.add_argument("--after", type=float, default=1.0,
                        help="seconds the guest runs before migration starts")
    parser.add_argument("--backing", default="anon", choices=protocol.BACKINGS)
    parser.add_argument("--no-pin", action="store_true",
                        help="do not give each daemon its own CPU")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--curve", action="store_true",
                        help="authenticate and encrypt with CURVE keys made for this run")
    parser.add_argument("--no-reserve", action="store_true",
                        help="start the destination without a reserve of faulted-in memory "
                             "(every installed page is then fresh memory)")
    parser.add_argument("--throttle", action="store_true",
                        help="run the guest at SCHED_IDLE during pre-copy (see migrate source)")


def cpus_for_daemons(pin: bool) -> tuple[int | None, int | None]:
    """(source cpu, dest cpu): two distinct CPUs of those this process may use, when it can."""
    if not pin:
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return allowed[0], allowed[1]


def run_demo(workload: str, memory: str | int, mode: str, *, seed: int = 0, ops: int = 0,
             after: float = 1.0, backing: str = "anon", pin: bool = True,
             timeout: float = 600.0, quiet: bool = False, curve: bool = False,
             throttle: bool = False, reserve: bool = True) -> dict[str, Any]:
    source_cpu, dest_cpu = cpus_for_daemons(pin)
    with tempfile.TemporaryDirectory(prefix="migrate-demo-") as tmp:
        ready = os.path.join(tmp, "dest.endpoint")
        # -P: never let the current directory (say, a source checkout without the compiled
        # extension) shadow the installed package in the daemons we start.
        dest_cmd = [sys.executable, "-P", "-m", "migrate", "dest", "--listen", "tcp://127.0.0.1:*",
                    "--count", "1", "--ready-file", ready, "--quiet"]
        source_keys: list[str] = []
        if curve:
            from migrate import keys

            keys.generate(tmp, "dest")
            keys.generate(tmp, "source")
            dest_cmd += ["--key", os.path.join(tmp, "dest.key"),
                         "--allow", os.path.join(tmp, "source.key_public")]
            source_keys = ["--key", os.path.join(tmp, "source.key"),
                           "--server-key", os.path.join(tmp, "dest.key_public")]
        if dest_cpu is not None:
            dest_cmd += ["--cpu", str(dest_cpu)]
        if reserve:
            # The destination faults in the guest's size of memory while the source starts, as a
            # host expecting a guest would (see `migrate dest --reserve`).
            dest_cmd += ["--reserve", str(memory)]
        dest = subprocess.Popen(dest_cmd, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(ready):
                if dest.poll() is not None:
                    raise RuntimeError(f"the destination daemon exited with {dest.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the destination daemon did not start listening in 30 s")
                time.sleep(0.02)
            with open(ready) as f:
                endpoint = f.read().strip()
            src_cmd = [sys.executable, "-P", "-m", "migrate", "source", "--to", endpoint,
                       "--workload", workload, "--memory", str(memory), "--mode", mode,
                       "--seed", str(seed), "--ops", str(ops), "--after", str(after),
                       "--backing", backing, "--json", *source_keys]
            if quiet:
                src_cmd.append("--quiet")
            if throttle:
                src_cmd.append("--throttle")
            if source_cpu is not None:
                src_cmd += ["--cpu", str(source_cpu)]
            out = subprocess.run(src_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 timeout=timeout, check=False)
            try:
                report = json.loads(out.stdout)
            except json.JSONDecodeError:
                report = {"ok": False, "error": f"the source printed no report (exit status "
                                                f"{out.returncode})"}
            dest.wait(timeout=60)
            report["daemon_exit"] = {"source": out.returncode, "dest": dest.returncode}
            report["cpus"] = {"source": source_cpu, "dest": dest_cpu}
            report["curve"] = curve
            report["dest_reserve"] = str(memory) if reserve else None
            return report
        finally:
            if dest.poll() is None:
                dest.kill()
                dest.wait()


def run(args: argparse.Namespace) -> int:
    from migrate.source import print_report

    report = run_demo(args.workload, args.memory, args.mode, seed=args.seed, ops=args.ops,
                      after=args.after, backing=args.backing, pin=not args.no_pin,
                      timeout=args.timeout, quiet=args.json, curve=args.curve,
                      throttle=args.throttle, reserve=not args.no_reserve)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
        print(f"ok: {str(bool(report.get('ok'))).lower()}")
    return 0 if report.get("ok") else 1
