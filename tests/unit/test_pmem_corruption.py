"""Damage each header copy, each slot, and combinations; check fallback, messages, exit codes."""

import json
import os

import pytest
from click.testing import CliRunner

import handover.pmem as pmem
from handover.cli.region import region as region_cli
from handover.errors import (EXIT_FALLBACK, EXIT_INTEGRITY, EXIT_NO_STATE, EXIT_OK,
                             IntegrityError, NoStateError)

MB = 1 << 20


@pytest.fixture
def two_gens(tmp_path):
    p = str(tmp_path / "region")
    pmem.init(p, size=4 * MB)
    old, new = os.urandom(200_000), os.urandom(300_000)
    r_old = pmem.commit(p, old)
    r_new = pmem.commit(p, new)
    return p, (old, r_old), (new, r_new)


def _flip(path, off, n=1):
    with open(path, "r+b") as f:
        f.seek(off)
        b = bytearray(f.read(n))
        f.seek(off)
        f.write(bytes(x ^ 0x5A for x in b))


def _status(path):
    res = CliRunner().invoke(region_cli, ["status", path, "--json"])
    return res.exit_code, json.loads(res.stdout) if res.stdout.strip() else None, res


HDR_A, HDR_B = 0, 4096


@pytest.mark.parametrize("off", [HDR_A + 3, HDR_A + 60, HDR_B + 100, HDR_B + 508])
def test_one_header_copy_damaged_reads_newest(two_gens, off):
    p, (old, _), (new, r_new) = two_gens
    _flip(p, off)
    got = pmem.read_latest(p)
    assert got.blob == new and got.generation == r_new.generation and not got.fallback
    which = "A at offset 0x0" if off < HDR_B else "B at offset 0x1000"
    assert any(f"header copy {which}" in w for w in got.warnings)
    code, st, _ = _status(p)
    assert code == EXIT_OK and st["state"]["generation"] == 2
    assert [h["valid"] for h in st["headers"]] == [off >= HDR_B, off < HDR_B]
    # the next save repairs the damaged copy
    pmem.commit(p, b"third")
    code, st, _ = _status(p)
    assert [h["valid"] for h in st["headers"]] == [True, True] and st["state"]["generation"] == 3


def test_both_header_copies_damaged(two_gens):
    p, *_ = two_gens
    _flip(p, HDR_A + 40)
    _flip(p, HDR_B + 40)
    with pytest.raises(IntegrityError) as ei:
        pmem.read_latest(p)
    msg = str(ei.value)
    assert "header copy A at offset 0x0" in msg and "header copy B at offset 0x1000" in msg
    assert ei.value.exit_code == EXIT_INTEGRITY == 4
    code, st, res = _status(p)
    assert code == EXIT_INTEGRITY and st["error"]["kind"] == "integrity"
    with pytest.raises(IntegrityError):
        pmem.commit(p, b"x")


def test_newest_slot_damaged_falls_back(two_gens):
    p, (old, r_old), (new, r_new) = two_gens
    _flip(p, r_new.slot_offset + 150_000)
    got = pmem.read_latest(p)
    assert got.blob == old and got.generation == 1 and got.fallback
    assert f"slot {r_new.slot}" in got.reason and f"{r_new.slot_offset:#x}" in got.reason
    code, st, _ = _status(p)
    assert code == EXIT_FALLBACK == 7 and st["state"]["fallback"] is True
    # explicitly asking for the damaged generation is an integrity error
    with pytest.raises(IntegrityError, match="CRC mismatch"):
        pmem.read_latest(p, generation=2)


def test_older_slot_damaged_is_only_a_warning(two_gens):
    p, (old, r_old), (new, _) = two_gens
    _flip(p, r_old.slot_offset)
    got = pmem.read_latest(p)
    assert got.blob == new and not got.fallback
    code, st, _ = _status(p)
    assert code == EXIT_OK
    assert [(g["generation"], g["ok"]) for g in st["generations"]] == [(2, True), (1, False)]
    assert any("no fallback available" in x for x in st["problems"])


def test_both_slots_damaged(two_gens):
    p, (old, r_old), (new, r_new) = two_gens
    _flip(p, r_old.slot_offset + 5)
    _flip(p, r_new.slot_offset + 5)
    with pytest.raises(IntegrityError) as ei:
        pmem.read_latest(p)
    assert f"{r_old.slot_offset:#x}" in str(ei.value) and f"{r_new.slot_offset:#x}" in str(ei.value)
    code, st, _ = _status(p)
    assert code == EXIT_INTEGRITY
    # a save still works (it writes over a damaged slot) and is then read back
    r = pmem.commit(p, b"fresh")
    assert r.generation == 3 and pmem.read_latest(p).blob == b"fresh"


def test_header_and_newest_slot_damaged(two_gens):
    p, (old, _), (new, r_new) = two_gens
    _flip(p, HDR_A + 200)
    _flip(p, r_new.slot_offset + 1)
    got = pmem.read_latest(p)
    assert got.blob == old and got.fallback
    assert _status(p)[0] == EXIT_FALLBACK


def test_zeroed_headers_mean_no_state(two_gens):
    p, *_ = two_gens
    with open(p, "r+b") as f:
        f.write(bytes(8192))
    assert not pmem.probe(p)
    with pytest.raises(NoStateError) as ei:
        pmem.read_latest(p)
    assert ei.value.exit_code == EXIT_NO_STATE
    assert _status(p)[0] == EXIT_NO_STATE


def test_truncated_region(two_gens):
    p, *_ = two_gens
    os.truncate(p, 1 * MB)
    with pytest.raises(IntegrityError, match="region_size"):
        pmem.read_latest(p)


def test_cli_errors_are_one_line(tmp_path, two_gens):
    p, *_ = two_gens
    _flip(p, HDR_A + 40)
    _flip(p, HDR_B + 40)
    res = CliRunner().invoke(region_cli, ["status", p])
    assert res.exit_code == EXIT_INTEGRITY and "Traceback" not in res.output
    res = CliRunner().invoke(region_cli, ["wipe", p, "--yes"])
    assert res.exit_code == EXIT_INTEGRITY
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    res = CliRunner().invoke(region_cli, ["status", str(tmp_path / "nope")])
    assert res.exit_code == 1 and res.stderr.count("\n") == 1
