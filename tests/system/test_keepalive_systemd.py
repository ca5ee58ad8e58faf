"""Keepalive on a host that runs systemd (the lab's Debian root file system, rootfs mode):
the VMM is a systemd unit, and the kexec goes through `systemctl kexec` (what `handover arm
--exec` runs when systemd is PID 1), whose shutdown transaction stops every unit, the VMM's
and the caller's among them. The VFIO holder that `handover arm` starts must outlive both:
it moves into a scope of its own without default dependencies (no shutdown transaction stops
it) and its "@" argv[0] spares it from the final killing spree; so edu is still open, bus
mastering and translating, when the kexec syscall runs, and the next kernel adopts it.
Without the scope the holder dies with the caller's unit and edu is reset before the kexec.

    HANDOVER_BUILD_KERNEL=1 python -m pytest -s -m kernel tests/system/test_keepalive_systemd.py
"""

from __future__ import annotations

import json
import re

import pytest

from tests.system import lab
from tests.system.keepalive_scenario import NEW_KERNEL_KEEP, OLD_KERNEL, boot
from tests.system.patched import status as _status

pytestmark = [pytest.mark.system, pytest.mark.kernel]

VMM_LINE = ('python3 vfio_edu.py 0000:00:03.0 /tmp/vfio-ready /tmp/vfio-stop "$dax" '
            '> /tmp/vfio-holder.log 2>&1 &')
# the owner (a VMM) as a systemd unit of its own, as hosts run their VMs
OLD = OLD_KERNEL.replace(VMM_LINE, 'systemd-run --unit=vmm-edu --collect '
                         '--working-directory=/payload python3 /payload/vfio_edu.py 0000:00:03.0 '
                         '/tmp/vfio-ready /tmp/vfio-stop "$dax"', 1).replace(
    "cat /tmp/vfio-holder.log >&2\n", "journalctl -u vmm-edu --no-pager >&2 || true\n", 1).replace(
    # udev gives block devices group "disk" (0660); once the region is written, handover's
    # rule (initramfs/udev/60-handover-region.rules, installed in the lab's rootfs) makes it
    # root:root 0600 on the change event, as at every boot after
    "python3 -m handover region init /dev/pmem0 --force\n",
    "python3 -m handover region init /dev/pmem0 --force\nudevadm settle\n"
    "stat -c '%a %U:%G' /dev/pmem0 > \"$LAB_OUT/pmem-mode.txt\"\n", 1).replace(
    # arm carries the command line without handover.* words: the next phase boots the rootfs
    "--append handover.lab.phase=3",
    f"--append 'handover.lab.phase=3 handover.lab.rootfs={lab.ROOTFS_SLOT}'", 1) + r"""
scope=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["hold"]["scope"])' "$LAB_OUT/arm.json")
systemctl show -p ActiveState -p DefaultDependencies -p Conflicts "$scope" > "$LAB_OUT/scope.txt"
systemctl show -p ActiveState vmm-edu.service > "$LAB_OUT/vmm.txt"
"""
NEW = "stat -c '%a %U:%G' /dev/pmem0 > \"$LAB_OUT/pmem-mode-boot.txt\"\n" + NEW_KERNEL_KEEP + r"""
journalctl -b -1 --no-pager -o short-monotonic > "$LAB_OUT/journal-prev.txt" 2>&1 || true
"""


def test_holder_outlives_systemctl_kexec(patched):  # noqa: F811
    assert OLD.count("systemd-run --unit=vmm-edu") == 1 and "vfio-holder.log" not in OLD
    assert "udevadm settle" in OLD and "chmod" not in OLD
    assert "handover.lab.rootfs=" in OLD
    res = boot(patched, ["true\n", OLD, NEW], rootfs="debian", timeout=1500)
    old, new = res.phases[1], res.phases[2]
    text = {n: new.files[n].decode(errors="replace") for n in new.files}
    arm = json.loads(old.files["arm.json"])
    scope = old.files["scope.txt"].decode()
    print(json.dumps(arm.get("hold"), indent=1), scope, old.files["vmm.txt"].decode())
    assert arm["keepalive"]["armed"] is True
    # the region's udev rule: 0600 root:root once written, and at the next boot
    assert old.files["pmem-mode.txt"].decode().split() == ["600", "root:root"]
    assert text["pmem-mode-boot.txt"].split() == ["600", "root:root"]
    assert re.fullmatch(r"handover-hold-\d+\.scope", arm["hold"]["scope"] or "")
    assert "ActiveState=active" in scope and "DefaultDependencies=no" in scope
    assert "shutdown.target" not in scope
    assert [o["comm"] for o in arm["hold"]["owners"]] == ["python3"]
    # the shutdown stopped the VMM's unit (its files closed) and the phase's unit ...
    journal = text["journal-prev.txt"]
    assert re.search(r"vmm-edu\.service: (Deactivated|Consumed)|Stopped vmm-edu\.service", journal)
    # ... and edu was still open and running at the kexec: adopted, its DMA in flight landed
    print(text["status.txt"])
    assert _status(text["status.txt"])["state"] == "valid"
    assert re.search(r"device: 0000:00:03.0 held adopted domain=\d+", text["status.txt"])
    probe = json.loads(text["probe.json"])
    inflight = json.loads(old.files["inflight.json"])
    assert probe["command"] & 0x4 and probe["dma_old_iova"] is True
    assert inflight["staged"] and probe["inflight"] == inflight["pattern"]
    owner = json.loads(text["owner.json"])
    assert owner["owner_token"] == "opened" and owner["dma_old_iova"] is True
    assert owner["msi_eventfd"] == "ok"
