"""Run a lab function in a child process, so a part that may crash cannot take the runner down.

``run_child("migrate.lab.guard_page:child_overflow", {...})`` starts ``python -m
migrate.lab.child``, which imports the function, calls it with the arguments and prints its result
as one JSON line. A child killed by a signal is reported (``signal``: "SIGSEGV") as evidence.
For a conversation (the child reports, the parent checks, then tells it to go on),
:class:`Child` exposes ``recv()`` / ``send()`` over the child's stdout / stdin.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_PREFIX = "LAB-JSON "


@dataclass
class ChildResult:
    returncode: int
    signal: str | None  # the signal that killed it, if one did
    result: dict[str, Any] | None  # the function's return value
    messages: list[dict[str, Any]]  # what it emit()ted before
    stderr: str


class Child:
    """A running child executing ``target`` ("module:function")."""

    def __init__(self, target: str, args: dict[str, Any] | None = None, *,
                 pass_fds: Sequence[int] = ()) -> None:
        if ":" not in target:
            raise ValueError(f"child target must be 'module:function', not {target!r}")
        self.target = target
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "migrate.lab.child", target, json.dumps(args or {})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=tuple(pass_fds), text=True)
        self.messages: list[dict[str, Any]] = []

    def recv(self) -> dict[str, Any]:
        """The next JSON line the child emitted (EOFError if it ended without one)."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_PREFIX):
                msg = json.loads(line[len(_PREFIX):])
                self.messages.append(msg)
                return msg
        raise EOFError(f"child {self.target} ended without a message "
                       f"(exit status {self.proc.wait()})")

    def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60.0) -> ChildResult:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            err += f"\n(killed after {timeout} s)"
        for line in out.splitlines():
            if line.startswith(_PREFIX):
                self.messages.append(json.loads(line[len(_PREFIX):]))
        rc = self.proc.returncode
        sig = signal.Signals(-rc).name if rc < 0 else None
        result = None
        if self.messages and self.messages[-1].get("__result__"):
            result = self.messages[-1]["value"]
        messages = [m for m in self.messages if not m.get("__result__")]
        return ChildResult(rc, sig, result, messages, err[-4000:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_child(target: str, args: dict[str, Any] | None = None, *, timeout: float = 60.0,
              pass_fds: Sequence[int] = ()) -> ChildResult:
    return Child(target, args, pass_fds=pass_fds).finish(timeout)


# ------------------------------------------------------------------ the child side
def emit(message: dict[str, Any]) -> None:
    """From a child function: send one JSON message to the parent now."""
    sys.stdout.write(_PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def receive() -> dict[str, Any]:
    """From a child function: wait for the parent's next message."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError("the parent closed the conversation")
    return json.loads(line)


def _main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m migrate.lab.child module:function JSON-ARGS", file=sys.stderr)
        return 2
    module_name, _, func_name = argv[0].partition(":")
    func = getattr(importlib.import_module(module_name), func_name)
    value = func(**json.loads(argv[1]))
    emit({"__result__": True, "value": value})
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: nothing left to clean, and it is faster


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
