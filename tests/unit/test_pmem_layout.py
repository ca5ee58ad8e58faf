"""Region header layout: byte offsets the C reader relies on, CRC, validation."""

import os
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


def _c_region_slots(exe: str, path) -> list:
    """What the kernel's region reader (ho_region_slots in parse.c) keeps, per header copy."""
    import subprocess

    out = subprocess.run([exe, "--region", str(path)], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    copies, i = [], 0
    while i < len(out) and out[i]:
        f = out[i].split()
        i += 1
        if f[2] == "invalid":
            copies.append(None)
            continue
        rows = []
        for _ in range(int(f[3])):
            rows.append(tuple(int(x) for x in out[i].split()))
            i += 1
        copies.append(rows)
    return copies


def _py_region_slots(path, size) -> list:
    """The same, from layout.py: (generation, offset, length, capacity, crc) of the
    non-empty slots of each valid header copy."""
    raw = open(path, "rb").read()
    copies = []
    for c, off in enumerate(L.HEADER_OFFSETS):
        try:
            h = L.decode_header(raw[off:off + L.HEADER_SIZE], copy=c, region_size=size)
        except Exception:
            copies.append(None)
            continue
        copies.append([(s.generation, s.offset, s.length, s.capacity, s.crc) for s in h.slots
                       if not s.empty and s.length <= s.capacity and s.offset + s.length <= size])
    return copies


def test_kernel_region_reader_agrees_with_layout(tmp_path):
    """The kernel reads the region header with generated C (handover_region.h and
    ho_region_slots() in parse.c): on real regions written by the commit protocol, then
    damaged header by header, it keeps exactly the slots layout.py reads."""
    import subprocess

    from handover import pmem

    cdir = os.path.join(os.path.dirname(__file__), "..", "c")
    subprocess.run(["make", "-s", "-C", cdir, f"OUT={tmp_path}"], check=True)
    exe = str(tmp_path / "ho_check")
    reg = tmp_path / "region"
    size = 1 << 20
    pmem.init(reg, size=size)
    seen = [_c_region_slots(exe, reg)]
    assert seen[0] == [[], []]
    for gen in range(1, 4):
        pmem.commit(reg, bytes([gen]) * (1000 * gen))
        c = _c_region_slots(exe, reg)
        assert c == _py_region_slots(reg, size)
        assert max(r[0] for r in c[0]) == gen
    raw = bytearray(reg.read_bytes())
    for off in (0, 8, 10, 12, 32, 104 + 16, 104 + 24, 508):   # magic, major, size, slots, crc
        bad = bytearray(raw)
        bad[off] ^= 0x41
        reg.write_bytes(bytes(bad))
        c = _c_region_slots(exe, reg)
        assert c == _py_region_slots(reg, size), off
        assert c[0] is None and c[1] is not None, off   # the CRC catches every flip in copy A
    # a header that claims a larger region than the one it is read from
    reg.write_bytes(bytes(raw[:size // 2]))
    assert _c_region_slots(exe, reg) == [None, None]

