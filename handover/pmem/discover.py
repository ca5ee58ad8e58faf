"""What persistent memory the host has (``handover region list``).

Sources: ``/sys/class/block/pmem*`` (raw and fsdax namespaces, including the legacy
``memmap=nn!ss`` ranges that nd_e820 exposes), ``/sys/bus/dax/devices/dax*`` (device-dax),
``/sys/bus/nd/devices/region*`` and ``/proc/iomem`` ("Persistent Memory",
"Persistent Memory (legacy)"; the addresses read as 0 unless run as root).

The next kernel is told where to look by PHYSICAL address: every entry carries ``phys_start``
and ``size`` of the device's data, ``data_offset`` (data start minus namespace start; the
pfn/dax metadata reserve), and for legacy ranges the ``memmap=`` option that the next kernel's
command line must repeat (kexec hands over the firmware memory map, without memmap= ranges).
"""

from __future__ import annotations

import os
import re

from ..formats.iomem import parse_iomem as _parse_iomem
from .kinds import int_sysfs, read_sysfs

IOMEM_PMEM = ("Persistent Memory", "Persistent Memory (legacy)")


def parse_iomem(text: str) -> list[dict]:
    """Top-level and nested ranges named Persistent Memory[ (legacy)] from /proc/iomem."""
    try:
        ranges = _parse_iomem(text)
    except ValueError:
        return []
    return [{"start": s, "size": e - s + 1, "legacy": name.endswith("(legacy)"), "name": name}
            for s, e, name, _depth in ranges if name in IOMEM_PMEM]


def memmap_option(start: int, size: int) -> str:
    def fmt(n: int) -> str:
        for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
            if n and n % (1 << shift) == 0:
                return f"{n >> shift}{unit}"
        return str(n)
    return f"memmap={fmt(size)}!{fmt(start) if start % (1 << 20) else hex(start)}"


def _containing(ranges: list[dict], start: int | None) -> dict | None:
    if start is None:
        return None
    for r in ranges:
        if r["start"] <= start < r["start"] + r["size"]:
            return r
    return None


def _namespace_of(devdir: str) -> str | None:
    """The namespace directory for a block device's or nd_dax/pfn's device directory."""
    name = os.path.basename(devdir)
    if name.startswith("namespace"):
        return devdir
    ns = read_sysfs(f"{devdir}/namespace")
    if ns:
        cand = os.path.join(os.path.dirname(devdir), ns)
        if os.path.isdir(cand):
            return cand
    return None


def _state(path: str) -> dict:
    """Whether PATH holds handover state; header-only (no blob CRC) so listing stays cheap."""
    from .protocol import open_region
    from handover.errors import HandoverError
    try:
        with open_region(path, write=False) as r:
            hdrs, errs = r.read_headers()
            valid = [h for h in hdrs if h is not None]
            if not valid:
                newer = any(e is not None and e.newer_layout for e in errs)
                damaged = any(e is not None and not e.no_magic for e in errs)
                return {"handover": "newer-layout" if newer else ("damaged" if damaged else "none"),
                        "generation": None}
            g = max(h.generation for h in valid)
            return {"handover": "initialized" if g == 0 else "state", "generation": g or None,
                    "uuid": valid[0].uuid_str}
    except (HandoverError, OSError) as e:
        return {"handover": "unreadable", "generation": None, "error": str(e)}


def discover(*, sysfs: str = "/sys", proc: str = "/proc", dev: str = "/dev",
             check_state: bool = True) -> list[dict]:
    try:
        with open(f"{proc}/iomem") as f:
            iomem = parse_iomem(f.read())
    except OSError:
        iomem = []
    entries = []
    covered = set()

    # block pmem (raw / fsdax / legacy)
    blk = f"{sysfs}/class/block"
    for name in sorted(os.listdir(blk)) if os.path.isdir(blk) else []:
        if not re.match(r"^pmem\d+(\.\d+)?$", name):
            continue
        devdir = os.path.realpath(f"{blk}/{name}/device")
        ns = _namespace_of(devdir)
        dname = os.path.basename(devdir)
        mode = "fsdax" if dname.startswith("pfn") else (read_sysfs(f"{ns}/mode") if ns else None) or "raw"
        start = int_sysfs(f"{devdir}/resource")
        ns_start = int_sysfs(f"{ns}/resource") if ns else start
        sectors = int_sysfs(f"{blk}/{name}/size")
        size = sectors * 512 if sectors is not None else int_sysfs(f"{devdir}/size")
        entries.append({
            "device": f"{dev}/{name}", "kind": "pmem-block", "mode": mode,
            "namespace": os.path.basename(ns) if ns else None,
            "phys_start": start, "size": size, "align": int_sysfs(f"{devdir}/align") or 4096,
            "data_offset": (start - ns_start) if start is not None and ns_start is not None else None,
        })

    # device-dax
    daxbus = f"{sysfs}/bus/dax/devices"
    for name in sorted(os.listdir(daxbus)) if os.path.isdir(daxbus) else []:
        d = f"{daxbus}/{name}"
        start = int_sysfs(f"{d}/resource")
        if start is None:
            start = int_sysfs(f"{d}/mapping0/start")
        parent = os.path.dirname(os.path.realpath(d))
        ns = _namespace_of(parent) if os.path.basename(parent).startswith("dax") else None
        ns_start = int_sysfs(f"{ns}/resource") if ns else None
        entries.append({
            "device": f"{dev}/{name}", "kind": "devdax", "mode": "devdax",
            "namespace": os.path.basename(ns) if ns else None,
            "phys_start": start, "size": int_sysfs(f"{d}/size"),
            "align": int_sysfs(f"{d}/align") or 2 * 1024 * 1024,
            "data_offset": (start - ns_start) if start is not None and ns_start is not None else None,
        })

    for e in entries:
        r = _containing(iomem, e["phys_start"])
        e["legacy"] = bool(r and r["legacy"])
        if r:
            covered.add(r["start"])
            e["iomem"] = {"start": r["start"], "size": r["size"], "name": r["name"]}
        e["next_cmdline"] = memmap_option(r["start"], r["size"]) if r and r["legacy"] else None
        if e["phys_start"] is not None and e["size"]:
            e["handover_param"] = f"handover={e['size']:#x}@{e['phys_start']:#x}"
        if check_state:
            e.update(_state(e["device"]))

    # ranges with no device (driver not loaded, or addresses hidden from non-root)
    for r in iomem:
        if r["start"] in covered:
            continue
        entries.append({
            "device": None, "kind": "iomem", "mode": None, "namespace": None,
            "phys_start": r["start"] if r["start"] else None, "size": r["size"], "align": None,
            "data_offset": None, "legacy": r["legacy"],
            "next_cmdline": memmap_option(r["start"], r["size"]) if r["legacy"] and r["start"] else None,
            "note": ("no /dev node: load nd_e820 (legacy) or nfit+nd_pmem" if r["start"]
                     else "addresses hidden: run as root"),
            "handover": None, "generation": None,
        })
    return entries
