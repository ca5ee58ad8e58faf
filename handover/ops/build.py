"""From a read host (handover.host) to a keepalive State, with provenance.

``select_devices`` applies the keepalive rules (vfio-pci only, whole IOMMU groups);
``build_state`` turns the kept devices, their units, vectors, context entries, domains,
IRTEs and the memory the next kernel must not reuse into records, and says for every item
which source it came from, or why it could not be captured.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass, field

from .. import __version__
from ..errors import HandoverError
from ..formats import enums as E
from ..formats.enums import ITEMS
from ..formats.model import State, StateBuilder
from ..host.base import ContextEntry, DomainWalk, Host, Note, PciDev, Unit
from ..host.pci import bar_raw, normalize_bdf, sbdf_of
from ..formats.token import hash_token

ADDR_MASK = 0x000F_FFFF_FFFF_F000
IOMMU_FREE_DRIVERS = (None, "pcieport")   # bridges may share a group with kept devices

PI_DESC_REASON = ("posted-interrupt descriptors live in KVM's vCPU memory; no kernel "
                  "interface exposes them (needs the handover kernel interface)")


class RefusedError(HandoverError):
    kind = "refused"


class IncompleteError(HandoverError):
    kind = "incomplete"


@dataclass
class SaveOptions:
    devices: list | None = None          # BDFs; None = every device bound to vfio-pci
    token: str | None = None
    # the salted hash of the token instead of the token (the shutdown save: the token itself
    # is never kept); every kept device gets this one (salt, SHA-256(salt || token))
    token_hash: tuple[bytes, bytes] | None = None
    force: bool = False                  # keep devices that break the rules (with warnings)
    require: str = "available"           # "full": any item not captured is an error
    region_ranges: list = field(default_factory=list)   # [(start, size)] of the pmem region
    generation: int = 1
    alter_bars: list = field(default_factory=list)      # test only: [(bdf, index, start)]
    salt: bytes | None = None            # tests: fixed token salt


# ---------------------------------------------------------------------------------------
def select_devices(host: Host, requested: list | None, force: bool = False):
    """-> (kept devices, warnings). Raises RefusedError naming every refused device and why."""
    if requested:
        bdfs = []
        for r in requested:
            b = normalize_bdf(r)
            if b not in host.devices:
                raise HandoverError(f"{b}: no such PCI device on this host")
            if b not in bdfs:
                bdfs.append(b)
    else:
        bdfs = sorted(b for b, d in host.devices.items() if d.driver == "vfio-pci")
        if not bdfs:
            raise HandoverError("no PCI device is bound to vfio-pci: nothing to keep alive "
                                "(name devices with --device)")
    kept = set(bdfs)
    problems = []
    for b in bdfs:
        d = host.devices[b]
        if d.driver != "vfio-pci":
            problems.append(f"{b}: bound to {d.driver or 'no driver'}, not vfio-pci")
        if d.iommu_group is None:
            problems.append(f"{b}: in no IOMMU group (IOMMU off for it?)")
            continue
        others = sorted(o.bdf for o in host.devices.values()
                        if o.iommu_group == d.iommu_group and o.bdf not in kept
                        and not (o.header_type & 0x7F == 1 and o.driver in IOMMU_FREE_DRIVERS))
        if others:
            problems.append(f"{b}: shares IOMMU group {d.iommu_group} with {', '.join(others)}, "
                            f"which is not being kept alive")
    if problems and not force:
        raise RefusedError("; ".join(problems) + " (use --force to keep it anyway)")
    return [host.devices[b] for b in bdfs], problems


# ---------------------------------------------------------------------------------------
def _meta(host: Host, opts: SaveOptions) -> dict:
    sr = host.sysroot

    live = sr.root == "/"

    def txt(p):
        return sr.try_text(p)

    return {
        "tool": "handover", "tool_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": txt("/proc/sys/kernel/hostname") or (socket.gethostname() if live else None),
        "machine_id": txt("/etc/machine-id"), "boot_id": txt("/proc/sys/kernel/random/boot_id"),
        "kernel_release": txt("/proc/sys/kernel/osrelease") or (os.uname().release if live else None),
        "target_kernel_release": None, "generation": opts.generation,
        "sysroot": sr.root, "sources": list(host.sources_run),
    }


def _unit_record(u: Unit) -> dict:
    vals = u.regs.captured()
    present = 0
    for name in vals:
        present |= E.UNIT_PRESENT_BIT[name]
    flags = 0
    g = u.regs.gsts
    if g is not None:
        flags |= (E.UNIT_F_TE if g >> 31 & 1 else 0) | (E.UNIT_F_IRE if g >> 25 & 1 else 0) \
            | (E.UNIT_F_QIE if g >> 26 & 1 else 0)
    elif u.ir_enabled:
        flags |= E.UNIT_F_IRE
    if (u.regs.irta or 0) >> 11 & 1:
        flags |= E.UNIT_F_X2APIC
    if (u.regs.rtaddr or 0) >> 10 & 1:
        flags |= E.UNIT_F_SM
    return dict(unit=u.seq, segment=u.segment, flags=flags, present=present,
                reg_base=u.reg_base or 0, **vals)


def _bar_flags(res_flags: int, raw: int, index: int) -> int:
    f = 0
    if res_flags & 0x100:
        f |= E.BAR_F_IO
    if res_flags & 0x200:
        f |= E.BAR_F_MEM
    if res_flags & 0x100000:
        f |= E.BAR_F_MEM64
    if res_flags & 0x2000:
        f |= E.BAR_F_PREFETCH
    if res_flags & 0x20000000:
        f |= E.BAR_F_UNSET
    if index == 6 and raw & 1:
        f |= E.BAR_F_ROM_EN
    return f


def bar_rows(dev: PciDev, windows_only: bool = False) -> list[dict]:
    out = []
    for i, (start, end, flags) in enumerate(dev.resources):
        if windows_only and i < 13:
            continue
        if not flags and not end:
            continue
        raw = bar_raw(dev, i)
        out.append(dict(sbdf=dev.sbdf, index=i, flags=_bar_flags(flags, raw, i), start=start,
                        size=(end - start + 1) if end else 0, raw=raw, res_flags=flags))
    return out


def device_fields(dev: PciDev, host: Host, token: str | None, salt: bytes | None,
                  token_hash: tuple[bytes, bytes] | None = None) -> dict:
    caps = dev.caps
    flags = E.DEV_F_KEEPALIVE
    if caps.dsn is not None:
        flags |= E.DEV_F_DSN
    if dev.physfn:
        flags |= E.DEV_F_VF
    sriov = caps.sriov
    if sriov:
        flags |= E.DEV_F_PF | (E.DEV_F_SRIOV_EN if sriov.ctrl & 1 else 0)
    if dev.header_type & 0x7F == 1:
        flags |= E.DEV_F_BRIDGE
    if dev.config_full:
        flags |= E.DEV_F_CONFIG_FULL
    f = dict(sbdf=dev.sbdf, vendor=dev.vendor, device=dev.device,
             subsystem_vendor=dev.subsystem_vendor, subsystem_device=dev.subsystem_device,
             class_=dev.class_, revision=dev.revision, header_type=dev.header_type,
             iommu_group=0xFFFFFFFF if dev.iommu_group is None else dev.iommu_group,
             dsn=caps.dsn or 0,
             num_vfs=sriov.num_vfs if sriov else 0,
             total_vfs=sriov.total_vfs if sriov else 0,
             sriov_ctrl=sriov.ctrl if sriov else 0,
             physfn=sbdf_of(dev.physfn) if dev.physfn else 0xFFFFFFFF,
             driver=(dev.driver or "").encode()[:32])
    u = host.unit_for(dev)
    f["unit"] = u.seq if u else 0xFFFF
    if token or token_hash:
        s, h = hash_token(token, salt) if token else token_hash
        f.update(token_salt=s, token_hash=h)
        flags |= E.DEV_F_TOKEN
    f["flags"] = flags
    return f


#: what the state takes from a patched kernel's live ranges: scalable mode's PASID directory
#: and table, the page tables and the memory they map (the root and context tables come
#: from the unit's registers and the context entries)
LIVE_KINDS = tuple(E.RESERVED_KIND_VALUE[n]
                   for n in ("pasid-dir", "pasid-table", "page-table", "dma-buffer"))


def _context_for(u: Unit, dev: PciDev) -> list[ContextEntry]:
    if not u or not u.contexts:
        return []
    bus, devfn = dev.sbdf >> 8 & 0xFF, dev.sbdf & 0xFF
    return [c for c in u.contexts if c.bus == bus and c.devfn == devfn]


def _domain_of_context(c: ContextEntry, scalable: bool) -> dict:
    if not scalable:
        agaw = c.hi & 7
        return dict(did=c.hi >> 8 & 0xFFFF, tt=c.lo >> 2 & 3, agaw=agaw,
                    gaw=30 + 9 * agaw, flags=0, pgd=c.lo & ADDR_MASK)
    v0, v1, v2 = c.pasid_val0, c.pasid_val1, c.pasid_val2
    pgtt, agaw = v0 >> 6 & 7, v0 >> 2 & 7
    pgd = v2 & ADDR_MASK if pgtt == 1 else (v0 & ADDR_MASK if pgtt in (2, 3) else 0)
    return dict(did=v1 & 0xFFFF, tt=E.DOMAIN_TT_SCALABLE | pgtt, agaw=agaw, gaw=30 + 9 * agaw,
                flags=(1 if pgtt == 1 else 0) | 2, pgd=pgd)


def walk_tables(domain: DomainWalk) -> tuple[set, list]:
    """From a parsed domain_translation_struct: (page-table pages, leaf data ranges)."""
    tables = {domain.pgd & ADDR_MASK} if domain.pgd else set()
    leaves = []
    for _pfn, vals in domain.leaves:
        nz = [(lvl, v) for lvl, v in zip((5, 4, 3, 2, 1), vals) if v]
        if not nz:
            continue
        for _lvl, v in nz[:-1]:
            tables.add(v & ADDR_MASK)
        lvl, v = nz[-1]
        size = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}.get(lvl, 1 << 12)
        leaves.append((v & ADDR_MASK & ~(size - 1), size))
    return tables, leaves


def _merge(ranges):
    out = []
    for s, n in sorted(ranges):
        if out and s <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], s + n - out[-1][0])
        else:
            out.append([s, n])
    return [tuple(r) for r in out]


# ---------------------------------------------------------------------------------------
def build_state(host: Host, devices: list, opts: SaveOptions) -> tuple[State, dict]:
    """-> (state, report). report: see :func:`report_of`."""
    b = StateBuilder()
    b.meta = _meta(host, opts)
    notes = dict(host.notes)
    kept_units = {}
    for u in sorted(host.units.values(), key=lambda x: x.seq):
        b.add("units", **_unit_record(u))
        kept_units[u.seq] = u
    alter = {(normalize_bdf(bdf), idx): start for bdf, idx, start in opts.alter_bars}
    bridges_done = set()
    reserved = []   # (start, size, kind, unit)
    vectors_by_unit: dict = {}
    for dev in devices:
        u = host.unit_for(dev)
        b.add_device(config=dev.config, **device_fields(dev, host, opts.token, opts.salt,
                                                        opts.token_hash))
        for row in bar_rows(dev):
            key = (dev.bdf, row["index"])
            if key in alter:
                row["start"] = alter.pop(key)
            b.add("bars", **row)
        for depth, br in enumerate(dev.upstream):
            bd = host.devices.get(br)
            cmd = int.from_bytes(bd.config[4:6], "little") if bd and len(bd.config) >= 6 else 0
            b.add("bridges", sbdf=dev.sbdf, depth=depth, command=cmd, bridge=sbdf_of(br))
            if bd and br not in bridges_done:
                bridges_done.add(br)
                for row in bar_rows(bd, windows_only=True):
                    b.add("bars", **row)
        for v in dev.vectors:
            fl = E.VEC_F_ENABLED if v.enabled else 0
            if v.masked:
                fl |= E.VEC_F_MASKED
            if v.remapped is not None:
                fl |= E.VEC_F_MSG_KNOWN | (E.VEC_F_REMAPPED if v.remapped else 0)
            if v.irte_index is not None:
                fl |= E.VEC_F_IRTE_KNOWN
                vectors_by_unit.setdefault(v.unit, set()).add(v.irte_index)
                vu = kept_units.get(v.unit)
                irte = vu.irtes.get(v.irte_index) if vu and vu.irtes else None
                if irte and irte[0] >> 15 & 1:   # IM: a posted-format IRTE
                    fl |= E.VEC_F_POSTED
            b.add("vectors", sbdf=dev.sbdf, unit=0xFFFF if v.unit is None else v.unit,
                  kind=v.kind, flags=fl, vector=v.vector, irte_index=v.irte_index or 0,
                  sub_handle=v.sub_handle or 0, irq=v.irq or 0)
        # DMA remapping: context entries, domains, tables. A patched kernel lists every range
        # the device's translation uses, empty page tables too (live_ranges); else the
        # tables are those on the paths to the leaves debugfs shows
        kh = host.kernel_handover
        live = (kh.live_ranges or {}).get(dev.bdf) if kh is not None else None
        if u is not None and live is not None:
            reserved += [(start, size, kind, u.seq) for kind, start, size in live
                         if kind in LIVE_KINDS]
        if u is not None and u.contexts is not None:
            scalable = bool((u.regs.rtaddr or 0) >> 10 & 1)
            for c in _context_for(u, dev):
                dom = _domain_of_context(c, scalable)
                pasid = c.pasid if c.pasid is not None else 0
                b.add("contexts", sbdf=dev.sbdf, pasid=pasid, unit=u.seq, did=dom["did"],
                      flags=(E.CTX_F_SM | E.CTX_F_PASID) if scalable else 0,
                      root_lo=c.root_lo, root_hi=c.root_hi, lo=c.lo, hi=c.hi,
                      pasid_val0=c.pasid_val0, pasid_val1=c.pasid_val1,
                      pasid_val2=c.pasid_val2)
                if dev.domain and dev.domain.pgd and dev.domain.pasid in (None, pasid):
                    dom["pgd"] = dev.domain.pgd
                b._rows["domains"] = [r for r in b._rows["domains"]
                                      if not (r[0] == u.seq and r[1] == dom["did"])]
                b.add("domains", unit=u.seq, **dom)
                for ptr in (c.root_lo, c.root_hi):
                    if ptr & 1:
                        reserved.append((ptr & ADDR_MASK, 0x1000, 2, u.seq))
                if scalable and c.lo & 1:
                    pdts = c.lo >> 9 & 7
                    reserved.append((c.lo & ADDR_MASK, max(0x1000, 8 << (pdts + 7)), 3, u.seq))
                if dom["pgd"] and dom["tt"] & 0x7F != 2 and not dev.domain and live is None:
                    reserved.append((dom["pgd"], 0x1000, 5, u.seq))
            if dev.domain and live is None:
                tables, leaves = walk_tables(dev.domain)
                reserved += [(t, 0x1000, 5, u.seq) for t in tables]
                reserved += [(s, n, 10, u.seq) for s, n in _merge(leaves)]
    # IRTEs of the kept devices (by source-id or referenced by a kept vector)
    sids = {d.sbdf & 0xFFFF for d in devices}
    irte_count = 0
    for u in kept_units.values():
        if u.irtes is None:
            continue
        want = vectors_by_unit.get(u.seq, set())
        for idx, (lo, hi) in sorted(u.irtes.items()):
            if idx in want or (hi & 0xFFFF) in sids:
                b.add("irtes", unit=u.seq, index=idx, lo=lo, hi=hi)
                irte_count += 1
    # unit-wide structures
    for u in kept_units.values():
        rt = u.regs.rtaddr
        root = (rt & ADDR_MASK) if rt else u.root_table
        if root and (u.dma_enabled or u.dma_enabled is None):
            reserved.append((root, 0x1000, 1, u.seq))
        irta = u.regs.irta
        if irta:
            reserved.append((irta & ADDR_MASK, 16 << ((irta & 0xF) + 1), 6, u.seq))
        elif u.ir_table:
            reserved.append((u.ir_table, 1 << 20, 6, u.seq))
        iqa = u.regs.iqa
        if iqa:
            reserved.append((iqa & ADDR_MASK, 0x1000 << (iqa & 7), 8, u.seq))
    for start, size in opts.region_ranges:
        reserved.append((start, size, 9, 0xFFFF))
    for r in sorted(set(reserved)):
        b.add("reserved", start=r[0], size=r[1], kind=r[2], unit=r[3])

    # provenance and absent items
    any_unit = bool(kept_units)

    def absent(item, fallback):
        n = notes.get(item)
        reason = n.reason if n and n.status != "captured" else None
        src = n.source if n else ""
        b.mark_absent(item, reason or fallback, src)

    if not any_unit and "units" in notes and notes["units"].status == "absent":
        absent("units", "no IOMMU unit found")
    if not any(u.contexts is not None for u in kept_units.values()):
        absent("contexts", "context entries not readable")
    if not any(u.contexts is not None for u in kept_units.values()):
        absent("domains", "domains not readable (no context entries)")
    if not any(u.irtes is not None for u in kept_units.values()):
        absent("irtes", "IR table not readable")
    if kept_units and all(u.regs.cap is not None and not u.regs.cap >> 59 & 1
                          for u in kept_units.values()):
        notes["pi_descs"] = Note("captured", "intel-iommu-sysfs",
                                 detail="none: no unit supports posted interrupts (CAP.PI clear)")
    else:
        b.mark_absent("pi_descs", PI_DESC_REASON, "none")
    unknown = [f"{r} of {u.name}" for u in kept_units.values() for r in ("rtaddr", "irta", "iqa")
               if u.regs.get(r) is None]
    if not reserved:
        b.mark_absent("reserved", "no table address readable (" + ", ".join(unknown or ["none"])
                      + "); region address unknown", "collect")
    elif unknown:
        notes["reserved"] = Note("partial", "collect", reason="not readable: " + ", ".join(unknown))
    for item in ITEMS:
        if item not in b.absent:
            b.provenance[item] = (notes.get(item) or Note("captured", "collect")).as_dict()
    for k, n in notes.items():
        if k not in ITEMS:
            b.provenance[k] = n.as_dict()
    # per-device notes that matter for the kept set
    for dev in devices:
        if dev.msix_reason:
            b.provenance[f"msix-table.{dev.bdf}"] = Note(
                "absent", "interrupts", reason=dev.msix_reason).as_dict()
        if not dev.config_full:
            b.provenance[f"config.{dev.bdf}"] = Note(
                "partial", "pci-sysfs",
                reason=f"{len(dev.config)} bytes of config space (beyond 64 needs "
                       f"CAP_SYS_ADMIN)").as_dict()
    if not opts.region_ranges:
        b.provenance["reserved.region"] = Note(
            "absent", "collect",
            reason="physical address of the region unknown (a file, or not root)").as_dict()
    if alter:
        raise HandoverError(f"--test-alter-bar: no such saved BAR: "
                            f"{', '.join(f'{k[0]} #{k[1]}' for k in alter)}")
    st = b.build()
    report = report_of(st, devices, notes)
    if opts.require == "full" and report["not_captured"]:
        raise IncompleteError("--require full: not captured: " + "; ".join(
            f"{k}: {v}" for k, v in sorted(report["not_captured"].items())))
    return st, report


def report_of(st: State, devices: list, notes: dict) -> dict:
    """What was captured from where, and what was not (and why)."""
    captured, missing = {}, {}
    for k, v in sorted(st.provenance.items()):
        if not isinstance(v, dict):
            continue
        if v.get("status") == "captured":
            captured[k] = v.get("source", "")
        elif k not in ("kernel-handover",):  # an interface absent on stock kernels is not an item
            missing[k] = f"{v.get('status')}: {v.get('reason') or v.get('detail') or ''}".strip()
    return {"devices": [d.bdf for d in devices],
            "counts": {a: len(st.table(a)) for a in ITEMS},
            "captured": captured, "not_captured": missing, "absent": sorted(st.absent)}
