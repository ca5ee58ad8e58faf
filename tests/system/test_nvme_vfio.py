"""QEMU's NVMe controller held by a small user-space VFIO driver (tests/system/guest/vfio_nvme.py)
on the stock kernel: the groundwork for keeping an NVMe controller with MSI-X through a kexec.

One lab boot (``lab.RunOptions(nvme=True)``, device-dax buffer on a legacy pmem range), shared by
the tests of this module:
  1. vfio_nvme.py init: binds nothing itself; the script binds 00:08.0 to vfio-pci first. The
     driver enables the controller with its admin queue pair in the dax buffer, identifies it,
     creates 2 I/O queue pairs on MSI-X vectors 1 and 2, and writes + reads back 9 rounds of
     4 KiB on each (the 16-entry queues wrap: phase tags flip), every completion by its vector's
     eventfd; then it holds the device, serving requests.
  2. while it holds the device, a second process's resume fails to open the group (EBUSY);
  3. the holder does another round ("io"), reloads its queue state from the buffer alone and
     goes on from it ("reload": the resume path without a new open), and leaves a write in
     flight ("inflight");
  4. the holder stops (closes: vfio-pci's FLR on a stock kernel), and a new process resumes: it
     must find the controller reset (CC.EN=0, CSTS.RDY=0) and say so, writing nothing.
  5. with the controller's reset methods emptied (sysfs reset_method: vfio-pci then resets
     nothing at open or close, as a kernel that keeps the device), init again, leaving a write
     in flight on queue 2, exit; resume in a new process: the controller is the one it left,
     the in-flight write is reaped from the CQ and its data read back, and I/O goes on from
     the saved SQ tails / CQ heads / phases, each completion on its queue's own vector.
The in-flight writes reached the disk image (the host reads it in the workdir).
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from tests.system import lab
from tests.system.keepalive_scenario import DAX_RANGE, DAX_SETUP

pytestmark = pytest.mark.system

GUEST = lab.REPO / "tests" / "system" / "guest"
NV = lab.NVME_BDF
ROUNDS = 9

SCRIPT = DAX_SETUP + r"""
NV=BDF
cat /sys/bus/pci/devices/$NV/vendor /sys/bus/pci/devices/$NV/device > "$LAB_OUT/ids.txt"
echo vfio-pci > /sys/bus/pci/devices/$NV/driver_override
echo $NV > /sys/bus/pci/drivers_probe
basename "$(readlink /sys/bus/pci/devices/$NV/driver)" > "$LAB_OUT/driver.txt"
python3 vfio_nvme.py init $NV "$dax" "$LAB_OUT/init.json" --queues 2 --rounds ROUNDS \
    --hold /tmp/nv-ready /tmp/nv-stop > /tmp/nv-holder.log 2>&1 &
holder=$!
i=0; while [ ! -f /tmp/nv-ready ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/nv-holder.log >&2
test -f /tmp/nv-ready
echo "@@LAB NVME-INIT-OK phase=1"
# a second owner while the first one holds the device
python3 vfio_nvme.py resume $NV "$dax" "$LAB_OUT/busy.json" 2> "$LAB_OUT/busy.err" \
    || echo "$?" > "$LAB_OUT/busy.rc"
python3 vfio_nvme.py request $NV io 1 > "$LAB_OUT/req-io.json"
python3 vfio_nvme.py request $NV reload 1 > "$LAB_OUT/req-reload.json"
python3 vfio_nvme.py request $NV inflight 1 > "$LAB_OUT/req-inflight.json"
touch /tmp/nv-stop
wait $holder || echo "$?" > "$LAB_OUT/holder.rc"
cat /tmp/nv-holder.log >&2
cp /tmp/nv-ready "$LAB_OUT/ready.json"
echo "@@LAB NVME-HOLDER-DONE phase=1"
python3 vfio_nvme.py resume $NV "$dax" "$LAB_OUT/resume.json"
echo "@@LAB NVME-RESUME-DONE phase=1"
# no reset this time: vfio-pci finds no reset method (as a kernel that keeps the device does
# not reset it); close still disables MSI-X and bus mastering
echo "" > /sys/bus/pci/devices/$NV/reset_method
python3 vfio_nvme.py init $NV "$dax" "$LAB_OUT/init2.json" --queues 2 --rounds 2 --inflight 2
echo "@@LAB NVME-INIT2-DONE phase=1"
python3 vfio_nvme.py resume $NV "$dax" "$LAB_OUT/resume2.json" --rounds ROUNDS \
    --state "$LAB_OUT/state2.json"
echo "@@LAB NVME-RESUME2-DONE phase=1"
""".replace("BDF", NV).replace("ROUNDS", str(ROUNDS))


@pytest.fixture(scope="module")
def run():
    try:
        lab.setup()
    except lab.LabUnavailable as e:
        pytest.skip(f"QEMU lab unavailable: {e}")
    res = lab.run_guest(SCRIPT, pmem=None, append=DAX_RANGE, nvme=True,
                        files={"vfio_nvme.py": GUEST / "vfio_nvme.py"}, timeout=300)
    print(f"\nnvme timings ({res.workdir}):\n{res.format_timings()}", file=sys.stderr)
    res.check()
    return res


def _json(res, name):
    return json.loads(res.phases[0].files[name])


def _in_step(io, size=16):
    """Every command of ``io`` (write + read-back records) completed with the SQ head the
    driver's own tail gave it: the controller fetched exactly what was submitted, nothing
    past the tail (one command in flight at a time). A doorbell written as 0 and then the
    value (struct.pack_into's zero fill) made it run round the ring: phantom and repeated
    completions, sq_head 0 in the CQE of the real command."""
    return [r for r in io if r["sq_head_seen"] != [(r["sq_tail_before"] + 1) % size,
                                                   (r["sq_tail_before"] + 2) % size]]


def test_nvme_init_io_then_resume_detects_reset(run):
    p = run.phases[0]
    assert p.files["driver.txt"].decode().strip() == "vfio-pci"
    init = _json(run, "init.json")
    assert init["ok"], init.get("error")
    assert init["identify"]["sn"] == lab.NVME_SERIAL
    assert init["msix_count"] == 5 and init["num_queues_result"]["nsqa"] >= 2
    assert init["regs_at_open"]["cc"] & 1 == 0, "vfio-pci's open (FLR) left CC.EN set?"
    io = init["io"]
    assert len(io) == 2 * ROUNDS
    # every command completed on its queue's own vector, the data came back
    assert all(r["data_ok"] and r["irq"] and r["vector"] == r["qid"] for r in io), io
    # every CQE was one the driver waited for (the holder's requests below included: they
    # report into init.json too), and each came with the SQ head its submission implied
    assert "other_cqes" not in init, init["other_cqes"][:8]
    assert not _in_step(io), _in_step(io)[:4]
    # 2 commands a round on 16-entry queues: the CQs wrapped, the phase flipped
    assert {r["phase_after"] for r in io if r["qid"] == 1} == {0, 1}
    st = init["state"]
    assert st["iova"] == 0x400000 and st["vectors"] == 3
    assert [q["vector"] for q in st["queues"]] == [0, 1, 2]
    assert init["irq_counts"][1] >= 2 * ROUNDS and init["irq_counts"][2] >= 2 * ROUNDS
    # the holder's requests: another round, the state reloaded from the buffer, a write in flight
    req_io = _json(run, "req-io.json")["result"]
    assert req_io["ok"], req_io
    assert not _in_step(req_io["io"]), req_io["io"]
    ready = _json(run, "ready.json")
    assert ready["ok"]
    reload = _json(run, "req-reload.json")["result"]
    assert reload["ok"] and reload["generation"] > ready["generation"], reload
    assert not _in_step(reload["io"]), reload["io"]
    # the reloaded queues went on where the in-memory ones stood
    assert [r["sq_tail_before"] for r in reload["io"]] == [r["sq_tail_after"] for r in req_io["io"]]
    inflight = _json(run, "req-inflight.json")["result"]
    assert inflight["qid"] == 1
    assert "holder.rc" not in p.files, p.stderr
    # the write left in flight reached the disk (the holder never waited for it)
    with open(run.workdir / "nvme.img", "rb") as f:
        f.seek(inflight["slba"] * init["ns"]["lba_size"])
        assert hashlib.sha256(f.read(4096)).hexdigest()[:16] == inflight["sha"]
    # resume after vfio-pci's reset (close, then open): detected, nothing written
    rs = _json(run, "resume.json")
    assert rs["ok"], rs.get("error")
    assert rs["controller_reset"] is True
    ev = rs["reset_evidence"]
    assert not ev["cc_en"] and not ev["csts_rdy"], ev
    assert rs["saved"]["inflight"]["1"], "the state in the buffer lost the command in flight"
    assert "io" not in rs and "reaped" not in rs and rs["regs_after"]["cc"] == 0
    assert rs["action"].startswith("none")
    assert rs["cq_posted_before_open"]["1"] == [inflight["cid"]], rs["cq_posted_before_open"]


def test_nvme_resume_without_reset_goes_on_on_the_same_queues(run):
    init2, rs = _json(run, "init2.json"), _json(run, "resume2.json")
    assert init2["ok"], init2.get("error")
    assert "other_cqes" not in init2, init2["other_cqes"][:8]
    assert not _in_step(init2["io"]), _in_step(init2["io"])[:4]
    assert init2["regs_at_open"]["cc"] & 1 == 0      # (the previous owner's FLR)
    left = init2["left_inflight"]
    assert left["qid"] == 2 and left["posted"], left
    assert rs["ok"], rs.get("error")
    assert rs["controller_reset"] is False, rs["reset_evidence"]
    assert rs["cq_posted_before_open"] == {"0": [], "1": [], "2": [left["cid"]]}
    saved = {int(k): v for k, v in rs["saved"]["queues"].items()}
    st2 = {q["qid"]: q for q in init2["state"]["queues"]}
    for qid in (0, 1, 2):
        for k in ("sq_tail", "cq_head", "phase", "next_cid"):
            assert saved[qid][k] == st2[qid][k], (qid, k)
    # the command left in flight: reaped from the CQ by its phase tag, its data on the disk
    (reaped,) = rs["reaped"]
    assert reaped["cid"] == left["cid"] and reaped["qid"] == 2 and reaped["status"] == 0
    (check,) = rs["inflight_checks"]
    assert check["data_ok"] and check["irq"], check
    with open(run.workdir / "nvme.img", "rb") as f:
        f.seek(left["slba"] * init2["ns"]["lba_size"])
        assert hashlib.sha256(f.read(4096)).hexdigest()[:16] == left["sha"]
    # the admin queue goes on (Identify), then I/O from the saved tails and phases
    assert rs["identify_after_resume"]["sn"] == lab.NVME_SERIAL
    assert rs["admin_after"]["sq_tail"] == (saved[0]["sq_tail"] + 2) % 32
    io = rs["io"]
    first = {r["qid"]: r for r in reversed(io)}
    assert first[1]["sq_tail_before"] == saved[1]["sq_tail"]
    assert first[1]["phase_before"] == saved[1]["phase"]
    # queue 2: the in-flight write and its read-back came first
    assert first[2]["sq_tail_before"] == (saved[2]["sq_tail"] + 1) % 16
    assert all(r["data_ok"] and r["irq"] and r["vector"] == r["qid"] for r in io), io
    assert "other_cqes" not in rs, rs["other_cqes"][:8]
    assert not _in_step(io), _in_step(io)[:4]
    assert {r["phase_after"] for r in io if r["qid"] == 1} == {0, 1}
    assert rs["irq_counts"][1] >= 2 * ROUNDS and rs["irq_counts"][2] >= 2 * ROUNDS
    # --state: the JSON copy of the state in the buffer, as of the last save
    state2 = _json(run, "state2.json")
    assert state2["generation"] == rs["state"]["generation"]
    assert state2["queues"] == rs["state"]["queues"]


def test_nvme_second_open_while_held_is_busy(run):
    busy = _json(run, "busy.json")
    assert run.phases[0].files["busy.rc"].decode().strip() == "1"
    assert busy["open"] == {"stage": "group", "error": "EBUSY"}, busy
    assert not busy["ok"]
