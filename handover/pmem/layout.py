"""On-media layout of a handover pmem region (layout version 1.0).

The next kernel's early C code parses this, so everything is fixed-size little-endian, no
variable-length encodings, reserved fields are explicit and must be zero when written, and
every header copy carries its own CRC32C (Castagnoli, the kernel's ``crc32c()``: seed
0xFFFFFFFF, final xor 0xFFFFFFFF, i.e. ``~crc32c(~0, p, len)`` with lib/crc32c semantics).

Region map (offsets from the start of the region; ``A`` = slot alignment, 4 KiB for files
and block devices, the device ``align`` for device-dax)::

    0x0000  +--------------------------------------+
            | header copy A (512 B, rest of 4 KiB   |
            | block zero)                           |
    0x1000  +--------------------------------------+
            | header copy B (512 B, same format)    |
    0x2000  +--------------------------------------+
            | zero padding up to align_up(0x2000,A) |
    S0      +--------------------------------------+  S0 = slot[0].offset
            | slot 0: blob bytes [0, length)        |
            |         capacity = slot[0].capacity   |
    S1      +--------------------------------------+  S1 = slot[1].offset
            | slot 1                                |
            +--------------------------------------+  <= region_size

C view of one header copy (all fields little-endian)::

    struct hovr_slot_desc {          /* 48 bytes */
            __le64 offset;           /* slot start, bytes from region start, 4 KiB aligned */
            __le64 capacity;         /* slot size in bytes */
            __le64 generation;       /* generation whose blob is in the slot; 0 = empty */
            __le64 length;           /* blob length in bytes, <= capacity */
            __le64 commit_time_ns;   /* CLOCK_REALTIME of the commit, informational */
            __le32 crc;              /* crc32c of the length bytes at offset */
            __le32 flags;            /* reserved, 0 */
    };

    struct hovr_region_hdr {         /* 512 bytes, at 0x0 (copy A) and 0x1000 (copy B) */
            u8     magic[8];         /* "HOVRREGN" */
            __le16 layout_major;     /* 1; a reader refuses a larger major */
            __le16 layout_minor;     /* 0; additive changes only, readers ignore */
            __le32 header_size;      /* 512 */
            __le32 copy;             /* 0 = copy A, 1 = copy B */
            __le32 flags;            /* reserved, 0 */
            __le64 seq;              /* header update counter; both copies of one update
                                        carry the same value */
            __le64 region_size;      /* bytes covered by this layout */
            __le64 header_offset[2]; /* 0x0, 0x1000 */
            __le64 generation;       /* newest committed generation, 0 = none */
            __le32 active_slot;      /* slot holding `generation`, 0xffffffff = none */
            __le32 slot_align;       /* alignment of slot offsets (A) */
            u8     uuid[16];         /* region identity, set by init, same in both copies */
            __le64 phys_hint;        /* physical address of the region at init, 0 = unknown */
            __le64 init_time_ns;     /* CLOCK_REALTIME of init */
            struct hovr_slot_desc slot[2];
            u8     reserved[308];    /* 0 */
            __le32 hdr_crc;          /* crc32c of bytes [0, 508) of this copy */
    };

A C reader given only ``handover=<size>@<phys>``: map the first 8 KiB, take each copy whose
magic, ``layout_major == 1``, ``header_size == 512`` and ``hdr_crc`` verify; gather the
non-empty slot descriptors of both copies, try them newest generation first, and use the
first whose ``offset + length <= region_size``, ``length <= capacity`` and blob CRC verify.
phys(blob) = phys + slot[i].offset.
"""

from __future__ import annotations

import dataclasses
import uuid as _uuid

from construct import (
    Array,
    Bytes,
    Int16ul,
    Int32ul,
    Int64ul,
    Padding,
    Struct,
    StreamError,
    ConstError,
)

from handover.formats.crc import crc32c

from handover.formats.region import (  # noqa: F401,E402  (the layout is defined once, in formats)
    CRC_OFFSET,
    DATA_START,
    FIELD_OFFSETS,
    HEADER_BLOCK,
    HEADER_OFFSETS,
    HEADER_SIZE,
    LAYOUT_MAJOR,
    LAYOUT_MINOR,
    MIN_SLOT,
    NO_SLOT,
    REGION_MAGIC,
    Header,
    HeaderBody,
    SlotDesc,
)


@dataclasses.dataclass
class Slot:
    offset: int
    capacity: int
    generation: int = 0
    length: int = 0
    commit_time_ns: int = 0
    crc: int = 0
    flags: int = 0

    @property
    def empty(self) -> bool:
        return self.generation == 0


@dataclasses.dataclass
class RegionHeader:
    region_size: int
    slots: list[Slot]
    slot_align: int = MIN_SLOT
    seq: int = 0
    generation: int = 0
    active_slot: int = NO_SLOT
    uuid: bytes = b"\0" * 16
    phys_hint: int = 0
    init_time_ns: int = 0
    copy: int = 0
    layout_major: int = LAYOUT_MAJOR
    layout_minor: int = LAYOUT_MINOR
    flags: int = 0

    def copy_for(self, copy: int) -> "RegionHeader":
        return dataclasses.replace(self, copy=copy, slots=[dataclasses.replace(s) for s in self.slots])

    @property
    def uuid_str(self) -> str:
        return str(_uuid.UUID(bytes=self.uuid))


class HeaderDecodeError(Exception):
    """A header copy that is not usable; ``reason`` says why (one line)."""

    def __init__(self, reason: str, *, newer_layout: bool = False, no_magic: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.newer_layout = newer_layout
        self.no_magic = no_magic


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def plan_slots(region_size: int, slot_align: int = MIN_SLOT) -> list[Slot]:
    """Place two equal slots after the header blocks; raise ValueError when too small."""
    if slot_align < MIN_SLOT or slot_align & (slot_align - 1):
        raise ValueError(f"slot alignment {slot_align} must be a power of two >= {MIN_SLOT}")
    start = align_up(DATA_START, slot_align)
    cap = (region_size - start) // 2 // slot_align * slot_align
    if cap < MIN_SLOT:
        raise ValueError(
            f"region of {region_size} bytes is too small: two {slot_align}-aligned slots "
            f"after the {DATA_START}-byte header area need at least {start + 2 * max(MIN_SLOT, slot_align)} bytes"
        )
    return [Slot(offset=start, capacity=cap), Slot(offset=start + cap, capacity=cap)]


def encode_header(h: RegionHeader) -> bytes:
    body = HeaderBody.build(
        dict(
            magic=REGION_MAGIC,
            layout_major=h.layout_major,
            layout_minor=h.layout_minor,
            header_size=HEADER_SIZE,
            copy=h.copy,
            flags=h.flags,
            seq=h.seq,
            region_size=h.region_size,
            header_offset=list(HEADER_OFFSETS),
            generation=h.generation,
            active_slot=h.active_slot,
            slot_align=h.slot_align,
            uuid=h.uuid,
            phys_hint=h.phys_hint,
            init_time_ns=h.init_time_ns,
            slot=[dataclasses.asdict(s) for s in h.slots],
        )
    )
    return body + Int32ul.build(crc32c(body))


def has_magic(raw: bytes) -> bool:
    return raw[:8] == REGION_MAGIC


def decode_header(raw: bytes, *, copy: int, region_size: int | None = None) -> RegionHeader:
    """Decode and validate one header copy; raise HeaderDecodeError with the reason."""
    where = f"header copy {'AB'[copy]} at offset {HEADER_OFFSETS[copy]:#x}"
    if len(raw) < HEADER_SIZE:
        raise HeaderDecodeError(f"{where}: truncated ({len(raw)} of {HEADER_SIZE} bytes)")
    if not has_magic(raw):
        raise HeaderDecodeError(f"{where}: no region magic", no_magic=True)
    try:
        parsed = Header.parse(raw[:HEADER_SIZE])
    except (StreamError, ConstError) as e:  # pragma: no cover - fixed size, cannot happen
        raise HeaderDecodeError(f"{where}: unparsable ({e})") from None
    b = parsed.body
    want = crc32c(raw[:CRC_OFFSET])
    if parsed.hdr_crc != want:
        # A newer layout could have moved things, but the magic and version words stay put:
        # report the version first so a newer region is refused, not called corrupt.
        if b.layout_major > LAYOUT_MAJOR:
            raise HeaderDecodeError(
                f"{where}: region layout {b.layout_major}.{b.layout_minor} is newer than this "
                f"handover supports ({LAYOUT_MAJOR}.{LAYOUT_MINOR})", newer_layout=True)
        raise HeaderDecodeError(
            f"{where}: header CRC mismatch (stored {parsed.hdr_crc:#010x}, computed {want:#010x})")
    if b.layout_major != LAYOUT_MAJOR:
        if b.layout_major > LAYOUT_MAJOR:
            raise HeaderDecodeError(
                f"{where}: region layout {b.layout_major}.{b.layout_minor} is newer than this "
                f"handover supports ({LAYOUT_MAJOR}.{LAYOUT_MINOR})", newer_layout=True)
        raise HeaderDecodeError(f"{where}: unknown region layout major {b.layout_major}")
    if b.header_size != HEADER_SIZE:
        raise HeaderDecodeError(f"{where}: header_size {b.header_size}, expected {HEADER_SIZE}")
    if b["copy"] != copy:
        raise HeaderDecodeError(f"{where}: holds copy index {b['copy']}")
    size = b.region_size if region_size is None else min(b.region_size, region_size)
    if region_size is not None and b.region_size > region_size:
        raise HeaderDecodeError(
            f"{where}: records region_size {b.region_size} but the region has only {region_size} bytes")
    slots = []
    for i, s in enumerate(b.slot):
        if s.offset < DATA_START or s.offset % MIN_SLOT or s.offset + s.capacity > size:
            raise HeaderDecodeError(
                f"{where}: slot {i} bounds [{s.offset:#x}, +{s.capacity:#x}) outside the region")
        if s.length > s.capacity:
            raise HeaderDecodeError(f"{where}: slot {i} length {s.length} > capacity {s.capacity}")
        slots.append(Slot(s.offset, s.capacity, s.generation, s.length, s.commit_time_ns, s.crc, s.flags))
    a, c = slots
    if not (a.offset + a.capacity <= c.offset or c.offset + c.capacity <= a.offset):
        raise HeaderDecodeError(f"{where}: slots overlap")
    if b.active_slot not in (0, 1, NO_SLOT):
        raise HeaderDecodeError(f"{where}: active_slot {b.active_slot} invalid")
    return RegionHeader(
        region_size=b.region_size, slots=slots, slot_align=b.slot_align, seq=b.seq,
        generation=b.generation, active_slot=b.active_slot, uuid=b.uuid, phys_hint=b.phys_hint,
        init_time_ns=b.init_time_ns, copy=b["copy"], layout_major=b.layout_major,
        layout_minor=b.layout_minor, flags=b.flags,
    )
