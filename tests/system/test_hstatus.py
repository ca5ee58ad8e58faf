"""lab.HSTATUS (``hstatus``, the guest scripts' view of /sys/kernel/handover/) on the host,
against trees laid out as the kernel's files: no QEMU. The text it prints must mean what
``handover``'s own reader (handover.host.kernel_handover.read_status) makes of the same
files, and on a kernel of the first series it is that kernel's ``status`` file."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from handover.host.base import Sysroot
from handover.host.kernel_handover import parse_status, read_status
from tests.system import lab

SH = shutil.which("busybox") and ["busybox", "sh"] or ["sh"]


def _hstatus(root) -> tuple[int, str]:
    d = os.path.join(root, "sys/kernel/handover")
    r = subprocess.run([*SH, "-c", lab.HSTATUS + "hstatus"], capture_output=True, text=True,
                       env=dict(os.environ, HSTATUS_DIR=d))
    return r.returncode, r.stdout


def _tree(root, files: dict) -> None:
    for rel, v in files.items():
        p = root / "sys/kernel/handover" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(v + "\n")


HELD = {"state": "valid", "reason": "", "region": "0x4000000@0x30000000", "error": "",
        "generation": "1", "format": "1.1", "formats": "1.0-1.1", "reserved_ranges": "10",
        "reserved_bytes": "70283264", "ir_tables_kept": "1", "root_tables_kept": "1",
        "decision": "pending", "keepalive": "",
        "devices/0000:00:03.0/state": "held", "devices/0000:00:03.0/domain": "4",
        "devices/0000:00:03.0/reason": ""}

RELEASED = {"state": "aborted", "reason": "aborted from user space",
            "region": "0x4000000@0x30000000", "generation": "1", "format": "1.1",
            "reserved_ranges": "10", "reserved_bytes": "70283264",
            "devices/0000:00:03.0/state": "released", "devices/0000:00:03.0/domain": "",
            "devices/0000:00:03.0/reason": "the handover was aborted",
            "devices/0000:00:04.0/state": "released", "devices/0000:00:04.0/domain": "",
            "devices/0000:00:04.0/reason": "its identity differs from the saved one"}

REJECTED = {"state": "rejected", "reason": "", "region": "0x4000000@0x30000000",
            "error": "SECTION_CRC at offset 968", "generation": "1", "format": "",
            "reserved_ranges": "0", "reserved_bytes": "0"}


@pytest.mark.parametrize("files", [HELD, RELEASED, REJECTED], ids=["held", "released", "rejected"])
def test_one_value_files(tmp_path, files):
    _tree(tmp_path, files)
    rc, text = _hstatus(tmp_path)
    assert rc == 0
    # what the tool reads from the files is what its parser reads from hstatus's text
    assert parse_status(text) == read_status(Sysroot(str(tmp_path)))
    # one line per non-empty file of HSTATUS_KEYS, in that order, then the devices
    keys = [ln.split(": ", 1)[0] for ln in text.splitlines()]
    want = [k for k in lab.HSTATUS_KEYS if files.get(k)]
    assert keys == want + ["device"] * len({k.split("/")[1] for k in files if k.startswith("devices/")})
    assert lab.parse_hstatus(text)["state"] == files["state"]


def test_device_lines(tmp_path):
    _tree(tmp_path, HELD)
    assert "device: 0000:00:03.0 held adopted domain=4\n" in _hstatus(tmp_path)[1]
    _tree(tmp_path / "r", RELEASED)
    text = _hstatus(tmp_path / "r")[1]
    assert "device: 0000:00:03.0 released (the handover was aborted)\n" in text
    assert "device: 0000:00:04.0 released (its identity differs from the saved one)\n" in text


def test_first_series_status_file_is_printed_as_is(tmp_path):
    old = "state: valid\nregion: 0x4000000@0x30000000\nunits: 1\ndevice: 0000:00:03.0 held adopted domain=4\n"
    _tree(tmp_path, {"status": old.rstrip("\n"), "state": "ignored"})
    assert _hstatus(tmp_path) == (0, old)


def test_no_handover_directory(tmp_path):
    rc, text = _hstatus(tmp_path)
    assert rc == 1 and text.startswith("no ")
