"""System test: `handover save` in the first kernel (edu bound to vfio-pci), kexec, `handover
load` in the second; once with a true state (match, exit 0) and once with a state made stale
before kexec (a saved BAR altered with the hidden test option: mismatch named, exit 6).
Stock Debian 6.12 in the QEMU lab (tests/system/README.md), legacy pmem at /dev/pmem0."""

from __future__ import annotations

import json

import pytest

from tests.system import lab

pytestmark = pytest.mark.system

TOKEN = "8c1f3a52-6b0e-4d7a-9e21-5f4c2b9d7a10"

PHASE1 = r"""
set -eu
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
ls -l /sys/bus/pci/devices/0000:00:03.0/driver
python3 -m handover region init /dev/pmem0 --force
python3 -m handover save --region /dev/pmem0 --token {token} --json {extra} > "$LAB_OUT/save.json"
python3 -m handover capture-sysroot "$LAB_OUT/sysroot-phase1.tar"
"""

PHASE2 = r"""
set -u
rc=0
python3 -m handover load --region /dev/pmem0 --token {token} --result-dir "$LAB_OUT" \
    > "$LAB_OUT/load.txt" 2> "$LAB_OUT/load.err" || rc=$?
echo "$rc" > "$LAB_OUT/load.rc"
cat "$LAB_OUT/load.txt" "$LAB_OUT/load.err"
exit 0
"""


def _run(extra: str = ""):
    try:
        res = lab.run_guest([PHASE1.format(token=TOKEN, extra=extra), PHASE2.format(token=TOKEN)],
                            pmem="legacy", timeout=300)
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    res.check()
    p1, p2 = res.phases[0].files, res.phases[1].files
    save = json.loads(p1["save.json"])
    result = json.loads(p2["result.json"])
    rc = int(p2["load.rc"].decode().strip())
    return save, result, rc, p2


def test_save_kexec_load_matches():
    save, result, rc, p2 = _run()
    assert save["devices"] == ["0000:00:03.0"] and save["commit"]["generation"] == 1
    assert "irtes" in save["absent"]           # stock kernel: no intel-iommu debugfs
    assert rc == 0, p2["load.txt"].decode() + p2["load.err"].decode()
    assert result["ok"] and result["summary"]["mismatch"] == 0 and result["summary"]["missing"] == 0
    items = {v["item"]: v["status"] for v in result["verdicts"]}
    assert items["device 0000:00:03.0 BAR0"] == "match"
    assert items["unit dmar0 register base"] == "match"
    assert items["device 0000:00:03.0 token"] == "match"
    assert result["kernel_interface"]["present"] is False


def test_stale_state_reports_mismatch_and_exits_6():
    save, result, rc, p2 = _run("--test-alter-bar 0000:00:03.0:0:0xfe000000")
    assert rc == 6, p2["load.txt"].decode() + p2["load.err"].decode()
    assert not result["ok"]
    bad = {v["item"]: v for v in result["verdicts"] if v["status"] == "mismatch"}
    assert "device 0000:00:03.0 BAR0" in bad
    assert bad["device 0000:00:03.0 BAR0"]["saved"].startswith("0xfe000000")
    assert "device 0000:00:03.0 BAR0" in p2["load.err"].decode()
