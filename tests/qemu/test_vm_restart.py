"""``handover vm save`` / ``vm restore`` / ``vm list`` against the patched QEMU on the host,
without a VFIO device: ``-machine pc`` (TCG) with a dummy BIOS, guest RAM on a shared
memory-backend-file, a QMP unix socket. The state goes to a file with x-ignore-shared, a
second QEMU started with ``-incoming defer`` on the same RAM file loads it and continues,
and sees a marker written into the RAM before the save (shared, not copied). ``save``
refuses a VM without a vfio-pci device unless ``--allow-no-device``; a save that fails (a
migration that does not complete in time, a state directory that does not exist, a
monitor held by another client) leaves the VM as it was (running again) with nothing kept
alive, and no state saved before is clobbered.

What needs a VFIO device (x-set-keepalive on a real device, the vfio-pci-keepalive
section, the deferred open) is left to the lab; tests/unit/test_vm.py runs those flows
against a fake QEMU.

Marker ``qemu``: skipped, with the reason, when ``tools.qemu.built()`` finds no binary newer
than the series. ``HANDOVER_QEMU_BINARY=PATH`` names a binary to use instead (a worktree
checked out after the build has patch files newer than the binary it was built from).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import jsonschema
import pytest
from click.testing import CliRunner

from handover import schemas
from handover.cli import main
from handover.host.qemu import Qmp

pytestmark = pytest.mark.qemu

TOKEN = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
RAM_MB = 64
MARKER = b"handover-fast-restart"


@pytest.fixture(scope="module")
def qemu_bin():
    from tools import qemu

    b = qemu.built()
    if b is None:
        override = os.environ.get("HANDOVER_QEMU_BINARY")
        if override and os.access(override, os.X_OK):
            return override
        binary = qemu.paths()["binary"]
        why = "older than qemu-patches/" if os.path.exists(binary) else "not built"
        pytest.skip(f"patched QEMU {why} ({binary}): make qemu, or HANDOVER_QEMU_BINARY=PATH")
    return b


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def valid(doc: dict) -> dict:
    jsonschema.Draft202012Validator(schemas.load(doc["schema"])).validate(doc)
    return doc


class Vm:
    """A QEMU with guest RAM on the shared file ``ram`` and a QMP socket; ``qmp()`` opens a
    connection of our own (the monitor serves one client at a time: close it first)."""

    def __init__(self, qemu_bin, tmp, ram, name, incoming=False, fsize=None):
        bios = tmp / "bios.bin"
        if not bios.exists():
            bios.write_bytes(b"\xf4" * 65536)           # hlt at the reset vector
        self.sock = str(tmp / f"{name}.sock")
        self.log = open(tmp / f"{name}.log", "wb")
        args = [qemu_bin, "-nodefaults", "-display", "none", "-name", f"guest={name}",
                "-machine", "pc,memory-backend=ram0", "-accel", "tcg", "-m", f"{RAM_MB}M",
                "-bios", str(bios), "-S",
                "-object", f"memory-backend-file,id=ram0,size={RAM_MB}M,mem-path={ram},share=on",
                "-device", "edu,id=edu0",               # a PCI device that is not vfio-pci
                "-qmp", f"unix:{self.sock},server=on,wait=off"]
        if incoming:
            args += ["-incoming", "defer"]
        def limits():                   # inherited by the migration's exec: command too
            if fsize is not None:
                import resource
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        self.p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                  stderr=subprocess.STDOUT, preexec_fn=limits)
        end = time.monotonic() + 30
        while not os.path.exists(self.sock):
            assert self.p.poll() is None, self.output()
            assert time.monotonic() < end, "QEMU did not create its QMP socket"
            time.sleep(0.02)

    def qmp(self) -> Qmp:
        return Qmp(self.sock, timeout=10)

    def do(self, name, **args):
        with self.qmp() as q:
            return q.cmd(name, **args)

    def status(self) -> str:
        return self.do("query-status")["status"]

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=10)
        self.log.close()


@pytest.fixture
def vms(qemu_bin, tmp_path):
    """Start VMs on one shared RAM file (holding MARKER at 1 MiB); all killed at the end."""
    ram = tmp_path / "ram.img"
    with open(ram, "wb") as f:
        f.truncate(RAM_MB << 20)
        f.seek(1 << 20)
        f.write(MARKER)
    started = []

    def start(name, incoming=False, **kw):
        started.append(Vm(qemu_bin, tmp_path, ram, name, incoming, **kw))
        return started[-1]
    yield start
    for v in started:
        v.close()


def test_save_refuses_a_vm_without_vfio_device_then_saves_it_with_the_flag(vms, tmp_path):
    old = vms("old")
    state = tmp_path / "vm.state"
    code, out, err = run("vm", "save", "--qmp", old.sock, "--state", state, "--token", TOKEN)
    assert code == 1, err
    assert "no vfio-pci device" in err and "--allow-no-device" in err and out == ""
    assert old.status() == "prelaunch" and not state.exists()
    code, out, err = run("vm", "save", "--qmp", old.sock, "--state", state,
                         "--allow-no-device", "--quit", "--json")
    assert code == 0, err
    doc = valid(json.loads(out))
    assert doc["pid"] == old.p.pid and doc["devices"] == [] and doc["exited"] is True
    assert doc["keepalive"]["set"] is False and doc["state"] == str(state)
    # guest RAM (64 MiB) is not in the file: ROMs and device state only
    assert 0 < doc["size"] == state.stat().st_size < (RAM_MB << 20) // 8
    assert set(doc["times"]) == {"set_keepalive", "stop", "migrate", "quit", "total"}
    assert old.p.wait(timeout=10) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["bios.bin", "ram.img", "old.log",
                                                   "vm.state"])


@pytest.mark.parametrize("cont", [True, False])
def test_save_then_restore_in_a_second_qemu(vms, tmp_path, cont):
    old = vms("old")
    old.do("cont")                                      # a running VM (halted CPU)
    state = tmp_path / "vm.state"
    code, out, err = run("vm", "save", "--qmp", old.sock, "--state", state,
                         "--allow-no-device", "--json")
    assert code == 0, err
    doc = valid(json.loads(out))
    assert doc["was_running"] is True and doc["status"] == "postmigrate"
    old.do("quit")
    old.p.wait(timeout=10)

    new = vms("new", incoming=True)
    code, out, err = run("vm", "list", "--json")
    assert code == 0, err
    mine = [v for v in valid(json.loads(out))["vms"] if v["pid"] == new.p.pid]
    assert mine and mine[0]["qmp"] == [{"path": new.sock, "via": "-qmp"}]
    assert mine[0]["incoming"] == "defer" and mine[0]["name"] == "new"
    assert mine[0]["devices"] == []

    args = ["vm", "restore", "--qmp", new.sock, "--state", state, "--json"]
    code, out, err = run(*args, *([] if cont else ["--no-cont"]))
    assert code == 0, err
    doc = valid(json.loads(out))
    assert doc["status"] == ("running" if cont else "paused") == new.status()
    assert doc["keepalive_off"] is False and doc["pid"] == new.p.pid
    assert set(doc["times"]) == {"load", "keepalive_off", "cont", "total"}
    # the new QEMU maps the same guest RAM: the marker written before the save
    hmp = new.do("human-monitor-command", **{"command-line": "x /4xw 0x100000"})
    assert "0x646e6168" in hmp, hmp                 # "hand", little endian
    assert state.exists()                            # restore deletes nothing
    code, _, err = run("vm", "restore", "--qmp", new.sock, "--state", state)
    assert code == 1 and "not waiting for an incoming state" in err


def _undone(old, tmp_path, state, code, out, err, why):
    """The save failed (exit 8, one line naming ``why``), and was undone: the VM runs
    again, x-ignore-shared is off again, nothing is kept alive, the old state is intact
    and no temporary file is left."""
    assert code == 8, err
    lines = [ln for ln in err.splitlines() if ln.startswith("handover: vmm: ")]
    assert len(lines) == 1 and why in lines[0], err
    assert "undone: migration cancelled, x-ignore-shared off, cont" in lines[0]
    assert "Traceback" not in err
    doc = valid(json.loads(out))
    assert doc["exit_code"] == 8 and doc["kind"] == "vmm"
    assert state.read_bytes() == b"the previous state"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".vm.state.")]
    assert old.status() == "running"
    with old.qmp() as q:
        caps = {c["capability"]: c["state"] for c in q.cmd("query-migrate-capabilities")}
        assert caps["x-ignore-shared"] is False
        from handover.ops.vm import vfio_devices
        assert not [d for d in vfio_devices(q) if d["kept"]]
        return q.cmd("query-migrate")["status"]


def test_save_timeout_is_undone_and_the_old_state_kept(vms, tmp_path):
    """A migration that does not complete within --timeout (~180 KiB of ROMs and device
    state at max-bandwidth 1000 bytes/s) is cancelled, and the rest undone."""
    old = vms("old")
    old.do("cont")
    state = tmp_path / "vm.state"
    state.write_bytes(b"the previous state")
    # (1 byte/s would be no limit at all: QEMU 7.2 limits max-bandwidth/10 bytes per 100 ms)
    old.do("migrate-set-parameters", **{"max-bandwidth": 1000})
    t = time.monotonic()
    code, out, err = run("vm", "save", "--qmp", old.sock, "--state", state,
                         "--allow-no-device", "--timeout", "1", "--json")
    assert time.monotonic() - t < 15
    assert _undone(old, tmp_path, state, code, out, err,
                   "did not complete within 1 s") == "cancelled"


def test_save_whose_writer_fails_is_undone(vms, tmp_path):
    """The migration's command cannot write the whole state (a file size limit, as a full
    disk would): everything is undone. QEMU 7.2 reports that migration "failed" or, as
    often (5 runs in 8 here), "completed": the error of its last writes into the pipe is
    lost. save trusts only the command's own rename after cat succeeded."""
    old = vms("old", fsize=64 << 10)         # the state is ~180 KiB
    old.do("cont")
    state = tmp_path / "vm.state"
    state.write_bytes(b"the previous state")
    code, out, err = run("vm", "save", "--qmp", old.sock, "--state", state,
                         "--allow-no-device", "--json")
    why = "the migration failed" if "vm save: migrate:" in err else \
        "the migration's command failed to write the state"
    assert _undone(old, tmp_path, state, code, out, err, why) in ("failed", "completed")


def test_save_refused_before_qemu_is_touched(vms, tmp_path):
    """An unusable state directory, a monitor held by another client: the VM goes on."""
    old = vms("old")
    old.do("cont")
    code, _, err = run("vm", "save", "--qmp", old.sock, "--state", tmp_path / "gone" / "s",
                       "--allow-no-device")
    assert code == 1 and "cannot write the state there" in err
    with old.qmp():                                     # another client holds the monitor
        t = time.monotonic()
        code, _, err = run("vm", "save", "--qmp", old.sock, "--state", tmp_path / "s",
                           "--allow-no-device", "--timeout", "1")
        assert code == 8 and "no QMP greeting" in err, err
        assert time.monotonic() - t < 10
    assert old.status() == "running" and not (tmp_path / "s").exists()
    code, _, err = run("vm", "save", "--qmp", tmp_path / "no.sock", "--state", tmp_path / "s",
                       "--allow-no-device")
    assert code == 8 and "cannot connect" in err


def test_x_set_keepalive_without_a_vfio_device(vms):
    """What the patches answer on a VM without vfio-pci devices (why save skips the call
    there): enable and disable both fail, so a save cannot mark a VM as kept without one."""
    old = vms("old")
    with old.qmp() as q:
        from handover.host.qemu import QmpError
        for args in ({"enable": True, "token": TOKEN}, {"enable": False}):
            with pytest.raises(QmpError) as e:
                q.cmd("x-set-keepalive", **args)
            assert "no vfio-pci device to keep alive" in str(e.value)
