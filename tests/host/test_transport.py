"""The bulk channel's send buffer, changed on a live ZeroMQ connection (transport.set_send_buffer):
checked on the kernel's socket itself, found independently of the code under test."""

from __future__ import annotations

import os
import socket
import stat

import zmq

from migrate import transport


def _tcp_sndbuf_to(port: int) -> list[int]:
    """SO_SNDBUF of every connected TCP socket of this process whose peer port is ``port``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if not stat.S_ISSOCK(os.fstat(int(name)).st_mode):
                continue
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with s:
            try:
                if s.type == socket.SOCK_STREAM and s.getpeername()[1] == port:
                    found.append(s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            except OSError:
                pass
    return found


def test_send_buffer_of_a_live_connection_changes() -> None:
    ctx = zmq.Context()
    try:
        server = ctx.socket(zmq.DEALER)
        server.setsockopt(zmq.LINGER, 0)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{port}"
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.setsockopt(zmq.SNDBUF, 256 << 10)
        client.connect(endpoint)
        client.send(b"hello")  # the connection is up once the server has it
        assert server.poll(5000) and server.recv() == b"hello"
        before = _tcp_sndbuf_to(port)
        assert len(before) == 1 and before[0] >= 256 << 10

        assert transport.set_send_buffer(client, endpoint, 96 << 10)

        # Linux keeps twice the size asked for (room for its bookkeeping): socket(7).
        assert _tcp_sndbuf_to(port) == [2 * (96 << 10)]
        assert client.getsockopt(zmq.SNDBUF) == 96 << 10  # for a reconnection too
        client.send(b"still works")
        assert server.poll(5000) and server.recv() == b"still works"
    finally:
        ctx.destroy(linger=0)


def test_send_buffer_without_a_connection_is_not_found() -> None:
    ctx = zmq.Context()
    try:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # a port nobody listens on
        probe.close()
        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.LINGER, 0)
        client.connect(f"tcp://127.0.0.1:{port}")
        assert not transport.set_send_buffer(client, f"tcp://127.0.0.1:{port}", 96 << 10)
        assert not transport.set_send_buffer(client, "tcp://no-such-host.invalid:1", 96 << 10)
    finally:
        ctx.destroy(linger=0)
