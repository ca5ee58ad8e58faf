"""The strict msgpack check admits only what msgpack.unpackb turns into a dict."""

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as S

from handover.formats.mpcheck import MSGPACK_MAX_DEPTH, check

scalars = S.none() | S.booleans() | S.integers(-2**63, 2**64 - 1) | S.floats() | S.text() | S.binary()
values = S.recursive(scalars, lambda inner: S.lists(inner, max_size=5)
                     | S.dictionaries(S.text(max_size=5) | S.integers(-2**63, 2**64 - 1), inner, max_size=5), max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(S.dictionaries(S.text(max_size=8), values, max_size=6))
def test_valid_maps_pass(d):
    data = msgpack.packb(d, use_bin_type=True)
    assert check(data) is None
    assert isinstance(msgpack.unpackb(data, raw=False, strict_map_key=False), dict)


@settings(max_examples=2000, deadline=None)
@given(S.binary(max_size=64))
def test_anything_that_passes_unpacks_to_a_dict(data):
    if check(data) is None:
        assert isinstance(msgpack.unpackb(data, raw=False, strict_map_key=False), dict)


@settings(max_examples=500, deadline=None)
@given(S.dictionaries(S.text(max_size=4), values, min_size=1, max_size=4), S.data())
def test_mutations_that_pass_still_unpack(d, data):
    raw = bytearray(msgpack.packb(d, use_bin_type=True))
    i = data.draw(S.integers(0, len(raw) - 1))
    raw[i] = data.draw(S.integers(0, 255))
    if check(bytes(raw)) is None:
        assert isinstance(msgpack.unpackb(bytes(raw), raw=False, strict_map_key=False), dict)


def test_rules():
    assert check(b"\x80") is None
    assert check(b"")[1] == "truncated"
    assert check(b"\x90")[1] == "top level is not a map"
    assert check(b"\x81\x90\x01")[1] == "a map key is a map or an array"
    assert check(b"\x81\xc1\x01")[1] == "type 0xc1 is not allowed"
    assert check(b"\x81\x01\xd4\x01\x02")[1] == "type 0xd4 is not allowed"
    assert check(b"\x81\xa2\xed\xa0\x01")[1] == "string is not valid UTF-8"   # surrogate
    assert check(b"\x81\xa2\xc0\x80\x01")[1] == "string is not valid UTF-8"   # overlong
    assert check(b"\x80\x00")[1] == "data after the map"
    assert check(b"\xdf\xff\xff\xff\xff")[1] == "element count runs past the end"
    deep = b"\x81\x01" * MSGPACK_MAX_DEPTH + b"\x80"
    assert check(deep)[1] == "nested too deep"
    ok = b"\x81\x01" * (MSGPACK_MAX_DEPTH - 1) + b"\x80"
    assert check(ok) is None
