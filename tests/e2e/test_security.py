"""Hostile peers during a live migration: strangers, plain clients, floods and replays.

The destination daemon runs as its own process (its stderr is the log we check); the source runs
in this process so the test can capture its real HELLO and replay it. Every test ends with the
migration's own report: ``ok``, byte-identical, and the daemon exiting 0 after exactly one
migration (no hostile message counted as one).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from migrate import keys, protocol, source, transport

MIB = 1 << 20
pytestmark = [pytest.mark.host, pytest.mark.usefixtures("migration_capable")]



class Dest:
    """``migrate dest --count 1`` in its own process, stderr captured to a file."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        ready = tmp / "dest.endpoint"
        self.log_path = tmp / "dest.log"
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", "dest", "--listen", "tcp://127.0.0.1:*", "--count",
             "1", "--ready-file", str(ready), "--json", *extra],
            stdout=subprocess.PIPE, stderr=self.log_file, text=True)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.proc.poll() is None, f"destination exited: {self.log()}"
            assert time.monotonic() < deadline, "destination never listened"
            time.sleep(0.02)
        self.endpoint = ready.read_text().strip()
        self.port = int(self.endpoint.rsplit(":", 1)[1])

    def session_ports(self) -> set[int]:
        """The per-migration ports: what an attacker on this host can learn with ss(8)."""
        try:
            conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except psutil.Error:
            return set()
        return {c.laddr.port for c in conns
                if c.status == psutil.CONN_LISTEN and c.laddr.port != self.port}

    def finish(self) -> tuple[int, list[dict[str, Any]]]:
        out, _ = self.proc.communicate(timeout=120)
        self.log_file.close()
        return self.proc.returncode, [json.loads(line) for line in out.splitlines() if line]

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


class RecordingSource:
    """A real SourceMigration in a thread; its HELLO frames are captured as sent."""

    def __init__(self, **opts: Any) -> None:
        self.hello: list[bytes] | None = None
        self.migration = source.SourceMigration(source.SourceOptions(progress=False, **opts))
        original = self.migration._send

        def send(sock: zmq.Socket, msg: protocol.Message) -> None:
            if isinstance(msg, protocol.Hello):
                self.hello = [bytes(f) for f in protocol.encode(msg)]
            original(sock, msg)

        self.migration._send = send  # type: ignore[method-assign]
        self.report: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.report = self.migration.run()

    def join(self, timeout: float = 180) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the source hung"
        assert self.report is not None
        return self.report


def check_ok(report: dict[str, Any]) -> None:
    assert report["ok"], report.get("error")
    assert report["transfer_ok"] and report["digest"] == report["reference_digest"]


def malformed_hellos(real: list[bytes]) -> list[list[bytes]]:
    """Invalid variants of a real HELLO: none of them may start a session."""
    raw = msgpack.unpackb(real[0], raw=False)
    variants = []
    for i, value in ((1, 2), (3, 4096.0), (4, raw[4] + 1), (2, b"short"), (5, "floppy"),
                     (7, {"name": "kv"}), (0, 99)):
        bad = list(raw)
        bad[i] = value
        variants.append([msgpack.packb(bad, use_bin_type=True)])
    variants += [[real[0][:len(real[0]) // 2]], [real[0], b"extra frame"], [b""],
                 [os.urandom(64)], [b"\xdd\xff\xff\xff\xff"], []]
    return variants


class Attacker:
    """Connects, sends and disconnects in a loop until stopped: on the listen port, and (when
    ``sessions``) on every per-migration port it can see. Counts what it sent and remembers
    anything it ever received (it must receive nothing)."""

    def __init__(self, dest: Dest, curve_identities: list[keys.KeyPair],
                 server_public: bytes | None, sessions: bool,
                 messages: list[list[bytes]]) -> None:
        self.dest, self.identities, self.server_public = dest, curve_identities, server_public
        self.sessions, self.messages = sessions, messages
        self.sent = 0
        self.session_ports_seen: set[int] = set()
        self.received: list[Any] = []
        self.ctx = zmq.Context()
        self.stop = threading.Event()
        self.rng = random.Random(7)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _clients(self, port: int) -> list[zmq.Socket]:
        out = []
        plain = self.ctx.socket(zmq.DEALER)
        out.append(plain)
        for pair in self.identities:
            s = self.ctx.socket(zmq.DEALER)
            s.curve_secretkey, s.curve_publickey = pair.secret, pair.public
            s.curve_serverkey = self.server_public or zmq.curve_keypair()[0]
            out.append(s)
        for s in out:
            s.linger = 0
            s.sndtimeo = 0
            s.connect(f"tcp://127.0.0.1:{port}")
        return out

    def _raw_tcp(self, port: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(self.rng.choice([os.urandom(200), b"\xff" + bytes(8) + b"\x7f" * 300,
                                           b"GET / HTTP/1.0\r\n\r\n"]))
        except OSError:
            pass

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                ports = [self.dest.port]
                if self.sessions:
                    found = self.dest.session_ports()
                    self.session_ports_seen |= found
                    ports += sorted(found)
                for port in ports:
                    clients = self._clients(port)
                    for s in clients:
                        for frames in self.rng.sample(self.messages, min(4, len(self.messages))):
                            try:
                                s.send_multipart(frames or [b""], flags=zmq.NOBLOCK)
                                self.sent += 1
                            except zmq.ZMQError:
                                pass  # not connected (yet, or refused): try again next round
                    self._raw_tcp(port)
                    time.sleep(0.01)
                    for s in clients:
                        while s.poll(0):
                            self.received.append(s.recv_multipart())
                        s.close(linger=0)
        finally:
            self.ctx.destroy(linger=0)

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_keyed_migration_refuses_strangers_and_plain_clients(tmp_path: Path) -> None:
    """CURVE on: a stranger's key, a plain (unauthenticated) client, raw TCP garbage and even a
    second *allowed* key (on another migration's channels) hammer the listen port and the
    per-migration ports throughout a migration. It ends ok, the attackers receive nothing, and
    the refusals are in the destination's log."""
    d = tmp_path / "keys"
    keys.generate(d, "dest")
    keys.generate(d, "src")
    keys.generate(d, "rival")  # allowed on the listen port, but not on another's channels
    _s, _p, stranger = keys.generate(tmp_path / "elsewhere", "stranger")
    dest = Dest(tmp_path, "--key", str(d / "dest.key"), "--allow", str(d / "src.key_public"),
                "--allow", str(d / "rival.key_public"))
    attacker = None
    try:
        src, dpub = keys.load_secret(d / "src.key"), keys.load_public(d / "dest.key_public")
        rival = keys.load_secret(d / "rival.key")
        run = RecordingSource(to=dest.endpoint, workload="chase", memory=32 * MIB,
                              mode="postcopy", after_s=0.2, ops=15_000_000, peer_timeout_s=30,
                              keys=transport.CurveKeys(src.public, src.secret, dpub))
        deadline = time.monotonic() + 30
        while run.hello is None or run.migration.phase in ("start", "handshake"):
            assert time.monotonic() < deadline and run.thread.is_alive()
            time.sleep(0.001)
        messages = [run.hello, *malformed_hellos(run.hello), [os.urandom(4096)]]
        attacker = Attacker(dest, [stranger, rival], dpub, sessions=True, messages=messages)
        report = run.join()
        attacker.halt()
        code, reports = dest.finish()
    finally:
        if attacker is not None:
            attacker.stop.set()
        dest.kill()
    assert report["ok"], f"{report.get('error')}; destination log:\n{dest.log()[-3000:]}"
    check_ok(report)
    assert code == 0 and len(reports) == 1 and reports[0]["ok"]
    assert attacker.sent > 50 and attacker.session_ports_seen, "the attack never happened"
    assert attacker.received == [], "an unauthenticated peer got an answer"
    log = dest.log()
    assert f"refused CURVE client key {stranger.public.decode()}" in log
    assert "the peer does not use CURVE" in log
    assert (f"refused CURVE client key {rival.public.decode()} from 127.0.0.1 on a migration's "
            f"channel") in log


def test_unkeyed_listen_port_flood_of_malformed_and_replayed_hellos(tmp_path: Path) -> None:
    """Loopback without keys: a local client replays the real HELLO of a migration in flight and
    floods the listen port with malformed HELLOs, through that migration and the next one. No
    hostile message starts a session or counts towards --count 2; both migrations end ok; the
    drops are logged."""
    dest = Dest(tmp_path, "--count", "2")
    attacker = None
    ctx = zmq.Context()
    try:
        first = RecordingSource(to=dest.endpoint, workload="kv", memory=32 * MIB, mode="hybrid",
                                after_s=0.3, peer_timeout_s=30)
        deadline = time.monotonic() + 30
        # A replay comes after the original (the attacker has to see it first): wait for the
        # WELCOME. Before that, whoever sends a session id first owns it (without keys).
        while first.hello is None or first.migration.phase in ("start", "handshake"):
            assert time.monotonic() < deadline and first.thread.is_alive()
            time.sleep(0.001)
        replayer = ctx.socket(zmq.DEALER)
        replayer.linger = 0
        replayer.connect(dest.endpoint)
        for _ in range(3):  # the exact frames of the session in flight
            replayer.send_multipart(first.hello)
        messages = [first.hello, first.hello, *malformed_hellos(first.hello),
                    [os.urandom(transport.LISTEN_MAX_MESSAGE_BYTES + 1)], [bytes(4 << 20)]]
        attacker = Attacker(dest, [], None, sessions=False, messages=messages)
        reports = [first.join()]
        second = RecordingSource(to=dest.endpoint, workload="sparse", memory=32 * MIB,
                                 mode="postcopy", after_s=0.3, peer_timeout_s=30)
        reports.append(second.join())
        attacker.halt()
        code, dest_reports = dest.finish()
        replies = replayer.poll(0)
        replayer.close()
    finally:
        if attacker is not None:
            attacker.stop.set()
        dest.kill()
        ctx.destroy(linger=0)
    for report in reports:
        assert report["ok"], f"{report.get('error')}; destination log:\n{dest.log()[-3000:]}"
        check_ok(report)
    assert code == 0 and len(dest_reports) == 2 and all(r["ok"] for r in dest_reports)
    assert attacker.sent > 50
    assert attacker.received == [] and not replies  # no answer to garbage or to a replay
    log = dest.log()
    session = msgpack.unpackb(first.hello[0], raw=False)[2]
    assert f"dropped a replayed HELLO of session {session.hex()}" in log
    assert "dropped a message on the listen port" in log


def test_daemons_refuse_to_run_off_loopback_without_keys(tmp_path: Path) -> None:
    for cmd in (["dest", "--listen", "tcp://0.0.0.0:0"],
                ["source", "--to", "tcp://192.0.2.1:7070", "--memory", "16M"]):
        out = subprocess.run([sys.executable, "-m", "migrate", *cmd], capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 2, out
        assert "without CURVE keys" in out.stderr and "migrate keygen" in out.stderr


def test_source_names_the_cause_of_a_failed_curve_handshake(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    for name in ("dest", "src", "other"):
        keys.generate(d, name)
    dest = Dest(tmp_path, "--key", str(d / "dest.key"), "--allow", str(d / "src.key_public"))
    try:
        base = [sys.executable, "-m", "migrate", "source", "--to", dest.endpoint, "--memory",
                "16M", "--after", "0.1", "--quiet"]
        wrong_server = subprocess.run(
            [*base, "--key", str(d / "src.key"), "--server-key", str(d / "other.key_public")],
            capture_output=True, text=True, timeout=120, check=False)
        unknown_client = subprocess.run(
            [*base, "--key", str(d / "other.key"), "--server-key", str(d / "dest.key_public")],
            capture_output=True, text=True, timeout=120, check=False)
    finally:
        dest.kill()
    assert wrong_server.returncode == 1
    assert "does not hold the secret key of --server-key" in wrong_server.stdout
    assert unknown_client.returncode == 1
    assert "refused our public key" in unknown_client.stdout
    log = dest.log()
    assert "refused CURVE client key" in log and "another server key" in log


def test_a_region_larger_than_this_host_is_refused_not_started(tmp_path: Path) -> None:
    dest = Dest(tmp_path)
    ctx = zmq.Context()
    try:
        npages = (psutil.virtual_memory().total // 4096) * 2
        hello = protocol.Hello(protocol.PROTOCOL_VERSION, os.urandom(16), 4096, npages, "anon",
                               "postcopy", {"name": "kv", "size": npages * 4096, "seed": 0,
                                            "ops": 1}, [], "x")
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(dest.endpoint)
        s.send_multipart(protocol.encode(hello))
        assert s.poll(10_000), "no answer to an oversized HELLO"
        reply = protocol.decode(s.recv_multipart())
        s.close()
        assert isinstance(reply, protocol.Refuse) and reply.session == hello.session
        assert "does not fit in this host's memory" in reply.reason
        assert not dest.session_ports(), "a session was started anyway"
        assert dest.proc.poll() is None  # and it did not count towards --count 1
    finally:
        dest.kill()
        ctx.destroy(linger=0)


def test_demo_with_curve_keys() -> None:
    from migrate.demo import run_demo

    r = run_demo("kv", 16 * MIB, "hybrid", after=0.2, quiet=True, timeout=120, curve=True)
    check_ok(r)
    assert r["curve"] is True and r["daemon_exit"] == {"source": 0, "dest": 0}


def test_hellos_beyond_max_sessions_are_refused_and_the_running_one_ends_ok(
        tmp_path: Path) -> None:
    dest = Dest(tmp_path, "--max-sessions", "1", "--count", "1000")  # the refusal is not counted
    ctx = zmq.Context()
    try:
        run = RecordingSource(to=dest.endpoint, workload="chase", memory=16 * MIB,
                              mode="postcopy", after_s=0.1, ops=5_000_000, peer_timeout_s=30)
        deadline = time.monotonic() + 30
        while run.hello is None or run.migration.phase in ("start", "handshake"):
            assert time.monotonic() < deadline and run.thread.is_alive()
            time.sleep(0.001)
        raw = msgpack.unpackb(run.hello[0], raw=False)
        raw[2] = os.urandom(16)  # another, valid, migration
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(dest.endpoint)
        s.send_multipart([msgpack.packb(raw, use_bin_type=True)])
        assert s.poll(10_000), f"no answer to a HELLO beyond --max-sessions: {dest.log()}"
        reply = protocol.decode(s.recv_multipart())
        s.close()
        report = run.join()
        deadline = time.monotonic() + 60
        while "migration of chase" not in dest.log():  # its session has ended and reported
            assert time.monotonic() < deadline, dest.log()
            time.sleep(0.05)
        dest.proc.terminate()
        _code, reports = dest.finish()
    finally:
        dest.kill()
        ctx.destroy(linger=0)
    assert isinstance(reply, protocol.Refuse) and "busy" in reply.reason
    check_ok(report)
    assert len(reports) == 1 and reports[0]["ok"]
    assert "refused migration: busy" in dest.log()
