"""The VFIO holder (handover.host.vfio_hold): finding the owners of a device's VFIO group
in /proc, and keeping their files open in a holder process after they exit.

The holder mechanics run for real (pidfd_getfd, fork/exec, a process that exits); only the
kind of file differs: no VFIO device exists on a test machine, so the owner holds an
ordinary file, whose survival in the holder is what the kernel's VFIO close depends on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from handover.host import Sysroot
from handover.host import vfio_hold as H


def _proc(root, pid, comm, links):
    d = root / "proc" / str(pid)
    (d / "fd").mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    for fd, target in links.items():
        os.symlink(target, d / "fd" / str(fd))


def test_owners_are_the_processes_holding_the_group_with_all_their_vfio_files(tmp_path):
    _proc(tmp_path, 100, "qemu-system-x86", {0: "/dev/null", 11: "/dev/vfio/vfio",
                                             12: "/dev/vfio/7", 13: "anon_inode:[vfio-device]",
                                             14: "anon_inode:[eventfd]", 15: "/dev/vfio/9"})
    _proc(tmp_path, 200, "other", {3: "/dev/vfio/vfio", 4: "/dev/vfio/8"})
    _proc(tmp_path, 300, "bash", {0: "/dev/pts/0"})
    (tmp_path / "proc" / "self").mkdir()
    owners = H.vfio_owners(Sysroot(str(tmp_path)), {"7", "9"})
    assert owners == [H.VfioOwner(100, "qemu-system-x86", ("7", "9"), (11, 12, 13, 15))]
    assert H.vfio_owners(Sysroot(str(tmp_path)), {"7"}, exclude=100) == []


def test_device_group_from_sysfs(tmp_path):
    d = tmp_path / "sys" / "bus" / "pci" / "devices"
    d.mkdir(parents=True)
    (tmp_path / "sys" / "kernel" / "iommu_groups" / "4").mkdir(parents=True)
    (d / "0000:00:03.0").mkdir()
    os.symlink("../../../../kernel/iommu_groups/4", d / "0000:00:03.0" / "iommu_group")
    assert H.device_group(Sysroot(str(tmp_path)), "0000:00:03.0") == "4"
    assert H.device_group(Sysroot(str(tmp_path)), "0000:00:04.0") is None


def _owner_of_a_file(tmp_path):
    """A process (a VMM's stand-in) holding a file open until its stdin closes:
    (the file, the process, its fd number)."""
    target = tmp_path / "device-file"
    target.write_text("x")
    owner = subprocess.Popen([sys.executable, "-c", (
        "import os, sys\n"
        f"fd = os.open({str(target)!r}, os.O_RDONLY)\n"
        "print(fd, flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return target, owner, int(owner.stdout.readline())


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open")
def test_the_holder_keeps_the_owners_files_open_after_it_exits(tmp_path):
    target, owner, fd = _owner_of_a_file(tmp_path)
    try:
        try:
            rep = H.hold_owners([H.VfioOwner(owner.pid, "owner", ("7",), (fd,))], str(tmp_path),
                                systemd=False)
        except PermissionError:
            pytest.skip("pidfd_getfd not permitted here (ptrace restrictions)")
        assert rep.holder and rep.fds == 1
        owner.stdin.close()
        owner.wait(timeout=10)                      # the owner exits, its fd closes
        held = [os.readlink(f"/proc/{rep.holder}/fd/{n}")
                for n in os.listdir(f"/proc/{rep.holder}/fd")]
        assert str(target) in held                  # ... but the holder still has it open
        with open(f"/proc/{rep.holder}/cmdline", "rb") as f:
            assert f.read().startswith(b"@handover-hold")   # spared by systemd's last kill
        assert json.load(open(tmp_path / H.PIDFILE))["holder"] == rep.holder
        # stopping it closes the file; a second stop finds nothing
        assert H.stop_holder(str(tmp_path)) == rep.holder
        for _ in range(100):
            if not os.path.exists(f"/proc/{rep.holder}") or \
                    open(f"/proc/{rep.holder}/stat").read().split()[2] == "Z":
                break
            time.sleep(0.05)
        else:
            pytest.fail("the holder did not stop")
        assert H.stop_holder(str(tmp_path)) is None
    finally:
        owner.kill()


def test_a_new_holder_takes_the_files_of_the_earlier_one_before_stopping_it(tmp_path):
    """The VMM quit and the earlier holder is the only owner left: a second hold (``arm``
    after ``vm save --hold``) must take the files from it before stopping it."""
    target, owner, fd = _owner_of_a_file(tmp_path)
    second = None
    try:
        try:
            first = H.hold_owners([H.VfioOwner(owner.pid, "vmm", ("7",), (fd,))], str(tmp_path),
                                  systemd=False)
        except PermissionError:
            pytest.skip("pidfd_getfd not permitted here (ptrace restrictions)")
        owner.stdin.close()
        owner.wait(timeout=10)
        fds = tuple(int(n) for n in os.listdir(f"/proc/{first.holder}/fd")
                    if os.readlink(f"/proc/{first.holder}/fd/{n}") == str(target))
        second = H.hold_owners([H.VfioOwner(first.holder, "@handover-hold", ("7",), fds)],
                               str(tmp_path), systemd=False)
        assert second.holder != first.holder and second.fds == 1
        held = [os.readlink(f"/proc/{second.holder}/fd/{n}")
                for n in os.listdir(f"/proc/{second.holder}/fd")]
        assert str(target) in held
        assert json.load(open(tmp_path / H.PIDFILE))["holder"] == second.holder
    finally:
        owner.kill()
        if second and second.holder:
            H.stop_holder(str(tmp_path))


def test_the_holder_scope_is_outside_the_shutdown_transaction():
    """Under systemd the holder runs in a transient scope of its own (systemd-run --scope
    execs it in place) with DefaultDependencies=no: no Conflicts= and Before=shutdown.target,
    so `systemctl kexec` does not stop it, and the final killing spree spares its "@"
    argv[0]. The lab's rootfs test (test_keepalive_systemd.py) runs it under a real systemd."""
    cmd = H.scope_command(4242)
    assert cmd[:2] == ["systemd-run", "--scope"] and cmd[-1] == "--"
    assert "--unit=handover-hold-4242" in cmd and "--property=DefaultDependencies=no" in cmd
