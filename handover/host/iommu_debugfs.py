"""Intel IOMMU debugfs (drivers/iommu/intel/debugfs.c, CONFIG_INTEL_IOMMU_DEBUGFS).

/sys/kernel/debug/iommu/intel/: ``iommu_regset``, ``dmar_translation_struct``,
``ir_translation_struct`` and per device ``<bdf>/domain_translation_struct``. The parsers
below accept exactly the printf formats of Linux 6.12's drivers/iommu/intel/debugfs.c
and raise ValueError, naming the line, on anything else. Debian's stock kernel
has no such directory: the items are then noted absent with that reason.
"""

from __future__ import annotations

import errno
import re

from .base import ContextEntry, DomainWalk, Host, Note, Source, errno_text, register

DEBUGFS = "/sys/kernel/debug"
INTEL = f"{DEBUGFS}/iommu/intel"

_HEX = "[0-9a-fA-F]"


class DebugfsFormatError(ValueError):
    pass


def _bad(what: str, n: int, line: str) -> DebugfsFormatError:
    return DebugfsFormatError(f"{what}: line {n}: unexpected text {line[:80]!r}")


# --- iommu_regset ------------------------------------------------------------------------
_RS_HDR = re.compile(rf"^IOMMU: (\S+) Register Base Address: ({_HEX}+)$")
_RS_REG = re.compile(rf"^(\S+) *\t0x({_HEX}{{2,}})\t\t0x({_HEX}{{16}})$")


def parse_regset(text: str) -> dict:
    """-> {unit name: {"base": int, "regs": {"GSTS": v, ...}, "offsets": {"GSTS": 0x1c}}}"""
    out: dict = {}
    cur = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            cur = None
            continue
        m = _RS_HDR.match(line)
        if m:
            cur = out.setdefault(m.group(1), {"base": int(m.group(2), 16), "regs": {},
                                              "offsets": {}})
            continue
        if line.startswith("IOMMU: Invalid base address"):
            continue
        if line.split() == ["Name", "Offset", "Contents"] and cur is not None:
            continue
        m = _RS_REG.match(line)
        if m and cur is not None:
            cur["regs"][m.group(1)] = int(m.group(3), 16)
            cur["offsets"][m.group(1)] = int(m.group(2), 16)
            continue
        raise _bad("iommu_regset", n, line)
    return out


# --- dmar_translation_struct -------------------------------------------------------------
_DT_OFF = re.compile(r"^DMA Remapping is not enabled on (\S+)$")
_DT_HDR = re.compile(rf"^IOMMU (\S+): Root Table Address: 0x({_HEX}+)$")
_DT_ROW = re.compile(
    rf"^({_HEX}{{2}}):({_HEX}{{2}})\.([0-7])\t0x({_HEX}{{16}}):0x({_HEX}{{16}})\t"
    rf"0x({_HEX}{{16}}):0x({_HEX}{{16}})\t(-?\d+) *\t"
    rf"0x({_HEX}{{16}}):0x({_HEX}{{16}}):0x({_HEX}{{16}})$")
_DT_COLS = "B.D.F\tRoot_entry\t\t\t\tContext_entry\t\t\t\tPASID\tPASID_table_entry"


def parse_dmar_translation(text: str) -> dict:
    """-> {unit: {"enabled": bool, "root": int|None, "entries": [ContextEntry]}}; an entry has
    bus, devfn, root_hi, root_lo, hi, lo, pasid (None for legacy -1), pasid_val2/1/0."""
    out: dict = {}
    cur = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            cur = None
            continue
        m = _DT_OFF.match(line)
        if m:
            out[m.group(1)] = {"enabled": False, "root": None, "entries": []}
            cur = None
            continue
        m = _DT_HDR.match(line)
        if m:
            cur = out[m.group(1)] = {"enabled": True, "root": int(m.group(2), 16), "entries": []}
            continue
        if line == _DT_COLS and cur is not None:
            continue
        m = _DT_ROW.match(line)
        if m and cur is not None:
            g = m.groups()
            pasid = int(g[7])
            cur["entries"].append(ContextEntry(
                bus=int(g[0], 16), devfn=int(g[1], 16) << 3 | int(g[2]),
                root_hi=int(g[3], 16), root_lo=int(g[4], 16),
                hi=int(g[5], 16), lo=int(g[6], 16),
                pasid=None if pasid < 0 else pasid,
                pasid_val2=int(g[8], 16), pasid_val1=int(g[9], 16),
                pasid_val0=int(g[10], 16)))
            continue
        raise _bad("dmar_translation_struct", n, line)
    return out


# --- domain_translation_struct -----------------------------------------------------------
_DM_HDR = re.compile(rf"^Device ({_HEX}{{4}}):({_HEX}{{2}}):({_HEX}{{2}})\.([0-7]) "
                     rf"(?:with pasid ({_HEX}+) )?@0x({_HEX}+)$")
_DM_COLS = re.compile(r"^IOVA_PFN\s+\tPML5E\s+\tPML4E\s+\tPDPE\s+\tPDE\s+\tPTE$")
_DM_ROW = re.compile(rf"^0x({_HEX}{{13,}}) \|\t(0x{_HEX}{{16}}(?:\t0x{_HEX}{{16}}){{2,4}})$")


def parse_domain_translation(text: str) -> list[DomainWalk]:
    """-> [DomainWalk(device "0000:00:03.0", pasid, pgd, leaves [(iova_pfn, (pml5e, pml4e,
    pdpe, pde, pte))])] (missing levels 0)."""
    out: list = []
    cur = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _DM_HDR.match(line)
        if m:
            g = m.groups()
            cur = DomainWalk(device=f"{g[0]}:{g[1]}:{g[2]}.{g[3]}".lower(),
                             pasid=int(g[4], 16) if g[4] is not None else None,
                             pgd=int(g[5], 16))
            out.append(cur)
            continue
        if _DM_COLS.match(line) and cur is not None:
            continue
        m = _DM_ROW.match(line)
        if m and cur is not None:
            vals = [int(v, 16) for v in m.group(2).split("\t")]
            vals += [0] * (5 - len(vals))
            cur.leaves.append((int(m.group(1), 16), tuple(vals)))
            continue
        raise _bad("domain_translation_struct", n, line)
    return out


# --- ir_translation_struct ---------------------------------------------------------------
_IR_SUP = re.compile(r"^Remapped Interrupt supported on IOMMU: (\S+)$")
_PI_SUP = re.compile(r"^Posted Interrupt supported on IOMMU: (\S+)$")
_IR_ADDR = re.compile(rf"^ IR table address:({_HEX}+)$")
_IR_COLS = " Entry SrcID   DstID    Vct IRTE_high\t\tIRTE_low"
_PI_COLS = " Entry SrcID   PDA_high PDA_low  Vct IRTE_high\t\tIRTE_low"
_IR_ROW = re.compile(rf"^ (\d+) *({_HEX}{{2}}):({_HEX}{{2}})\.([0-7]) ({_HEX}{{8}}) "
                     rf"({_HEX}{{2}})  ({_HEX}{{16}})\t({_HEX}{{16}})$")
_PI_ROW = re.compile(rf"^ (\d+) *({_HEX}{{2}}):({_HEX}{{2}})\.([0-7]) ({_HEX}{{8}}) "
                     rf"({_HEX}{{8}}) ({_HEX}{{2}})  ({_HEX}{{16}})\t({_HEX}{{16}})$")


def parse_ir_translation(text: str) -> dict:
    """-> {unit: {"enabled": bool|None, "table": int|None, "posted_supported": bool,
                  "entries": {index: (lo, hi)}}} with remapped and posted entries merged.
    The decoded columns are checked against the raw words they were printed from."""
    out: dict = {}
    part, cur = 1, None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            cur = None
            continue
        if line == "****":
            part, cur = 2, None
            continue
        m = _IR_SUP.match(line) if part == 1 else _PI_SUP.match(line)
        if m:
            cur = out.setdefault(m.group(1), {"enabled": None, "table": None,
                                              "posted_supported": False, "entries": {}})
            if part == 2:
                cur["posted_supported"] = True
            continue
        if cur is None:
            raise _bad("ir_translation_struct", n, line)
        m = _IR_ADDR.match(line)
        if m:
            addr = int(m.group(1), 16)
            if part == 1:
                cur["enabled"] = True
            if cur["table"] not in (None, addr):
                raise DebugfsFormatError(f"ir_translation_struct: line {n}: table address "
                                         f"{addr:#x} differs from {cur['table']:#x}")
            cur["table"] = addr
            continue
        if line == "Interrupt Remapping is not enabled":
            if part == 1:
                cur["enabled"] = False
            continue
        if line == (_IR_COLS if part == 1 else _PI_COLS):
            continue
        m = (_IR_ROW if part == 1 else _PI_ROW).match(line)
        if m:
            g = m.groups()
            idx = int(g[0])
            hi, lo = int(g[-2], 16), int(g[-1], 16)
            sid = int(g[1], 16) << 8 | int(g[2], 16) << 3 | int(g[3])
            vec = int(g[-3], 16)
            posted = bool(lo >> 15 & 1)
            ok = (lo & 1) and posted == (part == 2) and (hi & 0xFFFF) == sid \
                and (lo >> 16 & 0xFF) == vec
            if part == 1:
                ok = ok and int(g[4], 16) == lo >> 32
            else:
                ok = ok and int(g[4], 16) == hi >> 32 and int(g[5], 16) == (lo >> 38) << 6
            if not ok:
                raise DebugfsFormatError(f"ir_translation_struct: line {n}: decoded columns "
                                         f"do not match IRTE {hi:016x}:{lo:016x}")
            cur["entries"][idx] = (lo, hi)
            continue
        raise _bad("ir_translation_struct", n, line)
    return out


# --- the source ----------------------------------------------------------------------------
REG_NAMES = {"VER": "ver", "CAP": "cap", "ECAP": "ecap", "GSTS": "gsts", "RTADDR": "rtaddr",
             "IRTA": "irta", "IQA": "iqa", "IQH": "iqh", "IQT": "iqt"}
DEBUGFS_ITEMS = ("units.gsts", "units.rtaddr", "units.irta", "units.iqa", "units.iqh",
                 "units.iqt", "irtes", "contexts", "domains")


def absent_reason(host: Host) -> str | None:
    """Why the intel-iommu debugfs cannot be read here, or None when it can."""
    sr = host.sysroot
    if sr.isdir(INTEL):
        return None
    if not sr.isdir(DEBUGFS) or not sr.listdir(DEBUGFS):
        if sr.exists(DEBUGFS) and DEBUGFS in sr.errors:
            return f"{DEBUGFS}: {sr.errors[DEBUGFS]} (debugfs is root-only)"
        return (f"debugfs not mounted at {DEBUGFS} (mount -t debugfs none {DEBUGFS}); "
                f"stock kernels also lack CONFIG_INTEL_IOMMU_DEBUGFS")
    return f"no intel-iommu debugfs (CONFIG_INTEL_IOMMU_DEBUGFS) at {INTEL}"


@register
class IntelIommuDebugfs(Source):
    name = "intel-iommu-debugfs"
    order = 30
    items = DEBUGFS_ITEMS + ("devices.domain",)

    def _read(self, host: Host, fname: str, items: tuple) -> str | None:
        try:
            return host.sysroot.read_text(f"{INTEL}/{fname}")
        except OSError as e:
            why = {errno.EPERM: " (kernel lockdown?)", errno.EACCES: " (not root?)",
                   errno.ENOENT: " (not built: CONFIG_IRQ_REMAP?)"}.get(e.errno, "")
            for it in items:
                host.note(it, "absent", self.name, f"{INTEL}/{fname}: {errno_text(e)}{why}")
            return None

    def collect(self, host: Host) -> None:
        reason = absent_reason(host)
        if reason:
            for it in DEBUGFS_ITEMS:
                host.notes.setdefault(it, Note("absent", self.name, reason=reason))
            return
        text = self._read(host, "iommu_regset", DEBUGFS_ITEMS[:6])
        if text is not None:
            regset = parse_regset(text)
            for name, d in regset.items():
                u = host.units.get(name)
                if u is None:
                    continue
                if u.reg_base is None:
                    u.reg_base = d["base"]
                for kname, attr in REG_NAMES.items():
                    if kname in d["regs"]:
                        v = d["regs"][kname]
                        old = u.regs.get(attr)
                        if old is not None and old != v and attr in ("cap", "ecap"):
                            host.note(f"units.{attr}.{name}", "partial", self.name,
                                      f"debugfs {kname}={v:#x} differs from sysfs {old:#x}")
                        u.regs.set(attr, v)
                        u.reg_source[attr] = self.name
                u.status_from_gsts(self.name)
            for reg in DEBUGFS_ITEMS[:6]:
                attr = reg.split(".")[1]
                missing = [u.name for u in host.units.values() if u.regs.get(attr) is None]
                if missing:
                    host.note(reg, "absent", self.name,
                              f"{attr.upper()} not in {INTEL}/iommu_regset for {', '.join(missing)}")
                else:
                    host.note(reg, "captured", self.name, f"{INTEL}/iommu_regset")
        text = self._read(host, "dmar_translation_struct", ("contexts",))
        if text is not None:
            for name, d in parse_dmar_translation(text).items():
                u = host.units.get(name)
                if u is None:
                    continue
                u.dma_enabled = d["enabled"]
                u.root_table = d["root"]
                u.contexts = d["entries"]
            off = [u.name for u in host.units.values() if u.dma_enabled is False]
            host.note("contexts", "captured", self.name, f"{INTEL}/dmar_translation_struct"
                      + (f" (DMA remapping off on {', '.join(off)})" if off else ""))
        text = self._read(host, "ir_translation_struct", ("irtes",))
        if text is not None:
            for name, d in parse_ir_translation(text).items():
                u = host.units.get(name)
                if u is None:
                    continue
                u.ir_table = d["table"]
                if d["enabled"] is not None:
                    u.ir_enabled = d["enabled"]
                    u.ir_enabled_source = f"{self.name} ir_translation_struct"
                u.irtes = d["entries"]
            host.note("irtes", "captured", self.name, f"{INTEL}/ir_translation_struct")
        self.collect_domains(host)

    def collect_domains(self, host: Host) -> None:
        sr = host.sysroot
        got, failed = [], []
        for bdf, dev in sorted(host.devices.items()):
            path = f"{INTEL}/{bdf}/domain_translation_struct"
            if not host.wants(dev) or not sr.exists(path):
                continue
            try:
                doms = parse_domain_translation(sr.read_text(path))
            except OSError as e:
                failed.append(f"{bdf}: {errno_text(e)}")
                continue
            dev.domain = doms[0] if doms else DomainWalk(device=bdf)
            got.append(bdf)
        if got or failed:
            host.note("domains", "captured" if not failed else "partial", self.name,
                      f"{INTEL}/<bdf>/domain_translation_struct for {', '.join(got) or 'none'}"
                      + (f"; failed: {'; '.join(failed)}" if failed else ""))
        else:
            host.notes.setdefault("domains", Note(
                "partial", self.name,
                reason="no per-device domain_translation_struct; domains come from "
                       "context entries only (page tables not walked)"))
