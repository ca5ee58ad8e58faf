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
    DOMAIN_TT_SCALABLE,
    GSTS_BITS,
    PASID_PGTT,
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
    return {"root_table": hx(v & ~0xFFF), "scalable": bool(v >> 10 & 1), "ttm": bits(v, 11, 10)}


def decode_irta(v: int) -> dict:
    s = v & 0xF
    return {"table": hx(v & ~0xFFF), "eime": bool(v >> 11 & 1), "size": s, "entries": 1 << (s + 1)}


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


def domain_tt_name(tt: int) -> str:
    if tt & DOMAIN_TT_SCALABLE:
        return "scalable " + PASID_PGTT.get(tt & 0x7F, f"pgtt {tt & 0x7F}")
    return CONTEXT_TT.get(tt, f"tt {tt}")


# --- BARs ---------------------------------------------------------------------------------
def bar_flags(flags: int) -> list[str]:
    return flag_names(flags, BAR_FLAGS)


def size_str(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
