"""A guest: a process whose whole state lives in one memory region (like a VM's RAM).

The guest maps its region, opens a userfaultfd, registers the region, and hands both to its local
daemon over a Unix socket (SCM_RIGHTS) with a layout message. Then it runs a native workload in the
region (GIL released) and reports progress.

* On the **source** the region is registered for asynchronous write-protection (WP_ASYNC), so the
  daemon can find the pages written since the last pre-copy round with PAGEMAP_SCAN. A pause is
  SIGUSR1: the native workload stops at an operation boundary, the guest reports PAUSED and stops
  itself with SIGSTOP. SIGCONT + RESUME continues it (a migration that was abandoned).
* On the **destination** the region starts empty and is registered for MISSING faults, which the
  daemon serves (pre-copied pages wait in the daemon's staging memory, not here). The guest waits
  for GO, reports RUNNING, and continues the workload from the state in the region.

Control messages are msgpack maps on a SOCK_SEQPACKET socketpair (message boundaries kept).
The guest never runs Python code that touches the region while it may be missing: all region
access is in native code, and the faults are served by another process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from migrate.errors import MigrateError

PAUSE_SIGNAL = signal.SIGUSR1
MAX_CONTROL_MESSAGE = 1 << 20
PROGRESS_INTERVAL_S = 0.25


# A guest that sent one of these has ended its workload: its region no longer changes.
# "finished" comes first, "done" (with the region's digest) once the digest is computed.
STILL_MESSAGES = ("finished", "done")


class GuestError(MigrateError):
    """The guest process failed, died, or said something unexpected."""


# ---------------------------------------------------------------------------------------------
# Control channel helpers (both sides)


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = msgpack.packb(msg, use_bin_type=True)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _recv(sock: socket.socket, *, with_fds: bool = False) -> tuple[dict[str, Any], list[int]]:
    if with_fds:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_CONTROL_MESSAGE, 4)
    else:
        data, fds = sock.recv(MAX_CONTROL_MESSAGE), []
    if not data:
        raise EOFError("control socket closed")
    msg = msgpack.unpackb(data, raw=False)
    if not isinstance(msg, dict) or "type" not in msg:
        raise GuestError(f"malformed control message: {msg!r}")
    return msg, list(fds)


def _die_with_parent(parent: int) -> None:
    """A guest never outlives its daemon: a source guest stopped for switchover would otherwise
    linger (and be woken by the kernel's orphaned-group SIGCONT), a destination guest would hang
    in a fault nobody serves."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # the daemon died before the prctl took effect
        os._exit(1)


def _proceed_received(sock: socket.socket) -> bool:
    """The region-event test hook's go-ahead from the daemon (regionevents.EventSpec ",hold"),
    without blocking. An EXIT instead ends the guest."""
    try:
        data = sock.recv(MAX_CONTROL_MESSAGE, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    if not data:
        raise EOFError("control socket closed")
    msg = msgpack.unpackb(data, raw=False)
    if msg.get("type") == "exit":
        raise EOFError("told to exit")
    if msg.get("type") != "proceed":
        raise GuestError(f"expected proceed, got {msg.get('type')}")
    return True


def _guest_main(args: argparse.Namespace) -> int:
    from migrate import memory, regionevents, uffd, workloads

    if args.parent:
        _die_with_parent(args.parent)

    sock = socket.socket(fileno=args.control_fd)
    size = args.memory
    if args.backing == "memfd":
        region = memory.Region.memfd(size, name=f"migrate-guest-{os.getpid()}")
    else:
        region = memory.Region.anonymous(size)
    if args.role == "source":
        features = uffd.Feature.WP_ASYNC | uffd.Feature.WP_UNPOPULATED
        mode = uffd.RegisterMode.WP
    else:
        features = uffd.Feature(0)
        if args.backing == "memfd":
            features |= uffd.Feature.MISSING_SHMEM
        mode = uffd.RegisterMode.MISSING
    # Region events (madvise/munmap/mremap/fork by the guest) reach the daemon, which follows
    # them (docs/region-events.md). EVENT_FORK needs CAP_SYS_PTRACE: refused, open() says so.
    features |= regionevents.GUEST_EVENTS
    try:
        fd = uffd.Userfaultfd.open(features, nonblock=True)
    except MigrateError as exc:  # e.g. EVENT_FORK refused without CAP_SYS_PTRACE: say so
        _send(sock, {"type": "error", "error": str(exc)})
        return 1
    hook = None
    if args.event:
        hook = regionevents.EventHook(regionevents.EventSpec.parse(args.event), region,
                                      fork_child=True, hold=args.role == "source",
                                      proceed=lambda: _proceed_received(sock))
    fd.register(region.address, region.size, mode)
    # On the destination the control block is still missing (page 0 arrives by migration), so
    # the workload is attached only after GO, when faults are being served.
    wl = None
    if args.role == "source":
        wl = workloads.Workload.init(region.view(), args.workload, size, seed=args.seed,
                                     ops=args.ops or None)
    workloads.Workload.install_pause_signal(PAUSE_SIGNAL)

    fds = [fd.fileno()] + ([region.memfd] if args.backing == "memfd" else [])
    _send(sock, {
        "type": "ready", "pid": os.getpid(), "role": args.role, "address": region.address,
        "size": region.size, "page_size": memory.PAGE_SIZE, "backing": args.backing,
        "features": int(fd.features), "total_ops": wl.total_ops if wl is not None else 0,
    }, fds)
    # The daemon holds its own copies of the fds now; the guest keeps the uffd open too, so the
    # registration lives as long as the guest (closing it here would unregister the region).

    stop_reporting = threading.Event()
    lock = threading.Lock()

    def report_progress() -> None:
        while not stop_reporting.wait(PROGRESS_INTERVAL_S):
            with lock:
                _send(sock, {"type": "progress", "ops": workloads.Workload.progress(),
                             "init": workloads.Workload.progress_init()})

    def send(msg: dict[str, Any]) -> None:
        with lock:
            _send(sock, msg)

    msg, _ = _recv(sock)
    if msg["type"] == "exit":
        return 0
    if args.role == "dest":
        go_ns = time.monotonic_ns()
        if msg["type"] != "go":
            raise GuestError(f"expected go, got {msg['type']}")
        send({"type": "running", "go_to_running_ns": time.monotonic_ns() - go_ns})
        wl = workloads.Workload(region.view())
    elif msg["type"] != "start":
        raise GuestError(f"expected start, got {msg['type']}")

    def on_event(h: regionevents.EventHook) -> None:
        send({"type": "event", "event": str(h.spec), "units": h.spec.at,
              "child_digest": h.child_digest})

    reporter = threading.Thread(target=report_progress, name="progress", daemon=True)
    reporter.start()
    while True:
        status, wl = regionevents.run_with_hook(wl, hook, on_event)
        if status is workloads.RunStatus.DONE:
            break
        if status is workloads.RunStatus.PAUSED:
            send({"type": "paused", "ops": wl.ops_done, "t_ns": time.monotonic_ns()})
            os.kill(os.getpid(), signal.SIGSTOP)
            msg, _ = _recv(sock)
            while msg["type"] == "proceed":  # the event hook's go-ahead came too late: moot
                msg, _ = _recv(sock)
            if msg["type"] == "resume":
                continue
            return 0
    stop_reporting.set()
    reporter.join()
    # Still from here on: said at once, so a pause asked meanwhile is not answered only after
    # the digest (~0.2 s for 1 GiB, which was downtime when a guest finished just then).
    send({"type": "finished", "ops": wl.ops_done})
    done: dict[str, Any] = {"type": "done", "digest": wl.digest(), "ops": wl.ops_done}
    if hook is not None and hook.performed:
        done["event"] = str(hook.spec)
        done["child_digest"] = hook.child_digest
    send(done)
    try:
        _recv(sock)  # wait for exit (or the socket closing) so the region stays readable
    except EOFError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrate.guest")
    parser.add_argument("--role", choices=("source", "dest"), required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--memory", type=int, required=True)
    parser.add_argument("--backing", choices=("anon", "memfd"), default="anon")
    parser.add_argument("--workload", default="kv")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ops", type=int, default=0, help="0: the workload's default for the size")
    parser.add_argument("--parent", type=int, default=0, help="daemon pid: die when it dies")
    parser.add_argument("--event", default=None,
                        help="test hook: a region event to perform, KIND@UNITS[:FIRST:COUNT] "
                             "(migrate/regionevents.py)")
    args = parser.parse_args(argv)
    try:
        return _guest_main(args)
    except EOFError:
        return 0  # the daemon went away: nothing left to report to


# ---------------------------------------------------------------------------------------------
# The daemon's side


@dataclass
class GuestLayout:
    pid: int
    address: int
    size: int
    page_size: int
    backing: str
    features: int
    total_ops: int

    @property
    def npages(self) -> int:
        return self.size // self.page_size


class GuestHandle:
    """A guest process started by a daemon, with its uffd (and memfd) received over SCM_RIGHTS."""

    def __init__(self, role: str, memory: int, *, backing: str = "anon", workload: str = "kv",
                 seed: int = 0, ops: int = 0, ready_timeout: float = 30.0,
                 event: str | None = None) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [sys.executable, "-P", "-m", "migrate.guest", "--role", role,
               "--control-fd", str(child.fileno()), "--memory", str(memory),
               "--backing", backing, "--workload", workload, "--seed", str(seed),
               "--ops", str(ops), "--parent", str(os.getpid())]
        if event:
            cmd += ["--event", event]
        self.events: list[dict[str, Any]] = []  # region events the guest performed (test hook)
        self.role = role
        self.proc = subprocess.Popen(cmd, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        self.sock = parent
        self.sock.settimeout(ready_timeout)
        self.progress_ops = 0
        self.stop_pending = False  # PAUSED received, SIGSTOP not yet seen to take effect
        self.progress_init = 0  # init steps (preloading the table, building the chain, ...)
        try:
            msg, fds = _recv(self.sock, with_fds=True)
        except (TimeoutError, EOFError, OSError) as exc:
            self.kill()
            raise GuestError(
                f"{role} guest did not become ready ({type(exc).__name__}: {exc}); "
                f"exit status {self.proc.poll()}") from None
        if msg["type"] == "error":
            self.kill()
            raise GuestError(f"{role} guest could not start: {msg.get('error')}")
        if msg["type"] != "ready" or not fds:
            self.kill()
            raise GuestError(f"{role} guest sent {msg['type']} instead of ready with its uffd")
        self.uffd_fd = fds[0]
        self.memfd = fds[1] if len(fds) > 1 else None
        self.layout = GuestLayout(msg["pid"], msg["address"], msg["size"], msg["page_size"],
                                  msg["backing"], msg["features"], msg["total_ops"])
        self.sock.settimeout(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fileno(self) -> int:
        """The control socket, for a poller."""
        return self.sock.fileno()

    def send(self, msg: dict[str, Any]) -> None:
        _send(self.sock, msg)

    def receive(self, timeout: float | None = None) -> dict[str, Any]:
        """The next control message that is not a progress update (those update progress_ops)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.sock.settimeout(remaining)
            try:
                msg, _ = _recv(self.sock)
            except TimeoutError:
                raise GuestError(f"{self.role} guest sent nothing for {timeout} s") from None
            except (EOFError, ConnectionResetError):
                raise GuestError(f"{self.role} guest died ({self._death()})") from None
            finally:
                self.sock.settimeout(None)
            if msg["type"] == "progress":
                self.progress_ops = msg["ops"]
                self.progress_init = msg.get("init", 0)
                continue
            if msg["type"] == "event":
                self.events.append(msg)
                continue
            return msg

    def poll_messages(self) -> list[dict[str, Any]]:
        """Every control message waiting now, without blocking (progress handled)."""
        out: list[dict[str, Any]] = []
        while True:
            try:
                data = self.sock.recv(MAX_CONTROL_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            if not data:
                raise GuestError(f"{self.role} guest died ({self._death()})")
            msg = msgpack.unpackb(data, raw=False)
            if msg.get("type") == "progress":
                self.progress_ops = msg["ops"]
                self.progress_init = msg.get("init", 0)
            elif msg.get("type") == "event":
                self.events.append(msg)
            else:
                out.append(msg)

    def start(self) -> None:
        self.send({"type": "start"})

    def pause(self, timeout: float = 10.0, *, wait_stopped: bool = True) -> dict[str, Any]:
        """Ask the workload to stop at an operation boundary; returns the PAUSED message. Its
        region no longer changes from then on (the workload returned; what is left is the guest
        stopping itself with SIGSTOP). With ``wait_stopped=False`` the caller may go on at once
        and call :meth:`wait_stopped` later (before anything that needs the stop itself)."""
        os.kill(self.pid, PAUSE_SIGNAL)
        msg = self.receive(timeout)
        if msg["type"] in STILL_MESSAGES:
            return msg  # finished before the pause took effect: it is just as still
        if msg["type"] != "paused":
            raise GuestError(f"expected paused, got {msg['type']}")
        self.stop_pending = True
        if wait_stopped:
            self.wait_stopped(timeout)
        return msg

    def wait_stopped(self, timeout: float = 10.0) -> None:
        """Return once a paused guest has stopped itself (no-op when it already has)."""
        if self.stop_pending:
            self._wait_stopped(timeout)
            self.stop_pending = False

    def _wait_stopped(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        path = f"/proc/{self.pid}/stat"
        while time.monotonic() < deadline:
            try:
                with open(path) as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                raise GuestError(
                    f"{self.role} guest died while pausing ({self._death()})") from None
            if state in ("T", "t"):
                return
            time.sleep(0.00005)
        raise GuestError(f"{self.role} guest did not stop within {timeout} s")

    def resume_here(self) -> None:
        """Continue a paused source guest (the migration was abandoned)."""
        self.wait_stopped()  # a SIGCONT before its own SIGSTOP would leave it stopped
        os.kill(self.pid, signal.SIGCONT)
        self.send({"type": "resume"})

    def set_idle(self, on: bool) -> bool:
        """Every thread of the guest at SCHED_IDLE (on) or back to SCHED_OTHER: an idle guest
        runs only on CPU time its daemon leaves, so the daemon's loop is never queued behind
        it. False when the guest is gone."""
        policy = os.SCHED_IDLE if on else os.SCHED_OTHER
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except FileNotFoundError:
            return False
        for tid in tids:
            try:
                os.sched_setscheduler(int(tid), policy, os.sched_param(0))
            except ProcessLookupError:
                pass
        return True

    def go(self) -> None:
        """Let a destination guest run (its region is empty: every page arrives by a fault
        or by the daemon installing it)."""
        self.send({"type": "go"})

    def explain(self, exc: BaseException) -> str:
        """The cause to report for ``exc``: a dead guest is named as such (the failing call
        is kept as detail), anything else is reported as it is."""
        cause = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, GuestError):
            return cause
        if isinstance(exc, (ProcessLookupError, BrokenPipeError, ConnectionResetError)):
            # The kernel already says the process (or its memory) is gone; let the exit finish.
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if self.alive():
            return cause
        return f"the {self.role} guest died ({self._death()}); {cause}"

    def _death(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "still running but its control socket closed"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """Tell the guest to exit, then make sure it did; release every fd we hold."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                self.send({"type": "exit"})
            except OSError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        for fd in (self.uffd_fd, self.memfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.uffd_fd = -1
        self.memfd = None
        self.sock.close()


if __name__ == "__main__":
    sys.exit(main())
