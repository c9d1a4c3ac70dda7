"""CURVE keys for the daemons: ``migrate keygen``, loading keys and allow-lists, and the gatekeeper.

A key pair is two files in ZeroMQ's certificate format (the ZPL text ``zmq.auth`` reads):
``NAME.key`` holds the secret and public key (mode 0600, refused when others may read it) and
``NAME.key_public`` only the public key, the file to hand to the peer.

* The destination is a CURVE server: ``--key dest.key`` and ``--allow source.key_public`` (a file,
  a directory of ``*.key_public`` files, or a z85 key; repeatable). A ``Gatekeeper`` runs a
  ``zmq.auth.ThreadAuthenticator`` on the daemon's context that accepts only those client keys on
  the listen socket and, on each migration's own channels, only the key of the source that sent
  that migration's HELLO. Every refusal (unknown key, a peer without CURVE, a broken handshake) is
  logged with the peer's address, a few lines per second at most, so a flood cannot fill a disk.
* The source is a CURVE client: ``--key source.key --server-key dest.key_public``; libzmq checks
  that the destination holds the secret of that public key, or the handshake fails.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import stat
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SECRET_SUFFIX = ".key"
PUBLIC_SUFFIX = ".key_public"
Z85_KEY_CHARS = 40
LISTEN_DOMAIN = "migrate"
SESSION_DOMAIN_PREFIX = "migrate-session-"
LOG_LINES_PER_WINDOW = 10  # refusals logged per LOG_WINDOW_S; the rest are counted
LOG_WINDOW_S = 1.0


class KeyFileError(ValueError):
    """A key file or key string that cannot be used; the message names the file and the cause."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85, 40 bytes
    secret: bytes


# ---------------------------------------------------------------------------------------------
# Files


def _zpl(public: bytes, secret: bytes | None, kind: str) -> str:
    lines = [
        f"#   ZeroMQ CURVE {kind} certificate, written by migrate keygen",
        "#   The secret file must stay private (mode 0600)." if secret else
        "#   Give this file to the peers that must trust this key.",
        "",
        "metadata",
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str, *, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if force:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def generate(directory: str | os.PathLike[str], name: str, *, force: bool = False
             ) -> tuple[Path, Path, KeyPair]:
    """Write ``NAME.key`` (secret, 0600) and ``NAME.key_public`` in ``directory``; returns both
    paths and the pair. Refuses to overwrite an existing key unless ``force``."""
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"key name {name!r} must be a plain file name")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = d / f"{name}{SECRET_SUFFIX}", d / f"{name}{PUBLIC_SUFFIX}"
    if not force:
        for p in (secret_path, public_path):
            if p.exists():
                raise KeyFileError(f"{p} exists; pass --force to replace the key pair")
    public, secret = zmq.curve_keypair()
    _write_private(secret_path, _zpl(public, secret, "secret"), force=force)
    tmp = public_path.with_name(f".{public_path.name}.{os.getpid()}.tmp")
    tmp.write_text(_zpl(public, None, "public"))
    os.chmod(tmp, 0o644)
    os.replace(tmp, public_path)
    return secret_path, public_path, KeyPair(public, secret)


def _is_z85_key(text: str) -> bool:
    if len(text) != Z85_KEY_CHARS:
        return False
    try:
        return len(zmq.utils.z85.decode(text.encode())) == 32
    except (ValueError, KeyError, IndexError):
        return False


def _read_cert(path: Path) -> tuple[bytes | None, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not a ZeroMQ certificate: {exc}") from None
    for what, key in (("public", public), ("secret", secret)):
        if key is not None and not _is_z85_key(key.decode("ascii", "replace")):
            raise KeyFileError(f"{path}: the {what} key is not a 40-character z85 CURVE key")
    return public, secret


def load_secret(path: str | os.PathLike[str]) -> KeyPair:
    """The key pair in a secret key file (``NAME.key``). Refused when group or others may read it
    (as ssh does), since then the key proves nothing."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {p}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"secret key file {p} is accessible by others (mode "
                           f"{stat.S_IMODE(mode):04o}); run chmod 600 {p}")
    public, secret = _read_cert(p)
    if public is None or secret is None:
        raise KeyFileError(f"{p} holds no secret key (is it a {PUBLIC_SUFFIX} file?)")
    return KeyPair(public, secret)


def load_public(spec: str | os.PathLike[str]) -> bytes:
    """One public key: a ``.key_public`` (or ``.key``) file, or the z85 text of the key itself."""
    text = os.fspath(spec)
    if _is_z85_key(text) and not os.path.exists(text):
        return text.encode()
    public, _secret = _read_cert(Path(text))
    if public is None:
        raise KeyFileError(f"{text} holds no public key")
    return public


def load_allowed(specs: Iterable[str | os.PathLike[str]]) -> frozenset[bytes]:
    """Client public keys from files, directories (every ``*.key_public`` inside) or z85 texts."""
    keys: set[bytes] = set()
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob(f"*{PUBLIC_SUFFIX}"))
            if not found:
                raise KeyFileError(f"directory {p} holds no *{PUBLIC_SUFFIX} files")
            keys.update(load_public(f) for f in found)
        else:
            keys.add(load_public(spec))
    if not keys:
        raise KeyFileError("the allow-list is empty: give at least one client public key")
    return frozenset(keys)


# ---------------------------------------------------------------------------------------------
# The gatekeeper: ZAP authentication with per-socket allow-lists, and logged refusals


class RateLimitedLog:
    """Passes at most LOG_LINES_PER_WINDOW lines per LOG_WINDOW_S to ``log``, then counts."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.lock = threading.Lock()
        self.window_start = 0.0
        self.lines = 0
        self.suppressed = 0

    def __call__(self, text: str) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.window_start >= LOG_WINDOW_S:
                if self.suppressed:
                    self.log(f"{self.suppressed} more refusals in the last "
                             f"{now - self.window_start:.1f} s were not logged")
                self.window_start, self.lines, self.suppressed = now, 0, 0
            if self.lines < LOG_LINES_PER_WINDOW:
                self.lines += 1
                self.log(text)
            else:
                self.suppressed += 1


class _Authenticator(ThreadAuthenticator):
    """A ThreadAuthenticator that remembers the address of the request being judged, so that a
    refusal can be logged with it (the credentials callback sees only domain and key)."""

    gate: Gatekeeper

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.current_address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)


class Gatekeeper:
    """CURVE admission for one ZeroMQ context (one daemon).

    ``listen_domain()`` admits the keys of ``allowed``; ``pin_session(sock, client_key)`` gives a
    per-migration socket its own domain admitting only that one key (the source that sent the
    HELLO), dropped when the socket is collected. Any other domain is refused. ``refusals`` keeps
    the most recent refusals (bounded) for tests and diagnosis."""

    def __init__(self, ctx: zmq.Context, allowed: Iterable[bytes],
                 log: Callable[[str], None] | None = None) -> None:
        self.allowed = frozenset(allowed)
        if not self.allowed:
            raise KeyFileError("a CURVE server needs at least one allowed client key")
        self.ctx = ctx
        self._log = RateLimitedLog(log or _stderr_log)
        self.refusals: deque[str] = deque(maxlen=1000)
        self.refusal_count = 0
        self._domains: dict[str, frozenset[bytes]] = {LISTEN_DOMAIN: self.allowed}
        self._next_domain = 0
        self._lock = threading.Lock()
        self._auth = _Authenticator(ctx)
        self._auth.gate = self
        self._monitors: queue.SimpleQueue[tuple[zmq.Socket, str]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._monitor_thread = threading.Thread(target=self._watch, name="migrate-auth-monitor",
                                                daemon=True)
        self._started = False

    # Called by the authenticator thread for every CURVE handshake in this context.
    def callback(self, domain: str, key: bytes) -> bool:
        allowed = self._domains.get(domain)
        if allowed is not None and key in allowed:
            return True
        where = "the listen port" if domain == LISTEN_DOMAIN else (
            "a migration's channel" if domain.startswith(SESSION_DOMAIN_PREFIX)
            else f"unknown domain {domain!r}")
        address = getattr(self._auth, "current_address", "?")
        self._refused(f"refused CURVE client key {key.decode('ascii', 'replace')} from "
                      f"{address} on {where}: not on its allow-list")
        return False

    def _refused(self, text: str) -> None:
        self.refusal_count += 1
        self.refusals.append(text)
        self._log(text)

    def start(self) -> None:
        if self._started:
            return
        self._auth.start()
        self._auth.configure_curve_callback("*", self)
        self._auth.configure_curve_callback(LISTEN_DOMAIN, self)
        self._monitor_thread.start()
        self._started = True

    def stop(self) -> None:
        """Stop both threads and close their sockets (must happen before the context's term)."""
        if not self._started:
            return
        self._stop.set()
        self._monitor_thread.join()
        self._auth.stop()
        self._started = False

    def listen_domain(self, sock: zmq.Socket, what: str = "listen") -> None:
        sock.zap_domain = LISTEN_DOMAIN.encode()
        self.watch(sock, what)

    def pin_session(self, sock: zmq.Socket, client_key: bytes | None, what: str = "channel"
                    ) -> None:
        """Admit only ``client_key`` (the HELLO's sender) on ``sock``; without one (a HELLO that
        came with no CURVE identity), the daemon's allow-list."""
        with self._lock:
            self._next_domain += 1
            domain = f"{SESSION_DOMAIN_PREFIX}{self._next_domain}"
        keys = frozenset({client_key}) if client_key is not None else self.allowed
        self._domains[domain] = keys
        self._auth.configure_curve_callback(domain, self)
        weakref.finalize(sock, self._forget, domain)
        sock.zap_domain = domain.encode()
        self.watch(sock, what)

    def _forget(self, domain: str) -> None:
        self._domains.pop(domain, None)
        self._auth.credentials_providers.pop(domain, None)

    def watch(self, sock: zmq.Socket, what: str) -> None:
        """Log handshakes on ``sock`` that fail before ZAP sees a key (a peer without CURVE, the
        wrong server key, garbage bytes). Call from the thread that owns ``sock``."""
        # MONITOR_STOPPED (sent when ``sock`` closes) lets the watcher close its end: without
        # it in the mask, every closed channel would leave a monitor socket (an fd) behind.
        events = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_MONITOR_STOPPED)
        monitor = sock.get_monitor_socket(events)
        self._monitors.put((monitor, what))

    def _watch(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        poller = zmq.Poller()
        names: dict[zmq.Socket, str] = {}
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        monitor, what = self._monitors.get_nowait()
                    except queue.Empty:
                        break
                    names[monitor] = what
                    poller.register(monitor, zmq.POLLIN)
                for monitor, _ev in poller.poll(100):
                    try:
                        event = recv_monitor_message(monitor, zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                        poller.unregister(monitor)
                        names.pop(monitor, None)
                        monitor.close(linger=0)
                        continue
                    endpoint = event["endpoint"].decode(errors="replace")
                    self._refused(f"refused a connection on the {names.get(monitor)} socket "
                                  f"({_describe(event)}): {endpoint}")
        finally:
            while True:
                try:
                    monitor, _what = self._monitors.get_nowait()
                except queue.Empty:
                    break
                names[monitor] = _what
            for monitor in names:
                monitor.close(linger=0)


def _describe(event: dict[str, Any]) -> str:
    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        code = event["value"]
        if code == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return "the peer does not use CURVE"
        if code == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "CURVE handshake failed: the peer expects another server key or sent forged data"
        return f"ZMTP protocol error {code:#x}"
    return "handshake failed (malformed greeting or connection dropped)"


def _stderr_log(text: str) -> None:
    print(f"[auth] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# migrate keygen


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="base name of the key files (NAME.key, NAME.key_public)")
    parser.add_argument("--dir", default=".", help="directory to write them in (default: .)")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")
    parser.add_argument("--json", action="store_true", help="print paths and public key as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        secret_path, public_path, pair = generate(args.dir, args.name, force=args.force)
    except (KeyFileError, OSError) as exc:
        print(f"migrate keygen: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"public_key": pair.public.decode(), "secret_file": str(secret_path),
                          "public_file": str(public_path)}))
    else:
        print(pair.public.decode())
        print(f"wrote {secret_path} (secret, keep private) and {public_path} (give to peers)",
              file=sys.stderr)
    return 0
