"""intel-iommu debugfs parsers against text in the exact 6.12 printf formats."""

import pytest

from handover.host import read_host
from handover.host.iommu_debugfs import (
    DebugfsFormatError,
    parse_dmar_translation,
    parse_domain_translation,
    parse_ir_translation,
    parse_regset,
)

from hosttree import DEBUGFS, copy_host

INTEL = DEBUGFS / "sys/kernel/debug/iommu/intel"


def test_regset_constructed_fixture():
    d = parse_regset((INTEL / "iommu_regset").read_text())
    assert list(d) == ["dmar0"]
    u = d["dmar0"]
    assert u["base"] == 0xFED90000
    assert u["regs"]["GSTS"] == 0xC7000000 and u["offsets"]["GSTS"] == 0x1C
    assert u["regs"]["IRTA"] == 0x2E0000F and u["regs"]["CAP"] == 0xD2008C22260206
    assert u["offsets"]["MTRRDEF"] == 0x108


def test_regset_two_units_and_garbage():
    text = ""
    for n, base in (("dmar0", 0xfed90000), ("dmar1", 0xfed91000)):
        text += f"IOMMU: {n} Register Base Address: {base:x}\nName\t\t\tOffset\t\tContents\n"
        text += "%-16s\t0x%02x\t\t0x%016x\n" % ("GSTS", 0x1c, 0x42000000 if n == "dmar1" else 0)
        text += "%-16s\t0x%02x\t\t0x%016x\n\n" % ("MTRR_PHYSMASK9", 0x1a8, 1)
    d = parse_regset(text)
    assert d["dmar1"]["regs"]["GSTS"] == 0x42000000 and d["dmar0"]["regs"]["GSTS"] == 0
    assert d["dmar1"]["regs"]["MTRR_PHYSMASK9"] == 1
    with pytest.raises(DebugfsFormatError, match="line 3"):
        parse_regset(text.replace("0x1c\t\t", "0x1c\t"))


def test_dmar_translation_legacy():
    d = parse_dmar_translation((INTEL / "dmar_translation_struct").read_text())
    u = d["dmar0"]
    assert u["enabled"] and u["root"] == 0x2F0E000
    edu = [e for e in u["entries"] if e.devfn == 0x18][0]
    assert edu.pasid is None and edu.root_lo == 0x2F10001
    assert edu.hi >> 8 == 6 and edu.lo & ~0xFFF == 0x3A5C000
    assert len(u["entries"]) == 9


def test_dmar_translation_scalable_and_disabled():
    text = "DMA Remapping is not enabled on dmar1\n"
    text += "IOMMU dmar0: Root Table Address: 0x1000\n"
    text += "B.D.F\tRoot_entry\t\t\t\tContext_entry\t\t\t\tPASID\tPASID_table_entry\n"
    row = "%02x:%02x.%x\t0x%016x:0x%016x\t0x%016x:0x%016x\t" % (0x3d, 0, 0, 0x7001, 0x5001, 0, 0x9001)
    for pasid in (0, 65):
        text += row + "%-6d\t0x%016x:0x%016x:0x%016x\n" % (pasid, 0xabc000, 0x12, 0x8000 | 2 << 6 | 1)
    text += "\n"
    d = parse_dmar_translation(text)
    assert d["dmar1"] == {"enabled": False, "root": None, "entries": []}
    e = d["dmar0"]["entries"]
    assert [x.pasid for x in e] == [0, 65] and e[1].bus == 0x3d
    assert e[0].pasid_val1 == 0x12 and e[0].pasid_val2 == 0xabc000 and e[0].root_hi == 0x7001


def test_domain_translation_levels():
    doms = parse_domain_translation((INTEL / "0000:00:03.0/domain_translation_struct").read_text())
    assert len(doms) == 1
    d = doms[0]
    assert d.device == "0000:00:03.0" and d.pgd == 0x3A5C000 and d.pasid is None
    assert len(d.leaves) == 9
    pfn, vals = d.leaves[0]
    assert pfn == 0x100 and vals[2:] == (0x3A5D003, 0x3A5E003, 0x5000003)
    pfn, vals = d.leaves[-1]
    assert pfn == 0x200 and vals[3] == 0x5200083 and vals[4] == 0


def test_domain_translation_with_pasid():
    text = "Device %04x:%02x:%02x.%x " % (0, 0x3d, 0, 1) + "with pasid %x @0x%x\n" % (0x1f, 0x4000)
    text += "%-17s\t%-18s\t%-18s\t%-18s\t%-18s\t%-s\n" % ("IOVA_PFN", "PML5E", "PML4E", "PDPE", "PDE", "PTE")
    text += "0x%013x |\t0x%016x\t0x%016x\t0x%016x\n" % (0x40000, 0, 0x5003, 0x40000083)
    d = parse_domain_translation(text)[0]
    assert d.pasid == 0x1f and d.device == "0000:3d:00.1"
    assert d.leaves == [(0x40000, (0, 0x5003, 0x40000083, 0, 0))]
    with pytest.raises(DebugfsFormatError):
        parse_domain_translation(text + "0x1 | junk\n")


def test_ir_translation_constructed():
    d = parse_ir_translation((INTEL / "ir_translation_struct").read_text())
    u = d["dmar0"]
    assert u["enabled"] is True and u["table"] == 0x2E00000 and not u["posted_supported"]
    lo, hi = u["entries"][26]
    assert hi & 0xFFFF == 0x0018 and lo >> 16 & 0xFF == 0x28 and lo & 1
    assert len(u["entries"]) == 15


def _posted_text(pda_l_ok=True):
    lo_r = 1 | 0x41 << 16 | (0x0100 << 32)
    hi_r = 0x0300 | 1 << 18
    pda = 0x1_2345_6780
    lo_p = 1 | 1 << 15 | 0x55 << 16 | ((pda >> 6) & ((1 << 26) - 1)) << 38
    hi_p = 0x0300 | 1 << 18 | (pda >> 32) << 32
    t = "Remapped Interrupt supported on IOMMU: dmar0\n IR table address:100900000\n"
    t += " Entry SrcID   DstID    Vct IRTE_high\t\tIRTE_low\n"
    t += " %-5d %02x:%02x.%01x %08x %02x  %016x\t%016x\n" % (3, 3, 0, 0, lo_r >> 32, 0x41, hi_r, lo_r)
    t += "\nRemapped Interrupt supported on IOMMU: dmar1\nInterrupt Remapping is not enabled\n\n****\n\n"
    t += "Posted Interrupt supported on IOMMU: dmar0\n IR table address:100900000\n"
    t += " Entry SrcID   PDA_high PDA_low  Vct IRTE_high\t\tIRTE_low\n"
    pl = (lo_p >> 38) << 6 if pda_l_ok else 0x40
    t += " %-5d %02x:%02x.%01x %08x %08x %02x  %016x\t%016x\n" % (70, 3, 0, 0, hi_p >> 32, pl, 0x55, hi_p, lo_p)
    return t + "\n", (lo_r, hi_r), (lo_p, hi_p)


def test_ir_translation_posted_and_disabled():
    text, r, p = _posted_text()
    d = parse_ir_translation(text)
    assert d["dmar1"]["enabled"] is False and d["dmar1"]["entries"] == {}
    assert d["dmar0"]["posted_supported"] and d["dmar0"]["table"] == 0x100900000
    assert d["dmar0"]["entries"] == {3: r, 70: p}


def test_ir_translation_inconsistent_columns_rejected():
    text, _r, _p = _posted_text(pda_l_ok=False)
    with pytest.raises(DebugfsFormatError, match="do not match"):
        parse_ir_translation(text)


def test_source_fills_units_from_debugfs(tmp_path):
    root = copy_host(tmp_path / "h", debugfs=True)
    h = read_host(str(root))
    u = h.units["dmar0"]
    assert u.regs.gsts == 0xC7000000 and u.reg_source["gsts"] == "intel-iommu-debugfs"
    assert u.ir_enabled is True and u.ir_enabled_source.startswith("intel-iommu-debugfs")
    assert u.irtes[26][1] & 0xFFFF == 0x18 and u.contexts and u.root_table == 0x2F0E000
    assert h.devices["0000:00:03.0"].domain.pgd == 0x3A5C000
    assert h.notes["irtes"].status == "captured"


def test_source_absent_reasons(tmp_path):
    root = copy_host(tmp_path / "h")
    h = read_host(str(root))
    assert h.notes["irtes"].status == "absent"
    assert "debugfs not mounted" in h.notes["irtes"].reason
    (root / "sys/kernel/debug/tracing").mkdir(parents=True)
    h = read_host(str(root))
    assert h.notes["irtes"].reason == ("no intel-iommu debugfs (CONFIG_INTEL_IOMMU_DEBUGFS) "
                                          "at /sys/kernel/debug/iommu/intel")
