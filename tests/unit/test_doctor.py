"""``handover doctor`` on the captured hosts (tests/fixtures/captured), as they are and with
what a patched, ready host adds (the handover sysfs files, kexec-tools, a region)."""

import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from handover.cli import main
from tests.elfwriter import elf, note

from hosttree import E1000E, EDU

CAPTURED = Path(__file__).resolve().parent.parent / "fixtures" / "captured"


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def doctor_json(*args):
    code, out, err = run("doctor", "--json", *args)
    doc = json.loads(out)
    assert doc["schema"] == "handover.doctor/1" and doc["exit_code"] == code, err
    return code, doc, {c["check"]: c for c in doc["checks"]}


def kernel_image(tmp_path, declares=(1, 1)):
    notes = note("Linux", 256, b"6.12")
    if declares:
        notes += note("Handover", 1, struct.pack("<I", declares[0] << 16 | declares[1]))
    p = tmp_path / f"vmlinux-{declares}"
    p.write_bytes(elf([("note", notes, 0)], e_type=2))
    return p


@pytest.mark.parametrize("fixture", sorted(p.name for p in CAPTURED.iterdir()))
def test_every_captured_host_gets_a_verdict_per_check(fixture):
    code, doc, checks = doctor_json("--sysroot", CAPTURED / fixture)
    assert code == 1 and not doc["ok"]              # no kexec-tools, no region in a capture
    assert checks["kexec"]["status"] == "fail" and "kexec-tools" in checks["kexec"]["text"]
    assert checks["kernel.running"]["status"] == "warn"          # stock kernels
    assert checks["iommu.dmar0"]["facts"]["register_base"] == "0xfed90000"
    assert doc["keepalive"] is False and doc["kept"] == []
    regions = [c for name, c in checks.items() if name.startswith("region")]
    assert regions and all(c["status"] == "fail" for c in regions)


def test_text_is_one_line_per_check():
    host = CAPTURED / "debian-6.12-legacy-pmem"
    code, out, _ = run("doctor", "--sysroot", host)
    lines = out.splitlines()
    assert code == 1 and lines[-1].startswith("NOT READY: 2 check(s) failed")
    assert any(ln.startswith("ok    device.0000:00:03.0") and "alone in IOMMU group 2" in ln
               for ln in lines)
    assert any("memmap=64M!0x30000000" in ln and ln.startswith("FAIL  region./dev/dax0.0")
               for ln in lines)
    assert "None" not in out


@pytest.fixture
def ready_host(tmp_path):
    """The debugfs capture with what a patched host that is ready has."""
    root = tmp_path / "host"
    shutil.copytree(CAPTURED / "handover-6.12-debugfs", root, symlinks=True,
                    ignore=shutil.ignore_patterns("_capture"))
    h = root / "sys/kernel/handover"
    h.mkdir(parents=True)
    (h / "formats").write_text("1.0-1.1\n")
    (h / "status").write_text("state: none\n")
    (h / "decision").write_text("pending\n")
    (h / "keepalive").write_text("")
    (root / "sys/kernel/notes").write_bytes(note("Handover", 1, struct.pack("<I", 1 << 16 | 1)))
    (root / "sys/kernel/kexec_loaded").write_text("0\n")
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/kexec").write_text("#!/bin/sh\n")
    region = tmp_path / "region.img"
    assert run("region", "init", region, "--size", "4M")[0] == 0
    return root, region


def test_a_ready_host_keeps_its_vfio_device(ready_host, tmp_path):
    root, region = ready_host
    code, doc, checks = doctor_json("--sysroot", root, "--region", region,
                                    "--kernel", kernel_image(tmp_path))
    assert code == 0 and doc["ok"] and doc["keepalive"], checks
    assert checks["kernel.running"]["status"] == "ok" and "1.0-1.1" in checks["kernel.running"]["text"]
    assert checks["kernel.target"]["status"] == "ok" and checks["kernel.target"]["facts"]["writes"] == "1.1"
    u = checks["iommu.dmar0"]["facts"]
    assert (u["mode"], u["interrupt_remapping"], u["x2apic"]) == ("legacy", True, False)
    assert doc["kept"] == [EDU] and doc["released"] == []
    assert checks["region"]["status"] == "warn"     # a file: no physical address


def test_a_stock_next_kernel_releases_everything(ready_host, tmp_path):
    root, region = ready_host
    code, doc, checks = doctor_json("--sysroot", root, "--region", region,
                                    "--kernel", kernel_image(tmp_path, None))
    assert code == 0 and not doc["keepalive"]
    assert checks["kernel.target"]["status"] == "warn" and "stopped" in checks["kernel.target"]["text"]
    assert doc["kept"] == [] and doc["released"] == [EDU]


def test_a_device_not_on_vfio_and_a_kernel_we_cannot_write_for_fail(ready_host, tmp_path):
    root, region = ready_host
    code, doc, checks = doctor_json("--sysroot", root, "--region", region,
                                    "--kernel", kernel_image(tmp_path, (2, 0)),
                                    "--device", E1000E)
    assert code == 1
    assert checks["kernel.target"]["status"] == "fail"
    assert checks[f"device.{E1000E}"]["status"] == "fail"
    assert "not vfio-pci" in checks[f"device.{E1000E}"]["text"]


def test_a_missing_sysroot_is_an_error(tmp_path):
    code, _, err = run("doctor", "--sysroot", tmp_path / "nope")
    assert code in (1, 2) and "sysroot" in err.lower()
