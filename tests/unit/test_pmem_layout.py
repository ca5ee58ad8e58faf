"""Region header layout: byte offsets the C reader relies on, CRC, validation."""

import struct

import pytest

from handover.formats.crc import crc32c
from handover.pmem import layout as L


def _hdr(**kw):
    slots = L.plan_slots(64 << 20)
    h = L.RegionHeader(region_size=64 << 20, slots=slots, seq=7, uuid=bytes(range(16)),
                       phys_hint=0x30000000, init_time_ns=123)
    for k, v in kw.items():
        setattr(h, k, v)
    return h


# The C struct, written independently with the struct module.
C_HDR = struct.Struct("<8sHHIIIQQ2QQII16sQQ" + "QQQQQII" * 2 + "308xI")


def test_c_struct_matches_construct_layout():
    assert C_HDR.size == L.HEADER_SIZE == 512
    h = _hdr(generation=5, active_slot=1)
    h.slots[1].generation, h.slots[1].length, h.slots[1].crc = 5, 1000, 0xDEADBEEF
    raw = L.encode_header(h.copy_for(1))
    f = C_HDR.unpack(raw)
    assert f[0] == b"HOVRREGN" and f[1] == 1 and f[2] == 0 and f[3] == 512
    assert f[4] == 1            # copy
    assert f[6] == 7            # seq
    assert f[7] == 64 << 20     # region_size
    assert f[8:10] == (0, 4096)
    assert f[10] == 5 and f[11] == 1  # generation, active_slot
    assert f[12] == 4096        # slot_align
    assert f[13] == bytes(range(16)) and f[14] == 0x30000000
    s1 = f[16 + 7:16 + 14]
    assert s1[0] == h.slots[1].offset and s1[2] == 5 and s1[3] == 1000 and s1[5] == 0xDEADBEEF
    assert f[-1] == crc32c(raw[:508])
    for name, off in L.FIELD_OFFSETS.items():
        assert 0 <= off < 512, name
    assert raw[L.FIELD_OFFSETS["slot"] + 48 + 16:][:8] == struct.pack("<Q", 5)
    assert raw[200:508] == bytes(308)


def test_roundtrip_and_copy_index():
    h = _hdr()
    raw = L.encode_header(h.copy_for(1))
    back = L.decode_header(raw, copy=1)
    assert back.slots == h.slots and back.seq == 7 and back.uuid == h.uuid
    with pytest.raises(L.HeaderDecodeError, match="copy index"):
        L.decode_header(raw, copy=0)


@pytest.mark.parametrize("pos", [0, 9, 30, 64, 120, 300, 507, 508, 511])
def test_any_flipped_byte_is_detected(pos):
    raw = bytearray(L.encode_header(_hdr()))
    raw[pos] ^= 0x40
    with pytest.raises(L.HeaderDecodeError):
        L.decode_header(bytes(raw), copy=0)


def test_newer_layout_is_reported_as_such():
    raw = L.encode_header(_hdr(layout_major=2))
    with pytest.raises(L.HeaderDecodeError) as ei:
        L.decode_header(raw, copy=0)
    assert ei.value.newer_layout and "newer" in str(ei.value)
    # a newer minor is fine
    assert L.decode_header(L.encode_header(_hdr(layout_minor=3)), copy=0).layout_minor == 3


def test_no_magic_and_bounds():
    with pytest.raises(L.HeaderDecodeError) as ei:
        L.decode_header(bytes(512), copy=0)
    assert ei.value.no_magic
    raw = L.encode_header(_hdr())
    with pytest.raises(L.HeaderDecodeError, match="only"):
        L.decode_header(raw, copy=0, region_size=1 << 20)


def test_plan_slots():
    s = L.plan_slots(64 << 20)
    assert s[0].offset == 8192 and s[1].offset == s[0].offset + s[0].capacity
    assert s[1].offset + s[1].capacity <= 64 << 20
    d = L.plan_slots(64 << 20, 2 << 20)
    assert d[0].offset == 2 << 20 and d[0].capacity % (2 << 20) == 0 and d[1].offset % (2 << 20) == 0
    with pytest.raises(ValueError, match="too small"):
        L.plan_slots(12288)
