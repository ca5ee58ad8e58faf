"""The on-media layout of a handover persistent-memory region, layout version 1.0.

Defined once, here, with construct: ``handover.pmem`` reads and writes it, and
``python -m handover.formats.cgen`` generates the C the kernel reads it with
(kernel-patches/src/include/linux/handover_region.h). A region holds two header copies
(512 bytes each, at 0x0 and 0x1000) and two slots for state blobs; every header copy
carries its own CRC32C of bytes [0, 508). Everything is fixed-size little-endian.
"""

from __future__ import annotations

from construct import Array, Bytes, Int16ul, Int32ul, Int64ul, Padding, Struct

REGION_MAGIC = b"HOVRREGN"
LAYOUT_MAJOR = 1
LAYOUT_MINOR = 0
HEADER_SIZE = 512
HEADER_BLOCK = 4096
HEADER_OFFSETS = (0, HEADER_BLOCK)
DATA_START = 2 * HEADER_BLOCK          # first byte after the two header blocks
NO_SLOT = 0xFFFFFFFF
CRC_OFFSET = HEADER_SIZE - 4           # 508
MIN_SLOT = 4096

SlotDesc = Struct(
    "offset" / Int64ul,
    "capacity" / Int64ul,
    "generation" / Int64ul,
    "length" / Int64ul,
    "commit_time_ns" / Int64ul,
    "crc" / Int32ul,
    "flags" / Int32ul,
)
assert SlotDesc.sizeof() == 48

# Everything up to (not including) hdr_crc: the CRC covers exactly these bytes.
HeaderBody = Struct(
    "magic" / Bytes(8),
    "layout_major" / Int16ul,
    "layout_minor" / Int16ul,
    "header_size" / Int32ul,
    "copy" / Int32ul,
    "flags" / Int32ul,
    "seq" / Int64ul,
    "region_size" / Int64ul,
    "header_offset" / Array(2, Int64ul),
    "generation" / Int64ul,
    "active_slot" / Int32ul,
    "slot_align" / Int32ul,
    "uuid" / Bytes(16),
    "phys_hint" / Int64ul,
    "init_time_ns" / Int64ul,
    "slot" / Array(2, SlotDesc),
    Padding(308),
)
assert HeaderBody.sizeof() == CRC_OFFSET, HeaderBody.sizeof()

Header = Struct("body" / HeaderBody, "hdr_crc" / Int32ul)
assert Header.sizeof() == HEADER_SIZE

# Field offsets the C side relies on (checked by the unit tests against the struct).
FIELD_OFFSETS = {
    "magic": 0, "layout_major": 8, "layout_minor": 10, "header_size": 12, "copy": 16,
    "flags": 20, "seq": 24, "region_size": 32, "header_offset": 40, "generation": 56,
    "active_slot": 64, "slot_align": 68, "uuid": 72, "phys_hint": 88, "init_time_ns": 96,
    "slot": 104, "reserved": 200, "hdr_crc": 508,
}
