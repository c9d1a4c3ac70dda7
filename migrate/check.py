"""``migrate check``: what this host's kernel offers, found by trying it, and what will work here.

Every answer comes from doing the thing (open a userfaultfd, handshake, register a scratch region,
run PAGEMAP_SCAN on it, allocate a protection key, create a network namespace) rather than from
version numbers. :func:`capabilities` returns the report as a dict for tests and other modules.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Any

__all__ = ["capabilities", "configure", "run"]


def _read(path: str) -> str | None:
    try:
        return pathlib.Path(path).read_text().strip()
    except OSError:
        return None


def _userfaultfd() -> dict[str, Any]:
    from migrate import memory, uffd
    from migrate.errors import CapabilityError

    info: dict[str, Any] = {
        "available": False,
        "via": None,
        "dev_node": _dev_node(),
        "syscall": False,
        "user_mode_only_required": False,
        "unprivileged_userfaultfd": _sysctl_int("/proc/sys/vm/unprivileged_userfaultfd"),
        "features": [],
        "features_supported": {},
        "ioctls": [],
        "ioctls_by_mode": {},
        "error": None,
    }
    errors: list[str] = []
    for via in ("dev", "syscall"):
        for user_mode_only in (False, True):
            try:
                feats = uffd.supported_features(via=via, user_mode_only=user_mode_only)
            except OSError as exc:
                errors.append(f"{via}{' (user-mode-only)' if user_mode_only else ''}: {exc}")
                continue
            if via == "syscall":
                info["syscall"] = True
            if not info["available"]:
                info.update(available=True, via=via, user_mode_only_required=user_mode_only)
                info["features"] = [f.name for f in uffd.Feature if f in feats]
                info["features_supported"] = {f.name: f in feats for f in uffd.Feature}
            break
    if not info["available"]:
        info["error"] = "; ".join(errors)
        return info

    # The ioctls a registration returns depend on the memory type and the mode: try each.
    umo = info["user_mode_only_required"]
    probes: list[tuple[str, str, str]] = [
        ("anonymous MISSING|WP", "anonymous", "MISSING|WP"),
        ("anonymous MISSING", "anonymous", "MISSING"),
        ("shmem MINOR", "memfd", "MINOR"),
    ]
    for label, kind, mode in probes:
        try:
            with uffd.Userfaultfd.open(user_mode_only=umo, via=info["via"]) as fd:
                region = (memory.Region.anonymous(4 * memory.PAGE_SIZE) if kind == "anonymous"
                          else memory.Region.memfd(4 * memory.PAGE_SIZE, "migrate-check"))
                with region:
                    ioctls = fd.register(region.address, region.size, mode)
                    info["ioctls_by_mode"][label] = [i.name for i in uffd.Ioctl if i in ioctls]
        except (OSError, CapabilityError, ValueError) as exc:
            info["ioctls_by_mode"][label] = f"error: {exc}"
    first = info["ioctls_by_mode"].get("anonymous MISSING|WP")
    info["ioctls"] = first if isinstance(first, list) else []
    return info


def _dev_node() -> dict[str, Any]:
    path = "/dev/userfaultfd"
    try:
        st = os.stat(path)
    except OSError:
        return {"path": path, "exists": False, "mode": None, "accessible": False}
    return {"path": path, "exists": True, "mode": oct(st.st_mode & 0o7777),
            "accessible": os.access(path, os.R_OK | os.W_OK)}


def _sysctl_int(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _pagemap_scan(uffd_ok: bool) -> dict[str, Any]:
    from migrate import memory, uffd

    out: dict[str, Any] = {"available": False, "wp_async": False, "error": None}
    try:
        with memory.Region.anonymous(4 * memory.PAGE_SIZE) as region:
            region.populate(write=True)
            runs = memory.pagemap_scan("self", region.address, region.end,
                                       require=memory.PageCategory.PRESENT)
            out["available"] = bool(runs) and runs[0][0] == region.address
            if uffd_ok:
                with uffd.Userfaultfd.open(uffd.Feature.WP_ASYNC) as fd:
                    fd.register(region.address, region.size, "WP")
                    fd.writeprotect(region.address, region.size, True)
                    region[0] = 1  # async WP: resolved by the kernel, no event
                    written = memory.pagemap_scan(
                        "self", region.address, region.end, require=memory.PageCategory.WRITTEN,
                        wp_matching=True, check_wpasync=True)
                    out["wp_async"] = len(written) == 1 and written[0][:2] == (
                        region.address, region.address + memory.PAGE_SIZE)
    except Exception as exc:  # noqa: BLE001 - the report says what failed, whatever it was
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def _thp() -> dict[str, Any]:
    def selected(text: str | None) -> str | None:
        if not text:
            return None
        for word in text.split():
            if word.startswith("["):
                return word.strip("[]")
        return text

    base = "/sys/kernel/mm/transparent_hugepage"
    return {
        "enabled": selected(_read(f"{base}/enabled")),
        "defrag": selected(_read(f"{base}/defrag")),
        "shmem_enabled": selected(_read(f"{base}/shmem_enabled")),
    }


def _hugetlb() -> list[dict[str, Any]]:
    sizes: list[dict[str, Any]] = []
    root = pathlib.Path("/sys/kernel/mm/hugepages")
    if not root.is_dir():
        return sizes
    for d in sorted(root.iterdir()):
        kb = int(d.name.removeprefix("hugepages-").removesuffix("kB"))
        sizes.append({
            "size": f"{kb // 1024}M" if kb < 1024 * 1024 else f"{kb // (1024 * 1024)}G",
            "bytes": kb * 1024,
            "nr": _sysctl_int(str(d / "nr_hugepages")),
            "free": _sysctl_int(str(d / "free_hugepages")),
            "reserved": _sysctl_int(str(d / "resv_hugepages")),
        })
    return sizes


def _pku() -> dict[str, Any]:
    from migrate._sys import lib

    flags: set[str] = set()
    cpuinfo = _read("/proc/cpuinfo") or ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    out: dict[str, Any] = {"cpu_pku": "pku" in flags, "ospke": "ospke" in flags,
                           "pkey_alloc": False, "reason": None}
    key = lib.mig_pkey_alloc(0, 0)
    if key >= 0:
        out["pkey_alloc"] = True
        lib.mig_pkey_free(key)
    else:
        out["reason"] = (f"pkey_alloc: {os.strerror(-key)}; CPU flags "
                         f"pku={'yes' if out['cpu_pku'] else 'no'}, "
                         f"ospke={'yes' if out['ospke'] else 'no'}")
    return out


def _netns() -> dict[str, Any]:
    out: dict[str, Any] = {"available": False, "unshare": shutil.which("unshare"),
                           "ip": shutil.which("ip"), "reason": None}
    if not out["unshare"]:
        out["reason"] = "unshare(1) not found"
        return out
    try:
        proc = subprocess.run([out["unshare"], "--net", "true"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        out["reason"] = f"unshare --net: {exc}"
        return out
    if proc.returncode != 0:
        out["reason"] = f"unshare --net: {proc.stderr.strip() or proc.returncode}"
    elif not out["ip"]:
        out["reason"] = "ip(8) not found (needed for veth pairs)"
    else:
        out["available"] = True
    return out


def _native() -> str | None:
    try:
        from migrate import _native  # noqa: F401
    except ImportError as exc:
        return f"{exc} (the C extension was not built: reinstall with `pip install .`)"
    return None


def capabilities() -> dict[str, Any]:
    """The capability report as a dict (the JSON of ``migrate check --json``)."""
    native_error = _native()
    report: dict[str, Any] = {
        "kernel": os.uname().release,
        "machine": os.uname().machine,
        "cpus": os.cpu_count(),
        "euid": os.geteuid(),
        "native": native_error is None,
    }
    if native_error:
        report["native_error"] = native_error
        return report
    from migrate.memory import PAGE_SIZE

    report["page_size"] = PAGE_SIZE
    report["userfaultfd"] = _userfaultfd()
    scan = _pagemap_scan(report["userfaultfd"]["available"])
    report["pagemap_scan"] = scan["available"]
    report["pagemap_scan_detail"] = scan
    report["thp"] = _thp()
    report["hugetlb"] = _hugetlb()
    pku = _pku()
    report["pku"] = pku["pkey_alloc"]
    report["pku_detail"] = pku
    netns = _netns()
    report["netns"] = netns["available"]
    report["netns_detail"] = netns
    report["works"] = _verdicts(report)
    report["advice"] = _advice(report)
    return report


def _verdicts(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    u = r["userfaultfd"]
    feats = set(u["features"])
    umo = u.get("user_mode_only_required", False)

    def verdict(ok: bool, why: str) -> dict[str, Any]:
        return {"ok": ok, "why": why}

    post = u["available"]
    dirty = post and "WP_ASYNC" in feats and r["pagemap_scan_detail"].get("wp_async", False)
    return {
        "postcopy": verdict(post, "userfaultfd MISSING + COPY" if post
                            else f"no userfaultfd: {u['error']}"),
        "precopy_dirty_tracking": verdict(bool(dirty), "WP_ASYNC + PAGEMAP_SCAN" if dirty
                                          else "needs UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN"),
        "memfd_guests": verdict(post and "MISSING_SHMEM" in feats, "MISSING_SHMEM"),
        "minor_faults": verdict(post and "MINOR_SHMEM" in feats, "MINOR_SHMEM + CONTINUE"),
        "kernel_mode_faults": verdict(post and not umo,
                                      "faults from syscalls (e.g. read() into the region)" if
                                      not umo else "only user-mode faults (UFFD_USER_MODE_ONLY)"),
        "hugetlb": verdict(any((h["free"] or 0) > 0 for h in r["hugetlb"]),
                           "free huge pages reserved" if any((h["free"] or 0) > 0
                                                             for h in r["hugetlb"])
                           else "no free huge pages (echo N > /proc/sys/vm/nr_hugepages)"),
        "pku_lab": verdict(r["pku"], r["pku_detail"]["reason"] or "pkey_alloc works"),
        "netns_test": verdict(r["netns"], r["netns_detail"]["reason"] or "unshare --net + ip"),
    }


def _advice(r: dict[str, Any]) -> list[str]:
    u = r["userfaultfd"]
    advice: list[str] = []
    if r["euid"] != 0:
        advice.append("running as a non-root user:")
        if u["unprivileged_userfaultfd"] == 0:
            advice.append(
                "  vm.unprivileged_userfaultfd=0: without CAP_SYS_PTRACE the userfaultfd syscall "
                "only works with UFFD_USER_MODE_ONLY (faults from the kernel, e.g. read() into "
                "the region, are not delivered). `sysctl vm.unprivileged_userfaultfd=1` lifts it.")
        dev = u["dev_node"]
        if dev["exists"] and not dev["accessible"]:
            advice.append(
                f"  {dev['path']} is mode {dev['mode']} and not accessible to you: giving your "
                "group read/write access to it allows full userfaultfd without the sysctl.")
        advice.append("  PAGEMAP_SCAN on another process and process_vm_readv need ptrace access "
                      "(same uid and kernel.yama.ptrace_scope 0 or 1 for your own children).")
    if not u["available"]:
        advice.append(f"userfaultfd unavailable: {u['error']}")
    return advice


# ---- CLI ----------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = capabilities()
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_human(report)
    if not report.get("native"):
        return 1
    return 0 if report["userfaultfd"]["available"] else 1


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _print_human(r: dict[str, Any]) -> None:
    print(f"kernel          {r['kernel']} ({r['machine']}, {r['cpus']} cpus, euid {r['euid']})")
    if not r.get("native"):
        print(f"native binding  MISSING: {r['native_error']}")
        return
    u = r["userfaultfd"]
    how = u["via"] + (" (user-mode-only)" if u["user_mode_only_required"] else "") if u[
        "available"] else f"no ({u['error']})"
    print(f"userfaultfd     {how}")
    dev = u["dev_node"]
    print(f"  /dev/userfaultfd  {'mode ' + dev['mode'] if dev['exists'] else 'absent'}, "
          f"accessible: {_yes(dev['accessible'])}; syscall: {_yes(u['syscall'])}; "
          f"vm.unprivileged_userfaultfd = {u['unprivileged_userfaultfd']}")
    if u["available"]:
        n = sum(u["features_supported"].values())
        print(f"  features ({n}/{len(u['features_supported'])}):")
        for name, ok in u["features_supported"].items():
            print(f"    {'+' if ok else '-'} {name}")
        for label, ioctls in u["ioctls_by_mode"].items():
            text = ", ".join(ioctls) if isinstance(ioctls, list) else ioctls
            print(f"  register {label:<22} -> {text}")
    scan = r["pagemap_scan_detail"]
    print(f"PAGEMAP_SCAN    {_yes(r['pagemap_scan'])}"
          f" (WP_ASYNC dirty tracking: {_yes(scan['wp_async'])})"
          + (f" error: {scan['error']}" if scan["error"] else ""))
    print(f"THP             enabled={r['thp']['enabled']} defrag={r['thp']['defrag']}")
    for h in r["hugetlb"]:
        print(f"hugetlb {h['size']:<7} nr={h['nr']} free={h['free']}")
    print(f"PKU             {_yes(r['pku'])}"
          + (f" ({r['pku_detail']['reason']})" if r["pku_detail"]["reason"] else ""))
    print(f"netns           {_yes(r['netns'])}"
          + (f" ({r['netns_detail']['reason']})" if r["netns_detail"]["reason"] else ""))
    print("what works here:")
    for name, v in r["works"].items():
        print(f"  {'ok ' if v['ok'] else 'no '} {name:<24} {v['why']}")
    for line in r["advice"]:
        print(line)
