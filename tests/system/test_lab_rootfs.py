"""The lab's rootfs mode (``RunOptions(rootfs="debian")``): the stock Debian kernel boots the
lab's initrd, which switch_roots into a Debian 12 root file system (debootstrap, cached;
a qcow2 overlay per run) with systemd as PID 1; lab-phase.service runs each phase, and the
next phase is reached by ``kexec -l`` + ``systemctl kexec`` through the shutdown transaction
(the project's handover-save.service stops on the way). Building the image the first time
takes 1.5-3 minutes (debootstrap); a two-phase run 1.5-3 minutes of TCG.
"""

from __future__ import annotations

import sys

import pytest

from tests.system import lab

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def rootfs_ready():
    try:
        lab.setup()
        return lab.rootfs.build()
    except lab.LabUnavailable as e:
        pytest.skip(f"QEMU lab or debootstrap unavailable: {e}")


PHASE1 = r"""
set -e
echo "pid1=$(cat /proc/1/comm) exe=$(readlink /proc/1/exe)"
echo "unit=$(systemctl show -p ActiveState --value lab-phase.service)"
echo "save-unit=$(systemctl is-active handover-save.service)"
handover --help > /dev/null && echo handover-cli-ok
python3 -c 'import handover, construct, click, msgpack, crcmod, google_crc32c, elftools; print("import-ok")'
# a persistent journal from here on: the next boot reads this boot's shutdown in it
mkdir -p /var/log/journal
journalctl --flush
cat /proc/sys/kernel/random/boot_id > /root/boot1
cp /root/boot1 "$LAB_OUT/boot1"
"""

PHASE2 = r"""
set -e
echo "pid1=$(cat /proc/1/comm)"
# the root disk (the run's overlay) kept phase 1's file across the kexec
cp /root/boot1 "$LAB_OUT/boot1-seen"
cat /proc/sys/kernel/random/boot_id > "$LAB_OUT/boot2"
# how the previous boot ended: systemd's kexec path, the save unit stopped on the way
journalctl -b -1 -o cat --no-pager > "$LAB_OUT/previous-boot.txt"
"""


def test_systemd_rootfs_and_systemctl_kexec(rootfs_ready):
    res = lab.run_guest([PHASE1, PHASE2], rootfs="debian", pmem="legacy", timeout=600)
    print(f"\nrootfs two-phase run timings:\n{res.format_timings()}", file=sys.stderr)
    res.check()
    p1, p2 = res.phases
    assert "pid1=systemd exe=/usr/lib/systemd/systemd" in p1.stdout, p1.stdout
    assert "unit=activating" in p1.stdout          # the phase runs inside lab-phase.service
    assert "save-unit=active" in p1.stdout         # the project's unit, from the payload
    assert "handover-cli-ok" in p1.stdout and "import-ok" in p1.stdout
    assert "pid1=systemd" in p2.stdout
    assert "handover.lab.phase=2" in p2.cmdline and "handover.lab.rootfs=" in p2.cmdline
    boot1 = p1.files["boot1"]
    assert p2.files["boot1-seen"] == boot1
    assert p2.files["boot2"] != boot1
    # phase 1 went out through systemctl kexec, a kexec and not a reboot (QEMU runs with
    # -no-reboot, and the stock kernel reports the interrupt remapping the old one left on)
    marks = lab.index_markers(res.markers)
    assert ("KEXEC-EXEC", 1) in marks and ("INIT", 2) in marks
    exec_rest = [rest for _t, name, rest in res.markers if name == "KEXEC-EXEC"]
    assert exec_rest and "systemctl" in exec_rest[0], exec_rest
    assert "IRQ remapping was enabled on dmar0 but we are not in kdump mode" in p2.dmesg
    prev = p2.files["previous-boot.txt"].decode(errors="replace")
    # (kexec.target is reached after the journal stops: its last line is systemd-kexec's start)
    assert "Starting systemd-kexec.service" in prev, prev[-3000:]
    assert "Stopped handover-save.service" in prev, prev[-3000:]
    # the unit's ExecStop ran `handover arm --on-shutdown`, which saves only when armed
    assert "handover: not armed (no marker): nothing to save" in prev, prev[-3000:]
    for key in ("qemu start -> script (phase 1)", "phase 1: switch_root -> unit (systemd)",
                "kexec -e -> /init (phase 2)"):
        assert key in res.timings, res.timings
