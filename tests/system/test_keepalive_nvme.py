"""Keepalive of an NVMe controller with MSI-X (the real-host-configurations issue): QEMU's
nvme at 00:08.0 (lab ``nvme=True``: 5 MSI-X vectors, 2 I/O queue pairs used), driven from user
space through VFIO by tests/system/guest/vfio_nvme.py with its admin and I/O queues in a
device-dax buffer (IOVA 0x400000). The old kernel arms it and kexecs with a write in flight on
I/O queue 1; the new kernel holds the controller (no FLR, no CC write, MSI-X left enabled),
adopts its translation and IRTEs, and the new owner, with the token, goes on with the same
queues: same doorbells, same phase tags, the in-flight write's completion reaped, every
completion on its queue's vector.

    HANDOVER_BUILD_KERNEL=1 python -m pytest -s -m kernel tests/system/test_keepalive_nvme.py
"""

from __future__ import annotations

import json
import re

import pytest

from tests.system import lab
from tests.system.keepalive_scenario import DAX_SETUP, NEW_KERNEL_COMMON, TOKEN, boot
from tests.system.patched import status as _status

pytestmark = [pytest.mark.system, pytest.mark.kernel]

NVME = lab.NVME_BDF

OLD = DAX_SETUP + r"""
echo vfio-pci > /sys/bus/pci/devices/NVME/driver_override
echo NVME > /sys/bus/pci/drivers_probe
python3 vfio_nvme.py init NVME "$dax" "$LAB_OUT/nvme-init.json" --queues 2 --rounds 9 \
    --hold /tmp/nvme-ready /tmp/nvme-stop > /tmp/nvme.log 2>&1 &
i=0; while [ ! -f /tmp/nvme-ready ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/nvme.log >&2
python3 -m handover region init /dev/pmem0 --force
python3 -m handover arm --kernel /payload/lab/vmlinuz.3 --initrd /payload/lab/initrd.img \
    --command-line "$(cat /payload/lab/cmdline.3)" --append handover.lab.phase=3 \
    --region /dev/pmem0 --device NVME --token TOKEN --json > "$LAB_OUT/arm.json"
python3 -m handover inspect --json /dev/pmem0 > "$LAB_OUT/inspect.json"
cat /sys/kernel/debug/iommu/intel/ir_translation_struct > "$LAB_OUT/ir_translation.txt" 2>&1 || true
# the last command before the kexec: a write submitted on I/O queue 1, not waited for
cat > /lab/exec <<'EOF2'
python3 /payload/vfio_nvme.py request NVME inflight 1 > /tmp/inflight.json
echo "@@LAB ARM-EXEC phase=2"
exec python3 -m handover arm --exec
EOF2
""".replace("NVME", NVME).replace("TOKEN", TOKEN)

NEW = NEW_KERNEL_COMMON + r"""
python3 -m handover load --region /dev/pmem0 --token TOKEN --json > "$LAB_OUT/load.json" 2>"$LAB_OUT/load.err" || echo "load rc=$?" >> "$LAB_OUT/load.err"
od -An -tx2 -j4 -N2 /sys/bus/pci/devices/NVME/config > "$LAB_OUT/command.txt"
echo vfio-pci > /sys/bus/pci/devices/NVME/driver_override
echo NVME > /sys/bus/pci/drivers_probe
python3 vfio_nvme.py resume NVME "$dax" "$LAB_OUT/nvme-resume.json" --token TOKEN --rounds 9 \
    > "$LAB_OUT/nvme-resume.log" 2>&1 || echo "resume rc=$?" >> "$LAB_OUT/nvme-resume.log"
echo "@@LAB OWNER-IO-DONE phase=3"
hstatus > "$LAB_OUT/status-end.txt" 2>&1
cat /sys/kernel/debug/iommu/intel/ir_translation_struct > "$LAB_OUT/ir_translation.txt" 2>&1 || true
dmesg > "$LAB_OUT/dmesg.txt"
""".replace("NVME", NVME).replace("TOKEN", TOKEN)


def test_nvme_keeps_its_queues_across_kexec(patched):  # noqa: F811
    res = boot(patched, ["true\n", OLD, NEW], nvme=True)
    old, new = res.phases[1], res.phases[2]
    text = {n: new.files[n].decode(errors="replace") for n in new.files}
    print(text["status.txt"], text.get("nvme-resume.log", ""), text.get("load.err", ""))
    print(text.get("load.json", "")[:3000])
    print("\n".join(ln for ln in text["dmesg.txt"].splitlines()
                    if re.search(r"handover|DMAR|00:08.0", ln)))
    init = json.loads(old.files["nvme-init.json"])
    assert init["ok"], init
    arm = json.loads(old.files["arm.json"])
    assert arm["keepalive"] == {"armed": True, "devices": [NVME]}
    saved = [v for v in json.loads(old.files["inspect.json"])["vectors"] if v["device"] == NVME]
    assert len([v for v in saved if v["kind"] == "MSI-X"]) >= 3, saved   # admin + 2 I/O queues
    # `handover load --token` in the new kernel: the state matches, accepted
    load = json.loads(text["load.json"])
    assert load["ok"] and load["kernel_interface"]["written"] == "accept", text.get("load.err")
    # the new kernel held the controller: translation adopted, bus mastering and MSI-X on
    assert _status(text["status.txt"])["state"] == "valid"
    assert re.search(rf"device: {NVME} held adopted domain=\d+", text["status.txt"])
    assert int(text["command.txt"].split()[0], 16) & 0x4
    # the owner with its token: the controller was not reset (CC.EN, CSTS.RDY, the admin
    # queue registers are the old ones), the write in flight at the kexec completed into the
    # old CQ and its data is on the disk, and the same queues go on
    rep = json.loads(text["nvme-resume.json"])
    print(json.dumps({k: rep.get(k) for k in ("controller_reset", "reset_evidence", "reaped",
                                              "inflight_checks", "irq_counts", "timings")},
                     indent=1))
    assert rep["controller_reset"] is False, rep.get("reset_evidence")
    assert rep["inflight_checks"] and all(c["data_ok"] for c in rep["inflight_checks"])
    assert rep["ok"] is True, rep
    # only the CQEs of commands submitted (vfio_nvme.py once wrote every doorbell as 0 and
    # then its value, and the controller ran round its rings: phantom completions): the
    # new owner reaped exactly the write left in flight on queue 1
    assert "other_cqes" not in init and "other_cqes" not in rep, rep.get("other_cqes")
    assert [c["cid"] for c in rep["reaped"]] == [int(c) for c in rep["saved"]["inflight"]["1"]]
    # every I/O queue's completions came on its own vector (admin 0, queue n on vector n)
    assert all(rep["irq_counts"][q] > 0 for q in (1, 2)), rep["irq_counts"]
    assert re.search(rf"{NVME[5:]}: (DMAR: )?handover: translation handed over to the owner's "
                     r"domain \d+", text["dmesg.txt"])
    m = lab.index_markers(res.markers)
    a, b = m.get(("ARM-EXEC", 2)), m.get(("OWNER-IO-DONE", 3))
    print("handover arm --exec -> the owner's I/O on the same queues done:",
          round(b[0] - a[0], 2) if a and b else None, "s")
