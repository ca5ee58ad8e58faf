"""Reading the patched kernel's /sys/kernel/handover/status (kernel-patches 0002, 0006, 0007)
into the typed records of handover.host (KernelStatus, KeepaliveDevice, KernelInterface).

The texts are what the patched 6.12.117 kernel wrote in the QEMU lab
(tests/system/test_keepalive.py, phase 3: `cat /sys/kernel/handover/status`).
"""

from handover.host import KeepaliveDevice, KernelInterface
from handover.host.kernel_handover import parse_status

HELD = """state: valid
region: 0x4000000@0x30000000
generation: 1
blob: 4202@0x30002000
copy: 0x3ffd7000
format: 1.1
sections: 13
units: 1
devices: 1
reserved_ranges: 10
reserved_bytes: 70283264
reserved_skipped: 0
ir_tables_kept: 1
root_tables_kept: 1
device: 0000:00:03.0 held adopted domain=4
"""

RELEASED = """state: aborted
region: 0x4000000@0x30000000
reason: aborted from user space
ir_tables_kept: 1
root_tables_kept: 1
device: 0000:00:03.0 released adopted domain=4 (the handover was aborted)
device: 0000:00:04.0 released (its identity differs from the saved one)
"""


def test_held_device():
    st = parse_status(HELD)
    assert st.state == "valid" and st.root_tables_kept == "1"
    assert st.keepalive == [KeepaliveDevice(bdf="0000:00:03.0", state="held", adopted=True,
                                            domain=4, why=None)]
    # keys the first series printed beyond today's one-value files are kept as read
    assert st.other["sections"] == "13" and st.get("blob") == "4202@0x30002000"


def test_released_devices_keep_their_reasons():
    st = parse_status(RELEASED)
    assert st.state == "aborted"
    assert [(d.bdf, d.state, d.domain, d.why) for d in st.keepalive] == [
        ("0000:00:03.0", "released", 4, "the handover was aborted"),
        ("0000:00:04.0", "released", None, "its identity differs from the saved one")]


def test_unknown_device_line_is_kept_verbatim():
    st = parse_status("state: valid\ndevice: something a newer kernel says\n")
    assert st.keepalive == [KeepaliveDevice(line="something a newer kernel says")]


def test_json_is_the_dict_it_always_was():
    """``load --json`` prints kernel_interface.status as the reader's dict used to be: the
    keys read (empty values of a status file too), ``keepalive`` only with devices, one
    object per device (``line`` alone for a line not understood)."""
    assert parse_status(HELD).as_dict() == {
        "state": "valid", "region": "0x4000000@0x30000000", "generation": "1",
        "blob": "4202@0x30002000", "copy": "0x3ffd7000", "format": "1.1", "sections": "13",
        "units": "1", "devices": "1", "reserved_ranges": "10", "reserved_bytes": "70283264",
        "reserved_skipped": "0", "ir_tables_kept": "1", "root_tables_kept": "1",
        "keepalive": [{"bdf": "0000:00:03.0", "state": "held", "adopted": True, "domain": 4,
                       "why": None}]}
    assert parse_status("state: valid\nreason: \ndevice: junk\n").as_dict() == {
        "state": "valid", "reason": "", "keepalive": [{"line": "junk"}]}
    assert parse_status("").as_dict() == {}
    iface = KernelInterface(path="/sys/kernel/handover", formats="1.0-1.1", decision="pending",
                            status=parse_status(RELEASED))
    assert iface.state == "aborted" and iface.generation is None
    d = iface.as_dict()
    assert list(d) == ["path", "formats", "state", "decision", "status", "generation"]
    assert d["status"]["reason"] == "aborted from user space"
    assert KernelInterface("/k", None, None, parse_status("generation: 7")).generation == 7
