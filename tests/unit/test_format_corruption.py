"""Bad input: every bit flip, every truncation, hostile lengths, versions."""

import struct

import pytest

from handover.errors import HandoverError, IntegrityError, NoStateError, VersionError
from handover.formats import codec
from handover.formats.codec import assemble, decode, encode
from handover.formats.enums import SectionType
from handover.formats.structs import HEADER_SIZE, SECTION_ENTRY_SIZE, UNIT
from handover.synth import synth_state


@pytest.fixture(scope="module")
def tiny():
    return encode(synth_state("tiny"))


def test_every_single_bit_flip_is_detected(tiny):
    """Exhaustive over a whole small blob: no flipped bit decodes to a state."""
    undetected = []
    for i in range(len(tiny) * 8):
        b = bytearray(tiny)
        b[i >> 3] ^= 1 << (i & 7)
        try:
            decode(bytes(b))
        except HandoverError:
            continue
        undetected.append(i)
    assert not undetected, f"bit flips not detected at bits {undetected[:10]}"
    assert len(tiny) > 1000  # the blob exercises every section


def test_every_truncation_is_detected(tiny):
    for n in range(len(tiny)):
        with pytest.raises(HandoverError) as ei:
            decode(tiny[:n])
        assert "\n" not in str(ei.value)


def test_appended_bytes_are_detected(tiny):
    with pytest.raises(IntegrityError, match="trailing data"):
        decode(tiny + b"\0")


def test_empty_and_zero_sources_mean_no_state():
    with pytest.raises(NoStateError):
        decode(b"")
    with pytest.raises(NoStateError):
        decode(bytes(8192))


def _sections_of(blob):
    hdr = codec.read_header(blob)
    return [(e["type"], e["version"], e["flags"], e["count"], e["record_size"], e["data"])
            for e in codec.read_sections(blob, hdr)]


def _with(blob, stype, **change):
    out = []
    for t, v, f, c, r, d in _sections_of(blob):
        if t == stype:
            t, v, f, c, r, d = (change.get("type", t), change.get("version", v), change.get("flags", f),
                                change.get("count", c), change.get("record_size", r), change.get("data", d))
        out.append((t, v, f, c, r, d))
    return assemble(out, 1, 1, 1)


def test_record_count_claiming_2_pow_32_fails_at_once(tiny):
    bad = _with(tiny, SectionType.IRTE, count=0xFFFFFFFF)
    with pytest.raises(IntegrityError, match=r"section #\d+ IRTE at offset 0x[0-9a-f]+: 4294967295 records"):
        decode(bad)


def test_lying_record_size(tiny):
    bad = _with(tiny, SectionType.UNIT, record_size=8, count=11)
    with pytest.raises(IntegrityError, match="record size 8 is smaller"):
        decode(bad)


def test_hostile_header_fields(tiny):
    b = bytearray(tiny)
    struct.pack_into("<I", b, 24, 0xFFFFFFFF)  # section_count
    with pytest.raises(IntegrityError, match="section count 4294967295 exceeds"):
        decode(bytes(b))
    b = bytearray(tiny)
    struct.pack_into("<I", b, 12, 7)  # header_size
    with pytest.raises(IntegrityError, match="header size 7"):
        decode(bytes(b))


def test_hostile_offsets_with_valid_crcs(tiny):
    """A table entry whose offset or length lies, with the header CRC recomputed."""
    hdr = codec.read_header(tiny)
    for field_off, value, msg in ((8, 0xFFFF_FFFF_FFFF_0000, "expected at offset"),
                                  (16, 1 << 62, "runs past the end")):
        b = bytearray(tiny)
        struct.pack_into("<Q", b, HEADER_SIZE + SECTION_ENTRY_SIZE * 2 + field_off, value)
        _refresh_header_crc(b, hdr["header_size"])
        with pytest.raises(IntegrityError, match=msg):
            decode(bytes(b))


def _refresh_header_crc(b: bytearray, header_size: int):
    from handover.formats.crc import crc32c

    c = crc32c(bytes(b[HEADER_SIZE:header_size]), crc32c(bytes(b[:60])))
    struct.pack_into("<I", b, 60, c)


def test_other_major_is_refused_naming_both_versions(tiny):
    secs = _sections_of(tiny)
    with pytest.raises(VersionError, match=r"format 2\.0 is not supported: this reader reads 1\.x"):
        decode(assemble(secs, 2, 0, 1))


def test_unknown_required_section_is_refused(tiny):
    secs = _sections_of(tiny) + [(99, 5, 1, 0, 0, b"future")]
    with pytest.raises(VersionError, match="section type 99 is required but unknown"):
        decode(assemble(secs, 1, 5, 1))


def test_newer_minor_unknown_sections_and_trailing_fields_are_skipped(tiny):
    """A 1.7 blob: a new optional section, and 16 more bytes at the end of each UNIT record."""
    secs = []
    for t, v, f, c, r, d in _sections_of(tiny):
        if t == SectionType.UNIT:
            d = b"".join(d[i:i + r] + b"\xAB" * 16 for i in range(0, len(d), r))
            r += 16
            v = 7
        secs.append((t, v, f, c, r, d))
    secs.append((77, 7, 0, 2, 8, b"12345678abcdefgh"))
    st = decode(assemble(secs, 1, 7, 1))
    ref = decode(tiny)
    assert st.version == (1, 7)
    assert list(st.units) == list(ref.units)
    assert st.units.wire_size == UNIT.size + 16
    assert [u.type for u in st.unknown_sections] == [77]
    # everything else is identical
    assert encode(st) == encode(ref)


def test_older_minor_reads_with_missing_fields_marked(tiny):
    ref = decode(tiny)
    old = encode(ref, minor=0)
    st = decode(old)
    assert st.version == (1, 0)
    assert st.units.missing_fields() == ("iqh", "iqt")
    assert all(u.iqh == 0 and u.iqt == 0 for u in st.units)
    assert [u[:12] for u in st.units] == [u[:12] for u in ref.units]
    assert not st.provenance  # PROVENANCE arrived in 1.1
    assert encode(st, minor=0) == old


def test_cannot_write_unknown_minor(tiny):
    with pytest.raises(VersionError, match="cannot write format 1.9"):
        encode(decode(tiny), minor=9)


def test_reference_checks(tiny):
    """Records that reference a unit that does not exist, or out of order, are refused."""
    st = decode(tiny)
    spec = st.irtes.spec
    rows = list(st.irtes.rows())
    bad = bytearray(st.irtes.buf)
    struct.pack_into(spec.fmt, bad, 0, rows[0][0], 5, rows[0][2], rows[0][3])  # unit 5
    with pytest.raises(IntegrityError, match="not in strictly increasing|unit 5 is not in the UNIT"):
        decode(_with(tiny, SectionType.IRTE, data=bytes(bad)))
    swapped = st.irtes.buf[24:48] + st.irtes.buf[0:24] + st.irtes.buf[48:]
    with pytest.raises(IntegrityError, match=r"IRTE record 1 at offset 0x[0-9a-f]+: records are not in strictly"):
        decode(_with(tiny, SectionType.IRTE, data=swapped))


def test_invalid_msgpack_meta(tiny):
    with pytest.raises(IntegrityError, match="META at offset 0x[0-9a-f]+: invalid msgpack"):
        decode(_with(tiny, SectionType.META, data=b"\xc1"))
    with pytest.raises(IntegrityError, match="top level is not a map"):
        decode(_with(tiny, SectionType.META, data=b"\x93\x01\x02\x03"))
    # a length prefix claiming 4 GiB must fail without allocating it
    with pytest.raises(IntegrityError, match="invalid msgpack"):
        decode(_with(tiny, SectionType.META, data=b"\xdb\xff\xff\xff\xffabc"))


def test_config_snapshot_bounds(tiny):
    st = decode(tiny)
    with pytest.raises(IntegrityError, match="config snapshot .* runs past the CONFIG section"):
        decode(_with(tiny, SectionType.CONFIG, data=st.config[:10]))


def test_errors_are_one_line(tiny):
    for n in (0, 3, 70, 500):
        try:
            decode(tiny[:n])
        except HandoverError as e:
            assert "\n" not in str(e) and str(e)
