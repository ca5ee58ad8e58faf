"""Round trips and determinism of the format, with generated states."""

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as S

from handover.formats import codec
from handover.formats.codec import decode, encode
from handover.formats.model import TABLE_ATTRS, StateBuilder
from handover.formats.structs import RECORD_SPECS, FileHeader, SectionEntry
from handover.formats.enums import SECTION_LAYOUT
from handover.synth import synth_state

ATTR_SPEC = {a: RECORD_SPECS[s] for a, s, _v, _f in SECTION_LAYOUT.values() if s}
UNIT_SPEC = ATTR_SPEC["units"]


def _field_strategy(code: str):
    if code.endswith("s"):
        n = int(code[:-1])
        return S.binary(min_size=n, max_size=n)
    bits = {"B": 8, "H": 16, "I": 32, "Q": 64}[code]
    return S.integers(0, (1 << bits) - 1)


def _record_strategy(spec):
    return S.tuples(*[_field_strategy(spec.codes[f]) for f in spec.fields])


meta_values = S.recursive(
    S.none() | S.booleans() | S.integers(-2**63, 2**64 - 1) | S.text(max_size=20) | S.binary(max_size=20),
    lambda inner: S.lists(inner, max_size=4) | S.dictionaries(S.text(max_size=8), inner, max_size=4),
    max_leaves=10)


@S.composite
def states(draw):
    b = StateBuilder()
    b.meta = draw(S.dictionaries(S.text(max_size=10), meta_values, max_size=5))
    units = draw(S.lists(S.integers(0, 7), unique=True, max_size=3))
    for u in units:
        r = dict(zip(UNIT_SPEC.fields, draw(_record_strategy(UNIT_SPEC))))
        r.update(unit=u, irta=r["irta"] | 0xF)  # 65536 entries: any u16 index fits
        b.add("units", **r)
    for attr in TABLE_ATTRS:
        if attr == "units":
            continue
        spec = ATTR_SPEC[attr]
        rows = draw(S.lists(_record_strategy(spec), max_size=6))
        kidx = [spec.fields.index(k) for k in spec.key]
        seen = set()
        for r in rows:
            r = dict(zip(spec.fields, r))
            if attr == "irtes":
                r["index"] &= 0xFFFF
            if "unit" in r and units:
                r["unit"] = units[r["unit"] % len(units)]
            elif "unit" in r and attr in ("irtes", "domains", "contexts"):
                continue
            elif "unit" in r:
                r["unit"] = 0xFFFF
            if attr == "devices":
                r.pop("config_offset"), r.pop("config_len")
            key = tuple(r[spec.fields[i]] for i in kidx)
            if key in seen:
                continue
            seen.add(key)
            if attr == "devices":
                b.add_device(config=draw(S.binary(max_size=64)), **r)
            else:
                b.add(attr, **r)
    absent = draw(S.sets(S.sampled_from([a for a in TABLE_ATTRS]), max_size=2))
    for a in absent:
        if not b._rows[a]:
            b.mark_absent(a, "not readable", "test")
    return b.build()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_roundtrip_and_determinism(st):
    blob = encode(st)
    again = decode(blob)
    for attr in TABLE_ATTRS:
        assert getattr(again, attr) == getattr(st, attr), attr
    assert again.config == st.config
    assert again.absent == st.absent
    assert encode(again) == blob          # same state, same bytes
    assert encode(st) == blob


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_older_minor_output_is_read_by_current_reader(st):
    old = decode(encode(st, minor=0))
    assert old.version == (1, 0)
    for attr in TABLE_ATTRS:
        t_old, t_new = getattr(old, attr), getattr(st, attr)
        assert len(t_old) == len(t_new)
        keep = [f for f in t_new.spec.fields if f not in t_old.missing_fields()]
        for a, b in zip(t_old, t_new):
            assert [getattr(a, f) for f in keep] == [getattr(b, f) for f in keep]
            assert all(getattr(a, f) in (0, b"") for f in t_old.missing_fields())


def test_record_order_does_not_change_bytes():
    b1, b2 = StateBuilder(), StateBuilder()
    b1.add("units", unit=0, reg_base=1)
    b2.add("units", unit=0, reg_base=1)
    for i in (5, 1, 3):
        b1.add("irtes", unit=0, index=i, lo=i)
    for i in (1, 3, 5):
        b2.add("irtes", unit=0, index=i, lo=i)
    assert encode(b1.build()) == encode(b2.build())


def test_construct_header_and_struct_twins_agree():
    fields = dict(major=1, minor=1, header_size=104, total_size=4242, section_count=1, flags=0,
                  generation=77, reserved=bytes(20), header_crc=0xDEADBEEF)
    raw = FileHeader.build(fields)
    assert codec._HDR.unpack(raw) == (b"HOVRSTAT", 1, 1, 104, 4242, 1, 0, 77, bytes(20), 0xDEADBEEF)
    ent = dict(type=5, version=0, flags=1, offset=104, length=48, count=2, record_size=24,
               crc=0x1234, reserved=0)
    assert SectionEntry.build(ent) == codec._SEC.pack(5, 0, 1, 104, 48, 2, 24, 0x1234, 0)
    for spec in RECORD_SPECS.values():
        assert struct.calcsize(spec.fmt) == spec.struct_.sizeof() == spec.size


def test_record_specs_build_like_construct():
    """The struct format derived from each construct record encodes identically."""
    st = synth_state("tiny")
    for attr in TABLE_ATTRS:
        spec = ATTR_SPEC[attr]
        for r in getattr(st, attr):
            via_construct = spec.struct_.build(r._asdict())
            assert via_construct == struct.pack(spec.fmt, *r), attr


def test_batched_packing_of_large_tables_equals_record_by_record():
    """Tables of more than a thousand records are packed in batches; the bytes are those of
    one pack per record, and a record with a field too many, too few or out of range is
    still refused."""
    import pytest

    from handover.formats.model import Table, spec_struct

    st = synth_state("typical", seed=3)
    for attr in ("irtes", "reserved"):
        spec = getattr(st, attr).spec
        one = list(getattr(st, attr).rows())
        rows = one * 3 + one[:100]                          # > 2 batches, and a tail
        s = spec_struct(spec)
        assert Table.from_rows(spec, rows, presorted=True).buf == b"".join(s.pack(*r) for r in rows)
    spec = st.irtes.spec
    rows = list(st.irtes.rows()) * 3
    for bad in (rows[:5] + [rows[5] + (1,)] + rows[6:], rows[:-1] + [rows[-1][:3]],
                rows[:7] + [(1, 2, 3, 2 ** 64)] + rows[8:]):
        with pytest.raises(ValueError):
            Table.from_rows(spec, bad, presorted=True)
