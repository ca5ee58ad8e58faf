"""Stage-2 of the VMM fast restart (issue 15): a VM keeps its passthrough device, never
reset, while the host kernel is replaced under it (tests/system/vm_keepalive.py describes
the run). Needs the patched kernel (HANDOVER_BUILD_KERNEL=1 or a built one) and the patched
QEMU (python tools/qemu.py build); skipped with the reason otherwise. TCG inside TCG: about
ten minutes.

    HANDOVER_BUILD_KERNEL=1 python -m pytest -s -m kernel tests/system/test_vm_keepalive.py
"""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.system import lab, vm_keepalive as vk
from tests.system.keepalive_scenario import boot
from tests.system.patched import status as _status

pytestmark = [pytest.mark.system, pytest.mark.kernel]


def _last(samples: list) -> dict:
    return samples[-1]


@pytest.mark.parametrize("nvme", [False, True], ids=["edu", "edu+nvme"])
def test_vm_keeps_its_devices_across_host_kexec(patched, nvme):  # noqa: F811
    """edu alone, then edu and the lab's NVMe controller (MSI-X, queues in the VM's RAM)."""
    try:
        files = vk.files()
        lab.rootfs.build()
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    res = boot(patched, ["true\n", vk.old_script(nvme), vk.new_script(nvme=nvme)], rootfs="debian",
               timeout=2400, files=files, nvme=nvme)
    old, new = res.phases[1], res.phases[2]
    text = {n: new.files[n].decode(errors="replace") for n in new.files if not n.endswith(".json")}
    figs = vk.pause_figures(res)
    print("\nVM pause (s):", json.dumps(figs, indent=1), file=sys.stderr)
    save = json.loads(old.files["vm-save.json"])
    arm = json.loads(old.files["arm.json"])
    poke = json.loads(old.files["poke.json"])
    before = json.loads(old.files["progress-before.json"])
    after = json.loads(new.files["progress-after.json"])
    print("vm save:", json.dumps(save, indent=1), "\nrestore:", new.files.get("vm-restore.json"),
          text.get("vm-restore.err"), "\npoke:", poke, "\nbefore:", _last(before),
          "\nafter:", after[0], _last(after), file=sys.stderr)
    # the old kernel: keepalive set, VM saved, edu armed and held, its interrupt raised
    assert sorted(d["host"] for d in save["devices"]) == ["0000:00:03.0"] + ([lab.NVME_BDF] if nvme else []), save
    assert arm["keepalive"]["armed"] is True
    assert poke["status"] & 0x10000, poke
    # the new kernel adopted edu (no reset) and the token's owner opened it
    assert _status(text["status.txt"])["state"] == "valid", text["status.txt"]
    assert re.search(r"device: 0000:00:03.0 held adopted domain=\d+", text["status.txt"])
    if nvme:
        assert re.search(rf"device: {lab.NVME_BDF} held adopted domain=\d+", text["status.txt"])
    restore = json.loads(new.files["vm-restore.json"])
    assert restore["status"] == "running", restore
    # the VM went on: more rounds, none wrong, no completion lost, the register it wrote once
    # still set (never reset), the interrupt raised while no VMM owned edu delivered
    first, last = after[0], _last(after)
    assert first["magic"] == "EDUPROG1" and first["rounds"] >= _last(before)["rounds"]
    assert last["state"] == 3 and last["rounds"] >= first["rounds"] + 5, last
    assert last["errors"] == 0 and last["polled"] == 0 and last["alive_bad"] == 0, last
    assert last["poked"] >= 1, last
    # the guest saw the pause in its wall clock, between two rounds
    assert last["max_gap"] >= 5, last
    assert "vfio_pci_keepalive_kick" in text.get("vm-edu.log", ""), text.get("vm-edu.log")
    if nvme:
        vk.check_nvme(_last(before), first, last)


def _run(patched, new_phase: str):
    try:
        files = vk.files()
        lab.rootfs.build()
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    res = boot(patched, ["true\n", vk.OLD, new_phase], rootfs="debian", timeout=2400, files=files)
    new = res.phases[2]
    return res, new, {n: new.files[n].decode(errors="replace") for n in new.files
                      if not n.endswith(".json")}


def test_a_wrong_token_is_refused_and_the_owner_restores_after_it(patched):  # noqa: F811
    """Fallback: a restart with another token does not get the device (the kernel keeps it
    for its owner; QEMU cannot load the state and exits, vm restore says why, the state file
    stays); the owner's restart then takes it over as if nothing happened."""
    res, new, text = _run(patched, vk.new_script(first_token=vk.WRONG))
    wrong = json.loads(new.files["vm-restore-wrong.json"])
    print("wrong token:", wrong.get("error"), "\n", text.get("vm-edu-wrong.log"), file=sys.stderr)
    assert wrong["ok"] is False and wrong["exit_code"] == 8, wrong
    assert "keepalive_token" in text["vm-edu-wrong.log"] or "token" in text["vm-edu-wrong.log"]
    assert re.search(r"device: 0000:00:03.0 held", text["status-wrong.txt"])
    assert "open refused: the token is not the owner's" in text["dmesg.txt"]
    restore = json.loads(new.files["vm-restore.json"])
    assert restore["status"] == "running", restore
    after = json.loads(new.files["progress-after.json"])
    assert after[-1]["rounds"] >= after[0]["rounds"] + 5 and after[-1]["errors"] == 0, after[-1]
    assert after[-1]["polled"] == 0 and after[-1]["alive_bad"] == 0, after[-1]


def test_a_device_the_new_kernel_released_opens_fresh(patched):  # noqa: F811
    """Fallback: the new kernel releases the device (the state aborted): QEMU finds it not
    held, opens it as a fresh device and writes the saved state to it, says so in its log;
    the VM runs on with it."""
    res, new, text = _run(patched, vk.new_script(decide="abort"))
    print(text.get("status-abort.txt"), text.get("vm-edu.log"), file=sys.stderr)
    assert re.search(r"device: 0000:00:03.0 released", text["status-abort.txt"])
    assert "not kept running (host kernel: released)" in text["vm-edu.log"], text["vm-edu.log"]
    restore = json.loads(new.files["vm-restore.json"])
    assert restore["status"] == "running", restore
    after = json.loads(new.files["progress-after.json"])
    assert after[-1]["rounds"] >= after[0]["rounds"] + 5 and after[-1]["errors"] == 0, after[-1]
