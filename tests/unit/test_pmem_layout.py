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


def test_kernel_reader_defines_match_layout():
    """The kernel patch's region reader (kernel-patches/src/lib/handover/core.c) hard-codes
    the offsets of this layout; they must agree with layout.py."""
    import os
    import re
    src = os.path.join(os.path.dirname(__file__), "..", "..", "kernel-patches", "src", "lib",
                       "handover", "core.c")
    if not os.path.exists(src):
        pytest.skip("no kernel reader in this tree")
    text = open(src).read()
    d = dict(re.findall(r"#define\s+(HOVR_\w+)\s+(\S+)", text))
    assert d["HOVR_REGION_MAGIC"] == '"' + L.REGION_MAGIC.decode() + '"'
    assert int(d["HOVR_HDR_SIZE"]) == L.HEADER_SIZE
    assert int(d["HOVR_HDR_BLOCK"]) == L.HEADER_OFFSETS[1] == L.HEADER_BLOCK
    assert int(d["HOVR_HDR_CRC_OFF"]) == L.CRC_OFFSET == L.FIELD_OFFSETS["hdr_crc"]
    assert int(d["HOVR_OFF_MAJOR"]) == L.FIELD_OFFSETS["layout_major"]
    assert int(d["HOVR_OFF_HEADER_SIZE"]) == L.FIELD_OFFSETS["header_size"]
    assert int(d["HOVR_OFF_REGION_SIZE"]) == L.FIELD_OFFSETS["region_size"]
    assert int(d["HOVR_OFF_SLOT"]) == L.FIELD_OFFSETS["slot"]
    assert int(d["HOVR_SLOT_DESC_SIZE"]) == L.SlotDesc.sizeof()
    # slot descriptor fields as the C code reads them: offset +0, capacity +8, generation +16,
    # length +24, crc +40
    raw = L.SlotDesc.build(dict(offset=1, capacity=2, generation=3, length=4, commit_time_ns=5,
                                crc=6, flags=7))
    assert [struct.unpack_from("<Q", raw, o)[0] for o in (0, 8, 16, 24)] == [1, 2, 3, 4]
    assert struct.unpack_from("<I", raw, 40)[0] == 6
    for m in re.finditer(r"ho_get_le(\d+)\(d \+ (\d+)\)", text):
        assert int(m.group(2)) in (8, 16, 24, 40)
