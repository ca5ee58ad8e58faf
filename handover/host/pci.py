"""PCI devices from sysfs (drivers/pci/pci-sysfs.c, Linux 6.12).

Per device under /sys/bus/pci/devices/<bdf>: ``vendor device subsystem_vendor
subsystem_device class revision`` (hex text), ``config`` (binary; bytes past 64 need
CAP_SYS_ADMIN), ``resource`` (lines ``0x%016llx 0x%016llx 0x%016llx``: start end flags, by
resource index), links ``driver iommu_group iommu physfn virtfnN``. The capability lists
of ``config`` are walked for MSI, MSI-X (table/PBA location), DSN and SR-IOV.
"""

from __future__ import annotations

import re
import struct

from ..errors import HandoverError
from ..formats.descriptions import BDF_PATTERN, bdf_str, parse_bdf
from .base import Caps, Host, MsiCap, MsixCap, PciDev, Source, SriovCap, register

PCI_DEVICES = "/sys/bus/pci/devices"
BDF_RE = re.compile(rf"^{BDF_PATTERN}$")

CAP_MSI, CAP_PCIE, CAP_MSIX = 0x05, 0x10, 0x11
ECAP_DSN, ECAP_SRIOV = 0x0003, 0x0010


def sbdf_of(bdf: str) -> int:
    """'0000:00:03.0' -> sbdf (the one BDF parser: formats.descriptions.parse_bdf)."""
    return parse_bdf(bdf)


def normalize_bdf(text: str) -> str:
    """A user's PCI address ('00:03.0', '0000:00:03.0') in sysfs spelling; HandoverError
    when it is not one."""
    try:
        return bdf_str(parse_bdf(text))
    except ValueError as e:
        raise HandoverError(str(e)) from None


def parse_resource(text: str) -> list[tuple[int, int, int]]:
    """sysfs ``resource``: one (start, end, flags) per line, by resource index."""
    out = []
    for n, line in enumerate(text.splitlines()):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3:
            raise ValueError(f"resource line {n + 1}: expected 3 fields, got {line!r}")
        out.append(tuple(int(p, 16) for p in parts))
    return out


def _u8(c: bytes, o: int) -> int:
    return c[o] if o < len(c) else 0


def _u16(c: bytes, o: int) -> int:
    return struct.unpack_from("<H", c, o)[0] if o + 2 <= len(c) else 0


def _u32(c: bytes, o: int) -> int:
    return struct.unpack_from("<I", c, o)[0] if o + 4 <= len(c) else 0


def walk_caps(config: bytes) -> Caps:
    """Decode the capabilities this tool needs from a config-space snapshot (every
    capability found goes into ``cap_ids`` / ``ecap_ids`` with its offset). Bounded against
    loops (48 standard, 960 extended steps) and truncated snapshots."""
    caps = Caps()
    c = config
    if len(c) < 0x40 or not (_u16(c, 0x06) & 0x10):
        return caps
    pos, seen = _u8(c, 0x34) & 0xFC, 0
    while pos >= 0x40 and seen < 48:
        if pos + 2 > len(c):
            caps.truncated_at = pos
            break
        cid, nxt = c[pos], c[pos + 1] & 0xFC
        caps.cap_ids.append((cid, pos))
        if cid == CAP_MSI and pos + 0x10 <= len(c):
            ctrl = _u16(c, pos + 2)
            is64 = bool(ctrl & 0x80)
            caps.msi = MsiCap(
                offset=pos, ctrl=ctrl, enabled=bool(ctrl & 1), mmc=(ctrl >> 1) & 7,
                mme=(ctrl >> 4) & 7, is64=is64, maskable=bool(ctrl & 0x100),
                addr_lo=_u32(c, pos + 4), addr_hi=_u32(c, pos + 8) if is64 else 0,
                data=_u16(c, pos + (0x0C if is64 else 0x08)),
                mask=_u32(c, pos + (0x10 if is64 else 0x0C)) if ctrl & 0x100 else 0)
        elif cid == CAP_MSIX and pos + 12 <= len(c):
            ctrl, table, pba = _u16(c, pos + 2), _u32(c, pos + 4), _u32(c, pos + 8)
            caps.msix = MsixCap(
                offset=pos, ctrl=ctrl, size=(ctrl & 0x7FF) + 1, enabled=bool(ctrl & 0x8000),
                masked=bool(ctrl & 0x4000), table_bir=table & 7, table_offset=table & ~7,
                pba_bir=pba & 7, pba_offset=pba & ~7)
        elif cid == CAP_PCIE:
            caps.pcie_type = (_u16(c, pos + 2) >> 4) & 0xF
        pos, seen = nxt, seen + 1
    if len(c) > 0x100:
        pos, seen = 0x100, 0
        while pos and pos + 4 <= len(c) and seen < 960:
            hdr = _u32(c, pos)
            if hdr == 0 or hdr == 0xFFFFFFFF:
                break
            eid, nxt = hdr & 0xFFFF, (hdr >> 20) & 0xFFC
            caps.ecap_ids.append((eid, pos))
            if eid == ECAP_DSN and pos + 12 <= len(c):
                caps.dsn, caps.dsn_offset = _u32(c, pos + 4) | _u32(c, pos + 8) << 32, pos
            elif eid == ECAP_SRIOV and pos + 0x3C <= len(c):
                caps.sriov = SriovCap(
                    offset=pos, ctrl=_u16(c, pos + 8), total_vfs=_u16(c, pos + 0x0E),
                    num_vfs=_u16(c, pos + 0x10), vf_offset=_u16(c, pos + 0x14),
                    vf_stride=_u16(c, pos + 0x16), vf_device=_u16(c, pos + 0x1A),
                    vf_bars=[_u32(c, pos + 0x24 + 4 * i) for i in range(6)])
            if nxt < 0x100:
                break
            pos, seen = nxt, seen + 1
    return caps


def bar_raw(dev: PciDev, index: int) -> int:
    """The BAR register(s) behind resource ``index`` as read from config space (a 64-bit
    BAR gives the pair). 0 when not in the snapshot."""
    c = dev.config
    flags = dev.resources[index][2] if index < len(dev.resources) else 0
    is64 = bool(flags & 0x100000)
    if index < 6 and dev.header_type & 0x7F == 0:
        off = 0x10 + 4 * index
    elif index == 6:
        off = 0x30 if dev.header_type & 0x7F == 0 else 0x38
        return _u32(c, off)
    elif 7 <= index <= 12 and dev.caps.sriov is not None:
        bars = dev.caps.sriov.vf_bars
        i = index - 7
        lo = bars[i]
        return lo | (bars[i + 1] << 32 if is64 and i + 1 < 6 else 0)
    elif index < 2 and dev.header_type & 0x7F == 1:
        off = 0x10 + 4 * index
    else:
        return 0
    lo = _u32(c, off)
    return lo | (_u32(c, off + 4) << 32 if is64 and off + 8 <= 0x28 else 0)


def upstream_of(path: str) -> list[str]:
    """Bridge BDFs above a device, nearest first, from its canonical sysfs path
    (/sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0)."""
    comps = [p for p in path.split("/") if BDF_RE.match(p)]
    return list(reversed(comps[:-1]))


#: PCI Express device/port types (PCI_EXP_FLAGS 7:4) that alias the requester ID of what
#: is below them (drivers/pci/search.c pci_for_each_dma_alias)
PCIE_ALIASING = {7: "PCIe-to-PCI bridge", 8: "PCI-to-PCIe bridge"}


def bridge_kind(dev: PciDev) -> str:
    """What a bridge on a device's path is, for DMA aliasing: a PCIe port type, a
    "conventional PCI bridge" (no PCI Express capability in a readable config), or
    "unknown" (config space past 64 bytes not readable: not root)."""
    from ..formats.enums import PCIE_TYPE

    if dev.caps.pcie_type is not None:
        return PCIE_TYPE.get(dev.caps.pcie_type, f"PCIe type {dev.caps.pcie_type}")
    if len(dev.config) <= 0x40:
        return "unknown"
    return "conventional PCI bridge"


def dma_alias_bridges(host: Host, dev: PciDev) -> list[tuple[str, str]]:
    """[(bridge BDF, kind)] of the bridges above ``dev`` through which its DMA reaches the
    IOMMU with another requester ID (the bridge's, or its secondary bus's): a PCIe-to-PCI
    (or PCI-to-PCIe) bridge, or a conventional PCI bridge, as pci_for_each_dma_alias walks
    them. Root ports, switch ports and a bridge whose kind is unknown are not listed."""
    out = []
    for b in dev.upstream:
        bd = host.devices.get(b)
        if bd is None:
            continue
        kind = bridge_kind(bd)
        if bd.caps.pcie_type in PCIE_ALIASING or kind == "conventional PCI bridge":
            out.append((b, kind))
    return out


@register
class PciSource(Source):
    name = "pci-sysfs"
    order = 10
    items = ("devices", "bars", "bridges", "devices.dsn", "devices.config")

    def collect(self, host: Host) -> None:
        sr = host.sysroot
        names = [n for n in sr.listdir(PCI_DEVICES) if BDF_RE.match(n)]
        if not names:
            host.note("devices", "absent", self.name, f"no PCI devices under {PCI_DEVICES}")
            return
        short_config = []
        for bdf in names:
            dev = self.read_device(host, bdf)
            host.devices[bdf] = dev
            if dev.config and len(dev.config) <= 64:
                short_config.append(bdf)
        host.note("devices", "captured", self.name, f"{len(names)} devices from {PCI_DEVICES}")
        host.note("bars", "captured", self.name, "sysfs resource + BAR registers from config")
        host.note("bridges", "captured", self.name, "upstream path from the sysfs device path")
        if short_config:
            host.note("devices.config", "partial", self.name,
                      "config space beyond 64 bytes needs CAP_SYS_ADMIN (not root?): "
                      + ", ".join(short_config))
        else:
            host.note("devices.config", "captured", self.name, "sysfs config")

    def read_device(self, host: Host, bdf: str) -> PciDev:
        sr = host.sysroot
        base = f"{PCI_DEVICES}/{bdf}"
        dev = PciDev(bdf=bdf, sbdf=sbdf_of(bdf))
        dev.path = sr.resolve(base)
        for attr in ("vendor", "device", "subsystem_vendor", "subsystem_device", "class",
                     "revision"):
            v = sr.try_int(f"{base}/{attr}", 16)
            if v is not None:
                setattr(dev, "class_" if attr == "class" else attr, v)
        try:
            dev.config = sr.read_bytes(f"{base}/config", 4096)
        except OSError:
            dev.config = b""
        c = dev.config
        if len(c) >= 0x40:
            dev.header_type = c[0x0E]
            # sysfs text wins; config fills what sysfs lacked
            dev.vendor = dev.vendor or _u16(c, 0)
            dev.device = dev.device or _u16(c, 2)
            dev.revision = dev.revision or c[8]
        dev.caps = walk_caps(c)
        is_pcie = dev.caps.pcie_type is not None
        dev.config_full = len(c) >= (4096 if is_pcie else 256)
        text = sr.try_text(f"{base}/resource")
        dev.resources = parse_resource(text) if text else []
        dev.driver = sr.link_name(f"{base}/driver")
        g = sr.link_name(f"{base}/iommu_group")
        dev.iommu_group = int(g) if g and g.isdigit() else None
        dev.iommu = sr.link_name(f"{base}/iommu")
        dev.physfn = sr.link_name(f"{base}/physfn")
        entries = sr.listdir(dev.path)
        dev.virtfns = sorted((sr.link_name(f"{dev.path}/{n}") for n in entries
                              if n.startswith("virtfn") and n[6:].isdigit()),
                             key=lambda x: x or "")
        dev.upstream = upstream_of(dev.path)
        return dev
