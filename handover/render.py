"""State -> JSON-able dicts and the human tree that ``inspect`` prints; ``diff`` of states.

JSON conventions: addresses, register values and raw words are lower-case hex strings
("0x..."), counts and indices are numbers, PCI addresses are "ssss:bb:dd.f", byte strings
are hex without prefix. The top-level ``schema`` key versions this output.
"""

from __future__ import annotations

from typing import Iterator

from .formats import descriptions as D
from .formats import enums as E
from .formats.model import TABLE_ATTRS, State
from .util import jsonable as _jsonable

SCHEMA = "handover.inspect/2"   # 2: one spelling of unit references ("dmar0")


def _cstr(b: bytes) -> str:
    return bytes(b).split(b"\0", 1)[0].decode("utf-8", "replace")


def _t(v) -> str:
    return "-" if v is None else str(v)


def unit_name(u: int) -> str:
    return "none" if u == 0xFFFF else f"dmar{u}"


# --- per-record dicts ----------------------------------------------------------------------
def unit_dict(u, missing=()) -> dict:
    present = u.present
    d = {"unit": unit_name(u.unit), "segment": u.segment,
         "reg_base": D.hx(u.reg_base), "flags": E.flag_names(u.flags, E.UNIT_FLAGS)}

    def have(name):
        return present & E.UNIT_PRESENT_BIT[name] and name not in missing

    if have("ver"):
        d["ver"] = D.decode_ver(u.ver)
    if have("cap"):
        d["cap"] = D.hx(u.cap)
        d["cap_decoded"] = D.decode_cap(u.cap)
    if have("ecap"):
        d["ecap"] = D.hx(u.ecap)
        d["ecap_decoded"] = D.decode_ecap(u.ecap)
    if have("gsts"):
        d["gsts"] = D.hx(u.gsts, 8)
        d["gsts_decoded"] = D.decode_gsts(u.gsts)
    for reg, dec in (("rtaddr", D.decode_rtaddr), ("irta", D.decode_irta), ("iqa", D.decode_iqa)):
        if have(reg):
            d[reg] = D.hx(getattr(u, reg))
            d[reg + "_decoded"] = dec(getattr(u, reg))
    for reg in ("iqh", "iqt"):
        if have(reg):
            d[reg] = D.hx(getattr(u, reg))
    d.update(D.unit_modes(u.flags, present, u.rtaddr, u.irta))
    d["absent_registers"] = [n for n in E.UNIT_PRESENT_BIT if not have(n)]
    return d


def irte_dict(r) -> dict:
    return {"unit": unit_name(r.unit), "index": r.index, "lo": D.hx(r.lo, 16), "hi": D.hx(r.hi, 16),
            "decoded": D.decode_irte(r.lo, r.hi)}


def vector_dict(r, irte_lo: int | None = None) -> dict:
    """``irte_lo``: the low word of the vector's IRTE when the state holds it (posted or
    remapped is read from its IM bit)."""
    d = {"device": D.bdf_str(r.sbdf), "kind": E.VECTOR_KIND.get(r.kind, str(r.kind)),
         "vector": r.vector, "unit": unit_name(r.unit), "flags": E.flag_names(r.flags, E.VECTOR_FLAGS),
         "irq": r.irq or None, "delivery": D.vector_delivery(r.flags, irte_lo)}
    if r.flags & E.VEC_F_IRTE_KNOWN:
        d["irte_index"] = r.irte_index
        d["sub_handle"] = r.sub_handle
    return d


def vector_irtes(st: State) -> dict:
    """(unit, IRTE index) -> IRTE lo, for the IRTEs the state's vectors name (one pass over
    the IRTE table; the others are not kept)."""
    want = {(v.unit, v.irte_index) for v in st.vectors if v.flags & E.VEC_F_IRTE_KNOWN}
    if not want:
        return {}
    return {(r[1], r[0]): r[2] for r in st.irtes.rows() if (r[1], r[0]) in want}


def bar_dict(r) -> dict:
    return {"device": D.bdf_str(r.sbdf), "index": r.index, "name": E.bar_index_name(r.index),
            "start": D.hx(r.start), "size": D.hx(r.size), "flags": D.bar_flags(r.flags),
            "raw": D.hx(r.raw), "res_flags": D.hx(r.res_flags)}


def context_dict(r) -> dict:
    sm = bool(r.flags & E.CTX_F_SM)
    d = {"device": D.bdf_str(r.sbdf), "unit": unit_name(r.unit), "did": r.did,
         "scalable": sm, "root": [D.hx(r.root_hi, 16), D.hx(r.root_lo, 16)],
         "entry": [D.hx(r.hi, 16), D.hx(r.lo, 16)], "decoded": D.decode_context(r.lo, r.hi, sm)}
    if r.flags & E.CTX_F_PASID:
        d["pasid"] = r.pasid
        d["pasid_entry"] = [D.hx(r.pasid_val2, 16), D.hx(r.pasid_val1, 16), D.hx(r.pasid_val0, 16)]
        d["pasid_decoded"] = D.decode_pasid_entry(r.pasid_val0, r.pasid_val1, r.pasid_val2)
    return d


def domain_dict(r) -> dict:
    return {"unit": unit_name(r.unit), "did": r.did, "translation": D.domain_tt_name(r.tt),
            "agaw": r.agaw, "address_width": r.gaw, "pgd": D.hx(r.pgd),
            "flags": E.flag_names(r.flags, E.DOMAIN_FLAGS)}


def pi_desc_dict(r) -> dict:
    import uuid

    return {"phys": D.hx(r.phys), "vm": str(uuid.UUID(bytes=bytes(r.vm))), "vcpu": r.vcpu,
            "raw": bytes(r.raw).hex(), "decoded": D.decode_pi_desc(r.raw)}


def reserved_dict(r) -> dict:
    return {"start": D.hx(r.start), "size": D.hx(r.size), "end": D.hx(r.start + r.size - 1),
            "kind": E.RESERVED_KIND.get(r.kind, str(r.kind)), "unit": unit_name(r.unit)}


def bridge_dict(r) -> dict:
    return {"device": D.bdf_str(r.sbdf), "depth": r.depth, "bridge": D.bdf_str(r.bridge),
            "command": D.hx(r.command, 4), "bus_master": D.bus_master(r.command)}


def bridges_by_device(st: State) -> dict:
    """sbdf -> the device's BRIDGE records, nearest bridge (depth 0) first."""
    out: dict[int, list] = {}
    for r in st.bridges:
        out.setdefault(r.sbdf, []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r.depth)
    return out


def device_dict(st: State, r, bridges: list | None = None) -> dict:
    """``bridges``: the device's BRIDGE records (bridges_by_device), for ``bridge_path``."""
    import hashlib

    cfg = st.device_config(r)
    d = {"device": D.bdf_str(r.sbdf), "vendor": D.hx(r.vendor, 4), "device_id": D.hx(r.device, 4),
         "subsystem": [D.hx(r.subsystem_vendor, 4), D.hx(r.subsystem_device, 4)],
         "class": D.hx(r.class_, 6), "revision": D.hx(r.revision, 2),
         "header_type": D.hx(r.header_type, 2), "flags": E.flag_names(r.flags, E.DEVICE_FLAGS),
         "driver": _cstr(r.driver), "iommu_group": None if r.iommu_group == 0xFFFFFFFF else r.iommu_group,
         "unit": unit_name(r.unit),
         "dsn": D.hx(r.dsn, 16) if r.flags & E.DEV_F_DSN else None,
         "config": {"length": len(cfg), "sha256": hashlib.sha256(cfg).hexdigest()},
         "token": {"set": bool(r.flags & E.DEV_F_TOKEN)}}
    if r.flags & (E.DEV_F_PF | E.DEV_F_VF):
        d["sriov"] = {"total_vfs": r.total_vfs, "num_vfs": r.num_vfs,
                      "ctrl": D.hx(r.sriov_ctrl, 4),
                      "physfn": None if r.physfn == 0xFFFFFFFF else D.bdf_str(r.physfn),
                      **D.sriov_role(r.flags, r.num_vfs, r.total_vfs, r.sriov_ctrl, r.physfn)}
    d["bridge_path"] = [{"bridge": D.bdf_str(b.bridge), "command": D.hx(b.command, 4),
                         "bus_master": D.bus_master(b.command)} for b in bridges or ()]
    return d


_DICT = {"units": None, "domains": domain_dict, "contexts": context_dict, "irtes": irte_dict,
         "vectors": vector_dict, "pi_descs": pi_desc_dict, "bars": bar_dict, "devices": None,
         "bridges": bridge_dict, "reserved": reserved_dict}


def _state_parts(st: State, source: dict | None):
    """(key, value) of the top-level JSON object; the tables as generators of dicts."""
    head = {"schema": SCHEMA, "format": f"{st.version[0]}.{st.version[1]}",
            "generation": st.generation, "meta": _jsonable(st.meta),
            "absent": sorted(st.absent), "provenance": _jsonable(st.provenance),
            "counts": {a: len(getattr(st, a)) for a in TABLE_ATTRS},
            "unknown_sections": [
                {"type": u.type, "version": u.version, "flags": u.flags, "count": u.count,
                 "record_size": u.record_size, "length": len(u.data)}
                for u in st.unknown_sections]}
    if source:
        head["source"] = source
    missing = st.units.missing_fields()

    def devices():
        by_dev = bridges_by_device(st)
        return (device_dict(st, d, by_dev.get(d.sbdf)) for d in st.devices)

    def vectors():
        lo = vector_irtes(st)
        return (vector_dict(v, lo.get((v.unit, v.irte_index))
                            if v.flags & E.VEC_F_IRTE_KNOWN else None) for v in st.vectors)

    tables = {"units": lambda: (unit_dict(u, missing) for u in st.units),
              "devices": devices, "vectors": vectors}
    for attr in TABLE_ATTRS:
        if attr not in tables:
            tables[attr] = (lambda a: lambda: (_DICT[a](r) for r in getattr(st, a)))(attr)
    return head, tables


def state_dict(st: State, source: dict | None = None) -> dict:
    head, tables = _state_parts(st, source)
    return {**head, **{k: list(gen()) for k, gen in tables.items()}}


def state_json_chunks(st: State, source: dict | None = None) -> Iterator[str]:
    """The JSON text of :func:`state_dict`, record by record: memory stays bounded by one
    record (the max blob's 19 MB state never exists as one dict or one string)."""
    import json

    # the record dicts hold str, int, bool, None, lists and dicts only (bytes as hex):
    # the C encoder takes them as they are
    dump = json.JSONEncoder(sort_keys=True, allow_nan=False, check_circular=False,
                            default=_jsonable).encode

    head, tables = _state_parts(st, source)
    yield "{"
    for n, key in enumerate(sorted(head.keys() | tables.keys())):
        yield ("," if n else "") + f"\n  {json.dumps(key)}: "
        if key in head:
            yield json.dumps(_jsonable(head[key]), indent=2, sort_keys=True,
                             allow_nan=False).replace("\n", "\n  ")
            continue
        first = True
        buf = []
        for rec in tables[key]():
            buf.append(("[\n    " if first else ",\n    ") + dump(rec))
            first = False
            if len(buf) >= 256:
                yield "".join(buf)
                buf.clear()
        buf.append("[]" if first else "\n  ]")
        yield "".join(buf)
    yield "\n}\n"


# --- human tree ------------------------------------------------------------------------------
def tree_lines(st: State, *, limit: int = 16, source: str = "") -> Iterator[str]:
    m = st.meta
    yield (f"handover state {st.version[0]}.{st.version[1]}, generation {st.generation}"
           + (f"  ({source})" if source else ""))
    def mt(key, default="?"):
        v = _jsonable(m.get(key))
        return default if v is None or v == "" else str(v)

    yield (f"  saved by {mt('tool')} {mt('tool_version', '')} on {mt('hostname')} "
           f"at {mt('created')}, kernel {mt('kernel_release')}"
           + (f" -> {mt('target_kernel_release')}" if m.get("target_kernel_release") else ""))
    if st.absent:
        yield f"  not captured: {', '.join(sorted(st.absent))}"
    missing = st.units.missing_fields()
    irtes_by_unit: dict[int, list] = {}
    for r in st.irtes.rows():  # (index, unit, lo, hi)
        irtes_by_unit.setdefault(r[1], []).append(r)
    yield f"IOMMU units ({len(st.units)})"
    for u in st.units:
        d = unit_dict(u, missing)
        yield f"  {d['unit']}  segment {u.segment}  registers @ {d['reg_base']}  VT-d {d.get('ver', '?')}  [{' '.join(d['flags'])}]"
        if "cap" in d:
            c = d["cap_decoded"]
            yield (f"    CAP   {d['cap']}  {c['nd_domains']} domains, SAGAW {'/'.join(map(str, c['sagaw']))}-bit,"
                   f" posted-interrupts {'yes' if c['posted_interrupts'] else 'no'}")
        if "ecap" in d:
            e = [k for k, v in d["ecap_decoded"].items() if v]
            yield f"    ECAP  {d['ecap']}  {' '.join(e)}"
        if "gsts" in d:
            yield f"    GSTS  {d['gsts']}  {' '.join(d['gsts_decoded'])}"
        if "rtaddr" in d:
            r = d["rtaddr_decoded"]
            yield f"    RTADDR {d['rtaddr']}  root table {r['root_table']} ({'scalable' if r['scalable'] else 'legacy'} mode)"
        if "irta" in d:
            r = d["irta_decoded"]
            yield f"    IRTA  {d['irta']}  table {r['table']}, {r['entries']} entries, {'x2APIC (EIME)' if r['eime'] else 'xAPIC'}"
        if "iqa" in d:
            r = d["iqa_decoded"]
            yield f"    IQA   {d['iqa']}  queue {r['base']}, {r['pages']} page(s){', 256-bit' if r['dw256'] else ''}"
        yield "    " + _modes_line(d)
        if d["absent_registers"]:
            yield f"    not captured: {', '.join(d['absent_registers'])}"
        rows = irtes_by_unit.get(u.unit, [])
        posted = sum(1 for r in rows if r[2] >> 15 & 1)
        yield f"    IRTEs: {len(rows)} ({len(rows) - posted} remapped, {posted} posted)"
        for r in rows[:limit]:
            yield f"      [{r[0]:5d}] {D.irte_summary(r[2], r[3])}"
        if len(rows) > limit:
            yield f"      ... {len(rows) - limit} more (--limit)"
    per_dev: dict[str, dict[int, list]] = {a: {} for a in ("bars", "vectors", "contexts")}
    for a in per_dev:
        for r in getattr(st, a):
            per_dev[a].setdefault(r.sbdf, []).append(r)
    per_dev["bridges"] = bridges_by_device(st)
    irte_lo = {(r[1], r[0]): r[2] for rows in irtes_by_unit.values() for r in rows}
    yield f"Devices ({len(st.devices)})"
    for n, dev in enumerate(st.devices):
        if n >= limit:
            yield f"  ... {len(st.devices) - limit} more (--limit)"
            break
        d = device_dict(st, dev, per_dev["bridges"].get(dev.sbdf))
        yield (f"  {d['device']}  {dev.vendor:04x}:{dev.device:04x} ({dev.subsystem_vendor:04x}:"
               f"{dev.subsystem_device:04x})  class {dev.class_:06x} rev {dev.revision:02x}  "
               f"driver {d['driver'] or '-'}  group {_t(d['iommu_group'])}  {d['unit']}  [{' '.join(d['flags'])}]")
        if d["dsn"]:
            yield f"    DSN {d['dsn']}"
        yield f"    config snapshot {d['config']['length']} bytes, token {'hash stored' if d['token']['set'] else 'none'}"
        for b in per_dev["bars"].get(dev.sbdf, []):
            yield (f"    {E.bar_index_name(b.index):<11} {b.start:#018x} {D.size_str(b.size):>6}  "
                   f"{' '.join(D.bar_flags(b.flags))}")
        if "sriov" in d:
            yield "    " + _sriov_line(d["sriov"])
        yield "    " + _bridges_line(d["bridge_path"])
        yield from _vector_lines(per_dev["vectors"].get(dev.sbdf, []), irte_lo, limit)
        for c in per_dev["contexts"].get(dev.sbdf, []):
            cd = context_dict(c)
            pasid = c.pasid if c.flags & E.CTX_F_PASID else None
            yield (f"    context {cd['unit']} entry {cd['entry'][0]}:{cd['entry'][1]}  "
                   + D.context_summary(c.lo, c.hi, cd["scalable"], pasid,
                                       (c.pasid_val0, c.pasid_val1, c.pasid_val2)))
    def domain_line(r):
        return f"  {unit_name(r.unit)} did {r.did:<5} {D.domain_tt_name(r.tt)}, {r.gaw}-bit, pgd {r.pgd:#x}"

    def pi_line(r):
        p = D.decode_pi_desc(r.raw)
        return (f"  {r.phys:#x} vcpu {r.vcpu}  ON={int(p['on'])} SN={int(p['sn'])} NV={p['nv']} "
                f"NDST={p['ndst']} PIR={len(p['pir'])} pending")

    def reserved_line(r):
        return (f"  {r.start:#014x}-{r.start + r.size - 1:#014x}  "
                f"{E.RESERVED_KIND.get(r.kind, r.kind)}  {unit_name(r.unit)}")

    for title, table, line in (("Domains", st.domains, domain_line),
                               ("Posted-interrupt descriptors", st.pi_descs, pi_line),
                               ("Reserved ranges", st.reserved, reserved_line)):
        yield f"{title} ({len(table)})"
        for n, r in enumerate(table):
            if n >= limit:
                yield f"  ... {len(table) - limit} more (--limit)"
                break
            yield line(r)
    for u in st.unknown_sections:
        yield f"Unknown section type {u.type} ({len(u.data)} bytes, skipped)"


def _modes_line(d: dict) -> str:
    """A unit's translation and interrupt-remapping modes, and what they were read from."""
    def one(value, src):
        return f"{value} ({src})" if value else "unknown (not recorded)"

    return (f"modes: translation {one(d['translation_mode'], d['translation_mode_from'])}, "
            f"interrupt remapping {one(d['ir_mode'], d['ir_mode_from'])}")


def _sriov_line(s: dict) -> str:
    if s["role"] == "VF":
        return f"SR-IOV VF of PF {s['physfn'] or 'unknown'}"
    return (f"SR-IOV PF: {s['num_vfs']} of {s['total_vfs']} VFs, VF Enable "
            f"{'on' if s['vf_enable'] else 'off'}")


def _bridges_line(path: list) -> str:
    if not path:
        return "bridges: none (root bus)"
    return "bridges (nearest first): " + " > ".join(
        f"{b['bridge']} (COMMAND {b['command']}, bus master {'on' if b['bus_master'] else 'OFF'})"
        for b in path)


def _vector_lines(vectors: list, irte_lo: dict, limit: int) -> Iterator[str]:
    """The device's vectors grouped by kind (INTx, MSI, MSI-X): index -> IRTE, delivery."""
    by_kind: dict[int, list] = {}
    for v in vectors:
        by_kind.setdefault(v.kind, []).append(v)
    for kind in sorted(by_kind):
        rows = by_kind[kind]
        yield f"    {E.VECTOR_KIND.get(kind, str(kind))} ({len(rows)})"
        for v in rows[:limit]:
            known = v.flags & E.VEC_F_IRTE_KNOWN
            vd = vector_dict(v, irte_lo.get((v.unit, v.irte_index)) if known else None)
            tgt = f"{vd['unit']} IRTE {vd['irte_index']}" if known else "IRTE unknown"
            yield f"      [{v.vector}] -> {tgt}  {vd['delivery']}  irq {_t(vd['irq'])}"
        if len(rows) > limit:
            yield f"      ... {len(rows) - limit} more (--limit)"


# --- diff ------------------------------------------------------------------------------------
# per table: (sort key, label) of a record: indices sort as numbers, not as text
_KEYS = {
    "units": lambda r: ((r.unit,), unit_name(r.unit)),
    "domains": lambda r: ((r.unit, r.did), f"{unit_name(r.unit)} did {r.did}"),
    "contexts": lambda r: ((r.sbdf, r.unit, r.pasid),
                           f"{D.bdf_str(r.sbdf)} {unit_name(r.unit)} pasid {r.pasid}"),
    "irtes": lambda r: ((r.unit, r.index), f"{unit_name(r.unit)} IRTE {r.index}"),
    "vectors": lambda r: ((r.sbdf, r.kind, r.vector),
                          f"{D.bdf_str(r.sbdf)} {E.VECTOR_KIND.get(r.kind, r.kind)} {r.vector}"),
    "pi_descs": lambda r: ((r.phys,), D.hx(r.phys)),
    "bars": lambda r: ((r.sbdf, r.index), f"{D.bdf_str(r.sbdf)} {E.bar_index_name(r.index)}"),
    "devices": lambda r: ((r.sbdf,), D.bdf_str(r.sbdf)),
    "bridges": lambda r: ((r.sbdf, r.depth), f"{D.bdf_str(r.sbdf)} depth {r.depth}"),
    "reserved": lambda r: ((r.start, r.size, r.kind),
                           f"{D.hx(r.start)}+{D.hx(r.size)} {E.RESERVED_KIND.get(r.kind, r.kind)}"),
}
_IGNORE = {"devices": {"config_offset"}}
_META_VOLATILE = {"created", "generation", "boot_id"}


def _fmt(v):
    if v is None:
        return "not captured"
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, int):
        return D.hx(v)
    return v


def _unit_value(st: State, r, field: str):
    """A UNIT field as a diff sees it: None when the register was not captured (its present
    bit clear, or a field the blob's minor does not carry)."""
    if field in E.UNIT_PRESENT_BIT and (not r.present & E.UNIT_PRESENT_BIT[field]
                                        or field in st.units.missing_fields()):
        return None
    return getattr(r, field)


def diff_states(a: State, b: State, *, include_meta: bool = False) -> list[dict]:
    out = []
    if include_meta and a.generation != b.generation:
        out.append({"section": "header", "key": "generation", "change": "changed",
                    "fields": {"generation": [a.generation, b.generation]}})
    for attr in TABLE_ATTRS:
        ta, tb = getattr(a, attr), getattr(b, attr)
        if ta == tb and attr != "devices":
            continue
        key = _KEYS[attr]
        ma = {key(r): r for r in ta}
        mb = {key(r): r for r in tb}
        ign = _IGNORE.get(attr, set())
        for k in sorted(ma.keys() | mb.keys()):
            ra, rb = ma.get(k), mb.get(k)
            label = k[1]
            if ra is None:
                out.append({"section": attr, "key": label, "change": "added"})
            elif rb is None:
                out.append({"section": attr, "key": label, "change": "removed"})
            else:
                if attr == "units":
                    pairs = ((f, _unit_value(a, ra, f), _unit_value(b, rb, f)) for f in ra._fields)
                else:
                    pairs = zip(ra._fields, ra, rb)
                fields = {f: [_fmt(x), _fmt(y)] for f, x, y in pairs
                          if x != y and f not in ign and f != "present"}
                if attr == "devices" and a.device_config(ra) != b.device_config(rb):
                    fields["config"] = ["snapshot", "differs"]
                if fields:
                    out.append({"section": attr, "key": label, "change": "changed",
                                "fields": fields})
    if sorted(a.absent) != sorted(b.absent):
        out.append({"section": "absent", "key": "items", "change": "changed",
                    "fields": {"absent": [sorted(a.absent), sorted(b.absent)]}})
    volatile = set() if include_meta else _META_VOLATILE
    for k in sorted((set(a.meta) | set(b.meta)) - volatile, key=str):
        if a.meta.get(k) != b.meta.get(k):
            out.append({"section": "meta", "key": str(k), "change": "changed",
                        "fields": {str(k): [_jsonable(a.meta.get(k)), _jsonable(b.meta.get(k))]}})
    return out
