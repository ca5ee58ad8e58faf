"""Stage-1 of the VMM fast restart (issue 15): QEMU quits and starts again on the same host
kernel, and the VM keeps its passthrough device, never reset (tests/system/vm_keepalive.py,
STAGE1). No kexec, no kernel patch: the stock kernel. Needs the patched QEMU (python
tools/qemu.py build); skipped with the reason otherwise. TCG inside TCG: a few minutes.

    python -m pytest -s -m system tests/system/test_vm_stage1.py
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.system import lab, vm_keepalive as vk
from tests.system.keepalive_scenario import GUEST_HELPERS

pytestmark = pytest.mark.system


@pytest.mark.parametrize("nvme", [False, True], ids=["edu", "edu+nvme"])
def test_vm_keeps_its_devices_across_a_qemu_restart(nvme):
    """edu alone, then edu and the lab's NVMe controller (MSI-X: the VM's admin and I/O
    queues in its RAM, a write and a read back every round)."""
    try:
        files = vk.files()
        lab.setup()
        lab.rootfs.build()
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    files.update({n: lab.SYSTEM_DIR / "guest" / n for n in GUEST_HELPERS})
    res = lab.run_guest(vk.stage1_script(nvme=nvme), rootfs="debian", pmem="legacy", files=files,
                        timeout=1200, nvme=nvme)
    print(f"\nStage-1 run timings:\n{res.format_timings()}", file=sys.stderr)
    res.check()
    p = res.phases[0]
    text = {n: p.files[n].decode(errors="replace") for n in p.files if not n.endswith(".json")}
    save = json.loads(p.files["vm-save.json"])
    poke = json.loads(p.files["poke.json"])
    before = json.loads(p.files["progress-before.json"])
    after = json.loads(p.files["progress-after.json"])
    t = {k: v[0] for k, v in lab.index_markers(res.markers).items()}
    pause = round(t[("VM-RESUMED-ROUND", 1)] - t[("VM-SAVE", 1)], 1) if ("VM-RESUMED-ROUND", 1) in t else None
    print("vm save:", json.dumps(save, indent=1), "\nrestore:", p.files.get("vm-restore.json"),
          text.get("vm-restore.err"), "\npoke:", poke, "\nbefore:", before[-1],
          "\nafter:", after[0], after[-1], "\npause (s):", pause,
          {f"{a}->{b}": round(t[(b, 1)] - t[(a, 1)], 1) for a, b in
           [("VM-SAVE", "VM-SAVED"), ("VM-SAVED", "VM-QUIT"), ("VM-RESTART", "VM-RESTORED"),
            ("VM-RESTORED", "VM-RESUMED-ROUND")] if (a, 1) in t and (b, 1) in t}, file=sys.stderr)
    # saved, the device kept alive, its files held while no QEMU ran (still enabled)
    assert sorted(d["host"] for d in save["devices"]) == ["0000:00:03.0"] + ([lab.NVME_BDF] if nvme else [])
    assert save["keepalive"]["set"]
    assert save["hold"]["holder"] and save["hold"]["fds"] >= (5 if nvme else 3), save["hold"]
    assert text["enable-after-quit.txt"].strip() == "1"
    assert poke["status"] & 0x10000, poke
    # the next QEMU took the files over (no open of its own) and resumed the VM
    log = text.get("vm-edu.log", "")
    assert "vfio_taken_fd" in log and "vfio_take_over_dma" in log, log
    restore = json.loads(p.files["vm-restore.json"])
    assert restore["status"] == "running", restore
    # the VM went on: more rounds, none wrong, no completion lost, never reset, the
    # interrupt raised while no QEMU ran delivered
    first, last = after[0], after[-1]
    assert first["magic"] == "EDUPROG1" and first["rounds"] >= before[-1]["rounds"]
    assert last["state"] == 3 and last["rounds"] >= first["rounds"] + 5, last
    assert last["errors"] == 0 and last["polled"] == 0 and last["alive_bad"] == 0, last
    assert last["poked"] >= 1, last
    assert "vfio_pci_keepalive_kick" in log, log
    if nvme:
        vk.check_nvme(before[-1], first, last)

