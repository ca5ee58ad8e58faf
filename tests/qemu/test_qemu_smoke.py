"""The patched QEMU (qemu-patches/, built by ``make qemu``) on the host, without a VFIO device:
the monitor knows ``set-keepalive`` (HMP) and ``x-set-keepalive`` (QMP), which reject a
malformed token and refuse to change anything while a migration runs; ``-device
vfio-pci,help`` lists ``keepalive_token``; the binary has the trace events of the keepalive
migration, deferred open and DMA paths; and the state transfer of the restart flow works for a
VM without VFIO devices: migrate "exec:cat > FILE" with x-ignore-shared and guest RAM on a
shared memory-backend-file (not copied), then a new QEMU with -S -incoming defer loads it and
sees the same RAM.

Everything that needs a VFIO device is left to the lab: the vfio-pci-keepalive section saved
and restored, the save rule refusing a socket destination or unshared guest RAM, the deferred
open with the token, VFIO_DEVICE_SET_IRQS of the restored vectors, the container mapping only
shared guest RAM.

Marker ``qemu``: skipped, with the reason, when the binary is not built or is older than the
series (``make qemu`` builds it). Each test starts qemu-system-x86_64 with ``-machine none``,
or ``-machine pc`` with a dummy BIOS and ``-S``, ``-nodefaults -display none``, for a second or
two; no guest code runs.
"""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.qemu

GOOD_TOKEN = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
BAD_TOKENS = ["not-a-uuid", GOOD_TOKEN[:-1], GOOD_TOKEN + "0", GOOD_TOKEN.replace("-", "_"),
              " " + GOOD_TOKEN[1:], "0x" + GOOD_TOKEN[2:], "00000000-0000-0000-0000-000000000000"]


@pytest.fixture(scope="module")
def qemu_bin():
    from tools import qemu

    b = qemu.built()
    if b is None:
        binary = qemu.paths()["binary"]
        import os

        why = "older than qemu-patches/" if os.path.exists(binary) else "not built"
        pytest.skip(f"patched QEMU {why} ({binary}): make qemu")
    return b


def _run(qemu_bin, args, stdin, timeout=60):
    r = subprocess.run([qemu_bin, "-machine", "none", "-nodefaults", "-display", "none", *args],
                       input=stdin, capture_output=True, text=True, timeout=timeout)
    return r


def _qmp(qemu_bin, commands):
    """Run QMP commands through -qmp stdio; the answers (returns or errors), in order."""
    lines = [{"execute": "qmp_capabilities"}, *commands, {"execute": "quit"}]
    r = _run(qemu_bin, ["-qmp", "stdio"], "".join(json.dumps(c) + "\n" for c in lines))
    answers = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    answers = [a for a in answers if "return" in a or "error" in a]
    assert len(answers) == len(lines), r.stdout + r.stderr
    return answers[1:-1]


def _hmp(qemu_bin, commands):
    r = _run(qemu_bin, ["-monitor", "stdio"], "".join(c + "\n" for c in commands) + "quit\n")
    return r.stdout + r.stderr


def test_hmp_help_lists_set_keepalive(qemu_bin):
    out = _hmp(qemu_bin, ["help set-keepalive"])
    assert "set-keepalive on,token=uuid[,id=id]|off[,id=id]" in out, out


def test_hmp_set_keepalive_rejects_bad_arguments(qemu_bin):
    out = _hmp(qemu_bin, ["set-keepalive on,token=not-a-uuid", "set-keepalive maybe",
                          "set-keepalive on,token=%s,colour=red" % GOOD_TOKEN,
                          "set-keepalive on,token=%s" % GOOD_TOKEN])
    assert "keepalive token 'not-a-uuid' is not a UUID" in out, out
    assert "expects 'on' or 'off'" in out and "unknown parameter 'colour'" in out, out
    # a good token, but -machine none has no vfio-pci device
    assert "no vfio-pci device to keep alive" in out, out


def test_qmp_command_exists(qemu_bin):
    (cmds,) = _qmp(qemu_bin, [{"execute": "query-commands"}])
    assert "x-set-keepalive" in {c["name"] for c in cmds["return"]}


@pytest.mark.parametrize("token", BAD_TOKENS)
def test_qmp_rejects_malformed_token(qemu_bin, token):
    (a,) = _qmp(qemu_bin, [{"execute": "x-set-keepalive",
                            "arguments": {"enable": True, "token": token}}])
    assert a["error"]["class"] == "GenericError"
    desc = a["error"]["desc"]
    assert "is not a UUID" in desc or "nil UUID" in desc, desc


def test_qmp_argument_rules(qemu_bin):
    no_token, off_token, no_dev, no_id = _qmp(qemu_bin, [
        {"execute": "x-set-keepalive", "arguments": {"enable": True}},
        {"execute": "x-set-keepalive", "arguments": {"enable": False, "token": GOOD_TOKEN}},
        {"execute": "x-set-keepalive", "arguments": {"enable": True, "token": GOOD_TOKEN}},
        {"execute": "x-set-keepalive", "arguments": {"enable": False, "id": "nic0"}},
    ])
    assert "needs the owner's token" in no_token["error"]["desc"]
    assert "no token is needed" in off_token["error"]["desc"]
    assert "no vfio-pci device to keep alive" in no_dev["error"]["desc"]
    assert "no vfio-pci device with id 'nic0'" in no_id["error"]["desc"]


def test_vfio_pci_lists_keepalive_token(qemu_bin):
    r = subprocess.run([qemu_bin, "-device", "vfio-pci,help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "keepalive_token=<str>" in r.stdout, r.stdout


# --- migration to a file with x-ignore-shared (the restart flow, without a VFIO device) ---

class _Qmp:
    """A QEMU with -qmp stdio, one command at a time (events skipped, kept in .events)."""

    def __init__(self, qemu_bin, args):
        self.p = subprocess.Popen([qemu_bin, "-nodefaults", "-display", "none", "-qmp", "stdio",
                                   *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.events = []
        greeting = json.loads(self.p.stdout.readline())
        assert "QMP" in greeting, greeting
        assert "return" in self.cmd("qmp_capabilities")

    def cmd(self, name, **arguments):
        msg = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        while True:
            line = self.p.stdout.readline()
            assert line, f"QEMU exited during {name}: {self.p.stderr.read()}"
            a = json.loads(line)
            if "event" in a:
                self.events.append(a)
                continue
            return a

    def wait(self, pred, what, timeout=30.0):
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = pred()
            if r:
                return r
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self):
        if self.p.poll() is None:
            try:
                self.cmd("quit")
            except (AssertionError, BrokenPipeError, ValueError):
                pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        stderr = self.p.stderr.read()
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            f.close()
        return stderr


RAM_MB = 64


@pytest.fixture
def vm_files(tmp_path):
    """A dummy BIOS (the VM never runs: -S) and a guest RAM file, as shared RAM on DAX."""
    bios = tmp_path / "bios.bin"
    bios.write_bytes(b"\xf4" * 65536)           # hlt; never executed
    ram = tmp_path / "ram.img"
    with open(ram, "wb") as f:
        f.truncate(RAM_MB << 20)
    return tmp_path, bios, ram


def _vm_args(bios, ram, share=True):
    return ["-machine", "pc,memory-backend=ram0", "-accel", "tcg", "-m", f"{RAM_MB}M",
            "-bios", str(bios), "-S",
            "-object", f"memory-backend-file,id=ram0,size={RAM_MB}M,mem-path={ram},"
                       f"share={'on' if share else 'off'}"]


def _migrate_to_file(q, state):
    assert "return" in q.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "x-ignore-shared", "state": True}])
    assert "return" in q.cmd("migrate", uri=f"exec:cat > {state}")
    return q.wait(lambda: (lambda s: s if s.get("status") in ("completed", "failed") else None)(
        q.cmd("query-migrate")["return"]), "the migration to a file")


def test_vm_without_vfio_migrates_to_a_file_with_x_ignore_shared(qemu_bin, vm_files):
    """The restart flow's state transfer without a VFIO device: the old QEMU writes its state
    to a file with x-ignore-shared (guest RAM on a shared file is not copied), a new QEMU
    started with -S -incoming defer loads it and sees the same RAM."""
    tmp, bios, ram = vm_files
    with open(ram, "r+b") as f:                 # what the guest left in its RAM
        f.seek(1 << 20)
        f.write(b"handover-keepalive")
    state = tmp / "state"
    old = _Qmp(qemu_bin, _vm_args(bios, ram))
    try:
        mig = _migrate_to_file(old, state)
    finally:
        old.close()
    assert mig["status"] == "completed", mig
    # guest RAM (64 MiB) is not in the stream, only the ROMs and device state
    assert mig["ram"]["total"] < (RAM_MB << 20) // 8, mig["ram"]
    assert state.stat().st_size < (RAM_MB << 20) // 8

    new = _Qmp(qemu_bin, [*_vm_args(bios, ram), "-incoming", "defer"])
    try:
        assert "return" in new.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "x-ignore-shared", "state": True}])
        assert "return" in new.cmd("migrate-incoming", uri=f"exec:cat {state}")
        new.wait(lambda: new.cmd("query-migrate")["return"].get("status") == "completed",
                 "the incoming state to be loaded")
        # loaded, not running (-S): where set-keepalive off and cont come in the flow
        assert new.cmd("query-status")["return"]["status"] in ("prelaunch", "paused")
        # the new QEMU sees the same guest RAM: the file, mapped shared
        hmp = new.cmd("human-monitor-command", **{"command-line": "x /3xw 0x100000"})
        assert "0x646e6168" in hmp["return"], hmp   # "hand", little endian
    finally:
        stderr = new.close()
    assert "error" not in stderr.lower(), stderr


def test_x_set_keepalive_refused_while_a_migration_runs(qemu_bin, vm_files):
    """set-keepalive changes nothing while a migration or snapshot runs (the blocker and the
    vfio-pci-keepalive section must not change under it); checked before the devices."""
    tmp, bios, ram = vm_files
    q = _Qmp(qemu_bin, _vm_args(bios, ram, share=False))
    try:
        # 1000 bytes/s: the migration of 64 MiB of unshared RAM stays active (QEMU 7.2 rate-
        # limits max-bandwidth/10 per 100 ms, so 1 byte/s rounds to no limit at all)
        assert "return" in q.cmd("migrate-set-parameters", **{"max-bandwidth": 1000})
        assert "return" in q.cmd("migrate", uri=f"exec:cat > {tmp / 'slow'}")
        q.wait(lambda: q.cmd("query-migrate")["return"].get("status") == "active",
               "the migration to be active")
        a = q.cmd("x-set-keepalive", enable=True, token=GOOD_TOKEN)
        assert "not while a migration or a snapshot runs" in a["error"]["desc"], a
        a = q.cmd("x-set-keepalive", enable=False)
        assert "not while a migration or a snapshot runs" in a["error"]["desc"], a
        assert "return" in q.cmd("migrate_cancel")
        q.wait(lambda: q.cmd("query-migrate")["return"].get("status") == "cancelled",
               "the migration to be cancelled")
        a = q.cmd("x-set-keepalive", enable=True, token=GOOD_TOKEN)
        assert "no vfio-pci device to keep alive" in a["error"]["desc"], a
    finally:
        q.close()


def test_keepalive_trace_events_exist(qemu_bin):
    """The binary has the keepalive paths of patches 0005-0007 (their trace events)."""
    r = subprocess.run([qemu_bin, "-machine", "none", "-display", "none", "-trace", "help"],
                       capture_output=True, text=True, timeout=60)
    names = set(r.stdout.split())
    for ev in ("vfio_pci_keepalive_save", "vfio_pci_keepalive_restore",
               "vfio_pci_keepalive_defer", "vfio_pci_keepalive_open",
               "vfio_keepalive_dma_skip", "vfio_keepalive_dma"):
        assert ev in names, ev
