# handover: formats/mpcheck.py
"""A strict, bounded well-formedness check of the msgpack used in META and PROVENANCE.

The C parser (kernel-patches/lib/handover_parse.c, ho_msgpack_check) implements the same
rules, so the Python and C verdicts agree on every input. The rules, stricter than the
msgpack library's:

- exactly one object that fills the section, and it is a map;
- containers nested at most MSGPACK_MAX_DEPTH deep;
- no ext / fixext types, no 0xc1;
- str payloads are valid UTF-8 (RFC 3629: no overlongs, no surrogates, <= U+10FFFF);
- map keys are not maps or arrays (Python could not hash them);
- every declared length or element count fits in the bytes that remain.

Returns None when the data is acceptable, else (offset, reason).
"""

from __future__ import annotations

MSGPACK_MAX_DEPTH = 16

_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
          0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
_BIN = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_STR = {0xD9: 1, 0xDA: 2, 0xDB: 4}
_ARR = {0xDC: 2, 0xDD: 4}
_MAP = {0xDE: 2, 0xDF: 4}


def check(data: bytes):
    n = len(data)
    pos = 0
    # stack of [remaining items, is_map, items seen]; an item of a map at even index is a key
    stack: list[list[int]] = []
    first = True
    while True:
        if not first and not stack:
            break
        if pos >= n:
            return (pos, "truncated")
        t = data[pos]
        start = pos
        is_key = bool(stack) and stack[-1][1] and stack[-1][2] % 2 == 0
        pos += 1
        container = None  # (count, is_map)
        if t <= 0x7F or t >= 0xE0:
            pass
        elif 0x80 <= t <= 0x8F:
            container = (t & 0x0F, True)
        elif 0x90 <= t <= 0x9F:
            container = (t & 0x0F, False)
        elif 0xA0 <= t <= 0xBF:
            ln = t & 0x1F
            if ln > n - pos:
                return (start, "string runs past the end")
            if not _utf8_ok(data[pos:pos + ln]):
                return (start, "string is not valid UTF-8")
            pos += ln
        elif t in _FIXED:
            w = _FIXED[t]
            if w > n - pos:
                return (start, "truncated number")
            pos += w
        elif t in _BIN or t in _STR:
            w = _BIN.get(t) or _STR[t]
            if w > n - pos:
                return (start, "truncated length")
            ln = int.from_bytes(data[pos:pos + w], "big")
            pos += w
            if ln > n - pos:
                return (start, "length runs past the end")
            if t in _STR and not _utf8_ok(data[pos:pos + ln]):
                return (start, "string is not valid UTF-8")
            pos += ln
        elif t in _ARR or t in _MAP:
            w = _ARR.get(t) or _MAP[t]
            if w > n - pos:
                return (start, "truncated count")
            container = (int.from_bytes(data[pos:pos + w], "big"), t in _MAP)
            pos += w
        else:  # 0xc1, ext 0xc7-0xc9, fixext 0xd4-0xd8
            return (start, f"type 0x{t:02x} is not allowed")
        if first:
            if container is None or not container[1]:
                return (start, "top level is not a map")
            first = False
        elif is_key and container is not None:
            return (start, "a map key is a map or an array")
        if stack:
            stack[-1][0] -= 1
            stack[-1][2] += 1
        if container is not None:
            count, is_map = container
            items = count * 2 if is_map else count
            if items > n - pos:
                return (start, "element count runs past the end")
            if len(stack) >= MSGPACK_MAX_DEPTH:
                return (start, "nested too deep")
            if items:
                stack.append([items, is_map, 0])
        while stack and stack[-1][0] == 0:
            stack.pop()
    if pos != n:
        return (pos, "data after the map")
    return None


def _utf8_ok(b: bytes) -> bool:
    try:
        b.decode("utf-8", "strict")
        return True
    except UnicodeDecodeError:
        return False
