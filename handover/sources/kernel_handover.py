"""The patched kernel's own interface, /sys/kernel/handover/ (design; the kernel side is its
own issue). Absent on stock kernels: this source then notes nothing and changes nothing.

Contract (interface version 1), all text unless noted:

``version``
    ``1``.
``state``
    What the kernel did with a handed-over state at boot: ``none`` (no valid state found),
    ``pending`` (found, its DMA/IR structures reserved and kept live, awaiting userspace's
    verdict), ``accepted``, ``aborted``.
``generation``
    Generation of the state blob the kernel picked (decimal).
``units/dmarN/{ver,cap,ecap,gsts,rtaddr,irta,iqa,iqh,iqt}``
    The unit's registers as the kernel reads them now (``0x%llx``): the registers that
    sysfs does not show, readable without debugfs.
``units/dmarN/boot/{gsts,rtaddr,irta}``
    The same registers as the kernel found them at boot, before it touched the unit.
``verdict`` (write-only)
    ``accept`` or ``abort <reason>``: userspace's verdict after ``handover load``
    compared the state with the machine. ``abort`` makes the kernel release what it kept.

A newer interface version adds files only; this reader ignores what it does not know.
"""

from __future__ import annotations

import errno

from ..errors import HandoverError
from .base import Host, Source, Sysroot, register

ROOT = "/sys/kernel/handover"
REGS = ("ver", "cap", "ecap", "gsts", "rtaddr", "irta", "iqa", "iqh", "iqt")


@register
class KernelHandover(Source):
    name = "kernel-handover"
    order = 25  # after sysfs units, before debugfs: its registers are authoritative
    items = ("kernel-handover",)

    def collect(self, host: Host) -> None:
        sr = host.sysroot
        if not sr.isdir(ROOT):
            host.note("kernel-handover", "absent", self.name,
                      f"{ROOT} missing: kernel without handover patches")
            return
        info = {"path": ROOT, "version": sr.try_int(f"{ROOT}/version", 10),
                "state": sr.try_text(f"{ROOT}/state"),
                "generation": sr.try_int(f"{ROOT}/generation", 10), "boot": {}}
        for name, u in host.units.items():
            d = f"{ROOT}/units/{name}"
            for reg in REGS:
                v = sr.try_int(f"{d}/{reg}", 16)
                if v is not None:
                    u.regs[reg] = v
                    u.reg_source[reg] = self.name
            boot = {reg: sr.try_int(f"{d}/boot/{reg}", 16) for reg in ("gsts", "rtaddr", "irta")}
            info["boot"][name] = {k: v for k, v in boot.items() if v is not None}
            if "gsts" in u.regs:
                u.dma_enabled = bool(u.regs["gsts"] >> 31 & 1)
                u.ir_enabled = bool(u.regs["gsts"] >> 25 & 1)
                u.ir_enabled_source = f"{self.name} GSTS.IRES"
        host.interfaces["kernel-handover"] = info
        host.note("kernel-handover", "captured", self.name,
                  f"{ROOT} version {info['version']}, state {info['state']}")
        for reg in REGS:
            if host.units and all(u.reg_source.get(reg) == self.name for u in host.units.values()):
                host.note(f"units.{reg}", "captured", self.name, f"{ROOT}/units/dmar*/{reg}")


def feed(sysroot: Sysroot, verdict: str, reason: str = "") -> str:
    """Tell the kernel userspace's verdict ("accept" / "abort"). Returns what was written."""
    if verdict not in ("accept", "abort"):
        raise ValueError(verdict)
    line = verdict if verdict == "accept" else f"abort {' '.join(reason.split()) or 'mismatch'}"
    path = sysroot.host(f"{ROOT}/verdict")
    try:
        with open(path, "w") as f:
            f.write(line + "\n")
    except OSError as e:
        raise HandoverError(f"{ROOT}/verdict: cannot write {verdict!r}: "
                            f"{errno.errorcode.get(e.errno or 0, e)}: {e.strerror}") from None
    return line
