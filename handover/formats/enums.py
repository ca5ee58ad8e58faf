# handover: formats/enums.py
"""Numbers and their names: section types, flag bits, kinds.

The values are part of the on-media format (and of the generated C header): never renumber,
only add.
"""

from __future__ import annotations

from enum import IntEnum


class SectionType(IntEnum):
    META = 1          # msgpack map: tool, host, kernels, generation (kernel may skip)
    UNIT = 2          # IOMMU units
    DOMAIN = 3        # DMA-remapping domains
    CONTEXT = 4       # context entries
    IRTE = 5          # interrupt-remapping entries
    VECTOR = 6        # device interrupt source -> IRTE map
    PI_DESC = 7       # posted-interrupt descriptors
    BAR = 8           # PCI resources
    DEVICE = 9        # passthrough devices
    BRIDGE = 10       # upstream bridge paths
    CONFIG = 11       # config-space snapshots (bytes, referenced from DEVICE)
    RESERVED = 12     # physical ranges the next kernel must not reuse
    PROVENANCE = 13   # msgpack map: item -> where it was captured from (since 1.1)


# section type -> (model attribute, record spec name or None for byte sections,
#                  since minor, flags the writer sets)
SECTION_LAYOUT = {
    SectionType.META: ("meta", None, 0, 0),
    SectionType.UNIT: ("units", "unit", 0, 1),
    SectionType.DOMAIN: ("domains", "domain", 0, 1),
    SectionType.CONTEXT: ("contexts", "context", 0, 1),
    SectionType.IRTE: ("irtes", "irte", 0, 1),
    SectionType.VECTOR: ("vectors", "vector", 0, 1),
    SectionType.PI_DESC: ("pi_descs", "pi_desc", 0, 1),
    SectionType.BAR: ("bars", "bar", 0, 1),
    SectionType.DEVICE: ("devices", "device", 0, 1),
    SectionType.BRIDGE: ("bridges", "bridge", 0, 1),
    SectionType.CONFIG: ("config", None, 0, 0),
    SectionType.RESERVED: ("reserved", "reserved", 0, 1),
    SectionType.PROVENANCE: ("provenance", None, 1, 0),
}

# Items a collector may be unable to capture (section flag ABSENT); by model attribute.
ITEMS = tuple(v[0] for v in SECTION_LAYOUT.values() if v[0] not in ("meta", "config", "provenance"))


def section_name(t: int) -> str:
    try:
        return SectionType(t).name
    except ValueError:
        return f"type-{t}"


# --- IOMMU unit -------------------------------------------------------------------------
UNIT_FLAGS = {0: "TE", 1: "IRE", 2: "X2APIC", 3: "SM", 4: "QIE"}
UNIT_F_TE, UNIT_F_IRE, UNIT_F_X2APIC, UNIT_F_SM, UNIT_F_QIE = (1 << i for i in range(5))

# which register fields of a UNIT record hold captured values
UNIT_PRESENT = {
    0: "ver", 1: "cap", 2: "ecap", 3: "gsts", 4: "rtaddr", 5: "irta", 6: "iqa", 7: "iqh", 8: "iqt",
}
UNIT_PRESENT_BIT = {v: 1 << k for k, v in UNIT_PRESENT.items()}

# RTADDR bits 11:10, TTM (translation table mode; Linux tests only bit 10, DMA_RTADDR_SMT)
RTADDR_TTM = {0: "legacy", 1: "scalable", 2: "reserved", 3: "abort-dma"}
# IRTA bit 11, EIME: 32-bit x2APIC destination IDs (irq_remapping.c IR_X2APIC_MODE)
IR_MODE = {False: "xAPIC", True: "x2APIC (EIM)"}

# GSTS bits (iommu.h:277-296)
GSTS_BITS = {31: "TES", 30: "RTPS", 29: "FLS", 28: "AFLS", 27: "WBFS", 26: "QIES",
             25: "IRES", 24: "IRTPS", 23: "CFIS"}

# --- domains ----------------------------------------------------------------------------
CONTEXT_TT = {0: "multi-level", 1: "multi-level+dev-tlb", 2: "pass-through"}
PASID_PGTT = {1: "first-level", 2: "second-level", 3: "nested", 4: "pass-through"}
DOMAIN_TT_SCALABLE = 0x80
DOMAIN_FLAGS = {0: "FIRST_LEVEL", 1: "PASID"}

# --- context ----------------------------------------------------------------------------
CONTEXT_FLAGS = {0: "SM", 1: "PASID"}
CTX_F_SM, CTX_F_PASID = 1, 2

# --- vectors ----------------------------------------------------------------------------
VECTOR_KIND = {0: "INTx", 1: "MSI", 2: "MSI-X"}
VEC_INTX, VEC_MSI, VEC_MSIX = 0, 1, 2
VECTOR_FLAGS = {0: "IRTE_KNOWN", 1: "POSTED", 2: "MASKED", 3: "ENABLED", 4: "MSG_KNOWN",
                5: "REMAPPED"}
VEC_F_IRTE_KNOWN, VEC_F_POSTED, VEC_F_MASKED, VEC_F_ENABLED = 1, 2, 4, 8
VEC_F_MSG_KNOWN = 16   # the MSI/MSI-X message (address/data) was read
VEC_F_REMAPPED = 32    # ... and it is in remappable format (else: compatibility format)

# --- BARs -------------------------------------------------------------------------------
BAR_FLAGS = {0: "IO", 1: "MEM", 2: "MEM64", 3: "PREFETCH", 4: "ROM_EN", 5: "UNSET"}
BAR_F_IO, BAR_F_MEM, BAR_F_MEM64, BAR_F_PREFETCH, BAR_F_ROM_EN, BAR_F_UNSET = (1 << i for i in range(6))


def bar_index_name(i: int) -> str:
    if i < 6:
        return f"BAR{i}"
    if i == 6:
        return "ROM"
    if 7 <= i <= 12:
        return f"VF-BAR{i - 7}"
    if 13 <= i <= 16:
        return f"BRIDGE-WIN{i - 13}"
    return f"RES{i}"


# --- devices ----------------------------------------------------------------------------
DEVICE_FLAGS = {0: "DSN", 1: "VF", 2: "PF", 3: "SRIOV_EN", 4: "BRIDGE", 5: "KEEPALIVE",
                6: "TOKEN", 7: "CONFIG_FULL"}
(DEV_F_DSN, DEV_F_VF, DEV_F_PF, DEV_F_SRIOV_EN, DEV_F_BRIDGE, DEV_F_KEEPALIVE,
 DEV_F_TOKEN, DEV_F_CONFIG_FULL) = (1 << i for i in range(8))

# SR-IOV control (extended capability 0x0010, +8)
SRIOV_CTRL_VFE, SRIOV_CTRL_MSE, SRIOV_CTRL_ARI = 0x1, 0x8, 0x10

# --- PCI (include/uapi/linux/pci_regs.h) ---------------------------------------------------
PCI_COMMAND_MASTER = 0x4
# PCI Express capability flags 7:4, the device/port type (PCI_EXP_TYPE_*)
PCIE_TYPE = {0: "endpoint", 1: "legacy endpoint", 4: "root port", 5: "upstream port",
             6: "downstream port", 7: "PCIe-to-PCI bridge", 8: "PCI-to-PCIe bridge",
             9: "root complex integrated endpoint", 10: "root complex event collector"}
PCIE_TYPE_PCI_BRIDGE, PCIE_TYPE_PCIE_BRIDGE = 7, 8

# --- reserved ranges --------------------------------------------------------------------
RESERVED_KIND = {1: "root-table", 2: "context-table", 3: "pasid-dir", 4: "pasid-table",
                 5: "page-table", 6: "ir-table", 7: "pi-desc", 8: "inv-queue", 9: "region",
                 10: "dma-buffer", 15: "other"}
RESERVED_KIND_VALUE = {v: k for k, v in RESERVED_KIND.items()}


def flag_names(value: int, table: dict[int, str]) -> list[str]:
    out = [name for bit, name in sorted(table.items()) if value & (1 << bit)]
    rest = value & ~sum(1 << b for b in table)
    if rest:
        out.append(f"0x{rest:x}")
    return out


# --- decoder verdicts (shared with the C parser: kernel-patches/.../handover_format.h) ---
class ErrorCode(IntEnum):
    OK = 0
    NOSTATE = 1          # empty, or the first 4 KiB are zero
    MAGIC = 2
    TRUNCATED = 3
    VERSION = 4          # another major
    SECTION_COUNT = 5
    HEADER_SIZE = 6
    HEADER_CRC = 7
    TOTAL_SIZE = 8       # over the 1 GiB limit
    TRAILING = 9
    SECTION_OFFSET = 10
    SECTION_LENGTH = 11
    SECTION_DUP = 12
    SECTION_END = 13
    PADDING = 14
    SECTION_CRC = 15
    REQUIRED = 16        # unknown section flagged REQUIRED
    BYTE_SECTION = 17
    RECORD_SIZE = 18
    RECORD_COUNT = 19
    ABSENT = 20
    MSGPACK = 21
    ORDER = 22
    UNIT_REF = 23
    IRTE_INDEX = 24
    CONFIG = 25
