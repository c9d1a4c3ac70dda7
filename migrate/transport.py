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
import socket
import stat
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from migrate import protocol
from migrate.errors import MigrationError

MAX_MESSAGE_BYTES = protocol.MAX_HEADER_BYTES + protocol.MAX_PAGES_PER_BATCH * 4096 + 4096
# The listen port only ever carries HELLOs (well under 16 KiB even with every string at its
# limit): a peer sending more there is disconnected by libzmq before the bytes are buffered.
LISTEN_MAX_MESSAGE_BYTES = 64 << 10
HIGH_WATER_MARK = 1000
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class CurveKeys:
    """CURVE key material for one side (z85-encoded, as zmq.curve_keypair makes them)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None  # for a client: the key it expects the server to hold


class InsecureEndpointError(ValueError):
    """A daemon asked to listen on or connect to a non-loopback endpoint without CURVE keys."""


class Context(zmq.Context):
    """A zmq.Context that may carry a CURVE ``Gatekeeper`` (ZAP authenticator and handshake
    monitor threads, started by ``listen`` when keys are given) and stops it before ``term``,
    which would otherwise wait forever for the gatekeeper's own sockets."""

    _gatekeeper: Any = None
    urgent_io_priority = "normal"  # "fifo" once make_context raised the urgent I/O thread
    io_tids: dict[str, int] = {}  # I/O thread ids by channel (make_context)

    def term(self) -> None:
        gate, self._gatekeeper = self._gatekeeper, None
        if gate is not None:
            gate.stop()
        super().term()


def require_keys_off_loopback(endpoint: str, keys: CurveKeys | None, action: str) -> None:
    """Refuse to ``action`` (listen on / connect to) anything but loopback without CURVE keys."""
    if keys is None and not is_loopback(endpoint):
        raise InsecureEndpointError(
            f"refusing to {action} {endpoint} without CURVE keys: only loopback may go "
            f"unauthenticated. Make key pairs with `migrate keygen NAME` and give the destination "
            f"--key DEST.key --allow SOURCE.key_public, the source --key SOURCE.key --server-key "
            f"DEST.key_public")


def peer_key(frame: Any) -> bytes | None:
    """The z85 CURVE public key of the peer that sent ``frame`` (a zmq.Frame received with
    copy=False), as the ZAP handler recorded it in the User-Id property; None without CURVE."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        return None
    if isinstance(user, bytes):
        user = user.decode("ascii", "replace")
    if not isinstance(user, str) or len(user) != 40:
        return None
    return user.encode()


# I/O threads of a daemon's context: the urgent channel's connections live on the first, the bulk
# channel's on the second (ZMQ_AFFINITY), so a fault reply never waits while the I/O thread
# copies a pushed batch to or from its TCP socket.
IO_THREADS = 2
CHANNEL_AFFINITY = {"urgent": 1 << 0, "bulk": 1 << 1}
# TCP buffers of the bulk channel. The sender's send() copies at most its send buffer per system
# call (on loopback it also runs the receive side's TCP processing), and on a kernel without
# preemption in kernel code (preempt=none, as here) a request woken on that CPU waits for the
# call to end. Measured here, kv 1 GiB post-copy: autotuned buffers (multi-MiB sends) fault p50
# 133-145 us; a 256 KiB send buffer 111-118 us with the push at 1.46-1.55 GB/s. A receive
# buffer as small cost throughput (pre-copy 1.25 against 1.5-1.6 GB/s with 1 MiB).
BULK_SEND_BUFFER = 256 << 10
BULK_RECEIVE_BUFFER = 1 << 20
# The source's bulk send buffer from the resume on (post-copy: pushes beside fault replies), set
# on the live connection by set_send_buffer. Measured here, kv 1 GiB: 160-192 KiB gave fault p50
# 104-112 us in post-copy (121-125 with 256 KiB) and 116-123 us in hybrid (130-145) with the
# push at 1.18-1.28 GB/s (1.28-1.38); for pre-copy 256 KiB stays (1.43-1.45 GB/s round 1,
# against 1.2-1.3 with 160-192 KiB; 1 MiB or autotuned buffers were no faster, 1.25-1.40).
POSTCOPY_SEND_BUFFER = 192 << 10
# A socket closed after a failure keeps its unsent messages (the ERROR for the peer) this long.
ERROR_LINGER_MS = 500


def make_context(io_cpu: int | None = None, io_threads: int = IO_THREADS) -> Context:
    """A context with an I/O thread per channel, optionally pinned to ``io_cpu`` (same CPU as the
    daemon's main thread saves a cross-CPU wake-up per message on a small machine)."""
    ctx = Context(io_threads=io_threads)
    if io_cpu is not None and hasattr(zmq, "THREAD_AFFINITY_CPU_ADD"):
        try:
            ctx.set(zmq.THREAD_AFFINITY_CPU_ADD, io_cpu)
        except zmq.ZMQError:
            pass  # libzmq built without it: the placement is only a performance hint
    ctx.io_tids = _io_threads(ctx)
    ctx.urgent_io_priority = _prioritize_urgent_io(ctx)
    return ctx


# Real-time priorities (SCHED_FIFO): the urgent I/O thread above the daemon's fast loop
# (fastpath.realtime), both above every normal thread (guests; bulk I/O except as below).
URGENT_IO_PRIORITY = 2
# The source's bulk I/O thread during pre-copy (set_bulk_io_realtime): above its running guest,
# and above the pre-copy sender (fastpath.LOOP_PRIORITY), so it refills the TCP connection as
# soon as there is room instead of waiting until the sender has read its whole window ahead
# (the destination then sat idle). No fault is served meanwhile. Measured here, kv 1 GiB
# hybrid: pre-copy 1.55-1.60 GB/s and total 1.08-1.11 s, against 1.38-1.50 GB/s and 1.16-1.22 s
# with the two at the same priority; the guest did ~10% fewer operations in the shorter round.
BULK_IO_PRIORITY = 2


def _tasks() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _io_threads(ctx: Any) -> dict[str, int]:
    """Thread ids of the context's I/O threads by channel ("urgent", "bulk"), as far as found:
    libzmq starts them with the first socket and each names itself (ZMQbg/IO/N) once it runs."""
    before = _tasks()
    ctx.socket(zmq.PAIR).close(linger=0)
    new = sorted(_tasks() - before)
    wanted = {"ZMQbg/IO/0": "urgent", "ZMQbg/IO/1": "bulk"}
    found: dict[str, int] = {}
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and len(found) < min(len(wanted), ctx.get(zmq.IO_THREADS)):
        for tid in new:
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
            except FileNotFoundError:
                continue
            if name in wanted:
                found[wanted[name]] = tid
        time.sleep(0.001)
    return found


def _prioritize_urgent_io(ctx: Any) -> str:
    """Run the urgent channel's I/O thread at SCHED_FIFO (URGENT_IO_PRIORITY). It does little
    work (fault requests and 4 KiB replies), and without it a reply waits for a CPU busy with
    bulk copies until the scheduler's slice ends (measured here: scheduling delays of 3-9 ms,
    fault p99 7-10 ms). Returns what was done, for the report (it needs CAP_SYS_NICE)."""
    tid = ctx.io_tids.get("urgent")
    if tid is None:
        return "normal (urgent I/O thread not found)"
    try:
        os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(URGENT_IO_PRIORITY))
    except PermissionError:
        return "normal (SCHED_FIFO not permitted)"
    return "fifo"


def set_send_buffer(sock: zmq.Socket, endpoint: str, size: int) -> bool:
    """SO_SNDBUF of ``sock``'s live TCP connection to ``endpoint`` (and of later ones), now.
    libzmq applies ZMQ_SNDBUF only when it connects and gives no access to its TCP sockets, so
    the connection is found among this process's descriptors by its peer address; setting a
    socket option on it does not disturb libzmq's use of it. Returns whether one was found."""
    parsed = urllib.parse.urlsplit(endpoint)
    try:
        port = parsed.port
        peers = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, port,
                                                            type=socket.SOCK_STREAM)}
    except (OSError, ValueError):
        return False
    sock.setsockopt(zmq.SNDBUF, size)
    found = False
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            conn = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if conn.family in (socket.AF_INET, socket.AF_INET6) and conn.type == socket.SOCK_STREAM:
                peer = conn.getpeername()
                if peer[1] == port and peer[0] in peers:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
                    found = True
        except OSError:
            pass  # not connected (a listener), or gone meanwhile
        finally:
            conn.close()
    return found


def set_bulk_io_realtime(ctx: Any, on: bool) -> bool:
    """The bulk channel's I/O thread at SCHED_FIFO (BULK_IO_PRIORITY), or back to normal. The
    source does this (and runs its sender at SCHED_FIFO) for pre-copy: its guest keeps running on
    the same CPU and, at equal priority, took the CPU from the sends. Measured here, kv 1 GiB
    hybrid: pre-copy 1.05 GB/s with neither, 1.37-1.57 with this, 1.55-1.73 with both; the guest
    still did 2.9-3.4 million operations during pre-copy against 3.2-3.4 (it runs whenever the
    sender waits for the window). It goes back at the pause: in post-copy the I/O thread must
    not delay the fast loop's fault replies. Returns whether the change was made."""
    tid = getattr(ctx, "io_tids", {}).get("bulk")
    if tid is None:
        return False
    try:
        if on:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(BULK_IO_PRIORITY))
        else:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except (PermissionError, ProcessLookupError):
        return False
    return True


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
    # ZMTP heartbeats: a connection whose peer stops answering is dropped after a few seconds and
    # re-established when the link returns (TCP alone may wait minutes). Messages lost with the old
    # connection are recovered by the protocol (re-requests, the missing-page sweep).
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)


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


def listen(ctx: zmq.Context, endpoint: str, keys: CurveKeys | None = None, *,
           allowed: Any = None, log: Any = None) -> zmq.Socket:
    """The destination's ROUTER for HELLOs. With ``keys``, a ``Gatekeeper`` on ``ctx`` (a
    ``transport.Context``) admits only the client public keys in ``allowed`` (z85) and logs
    every refusal through ``log``. Without keys only a loopback endpoint is accepted."""
    require_keys_off_loopback(endpoint, keys, "listen on")
    sock = ctx.socket(zmq.ROUTER)
    _tune(sock)
    sock.setsockopt(zmq.MAXMSGSIZE, LISTEN_MAX_MESSAGE_BYTES)
    if keys is not None:
        if not allowed:
            sock.close(linger=0)
            raise ValueError("a CURVE destination needs the public keys of the sources it "
                             "accepts (--allow)")
        if not isinstance(ctx, Context):
            sock.close(linger=0)
            raise TypeError("CURVE needs a context from transport.make_context()")
        from migrate.keys import Gatekeeper

        if ctx._gatekeeper is None:
            gate = Gatekeeper(ctx, allowed, log)
            gate.start()
            ctx._gatekeeper = gate
        ctx._gatekeeper.listen_domain(sock)
    _apply_curve_server(sock, keys)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(endpoint)
    return sock


WILDCARD_HOSTS = ("*", "0.0.0.0", "::")


def _place(sock: zmq.Socket, channel: str | None) -> None:
    """Connections of ``channel`` ("urgent" or "bulk") on that channel's I/O thread; the bulk
    channel's TCP buffers bounded (BULK_SEND_BUFFER, BULK_RECEIVE_BUFFER)."""
    if channel is not None and sock.context.get(zmq.IO_THREADS) >= IO_THREADS:
        sock.setsockopt(zmq.AFFINITY, CHANNEL_AFFINITY[channel])
    if channel == "bulk":
        sock.setsockopt(zmq.SNDBUF, BULK_SEND_BUFFER)
        sock.setsockopt(zmq.RCVBUF, BULK_RECEIVE_BUFFER)


def bind_channel(ctx: zmq.Context, host: str, keys: CurveKeys | None = None, *,
                 peer: bytes | None = None, advertise: str | None = None,
                 channel: str | None = None) -> tuple[zmq.Socket, str]:
    """A per-session DEALER bound to an ephemeral port on ``host``; returns it and its endpoint.
    With ``keys``, only the CURVE client ``peer`` (the key that sent the session's HELLO, see
    ``peer_key``) may connect, so another client cannot join a migration's channels."""
    sock = ctx.socket(zmq.DEALER)
    _tune(sock)
    _place(sock, channel)
    gate = getattr(ctx, "_gatekeeper", None)
    if keys is not None and gate is not None:
        gate.pin_session(sock, peer)
    _apply_curve_server(sock, keys)
    wildcard = f"tcp://{host}" if ":" not in host else f"tcp://[{host}]"
    port = sock.bind_to_random_port(wildcard)
    # A channel bound on every address is advertised under the name peers can reach.
    shown = advertise or host
    if shown in WILDCARD_HOSTS:
        raise ValueError(f"a channel bound on {host!r} needs an address to advertise")
    return sock, (f"tcp://{shown}" if ":" not in shown else f"tcp://[{shown}]") + f":{port}"


def connect(ctx: zmq.Context, endpoint: str, keys: CurveKeys | None = None, *,
            handshake_timeout: float | None = None, channel: str | None = None) -> zmq.Socket:
    """A source-side DEALER connected to ``endpoint`` (loopback only, unless ``keys``). With
    ``keys`` and ``handshake_timeout``, wait for the CURVE handshake and raise a MigrationError
    naming the cause when the destination refuses our key or does not hold ``server_public``'s
    secret (otherwise such failures look like a silent peer)."""
    require_keys_off_loopback(endpoint, keys, "connect to")
    sock = ctx.socket(zmq.DEALER)
    _tune(sock)
    _place(sock, channel)
    _apply_curve_client(sock, keys)
    if keys is None or handshake_timeout is None:
        sock.connect(endpoint)
        return sock
    monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
    try:
        sock.connect(endpoint)
        problem = _await_handshake(monitor, handshake_timeout)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
    if problem is not None:
        sock.close(linger=0)
        raise MigrationError("handshake", f"CURVE handshake with {endpoint} failed: {problem}")
    return sock


def _await_handshake(monitor: zmq.Socket, timeout_s: float) -> str | None:
    from zmq.utils.monitor import recv_monitor_message

    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not monitor.poll(int(left * 1000) + 1):
            return f"no handshake completed in {timeout_s:.0f} s (is the destination running?)"
        event = recv_monitor_message(monitor)
        kind = event["event"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return None
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the destination refused our public key (ZAP status {event['value']}): "
                    f"it is not on the destination's --allow list")
        return ("the destination does not hold the secret key of --server-key (or does not use "
                "CURVE)")


def send_frames(sock: zmq.Socket, frames: Sequence[Any], *, flags: int = 0) -> bool:
    """Send one message without ever blocking. Headers are small and copied; a large page data
    frame goes without a copy.

    A bound DEALER with no connected peer (the peer died, or the link is down and the connection
    was dropped) would block a send forever; here the message is dropped instead and False is
    returned. The protocol recovers what matters: fault requests are re-sent, missing pages are
    swept, COMPLETE and REPORT are repeated, and a peer silent past the deadline is a failure."""
    last = len(frames) - 1
    try:
        sock.send(frames[0], flags | zmq.NOBLOCK | (zmq.SNDMORE if last else 0),
                  copy=not (not isinstance(frames[0], bytes) or len(frames[0]) > 8192))
    except zmq.Again:
        return False
    # Once the first part is queued the rest of a multipart message always is too.
    for i in range(1, last + 1):
        frame = frames[i]
        big = not isinstance(frame, bytes) or len(frame) > 8192
        sock.send(frame, flags | (zmq.SNDMORE if i < last else 0), copy=not big)
    return True


def recv_frames(sock: zmq.Socket, *, flags: int = 0) -> list[Any]:
    """Receive one message as zmq Frames (no copy; ``frame.buffer`` is a memoryview)."""
    return sock.recv_multipart(flags, copy=False)


def session_id() -> bytes:
    return os.urandom(protocol.SESSION_ID_BYTES)
