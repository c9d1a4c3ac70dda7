"""zero-copy-ipc: handing a buffer to another process by mapping, not by copying.

Host: a 64 MiB buffer travels to a child process twice. (1) As a memfd over a Unix socket
(SCM_RIGHTS): the child maps it MAP_SHARED and touches every page; pagemap shows the child's
pages are this process's frames, and /proc/PID/io shows almost nothing went through read().
(2) Through a pipe: every byte is copied into the kernel and out again (wchar + rchar = 2x the
size). Both digests must match the original. Sim: ``transfer_pages`` moves the PTEs from server
to client; no byte is copied.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, is_root, read_text
from migrate.lab.child import Child, emit, receive

SIZE = 64 << 20
PG = 4096


def _io(pid: int | str = "self") -> dict[str, int]:
    out = {}
    for line in (read_text(f"/proc/{pid}/io") or "").splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value)
    return out


def child_receiver(sock_fd: int, pipe_fd: int, size: int) -> dict[str, Any]:
    from migrate._sys import ffi, lib
    from migrate.memory import Region

    sock = socket.socket(fileno=sock_fd)
    emit({"ready": True})  # imports done: the parent's clock starts after this
    # (1) memfd over SCM_RIGHTS
    io0 = _io()
    _msg, fds, _flags, _addr = socket.recv_fds(sock, 64, 1)
    region = Region.from_fd(fds[0], size, shared=True)
    lib.mig_touch_range(region.address, size // PG, PG, 0, ffi.NULL)
    t_mapped = time.monotonic()
    io1 = _io()
    digest = hashlib.sha256(region.view()).hexdigest()
    emit({"path": "memfd", "address": region.address, "done_at": t_mapped,
          "rchar": io1["rchar"] - io0["rchar"], "digest": digest})
    receive()  # parent has compared the frames
    region.close()
    os.close(fds[0])
    # (2) through a pipe
    buf = bytearray(size)
    view = memoryview(buf)
    io0 = _io()
    got = 0
    while got < size:
        n = os.readv(pipe_fd, [view[got:]])
        if n == 0:
            break
        got += n
    t_read = time.monotonic()
    io1 = _io()
    emit({"path": "pipe", "done_at": t_read, "bytes": got, "rchar": io1["rchar"] - io0["rchar"],
          "digest": hashlib.sha256(view[:got]).hexdigest()})
    return {"done": True}


def host() -> HostResult:
    from migrate.memory import Region, pagemap

    with Region.memfd(SIZE, "lab-ipc") as buf:
        pattern = bytes(range(256)) * (PG // 256)
        view = buf.view()
        for off in range(0, SIZE, 1 << 20):
            view[off:off + (1 << 20)] = pattern * 256
        view[SIZE - 8:] = b"LASTPAGE"
        digest = hashlib.sha256(view).hexdigest()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        rpipe, wpipe = os.pipe()
        child = Child("migrate.lab.zero_copy_ipc:child_receiver",
                      {"sock_fd": theirs.fileno(), "pipe_fd": rpipe, "size": SIZE},
                      pass_fds=(theirs.fileno(), rpipe))
        theirs.close()
        os.close(rpipe)
        try:
            child.recv()  # ready
            t0 = time.monotonic()
            sent = socket.send_fds(mine, [b"memfd"], [buf.memfd])
            got = child.recv()
            npages = SIZE // PG
            my_pfns = [e.pfn for e in buf.pagemap(0, npages)]
            their_pfns = [e.pfn for e in pagemap(child.proc.pid, got["address"], npages)]
            same_frames = sum(1 for a, b in zip(my_pfns, their_pfns, strict=True)
                              if a is not None and a == b)
            memfd_s = got["done_at"] - t0
            child.send({"go": True})
            io0 = _io()
            t1 = time.monotonic()
            written = 0
            while written < SIZE:
                written += os.write(wpipe, view[written:])
            os.close(wpipe)
            wchar = _io()["wchar"] - io0["wchar"]
            got_pipe = child.recv()
            pipe_s = got_pipe["done_at"] - t1
        finally:
            res = child.finish(timeout=60)
            mine.close()
            del view
    ev: dict[str, Any] = {
        "size": SIZE, "digest": digest[:16],
        "memfd": {"bytes_sent_on_socket": sent, "child_rchar": got["rchar"],
                  "seconds": round(memfd_s, 4), "digest_matches": got["digest"] == digest,
                  "pages": npages, "pages_on_same_frames": same_frames if is_root() else None},
        "pipe": {"parent_wchar": wchar, "child_rchar": got_pipe["rchar"],
                 "bytes_copied": wchar + got_pipe["rchar"], "seconds": round(pipe_s, 4),
                 "digest_matches": got_pipe["digest"] == digest},
        "child_exit": res.returncode,
    }
    ev["pipe_over_memfd_time"] = round(pipe_s / memfd_s, 2) if memfd_s > 0 else None
    rules = {
        "memfd_digest": got["digest"] == digest, "pipe_digest": got_pipe["digest"] == digest,
        "memfd_nothing_read": got["rchar"] < PG,
        "pipe_copied_twice": wchar >= SIZE and got_pipe["rchar"] >= SIZE,
    }
    reason = ""
    if is_root():
        rules["child_maps_the_same_frames"] = same_frames == npages
    else:
        reason = "not root: pagemap hides PFNs, frames not compared"
    ev["rules"] = rules
    summary = (f"64 MiB as a memfd: {sent} byte(s) on the socket, the child's "
               f"{same_frames}/{npages} pages on this process's frames, {memfd_s * 1e3:.1f} ms "
               f"to map+touch; through a pipe: {(wchar + got_pipe['rchar']) >> 20} MiB copied, "
               f"{pipe_s * 1e3:.1f} ms")
    return HostResult("ran", reason, ev, all(rules.values()) and res.returncode == 0, summary)


def sim() -> SimResult:
    from migrate.sim import Machine

    m = Machine(cores=2, memory=64 << 20)
    k = m.kernel
    n = 16
    server, client = k.spawn("server"), k.spawn("client")
    src = server.mmap(None, n * PG, "rw")
    dst = client.mmap(None, n * PG, "rw")
    for i in range(n):
        server.write(src + i * PG, f"message {i}".encode().ljust(64, b"."))
    frames = [server.frame_of(src + i * PG) for i in range(n)]
    copies_before = k.stats["cow_copies"]
    # Watch physical memory during the transfer: data bytes written (page-table entries are
    # 8-byte writes) and data frames allocated (page-table frames are owned by "pt...").
    data_written = [0]
    data_frames = [0]

    def on_write(_paddr: int, n: int, _writer: str) -> None:
        if n > 8:
            data_written[0] += n

    def on_alloc(_pfn: int, _order: int, owner: str | None) -> None:
        if not (owner or "").startswith("pt"):
            data_frames[0] += 1

    unhook = [m.physmem.on_write(on_write), m.physmem.on_alloc(on_alloc)]
    moved = k.transfer_pages(server, src, client, dst, n * PG)
    for undo in unhook:
        undo()
    client_frames = [client.frame_of(dst + i * PG) for i in range(n)]
    content_ok = all(client.read(dst + i * PG, 64) == f"message {i}".encode().ljust(64, b".")
                     for i in range(n))
    # The copying alternative: the kernel reads the server's bytes and writes the client's.
    copy_dst = client.mmap(None, n * PG, "rw")
    copied = 0
    for i in range(n):
        data = client.read(dst + i * PG, PG)
        client.write(copy_dst + i * PG, data)
        copied += len(data)
    ev = {"pages": n, "server_frames": frames[:4], "client_frames": client_frames[:4],
          "frames_moved": moved == frames and client_frames == frames,
          "data_bytes_written_during_transfer": data_written[0],
          "data_frames_allocated_during_transfer": data_frames[0],
          "cow_copies": k.stats["cow_copies"] - copies_before,
          "server_page_now": server.frame_of(src), "client_reads_messages": content_ok,
          "copy_path_bytes": copied}
    ok = bool(ev["frames_moved"] and data_written[0] == 0 and data_frames[0] == 0
          and ev["cow_copies"] == 0
          and server.frame_of(src) is None and content_ok and copied == n * PG)
    summary = (f"{n} pages moved server -> client by remapping PTEs: 0 bytes copied, frames "
               f"identical; the copying path moves {copied} bytes")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "zero-copy-ipc", "Zero-copy IPC by remapping",
    "The fastest way to move data is not to move it: give the other process a mapping of the "
    "same frames (a memfd over SCM_RIGHTS, or PTEs moved from server to client) instead of "
    "copying bytes through the kernel. The cost becomes a few page faults instead of two copies "
    "of every byte.",
    host, sim)
