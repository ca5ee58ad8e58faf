"""The patched kernel reads the state early (issue 6), in the QEMU lab.

Own command (a cold kernel build takes 15-25 minutes on 2 cores, so it is not part of
`make test`): ``make test-kernel`` (= ``pytest -m kernel tests/system``).

Scenario: the first kernel is Debian's stock 6.12 with a legacy ``memmap=`` pmem range; it
saves the real state of the guest (edu bound to vfio-pci) into a region on /dev/pmem0 and
kexecs into the PATCHED kernel with ``handover=64M@0x30000000``. The patched kernel must find
the newest slot, validate the blob with the C parser, reserve its ranges, and report it in
/sys/kernel/handover/ (one value per file, read by the lab's ``hstatus``); ``handover
check-kernel`` reads its ELF note from /sys/kernel/notes. A second run commits a state whose
inside is corrupt (a section CRC) into the region: the kernel refuses it without a panic and
says why.

Every test runs on both build configurations of the patched kernel (tools/kernel.py), the
``patched`` fixture's parameter (tests/conftest.py): ``lab`` (everything built in) and ``debian`` (Debian's own
config, vfio/vfio-pci/dax/virtio as modules: the initrd carries that build's modules too, and
every phase booted into it must have loaded them). A configuration that is not built is
skipped (HANDOVER_BUILD_KERNEL=1 builds it; HANDOVER_KERNEL_STALE_OK=1 takes a build older
than the patches, e.g. while the next one is being made).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.system import lab
from tests.system.patched import REGION, ROOT, on_patched
from tests.system.patched import status as _status

pytestmark = [pytest.mark.system, pytest.mark.kernel]

SAVE = r"""
set -e
modprobe vfio_pci 2>/dev/null || true
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
python3 -m handover region init /dev/pmem0 --force
python3 -m handover save --region /dev/pmem0 --token 8c1f3a52-6b0e-4d7a-9e21-5f4c2b9d7a10 --json > "$LAB_OUT/save.json"
python3 -m handover verify /dev/pmem0 --json > "$LAB_OUT/verify.json"
"""

SAVE_CORRUPT = r"""
set -e
python3 -m handover region init /dev/pmem0 --force
python3 - <<'EOF'
import os
from handover.formats.codec import encode
from handover.synth import synth_state
from handover.pmem import commit
from handover.formats.model import Table
st = synth_state("tiny")
# no preserved ranges (the synthetic ones are not this guest's RAM: the early check would
# refuse them first); the parser must catch the damage below
st.reserved = Table.from_rows(st.reserved.spec, [])
st.pi_descs = Table.from_rows(st.pi_descs.spec, [])
blob = bytearray(encode(st))
blob[1000] ^= 0x40          # inside a section: its CRC no longer matches
commit("/dev/pmem0", bytes(blob))
open(os.environ["LAB_OUT"] + "/committed", "w").write(str(len(blob)))
EOF
"""

REPORT = lab.HSTATUS + r"""
hstatus > "$LAB_OUT/status.txt" 2>&1 || true
cat /sys/kernel/handover/formats > "$LAB_OUT/formats.txt" 2>&1 || true
cat /sys/kernel/handover/blob > "$LAB_OUT/blob.bin" 2>/dev/null || true
dmesg | grep -i 'handover' > "$LAB_OUT/dmesg-handover.txt" || true
grep -h . /sys/class/iommu/dmar0/intel-iommu/gsts /sys/class/iommu/dmar0/intel-iommu/irta > "$LAB_OUT/regs.txt" 2>&1 || true
python3 -m handover check-kernel --json > "$LAB_OUT/check-kernel.json" 2>"$LAB_OUT/check-kernel.err" || true
uname -r > "$LAB_OUT/uname.txt"
"""


def _run(patched, first_script):
    res = lab.run_guest([first_script, REPORT], pmem="legacy",
                        kexec_append=f"handover={REGION}",
                        files={"lab/vmlinuz.2": Path(patched["bzImage"])}, timeout=420,
                        **patched["run_guest"])
    for name, secs in res.timings.items():
        print(f"  {name}: {secs:.1f} s")
    return res


def test_patched_kernel_validates_and_reports(patched):
    res = _run(patched, SAVE)
    res.check()
    on_patched(patched, res, 2)
    p1, p2 = res.phases[0], res.phases[1]
    saved = json.loads(p1.files["save.json"])
    print("/sys/kernel/handover/ after kexec:\n" + p2.files["status.txt"].decode())
    print(p2.files["dmesg-handover.txt"].decode())
    status = _status(p2.files["status.txt"].decode())
    assert status.get("state") == "valid", p2.files["status.txt"].decode() + p2.dmesg[-3000:]
    assert status["region"] == "0x4000000@0x30000000"
    verify = json.loads(p1.files["verify.json"])
    assert int(status["generation"]) == verify["generation"]
    assert status["format"] == verify["format"]
    # the RAM copy the kernel exposes is the blob that was saved; the kernel reserved every
    # range its RESERVED section lists (the counts the first series printed in `status`)
    from handover.formats.codec import decode

    st = decode(p2.files["blob.bin"])
    assert st.generation == verify["generation"]
    assert len(st.reserved) > 0 and int(status["reserved_ranges"]) == len(st.reserved)
    # only RAM is reserved: the region (kind 9) is persistent memory, not RAM
    ram = [r for r in st.reserved if r.kind != 9]
    assert (int(status["reserved_bytes"]) > 0) == bool(ram), (status, list(st.reserved))
    assert len(st.devices) == len(saved.get("devices", [])) or len(st.devices) >= 1
    ck = json.loads(p2.files["check-kernel.json"])
    assert ck["declares"] == "1.0-1.1" and ck["write"] == "1.1"
    assert "valid; reserved" in p2.files["dmesg-handover.txt"].decode()
    regs = p2.files["regs.txt"].decode().split()
    assert len(regs) == 2  # the 0003 sysfs registers exist
    assert int(regs[0], 16) >> 25 & 1  # IRES: interrupt remapping on


def test_patched_kernel_refuses_a_corrupt_state_without_panic(patched):
    res = _run(patched, SAVE_CORRUPT)
    res.check()  # the second phase ran: the machine booted on
    on_patched(patched, res, 2)
    p2 = res.phases[1]
    status = _status(p2.files["status.txt"].decode())
    assert status.get("state") == "rejected", p2.files["status.txt"].decode()
    assert status["error"].startswith("SECTION_CRC at offset")
    assert "refused: SECTION_CRC" in p2.files["dmesg-handover.txt"].decode()
    # nothing reserved (the first series left the line out, the one-value file says 0)
    assert status.get("reserved_ranges", "0") == "0"


ARM_KDUMP = lab.HSTATUS + r"""
hstatus > "$LAB_OUT/status.txt"
kexec -p /payload/lab/vmlinuz.3 --initrd=/payload/lab/initrd.img \
    --command-line="$(cat /payload/lab/cmdline.3) irqpoll nr_cpus=1 reset_devices" > "$LAB_OUT/kexec-p.log" 2>&1
echo 1 > /proc/sys/kernel/sysrq
echo 'echo c > /proc/sysrq-trigger' > /lab/exec
"""

READ_VMCORE = r"""
ls -la /proc/vmcore > "$LAB_OUT/vmcore-ls.txt" 2>&1
python3 -m handover inspect --vmcore /proc/vmcore --json > "$LAB_OUT/vmcore.json" 2> "$LAB_OUT/vmcore.err"
"""


def test_state_is_in_a_real_crash_dump(patched):
    """The patched kernel crashes (kdump); its vmcore carries the RAM copy of the state,
    found through VMCOREINFO by `handover inspect --vmcore /proc/vmcore`."""
    bz = Path(patched["bzImage"])
    res = lab.run_guest([SAVE, ARM_KDUMP, READ_VMCORE], pmem="legacy",
                        kexec_append=f"handover={REGION} crashkernel=448M",
                        files={"lab/vmlinuz.2": bz, "lab/vmlinuz.3": bz}, timeout=600,
                        **patched["run_guest"])
    for name, secs in res.timings.items():
        print(f"  {name}: {secs:.1f} s")
    p1, p2, p3 = res.phases
    on_patched(patched, res, 2, 3)   # 3: the crash kernel, booted with the same initrd
    assert _status(p2.files["status.txt"].decode()).get("state") == "valid"
    assert p3.rc == 0, p3.stderr + res.console[-3000:]
    doc = json.loads(p3.files["vmcore.json"])
    verify = json.loads(p1.files["verify.json"])
    assert doc["source"]["kind"] == "vmcore"
    assert doc["generation"] == verify["generation"] and doc["format"] == verify["format"]


NOTHING = "true\n"


def test_patched_kernels_keep_the_ir_table(patched):
    """Patched -> patched: the old kernel's save reads IRTA from sysfs (patch 0003) and
    reserves the IR table; the next kernel keeps the old IRTEs (patch 0004) instead of
    disabling interrupt remapping, and says so. (Stock -> patched keeps the stock behaviour:
    the stock kernel's state has no IRTA.)"""
    bz = Path(patched["bzImage"])
    res = lab.run_guest([NOTHING, SAVE, REPORT], pmem="legacy", kexec_append=f"handover={REGION}",
                        files={"lab/vmlinuz.2": bz, "lab/vmlinuz.3": bz}, timeout=600,
                        **patched["run_guest"])
    res.check()
    on_patched(patched, res, 2, 3)
    p2, p3 = res.phases[1], res.phases[2]
    saved = json.loads(p2.files["save.json"])
    status = _status(p3.files["status.txt"].decode())
    print(p3.files["status.txt"].decode() + p3.files["dmesg-handover.txt"].decode())
    assert status["state"] == "valid"
    assert status["ir_tables_kept"] == "1", p3.dmesg[-3000:]
    assert "keeping the interrupt-remapping table" in p3.files["dmesg-handover.txt"].decode()
    assert "not in kdump mode" not in p3.dmesg
    assert saved["counts"].get("reserved", 0) >= 2  # the region and the IR table at least


def test_stock_state_does_not_keep_ir(patched):
    res = _run(patched, SAVE)
    res.check()
    on_patched(patched, res, 2)
    msg = res.phases[1].files["dmesg-handover.txt"].decode()
    assert "interrupt-remapping table not kept: the register was not captured" in msg, msg
    assert _status(res.phases[1].files["status.txt"].decode())["ir_tables_kept"] == "0"


SAVE_ARM_LIVE = r"""
set -e
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
# edu live through VFIO: a DMA mapping (context entry, domain, page tables) and MSI
python3 vfio_edu.py 0000:00:03.0 /tmp/vfio-ready /tmp/vfio-stop > /tmp/vfio-holder.log 2>&1 &
i=0; while [ ! -f /tmp/vfio-ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/vfio-ready > "$LAB_OUT/vfio-ready.txt"
python3 -m handover region init /dev/pmem0 --force
python3 -m handover save --region /dev/pmem0 --json > "$LAB_OUT/save.json"
python3 -m handover inspect --json /dev/pmem0 > "$LAB_OUT/inspect.json"
# the region the kexec checks the saved state in (the next kernel's handover=)
[ ! -e /sys/kernel/handover/next_region ] || echo REGION > /sys/kernel/handover/next_region
echo 0000:00:03.0 > /sys/kernel/handover/keepalive
cat /sys/kernel/handover/keepalive > "$LAB_OUT/keepalive.txt"
""".replace("REGION", REGION)

REPORT_DMAR = REPORT + r"""
dmesg | grep -E 'DMAR' > "$LAB_OUT/dmar.txt" || true
"""


def test_armed_kexec_leaves_translation_on(patched):
    """Patched -> patched with edu live under VFIO and armed as keepalive (patch 0005): the
    old kernel's kexec leaves DMA translation on (the new kernel finds TES set), the state
    carries edu's context entry and IRTEs from debugfs, and the new kernel keeps the IR
    table (0004) and adopts the root table in place (0006) instead of disabling translation
    as a stock kernel does. The device-level proof is tests/system/test_keepalive.py."""
    bz = Path(patched["bzImage"])
    files = {"lab/vmlinuz.2": bz, "lab/vmlinuz.3": bz,
             "vfio_edu.py": ROOT / "tests" / "system" / "guest" / "vfio_edu.py"}
    res = lab.run_guest([NOTHING, SAVE_ARM_LIVE, REPORT_DMAR], pmem="legacy",
                        kexec_append=f"handover={REGION}", files=files, timeout=600,
                        **patched["run_guest"])
    res.check()
    on_patched(patched, res, 2, 3)
    p2, p3 = res.phases[1], res.phases[2]
    assert p2.files["keepalive.txt"].decode().split() == ["0000:00:03.0"]
    state = json.loads(p2.files["inspect.json"])
    assert state["counts"]["contexts"] >= 1 and state["counts"]["irtes"] >= 1
    dmar = p3.files["dmar.txt"].decode()
    status = _status(p3.files["status.txt"].decode())
    print(p3.files["status.txt"].decode() + p3.files["dmesg-handover.txt"].decode() + dmar)
    assert status["state"] == "valid" and status["ir_tables_kept"] == "1"
    # TES was still set when the new kernel looked: the old one left translation on, and
    # the new one kept it instead of disabling it
    assert "Translation was enabled for dmar0 but we are not in kdump mode" not in dmar
    assert "dmar0: adopted the root table of the previous kernel in place" in dmar
    assert status["root_tables_kept"] == "1"
    assert "Copied IR table for dmar0 from previous kernel" in dmar
