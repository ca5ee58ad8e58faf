"""Interrupts: /proc/interrupts, /sys/kernel/irq/<n>/, <dev>/msi_irqs/, and the remappable
MSI / MSI-X messages that give each vector's IRTE (kernel/irq/proc.c, irqdesc.c,
arch/x86/include/asm/msi.h; hardware-facts.md sections 2 and 8).

MSI address/data are in config space. MSI-X entries live in a BAR: they are read through
the device's sysfs ``resourceN`` with mmap, which the kernel refuses under lockdown (EPERM)
and for a region a driver claimed exclusively with CONFIG_IO_STRICT_DEVMEM (EINVAL).
"""

from __future__ import annotations

import re
import struct

from ..formats import enums as E
from ..formats.descriptions import BDF_PATTERN
from .base import Host, Irq, MsixCap, PciDev, Source, Vector, errno_text, register

PROC_INTERRUPTS = "/proc/interrupts"
SYS_IRQ = "/sys/kernel/irq"
CHIP_RE = re.compile(rf"^(IR-)?PCI-(MSI|MSIX)-({BDF_PATTERN})$")
_LINE = re.compile(r"^\s*(\d+):((?:\s+\d+)*)\s+(\S+)(?:\s+(\d+))?-(\S+)(?:\s+(.*))?$")


def parse_proc_interrupts(text: str) -> dict[int, Irq]:
    """Numbered lines of /proc/interrupts -> {irq: Irq}. Named lines (NMI, LOC, ...) are
    skipped; so are lines whose chip field is missing (shutdown descriptors)."""
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    out = {}
    for line in lines[1:]:
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        irq = int(head)
        fields = rest.split()
        counts = []
        while fields and fields[0].isdigit() and len(counts) < ncpu:
            counts.append(int(fields.pop(0)))
        if not fields:
            continue
        chip = fields.pop(0)
        hwirq, handler = None, ""
        if fields:
            m = re.match(r"^(\d*)-(\S*)$", fields[0])
            if m:
                fields.pop(0)
                hwirq = int(m.group(1)) if m.group(1) else None
                handler = m.group(2)
            elif fields[0].isdigit() and len(fields) > 1 and fields[1].startswith("-"):
                hwirq = int(fields.pop(0))
                handler = fields.pop(0)[1:]
        actions = rest.split(handler, 1)[1].strip() if handler and handler in rest else " ".join(fields)
        out[irq] = Irq(irq=irq, chip=chip, hwirq=hwirq, name=handler, actions=actions,
                       counts=counts)
    return out


def decode_remappable(addr_lo: int, data: int) -> dict | None:
    """A remappable-format MSI message -> {"handle", "shv", "sub_handle", "index"};
    None for a compatibility-format (not remapped) message."""
    if not (addr_lo >> 4) & 1 or addr_lo >> 20 != 0xFEE:
        return None
    h = ((addr_lo >> 5) & 0x7FFF) | (((addr_lo >> 2) & 1) << 15)
    shv = bool((addr_lo >> 3) & 1)
    sub = data & 0xFFFF
    return {"handle": h, "shv": shv, "sub_handle": sub if shv else 0,
            "index": h + sub if shv else h}


def parse_msix_table(raw: bytes, count: int) -> list[tuple[int, int, int, int]]:
    return [struct.unpack_from("<IIII", raw, 16 * i) for i in range(min(count, len(raw) // 16))]


@register
class InterruptsSource(Source):
    name = "interrupts"
    order = 40
    items = ("vectors", "vectors.irte_index", "msix-table", "units.ir_enabled")

    def collect(self, host: Host) -> None:
        sr = host.sysroot
        text = sr.try_text(PROC_INTERRUPTS)
        if text is not None:
            host.irqs = parse_proc_interrupts(text)
        # /sys/kernel/irq/<n>: authoritative per-irq chip and hwirq when present
        for n in sr.listdir(SYS_IRQ):
            if not n.isdigit():
                continue
            irq = host.irqs.setdefault(int(n), Irq(irq=int(n)))
            d = f"{SYS_IRQ}/{n}"
            chip = sr.try_text(f"{d}/chip_name")
            if chip:
                irq.chip = chip
            hw = sr.try_text(f"{d}/hwirq")
            if hw and hw.isdigit():
                irq.hwirq = int(hw)
            irq.actions = sr.try_text(f"{d}/actions") or irq.actions
            irq.name = sr.try_text(f"{d}/name") or irq.name
        if text is None and not host.irqs:
            host.note("vectors", "absent", self.name, f"{PROC_INTERRUPTS} and {SYS_IRQ} unreadable")
        self.infer_ir(host)
        notes_irte, msix_notes = [], []
        for dev in host.devices.values():
            for n in sr.listdir(f"{dev.path}/msi_irqs"):
                if n.isdigit():
                    dev.msi_irqs[int(n)] = sr.try_text(f"{dev.path}/msi_irqs/{n}") or ""
            if not host.wants(dev):
                continue
            self.device_vectors(host, dev, notes_irte, msix_notes)
        if host.irqs:
            host.note("vectors", "captured", self.name,
                      f"{PROC_INTERRUPTS}, {SYS_IRQ}, <dev>/msi_irqs, MSI/MSI-X capabilities")
        if notes_irte:
            host.note("vectors.irte_index", "partial", self.name, "; ".join(notes_irte))
        else:
            host.note("vectors.irte_index", "captured", self.name,
                      "remappable MSI address/data (config space, MSI-X table)")
        if msix_notes:
            host.note("msix-table", "absent" if all("refused" in m or "missing" in m
                                                       for m in msix_notes) else "partial",
                      self.name, "; ".join(msix_notes))

    def infer_ir(self, host: Host) -> None:
        """Interrupt remapping is in use when device MSI domains carry the IR- prefix
        (irq_remapping.c:1523). Used only when no register (GSTS.IRES) was read."""
        ir_chips = sorted({i.chip for i in host.irqs.values() if i.chip.startswith("IR-")})
        plain = sorted({i.chip for i in host.irqs.values() if CHIP_RE.match(i.chip)
                        and not i.chip.startswith("IR-")})
        for u in host.units.values():
            if u.ir_enabled is not None:
                continue
            if ir_chips:
                u.ir_enabled = True
                u.ir_enabled_source = f"{self.name}: IR- irq chips ({ir_chips[0]}, ...)"
            elif plain:
                u.ir_enabled = False
                u.ir_enabled_source = f"{self.name}: PCI-MSI chips without IR- prefix"
        if host.units:
            if any(u.ir_enabled_source.startswith(self.name) for u in host.units.values()):
                host.note("units.ir_enabled", "partial", self.name,
                          "inferred from irq chip names (IRES not readable)")

    def device_vectors(self, host: Host, dev: PciDev, notes: list, msix_notes: list) -> None:
        irqs = sorted(dev.msi_irqs)
        by_kind = {"msi": [i for i in irqs if dev.msi_irqs[i] == "msi"],
                   "msix": [i for i in irqs if dev.msi_irqs[i] == "msix"]}
        unit = host.unit_for(dev)
        msi = dev.caps.msi
        if msi and msi.enabled:
            n = 1 << msi.mme
            dec = decode_remappable(msi.addr_lo, msi.data)
            for i in range(n):
                irq = by_kind["msi"][i] if i < len(by_kind["msi"]) else 0
                v = Vector(E.VEC_MSI, i, irq, unit.seq if unit else None,
                           masked=bool(msi.mask >> i & 1), remapped=dec is not None)
                if dec:
                    # multi-MSI: the device ORs i into the data, so the index is handle+sub+i
                    v.irte_index, v.sub_handle = dec["index"] + i, dec["sub_handle"] + i
                dev.vectors.append(v)
        elif by_kind["msi"] and not msi:
            notes.append(f"{dev.bdf}: MSI capability not in the config snapshot")
        msix = dev.caps.msix
        if msix and msix.enabled:
            slots = {}
            for irq in by_kind["msix"]:
                hw = host.irqs.get(irq).hwirq if irq in host.irqs else None
                slots[hw if hw is not None else len(slots)] = irq
            entries = self.read_msix(host, dev, msix, msix_notes)
            for slot in sorted(slots) or range(0):
                v = Vector(E.VEC_MSIX, slot, slots[slot], unit.seq if unit else None)
                if entries is not None and slot < len(entries):
                    lo, hi, data, ctrl = entries[slot]
                    dec = decode_remappable(lo, data)
                    v.masked, v.remapped = bool(ctrl & 1), dec is not None
                    if dec:
                        v.irte_index, v.sub_handle = dec["index"], dec["sub_handle"]
                dev.vectors.append(v)
            if entries is None and slots:
                notes.append(f"{dev.bdf}: MSI-X IRTE handles unknown ({dev.msix_reason})")

    def read_msix(self, host: Host, dev: PciDev, msix: MsixCap, notes: list):
        bir = msix.table_bir
        path = f"{dev.path}/resource{bir}"
        if bir >= len(dev.resources) or not dev.resources[bir][1]:
            dev.msix_reason = f"msix table: BAR{bir} not assigned"
        elif not host.sysroot.exists(path):
            dev.msix_reason = f"msix table: {path} missing"
        else:
            try:
                raw = host.sysroot.map_read(path, msix.table_offset, 16 * msix.size)
                dev.msix_entries = parse_msix_table(raw, msix.size)
                return dev.msix_entries
            except OSError as e:
                hint = {"EPERM": " (kernel lockdown)", "EINVAL": " (region claimed by the "
                        "driver; CONFIG_IO_STRICT_DEVMEM)", "EACCES": " (not root)"}
                dev.msix_reason = (f"msix table: resource{bir} mmap refused: {errno_text(e)}"
                                   f"{hint.get(errno_text(e), '')}")
        notes.append(f"{dev.bdf}: {dev.msix_reason}")
        return None
