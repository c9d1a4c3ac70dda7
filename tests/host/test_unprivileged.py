"""As an unprivileged user: what the kernel refuses and what still works (checked, not assumed)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import migrate

pytestmark = pytest.mark.host

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from migrate.errors import CapabilityError
from migrate.memory import Region, PAGE_SIZE
from migrate.probe import Toucher
from migrate.uffd import Userfaultfd
from migrate.check import capabilities

out = {"uid": __import__("os").getuid()}
try:
    Userfaultfd.open().close()
    out["full"] = "opened"
except CapabilityError as exc:
    out["full"] = str(exc)
caps = capabilities()
out["user_mode_only_required"] = caps["userfaultfd"]["user_mode_only_required"]
out["advice"] = caps["advice"]
uffd = Userfaultfd.open(user_mode_only=True, via="syscall")
with uffd, Region.anonymous(4 * PAGE_SIZE) as r:
    uffd.register(r.address, r.size, "MISSING")
    t = Toucher.start(list(r.pages()))
    served = 0
    while served < 4:
        for ev in uffd.wait_events(timeout=5):
            uffd.copy(ev.address & ~(PAGE_SIZE - 1), b"\x42" * PAGE_SIZE)
            served += 1
    out["joined"] = t.join(timeout=5)
    out["data"] = r[3 * PAGE_SIZE]
print(json.dumps(out))
"""


def test_non_root_gets_an_explanation_and_user_mode_only_still_serves_faults(caps):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv(1) to run a child as an unprivileged user")
    if caps["userfaultfd"]["unprivileged_userfaultfd"] != 0:
        pytest.skip("vm.unprivileged_userfaultfd=1 here: unprivileged users are not restricted")
    package_root = str(pathlib.Path(migrate.__file__).resolve().parent.parent)
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         SCRIPT, package_root],
        capture_output=True, text=True, timeout=60, check=False, cwd="/",
    )
    denied = "Permission denied" in proc.stderr and "Traceback" not in proc.stderr
    if proc.returncode != 0 and denied:
        pytest.skip(f"the unprivileged user cannot run this Python: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uid"] == 65534
    # the full (kernel-mode-capable) uffd is refused, and the refusal says how to get it
    assert "vm.unprivileged_userfaultfd" in out["full"] and "user_mode_only" in out["full"]
    assert out["user_mode_only_required"] is True
    assert any("vm.unprivileged_userfaultfd=0" in line for line in out["advice"])
    # ...but user-mode faults are still delivered with UFFD_USER_MODE_ONLY
    assert out["joined"] is True and out["data"] == 0x42
