"""Intel IOMMU units from sysfs (drivers/iommu/intel/iommu.c:3042-3110, Linux 6.12).

/sys/class/iommu/dmarN/intel-iommu/: ``version`` ("%d:%d"), ``address``, ``cap``, ``ecap``
("%llx"); dmarN/devices/<bdf> links name the devices a unit covers. The other registers
(GSTS, RTADDR, IRTA, IQA, IQH, IQT) are in sysfs only with the handover kernel patches
(kernel-patches/ 0003); otherwise the debugfs source fills them when it exists.
"""

from __future__ import annotations

import re

from .base import Host, Source, Unit, register

CLASS_IOMMU = "/sys/class/iommu"
DMAR_RE = re.compile(r"^dmar(\d+)$")
PATCHED_REGS = ("gsts", "rtaddr", "irta", "iqa", "iqh", "iqt")


def parse_version(text: str) -> int:
    """'1:0' -> VER register value (major 7:4, minor 3:0)."""
    major, minor = (int(x) for x in text.strip().split(":"))
    return (major & 0xF) << 4 | (minor & 0xF)


@register
class IntelIommuSysfs(Source):
    name = "intel-iommu-sysfs"
    order = 20
    items = ("units", "units.reg_base", "units.cap", "units.ecap", "units.ver")

    def collect(self, host: Host) -> None:
        sr = host.sysroot
        names = [n for n in sr.listdir(CLASS_IOMMU) if DMAR_RE.match(n)]
        if not names:
            host.note("units", "absent", self.name,
                      f"no Intel IOMMU (no dmar* under {CLASS_IOMMU}: VT-d off or not Intel)")
            return
        for name in sorted(names, key=lambda n: int(DMAR_RE.match(n).group(1))):
            d = f"{CLASS_IOMMU}/{name}/intel-iommu"
            u = Unit(name=name, seq=int(DMAR_RE.match(name).group(1)))
            u.reg_base = sr.try_int(f"{d}/address", 16)
            for reg in ("cap", "ecap"):
                v = sr.try_int(f"{d}/{reg}", 16)
                if v is not None:
                    u.regs.set(reg, v)
                    u.reg_source[reg] = self.name
            # the handover kernel patches (0003) add the live GSTS, RTADDR, IRTA and queue
            # registers; detect the files, not the kernel version
            for reg in PATCHED_REGS:
                v = sr.try_int(f"{d}/{reg}", 16)
                if v is not None:
                    u.regs.set(reg, v)
                    u.reg_source[reg] = self.name
            u.status_from_gsts(self.name)
            ver = sr.try_text(f"{d}/version")
            if ver:
                try:
                    u.regs.ver = parse_version(ver)
                    u.reg_source["ver"] = self.name
                except ValueError:
                    pass
            u.devices = [n for n in sr.listdir(f"{CLASS_IOMMU}/{name}/devices")]
            host.units[name] = u
        host.note("units", "captured", self.name, f"{', '.join(sorted(host.units))} from "
                  f"{CLASS_IOMMU}/dmar*/intel-iommu")
        for reg in PATCHED_REGS:
            if all(u.reg_source.get(reg) == self.name for u in host.units.values()):
                host.note(f"units.{reg}", "captured", self.name,
                          f"{CLASS_IOMMU}/dmar*/intel-iommu/{reg} (handover kernel patch)")
        for reg in ("reg_base", "cap", "ecap", "ver"):
            missing = [u.name for u in host.units.values()
                       if (u.reg_base if reg == "reg_base" else u.regs.get(reg)) is None]
            if missing:
                host.note(f"units.{reg}", "absent", self.name,
                          f"unreadable in sysfs for {', '.join(missing)}")
            else:
                host.note(f"units.{reg}", "captured", self.name,
                          f"{CLASS_IOMMU}/dmar*/intel-iommu/"
                          f"{'address' if reg == 'reg_base' else 'version' if reg == 'ver' else reg}")
