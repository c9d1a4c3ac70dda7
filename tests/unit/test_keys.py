"""Key files, allow-lists and the gatekeeper, with real ZeroMQ sockets on loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from migrate import keys, transport
from migrate.errors import MigrationError


def test_keygen_writes_a_private_secret_and_a_public_file(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "migrate", "keygen", "node", "--dir",
                          str(tmp_path), "--json"], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    secret, public = tmp_path / "node.key", tmp_path / "node.key_public"
    assert info == {"public_key": info["public_key"], "secret_file": str(secret),
                    "public_file": str(public)}
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text()
    pair = keys.load_secret(secret)
    assert pair.public.decode() == info["public_key"] == keys.load_public(public).decode()
    # The files are ZeroMQ certificates: zmq.auth reads them too.
    import zmq.auth

    assert zmq.auth.load_certificate(secret) == (pair.public, pair.secret)
    # A key pair is never overwritten by accident.
    again = subprocess.run([sys.executable, "-m", "migrate", "keygen", "node", "--dir",
                            str(tmp_path)], capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "--force" in again.stderr
    assert keys.load_secret(secret) == pair
    _s, _p, replaced = keys.generate(tmp_path, "node", force=True)
    assert replaced != pair and keys.load_secret(secret) == replaced
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_a_secret_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret, _public, _pair = keys.generate(tmp_path, "loose")
    os.chmod(secret, 0o640)
    with pytest.raises(keys.KeyFileError, match="chmod 600"):
        keys.load_secret(secret)


def test_bad_key_files_name_the_file_and_the_cause(tmp_path: Path) -> None:
    _secret, public, _pair = keys.generate(tmp_path, "a")
    with pytest.raises(keys.KeyFileError, match="holds no secret key"):
        os.chmod(public, 0o600)
        keys.load_secret(public)
    with pytest.raises(keys.KeyFileError, match="cannot read key file"):
        keys.load_public(tmp_path / "missing.key_public")
    garbage = tmp_path / "garbage.key_public"
    garbage.write_text('curve\n    public-key = "not a key"\n')
    with pytest.raises(keys.KeyFileError, match="garbage.key_public"):
        keys.load_public(garbage)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(keys.KeyFileError, match="no \\*.key_public"):
        keys.load_allowed([empty])
    with pytest.raises(keys.KeyFileError, match="empty"):
        keys.load_allowed([])
    with pytest.raises(keys.KeyFileError, match="plain file name"):
        keys.generate(tmp_path, "../escape")


def test_allow_lists_from_files_directories_and_z85_text(tmp_path: Path) -> None:
    pairs = [keys.generate(tmp_path / "peers", f"p{i}")[2] for i in range(3)]
    other = keys.generate(tmp_path, "other")[2]
    allowed = keys.load_allowed([tmp_path / "peers", other.public.decode()])
    assert allowed == {p.public for p in pairs} | {other.public}
    # Secret files in the directory are not mistaken for public ones (only *.key_public count).
    assert len(keys.load_allowed([tmp_path / "peers"])) == 3


def test_off_loopback_needs_keys() -> None:
    with pytest.raises(transport.InsecureEndpointError, match="migrate keygen"):
        transport.require_keys_off_loopback("tcp://10.0.0.1:7070", None, "listen on")
    with pytest.raises(transport.InsecureEndpointError):
        transport.require_keys_off_loopback("tcp://*:7070", None, "listen on")
    for ep in ("tcp://127.0.0.1:7070", "tcp://localhost:1", "tcp://[::1]:1"):
        transport.require_keys_off_loopback(ep, None, "listen on")
    pair = zmq.curve_keypair()
    transport.require_keys_off_loopback("tcp://10.0.0.1:7070",
                                        transport.CurveKeys(pair[0], pair[1]), "listen on")
    ctx = transport.make_context()
    try:
        with pytest.raises(transport.InsecureEndpointError):
            transport.listen(ctx, "tcp://0.0.0.0:0")
        with pytest.raises(transport.InsecureEndpointError):
            transport.connect(ctx, "tcp://192.0.2.1:7070")
        with pytest.raises(ValueError, match="--allow"):
            transport.listen(ctx, "tcp://127.0.0.1:*", transport.CurveKeys(pair[0], pair[1]))
    finally:
        ctx.term()


def _wait(pred, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_gatekeeper_admits_only_listed_keys_and_logs_the_rest() -> None:
    # One I/O thread: the server and the plain client below then take turns, so the server
    # always reads the plain client's greeting (a mechanism mismatch) before that client drops
    # the connection. With two, either may come first and the refusal is logged as a dropped
    # handshake instead.
    ctx = transport.make_context(io_threads=1)
    server, client, stranger, rival = (zmq.curve_keypair() for _ in range(4))
    lines: list[str] = []
    router = transport.listen(ctx, "tcp://127.0.0.1:*", transport.CurveKeys(*server),
                              allowed={client[0], rival[0]}, log=lines.append)
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    socks = []
    try:
        good = transport.connect(ctx, endpoint, transport.CurveKeys(*client, server[0]),
                                 handshake_timeout=5)
        socks.append(good)
        with pytest.raises(MigrationError, match="refused our public key"):
            transport.connect(ctx, endpoint, transport.CurveKeys(*stranger, server[0]),
                              handshake_timeout=5)
        with pytest.raises(MigrationError, match="does not hold the secret key"):
            transport.connect(ctx, endpoint, transport.CurveKeys(*client, stranger[0]),
                              handshake_timeout=5)
        plain = ctx.socket(zmq.DEALER)
        plain.linger = 0
        plain.connect(endpoint)
        try:
            # Never blocks: the handshake this peer gets refused in may already have dropped
            # its connection (a blocking send would then wait for a reconnect forever).
            plain.send(b"let me in", zmq.NOBLOCK)
        except zmq.Again:
            pass
        socks.append(plain)
        good.send(b"hello")
        assert router.poll(5000)
        frames = router.recv_multipart(copy=False)
        assert frames[1].bytes == b"hello"
        assert transport.peer_key(frames[1]) == client[0]
        assert _wait(lambda: any("does not use CURVE" in line for line in lines)), lines
        assert not router.poll(300), "a refused peer's message got through"
        log = "\n".join(lines)
        assert f"refused CURVE client key {stranger[0].decode()} from 127.0.0.1" in log
        assert "another server key" in log

        # A per-session channel admits only the key that sent the HELLO, not every allowed key.
        socks.append(transport.connect(ctx, endpoint, transport.CurveKeys(*rival, server[0]),
                                       handshake_timeout=5))  # rival is welcome on the listen port
        chan, chan_ep = transport.bind_channel(ctx, "127.0.0.1", transport.CurveKeys(*server),
                                               peer=client[0])
        socks.append(chan)
        owner = transport.connect(ctx, chan_ep, transport.CurveKeys(*client, server[0]),
                                  handshake_timeout=5)
        socks.append(owner)
        with pytest.raises(MigrationError, match="refused our public key"):
            transport.connect(ctx, chan_ep, transport.CurveKeys(*rival, server[0]),
                              handshake_timeout=5)
        assert any("on a migration's channel" in line for line in lines)
        domains = len(ctx._gatekeeper._domains)
        chan.close(linger=0)
        socks.remove(chan)
        del chan
        import gc

        gc.collect()
        assert len(ctx._gatekeeper._domains) == domains - 1  # no per-session state left behind
    finally:
        for s in socks:
            s.close(linger=0)
        router.close(linger=0)
        ctx.term()  # stops the gatekeeper first: must not hang


def test_refusal_log_is_rate_limited() -> None:
    lines: list[str] = []
    log = keys.RateLimitedLog(lines.append)
    for i in range(1000):
        log(f"refusal {i}")
    assert len(lines) == keys.LOG_LINES_PER_WINDOW
    time.sleep(keys.LOG_WINDOW_S + 0.05)
    log("later")
    assert lines[-2] == f"{1000 - keys.LOG_LINES_PER_WINDOW} more refusals in the last " \
                        f"{lines[-2].split(' in the last ')[1]}"
    assert lines[-1] == "later"
