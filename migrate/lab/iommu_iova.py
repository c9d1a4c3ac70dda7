"""iommu-iova: an MMU for devices, with an address space (IOVA) per device.

Host: what this machine has: /sys/class/iommu, /sys/kernel/iommu_groups (and each group's
default domain type), the ACPI DMAR (Intel VT-d) / IVRS (AMD-Vi) tables, iommu= options on the
kernel command line. Without an IOMMU there are no IOVA mappings to show: "not-exposed".
Sim: two devices, each with its own domain; the same IOVA numbers map different, scattered
frames as one contiguous range; a device using another's IOVA reaches nothing.
"""

from __future__ import annotations

import os
from typing import Any

from migrate.lab.base import HostResult, Scenario, SimResult, read_text


def _listdir(path: str) -> list[str] | None:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return None


def host() -> HostResult:
    units = _listdir("/sys/class/iommu")
    groups = _listdir("/sys/kernel/iommu_groups")
    tables = _listdir("/sys/firmware/acpi/tables") or []
    cmdline = (read_text("/proc/cmdline") or "").split()
    group_info = []
    for g in (groups or [])[:16]:
        group_info.append({
            "group": g, "type": (read_text(f"/sys/kernel/iommu_groups/{g}/type") or "").strip(),
            "devices": _listdir(f"/sys/kernel/iommu_groups/{g}/devices") or []})
    ev: dict[str, Any] = {
        "sys_class_iommu": units, "iommu_groups": len(groups or []), "groups": group_info,
        "acpi_dmar": "DMAR" in tables, "acpi_ivrs": "IVRS" in tables,
        "cmdline_iommu_options": [o for o in cmdline if o.startswith(("iommu", "intel_iommu",
                                                                        "amd_iommu"))],
        "pci_devices": len(_listdir("/sys/bus/pci/devices") or []),
    }
    if units:
        ok = bool(groups)
        return HostResult("ran", "", ev, ok,
                          f"{len(units)} IOMMU unit(s) {units}, {len(groups or [])} groups")
    acpi = "no ACPI DMAR/IVRS table" if not (ev["acpi_dmar"] or ev["acpi_ivrs"]) else \
        "an ACPI DMAR/IVRS table but no unit registered"
    reason = (f"no IOMMU exposed: /sys/class/iommu is {'empty' if units == [] else 'absent'}, "
              f"{len(groups or [])} iommu groups, {acpi}; devices DMA to physical addresses")
    # Absence established when nothing contradicts it (no groups without units).
    ok = not groups
    return HostResult("not-exposed", reason, ev, ok, reason)


def sim() -> SimResult:
    from migrate.sim import Machine
    from migrate.sim.devices import iova_spaces_demo

    m = Machine(cores=1, memory=64 << 20)
    ev = iova_spaces_demo(m.iommu)
    nic, gpu = ev["devices"]["demo-nic"], ev["devices"]["demo-gpu"]
    probe = ev["cross_domain_probe"]
    ok = (ev["same_iova_numbers"] and nic["frames"] != gpu["frames"]
          and not nic["frames_contiguous"] and not gpu["frames_contiguous"]
          and nic["landed_in_own_frames"] and gpu["landed_in_own_frames"]
          and probe["status"] == "error" and len(probe["faults"]) >= 1)
    summary = (f"nic and gpu both got IOVA {nic['iova']} (+{nic['length']} bytes) backed by "
               f"different scattered frames {nic['frames']} / {gpu['frames']}; the nic using the "
               f"gpu's IOVA {probe['iova']}: {probe['status']} ({len(probe['faults'])} DMAR fault)")
    return SimResult(ev, ok, summary)


SCENARIO = Scenario(
    "iommu-iova", "The IOMMU: an address space per device",
    "DMA bypasses the CPU's MMU, so without an IOMMU a device can write anywhere in physical "
    "memory. An IOMMU gives each device its own I/O virtual address space: the OS maps exactly "
    "the buffers a device may use, as one contiguous IOVA range even when the frames behind it "
    "are scattered, and anything else faults.",
    host, sim)
