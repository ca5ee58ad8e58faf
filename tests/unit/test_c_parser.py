"""Differential tests: the freestanding C parser and the Python decoder agree.

The C parser (kernel-patches/src/lib/handover/parse.c, generated header) is compiled with
gcc and -fsanitize=address,undefined, then fed valid blobs and mutated ones (every bit flip
and truncation of a small blob, lying lengths, unknown sections, newer minors, random
mutations); on every input the verdicts (OK, or which HO_E_* error) must be the same.
"""

import os
import random
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as S

from handover.errors import HandoverError
from handover.formats import codec
from handover.formats.cgen import DEFAULT_OUT, generate
from handover.formats.codec import assemble, decode, encode
from handover.formats.enums import SectionType
from handover.synth import synth_state

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CDIR = os.path.join(ROOT, "tests", "c")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


def py_verdict(blob: bytes) -> str:
    try:
        st = decode(blob)
    except HandoverError as e:
        assert e.code, f"error without a code: {e}"
        return e.code
    return f"OK {st.version[0]}.{st.version[1]}"


def c_verdicts(exe: str, blobs: list[bytes]) -> list[str]:
    data = b"".join(struct.pack("<Q", len(b)) + b for b in blobs)
    r = subprocess.run([exe, "--stream"], input=data, capture_output=True, check=True)
    lines = r.stdout.decode().splitlines()
    assert len(lines) == len(blobs), r.stderr.decode()[-2000:]
    out = []
    for ln in lines:
        parts = ln.split()
        out.append(f"OK {parts[1]}" if parts[0] == "OK" else parts[0])
    return out


def agree(exe: str, blobs: list[bytes]) -> int:
    cv = c_verdicts(exe, blobs)
    bad = [(i, p, c) for i, (b, c) in enumerate(zip(blobs, cv)) if (p := py_verdict(b)) != c]
    assert not bad, f"{len(bad)} disagreements, first: input {bad[0][0]}: python {bad[0][1]}, C {bad[0][2]}"
    return len(blobs)


def test_generated_header_is_current():
    with open(DEFAULT_OUT) as f:
        assert f.read() == generate(), "run python -m handover.formats.cgen"


def test_valid_blobs(ho_check):
    blobs = [encode(synth_state(p, seed=s), minor=m) for p in ("tiny", "typical") for s in (1, 2)
             for m in (0, 1)]
    agree(ho_check, blobs)
    assert all(v.startswith("OK") for v in c_verdicts(ho_check, blobs))


def test_every_bit_flip_and_truncation(ho_check):
    tiny = encode(synth_state("tiny"))
    flips = []
    for i in range(len(tiny) * 8):
        b = bytearray(tiny)
        b[i >> 3] ^= 1 << (i & 7)
        flips.append(bytes(b))
    assert agree(ho_check, flips) == len(tiny) * 8
    agree(ho_check, [tiny[:n] for n in range(len(tiny))] + [tiny + b"\0", tiny + b"x" * 9])


def _sections(blob):
    hdr = codec.read_header(blob)
    return [(e["type"], e["version"], e["flags"], e["count"], e["record_size"], e["data"])
            for e in codec.read_sections(blob, hdr)]


def _crafted():
    """Blobs with valid checksums that lie in their structure."""
    tiny = encode(synth_state("tiny"))
    secs = _sections(tiny)
    out = [assemble(secs, 2, 0, 1), assemble(secs, 1, 9, 1), assemble([], 1, 1, 1)]

    def change(stype, **kw):
        s2 = []
        for t, v, f, c, r, d in secs:
            if t == stype:
                t, v, f, c, r, d = (kw.get("type", t), kw.get("version", v), kw.get("flags", f),
                                    kw.get("count", c), kw.get("record_size", r), kw.get("data", d))
            s2.append((t, v, f, c, r, d))
        return assemble(s2, 1, 1, 1)

    for st in SectionType:
        out += [change(st, type=202, count=0xFFFF, record_size=16), change(st, type=203, count=1),
                change(st, count=0xFFFFFFFF), change(st, record_size=0), change(st, record_size=8),
                change(st, flags=2), change(st, type=200), change(st, type=201, flags=1),
                change(st, data=b""), change(st, data=b"\x80"), change(st, count=1, record_size=1)]
    # reorder records, wrong units, trailing fields of a newer minor
    for stype in (SectionType.IRTE, SectionType.BAR, SectionType.RESERVED, SectionType.VECTOR):
        d = dict((t, (c, r, dd)) for t, v, f, c, r, dd in secs)[stype]
        if d[0] >= 2:
            c, r, dd = d
            out.append(change(stype, data=dd[r:2 * r] + dd[:r] + dd[2 * r:]))
    c, r, dd = dict((t, (c, r, dd)) for t, v, f, c, r, dd in secs)[SectionType.UNIT]
    out.append(change(SectionType.UNIT, record_size=r + 16,
                      data=b"".join(dd[i:i + r] + b"\xee" * 16 for i in range(0, len(dd), r))))
    out.append(change(SectionType.UNIT, record_size=72,
                      data=b"".join(dd[i:i + 72] for i in range(0, len(dd), r))))
    # boundaries: config one byte short, IRTE index at and just below the table size
    cfg = dict((t, dd) for t, v, f, c, r, dd in secs)[SectionType.CONFIG]
    out += [change(SectionType.CONFIG, data=cfg[:-1]), change(SectionType.CONFIG, data=cfg + b"\0")]
    for s_field in (1, 2, 3):  # 4, 8, 16 entries: tiny has indices 0..5
        unit0 = bytearray(dd[:r])
        struct.pack_into("<Q", unit0, 56, (struct.unpack_from("<Q", unit0, 56)[0] & ~0xF) | s_field)
        out.append(change(SectionType.UNIT, data=bytes(unit0) + dd[r:]))
    ci, ri, di = dict((t, (c, r, dd)) for t, v, f, c, r, dd in secs)[SectionType.IRTE]
    unit0 = bytearray(dd[:r])
    struct.pack_into("<Q", unit0, 56, (struct.unpack_from("<Q", unit0, 56)[0] & ~0xF) | 2)  # 8 entries
    for last in (7, 8):
        irtes = bytearray(di)
        struct.pack_into("<I", irtes, (ci - 1) * ri, last)
        s2 = [(t, v, f, c, r_, bytes(unit0) + dd[r:] if t == SectionType.UNIT else
               (bytes(irtes) if t == SectionType.IRTE else d_)) for t, v, f, c, r_, d_ in secs]
        out.append(assemble(s2, 1, 1, 1))
    # unit references: 0xffff is "none" for vectors and devices only
    for stype, off in ((SectionType.DOMAIN, 0), (SectionType.VECTOR, 4), (SectionType.DEVICE, 32),
                       (SectionType.CONTEXT, 8)):
        c2, r2, d2 = dict((t, (c, r, dd)) for t, v, f, c, r, dd in secs)[stype]
        for val in (0xFFFF, 1, 0):
            rec = bytearray(d2[:r2])
            struct.pack_into("<H", rec, off, val)
            out.append(change(stype, data=bytes(rec) + d2[r2:]))
    for meta in (b"\x81\xa1a\xc1", b"\x90", b"\x81\xa2\xed\xa0\x01", b"\x81\x90\x01",
                 b"\x81\x01" * 16 + b"\x80", b"\x81\x01" * 15 + b"\x80", b"\xdf\xff\xff\xff\xff",
                 b"\x80\x00", b"\x82\xa1a\x01\xa1a\x02"):
        out.append(change(SectionType.META, data=meta))
    return out


def test_crafted_structures(ho_check):
    assert agree(ho_check, _crafted()) > 100


def test_random_mutations(ho_check):
    rng = random.Random(1234)
    bases = [encode(synth_state("tiny")), encode(synth_state("tiny"), minor=0)] + _crafted()[:20]
    blobs = []
    for _ in range(3000):
        b = bytearray(rng.choice(bases))
        for _k in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(b)) if b else 0
            if op < 0.5 and b:
                b[i] = rng.randrange(256)
            elif op < 0.7:
                del b[i:i + rng.randint(1, 40)]
            elif op < 0.85:
                b[i:i] = rng.randbytes(rng.randint(1, 40))
            elif len(b) >= 8:
                struct.pack_into("<I", b, min(i, len(b) - 4) & ~3, rng.choice([0, 1, 0xFFFFFFFF, 64, 24]))
        blobs.append(bytes(b))
    agree(ho_check, blobs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(S.binary(max_size=700))
def test_arbitrary_bytes_with_magic(ho_check, tail):
    agree(ho_check, [b"HOVRSTAT" + tail, tail])
