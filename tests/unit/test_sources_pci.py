"""PCI, IOMMU sysfs, interrupts and iomem sources against the captured QEMU guest."""

import struct

import pytest

from handover.formats import enums as E
from handover.host import Sysroot, Vector, read_host
from handover.host.interrupts import decode_remappable, parse_proc_interrupts
from handover.host.iomem import parse_iomem, pmem_ranges
from handover.host.pci import parse_resource, upstream_of, walk_caps

from hosttree import CAPTURED, E1000E, EDU, copy_host, dev_dir


@pytest.fixture(scope="module")
def host():
    return read_host(str(CAPTURED))


def test_pci_identity_of_edu(host):
    d = host.devices[EDU]
    assert (d.vendor, d.device, d.subsystem_vendor, d.subsystem_device) == (0x1234, 0x11E8, 0x1AF4, 0x1100)
    assert d.class_ == 0x00FF00 and d.revision == 0x10 and d.driver == "vfio-pci"
    assert d.iommu_group == 2 and d.iommu == "dmar0" and d.config_full
    assert d.resources[0] == (0xFEA00000, 0xFEAFFFFF, 0x40200) and len(d.resources) == 13
    assert d.caps.msi.enabled and d.caps.msi.addr_lo == 0xFEE00358
    assert d.upstream == []


def test_pci_e1000e_caps(host):
    d = host.devices[E1000E]
    assert d.driver == "e1000e" and len(d.config) == 4096 and d.config_full
    m = d.caps.msix
    assert m.enabled and m.size == 5 and m.table_bir == 3 and m.table_offset == 0
    assert m.pba_offset == 0x2000 and d.caps.pcie_type is not None
    assert d.caps.dsn == struct.unpack_from("<Q", d.config, d.caps.dsn_offset + 4)[0]


def test_walk_caps_is_bounded():
    cfg = bytearray(256)
    cfg[6] = 0x10
    cfg[0x34] = 0x40
    cfg[0x40:0x42] = bytes([0x05, 0x40])          # points at itself
    caps = walk_caps(bytes(cfg))
    assert len(caps.cap_ids) == 48
    assert walk_caps(bytes(cfg[:0x41])).cap_ids == []  # truncated: no crash
    assert walk_caps(b"").cap_ids == []


def test_parse_resource_and_upstream():
    assert parse_resource("0x0000000000001000 0x0000000000001fff 0x0000000000000200\n") == [(0x1000, 0x1FFF, 0x200)]
    with pytest.raises(ValueError):
        parse_resource("0x1 0x2\n")
    assert upstream_of("/sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0/0000:02:00.1") == \
        ["0000:01:00.0", "0000:00:1c.0"]


def test_units_from_sysfs(host):
    u = host.units["dmar0"]
    assert u.reg_base == 0xFED90000 and u.regs.cap == 0xD2008C22260206
    assert u.regs.ecap == 0xF00F4A and u.regs.ver == 0x10
    assert EDU in u.devices and u.regs.gsts is None
    assert u.ir_enabled is True and "IR-" in u.ir_enabled_source


def test_proc_interrupts(host):
    irqs = parse_proc_interrupts((CAPTURED / "proc/interrupts").read_text())
    assert irqs[32].chip == "IR-PCI-MSI-0000:00:03.0" and irqs[32].hwirq == 0
    assert irqs[32].actions == "vfio-msi[0](0000:00:03.0)" and irqs[32].counts == [1]
    assert irqs[31].chip == "IR-PCI-MSIX-0000:00:04.0" and irqs[31].hwirq == 2
    assert irqs[0].chip == "IR-IO-APIC" and "NMI" not in irqs


def test_decode_remappable():
    assert decode_remappable(0xFEE00358, 0) == {"handle": 26, "shv": True, "sub_handle": 0, "index": 26}
    h = 0x8000 | 5   # handle bit 15 goes to address bit 2
    lo = 0xFEE00000 | (h & 0x7FFF) << 5 | 1 << 4 | 1 << 3 | 1 << 2
    assert decode_remappable(lo, 3)["index"] == h + 3
    assert decode_remappable(lo & ~(1 << 3), 3)["index"] == h
    assert decode_remappable(0xFEE01000, 0x4021) is None     # compatibility format


def test_vectors_of_edu(host):
    v = host.devices[EDU].vectors
    assert v == [Vector(kind=E.VEC_MSI, vector=0, irq=32, unit=0, masked=False, enabled=True,
                        irte_index=26, sub_handle=0, remapped=True)]


def test_msix_table_through_resource(tmp_path):
    root = copy_host(tmp_path / "h")
    table = b"".join(struct.pack("<IIII", 0xFEE00000 | (40 + i) << 5 | 0x18, 0, 0, i == 4)
                     for i in range(5))
    (dev_dir(root, E1000E) / "resource3").write_bytes(table + bytes(0x4000 - len(table)))
    h = read_host(str(root), wanted={E1000E})
    v = h.devices[E1000E].vectors
    assert [(x.vector, x.irq, x.irte_index) for x in v] == [(0, 29, 40), (1, 30, 41), (2, 31, 42)]
    assert h.notes["vectors.irte_index"].status == "captured"


def test_msix_table_unreadable_reason(tmp_path):
    root = copy_host(tmp_path / "h")
    h = read_host(str(root), wanted={E1000E})
    d = h.devices[E1000E]
    assert d.vectors[0].irte_index is None and len(d.vectors) == 3
    assert d.msix_reason.startswith("msix table: ") and "resource3" in d.msix_reason
    (dev_dir(root, E1000E) / "resource3").write_bytes(b"")   # mmap of an empty file fails
    h = read_host(str(root), wanted={E1000E})
    assert "resource3 mmap refused: EINVAL" in h.devices[E1000E].msix_reason
    assert "E1000E" not in h.notes["vectors.irte_index"].reason
    assert "0000:00:04.0" in h.notes["vectors.irte_index"].reason


def test_iomem(host):
    rs = parse_iomem((CAPTURED / "proc/iomem").read_text())
    assert pmem_ranges(rs) == [(0x30000000, 0x33FFFFFF, "Persistent Memory (legacy)")]
    assert (0xFED90000, 0xFED90FFF, "dmar0", 0) in rs
    with pytest.raises(ValueError):
        parse_iomem("garbage\n")


def test_sysroot_resolves_links_inside_root():
    sr = Sysroot(str(CAPTURED), record=True)
    assert sr.resolve("/sys/bus/pci/devices/0000:00:03.0/driver") == "/sys/bus/pci/drivers/vfio-pci"
    sr.read_text("/sys/bus/pci/devices/0000:00:03.0/vendor")
    assert "/sys/devices/pci0000:00/0000:00:03.0/vendor" in sr.files
    assert sr.links["/sys/bus/pci/devices/0000:00:03.0"].endswith("devices/pci0000:00/0000:00:03.0")
