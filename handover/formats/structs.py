# handover: formats/structs.py
"""On-media layout of a handover state blob, format 1.x, defined with ``construct``.

This module is the single source of truth for the layout: the encoder and decoder derive
their ``struct`` formats from the records below (``RecordSpec``), and the kernel-side C
header is generated from the same definitions. Everything is little-endian, naturally
aligned, with explicit padding, so that a C struct of the same fields has the same size.

Blob layout::

    +0      FileHeader            64 bytes, header_crc covers bytes 0..59 and the table
    +64     SectionEntry[n]       40 bytes each
    ...     sections, each at an 8-byte aligned offset, in table order, contiguous; the
            gaps (at most 7 bytes of alignment) are zero. total_size ends the last one.

Record sections hold ``count`` fixed-size records of ``record_size`` bytes. A reader uses
the fields it knows and skips trailing bytes it does not (a newer minor only appends fields).
Byte sections (meta, provenance, config) have record_size 0.

Field comments give the kernel's names and bit positions (Linux 6.12:
include/linux/intel-iommu.h, drivers/iommu/intel/iommu.h and irq_remapping.c, and the
Intel VT-d specification's register and table-entry layouts).
"""

from __future__ import annotations

import struct
from collections import namedtuple
from dataclasses import dataclass, field

from construct import (
    Bytes,
    Const,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
)

MAGIC = b"HOVRSTAT"
FORMAT_MAJOR = 1
FORMAT_MINOR = 1  # what this writer emits by default
READ_MAJOR = 1    # the one major this reader reads (every minor of it)
WRITABLE_MINORS = (0, 1)

HEADER_SIZE = 64
HEADER_CRC_OFFSET = 60
SECTION_ENTRY_SIZE = 40
SECTION_ALIGN = 8
MAX_SECTIONS = 64          # a blob claiming more is refused before the table is read
MAX_BLOB_SIZE = 1 << 30    # 1 GiB: far above the largest real host (~40 MB)
#: The largest generation a header (u64) carries.
MAX_GENERATION = (1 << 64) - 1

FileHeader = Struct(
    "magic" / Const(MAGIC),          # +0  "HOVRSTAT"
    "major" / Int16ul,               # +8  format major: a reader refuses another major
    "minor" / Int16ul,               # +10 format minor: only adds sections / trailing fields
    "header_size" / Int32ul,         # +12 64 + 40 * section_count
    "total_size" / Int64ul,          # +16 the whole blob, in bytes
    "section_count" / Int32ul,       # +24
    "flags" / Int32ul,               # +28 HO_HDR_F_*, none defined in 1.x (must be 0)
    "generation" / Int64ul,          # +32 save generation (monotonic per host)
    "reserved" / Bytes(20),          # +40 zero
    "header_crc" / Int32ul,          # +60 CRC32C of bytes 0..59, then the section table
)
assert FileHeader.sizeof() == HEADER_SIZE

SectionEntry = Struct(
    "type" / Int16ul,                # +0  HO_SEC_* (enums.SectionType)
    "version" / Int16ul,             # +2  format minor that defined this record layout
    "flags" / Int32ul,               # +4  HO_SEC_F_REQUIRED bit 0, HO_SEC_F_ABSENT bit 1
    "offset" / Int64ul,              # +8  from the start of the blob, 8-byte aligned
    "length" / Int64ul,              # +16 bytes
    "count" / Int32ul,               # +24 records (0 for byte sections)
    "record_size" / Int32ul,         # +28 bytes per record (0 for byte sections)
    "crc" / Int32ul,                 # +32 CRC32C of the section's bytes
    "reserved" / Int32ul,            # +36 zero
)
assert SectionEntry.sizeof() == SECTION_ENTRY_SIZE

SEC_F_REQUIRED = 1 << 0   # a reader that does not know this type must refuse the blob
SEC_F_ABSENT = 1 << 1     # the writer could not capture this item (section is empty)
SEC_F_KNOWN = SEC_F_REQUIRED | SEC_F_ABSENT


# ---------------------------------------------------------------------------------------
# Records. Each is a construct Struct of fixed-size little-endian fields; ``since`` names
# the format minor that appended a trailing field (fields of minor 0 otherwise).

_FMT = {Int8ul: "B", Int16ul: "H", Int32ul: "I", Int64ul: "Q"}


@dataclass
class RecordSpec:
    """A fixed-size record type, derived from its construct definition."""

    name: str                       # C name suffix: struct ho_<name>
    struct_: Struct                 # the construct definition
    key: tuple[str, ...]            # fields that order and identify records
    since: dict[str, int] = field(default_factory=dict)  # field -> minor that added it
    fields: tuple[str, ...] = ()
    codes: dict = field(default_factory=dict)  # field -> struct code ("H", "Q", "16s", ...)
    fmt: str = ""
    size: int = 0
    tuple_type: type = tuple
    # (name or None for padding, end offset) per subcon: size_at/fields_at (called on every
    # encode and decode) read this instead of asking construct for sizes again
    layout: tuple[tuple[str | None, int], ...] = ()

    def __post_init__(self) -> None:
        names, fmt, off, layout = [], "<", 0, []
        for sc in self.struct_.subcons:
            width = sc.sizeof()
            layout.append((sc.name, off + width))
            assert sc.name is None or width > 8 or off % width == 0, (
                f"{self.name}.{sc.name} at offset {off} is not naturally aligned")
            off += width
            inner = sc.subcon if hasattr(sc, "subcon") and sc.name else sc
            if sc.name is None:  # Padding
                fmt += f"{sc.sizeof()}x"
                continue
            code = _FMT[inner] if inner in _FMT else f"{inner.sizeof()}s"  # else Bytes(n)
            fmt += code
            self.codes[sc.name] = code
            names.append(sc.name)
        self.fields = tuple(names)
        self.layout = tuple(layout)
        self.fmt = fmt
        self.size = struct.calcsize(fmt)
        assert self.size == self.struct_.sizeof(), self.name
        assert self.size % 8 == 0, f"{self.name}: {self.size} bytes is not 8-byte aligned"
        self.tuple_type = namedtuple(self.name.title().replace("_", ""), names)

    def size_at(self, minor: int) -> int:
        """Record size as a writer of format 1.<minor> lays it out."""
        size = 0
        for name, end in self.layout:
            if name is not None and self.since.get(name, 0) > minor:
                break
            size = end
        return size

    @property
    def min_size(self) -> int:
        return self.size_at(0)

    def fields_at(self, size: int) -> tuple[str, ...]:
        """The named fields wholly inside the first ``size`` bytes of a record."""
        out = []
        for name, end in self.layout:
            if end > size:
                break
            if name is not None:
                out.append(name)
        return tuple(out)


def _struct(*fields):
    return Struct(*fields)


# IOMMU unit: one per DRHD (struct intel_iommu; registers at reg_phys).
UNIT = RecordSpec(
    "unit",
    _struct(
        "unit" / Int16ul,           # index of this unit in the blob (the kernel's seq_id, dmar%d)
        "segment" / Int16ul,        # PCI segment (drhd->segment)
        "flags" / Int32ul,          # HO_UNIT_F_*: TE 0, IRE 1, X2APIC(EIME) 2, SM 3, QIE 4
        "present" / Int32ul,        # HO_UNIT_P_*: which register fields below were captured
        "ver" / Int32ul,            # VER 0x00: major 7:4, minor 3:0
        "reg_base" / Int64ul,       # register base physical address (iommu->reg_phys)
        "cap" / Int64ul,            # CAP 0x08
        "ecap" / Int64ul,           # ECAP 0x10
        "gsts" / Int32ul,           # GSTS 0x1c: TES 31, RTPS 30, QIES 26, IRES 25, IRTPS 24
        Padding(4),
        "rtaddr" / Int64ul,         # RTADDR 0x20: 63:12 root table PA, bit 10 DMA_RTADDR_SMT
        "irta" / Int64ul,           # IRTA 0xb8: 63:12 IRT PA, bit 11 EIME, 3:0 S (2^(S+1) entries)
        "iqa" / Int64ul,            # IQA 0x90: 63:12 base, bit 11 DW, 2:0 QS
        "iqh" / Int64ul,            # IQH 0x80 (since 1.1): queue head, byte offset
        "iqt" / Int64ul,            # IQT 0x88 (since 1.1): queue tail, byte offset
    ),
    key=("unit",),
    since={"iqh": 1, "iqt": 1},
)

# A DMA-remapping domain in use by a keepalive device (struct dmar_domain, per unit DID).
DOMAIN = RecordSpec(
    "domain",
    _struct(
        "unit" / Int16ul,           # unit index
        "did" / Int16ul,            # domain ID (struct iommu_domain_info.did); 0 and 1 reserved
        "tt" / Int8ul,              # translation type: legacy context TT (0 multi-level,
                                    # 1 +dev-TLB, 2 pass-through) or scalable PGTT | 0x80
        "agaw" / Int8ul,            # adjusted guest address width (1/2/3 = 39/48/57 bit)
        "gaw" / Int8ul,             # guest address width in bits (dmar_domain.gaw)
        "flags" / Int8ul,           # HO_DOM_F_*: FIRST_LEVEL 0, PASID 1
        "pgd" / Int64ul,            # page-table root physical address (dmar_domain.pgd)
    ),
    key=("unit", "did"),
)

# A context entry: which device (and PASID) is attached to which domain on which unit.
CONTEXT = RecordSpec(
    "context",
    _struct(
        "sbdf" / Int32ul,           # segment 31:16, bus 15:8, devfn 7:0
        "pasid" / Int32ul,          # PASID in scalable mode (valid if HO_CTX_F_PASID)
        "unit" / Int16ul,           # unit index
        "did" / Int16ul,            # domain ID from the entry (context hi 23:8 / PASID val[1] 15:0)
        "flags" / Int32ul,          # HO_CTX_F_*: SM 0 (scalable), PASID 1 (pasid valid)
        "root_lo" / Int64ul,        # root entry lo (P 0, CTP 63:12) / scalable LP+LCTP
        "root_hi" / Int64ul,        # root entry hi (scalable UP+UCTP)
        "lo" / Int64ul,             # context entry lo: P 0, FPD 1, TT 3:2, SLPTPTR 63:12
        "hi" / Int64ul,             # context entry hi: AW 2:0, DID 23:8
        "pasid_val0" / Int64ul,     # PASID entry val[0]: P, FPD, AW 4:2, PGTT 8:6, SSPTPTR 63:12
        "pasid_val1" / Int64ul,     # PASID entry val[1]: DID 15:0
        "pasid_val2" / Int64ul,     # PASID entry val[2]: FSPTPTR 63:12
    ),
    key=("unit", "sbdf", "pasid"),
)

# An interrupt-remapping table entry (struct irte, include/linux/dmar.h), raw 128 bits.
IRTE = RecordSpec(
    "irte",
    _struct(
        "index" / Int32ul,          # IRTE index in the unit's table
        "unit" / Int16ul,           # unit index (so word 0 = unit << 32 | index orders records)
        Padding(2),
        "lo" / Int64ul,             # bits 63:0  (P 0, FPD 1, IM 15, vector 23:16, DST/PDA_L)
        "hi" / Int64ul,             # bits 127:64 (SID 79:64, SQ 81:80, SVT 83:82, PDA_H 127:96)
    ),
    key=("unit", "index"),
)

# Device interrupt source -> IRTE (struct irq_2_iommu: irte_index, sub_handle).
VECTOR = RecordSpec(
    "vector",
    _struct(
        "sbdf" / Int32ul,           # device
        "unit" / Int16ul,           # unit whose IR table holds the entry (0xffff unknown)
        "kind" / Int8ul,            # HO_VEC_*: INTX 0, MSI 1, MSIX 2
        "flags" / Int8ul,           # HO_VEC_F_*: IRTE_KNOWN 0, POSTED 1, MASKED 2, ENABLED 3,
                                    # MSG_KNOWN 4, REMAPPED 5 (since 1.1)
        "vector" / Int32ul,         # msi_index: MSI-X table slot / MSI vector i / INTx pin
        "irte_index" / Int32ul,     # handle (+ sub_handle already applied when SHV)
        "sub_handle" / Int16ul,     # MSI data 15:0 when SHV
        Padding(2),
        "irq" / Int32ul,            # host Linux irq number (0 unknown)
    ),
    key=("sbdf", "kind", "vector"),
)

# Posted-interrupt descriptor (arch/x86/include/asm/posted_intr.h, 64 bytes).
PI_DESC = RecordSpec(
    "pi_desc",
    _struct(
        "phys" / Int64ul,           # physical address, 64-byte aligned
        "vm" / Bytes(16),           # owner VM UUID
        "vcpu" / Int32ul,           # owner vCPU index
        Padding(4),
        "raw" / Bytes(64),          # PIR 255:0, ON 256, SN 257, NV 279:272, NDST 319:288
    ),
    key=("phys",),
)

# A PCI resource of a keepalive device or bridge (the kernel's resource index).
BAR = RecordSpec(
    "bar",
    _struct(
        "sbdf" / Int32ul,           # device
        "index" / Int8ul,           # 0-5 BAR, 6 ROM, 7-12 SR-IOV VF BAR0-5, 13-16 bridge windows
        "flags" / Int8ul,           # HO_BAR_F_*: IO 0, MEM 1, MEM64 2, PREFETCH 3, ROM_EN 4, UNSET 5
        Padding(2),
        "start" / Int64ul,          # physical start (resource start)
        "size" / Int64ul,           # bytes (end - start + 1); 0 when unassigned
        "raw" / Int64ul,            # the BAR register(s) as read from config space (64-bit pair)
        "res_flags" / Int64ul,      # the kernel's IORESOURCE_* flags (sysfs "resource")
    ),
    key=("sbdf", "index"),
)

# A passthrough (keepalive) device.
DEVICE = RecordSpec(
    "device",
    _struct(
        "sbdf" / Int32ul,           # segment 31:16, bus 15:8, devfn 7:0
        "vendor" / Int16ul,         # PCI_VENDOR_ID 0x00
        "device" / Int16ul,         # PCI_DEVICE_ID 0x02
        "subsystem_vendor" / Int16ul,  # PCI_SUBSYSTEM_VENDOR_ID 0x2c
        "subsystem_device" / Int16ul,  # PCI_SUBSYSTEM_ID 0x2e
        "class_" / Int32ul,         # PCI_CLASS_REVISION 31:8 (24-bit class code)
        "revision" / Int8ul,        # PCI_REVISION_ID 0x08
        "header_type" / Int8ul,     # PCI_HEADER_TYPE 0x0e
        "flags" / Int16ul,          # HO_DEV_F_*: DSN 0, VF 1, PF 2, SRIOV_EN 3, BRIDGE 4,
                                    # KEEPALIVE 5, TOKEN 6, CONFIG_FULL 7
        "iommu_group" / Int32ul,    # iommu_group number (0xffffffff none)
        "dsn" / Int64ul,            # Device Serial Number (ext cap 0x0003), if HO_DEV_F_DSN
        "unit" / Int16ul,           # unit index covering the device (0xffff none)
        "num_vfs" / Int16ul,        # SR-IOV NumVFs
        "physfn" / Int32ul,         # sbdf of the PF when HO_DEV_F_VF (else 0xffffffff)
        "total_vfs" / Int16ul,      # SR-IOV TotalVFs
        "sriov_ctrl" / Int16ul,     # SR-IOV control (VFE 0x1, MSE 0x8, ARI 0x10)
        "config_offset" / Int32ul,  # config snapshot: offset into the CONFIG section
        "config_len" / Int32ul,     # config snapshot length (64, 256 or 4096)
        "driver" / Bytes(32),       # bound driver name, NUL padded ("vfio-pci")
        "token_salt" / Bytes(16),   # random salt
        "token_hash" / Bytes(32),   # SHA-256(token_salt || token UUID bytes), if HO_DEV_F_TOKEN
        Padding(4),
    ),
    key=("sbdf",),
)

# Upstream bridge path of a keepalive device, nearest bridge first.
BRIDGE = RecordSpec(
    "bridge",
    _struct(
        "sbdf" / Int32ul,           # the keepalive device
        "depth" / Int8ul,           # 0 = the device's immediate upstream bridge
        Padding(1),
        "command" / Int16ul,        # the bridge's PCI_COMMAND at save (MASTER 0x4 must stay)
        "bridge" / Int32ul,         # sbdf of the bridge
        Padding(4),
    ),
    key=("sbdf", "depth"),
)

# Physical ranges the next kernel must not reuse (memblock_reserve before the allocator).
RESERVED = RecordSpec(
    "reserved",
    _struct(
        "start" / Int64ul,          # physical start
        "size" / Int64ul,           # bytes
        "kind" / Int16ul,           # HO_RES_*: ROOT_TABLE 1, CONTEXT_TABLE 2, PASID_DIR 3,
                                    # PASID_TABLE 4, PAGE_TABLE 5, IR_TABLE 6, PI_DESC 7,
                                    # INV_QUEUE 8, REGION 9, DMA_BUFFER 10, OTHER 15
        "unit" / Int16ul,           # unit index, 0xffff when not tied to a unit
        "flags" / Int32ul,          # none defined
    ),
    key=("start", "size", "kind", "unit"),
)

RECORD_SPECS = {
    "unit": UNIT,
    "domain": DOMAIN,
    "context": CONTEXT,
    "irte": IRTE,
    "vector": VECTOR,
    "pi_desc": PI_DESC,
    "bar": BAR,
    "device": DEVICE,
    "bridge": BRIDGE,
    "reserved": RESERVED,
}

NONE16 = 0xFFFF
NONE32 = 0xFFFFFFFF


def make_sbdf(segment: int, bus: int, dev: int, fn: int) -> int:
    return (segment << 16) | (bus << 8) | (dev << 3) | fn


def split_sbdf(sbdf: int) -> tuple[int, int, int, int]:
    return sbdf >> 16, (sbdf >> 8) & 0xFF, (sbdf >> 3) & 0x1F, sbdf & 7
