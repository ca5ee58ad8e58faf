"""Commit protocol, safety rules and the public API on file regions (pread/pwrite and mmap)."""

import hashlib
import os
import signal
import stat
import time

import pytest

import handover.pmem as pmem
from handover.errors import NoStateError, VersionError
from handover.pmem import protocol as C
from handover.pmem import layout as L
from handover.pmem.kinds import RegionError, RegionLockedError

MB = 1 << 20


@pytest.fixture
def region(tmp_path):
    p = tmp_path / "region"
    pmem.init(p, size=8 * MB)
    return str(p)


def test_init_creates_0600_and_probe(tmp_path, region):
    assert stat.S_IMODE(os.stat(region).st_mode) == 0o600
    assert pmem.probe(region)
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"HOVRSTAT" + os.urandom(5000))
    garbage = tmp_path / "garbage"
    garbage.write_bytes(os.urandom(20000))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for p in (blob, garbage, empty, tmp_path, tmp_path / "missing", "/dev/null"):
        assert pmem.probe(p) is False
    with pytest.raises(NoStateError, match="no committed state"):
        pmem.read_latest(region)


@pytest.mark.parametrize("mode", [None, "mmap"])
def test_commit_alternates_slots_and_reads_back(region, mode):
    seen = []
    for i in range(5):
        blob = os.urandom(100_000 + i * 777)
        with C.open_region(region, write=True, mode=mode) as r:
            res = r.commit(blob)
        with C.open_region(region, mode=mode) as r:
            got = r.read_latest()
        assert got.blob == blob and got.generation == res.generation == i + 1
        assert got.slot == res.slot and not got.fallback and got.reason is None
        seen.append(res.slot)
    assert seen == [0, 1, 0, 1, 0]
    # the previous generation is still readable by number
    prev = pmem.read_latest(region, generation=4)
    assert prev.generation == 4 and prev.slot == 1
    with pytest.raises(NoStateError, match="available"):
        pmem.read_latest(region, generation=2)


def test_too_large_fails_before_writing(region):
    pmem.commit(region, b"x" * 1000)
    before = open(region, "rb").read()
    cap = pmem.status(region)["slots"][0]["capacity"]
    with pytest.raises(RegionError) as ei:
        pmem.commit(region, os.urandom(cap + 1))
    assert str(cap + 1) in str(ei.value) and str(cap) in str(ei.value)
    assert "nothing was written" in str(ei.value)
    assert open(region, "rb").read() == before
    assert ei.value.exit_code == 1
    # exactly the capacity fits
    assert pmem.commit(region, b"y" * cap).length == cap


def test_never_overwrites_newest_valid_slot(region):
    a, b = os.urandom(5000), os.urandom(6000)
    ra = pmem.commit(region, a)
    rb = pmem.commit(region, b)
    # damage the newest slot: the region now falls back to `a`, which must survive the next save
    with open(region, "r+b") as f:
        f.seek(rb.slot_offset + 10)
        f.write(b"\xff\xff\xff")
    got = pmem.read_latest(region)
    assert got.blob == a and got.fallback and "generation 2" in got.reason
    c = os.urandom(7000)
    rc = pmem.commit(region, c)
    assert rc.slot == rb.slot != ra.slot           # wrote over the damaged one
    assert rc.generation == 3
    assert pmem.read_latest(region).blob == c
    assert pmem.read_latest(region, generation=1).blob == a


def test_lock_excludes_second_save(region):
    r_fd, w_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: hold the lock for a while
        try:
            os.close(r_fd)
            with C.open_region(region, write=True):
                os.write(w_fd, b"L")
                time.sleep(1.0)
        finally:
            os._exit(0)
    os.close(w_fd)
    try:
        assert os.read(r_fd, 1) == b"L"
        with pytest.raises(RegionLockedError, match="locked") as ei:
            pmem.commit(region, b"abc")
        assert f"pid {pid}" in str(ei.value) and "--wait" in str(ei.value)
        t0 = time.monotonic()
        res = pmem.commit(region, b"abc", wait=True)
        assert time.monotonic() - t0 > 0.3 and res.generation == 1
    finally:
        os.waitpid(pid, 0)
        os.close(r_fd)


def test_permissions_refused_unless_force(region):
    os.chmod(region, 0o644)
    with pytest.raises(RegionError, match="non-root") as ei:
        pmem.commit(region, b"abc")
    assert "0644" in str(ei.value)
    assert pmem.commit(region, b"abc", force=True).generation == 1
    os.chmod(region, 0o600)
    os.chown(region, 12345, 0)
    with pytest.raises(RegionError, match="uid 12345"):
        pmem.commit(region, b"abc")
    os.chown(region, 0, 0)
    assert pmem.commit(region, b"def").generation == 2


def _rewrite_headers(path, **changes):
    with C.open_region(path, write=True) as r:
        hdrs, _ = r.read_headers()
        for c, h in enumerate(hdrs):
            for k, v in changes.items():
                setattr(h, k, v)
            r.acc.write(L.HEADER_OFFSETS[c], L.encode_header(h.copy_for(c)))


def test_newer_layout_refused_not_clobbered(region):
    pmem.commit(region, b"state")
    _rewrite_headers(region, layout_major=2)
    before = open(region, "rb").read()
    for fn in (lambda: pmem.read_latest(region), lambda: pmem.commit(region, b"new"),
               lambda: pmem.init(region)):
        with pytest.raises(VersionError, match="newer") as ei:
            fn()
        assert ei.value.exit_code == 5
    assert open(region, "rb").read() == before
    assert pmem.probe(region)


def test_init_refuses_existing_and_foreign_data(tmp_path, region):
    with pytest.raises(RegionError, match="already"):
        pmem.init(region)
    foreign = tmp_path / "fs.img"
    foreign.write_bytes(os.urandom(4 * MB))
    os.chmod(foreign, 0o600)
    with pytest.raises(RegionError, match="not a handover region"):
        pmem.init(foreign)
    info = pmem.init(foreign, force=True)
    assert info["size"] == 4 * MB and pmem.probe(foreign)
    with pytest.raises(RegionError, match="--size"):
        pmem.init(tmp_path / "new")
    with pytest.raises(RegionError, match="only to region files"):
        pmem.init("/dev/null", size=1 << 20)
    with pytest.raises(RegionError, match="too small"):
        pmem.init(tmp_path / "tiny", size=10000)
    assert not (tmp_path / "tiny").exists()


def test_wipe(region):
    blob = os.urandom(30000)
    res = pmem.commit(region, blob)
    n = pmem.wipe(region)
    assert n == len(blob)
    assert pmem.probe(region)
    with pytest.raises(NoStateError):
        pmem.read_latest(region)
    data = open(region, "rb").read()
    assert data[res.slot_offset:res.slot_offset + len(blob)] == bytes(len(blob))
    assert pmem.commit(region, b"again").generation == 1


def test_status_reports_geometry(region):
    pmem.commit(region, b"a" * 4096)
    st = pmem.status(region)
    assert st["initialized"] and st["kind"] == "file" and st["size"] == 8 * MB
    assert [h["valid"] for h in st["headers"]] == [True, True]
    assert st["state"]["generation"] == 1 and st["state"]["length"] == 4096
    assert st["slots"][0]["offset"] == 8192
    assert hashlib.sha256(pmem.read_latest(region).blob).digest() == hashlib.sha256(b"a" * 4096).digest()


def test_sigkill_while_holding_lock_releases_it(region):
    pid = os.fork()
    if pid == 0:
        with C.open_region(region, write=True):
            time.sleep(30)
        os._exit(0)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert pmem.commit(region, b"after").generation == 1


def test_next_generation_under_lock(region):
    with C.open_region(region, write=True) as r:
        assert r.next_generation() == 1
        assert r.commit(b"one").generation == 1
        assert r.next_generation() == 2
        # a second writer is excluded while this one holds the region
        with pytest.raises(RegionLockedError):
            pmem.commit(region, b"other")
        assert r.commit(b"two").generation == 2


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_commit_accepts_buffers(region, wrap, monkeypatch):
    monkeypatch.setattr(C, "PARALLEL_CRC_MIN", 1 * MB)   # take the parallel CRC path
    blob = os.urandom(3 * MB)
    res = pmem.commit(region, wrap(blob))
    assert res.length == len(blob) and pmem.read_latest(region).blob == blob
