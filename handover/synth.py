"""Deterministic synthetic hosts, for golden vectors, property tests and benchmarks.

The register values of unit 0 are those QEMU's emulated VT-d (``-device intel-iommu``)
reports in the lab's guests (``dmar0 address=fed90000 cap=d2008c22260286 ecap=f00f4a
version=1:0`` in their boot log); everything else is generated from a seed so that the same
profile always yields the same bytes.
"""

from __future__ import annotations

import random
import struct

from .formats import enums as E
from .formats.model import State, StateBuilder
from .formats.structs import make_sbdf
from .formats.token import hash_token

PROFILES = {
    # name: units, irtes per unit, devices, domains, pi_descs, bars, reserved ranges, config bytes
    "tiny": dict(units=1, irtes=6, devices=2, domains=2, pi_descs=1, bars=3, reserved=4, config=64),
    "typical": dict(units=1, irtes=1024, devices=16, domains=16, pi_descs=64, bars=96,
                    reserved=64, config=256),
    "max": dict(units=8, irtes=65536, devices=4096, domains=4096, pi_descs=8192, bars=24576,
                reserved=100_000, config=256),
}

QEMU_CAP = 0xD2008C22260286
QEMU_ECAP = 0xF00F4A


def config_space(rng: random.Random, vendor: int, device: int, cls: int, size: int) -> bytes:
    cfg = bytearray(rng.randbytes(size))
    struct.pack_into("<HHHH", cfg, 0, vendor, device, 0x0506, 0x0010)  # COMMAND: MEM|MASTER
    struct.pack_into("<I", cfg, 8, cls << 8 | 0x10)
    cfg[0x0E] = 0
    return bytes(cfg)


def synth_state(profile: str = "typical", seed: int = 1, generation: int = 1,
                token: str = "8c1f3a52-6b0e-4d7a-9e21-5f4c2b9d7a10") -> State:
    p = PROFILES[profile]
    rng = random.Random(f"{profile}/{seed}")
    b = StateBuilder()
    b.meta = {
        "tool": "handover", "tool_version": "synthetic", "created": "2026-11-25T00:00:00Z",
        "hostname": f"synth-{profile}", "machine_id": "0" * 32, "boot_id": "1" * 32,
        "kernel_release": "6.12.57+deb12-amd64", "target_kernel_release": None,
        "generation": generation, "profile": profile, "seed": seed,
    }
    n_units = p["units"]
    for u in range(n_units):
        base = 0x1_0000_0000 + u * 0x400_0000
        b.add("units", unit=u, segment=0, flags=E.UNIT_F_TE | E.UNIT_F_IRE | E.UNIT_F_QIE,
              present=sum(E.UNIT_PRESENT_BIT.values()), ver=0x10,
              reg_base=0xFED90000 + u * 0x1000, cap=QEMU_CAP, ecap=QEMU_ECAP,
              gsts=0xC7000000, rtaddr=base, irta=(base + 0x10_0000) | 0xF,
              iqa=base + 0x20_0000, iqh=0x100 * u, iqt=0x100 * u)
        b.add("reserved", start=base, size=0x1000, kind=1, unit=u)
        b.add("reserved", start=base + 0x10_0000, size=0x10_0000, kind=6, unit=u)
    # devices on bus 1.., one function each
    sbdfs = [make_sbdf(0, 1 + i // 32, i % 32, 0) for i in range(p["devices"])]
    salt = bytes(range(16))
    for i, sbdf in enumerate(sbdfs):
        vendor, device = (0x1234, 0x11E8) if i % 2 == 0 else (0x8086, 0x10D3)
        cls = 0x00FF00 if i % 2 == 0 else 0x020000
        s, h = hash_token(token, salt)
        flags = E.DEV_F_KEEPALIVE | E.DEV_F_TOKEN | (E.DEV_F_DSN if i % 3 == 0 else 0)
        b.add_device(sbdf=sbdf, vendor=vendor, device=device, subsystem_vendor=0x1AF4,
                     subsystem_device=0x1100, class_=cls, revision=0x10, header_type=0,
                     flags=flags, iommu_group=3 + i, dsn=rng.getrandbits(64) if i % 3 == 0 else 0,
                     unit=i % n_units, driver=b"vfio-pci", token_salt=s, token_hash=h,
                     config=config_space(rng, vendor, device, cls, p["config"]))
        b.add("bridges", sbdf=sbdf, depth=0, command=0x0407, bridge=make_sbdf(0, 0, 0x1C, i % 8))
    for d in range(p["domains"]):
        u = d % n_units
        pgd = 0x2_0000_0000 + d * 0x1000
        b.add("domains", unit=u, did=2 + d // n_units, tt=0, agaw=2, gaw=48, pgd=pgd)
        b.add("reserved", start=pgd, size=0x1000, kind=5, unit=u)
        if d < len(sbdfs):
            sbdf = sbdfs[d]
            did = 2 + d // n_units
            b.add("contexts", sbdf=sbdf, pasid=0, unit=u, did=did, flags=0,
                  root_lo=(0x1_0000_0000 + u * 0x400_0000 + 0x1000 * (1 + (sbdf >> 8 & 0xFF))) | 1,
                  root_hi=0, lo=pgd | 1, hi=(did << 8) | 2)
    pis = []
    for k in range(p["pi_descs"]):
        phys = 0x3_0000_0000 + k * 64
        raw = bytearray(64)
        pir = rng.getrandbits(256) if k % 4 == 0 else 0
        raw[0:32] = pir.to_bytes(32, "little")
        raw[32] = rng.getrandbits(2)
        raw[34] = 0xF2
        raw[36:40] = (k % 64 << 8).to_bytes(4, "little")
        vm = rng.randbytes(16)
        b.add("pi_descs", phys=phys, vm=vm, vcpu=k % 64, raw=bytes(raw))
        pis.append(phys)
        if k % 64 == 0:
            b.add("reserved", start=phys, size=0x1000, kind=7, unit=0xFFFF)
    per_unit = p["irtes"]
    for u in range(n_units):
        for idx in range(per_unit):
            sid = sbdfs[idx % len(sbdfs)] & 0xFFFF if sbdfs else 0
            if idx % 8 == 7 and pis:  # posted format
                pda = pis[idx % len(pis)]
                lo = 1 | 1 << 15 | (0x20 + idx % 200) << 16 | (pda >> 6 & ((1 << 26) - 1)) << 38
                hi = sid | 1 << 18 | (pda >> 32) << 32
            else:
                lo = 1 | (0x20 + idx % 200) << 16 | (idx % 4) << 40
                hi = sid | 1 << 18
            b.add("irtes", unit=u, index=idx, lo=lo, hi=hi)
    for i, sbdf in enumerate(sbdfs):
        for v in range(min(4, per_unit)):
            b.add("vectors", sbdf=sbdf, unit=i % n_units, kind=E.VEC_MSIX,
                  flags=E.VEC_F_IRTE_KNOWN | E.VEC_F_ENABLED, vector=v,
                  irte_index=(i * 4 + v) % per_unit, sub_handle=0, irq=24 + i * 4 + v)
    for j in range(p["bars"]):
        sbdf = sbdfs[j % len(sbdfs)]
        idx = (j // len(sbdfs)) % 6
        start = 0xFE00_0000 + j * 0x10_0000 if idx != 2 else 0x80_0000_0000 + j * 0x100_0000
        size = 0x10_0000 if idx != 2 else 0x100_0000
        fl = E.BAR_F_MEM | (E.BAR_F_MEM64 | E.BAR_F_PREFETCH if idx == 2 else 0)
        raw = start | (0xC if idx == 2 else 0)
        b.add("bars", sbdf=sbdf, index=idx, flags=fl, start=start, size=size, raw=raw,
              res_flags=0x200 | (0x102000 if idx == 2 else 0))
    base_r = 0x4_0000_0000
    k = 0
    while sum(len(r) for a, r in b._rows.items() if a == "reserved") < p["reserved"]:
        b.add("reserved", start=base_r + k * 0x2000, size=0x1000, kind=5, unit=k % n_units)
        k += 1
    b.provenance = {"units": {"status": "captured", "source": "synthetic"}}
    return b.build()
