"""The ranges the kernel keeps out of its allocator, computed by the kernel's own C.

Posted interrupts need KVM, which the QEMU lab's guest cannot run, so pi_desc preservation is
covered here: ``ho_preserved_ranges()`` (kernel-patches/src/lib/handover/parse.c) is the walk
``handover_reserve()`` memblock-reserves in the kernel; ``ho_check --ranges`` runs it in user
space (gcc, sanitizers) on real encoded states. Every posted-interrupt descriptor's 64 bytes
must lie in a reserved range, whether or not the writer listed its page, and every RESERVED
record must be reserved as written.
"""

import subprocess

from handover.formats.codec import encode
from handover.formats.model import Table
from handover.synth import synth_state


PI_DESC_KIND = 7   # HO_RES_PI_DESC


def _ranges(exe, tmp_path, state):
    p = tmp_path / "state.bin"
    p.write_bytes(encode(state))
    out = subprocess.run([exe, "--ranges", str(p)], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[0].startswith("OK"), out[0]
    assert out[-1].startswith("skipped ")
    rows = [tuple(int(x, 16) if i < 2 else int(x) for i, x in enumerate(ln.split()))
            for ln in out[1:-1]]
    return rows, int(out[-1].split()[1])


def _covered(rows, start, size):
    return any(s <= start and start + size <= s + n for s, n, _k in rows)


def test_every_pi_desc_is_kept(ho_check, tmp_path):
    st = synth_state("typical")
    rows, skipped = _ranges(ho_check, tmp_path, st)
    assert skipped == 0
    pis = [r[0] for r in st.pi_descs.rows()]
    assert len(pis) == 64
    for phys in pis:
        assert _covered(rows, phys, 64), hex(phys)
    # every RESERVED record is reserved as written, in order, then the pi_desc pages
    res = [(r[0], r[1], r[2]) for r in st.reserved.rows()]
    assert rows[:len(res)] == res
    assert rows[len(res):] == [(p & ~0xFFF, 0x1000, PI_DESC_KIND) for p in pis]


def test_pi_desc_pages_kept_even_when_not_listed(ho_check, tmp_path):
    st = synth_state("typical")
    spec = st.reserved.spec
    st.reserved = Table.from_rows(spec, [r for r in st.reserved if r.kind != PI_DESC_KIND])
    rows, _ = _ranges(ho_check, tmp_path, st)
    listed = [(r[0], r[1], r[2]) for r in st.reserved.rows()]
    assert rows[:len(listed)] == listed and not any(k == PI_DESC_KIND for _s, _n, k in listed)
    for phys, *_rest in st.pi_descs.rows():
        assert _covered(rows, phys, 64), hex(phys)


def test_hostile_reserved_sizes_are_skipped(ho_check, tmp_path):
    st = synth_state("tiny")
    spec = st.reserved.spec
    bad = [spec.tuple_type(start=0x1000, size=0, kind=15, unit=0xFFFF, flags=0),
           spec.tuple_type(start=(1 << 64) - 0x1000, size=0x2000, kind=15, unit=0xFFFF, flags=0)]
    st.reserved = Table.from_rows(spec, list(st.reserved) + bad)
    rows, skipped = _ranges(ho_check, tmp_path, st)
    assert skipped == 2
    assert all(n and s + n <= 1 << 64 for s, n, _k in rows)


def _head(exe, path):
    return subprocess.run([exe, "--head", str(path)], check=True, capture_output=True,
                          text=True).stdout.splitlines()


def test_early_view_reserves_what_the_full_parse_does(ho_check, tmp_path):  # noqa: F811
    """Early boot reserves before it may allocate the RAM copy: from the header, the section
    table and the two mapped sections only (ho_parse_head + ho_preserved_ranges_raw). On
    valid states that is exactly what the whole-blob walk reserves."""
    for profile in ("tiny", "typical"):
        p = tmp_path / f"{profile}.bin"
        p.write_bytes(encode(synth_state(profile)))
        full = subprocess.run([ho_check, "--ranges", str(p)], check=True, capture_output=True,
                              text=True).stdout.splitlines()
        early = _head(ho_check, p)
        assert early[0].startswith("OK") and full[0].startswith("OK")
        assert early[1:] == full[1:] and len(early) > 2, profile


def test_early_view_refuses_a_damaged_head(ho_check, tmp_path):  # noqa: F811
    """A bit flip in every byte of the header and the section table (a different bit each
    byte), and every truncation, is refused by the early view (the header CRC covers both; the blob CRC is the caller's),
    under ASan/UBSan, without reading outside the blob."""
    blob = encode(synth_state("tiny"))
    count = int.from_bytes(blob[24:28], "little")
    head_len = 64 + 40 * count
    p = tmp_path / "b.bin"
    for byte in range(head_len):
        bit = byte * 8 + byte % 8
        bad = bytearray(blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        p.write_bytes(bytes(bad))
        assert not _head(ho_check, p)[0].startswith("OK"), bit
    for n in list(range(0, head_len + 1)) + [len(blob) - 1]:
        p.write_bytes(blob[:n])
        assert not _head(ho_check, p)[0].startswith("OK"), n
