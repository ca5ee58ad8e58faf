"""The probe of the udev rule that makes the region's device root:root 0600
(``handover.pmem.udev``, ``handover region udev-probe``, and the program udev runs,
``/usr/lib/handover/udev-probe``); the rule itself: test_udev_rule.py."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import handover.pmem as pmem
from handover import initramfs as rt
from handover.cli.region import region as region_cli
from handover.formats import region as F
from handover.pmem import udev

MB = 1 << 20


@pytest.fixture
def region(tmp_path):
    """A 4 MiB region file made by the project's own ``region init``; (path, uuid)."""
    p = tmp_path / "region.img"
    info = pmem.init(p, size=4 * MB)
    return p, info["uuid"]


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_constants_agree_with_the_layout():
    assert udev.MAGIC == F.REGION_MAGIC and udev.LAYOUT_MAJOR == F.LAYOUT_MAJOR
    assert udev.HEADER_SIZE == F.HEADER_SIZE and udev.HEADER_OFFSETS == F.HEADER_OFFSETS
    assert udev.CRC_OFFSET == F.CRC_OFFSET == F.FIELD_OFFSETS["hdr_crc"]
    assert (udev.OFF_LAYOUT, udev.OFF_HEADER_SIZE, udev.OFF_COPY, udev.OFF_SEQ, udev.OFF_UUID) == (
        F.FIELD_OFFSETS["layout_major"], F.FIELD_OFFSETS["header_size"], F.FIELD_OFFSETS["copy"],
        F.FIELD_OFFSETS["seq"], F.FIELD_OFFSETS["uuid"])


def test_region_gives_the_keys(region):
    p, uuid = region
    assert udev.probe(str(p)) == {"HANDOVER_REGION": "1", "HANDOVER_REGION_LAYOUT": "1.0",
                                  "HANDOVER_REGION_HEADERS": "AB", "HANDOVER_REGION_UUID": uuid}
    # still a region after commits (seq moves on; the uuid stays)
    pmem.commit(p, b"state" * 100)
    assert udev.probe(str(p))["HANDOVER_REGION_UUID"] == uuid


@pytest.mark.parametrize("what", ["random", "zeros", "short", "empty", "magic-only-short"])
def test_not_a_region_gives_nothing(tmp_path, region, what):
    p = tmp_path / what
    if what == "random":
        data = random.Random(7).randbytes(16384)
        assert not data.startswith(F.REGION_MAGIC)
    elif what == "zeros":
        data = bytes(4 * MB)
    elif what == "short":
        data = region[0].read_bytes()[:300]       # copy A cut: no whole header copy
    elif what == "empty":
        data = b""
    else:
        data = F.REGION_MAGIC + bytes(8)
    p.write_bytes(data)
    assert udev.probe(str(p)) == {}


@pytest.mark.parametrize("what", ["missing", "directory", "fifo", "char-not-dax",
                                  "permission-denied", "eio"])
def test_unreadable_gives_nothing(tmp_path, region, monkeypatch, what):
    path = str(tmp_path / "missing")
    if what == "directory":
        path = str(tmp_path)
    elif what == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)          # never opened: a FIFO's open would block for a writer
    elif what == "char-not-dax":
        path = os.devnull
    elif what in ("permission-denied", "eio"):
        path = str(region[0])
        exc = PermissionError(13, "Permission denied") if what == "permission-denied" \
            else OSError(5, "Input/output error")

        def fail(*a, **k):
            raise exc
        monkeypatch.setattr(udev.os, "pread" if what == "eio" else "open", fail)
    assert udev.probe(path) == {}


def test_damaged_copies_still_a_region(region):
    p, uuid = region
    _patch(p, 200, b"\xff")                       # copy A's reserved bytes: its CRC fails
    assert udev.probe(str(p)) == {"HANDOVER_REGION": "1", "HANDOVER_REGION_LAYOUT": "1.0",
                                  "HANDOVER_REGION_HEADERS": "B", "HANDOVER_REGION_UUID": uuid}
    _patch(p, 0x1000 + 200, b"\xff")              # and copy B's: nothing verifies
    assert udev.probe(str(p)) == {"HANDOVER_REGION": "1", "HANDOVER_REGION_LAYOUT": "1.0",
                                  "HANDOVER_REGION_HEADERS": "none"}


def test_newer_layout_is_a_region_too(region):
    """A region of a newer handover is root's as much as ours: 0600, layout reported."""
    p, _ = region
    for off in F.HEADER_OFFSETS:
        _patch(p, off + F.FIELD_OFFSETS["layout_major"], (2).to_bytes(2, "little"))
    assert udev.probe(str(p)) == {"HANDOVER_REGION": "1", "HANDOVER_REGION_LAYOUT": "2.0",
                                  "HANDOVER_REGION_HEADERS": "none"}


@pytest.mark.parametrize("align", [4096, 2 * MB])
def test_devdax_is_read_through_a_mapping(tmp_path, region, align):
    """device-dax has no read(): the probe maps one ``align`` (size and align from sysfs)."""
    p, uuid = region
    fd = os.open(p, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        base = tmp_path / "sys" / "dev" / "char" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        base.mkdir(parents=True)
        (base / "align").write_text(f"{align}\n")
        (base / "size").write_text(f"{4 * MB}\n")
        heads = udev.read_devdax(fd, st, str(tmp_path / "sys"))
        assert [len(h) for h in heads] == [512, 512]
        assert udev.properties(heads)["HANDOVER_REGION_UUID"] == uuid
        (base / "size").write_text("4096\n")      # smaller than the mapping: nothing read
        assert udev.read_devdax(fd, st, str(tmp_path / "sys")) == []
    finally:
        os.close(fd)


def test_pmem_package_knows_the_probe():
    assert pmem.udev is udev and "udev" in dir(pmem)


def test_probe_imports_nothing_heavy():
    """The probe's start-up: no construct, ctypes or click (handover.pmem imports lazily)."""
    code = ("import sys, handover.pmem.udev; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'construct', 'ctypes', 'click'}))")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


@pytest.fixture
def probe_program(tmp_path):
    """The wrapper udev runs, written for this interpreter (as install.sh does)."""
    return str(rt.install_udev_probe(tmp_path / "root", sys.executable))


def test_probe_program(probe_program, region, tmp_path):
    p, uuid = region
    text = Path(probe_program).read_text()
    assert text.startswith(f"#!{sys.executable} -I\n") and os.access(probe_program, os.X_OK)
    # udev runs it with the device's properties as its only environment
    env = {"ACTION": "add", "DEVNAME": str(p), "SUBSYSTEM": "block"}
    r = subprocess.run([probe_program, str(p)], capture_output=True, text=True, env=env)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == (f"HANDOVER_REGION=1\nHANDOVER_REGION_LAYOUT=1.0\n"
                        f"HANDOVER_REGION_HEADERS=AB\nHANDOVER_REGION_UUID={uuid}\n")
    zero = tmp_path / "zero"
    zero.write_bytes(bytes(8192))
    for arg in (str(zero), str(tmp_path / "missing"), "/dev/null"):
        r = subprocess.run([probe_program, arg], capture_output=True, text=True, env=env)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), arg
    for args in ([], ["a", "b"], ["--force"]):
        r = subprocess.run([probe_program, *args], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("handover: usage: "), args


def test_probe_program_without_handover(tmp_path):
    """handover removed, rule and probe left behind: a note on stderr, exit 0, no keys."""
    p = rt.install_udev_probe(tmp_path, "/usr/bin/python3")
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no /usr/bin/python3")
    r = subprocess.run(["/usr/bin/python3", "-I", "-S", str(p), "/dev/null"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "" and "Traceback" not in r.stderr


def test_probe_script_needs_an_absolute_interpreter():
    for bad in ("python3", "/opt/my python/bin/python"):
        with pytest.raises(RuntimeError):
            rt.udev_probe_script(bad)


def test_cli_udev_probe(region):
    p, uuid = region
    r = CliRunner().invoke(region_cli, ["udev-probe", str(p)])
    assert r.exit_code == 0 and r.stdout == udev.format_properties(udev.probe(str(p)))
    assert f"HANDOVER_REGION_UUID={uuid}" in r.stdout
    r = CliRunner().invoke(region_cli, ["udev-probe", str(p) + ".missing"])
    assert (r.exit_code, r.stdout) == (0, "")
