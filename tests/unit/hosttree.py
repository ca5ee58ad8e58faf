"""Helpers for tests that read a host tree: copies of captured fixtures, with overlays."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
CAPTURED = FIXTURES / "captured" / "debian-6.12-legacy-pmem"
DEBUGFS = FIXTURES / "constructed" / "intel-iommu-debugfs"
TOKEN = "8c1f3a52-6b0e-4d7a-9e21-5f4c2b9d7a10"
EDU, E1000E = "0000:00:03.0", "0000:00:04.0"


def copy_host(dst: Path, debugfs: bool = False) -> Path:
    shutil.copytree(CAPTURED, dst, symlinks=True, ignore=shutil.ignore_patterns("_capture"))
    if debugfs:
        shutil.copytree(DEBUGFS / "sys", dst / "sys", symlinks=True, dirs_exist_ok=True)
    return dst


def dev_dir(root: Path, bdf: str) -> Path:
    return root / "sys" / "devices" / "pci0000:00" / bdf


def set_resource(root: Path, bdf: str, index: int, start: int, end: int, flags: int) -> None:
    p = dev_dir(root, bdf) / "resource"
    lines = p.read_text().splitlines()
    lines[index] = f"0x{start:016x} 0x{end:016x} 0x{flags:016x}"
    p.write_text("\n".join(lines) + "\n")


def patch_config(root: Path, bdf: str, offset: int, data: bytes) -> None:
    p = dev_dir(root, bdf) / "config"
    b = bytearray(p.read_bytes())
    b[offset:offset + len(data)] = data
    p.write_bytes(bytes(b))


def remove_device(root: Path, bdf: str) -> None:
    os.unlink(root / "sys" / "bus" / "pci" / "devices" / bdf)
    shutil.rmtree(dev_dir(root, bdf))


# --- derived trees (edited copies of a capture; tests/fixtures/constructed/README.md) ------
PCI_BRIDGE, EDU_BEHIND = "0000:00:1e.0", "0000:01:00.0"

DERIVED_NOTE = """# Derived by hand from the capture `debian-6.12-legacy-pmem` (NOT captured)

Written by tests/unit/hosttree.py behind_pci_bridge(). Changed from the capture:
- added 0000:00:1e.0, a PCIe-to-PCI bridge (8086:244e, class 060400, header type 1,
  secondary bus 1, PCI Express capability at 0x40 with type 7, COMMAND 0x0007: bus master
  on), in IOMMU group 2 with no driver;
- edu moved behind it: 0000:00:03.0 became 0000:01:00.0 (its sysfs directory, the links to
  it, its irq chip name and actions in /proc/interrupts and /sys/kernel/irq/32, uevent and
  /proc/iomem renamed; its config space unchanged).
"""


def _bridge_config() -> bytes:
    c = bytearray(256)
    c[0:4] = (0x8086).to_bytes(2, "little") + (0x244E).to_bytes(2, "little")
    c[4:6] = (0x0007).to_bytes(2, "little")          # IO, MEM, bus master
    c[6:8] = (0x0010).to_bytes(2, "little")          # capability list
    c[8:12] = (0x06040001).to_bytes(4, "little")     # class 060400, revision 01
    c[0x0E] = 0x01                                   # type-1 header
    c[0x18:0x1B] = bytes([0, 1, 1])                  # primary 0, secondary 1, subordinate 1
    c[0x34] = 0x40
    c[0x40:0x44] = bytes([0x10, 0x00]) + (0x0002 | 7 << 4).to_bytes(2, "little")
    return bytes(c)


def behind_pci_bridge(dst: Path) -> Path:
    """The legacy-pmem capture with edu behind a PCIe-to-PCI bridge (DERIVED_NOTE)."""
    copy_host(dst)
    devs = dst / "sys" / "devices" / "pci0000:00"
    br = devs / PCI_BRIDGE
    br.mkdir()
    (br / "config").write_bytes(_bridge_config())
    for name, val in (("vendor", "0x8086"), ("device", "0x244e"), ("class", "0x060400"),
                      ("revision", "0x01"), ("subsystem_vendor", "0x0000"),
                      ("subsystem_device", "0x0000")):
        (br / name).write_text(val + "\n")
    (br / "resource").write_text(("0x%016x 0x%016x 0x%016x\n" % (0, 0, 0)) * 17)
    os.symlink("../../../kernel/iommu_groups/2", br / "iommu_group")
    os.symlink("../../../devices/pci0000:00/" + PCI_BRIDGE,
               dst / "sys/bus/pci/devices" / PCI_BRIDGE)
    os.symlink("../../../../devices/pci0000:00/" + PCI_BRIDGE,
               dst / "sys/kernel/iommu_groups/2/devices" / PCI_BRIDGE)
    new = br / EDU_BEHIND
    os.rename(devs / EDU, new)
    for p in new.iterdir():          # one level deeper: relative links get one more ../
        if p.is_symlink() and not os.readlink(p).startswith("/"):
            t = os.readlink(p)
            p.unlink()
            os.symlink("../" + t, p)
    for link, target in (
            ("sys/bus/pci/devices", "../../../devices/pci0000:00/"),
            ("sys/bus/pci/drivers/vfio-pci", "../../../../devices/pci0000:00/"),
            ("sys/kernel/iommu_groups/2/devices", "../../../../devices/pci0000:00/"),
            ("sys/devices/virtual/iommu/dmar0/devices", "../../../../pci0000:00/")):
        (dst / link / EDU).unlink()
        os.symlink(target + f"{PCI_BRIDGE}/{EDU_BEHIND}", dst / link / EDU_BEHIND)
    for f in ("proc/interrupts", "proc/iomem", "sys/kernel/irq/32/chip_name",
              "sys/kernel/irq/32/actions", f"sys/devices/pci0000:00/{PCI_BRIDGE}/{EDU_BEHIND}/uevent"):
        p = dst / f
        p.write_text(p.read_text().replace(EDU, EDU_BEHIND).replace("00:03.0", "01:00.0"))
    (dst / "DERIVED.md").write_text(DERIVED_NOTE)
    return dst
