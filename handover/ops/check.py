"""``handover load``: compare a saved state with the running host, item by item.

Each check gives one verdict::

    {"item": "device 0000:00:03.0 BAR0", "object": "device 0000:00:03.0", "check": "BAR0",
     "status": "match" | "mismatch" | "missing" | "unverified",
     "saved": "...", "host": "...", "detail": "..."}

``missing``: the object is not on this host; ``unverified``: this host (or the saved state)
does not let the item be read, which is reported but does not fail the load. The load
matches only when no verdict is ``mismatch`` or ``missing``.
"""

from __future__ import annotations

from ..formats import descriptions as D
from ..formats import enums as E
from ..formats.descriptions import bdf_str, hx
from ..formats.model import State
from ..host.base import Host
from ..formats.token import check_token

SCHEMA = "handover.load/1"
FAIL = ("mismatch", "missing")


class Verdicts(list):
    def add(self, obj: str, check: str, status: str, saved=None, host=None, detail: str = ""):
        v = {"item": f"{obj} {check}".strip(), "object": obj, "check": check, "status": status}
        if saved is not None:
            v["saved"] = saved
        if host is not None:
            v["host"] = host
        if detail:
            v["detail"] = detail
        self.append(v)
        return v

    def compare(self, obj: str, check: str, saved, host, fmt=str, detail: str = ""):
        if host is None:
            return self.add(obj, check, "unverified", fmt(saved), None,
                            detail or "not readable on this host")
        return self.add(obj, check, "match" if saved == host else "mismatch", fmt(saved),
                        fmt(host), detail)

    @property
    def ok(self) -> bool:
        return not any(v["status"] in FAIL for v in self)


def _h(width=0):
    return lambda v: hx(v, width) if isinstance(v, int) else str(v)


def _dev_name(sbdf: int) -> str:
    return f"device {bdf_str(sbdf)}"


def check_units(st: State, host: Host, out: Verdicts) -> None:
    by_base = {u.reg_base: u for u in host.units.values() if u.reg_base is not None}
    missing_fields = set(st.units.missing_fields())
    for su in st.units:
        name = f"unit dmar{su.unit}"
        hu = by_base.get(su.reg_base)
        if hu is None:
            have = ", ".join(f"{u.name} at {hx(u.reg_base or 0)}" for u in host.units.values())
            out.add(name, "register base", "missing", hx(su.reg_base), None,
                    f"no IOMMU unit at {hx(su.reg_base)} on this host"
                    + (f" (host has {have})" if have else " (host has no IOMMU unit)"))
            continue
        out.add(name, "register base", "match", hx(su.reg_base), hx(hu.reg_base),
                f"host {hu.name}")
        for reg in ("cap", "ecap", "ver"):
            if not su.present & E.UNIT_PRESENT_BIT[reg] or reg in missing_fields:
                out.add(name, reg.upper(), "unverified", None, None, "not in the saved state")
                continue
            out.compare(name, reg.upper(), getattr(su, reg), hu.regs.get(reg), _h())
        # interrupt remapping: enabled, same table
        saved_ire = bool(su.flags & E.UNIT_F_IRE)
        if hu.ir_enabled is None:
            out.add(name, "interrupt remapping", "unverified", "on" if saved_ire else "off",
                    None, "IRES not readable on this host")
        else:
            out.add(name, "interrupt remapping",
                    "match" if hu.ir_enabled == saved_ire else "mismatch",
                    "on" if saved_ire else "off", "on" if hu.ir_enabled else "off",
                    hu.ir_enabled_source)
        if su.present & E.UNIT_PRESENT_BIT["irta"]:
            host_irta = hu.regs.irta
            if host_irta is None and hu.ir_table is not None:
                out.compare(name, "IR table address", su.irta & ~0xFFF, hu.ir_table, _h(),
                            "host address from ir_translation_struct")
            else:
                out.compare(name, "IRTA", su.irta, host_irta, _h(),
                            "" if host_irta is not None else
                            "IRTA not readable on this host (no debugfs or kernel interface)")
        else:
            out.add(name, "IRTA", "unverified", None,
                    hx(hu.regs.irta) if hu.regs.irta is not None else None,
                    "IRTA was not captured at save")
        if su.present & E.UNIT_PRESENT_BIT["rtaddr"] and su.flags & E.UNIT_F_TE:
            out.compare(name, "RTADDR", su.rtaddr, hu.regs.rtaddr, _h())
        check_unit_modes(name, su, hu, out)


#: why a mode that differs between the saved unit and the host's cannot be carried
MODE_CONSEQUENCE = {
    "translation mode": "the kept context entries cannot be adopted in the other mode: the "
                        "kept devices' DMA would be translated wrongly",
    "interrupt remapping mode": "the kept IR table would misroute interrupts",
}


def check_unit_modes(name: str, su, hu, out: Verdicts) -> None:
    """The saved unit's translation mode (legacy/scalable) and interrupt-remapping mode
    (xAPIC / x2APIC EIM) against the host unit's, each only when the saved unit used it
    (TE for translation, IRE for interrupt remapping)."""
    saved = D.unit_modes(su.flags, su.present, su.rtaddr, su.irta)
    checks = []
    if su.flags & E.UNIT_F_TE:
        checks.append(("translation mode", saved["translation_mode"], hu.regs.rtaddr,
                       D.rtaddr_mode, "RTADDR"))
    if su.flags & E.UNIT_F_IRE:
        checks.append(("interrupt remapping mode", saved["ir_mode"], hu.regs.irta,
                       D.irta_mode, "IRTA"))
    for check, s, reg, mode_of, reg_name in checks:
        if s is None:
            out.add(name, check, "unverified", None,
                    None if reg is None else mode_of(reg),
                    f"not recorded in the saved state ({reg_name} not captured at save)")
        elif reg is None:
            out.add(name, check, "unverified", s, None,
                    f"{reg_name} not readable on this host (no debugfs or kernel interface)")
        else:
            h = mode_of(reg)
            out.add(name, check, "match" if h == s else "mismatch", s, h,
                    "" if h == s else MODE_CONSEQUENCE[check])


def check_devices(st: State, host: Host, token: str | None, out: Verdicts) -> None:
    units = {u.reg_base: u for u in host.units.values()}
    saved_units = {u.unit: u for u in st.units}
    for d in st.devices:
        obj = _dev_name(d.sbdf)
        hd = host.devices.get(bdf_str(d.sbdf))
        if hd is None:
            out.add(obj, "present", "missing", bdf_str(d.sbdf), None,
                    f"no PCI device at {bdf_str(d.sbdf)} on this host")
            continue
        out.add(obj, "present", "match", bdf_str(d.sbdf), hd.bdf)
        out.compare(obj, "vendor:device", f"{d.vendor:04x}:{d.device:04x}",
                    f"{hd.vendor:04x}:{hd.device:04x}")
        out.compare(obj, "subsystem", f"{d.subsystem_vendor:04x}:{d.subsystem_device:04x}",
                    f"{hd.subsystem_vendor:04x}:{hd.subsystem_device:04x}")
        out.compare(obj, "class", f"{d.class_:06x}", f"{hd.class_:06x}")
        out.compare(obj, "revision", f"{d.revision:02x}", f"{hd.revision:02x}")
        host_dsn = hd.caps.dsn
        if d.flags & E.DEV_F_DSN:
            if host_dsn is None and len(hd.config) <= 0x100 and hd.caps.pcie_type is not None:
                out.add(obj, "DSN", "unverified", hx(d.dsn, 16), None,
                        "extended config space not readable (not root?)")
            else:
                out.compare(obj, "DSN", d.dsn, host_dsn if host_dsn is not None else "none",
                            _h(16))
        elif host_dsn is not None:
            out.add(obj, "DSN", "mismatch", "none", hx(host_dsn, 16),
                    "the saved device had no serial number")
        # covering unit, by register base
        su = saved_units.get(d.unit)
        hu = host.unit_for(hd)
        if su is not None:
            out.compare(obj, "IOMMU unit", hx(su.reg_base), hx(hu.reg_base) if hu and
                        hu.reg_base is not None else None,
                        detail="register base of the covering unit" if hu else
                        "no covering IOMMU unit found on this host")
        # upstream path
        saved_path = [bdf_str(b.bridge) for b in st.bridges if b.sbdf == d.sbdf]
        out.compare(obj, "upstream bridges", " > ".join(saved_path) or "none",
                    " > ".join(hd.upstream) or "none")
        # ownership token
        if token is not None:
            if not d.flags & E.DEV_F_TOKEN:
                out.add(obj, "token", "mismatch", "none stored", "presented",
                        "a token was presented but the state stores none for this device")
            else:
                try:
                    good = check_token(token, d.token_salt, d.token_hash)
                except Exception as e:  # TokenError: not a UUID
                    good, why = False, str(e)
                else:
                    why = "" if good else "the presented token does not match the stored hash"
                out.add(obj, "token", "match" if good else "mismatch", "hash", "presented", why)
        elif d.flags & E.DEV_F_TOKEN:
            out.add(obj, "token", "unverified", "hash", None, "no token presented (--token)")
        _ = units


def check_bars(st: State, host: Host, out: Verdicts) -> None:
    by_sbdf = {d.sbdf: d for d in host.devices.values()}
    for r in st.bars:
        obj = _dev_name(r.sbdf)
        check = E.bar_index_name(r.index)
        hd = by_sbdf.get(r.sbdf)
        if hd is None:
            if not any(v["object"] == obj for v in out):
                out.add(obj, check, "missing", f"{hx(r.start)}+{hx(r.size)}", None,
                        "device not on this host")
            continue
        if r.index >= len(hd.resources):
            out.add(obj, check, "mismatch", f"{hx(r.start)}+{hx(r.size)}", "none",
                    f"host lists {len(hd.resources)} resources")
            continue
        s, e, _f = hd.resources[r.index]
        size = (e - s + 1) if e else 0
        out.compare(obj, check, f"{hx(r.start)} size {hx(r.size)}", f"{hx(s)} size {hx(size)}")


def check_vectors(st: State, host: Host, out: Verdicts) -> None:
    by_sbdf = {d.sbdf: d for d in host.devices.values()}
    for v in st.vectors:
        hd = by_sbdf.get(v.sbdf)
        if hd is None or not v.flags & E.VEC_F_IRTE_KNOWN:
            continue
        obj = _dev_name(v.sbdf)
        check = f"{E.VECTOR_KIND.get(v.kind, v.kind)} {v.vector} IRTE"
        hv = next((x for x in hd.vectors if x.kind == v.kind and x.vector == v.vector
                   and x.irte_index is not None), None)
        if hv is None:
            out.add(obj, check, "unverified", str(v.irte_index), None,
                    "vector not enabled (yet) on this host, or its message not readable")
        else:
            out.compare(obj, check, v.irte_index, hv.irte_index)


def check_tables(st: State, host: Host, out: Verdicts) -> None:
    units = {u.seq: u for u in host.units.values()}
    saved_units = {u.unit: u for u in st.units}
    by_base = {u.reg_base: u for u in host.units.values()}
    for r in st.irtes:
        su = saved_units.get(r.unit)
        hu = by_base.get(su.reg_base) if su else units.get(r.unit)
        obj = f"unit dmar{r.unit}"
        check = f"IRTE {r.index}"
        if hu is None or hu.irtes is None:
            out.add(obj, check, "unverified", f"{r.hi:016x}:{r.lo:016x}", None,
                    "IR table not readable on this host")
            continue
        h = hu.irtes.get(r.index)
        out.compare(obj, check, f"{r.hi:016x}:{r.lo:016x}",
                    f"{h[1]:016x}:{h[0]:016x}" if h else "not present")
    for c in st.contexts:
        su = saved_units.get(c.unit)
        hu = by_base.get(su.reg_base) if su else None
        obj = _dev_name(c.sbdf)
        check = "context entry" + (f" pasid {c.pasid}" if c.flags & E.CTX_F_PASID else "")
        saved = f"{c.hi:016x}:{c.lo:016x}"
        if hu is None or hu.contexts is None:
            out.add(obj, check, "unverified", saved, None, "context entries not readable on this host")
            continue
        bus, devfn = c.sbdf >> 8 & 0xFF, c.sbdf & 0xFF
        h = next((x for x in hu.contexts if x.bus == bus and x.devfn == devfn
                  and (x.pasid or 0) == c.pasid), None)
        out.compare(obj, check, saved, f"{h.hi:016x}:{h.lo:016x}" if h else "not present")


def compare_state(st: State, host: Host, token: str | None = None) -> Verdicts:
    out = Verdicts()
    check_units(st, host, out)
    check_devices(st, host, token, out)
    check_bars(st, host, out)
    check_vectors(st, host, out)
    check_tables(st, host, out)
    return out


def result_doc(st: State, host: Host, verdicts: Verdicts, *, source: dict, check_only: bool,
               kernel: dict, created: str) -> dict:
    summary = {s: sum(1 for v in verdicts if v["status"] == s)
               for s in ("match", "mismatch", "missing", "unverified")}
    return {
        "schema": SCHEMA, "ok": verdicts.ok, "exit_code": 0 if verdicts.ok else 6,
        "time": created, "check_only": check_only,
        "source": source, "format": f"{st.version[0]}.{st.version[1]}",
        "generation": st.generation,
        "saved": {k: st.meta.get(k) for k in ("created", "hostname", "kernel_release", "boot_id")},
        "host": {"sysroot": host.sysroot.root,
                 "kernel_release": host.sysroot.try_text("/proc/sys/kernel/osrelease"),
                 "boot_id": host.sysroot.try_text("/proc/sys/kernel/random/boot_id")},
        "absent_in_state": sorted(st.absent),
        "summary": summary,
        "failures": [f"{v['item']}: {v['status']}: saved {v.get('saved', '-')}, host {v.get('host', '-')}"
                     + (f" ({v['detail']})" if v.get("detail") else "")
                     for v in verdicts if v["status"] in FAIL],
        "verdicts": list(verdicts),
        "kernel_interface": kernel,
    }
