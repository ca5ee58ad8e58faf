"""``handover load`` compares each unit's interrupt-remapping mode (IRTA EIME: x2APIC/EIM or
xAPIC) and translation mode (RTADDR TTM: legacy or scalable) with the host's, and names the
unit and the consequence in a one-line failure."""

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from handover.cli import main

CAPTURED = Path(__file__).resolve().parent.parent / "fixtures" / "captured"
REGS = "sys/devices/virtual/iommu/dmar0/intel-iommu"
REGSET = "sys/kernel/debug/iommu/intel/iommu_regset"
IRTA, RTADDR = 0x120000F, 0x196E000          # the capture's dmar0 values


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def set_reg(root: Path, name: str, value: int) -> None:
    """A register of dmar0 as both readers see it: the 0003 sysfs file and debugfs
    iommu_regset."""
    (root / REGS / name.lower()).write_text(f"{value:x}\n")
    p = root / REGSET
    p.write_text(re.sub(rf"^({name}\s+0x[0-9a-f]+\s+)0x[0-9a-f]+$", rf"\g<1>0x{value:016x}",
                        p.read_text(), flags=re.M))


@pytest.fixture
def host(tmp_path):
    root = tmp_path / "host"
    shutil.copytree(CAPTURED / "handover-6.12-debugfs", root, symlinks=True,
                    ignore=shutil.ignore_patterns("_capture"))
    return root


def save_then_load(host, tmp_path, before=None, after=None):
    for reg, v in (before or {}).items():
        set_reg(host, reg, v)
    blob = tmp_path / "state.bin"
    code, _, err = run("save", "--sysroot", host, "--output", blob, "--json")
    assert code == 0, err
    for reg, v in (after or {}).items():
        set_reg(host, reg, v)
    code, out, err = run("load", "--sysroot", host, "--region", blob, "--result-dir",
                         tmp_path / "res", "--json", "--check-only")
    doc = json.loads(out)
    return code, {v["item"]: v for v in doc["verdicts"]}, doc, err


def test_same_modes_match(host, tmp_path):
    code, v, _doc, _ = save_then_load(host, tmp_path)
    assert code == 0
    assert v["unit dmar0 interrupt remapping mode"]["status"] == "match"
    assert v["unit dmar0 interrupt remapping mode"]["saved"] == "xAPIC"
    assert v["unit dmar0 translation mode"]["status"] == "match"
    assert v["unit dmar0 translation mode"]["host"] == "legacy"


def test_saved_x2apic_host_xapic_is_a_named_mismatch(host, tmp_path):
    code, v, doc, err = save_then_load(host, tmp_path, before={"IRTA": IRTA | 1 << 11},
                                       after={"IRTA": IRTA})
    assert code == 6 and not doc["ok"]
    m = v["unit dmar0 interrupt remapping mode"]
    assert (m["status"], m["saved"], m["host"]) == ("mismatch", "x2APIC (EIM)", "xAPIC")
    line = next(f for f in doc["failures"] if "interrupt remapping mode" in f)
    assert line == ("unit dmar0 interrupt remapping mode: mismatch: saved x2APIC (EIM), host "
                    "xAPIC (the kept IR table would misroute interrupts)")
    assert "\n" not in line and "Traceback" not in err


def test_host_switched_to_x2apic_and_scalable(host, tmp_path):
    code, v, _doc, _ = save_then_load(host, tmp_path,
                                      after={"IRTA": IRTA | 1 << 11, "RTADDR": RTADDR | 1 << 10})
    assert code == 6
    assert v["unit dmar0 interrupt remapping mode"]["host"] == "x2APIC (EIM)"
    t = v["unit dmar0 translation mode"]
    assert (t["status"], t["saved"], t["host"]) == ("mismatch", "legacy", "scalable")
    assert "cannot be adopted" in t["detail"]


def test_a_stock_host_leaves_the_modes_unverified(tmp_path):
    root = tmp_path / "host"
    shutil.copytree(CAPTURED / "debian-6.12-legacy-pmem", root, symlinks=True,
                    ignore=shutil.ignore_patterns("_capture"))
    blob = tmp_path / "state.bin"
    assert run("save", "--sysroot", root, "--output", blob)[0] == 0
    code, out, _ = run("load", "--sysroot", root, "--region", blob, "--result-dir",
                       tmp_path / "res", "--json", "--check-only")
    v = {x["item"]: x for x in json.loads(out)["verdicts"]}
    assert code == 0
    assert v["unit dmar0 interrupt remapping mode"]["status"] == "unverified"
    assert "not recorded in the saved state" in v["unit dmar0 interrupt remapping mode"]["detail"]
    assert "unit dmar0 translation mode" not in v        # TE was not on (not recorded)
