"""Stage-1 of a fast restart (handover vm save --hold / vm exec): the VFIO files of the saved
QEMU named for the next one (QEMU patch 0009's fdsets), the device files told apart by their
group's functions, and the token and command checked before anything is taken."""

from __future__ import annotations

import json
import os

import pytest

from handover.errors import HandoverError
from handover.formats.token import hash_token
from handover.host import vfio_hold as H
from handover.host.base import Sysroot
from handover.host.vfio_takeover import TakenFiles, group_functions, name_device
from handover.ops.vm_takeover import TOKEN_FILE, prepare_exec
from tests.unit.hosttree import CAPTURED, EDU, TOKEN

WRONG = "00000000-1111-2222-3333-444444444444"
QEMU = ["qemu-system-x86_64", "-device", f"vfio-pci,host={EDU},keepalive_token={TOKEN}"]


def test_add_fd_options_name_every_file_in_an_fdset_of_its_own():
    t = TakenFiles(pid=1, container=5, groups={"7": 6, "12": 9}, devices={EDU: 8})
    args = t.add_fd_args()
    assert args == ["-add-fd", "fd=5,set=1,opaque=vfio-container",
                    "-add-fd", "fd=9,set=2,opaque=vfio-group-12",
                    "-add-fd", "fd=6,set=3,opaque=vfio-group-7",
                    "-add-fd", f"fd=8,set=4,opaque=vfio-device-{EDU}"]
    assert sorted(t.fds()) == [5, 6, 8, 9]


def test_a_device_file_is_the_one_function_of_its_groups_with_its_ids():
    sr = Sysroot(str(CAPTURED))
    group = os.path.basename(sr.readlink(f"/sys/bus/pci/devices/{EDU}/iommu_group"))
    funcs = group_functions(sr, group)
    assert funcs[EDU] == (0x1234, 0x11e8)
    assert name_device((0x1234, 0x11e8), funcs, set()) == EDU
    with pytest.raises(HandoverError, match="matches 0 functions"):
        name_device((0x1234, 0x11e8), funcs, {EDU})       # taken already
    with pytest.raises(HandoverError, match="matches 2 functions"):
        name_device((0x1234, 0x11e8), {EDU: (0x1234, 0x11e8), "0000:00:09.0": (0x1234, 0x11e8)},
                    set())


def _holder_files(d, holder: int, token: str) -> None:
    salt, digest = hash_token(token)
    (d / H.PIDFILE).write_text(json.dumps({"holder": holder}))
    (d / TOKEN_FILE).write_text(json.dumps({"holder": holder, "salt": salt.hex(),
                                            "sha256": digest.hex()}))


def test_exec_refuses_a_wrong_token_before_taking_anything(tmp_path):
    _holder_files(tmp_path, 999999, TOKEN)
    with pytest.raises(HandoverError, match="not the one the VM was saved with") as e:
        prepare_exec(QEMU, WRONG, result_dir=str(tmp_path))
    assert TOKEN not in str(e.value) and WRONG not in str(e.value)
    assert (tmp_path / TOKEN_FILE).exists()        # nothing consumed


def test_exec_refuses_without_a_holder_or_a_token_in_the_command(tmp_path):
    with pytest.raises(HandoverError, match="no holder of a saved VM's files"):
        prepare_exec(QEMU, TOKEN, result_dir=str(tmp_path))
    with pytest.raises(HandoverError, match="keepalive_token"):
        prepare_exec(["qemu-system-x86_64", "-device", f"vfio-pci,host={EDU}"], TOKEN,
                     result_dir=str(tmp_path))
    with pytest.raises(HandoverError, match="no QEMU command"):
        prepare_exec([], TOKEN, result_dir=str(tmp_path))


def test_exec_refuses_a_token_recorded_for_another_holder(tmp_path):
    _holder_files(tmp_path, 999999, TOKEN)
    (tmp_path / H.PIDFILE).write_text(json.dumps({"holder": 123456}))
    with pytest.raises(HandoverError, match="not the one the token was recorded for"):
        prepare_exec(QEMU, TOKEN, result_dir=str(tmp_path))
