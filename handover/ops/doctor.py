"""Use case ``doctor``: the preflight a host engineer runs before a maintenance window.

Can this host do a keepalive kexec, and if not, why? Every check gives one verdict:

- ``ok``: this part is ready;
- ``warn``: the kexec can go ahead, with the consequence the text says (e.g. a stock next
  kernel: the devices are stopped, user space only validates);
- ``fail``: a keepalive kexec cannot go ahead until this is fixed (the text says how);
- ``info``: a fact worth knowing (what would be kept and what released).

The report is ready (``ok``) when no check failed. Everything is read through the host
layer (``--sysroot`` reads a captured tree); nothing is written.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..errors import HandoverError
from ..formats.enums import IR_MODE
from .keepable import FEATURE_SCALABLE, NOT_DECLARED, features_of

SCHEMA = "handover.doctor/1"
KEXEC_PATHS = ("/usr/sbin/kexec", "/sbin/kexec", "/usr/bin/kexec", "/usr/local/sbin/kexec")


@dataclass
class Check:
    check: str          # "kernel.running", "iommu.dmar0", "device.0000:00:03.0", ...
    status: str         # ok | warn | fail | info
    text: str
    facts: dict = field(default_factory=dict)


@dataclass
class DoctorRequest:
    sysroot: str = "/"
    kernel: str | None = None       # the next kernel's image
    region: str | None = None       # default: the host's pmem regions
    devices: tuple = ()             # default: every device bound to vfio-pci


def _running_kernel(sr, host) -> tuple[Check, bool]:
    """(check, the running kernel has the handover patches)."""
    from ..formats.structs import FORMAT_MAJOR, WRITABLE_MINORS
    from ..host.kernelimage import running_declaration

    release = sr.try_text("/proc/sys/kernel/osrelease") or (
        os.uname().release if sr.root == "/" else "of unknown release")
    iface = host.kernel_handover
    try:
        d = running_declaration(sr)
    except HandoverError:
        d = None
    formats = (iface.formats if iface is not None else None) or (d.text() if d else None)
    if iface is None and d is None:
        return Check("kernel.running", "warn",
                     f"running kernel {release}: no handover patches (no /sys/kernel/handover, "
                     f"no Handover note): its kexec stops every device; only a user-space "
                     f"validated handover is possible", {"release": release, "formats": None}), False
    if d is not None and d.best_minor(FORMAT_MAJOR, WRITABLE_MINORS) is None:
        return Check("kernel.running", "fail",
                     f"running kernel {release} reads handover format {d.text()}, this tool "
                     f"writes " + ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS),
                     {"release": release, "formats": formats}), True
    has_keepalive = sr.exists("/sys/kernel/handover/keepalive")
    return Check("kernel.running", "ok" if has_keepalive else "warn",
                 f"running kernel {release}: handover patches, reads format {formats}"
                 + ("" if has_keepalive else "; no /sys/kernel/handover/keepalive: its kexec "
                    "cannot leave devices running"),
                 {"release": release, "formats": formats, "keepalive": has_keepalive}), \
        has_keepalive


def _target_kernel(image: str | None) -> tuple[Check, bool]:
    from .arm import kernel_declaration

    if image is None:
        return Check("kernel.target", "warn", "next kernel not given (--kernel IMAGE): cannot "
                     "tell whether it reads the state", {"image": None}), False
    try:
        minor, note = kernel_declaration(image)
    except HandoverError as e:
        return Check("kernel.target", "fail", str(e), {"image": os.path.abspath(image)}), False
    if minor is None:
        return Check("kernel.target", "warn", f"{image}: {note}: the devices are stopped at "
                     f"kexec (no keepalive)", {"image": os.path.abspath(image)}), False
    return Check("kernel.target", "ok", f"{image}: {note}",
                 {"image": os.path.abspath(image), "writes": f"1.{minor}"}), True


def _units(host, features: frozenset) -> list[Check]:
    if not host.units:
        return [Check("iommu", "fail", "no IOMMU unit (/sys/class/iommu/dmar*): VT-d off in the "
                      "firmware, or intel_iommu=off", {})]
    out = []
    for u in sorted(host.units.values(), key=lambda x: x.seq):
        rt, irta = u.regs.rtaddr, u.regs.irta
        mode = "unknown" if rt is None else ("scalable" if rt >> 10 & 1 else "legacy")
        x2apic = None if irta is None else bool(irta >> 11 & 1)
        scalable_kept = mode != "scalable" or FEATURE_SCALABLE in features
        facts = {"unit": u.name, "register_base": None if u.reg_base is None else f"{u.reg_base:#x}",
                 "mode": mode, "interrupt_remapping": u.ir_enabled, "x2apic": x2apic,
                 "ir_mode": None if x2apic is None else IR_MODE[x2apic],
                 "translation": u.dma_enabled, "mode_kept": scalable_kept}
        words = [f"{u.name} at {facts['register_base'] or 'unknown address'}",
                 f"{mode} mode" if mode != "unknown" else "mode unknown (RTADDR not readable)",
                 "IR on" if u.ir_enabled else ("IR off" if u.ir_enabled is False else
                                               "IR state unknown"),
                 facts["ir_mode"] or "x2APIC/EIM unknown (IRTA not readable)"]
        status, why = "ok", ""
        if u.ir_enabled is False:
            status, why = "fail", ": interrupt remapping is off, the vectors cannot be carried"
        elif not scalable_kept:
            status, why = "warn", (f": scalable mode is not kept yet ({NOT_DECLARED.format(FEATURE_SCALABLE)}): "
                                   f"its devices are refused before the kexec")
        elif u.ir_enabled is None or mode == "unknown":
            status, why = "warn", ": not every register is readable (no debugfs or patched sysfs)"
        out.append(Check(f"iommu.{u.name}", status, ", ".join(words) + why, facts))
    return out


def _topology(host, d) -> tuple[dict, str]:
    """(facts, words) of a device's place: its bridges (kind, bus master), DMA aliases,
    SR-IOV role, MSI/MSI-X vectors."""
    from ..formats.enums import PCI_COMMAND_MASTER, SRIOV_CTRL_VFE, VECTOR_KIND
    from ..host.pci import bridge_kind, dma_alias_bridges

    bridges = []
    for b in d.upstream:
        bd = host.devices.get(b)
        cmd = int.from_bytes(bd.config[4:6], "little") if bd and len(bd.config) >= 6 else None
        bridges.append({"bdf": b, "kind": bridge_kind(bd) if bd else "unknown",
                        "bus_master": None if cmd is None else bool(cmd & PCI_COMMAND_MASTER)})
    aliases = [b for b, _ in dma_alias_bridges(host, d)]
    sriov = None
    if d.physfn:
        sriov = {"role": "VF", "physfn": d.physfn}
    elif d.caps.sriov is not None:
        s = d.caps.sriov
        sriov = {"role": "PF", "num_vfs": s.num_vfs, "total_vfs": s.total_vfs,
                 "vf_enable": bool(s.ctrl & SRIOV_CTRL_VFE)}
    counts: dict[str, int] = {}
    for v in d.vectors:
        k = VECTOR_KIND.get(v.kind, str(v.kind))
        counts[k] = counts.get(k, 0) + 1
    if not d.vectors:   # not a device whose vectors were read: count msi_irqs
        for kind in d.msi_irqs.values():
            k = {"msi": "MSI", "msix": "MSI-X"}.get(kind, kind)
            counts[k] = counts.get(k, 0) + 1
    facts = {"bridges": [b["bdf"] for b in bridges], "bridge_path": bridges,
             "dma_alias_via": aliases, "sriov": sriov, "vectors": counts}
    path = " > ".join(f"{b['bdf']} ({b['kind']}"
                      + ("" if b["bus_master"] is None else
                         f", bus master {'on' if b['bus_master'] else 'off'}") + ")"
                      for b in bridges) or "none (root bus)"
    words = f"bridges: {path}"
    if aliases:
        words += f"; DMA aliased by {', '.join(aliases)}"
    if sriov and sriov["role"] == "VF":
        words += f"; SR-IOV VF of {sriov['physfn']}"
    elif sriov:
        words += (f"; SR-IOV PF, {sriov['num_vfs']} of {sriov['total_vfs']} VFs, VF Enable "
                  f"{'on' if sriov['vf_enable'] else 'off'}")
    words += "; vectors: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                              or "none")
    return facts, words


def _devices(host, requested, features: frozenset = frozenset(),
             keeps: bool = False) -> tuple[list[Check], list[str], list[str]]:
    """(checks, kept, released). ``keeps``: the running kernel can keep devices, so one it
    cannot keep fails (arm refuses it); otherwise that is a warning."""
    from ..host.pci import normalize_bdf
    from .build import IOMMU_FREE_DRIVERS
    from .keepable import refusals

    vfio = sorted(b for b, d in host.devices.items() if d.driver == "vfio-pci")
    wanted = [normalize_bdf(b) for b in requested] if requested else vfio
    if not wanted:
        return [Check("devices", "fail", "no PCI device is bound to vfio-pci: nothing to keep "
                      "alive", {})], [], []
    checks, kept = [], []
    for b in wanted:
        d = host.devices.get(b)
        if d is None:
            checks.append(Check(f"device.{b}", "fail", f"{b}: no such PCI device", {"bdf": b}))
            continue
        problems = []
        if d.driver != "vfio-pci":
            problems.append(f"bound to {d.driver or 'no driver'}, not vfio-pci")
        shared = []
        if d.iommu_group is None:
            problems.append("in no IOMMU group")
        else:
            shared = sorted(o.bdf for o in host.devices.values()
                            if o.iommu_group == d.iommu_group and o.bdf != b
                            and o.bdf not in wanted
                            and not (o.header_type & 0x7F == 1 and o.driver in IOMMU_FREE_DRIVERS))
            if shared:
                problems.append(f"IOMMU group {d.iommu_group} shared with {', '.join(shared)}")
        topo, where = _topology(host, d)
        facts = {"bdf": b, "driver": d.driver, "iommu_group": d.iommu_group,
                 "unit": d.iommu, "shares_group_with": shared, **topo}
        cannot = refusals(host, d, features)
        facts["not_kept"] = cannot
        if problems:
            checks.append(Check(f"device.{b}", "fail", f"{b}: " + "; ".join(problems + cannot)
                                + f"; {where}", facts))
        elif cannot:
            checks.append(Check(f"device.{b}", "fail" if keeps else "warn",
                                f"{b} {d.vendor:04x}:{d.device:04x}: not kept: "
                                + "; ".join(cannot)
                                + ("; arm refuses it before the kexec" if keeps else "")
                                + f"; {where}", facts))
        else:
            kept.append(b)
            checks.append(Check(f"device.{b}", "ok",
                                f"{b} {d.vendor:04x}:{d.device:04x}: vfio-pci, alone in IOMMU "
                                f"group {d.iommu_group}, {d.iommu or 'unit unknown'}, {where}",
                                facts))
    released = sorted(set(vfio) - set(kept))
    return checks, kept, released


def _regions(sr, region: str | None) -> list[Check]:
    from .. import pmem
    from ..pmem.discover import discover

    def host_path(p):
        return "/" + os.path.relpath(p, sr.root) if sr.root != "/" and p.startswith(sr.root) else p

    if region is not None:
        try:
            st = pmem.status(region)
        except HandoverError as e:
            return [Check("region", "fail", str(e), {"path": region})]
        facts = {"path": os.path.abspath(region), "kind": st["kind"],
                 "durability": st["durability"],
                 "phys_start": None if st.get("phys_start") is None else f"{st['phys_start']:#x}",
                 "initialized": st["initialized"]}
        if not st["initialized"]:
            return [Check("region", "fail", f"{region}: not an initialized handover region "
                          f"(handover region init {region})", facts)]
        if st.get("phys_start") is None:
            return [Check("region", "warn", f"{region}: {st['kind']}, physical address unknown: "
                          f"only the initramfs (by path) can find the state, not the next kernel",
                          facts)]
        return [Check("region", "ok", f"{region}: {st['kind']} at {facts['phys_start']}, "
                      f"{st['durability']}", facts)]
    found = discover(sysfs=sr.host("/sys"), proc=sr.host("/proc"), dev=sr.host("/dev"))
    if not found:
        return [Check("region", "fail", "no persistent memory (no pmem/dax device, no memmap= "
                      "range): the state has nowhere to go across the kexec", {})]
    out = []
    for e in found:
        dev = host_path(e["device"]) if e.get("device") else None
        phys = None if e.get("phys_start") is None else f"{e['phys_start']:#x}"
        facts = {"device": dev, "kind": e["kind"], "phys_start": phys, "size": e.get("size"),
                 "legacy": bool(e.get("legacy")), "memmap": e.get("next_cmdline"),
                 "handover": e.get("handover")}
        where = f"{dev or 'a range'}: {e['kind']} at {phys or 'unknown address'}"
        if e.get("legacy"):
            where += (f", a legacy {e['next_cmdline']} range (DRAM: survives a warm kexec only "
                      f"if the next command line repeats it; handover arm adds it)")
        state = e.get("handover")
        if state in ("initialized", "state"):
            out.append(Check(f"region.{dev}", "ok", f"{where}; handover region "
                             f"({state})", facts))
        elif state == "unreadable":
            why = (e.get("error") or "").replace(e.get("device") or "\0", dev or "")
            out.append(Check(f"region.{dev}", "fail", f"{where}; cannot read it ({why})",
                             facts))
        else:
            fix = {"none": f"not a handover region yet (handover region init {dev})",
                   "damaged": f"its region headers are damaged (handover region init --force "
                              f"{dev} starts over)",
                   "newer-layout": "a newer handover wrote it: use that version"}
            out.append(Check(f"region.{dev}", "fail", f"{where}; "
                             + fix.get(state, f"handover region state {state}"), facts))
    return out


def _kexec(sr) -> Check:
    tool = next((p for p in KEXEC_PATHS if sr.exists(p)), None)
    loaded = sr.try_text("/sys/kernel/kexec_loaded")
    facts = {"kexec": tool, "kexec_loaded": loaded}
    if tool is None:
        return Check("kexec", "fail", "kexec-tools not installed (no kexec in "
                     + ", ".join(KEXEC_PATHS) + ")", facts)
    if loaded is None:
        return Check("kexec", "warn", f"{tool}; /sys/kernel/kexec_loaded missing (a kernel "
                     f"without CONFIG_KEXEC?)", facts)
    return Check("kexec", "ok", f"{tool}; kernel loaded for kexec: "
                 f"{'yes' if loaded == '1' else 'no'}", facts)


def doctor(req: DoctorRequest) -> dict:
    from ..host import Sysroot, read_host

    sr = Sysroot(req.sysroot).check()
    host = read_host(sr)
    running, running_keeps = _running_kernel(sr, host)
    target, target_reads = _target_kernel(req.kernel)
    features = features_of(host)
    checks = [running, target, *_units(host, features)]
    dev_checks, kept, released = _devices(host, req.devices, features, running_keeps)
    checks += dev_checks
    checks += _regions(sr, req.region)
    checks.append(_kexec(sr))
    keepalive = running_keeps and target_reads
    if not keepalive:
        released, kept = sorted(set(released) | set(kept)), []
        why = ("the running kernel has no keepalive interface" if not running_keeps else
               "the next kernel does not read the state")
        checks.append(Check("keepalive", "info", f"kept: none ({why}); stopped at kexec: "
                            f"{', '.join(released) or 'none'}",
                            {"kept": kept, "released": released}))
    else:
        checks.append(Check("keepalive", "info", f"kept running across the kexec: "
                            f"{', '.join(kept) or 'none'}; released: "
                            f"{', '.join(released) or 'none'}",
                            {"kept": kept, "released": released}))
    ok = not any(c.status == "fail" for c in checks)
    return {"schema": SCHEMA, "ok": ok, "exit_code": 0 if ok else 1, "sysroot": sr.root,
            "keepalive": keepalive, "kept": kept, "released": released,
            "checks": [asdict(c) for c in checks]}
