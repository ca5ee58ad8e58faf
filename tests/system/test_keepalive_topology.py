"""Keepalive behind bridges (the real-host-configurations issue): edu behind a PCIe root
port, and behind a root port and a switch (upstream and downstream ports), as passthrough
devices sit on real hosts. The scenario of test_keepalive.py with edu at its address there:
the old kernel keeps bus mastering on every bridge above edu; the new kernel finds edu at
the same bus number, neither reassigns the bridges' bus numbers or windows nor lets the
port services disable what is below, adopts edu's translation and IRTE, and hands the
device to its owner with the token.

    HANDOVER_BUILD_KERNEL=1 python -m pytest -s -m kernel tests/system/test_keepalive_topology.py
"""

from __future__ import annotations

import json
import re

import pytest

from tests.system import lab
from tests.system.keepalive_scenario import NEW_KERNEL_KEEP, OLD_KERNEL, TOKEN, boot
from tests.system.patched import status as _status

pytestmark = [pytest.mark.system, pytest.mark.kernel]

# every bridge: its address, secondary/subordinate bus, COMMAND and its memory window
BRIDGES = r"""
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/subordinate_bus_number" ] || continue
  echo "$(basename $d) $(od -An -tx1 -j25 -N2 $d/config | tr -d ' ') $(od -An -tx2 -j4 -N2 $d/config | tr -d ' ') $(od -An -tx4 -j32 -N4 $d/config | tr -d ' ')"
done > "$LAB_OUT/bridges-NAME.txt"
"""
# bridges as the old kernel left them, after the arming (its kexec keeps them)
OLD = OLD_KERNEL + BRIDGES.replace("NAME", "old")
# in the new kernel, before anything touches edu, and at the end
NEW = BRIDGES.replace("NAME", "new") + NEW_KERNEL_KEEP + BRIDGES.replace("NAME", "end")


def _bridges(text: str) -> dict:
    """{bdf: (secondary+subordinate bus, command, memory window)}"""
    return {f[0]: (f[1], int(f[2], 16), f[3]) for f in (ln.split() for ln in text.splitlines())
            if len(f) == 4}


@pytest.mark.parametrize("topology", ["root-port", "switch"])
def test_keepalive_behind_bridges(patched, topology):  # noqa: F811
    bdf = lab.EDU_BDF[topology]
    res = boot(patched, ["true\n", OLD, NEW], topology=topology)
    old, new = res.phases[1], res.phases[2]
    text = {n: new.files[n].decode(errors="replace") for n in new.files}
    print(text["status.txt"])
    print("\n".join(ln for ln in text["dmesg.txt"].splitlines()
                    if re.search(r"handover|DMAR|pcieport|" + bdf[5:], ln)))
    assert "dma_roundtrip=ok" in old.files["vfio-ready.txt"].decode()
    before = _bridges(old.files["bridges-old.txt"].decode())
    above = sorted(b for b, (buses, _, _) in before.items()
                   if int(buses[:2], 16) <= int(bdf[5:7], 16) <= int(buses[2:], 16))
    assert len(above) == {"root-port": 1, "switch": 3}[topology], before
    # the bridges kept their bus numbers, windows and bus mastering across the kexec, and
    # still have them once the port services and the owner are done
    for name in ("bridges-new.txt", "bridges-end.txt"):
        after = _bridges(text[name])
        for b in above:
            assert after[b][0] == before[b][0] and after[b][2] == before[b][2], (name, b)
            assert after[b][1] & 0x4, f"{name}: {b} lost bus mastering: {after[b]}"
    status = _status(text["status.txt"])
    assert status["state"] == "valid" and status["ir_tables_kept"] == "1"
    assert re.search(rf"device: {bdf} held adopted domain=\d+", text["status.txt"])
    # edu's DMA with the old IOVA and the DMA in flight at the kexec landed in the buffer
    probe = json.loads(text["probe.json"])
    inflight = json.loads(old.files["inflight.json"])
    assert probe["dma_old_iova"] is True and probe["command"] & 0x4
    assert inflight["staged"] and probe["inflight"] == inflight["pattern"]
    # the owner with its token: translation handed over, DMA and MSI through the old IRTE
    owner = json.loads(text["owner.json"])
    assert owner["owner_token"] == "opened" and owner["translation"] == "owner"
    assert owner["dma_old_iova"] is True and owner["msi_eventfd"] == "ok"
    assert owner["dma_new_iova"] is True and owner["dma_old_iova_unmapped"] is False
    load = json.loads(text["load.json"])
    assert load["ok"], text.get("load.err")


# the second edu: driven through VFIO as well (a fresh owner with anonymous memory), but not
# named to `handover arm`, so the kexec stops it like any device
SECOND = "0000:00:09.0"
OLD_TWO = OLD_KERNEL.replace(
    "python3 -m handover region init", f"""echo vfio-pci > /sys/bus/pci/devices/{SECOND}/driver_override
echo {SECOND} > /sys/bus/pci/drivers_probe
python3 vfio_edu.py {SECOND} /tmp/vfio2-ready /tmp/vfio2-stop > /tmp/vfio2.log 2>&1 &
i=0; while [ ! -f /tmp/vfio2-ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
cp /tmp/vfio2-ready "$LAB_OUT/vfio2-ready.txt"
python3 -m handover region init""", 1).replace("--region /dev/pmem0 --token", "--region /dev/pmem0 --device 0000:00:03.0 --token", 1)
# in the new kernel: after the kept edu's scenario, the second one gets a fresh owner
NEW_TWO = NEW_KERNEL_KEEP + f"""
od -An -tx2 -j4 -N2 /sys/bus/pci/devices/{SECOND}/config > "$LAB_OUT/second-command.txt"
echo vfio-pci > /sys/bus/pci/devices/{SECOND}/driver_override
echo {SECOND} > /sys/bus/pci/drivers_probe
python3 vfio_edu.py {SECOND} /tmp/vfio2-ready /tmp/vfio2-stop > "$LAB_OUT/vfio2.log" 2>&1 &
i=0; while [ ! -f /tmp/vfio2-ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
cp /tmp/vfio2-ready "$LAB_OUT/vfio2-ready.txt" || true
touch /tmp/vfio2-stop
ls /sys/kernel/handover/devices/ > "$LAB_OUT/handover-devices.txt"
"""


def test_two_devices_one_kept(patched):  # noqa: F811
    """Two edus, both driven through VFIO; only 00:03.0 is named to `handover arm`. The
    kexec stops the other one as usual; the new kernel keeps 00:03.0 (its DMA in flight
    lands, its owner takes it over) and gives 00:09.0 fresh state: not held, bus mastering
    off, and a new owner without a token gets DMA and MSI through a new domain."""
    res = boot(patched, ["true\n", OLD_TWO, NEW_TWO], topology="two-edu")
    old, new = res.phases[1], res.phases[2]
    text = {n: new.files[n].decode(errors="replace") for n in new.files}
    assert "dma_roundtrip=ok" in old.files["vfio2-ready.txt"].decode()
    arm = json.loads(old.files["arm.json"])
    assert arm["keepalive"] == {"armed": True, "devices": ["0000:00:03.0"]}
    assert text["handover-devices.txt"].split() == ["0000:00:03.0"]
    assert re.search(r"device: 0000:00:03.0 held adopted domain=\d+", text["status.txt"])
    probe = json.loads(text["probe.json"])
    inflight = json.loads(old.files["inflight.json"])
    assert probe["dma_old_iova"] is True and probe["inflight"] == inflight["pattern"]
    owner = json.loads(text["owner.json"])
    assert owner["owner_token"] == "opened" and owner["translation"] == "owner"
    assert owner["dma_old_iova"] is True and owner["msi_eventfd"] == "ok"
    # the second edu: stopped at the kexec, then a fresh device for a fresh owner
    assert not int(text["second-command.txt"].split()[0], 16) & 0x4
    second = text.get("vfio2-ready.txt", "")
    assert "dma_roundtrip=ok" in second and "msi_eventfd=ok" in second, text.get("vfio2.log")


# several devices: edu (00:03.0) and the NVMe controller (00:08.0) kept, the second edu
# (00:09.0) not; the controller's queues in the same device-dax, from 16 MiB on
NVME, NVME_BUF = lab.NVME_BDF, '"$dax@0x1000000"'
OLD_SEVERAL = OLD_TWO.replace("python3 -m handover region init", f"""echo vfio-pci > /sys/bus/pci/devices/{NVME}/driver_override
echo {NVME} > /sys/bus/pci/drivers_probe
python3 vfio_nvme.py init {NVME} {NVME_BUF} "$LAB_OUT/nvme-init.json" --queues 2 --rounds 5 \\
    --hold /tmp/nvme-ready /tmp/nvme-stop > /tmp/nvme.log 2>&1 &
i=0; while [ ! -f /tmp/nvme-ready ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/nvme.log >&2
python3 -m handover region init""", 1).replace(
    "--device 0000:00:03.0 --token", f"--device 0000:00:03.0 --device {NVME} --token", 1).replace(
    "python3 /payload/edu_keepalive.py kick 0000:00:03.0\n",
    f"python3 /payload/edu_keepalive.py kick 0000:00:03.0\n"
    f"python3 /payload/vfio_nvme.py request {NVME} inflight 1 > /tmp/inflight.json\n", 1)
NEW_SEVERAL = NEW_TWO + f"""
od -An -tx2 -j4 -N2 /sys/bus/pci/devices/{NVME}/config > "$LAB_OUT/nvme-command.txt"
echo vfio-pci > /sys/bus/pci/devices/{NVME}/driver_override
echo {NVME} > /sys/bus/pci/drivers_probe
python3 vfio_nvme.py resume {NVME} {NVME_BUF} "$LAB_OUT/nvme-resume.json" --token {TOKEN} \\
    --rounds 5 > "$LAB_OUT/nvme-resume.log" 2>&1 || echo "resume rc=$?" >> "$LAB_OUT/nvme-resume.log"
dmesg > "$LAB_OUT/dmesg-end.txt"
"""


def test_several_devices_two_kinds_kept_one_not(patched):  # noqa: F811
    """edu and the NVMe controller (MSI-X, queues in the same device-dax) both kept, a
    second edu driven through VFIO but not named: one run. Both kept devices are held and
    adopted (two domains), edu's DMA in flight lands and its owner takes it over, the
    controller's owner goes on with the same queues without a reset; the second edu is
    stopped at the kexec and gets fresh state for a fresh owner."""
    res = boot(patched, ["true\n", OLD_SEVERAL, NEW_SEVERAL], topology="two-edu", nvme=True)
    old, new = res.phases[1], res.phases[2]
    text = {n: new.files[n].decode(errors="replace") for n in new.files}
    print(text["status.txt"], text.get("nvme-resume.log", ""))
    print("\n".join(ln for ln in text["dmesg-end.txt"].splitlines()
                    if re.search(r"handover|DMAR: \[|00:0[389].0", ln)))
    assert json.loads(old.files["nvme-init.json"])["ok"]
    arm = json.loads(old.files["arm.json"])
    assert arm["keepalive"] == {"armed": True, "devices": ["0000:00:03.0", NVME]}
    assert text["handover-devices.txt"].split() == ["0000:00:03.0", NVME]
    doms = re.findall(r"device: (\S+) held adopted domain=(\d+)", text["status.txt"])
    assert sorted(d for d, _ in doms) == ["0000:00:03.0", NVME] and doms[0][1] != doms[1][1]
    # edu: its DMA in flight landed, its owner took it over
    probe = json.loads(text["probe.json"])
    assert probe["dma_old_iova"] is True
    assert probe["inflight"] == json.loads(old.files["inflight.json"])["pattern"]
    owner = json.loads(text["owner.json"])
    assert owner["owner_token"] == "opened" and owner["translation"] == "owner"
    assert owner["dma_old_iova"] is True and owner["msi_eventfd"] == "ok"
    # the controller: held with bus mastering, not reset, the write in flight reaped, the
    # same queues going on, each on its vector
    assert int(text["nvme-command.txt"].split()[0], 16) & 0x4
    rep = json.loads(text["nvme-resume.json"])
    assert rep["controller_reset"] is False and rep["ok"] is True, rep
    assert [c["cid"] for c in rep["reaped"]] == [int(c) for c in rep["saved"]["inflight"]["1"]]
    assert all(rep["irq_counts"][q] > 0 for q in (1, 2)), rep["irq_counts"]
    assert re.search(rf"{NVME[5:]}: (DMAR: )?handover: translation handed over to the owner's "
                     r"domain \d+", text["dmesg-end.txt"])
    # the second edu: stopped at the kexec, then fresh
    assert not int(text["second-command.txt"].split()[0], 16) & 0x4
    second = text.get("vfio2-ready.txt", "")
    assert "dma_roundtrip=ok" in second and "msi_eventfd=ok" in second, text.get("vfio2.log")
