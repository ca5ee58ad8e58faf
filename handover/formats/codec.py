# handover: formats/codec.py
"""Encode a State to a blob and decode (with verification) a blob to a State.

Decoding is bounded: every count, offset and length is checked against the section and the
blob before anything is sliced or allocated, so a hostile blob costs at most its own size.
Every failure raises one ``IntegrityError`` / ``VersionError`` / ``NoStateError`` whose
message names the section and the byte offset.
"""

from __future__ import annotations

import bisect
import functools
import operator
import struct

from ..errors import IntegrityError, NoStateError, VersionError
from .crc import crc32c
from .enums import SECTION_LAYOUT, SectionType, section_name
from .model import State, Table, UnknownSection
from .structs import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HEADER_CRC_OFFSET,
    HEADER_SIZE,
    MAGIC,
    MAX_BLOB_SIZE,
    MAX_GENERATION,
    MAX_SECTIONS,
    READ_MAJOR,
    RECORD_SPECS,
    SEC_F_ABSENT,
    SEC_F_REQUIRED,
    SECTION_ALIGN,
    SECTION_ENTRY_SIZE,
    WRITABLE_MINORS,
    FileHeader,
    SectionEntry,
)

# raw struct twins of the construct header definitions (the construct ones are used to
# build; these unpack the untrusted header without construct's per-field overhead; a unit
# test checks they agree byte for byte)
_HDR = struct.Struct("<8sHHIQIIQ20sI")
_SEC = struct.Struct("<HHIQQIIII")
assert _HDR.size == HEADER_SIZE and _SEC.size == SECTION_ENTRY_SIZE


def _align(n: int) -> int:
    return (n + SECTION_ALIGN - 1) & ~(SECTION_ALIGN - 1)


def canonical(obj):
    """Make msgpack output deterministic: dict keys sorted (recursively)."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj, key=lambda k: (str(type(k)), k))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return obj


def _packb(obj) -> bytes:
    import msgpack

    return msgpack.packb(canonical(obj), use_bin_type=True)


@functools.lru_cache(maxsize=None)
def _record_shape(spec_name: str, minor: int, since: int) -> tuple[int, int]:
    """(record size, section version) of a record section as format 1.<minor> writes it."""
    spec = RECORD_SPECS[spec_name]
    size = spec.size_at(minor)
    return size, max([spec.since.get(f, 0) for f in spec.fields_at(size)] + [since])


# ---------------------------------------------------------------------------------------
def encode(state: State, minor: int = FORMAT_MINOR, generation: int | None = None) -> bytes:
    """Encode ``state`` as format 1.<minor>. Same state, same bytes."""
    if minor not in WRITABLE_MINORS:
        known = ", ".join(f"{FORMAT_MAJOR}.{m}" for m in WRITABLE_MINORS)
        raise VersionError(f"cannot write format {FORMAT_MAJOR}.{minor}: this writer emits {known}")
    if generation is None:
        # a built state names its generation in META; a decoded one in its header (META is
        # anyone's msgpack: a value that is not a u64 is not taken)
        g = state.meta.get("generation") if isinstance(state.meta, dict) else None
        ok = isinstance(g, int) and not isinstance(g, bool) and 0 <= g <= MAX_GENERATION
        generation = g if ok else state.generation
    sections = []  # (type, version, flags, count, record_size, data)
    for stype, (attr, spec_name, since, wflags) in SECTION_LAYOUT.items():
        if since > minor:
            continue
        flags = wflags
        if spec_name:
            spec = RECORD_SPECS[spec_name]
            table: Table = getattr(state, attr)
            size, version = _record_shape(spec_name, minor, since)
            data = table.buf
            if size != spec.size:
                mv = memoryview(data)
                data = b"".join([mv[i:i + size] for i in range(0, len(data), spec.size)])
            if attr in state.absent:
                if len(table):
                    raise ValueError(f"{attr}: marked absent but has {len(table)} records")
                flags |= SEC_F_ABSENT
            sections.append((stype, version, flags, len(table), size, data))
        else:
            if attr == "config":
                data = state.config
            else:
                data = _packb(getattr(state, attr))
            sections.append((stype, since, flags, 0, 0, data))

    return assemble(sections, FORMAT_MAJOR, minor, generation)


def assemble(sections, major: int, minor: int, generation: int) -> bytes:
    """Lay out (type, version, flags, count, record_size, data) sections with header,
    table, alignment padding and CRCs. Used by ``encode``; tests use it to build blobs
    of other versions (newer minors, other majors) with valid checksums."""
    n = len(sections)
    header_size = HEADER_SIZE + SECTION_ENTRY_SIZE * n
    table_bytes, body, off = [], [], _align(header_size)
    pad0 = off - header_size
    for i, (stype, version, flags, count, rsize, data) in enumerate(sections):
        table_bytes.append(_SEC.pack(stype, version, flags, off, len(data), count, rsize,
                                     crc32c(data), 0))
        body.append(data)
        end = off + len(data)
        if i + 1 < n:
            pad = _align(end) - end
            body.append(b"\0" * pad)
            end += pad
        off = end
    total = off if n else header_size
    if not n:
        pad0 = 0
    hdr = FileHeader.build(dict(major=major, minor=minor, header_size=header_size,
                                total_size=total, section_count=n, flags=0,
                                generation=generation, reserved=bytes(20), header_crc=0))
    tbl = b"".join(table_bytes)
    hcrc = crc32c(tbl, crc32c(hdr[:HEADER_CRC_OFFSET]))
    hdr = hdr[:HEADER_CRC_OFFSET] + struct.pack("<I", hcrc)
    return b"".join([hdr, tbl, b"\0" * pad0] + body)


# ---------------------------------------------------------------------------------------
def _where(i: int, stype: int, off: int) -> str:
    return f"section #{i} {section_name(stype)} at offset 0x{off:x}"


def read_header(blob) -> dict:
    """Check and return the file header fields (bounded; no allocation)."""
    n = len(blob)
    if n == 0:
        raise NoStateError("no handover state: source is empty", code="NOSTATE")
    if n < 8 or bytes(blob[:8]) != MAGIC:
        head = bytes(blob[:min(n, 4096)])
        if not any(head):
            raise NoStateError("no handover state: source is all zeroes at offset 0", code="NOSTATE")
        if n < 8 and MAGIC.startswith(head):
            raise IntegrityError(f"truncated: {n} bytes, the header needs {HEADER_SIZE}", code="TRUNCATED")
        raise IntegrityError(f"bad magic at offset 0x0: {head[:8]!r} is not {MAGIC!r}", code="MAGIC")
    if n < HEADER_SIZE:
        raise IntegrityError(f"truncated: {n} bytes, the header needs {HEADER_SIZE}", code="TRUNCATED")
    (_m, major, minor, header_size, total, count, flags, generation, _r,
     hcrc) = _HDR.unpack_from(blob, 0)
    if major != READ_MAJOR:
        raise VersionError(f"format {major}.{minor} is not supported: this reader reads "
                           f"{READ_MAJOR}.x (writes up to {FORMAT_MAJOR}.{FORMAT_MINOR})", code="VERSION")
    if count > MAX_SECTIONS:
        raise IntegrityError(f"header at offset 0x18: section count {count} exceeds the "
                             f"limit of {MAX_SECTIONS}", code="SECTION_COUNT")
    if header_size != HEADER_SIZE + SECTION_ENTRY_SIZE * count:
        raise IntegrityError(f"header at offset 0xc: header size {header_size} does not match "
                             f"{count} sections ({HEADER_SIZE + SECTION_ENTRY_SIZE * count})", code="HEADER_SIZE")
    if n < header_size:
        raise IntegrityError(f"truncated: {n} bytes, the header and section table need "
                             f"{header_size}", code="TRUNCATED")
    calc = crc32c(bytes(blob[HEADER_SIZE:header_size]), crc32c(bytes(blob[:HEADER_CRC_OFFSET])))
    if calc != hcrc:
        raise IntegrityError(f"header at offset 0x0: checksum mismatch (stored 0x{hcrc:08x}, "
                             f"computed 0x{calc:08x})", code="HEADER_CRC")
    if total > MAX_BLOB_SIZE:
        raise IntegrityError(f"header at offset 0x10: total size {total} exceeds the limit "
                             f"of {MAX_BLOB_SIZE}", code="TOTAL_SIZE")
    if total > n:
        raise IntegrityError(f"truncated: header says {total} bytes, source has {n}", code="TRUNCATED")
    if total < n:
        raise IntegrityError(f"trailing data: {n - total} bytes after the end of the state "
                             f"at offset 0x{total:x}", code="TRAILING")
    return dict(major=major, minor=minor, header_size=header_size, total_size=total,
                section_count=count, flags=flags, generation=generation, header_crc=hcrc)


def header_checksum_ok(blob) -> bool | None:
    """Does the header CRC verify in this major's layout (header and section table)? None
    when the header cannot be laid out that way (too short, another layout).

    ``read_header`` refuses another major before it checks the CRC, as the kernel's parser
    does; a caller that names the failure to a person asks this first: a header whose CRC
    fails is damaged (a flipped bit in the major field), not of another version."""
    n = len(blob)
    if n < HEADER_SIZE:
        return None
    (_m, _major, _minor, header_size, _total, count, _flags, _gen, _r,
     hcrc) = _HDR.unpack_from(blob, 0)
    if count > MAX_SECTIONS or header_size != HEADER_SIZE + SECTION_ENTRY_SIZE * count \
            or n < header_size:
        return None
    return crc32c(bytes(blob[HEADER_SIZE:header_size]),
                  crc32c(bytes(blob[:HEADER_CRC_OFFSET]))) == hcrc


def read_sections(blob, hdr: dict) -> list[dict]:
    """Check the section table and every section's CRC; return the entries."""
    out, seen = [], set()
    expect = _align(hdr["header_size"])
    if bytes(blob[hdr["header_size"]:expect]).strip(b"\0"):
        raise IntegrityError(f"padding at offset 0x{hdr['header_size']:x} is not zero", code="PADDING")
    total = hdr["total_size"]
    mv = memoryview(blob)
    for i in range(hdr["section_count"]):
        ent_off = HEADER_SIZE + i * SECTION_ENTRY_SIZE
        stype, version, flags, off, length, count, rsize, scrc, _r = _SEC.unpack_from(blob, ent_off)
        where = _where(i, stype, off)
        if off != expect:
            raise IntegrityError(f"{where}: expected at offset 0x{expect:x} (section table "
                                 f"entry at 0x{ent_off:x})", code="SECTION_OFFSET")
        if length > total - off:
            raise IntegrityError(f"{where}: length {length} runs past the end of the state "
                                 f"(0x{total:x})", code="SECTION_LENGTH")
        if stype in seen:
            raise IntegrityError(f"{where}: duplicate section type", code="SECTION_DUP")
        seen.add(stype)
        end = off + length
        last = i + 1 == hdr["section_count"]
        nxt = end if last else _align(end)
        if last and end != total:
            raise IntegrityError(f"{where}: the last section ends at 0x{end:x}, the state at "
                                 f"0x{total:x}", code="SECTION_END")
        if nxt > total:
            raise IntegrityError(f"{where}: padding runs past the end of the state", code="SECTION_END")
        if bytes(mv[end:nxt]).strip(b"\0"):
            raise IntegrityError(f"padding at offset 0x{end:x} after {where} is not zero", code="PADDING")
        data = bytes(mv[off:end])  # the one copy: CRC'd here, kept by the table
        calc = crc32c(data)
        if calc != scrc:
            raise IntegrityError(f"{where}: checksum mismatch (stored 0x{scrc:08x}, computed "
                                 f"0x{calc:08x})", code="SECTION_CRC")
        out.append(dict(index=i, type=stype, version=version, flags=flags, offset=off,
                        length=length, count=count, record_size=rsize, crc=scrc, data=data))
        expect = nxt
    if hdr["section_count"] == 0 and total != hdr["header_size"]:
        raise IntegrityError(f"header at offset 0x10: total size {total} but no sections", code="SECTION_END")
    return out


def decode(blob, *, check_refs: bool = True) -> State:
    """Verify and decode ``blob`` (bytes-like). Raises a HandoverError on any defect."""
    hdr = read_header(blob)
    entries = read_sections(blob, hdr)
    st = State(version=(hdr["major"], hdr["minor"]), generation=hdr["generation"], header=hdr)
    absent = set()
    by_type = {int(t): v for t, v in SECTION_LAYOUT.items()}
    for e in entries:
        stype, off, length = e["type"], e["offset"], e["length"]
        where = _where(e["index"], stype, off)
        data = e.pop("data")
        st.sections.append(e)
        layout = by_type.get(stype)
        if layout is None:
            if e["flags"] & SEC_F_REQUIRED:
                raise VersionError(f"{where}: section type {stype} is required but unknown to "
                                   f"this reader (blob {hdr['major']}.{hdr['minor']}, reader "
                                   f"{FORMAT_MAJOR}.{FORMAT_MINOR})", code="REQUIRED")
            if (e["count"] or e["record_size"]) and e["count"] * e["record_size"] != length:
                raise IntegrityError(f"{where}: {e['count']} records of {e['record_size']} bytes do "
                                     f"not fill the section length {length}", code="RECORD_COUNT")
            st.unknown_sections.append(UnknownSection(stype, e["version"], e["flags"], e["count"],
                                                      e["record_size"], data))
            continue
        attr, spec_name, _since, _f = layout
        if spec_name is None:
            if e["count"] or e["record_size"]:
                raise IntegrityError(f"{where}: byte section with count {e['count']} and record "
                                     f"size {e['record_size']} (both must be 0)", code="BYTE_SECTION")
            if attr == "config":
                st.config = data
            else:
                setattr(st, attr, _unpack_map(data, where))
            continue
        spec = RECORD_SPECS[spec_name]
        count, rsize = e["count"], e["record_size"]
        if rsize < spec.min_size:
            raise IntegrityError(f"{where}: record size {rsize} is smaller than the "
                                 f"{spec.min_size} bytes of a {spec.name} record", code="RECORD_SIZE")
        if count * rsize != length:
            raise IntegrityError(f"{where}: {count} records of {rsize} bytes do not fill the "
                                 f"section length {length}", code="RECORD_COUNT")
        if e["flags"] & SEC_F_ABSENT:
            if count:
                raise IntegrityError(f"{where}: marked absent but holds {count} records", code="ABSENT")
            absent.add(attr)
        if rsize == spec.size:
            buf = data
        elif rsize > spec.size:  # newer minor: skip the trailing fields we do not know
            buf = b"".join([data[i:i + spec.size] for i in range(0, length, rsize)])
        else:  # older minor: the missing trailing fields read as zero (absent)
            fill = bytes(spec.size - rsize)
            buf = b"".join([data[i:i + rsize] + fill for i in range(0, length, rsize)])
        setattr(st, attr, Table(spec, buf, wire_size=rsize))
    st.absent = frozenset(absent)
    if check_refs:
        check_state(st, entries)
    return st


def _unpack_map(data, where: str) -> dict:
    import msgpack

    from .mpcheck import check

    bad = check(data)
    if bad is not None:
        raise IntegrityError(f"{where}: invalid msgpack at byte {bad[0]}: {bad[1]}", code="MSGPACK")
    # the strict check above admits only what unpackb takes, as a dict
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# ---------------------------------------------------------------------------------------
def check_state(st: State, entries: list[dict] | None = None) -> None:
    """Structural checks across sections: key order, references, snapshot bounds."""
    offs = {e["type"]: (e["index"], e["offset"]) for e in entries or []}

    def where(stype: SectionType, rec: int, table: Table) -> str:
        i, off = offs.get(int(stype), (-1, 0))
        return (f"section #{i} {stype.name} record {rec} at offset "
                f"0x{off + rec * table.wire_size:x}")

    for stype, (attr, spec_name, _s, _f) in SECTION_LAYOUT.items():
        if not spec_name:
            continue
        table = getattr(st, attr)
        if len(table) < 2:
            continue
        if attr == "irtes":
            w = table.words()
            keys = w[0::3]  # unit << 32 | index (with zero padding)
        else:
            idx = [table.spec.fields.index(k) for k in table.spec.key]
            get = operator.itemgetter(*idx)
            keys = [get(r) for r in table.rows()]
        bad = next((j for j, ok in enumerate(map(operator.lt, keys, keys[1:])) if not ok), None)
        if bad is not None:
            raise IntegrityError(f"{where(stype, bad + 1, table)}: records are not in strictly "
                                 f"increasing {'/'.join(table.spec.key)} order", code="ORDER")

    units = {u.unit: u for u in st.units}
    # IRTEs: per unit, a contiguous run; index within the table size the IRTA declares
    if len(st.irtes):
        keys = st.irtes.words()[0::3]
        found = 0
        for u in sorted(units):
            lo = bisect.bisect_left(keys, u << 32)
            hi = bisect.bisect_left(keys, (u + 1) << 32)
            found += hi - lo
            if hi > lo and units[u].irta:
                entries_max = 1 << ((units[u].irta & 0xF) + 1)
                last = keys[hi - 1] & 0xFFFFFFFF
                if last >= entries_max:
                    raise IntegrityError(f"{where(SectionType.IRTE, hi - 1, st.irtes)}: IRTE "
                                         f"index {last} beyond the {entries_max} entries of "
                                         f"unit {u}'s table", code="IRTE_INDEX")
        if found != len(keys):
            j = next(j for j, k in enumerate(keys) if (k >> 32) not in units)
            raise IntegrityError(f"{where(SectionType.IRTE, j, st.irtes)}: unit {keys[j] >> 32} "
                                 f"is not in the UNIT section", code="UNIT_REF")
    for attr, stype in (("domains", SectionType.DOMAIN), ("contexts", SectionType.CONTEXT)):
        for j, r in enumerate(getattr(st, attr)):
            if r.unit not in units:
                raise IntegrityError(f"{where(stype, j, getattr(st, attr))}: unit {r.unit} is "
                                     f"not in the UNIT section", code="UNIT_REF")
    for attr, stype in (("vectors", SectionType.VECTOR), ("devices", SectionType.DEVICE)):
        for j, r in enumerate(getattr(st, attr)):
            if r.unit != 0xFFFF and r.unit not in units:
                raise IntegrityError(f"{where(stype, j, getattr(st, attr))}: unit {r.unit} is "
                                     f"not in the UNIT section", code="UNIT_REF")
    clen = len(st.config)
    for j, d in enumerate(st.devices):
        if d.config_offset + d.config_len > clen:
            raise IntegrityError(f"{where(SectionType.DEVICE, j, st.devices)}: config snapshot "
                                 f"{d.config_offset}+{d.config_len} runs past the CONFIG section "
                                 f"({clen} bytes)", code="CONFIG")
