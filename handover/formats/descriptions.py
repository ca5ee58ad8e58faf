# handover: formats/descriptions.py
"""Decode raw hardware words for people: IRTE, pi_desc, CAP/ECAP, context entries, BARs.

Pure functions from numbers to dicts/strings; bit positions follow Linux 6.12
(drivers/iommu/intel/iommu.h, irq_remapping.c, include/linux/pci_regs.h) and the Intel VT-d
specification (CAP/ECAP registers, remapped and posted IRTE formats, context and PASID
entries, the posted-interrupt descriptor).
"""

from __future__ import annotations

from .enums import (
    BAR_FLAGS,
    CONTEXT_TT,
    DEV_F_PF,
    DEV_F_VF,
    DOMAIN_TT_SCALABLE,
    GSTS_BITS,
    IR_MODE,
    PASID_PGTT,
    PCI_COMMAND_MASTER,
    RTADDR_TTM,
    SRIOV_CTRL_VFE,
    UNIT_F_SM,
    UNIT_F_X2APIC,
    UNIT_PRESENT_BIT,
    VEC_F_MSG_KNOWN,
    VEC_F_POSTED,
    VEC_F_REMAPPED,
    flag_names,
)


def bits(v: int, hi: int, lo: int) -> int:
    return (v >> lo) & ((1 << (hi - lo + 1)) - 1)


def hx(v: int, width: int = 0) -> str:
    return f"0x{v:0{width}x}"


def bdf_str(sbdf: int) -> str:
    return f"{sbdf >> 16:04x}:{(sbdf >> 8) & 0xff:02x}:{(sbdf >> 3) & 0x1f:02x}.{sbdf & 7}"


#: a PCI address as sysfs spells it, for patterns that contain one
BDF_PATTERN = r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"


def parse_bdf(text: str) -> int:
    """'0000:00:03.0' or '00:03.0' -> sbdf. Raises ValueError."""
    t = text.strip()
    parts = t.split(":")
    if len(parts) == 2:
        parts = ["0000"] + parts
    if len(parts) != 3 or "." not in parts[2]:
        raise ValueError(f"not a PCI address: {text!r}")
    dev, fn = parts[2].split(".", 1)
    seg, bus, dev_, fn_ = int(parts[0], 16), int(parts[1], 16), int(dev, 16), int(fn, 16)
    if seg > 0xFFFF or bus > 0xFF or dev_ > 0x1F or fn_ > 7:
        raise ValueError(f"PCI address out of range: {text!r}")
    return seg << 16 | bus << 8 | dev_ << 3 | fn_


def sid_str(sid: int) -> str:
    return f"{sid >> 8:02x}:{(sid >> 3) & 0x1f:02x}.{sid & 7}"


# --- IRTE (include/linux/dmar.h struct irte) --------------------------------------------
def decode_irte(lo: int, hi: int) -> dict:
    # bit arithmetic inline (no helper calls): inspect --json decodes up to 8 x 65,536 of these
    sid = hi & 0xFFFF
    d = {
        "present": bool(lo & 1),
        "fpd": bool(lo >> 1 & 1),
        "avail": lo >> 8 & 0xF,
        "posted": bool(lo >> 15 & 1),          # IM
        "vector": lo >> 16 & 0xFF,
        "sid": f"{sid >> 8:02x}:{(sid >> 3) & 0x1f:02x}.{sid & 7}",
        "sq": hi >> 16 & 3,
        "svt": hi >> 18 & 3,
    }
    if lo >> 15 & 1:
        d["urgent"] = bool(lo >> 14 & 1)
        d["pda"] = f"0x{(hi >> 32 & 0xFFFFFFFF) << 32 | (lo >> 38 & 0x3FFFFFF) << 6:x}"
    else:
        d["dst_mode"] = "logical" if lo >> 2 & 1 else "physical"
        d["redir_hint"] = bool(lo >> 3 & 1)
        d["trigger_mode"] = "level" if lo >> 4 & 1 else "edge"
        d["dlvry_mode"] = lo >> 5 & 7
        d["dest_id"] = f"0x{lo >> 32 & 0xFFFFFFFF:x}"
    return d


def irte_summary(lo: int, hi: int) -> str:
    d = decode_irte(lo, hi)
    if not d["present"]:
        return "not present"
    if d["posted"]:
        return (f"posted vec=0x{d['vector']:02x} pda={d['pda']} sid={d['sid']} svt={d['svt']}"
                f"{' urg' if d['urgent'] else ''}")
    return (f"remapped vec=0x{d['vector']:02x} dst={d['dest_id']} {d['dst_mode']} "
            f"{d['trigger_mode']} sid={d['sid']} svt={d['svt']}")


# --- posted-interrupt descriptor (arch/x86/include/asm/posted_intr.h) --------------------
def decode_pi_desc(raw: bytes) -> dict:
    pir = int.from_bytes(raw[0:32], "little")
    notif = int.from_bytes(raw[32:34], "little")
    return {
        "pir": [v for v in range(256) if pir >> v & 1],
        "on": bool(notif & 1),
        "sn": bool(notif >> 1 & 1),
        "nv": hx(raw[34], 2),
        "ndst": hx(int.from_bytes(raw[36:40], "little"), 8),
    }


# --- IOMMU registers ----------------------------------------------------------------------
def decode_cap(cap: int) -> dict:
    sagaw = bits(cap, 12, 8)
    return {
        "nd_domains": 1 << (4 + 2 * bits(cap, 2, 0)),
        "sagaw": [30 + 9 * i for i in range(5) if sagaw >> i & 1],
        "mgaw": bits(cap, 21, 16) + 1,
        "caching_mode": bool(cap >> 7 & 1),
        "posted_interrupts": bool(cap >> 59 & 1),
        "nfr": bits(cap, 47, 40) + 1,
        "fro": bits(cap, 33, 24) * 16,
    }


def decode_ecap(ecap: int) -> dict:
    return {
        "coherent": bool(ecap & 1),
        "queued_invalidation": bool(ecap >> 1 & 1),
        "device_tlb": bool(ecap >> 2 & 1),
        "interrupt_remapping": bool(ecap >> 3 & 1),
        "eim": bool(ecap >> 4 & 1),
        "pass_through": bool(ecap >> 6 & 1),
        "scalable_mode": bool(ecap >> 43 & 1),
        "pasid": bool(ecap >> 40 & 1),
    }


def decode_rtaddr(v: int) -> dict:
    return {"root_table": hx(v & ~0xFFF), "scalable": bool(v >> 10 & 1), "ttm": bits(v, 11, 10),
            "mode": RTADDR_TTM[bits(v, 11, 10)]}


def decode_irta(v: int) -> dict:
    s = v & 0xF
    return {"table": hx(v & ~0xFFF), "eime": bool(v >> 11 & 1), "size": s, "entries": 1 << (s + 1),
            "mode": IR_MODE[bool(v >> 11 & 1)]}


def rtaddr_mode(rtaddr: int) -> str:
    """The translation mode RTADDR's TTM bits (11:10) select: legacy, scalable, ..."""
    return RTADDR_TTM[bits(rtaddr, 11, 10)]


def irta_mode(irta: int) -> str:
    """The interrupt-remapping mode IRTA's EIME bit (11) selects: x2APIC (EIM) or xAPIC."""
    return IR_MODE[bool(irta >> 11 & 1)]


def unit_modes(flags: int, present: int, rtaddr: int, irta: int) -> dict:
    """A saved unit's translation mode (RTADDR TTM 11:10, else the SM flag) and interrupt-
    remapping mode (IRTA EIME bit 11, else the X2APIC flag), each with where it was read
    from; None (and source None) when neither was recorded."""
    if present & UNIT_PRESENT_BIT["rtaddr"]:
        tm, tm_from = rtaddr_mode(rtaddr), "RTADDR"
    elif flags & UNIT_F_SM:
        tm, tm_from = "scalable", "flags"
    else:
        tm, tm_from = None, None
    if present & UNIT_PRESENT_BIT["irta"]:
        ir, ir_from = irta_mode(irta), "IRTA"
    elif flags & UNIT_F_X2APIC:
        ir, ir_from = IR_MODE[True], "flags"
    else:
        ir, ir_from = None, None
    return {"translation_mode": tm, "translation_mode_from": tm_from,
            "ir_mode": ir, "ir_mode_from": ir_from}


def decode_iqa(v: int) -> dict:
    return {"base": hx(v & ~0xFFF), "dw256": bool(v >> 11 & 1), "qs": v & 7,
            "pages": 1 << (v & 7)}


def decode_gsts(v: int) -> list[str]:
    return [name for bit, name in sorted(GSTS_BITS.items(), reverse=True) if v >> bit & 1]


def decode_ver(v: int) -> str:
    return f"{bits(v, 7, 4)}.{bits(v, 3, 0)}"


# --- context entries ------------------------------------------------------------------------
def decode_context(lo: int, hi: int, scalable: bool) -> dict:
    if scalable:
        return {"present": bool(lo & 1), "fpd": bool(lo >> 1 & 1), "pasid_enable": bool(lo >> 3 & 1),
                "pdts": bits(lo, 11, 9), "pasid_dir": hx(lo & ~0xFFF), "rid_pasid": bits(hi, 19, 0)}
    aw = bits(hi, 2, 0)
    return {"present": bool(lo & 1), "fpd": bool(lo >> 1 & 1),
            "tt": CONTEXT_TT.get(bits(lo, 3, 2), f"reserved({bits(lo, 3, 2)})"),
            "slptptr": hx(lo & ~0xFFF), "aw": aw, "address_width": 30 + 9 * aw,
            "did": bits(hi, 23, 8)}


def decode_pasid_entry(v0: int, v1: int, v2: int) -> dict:
    pgtt = bits(v0, 8, 6)
    return {"present": bool(v0 & 1), "aw": bits(v0, 4, 2),
            "pgtt": PASID_PGTT.get(pgtt, f"reserved({pgtt})"), "ssptptr": hx(v0 & ~0xFFF),
            "did": bits(v1, 15, 0), "fsptptr": hx(v2 & ~0xFFF)}


def context_summary(lo: int, hi: int, scalable: bool, pasid: int | None = None,
                    pasid_vals: tuple[int, int, int] = (0, 0, 0)) -> str:
    """One line: a legacy context entry (TT, AW, DID, SLPTPTR), or a scalable one (PASID
    directory) with its PASID entry (PGTT, DID, SSPTPTR) when the state holds it."""
    c = decode_context(lo, hi, scalable)
    if not scalable:
        return (f"legacy: {c['tt']}, {c['address_width']}-bit, DID {c['did']}, SLPTPTR "
                f"{c['slptptr']}{'' if c['present'] else ' (not present)'}")
    out = (f"scalable: PASID directory {c['pasid_dir']} ({1 << (c['pdts'] + 7)} entries), "
           f"RID_PASID {c['rid_pasid']}")
    if pasid is not None:
        p = decode_pasid_entry(*pasid_vals)
        out += (f"; PASID {pasid}: PGTT {p['pgtt']}, DID {p['did']}, SSPTPTR {p['ssptptr']}"
                + (f", FSPTPTR {p['fsptptr']}" if p["pgtt"] in ("first-level", "nested") else "")
                + ("" if p["present"] else " (not present)"))
    return out


def domain_tt_name(tt: int) -> str:
    if tt & DOMAIN_TT_SCALABLE:
        return "scalable " + PASID_PGTT.get(tt & 0x7F, f"pgtt {tt & 0x7F}")
    return CONTEXT_TT.get(tt, f"tt {tt}")


# --- PCI topology, SR-IOV, vectors ------------------------------------------------------------
def bus_master(command: int) -> bool:
    """PCI_COMMAND bit 2: the function may issue DMA (a bridge: forward it upstream)."""
    return bool(command & PCI_COMMAND_MASTER)


def sriov_role(flags: int, num_vfs: int, total_vfs: int, ctrl: int, physfn: int) -> dict | None:
    """A saved device's SR-IOV role: a VF and its PF, a PF with its VF counts and VF
    Enable, or None (neither)."""
    if flags & DEV_F_VF:
        return {"role": "VF", "physfn": None if physfn == 0xFFFFFFFF else bdf_str(physfn)}
    if flags & DEV_F_PF:
        return {"role": "PF", "num_vfs": num_vfs, "total_vfs": total_vfs,
                "vf_enable": bool(ctrl & SRIOV_CTRL_VFE)}
    return None


def vector_delivery(flags: int, irte_lo: int | None = None) -> str:
    """How a vector reaches the CPU: ``posted`` (its IRTE has IM set, or the vector is
    flagged POSTED), ``remapped`` (remappable message), ``compatibility`` (a message in
    compatibility format: not remapped), or ``unknown`` (the message was not read)."""
    if flags & VEC_F_POSTED or (irte_lo is not None and irte_lo >> 15 & 1):
        return "posted"
    if flags & VEC_F_MSG_KNOWN:
        return "remapped" if flags & VEC_F_REMAPPED else "compatibility"
    return "remapped" if irte_lo is not None else "unknown"


# --- BARs ---------------------------------------------------------------------------------
def bar_flags(flags: int) -> list[str]:
    return flag_names(flags, BAR_FLAGS)


def size_str(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
