"""ZeroMQ transport beside the sans-IO protocol.

Topology, per destination daemon:

* a ROUTER on the listen endpoint receives HELLO from sources and answers WELCOME/REFUSE;
* per migration, two DEALER sockets bound on ephemeral ports of the same host: *urgent* (control,
  fault requests and their replies) and *bulk* (pre-copy, background push, acknowledgements). The
  source connects one DEALER to each. Separate TCP connections mean a fault reply never queues
  behind bulk pages in a socket buffer.

Every socket refuses messages above ``MAX_MESSAGE_BYTES`` (ZMQ_MAXMSGSIZE), so a peer cannot make us
allocate without bound; the protocol layer validates what remains.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from migrate import protocol

MAX_MESSAGE_BYTES = protocol.MAX_HEADER_BYTES + protocol.MAX_PAGES_PER_BATCH * 4096 + 4096
HIGH_WATER_MARK = 1000


@dataclass(frozen=True)
class CurveKeys:
    """CURVE key material for one side (z85-encoded, as zmq.curve_keypair makes them)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None  # for a client: the key it expects the server to hold


def make_context(io_cpu: int | None = None) -> zmq.Context:
    """A context with one I/O thread, optionally pinned to ``io_cpu`` (same CPU as the daemon's
    main thread saves a cross-CPU wake-up per message on a small machine)."""
    ctx = zmq.Context(io_threads=1)
    if io_cpu is not None and hasattr(zmq, "THREAD_AFFINITY_CPU_ADD"):
        try:
            ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, io_cpu)
        except zmq.ZMQError:
            pass  # libzmq built without it: the placement is only a performance hint
    return ctx


def _tune(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 5)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 2)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)


def _apply_curve_server(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True


def _apply_curve_client(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    if keys is not None:
        if keys.server_public is None:
            raise ValueError("a CURVE client needs the server's public key")
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = keys.server_public


def host_of(endpoint: str) -> str:
    """The host part of a tcp:// endpoint ("tcp://10.0.0.1:7070" -> "10.0.0.1")."""
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.scheme != "tcp" or not parsed.hostname:
        raise ValueError(f"expected tcp://HOST:PORT, got {endpoint!r}")
    return parsed.hostname


def is_loopback(endpoint: str) -> bool:
    host = host_of(endpoint)
    return host in ("localhost", "::1") or host.startswith("127.")


def listen(ctx: zmq.Context, endpoint: str, keys: CurveKeys | None = None) -> zmq.Socket:
    """The destination's ROUTER for HELLOs."""
    sock = ctx.socket(zmq.ROUTER)
    _tune(sock)
    _apply_curve_server(sock, keys)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(endpoint)
    return sock


def bind_channel(ctx: zmq.Context, host: str, keys: CurveKeys | None = None) -> tuple[zmq.Socket, str]:
    """A per-session DEALER bound to an ephemeral port on ``host``; returns it and its endpoint."""
    sock = ctx.socket(zmq.DEALER)
    _tune(sock)
    _apply_curve_server(sock, keys)
    wildcard = f"tcp://{host}" if ":" not in host else f"tcp://[{host}]"
    port = sock.bind_to_random_port(wildcard)
    return sock, f"{wildcard}:{port}"


def connect(ctx: zmq.Context, endpoint: str, keys: CurveKeys | None = None) -> zmq.Socket:
    """A source-side DEALER connected to ``endpoint``."""
    sock = ctx.socket(zmq.DEALER)
    _tune(sock)
    _apply_curve_client(sock, keys)
    sock.connect(endpoint)
    return sock


def send_frames(sock: zmq.Socket, frames: Sequence[Any], *, flags: int = 0) -> None:
    """Send one message. Headers are small and copied; a page data frame goes without a copy."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        more = zmq.SNDMORE if i < last else 0
        big = not isinstance(frame, bytes) or len(frame) > 8192
        sock.send(frame, flags | more, copy=not big)


def recv_frames(sock: zmq.Socket, *, flags: int = 0) -> list[Any]:
    """Receive one message as zmq Frames (no copy; ``frame.buffer`` is a memoryview)."""
    return sock.recv_multipart(flags, copy=False)


def session_id() -> bytes:
    return os.urandom(protocol.SESSION_ID_BYTES)
