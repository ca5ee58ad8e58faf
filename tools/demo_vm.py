#!/usr/bin/env python3
"""`make demo-vm`: a VM keeps its passthrough device through a QEMU restart and through a
host kexec (the VMM fast restart, issue 15), on an emulated host.

Builds what is missing first (cached outside the repository): the patched kernel
(tools/kernel.py build, 15-45 min cold) and the patched QEMU (tools/qemu.py build, about 50
min cold on 2 cores), and the lab's Debian root file system. Then, in the QEMU lab (TCG):

  Stage-1  the host (Debian, systemd, stock kernel) runs the VM (edu and an NVMe controller
           passed through, RAM on device-dax, a workload doing DMA rounds with edu's MSI and
           NVMe writes and read-backs with MSI-X); `handover vm save
           --hold`, QEMU quits, edu raises an interrupt while no QEMU runs, `handover vm
           exec` starts the next QEMU with the saved one's VFIO files, `handover vm
           restore` resumes the VM.
  Stage-2  the same VM across `handover vm save`, `handover arm --exec` (systemctl kexec
           into the patched kernel, which adopts edu) and `handover vm restore`.

For each: the workload's progress before and after (never reset, nothing lost), and the
VM-visible pause; Stage-2's timeline is drawn to ``$HANDOVER_LAB_CACHE/vm-restart.svg``.
Progress on stderr, the summary on stdout. Exit 1 when a stage did not work.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the repository instead of tools/ (whose qemu.py would shadow the qemu.qmp package the lab's
# root file system vendors)
sys.path[0] = str(ROOT)


def log(msg: str) -> None:
    print(f"demo-vm: {msg}", file=sys.stderr, flush=True)


def ensure_builds() -> dict:
    from tests.system.patched import patched_kernel
    from tools import kernel, qemu

    if kernel.built("lab") is None:
        log("building the patched kernel (lab configuration)")
        kernel.build(2, "lab")
    if qemu.built() is None:
        log("building the patched QEMU")
        qemu.build(2)
    import os

    os.environ.setdefault("HANDOVER_BUILD_KERNEL", "1")
    return patched_kernel("lab")


def summary(name: str, before: dict, after: list, pause: float | None) -> bool:
    first, last = after[0], after[-1]
    ok = (last["state"] == 3 and last["rounds"] >= first["rounds"] + 5 and not last["errors"]
          and not last["polled"] and not last["alive_bad"] and last["poked"] >= 1)
    print(f"\n{name}: {'the VM went on with its device' if ok else 'FAILED'}")
    print(f"  DMA rounds: {before['rounds']} before the save, {first['rounds']} at the resume, "
          f"{last['rounds']} {after[-1]['t']:.1f} s later")
    print(f"  wrong rounds {last['errors']}, completions lost {last['polled']}, register "
          f"written once lost {last['alive_bad']} times (0: never reset)")
    print(f"  interrupt raised while no QEMU owned edu, delivered: {'yes' if last['poked'] else 'no'}")
    if last.get("nvme_state") == 1:
        nv_ok = (last["nvme_rounds"] > first["nvme_rounds"] and not last["nvme_errors"]
                 and not last["nvme_status_errors"] and not last["nvme_stray"] and not last["nvme_hung"])
        ok = ok and nv_ok
        print(f"  NVMe (write + read back, MSI-X): {before['nvme_rounds']} rounds before the save, "
              f"{first['nvme_rounds']} at the resume, {last['nvme_rounds']} later; I/O interrupts "
              f"{first['nvme_irqs_io']} -> {last['nvme_irqs_io']}; wrong {last['nvme_errors']}, "
              f"error status {last['nvme_status_errors']}, stray {last['nvme_stray']}, hung {last['nvme_hung']}")
    print(f"  pause: {pause} s seen from outside, {last['max_gap']} s by the guest's clock "
          f"(TCG inside TCG)")
    return ok


def stage1() -> bool:
    from tests.system import lab, vm_keepalive as vk
    from tests.system.keepalive_scenario import GUEST_HELPERS

    files = vk.files()
    files.update({n: lab.SYSTEM_DIR / "guest" / n for n in GUEST_HELPERS})
    log("Stage-1: QEMU restart on the same kernel")
    res = lab.run_guest(vk.stage1_script(nvme=True), rootfs="debian", pmem="legacy", files=files,
                        timeout=1200, nvme=True)
    res.check()
    p = res.phases[0]
    t = {k: v[0] for k, v in lab.index_markers(res.markers).items()}
    pause = (round(t[("VM-RESUMED-ROUND", 1)] - t[("VM-SAVE", 1)], 1)
             if ("VM-RESUMED-ROUND", 1) in t and ("VM-SAVE", 1) in t else None)
    return summary("Stage-1 (QEMU restart)", json.loads(p.files["progress-before.json"])[-1],
                   json.loads(p.files["progress-after.json"]), pause)


def stage2(patched: dict) -> bool:
    from benchmarks.timeline import Step, svg
    from tests.system import lab, vm_keepalive as vk
    from tests.system.keepalive_scenario import boot

    log("Stage-2: host kexec under the VM")
    res = boot(patched, ["true\n", vk.old_script(nvme=True), vk.new_script(nvme=True)],
               rootfs="debian", timeout=2400, files=vk.files(), nvme=True)
    figs = vk.pause_figures(res)
    ok = summary("Stage-2 (host kexec)", json.loads(res.phases[1].files["progress-before.json"])[-1],
                 json.loads(res.phases[2].files["progress-after.json"]), figs.get("pause_outside_s"))
    print("  where the pause went (s):")
    for k, v in figs.items():
        if k != "pause_outside_s":
            print(f"    {v:6.1f}  {k}")
    steps = [Step(*step) for step in vk.timeline(res)]
    if steps:
        out = lab.cache_dir() / "vm-restart.svg"
        out.write_text(svg("VM restart across a host kexec (lab kernel, TCG)", steps,
                           note=f"pause {figs.get('pause_outside_s')} s"))
        print(f"  timeline: {out}")
    return ok


def main() -> int:
    patched = ensure_builds()
    from tests.system import lab

    lab.setup()
    lab.rootfs.build()
    ok1 = stage1()
    ok2 = stage2(patched)
    return 0 if ok1 and ok2 else 1


if __name__ == "__main__":
    sys.exit(main())
