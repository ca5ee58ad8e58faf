"""Smoke tests of the QEMU lab itself (the package tests/system/lab/).

They boot Debian's stock 6.12 kernel under TCG with an emulated VT-d and pmem; each takes
10-30 s.  Skipped only when QEMU cannot be installed on the host.
"""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from tests.system import lab

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def lab_ready():
    try:
        return lab.setup()
    except lab.LabUnavailable as e:
        pytest.skip(f"QEMU lab unavailable: {e}")


def _report(res: lab.GuestResult, title: str) -> None:
    print(f"\n{title} timings:\n{res.format_timings()}", file=sys.stderr)


PHASE1 = r"""
set -e
python3 -c 'import handover, construct, click, msgpack, crcmod; print("import-ok", handover.__version__)'
test -d /sys/class/iommu/dmar0 && echo dmar0-ok
test -b /dev/pmem0 && echo pmem0-ok
grep -q 'IR-PCI-MSI' /proc/interrupts && echo ir-msi-ok
dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
dd if=/tmp/pattern of=/dev/pmem0 bs=64k seek=3 conv=fsync 2>/dev/null
cp /tmp/pattern "$LAB_OUT/pattern"
md5sum /tmp/pattern | cut -d' ' -f1
"""

PHASE2 = r"""
set -e
grep -o 'memmap=[^ ]*' /proc/cmdline
test -b /dev/pmem0 && echo pmem0-ok
dd if=/dev/pmem0 bs=64k skip=3 count=16 2>/dev/null > "$LAB_OUT/readback"
md5sum "$LAB_OUT/readback" | cut -d' ' -f1
dmesg | grep -c 'IRQ remapping was enabled on dmar0 but we are not in kdump mode' || true
"""


@pytest.mark.parametrize("kexec_mode", ["l", "s", "p"])
def test_boot_python_iommu_pmem_and_kexec(lab_ready, kexec_mode):
    # "p": kdump (kexec -p, then a sysrq crash); the crash kernel copies the IR/DMA tables
    kexec_append = "irqpoll nr_cpus=1 reset_devices" if kexec_mode == "p" else None
    res = lab.run_guest([PHASE1, PHASE2], pmem="legacy", kexec_mode=kexec_mode,
                        kexec_append=kexec_append, timeout=240)
    _report(res, f"kexec -{kexec_mode} cycle")
    res.check()
    p1, p2 = res.phases
    for word in ("import-ok", "dmar0-ok", "pmem0-ok", "ir-msi-ok"):
        assert word in p1.stdout, p1.stdout
    assert "memmap=64M!0x30000000" in p2.stdout
    assert "handover.lab.phase=2" in p2.cmdline
    pattern, readback = p1.files["pattern"], p2.files["readback"]
    assert len(pattern) == 1 << 20
    assert hashlib.sha256(readback).digest() == hashlib.sha256(pattern).digest(), \
        "pmem content did not survive kexec"
    if kexec_mode == "p":
        assert "Copied IR table for dmar0 from previous kernel" in p2.dmesg
    else:
        assert "IRQ remapping was enabled on dmar0 but we are not in kdump mode" in p2.dmesg
    # timings exist for every step of the cycle
    for key in ("qemu start -> /init (phase 1)", "phase 1: kexec load", "kexec -e -> /init (phase 2)"):
        assert key in res.timings, res.timings


def test_nvdimm_bytes_visible_on_host(lab_ready, tmp_path):
    nv = tmp_path / "nv.img"
    script = r"""
set -e
test -b /dev/pmem0
printf 'HANDOVER-LAB-NVDIMM-%s' "$LAB_PHASE" | dd of=/dev/pmem0 bs=4096 seek=5 conv=sync,fsync 2>/dev/null
echo written
"""
    res = lab.run_guest(script, pmem="nvdimm", nvdimm_file=nv, nvdimm_size=128 << 20, timeout=180)
    _report(res, "nvdimm")
    res.check()
    with open(nv, "rb") as f:
        f.seek(5 * 4096)
        assert f.read(21) == b"HANDOVER-LAB-NVDIMM-1"


def test_hung_guest_is_killed(lab_ready):
    with pytest.raises(lab.LabTimeout):
        lab.run_guest("sleep 1000", pmem=None, timeout=25)
