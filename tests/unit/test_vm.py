"""``handover vm save|restore|list`` without QEMU: QEMU command lines parsed (synthetic
argv, a synthetic /proc), the save and restore flows over a fake QMP connection (a VM with
vfio-pci devices, which the host has not), their undo on every failure, the error paths
(socket missing, bad token, state directory, an old state never clobbered), and the QMP
connection itself against a small QMP server on a unix socket (peer pid, no greeting, a
token echoed by QEMU replaced)."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import threading
import time

import jsonschema
import pytest
from click.testing import CliRunner

from handover import schemas
from handover.cli import main
from handover.errors import HandoverError, RollbackError, VmmError
from handover.host.qemu import Qmp, QmpError, qemu_processes
from handover.host import Sysroot
from handover.ops import vm as ops

TOKEN = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
OTHER = "8c1f3a52-6b0e-4d7a-9e21-5f4c2b9d7a10"
ERROR_LINE = re.compile(r"^handover: [a-z-]+: \S.*$")


def run(*args, input=None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    return r.exit_code, r.stdout, r.stderr


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("handover: ") and (
        ": error: " in ln or ln.split(": ")[1] in ("error", "vmm", "rollback", "no-state",
                                                   "usage"))]
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), err
    assert "Traceback" not in err
    return lines[0]


def valid(doc: dict) -> dict:
    jsonschema.Draft202012Validator(schemas.load(doc["schema"])).validate(doc)
    return doc


# ---- QEMU command lines -------------------------------------------------------------------
QEMU = "/usr/bin/qemu-system-x86_64"


def test_qmp_sockets_of_every_spelling():
    v = ops.parse_qemu_argv([
        QEMU, "-S", "-nodefaults", "-qmp", "unix:/run/a,,b.sock,server=on,wait=off",
        "--qmp-pretty", "unix:rel.sock,server,nowait", "-qmp", "tcp:127.0.0.1:4444,server",
        "-chardev", "socket,id=mon0,path=/run/mon0.sock,server=on,wait=off",
        "-mon", "chardev=mon0,mode=control,pretty=on",
        "-chardev", "socket,id=hmp,path=/run/hmp.sock,server=on,wait=off",
        "-mon", "chardev=hmp",                               # readline: HMP, not QMP
        "-monitor", "unix:/run/hmp2.sock,server,nowait",     # HMP
        "-name", "guest=vm1,debug-threads=on", "-incoming", "defer"], cwd="/var/lib/vm")
    assert v["qmp"] == [
        {"path": "/run/a,b.sock", "via": "-qmp"},
        {"path": "/var/lib/vm/rel.sock", "via": "-qmp-pretty"},
        {"path": None, "via": "-qmp", "kind": "tcp"},
        {"path": "/run/mon0.sock", "via": "-mon", "chardev": "mon0"}]
    assert v["name"] == "vm1" and v["incoming"] == "defer" and v["devices"] == []


def test_vfio_devices_of_every_spelling_and_never_the_token():
    v = ops.parse_qemu_argv([
        QEMU, "-device", f"vfio-pci,host=01:00.0,id=gpu0,keepalive_token={TOKEN}",
        "-device", "driver=vfio-pci,host=0000:02:00.1",
        "-device", json.dumps({"driver": "vfio-pci-nohotplug", "id": "nvme0",
                               "sysfsdev": "/sys/bus/pci/devices/0000:03:00.0",
                               "keepalive_token": TOKEN}),
        "-device", "virtio-net-pci,id=net0", "-device", "edu",
        "-device", "vfio-pci,host=04:00.0,keepalive_token=",      # empty: no token
        "-readconfig", "/etc/vm.cfg", "-nographic"])
    assert v["devices"] == [
        {"id": "gpu0", "driver": "vfio-pci", "host": "0000:01:00.0", "token": True},
        {"id": None, "driver": "vfio-pci", "host": "0000:02:00.1", "token": False},
        {"id": "nvme0", "driver": "vfio-pci-nohotplug", "host": "0000:03:00.0", "token": True},
        {"id": None, "driver": "vfio-pci", "host": "0000:04:00.0", "token": False}]
    assert v["notes"] and "/etc/vm.cfg" in v["notes"][0]
    assert TOKEN not in json.dumps(v)


def test_flags_do_not_eat_the_next_option():
    v = ops.parse_qemu_argv([QEMU, "-enable-kvm", "-S", "-no-shutdown", "-some-new-flag",
                             "-qmp", "unix:/q", "-append", "-v console=ttyS0", "disk.img"])
    assert v["qmp"] == [{"path": "/q", "via": "-qmp"}]


def test_split_opts():
    assert ops.split_opts("a=1,,2,b,c=x=y", implied=None) == [("a", "1,2"), ("b", "on"),
                                                                ("c", "x=y")]
    assert ops.split_opts("vfio-pci,host=1", implied="driver") == [("driver", "vfio-pci"),
                                                                   ("host", "1")]


def fake_proc(root, pid: int, argv: list[str], cwd: str | None = None):
    d = root / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    if cwd:
        (d / "cwd").symlink_to(cwd)


def test_list_over_a_synthetic_proc(tmp_path):
    root = tmp_path / "root"
    fake_proc(root, 4242, ["/usr/bin/qemu-system-x86_64", "-qmp", "unix:q.sock,server=on",
                           "-device", f"vfio-pci,host=0000:01:00.0,keepalive_token={TOKEN}"],
              cwd="/srv/vm")
    fake_proc(root, 17, ["/usr/bin/python3", "-qmp", "unix:/not/qemu"])
    fake_proc(root, 99, ["qemu-kvm", "-nodefaults"])
    (root / "proc" / "self").mkdir()
    (root / "proc" / "1000").mkdir()        # a process gone while /proc is read: no cmdline
    assert [p.pid for p in qemu_processes(Sysroot(str(root)))] == [99, 4242]
    code, out, err = run("vm", "list", "--sysroot", root, "--json")
    assert code == 0, err
    doc = valid(json.loads(out))
    vm = doc["vms"][1]
    assert vm["pid"] == 4242 and vm["qmp"] == [{"path": "/srv/vm/q.sock", "via": "-qmp"}]
    assert vm["devices"] == [{"id": None, "driver": "vfio-pci", "host": "0000:01:00.0",
                              "token": True}]
    code, text, _ = run("vm", "list", "--sysroot", root)
    assert code == 0 and "pid 4242" in text and "keepalive_token given" in text
    assert TOKEN not in out + text


def test_list_of_a_missing_sysroot(tmp_path):
    code, _, err = run("vm", "list", "--sysroot", tmp_path / "nope")
    assert code == 1
    one_error_line(err)


# ---- a fake QEMU behind a fake QMP connection ---------------------------------------------
class FakeQemu:
    """What the flows ask of QEMU: runstate, QOM (vfio-pci devices), x-set-keepalive with
    the patch's rules (all or nothing, token checks), capabilities, and a migration that
    really runs the exec: command with ``payload`` on its stdin."""

    def __init__(self, devices=(("gpu0", "0000:01:00.0"), (None, "0000:02:00.0")),
                 status="running", payload=b"QEVM-state" * 100, patched=True):
        self.path = "/run/fake-qmp.sock"
        self.pid = 4242
        self.secrets = []
        self.status = status
        self.payload = payload
        self.patched = patched
        self.devices = []
        anon = 0
        for dev_id, host in devices:
            if dev_id:
                path = f"/machine/peripheral/{dev_id}"
            else:
                path = f"/machine/peripheral-anon/device[{anon}]"
                anon += 1
            self.devices.append({"path": path, "host": host, "token": ""})
        self.caps = {"x-ignore-shared": False}
        self.mig = None
        self.calls = []
        self.fail = {}          # command -> error message (QEMU answers with an error)
        self.gone_at = None     # command at which QEMU "exits"
        self.migrate_outcome = "completed"   # or "failed", "active" (never ends), "no-write"
        self.closed = False

    # the connection's interface
    def close(self):
        self.closed = True

    def quit(self, timeout=None):
        self.cmd("quit")
        self.status = "quit"

    def cmd(self, name, timeout=None, **a):
        self.calls.append((name, a))
        if self.gone_at == name:
            raise QmpError("connection lost (EOFError)", name, gone=True)
        if name in self.fail:
            raise QmpError(self.fail[name], name, error_class="GenericError")
        return getattr(self, "do_" + name.replace("-", "_"))(**a)

    def do_query_status(self):
        return {"status": self.status, "running": self.status == "running"}

    def do_query_migrate(self):
        return {"status": self.mig} if self.mig else {}

    def do_qom_list(self, path):
        kids = [d for d in self.devices if d["path"].rsplit("/", 1)[0] == path]
        return [{"name": "type", "type": "string"}] + [
            {"name": d["path"].rsplit("/", 1)[1], "type": "child<vfio-pci>"} for d in kids] + \
            [{"name": "edu0", "type": "child<edu>"}] * (path == "/machine/peripheral")

    def do_qom_get(self, path, property):
        d = next(x for x in self.devices if x["path"] == path)
        if property == "host":
            return d["host"]
        if property == "sysfsdev":
            return ""
        if property == "keepalive_token" and self.patched:
            return d["token"]
        raise QmpError(f"Property 'vfio-pci.{property}' not found", "qom-get",
                       error_class="GenericError")

    def do_x_set_keepalive(self, enable, token=None, id=None):
        if enable and not token:
            raise QmpError("keeping devices alive needs the owner's token", "x-set-keepalive")
        if not enable and token:
            raise QmpError("no token is needed to stop keeping devices alive", "x")
        devs = [d for d in self.devices if id is None or d["path"].endswith("/" + id)]
        if not devs:
            raise QmpError("no vfio-pci device to keep alive", "x-set-keepalive")
        for d in devs:
            if enable and d["token"] and d["token"] != token:
                raise QmpError("it is kept alive with another token", "x-set-keepalive")
        for d in devs:
            d["token"] = token if enable else ""
        return {}

    def do_stop(self):
        self.status = "paused"
        return {}

    def do_cont(self):
        self.status = "running"
        return {}

    def do_query_migrate_capabilities(self):
        return [{"capability": k, "state": v} for k, v in self.caps.items()]

    def do_migrate_set_capabilities(self, capabilities):
        for c in capabilities:
            self.caps[c["capability"]] = c["state"]
        return {}

    def do_migrate(self, uri):
        assert uri.startswith("exec:")
        self.uri = uri
        if self.migrate_outcome == "no-write":        # cat failed: the command removes TMP
            tmp = shlex.split(uri[5:])[2]
            os.unlink(tmp)
            self.mig = "completed"
            return {}
        if self.migrate_outcome == "active":
            self.mig = "active"
            return {}
        subprocess.run(["/bin/sh", "-c", uri[5:]], input=self.payload, check=False)
        self.mig = self.migrate_outcome
        if self.mig == "completed":
            self.status = "postmigrate"
        return {}

    def do_migrate_cancel(self):
        self.mig = "cancelled"
        return {}

    def do_migrate_incoming(self, uri):
        r = subprocess.run(["/bin/sh", "-c", uri[5:]], capture_output=True)
        self.loaded = r.stdout
        self.mig = self.migrate_outcome
        if self.mig == "completed":
            self.status = "paused"
        return {}

    def do_quit(self):
        return {}

    def kept(self):
        return [d["host"] for d in self.devices if d["token"]]


@pytest.fixture
def qemu(monkeypatch):
    """A FakeQemu every `handover vm` command of the test connects to."""
    q = FakeQemu()
    monkeypatch.setattr(ops, "connect", lambda path, timeout: q)
    monkeypatch.setattr(ops, "POLL", 0.001)
    return q


def called(q, name):
    return [a for n, a in q.calls if n == name]


# ---- vm save --------------------------------------------------------------------------------
def test_save_keeps_every_device_and_writes_the_state(qemu, tmp_path):
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    state = tmp_path / "vm.state"
    code, out, err = run("vm", "save", "--qmp", qemu.path, "--state", state,
                         "--token-file", tf, "--json")
    assert code == 0, err
    doc = valid(json.loads(out))
    assert doc["schema"] == "handover.vm-save/1" and doc["pid"] == 4242
    assert [d["host"] for d in doc["devices"]] == ["0000:01:00.0", "0000:02:00.0"]
    assert doc["devices"][0]["id"] == "gpu0" and doc["devices"][1]["id"] is None
    assert doc["keepalive"] == {"set": True, "ids": None} and doc["was_running"]
    assert set(doc["times"]) == {"set_keepalive", "stop", "migrate", "total"}
    assert state.read_bytes() == qemu.payload and doc["size"] == len(qemu.payload)
    assert os.stat(state).st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == ["token", "vm.state"]        # no temporary file
    assert called(qemu, "x-set-keepalive") == [{"enable": True, "token": TOKEN}]
    assert qemu.caps["x-ignore-shared"] and qemu.status == "postmigrate"
    assert qemu.kept() == ["0000:01:00.0", "0000:02:00.0"] and qemu.closed
    assert TOKEN not in out + err                     # sent to QEMU only
    # the steps in the flow's order
    order = [n for n, _ in qemu.calls if n in ("x-set-keepalive", "stop",
                                                "migrate-set-capabilities", "migrate")]
    assert order == ["x-set-keepalive", "stop", "migrate-set-capabilities", "migrate"]


def test_save_text_output_and_quit(qemu, tmp_path):
    code, out, err = run("vm", "save", "--qmp", qemu.path, "--state", tmp_path / "s",
                         "--token", TOKEN, "--quit")
    assert code == 0, err
    assert "saved " in out and "0000:01:00.0" in out and "set-keepalive" in out
    assert called(qemu, "quit") == [{}]
    assert TOKEN not in out + err


def test_save_only_the_named_devices(qemu, tmp_path):
    code, out, err = run("vm", "save", "--qmp", qemu.path, "--state", tmp_path / "s",
                         "--token", TOKEN, "--id", "gpu0", "--json")
    assert code == 0, err
    assert called(qemu, "x-set-keepalive") == [{"enable": True, "token": TOKEN, "id": "gpu0"}]
    assert qemu.kept() == ["0000:01:00.0"]
    assert json.loads(out)["keepalive"] == {"set": True, "ids": ["gpu0"]}


def test_save_refusals_change_nothing(qemu, tmp_path):
    state = tmp_path / "s"
    for args, words in (
            (("--id", "nic9"), "no vfio-pci device with id nic9"),
            ((), "needs the owner's token")):
        code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, *args)
        assert code == 1, err
        assert words in one_error_line(err) and "nothing was changed" in err
    qemu.status = "inmigrate"
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token", TOKEN)
    assert code == 1 and "use vm restore" in one_error_line(err)
    qemu.status, qemu.mig = "running", "active"
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token", TOKEN)
    assert code == 1 and "already active" in one_error_line(err)
    qemu.mig, qemu.patched = None, False
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token", TOKEN)
    assert code == 1 and "not the patched QEMU" in one_error_line(err)
    assert not [n for n, _ in qemu.calls if n not in ("query-status", "query-migrate",
                                                        "qom-list", "qom-get")]
    assert not os.listdir(tmp_path)


def test_save_without_a_vfio_device_needs_the_flag(monkeypatch, tmp_path):
    q = FakeQemu(devices=())
    monkeypatch.setattr(ops, "connect", lambda path, timeout: q)
    code, _, err = run("vm", "save", "--qmp", q.path, "--state", tmp_path / "s")
    assert code == 1 and "--allow-no-device" in one_error_line(err)
    code, out, err = run("vm", "save", "--qmp", q.path, "--state", tmp_path / "s",
                         "--allow-no-device", "--json")
    assert code == 0, err
    doc = valid(json.loads(out))
    assert doc["keepalive"]["set"] is False and doc["devices"] == []
    assert not called(q, "x-set-keepalive")         # QEMU refuses it without a device


@pytest.mark.parametrize("token", ["not-a-uuid", TOKEN[:-1], TOKEN.replace("-", ""),
                                   "{" + TOKEN + "}", "00000000-0000-0000-0000-000000000000",
                                   f"{TOKEN} {OTHER}"])
def test_save_refuses_a_bad_token_without_echoing_it(qemu, tmp_path, token):
    tf = tmp_path / "token"
    tf.write_text(token)
    code, out, err = run("vm", "save", "--qmp", qemu.path, "--state", tmp_path / "s",
                         "--token-file", tf)
    assert code == 1, err
    line = one_error_line(err)
    assert "token" in line or "UUID" in line
    for part in token.split():
        assert part.strip("{}") not in out + err
    assert qemu.calls == []


def test_save_into_an_unwritable_place_never_touches_qemu(qemu, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    for state in (tmp_path / "missing" / "s", afile / "s", tmp_path):
        code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token",
                           TOKEN)
        assert code in (1, 2), err            # a directory as FILE: click's usage error
        one_error_line(err)
    assert qemu.calls == []


def test_save_socket_missing(tmp_path):
    code, out, err = run("vm", "save", "--qmp", tmp_path / "no.sock", "--state",
                         tmp_path / "s", "--token", TOKEN, "--json")
    assert code == 8
    line = one_error_line(err)
    assert "no.sock" in line and "cannot connect" in line
    doc = valid(json.loads(out))
    assert doc["kind"] == "vmm" and doc["exit_code"] == 8
    assert os.listdir(tmp_path) == []                # the temporary file is gone too


def test_save_socket_nobody_listens(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()                                       # the file stays: ECONNREFUSED
    code, _, err = run("vm", "save", "--qmp", path, "--state", tmp_path / "s", "--token",
                       TOKEN)
    assert code == 8 and "Connection refused" in one_error_line(err)


def _old_state(tmp_path):
    state = tmp_path / "vm.state"
    state.write_bytes(b"the previous state")
    return state


def _only_old_state(tmp_path, state):
    assert state.read_bytes() == b"the previous state"
    assert os.listdir(tmp_path) == ["vm.state"]


def test_failed_migration_is_undone_and_the_old_state_kept(qemu, tmp_path):
    state = _old_state(tmp_path)
    qemu.migrate_outcome = "failed"
    code, out, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token",
                         TOKEN, "--json")
    assert code == 8, err
    line = one_error_line(err)
    assert "vm save: migrate: the migration failed" in line and "pid 4242" in line
    assert "undone: migration cancelled, x-ignore-shared off, keepalive off, cont" in line
    assert valid(json.loads(out))["exit_code"] == 8
    assert qemu.status == "running" and qemu.kept() == [] and not qemu.caps["x-ignore-shared"]
    assert called(qemu, "x-set-keepalive")[-1] == {"enable": False}
    _only_old_state(tmp_path, state)


def test_the_command_writing_the_state_failed(qemu, tmp_path):
    state = _old_state(tmp_path)
    qemu.migrate_outcome = "no-write"
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token", TOKEN)
    assert code == 8 and "failed to write the state" in one_error_line(err)
    assert qemu.status == "running" and qemu.kept() == []
    _only_old_state(tmp_path, state)


def test_migration_timeout_cancels_and_undoes(qemu, tmp_path):
    state = _old_state(tmp_path)
    qemu.migrate_outcome = "active"
    t = time.monotonic()
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token", TOKEN,
                       "--timeout", "0.3")
    assert code == 8 and "did not complete within 0.3 s" in one_error_line(err)
    assert time.monotonic() - t < 10
    assert called(qemu, "migrate_cancel") == [{}]
    assert qemu.status == "running" and qemu.kept() == []
    _only_old_state(tmp_path, state)


def test_keepalive_refused_by_qemu_changes_nothing(qemu, tmp_path):
    qemu.devices[1]["token"] = OTHER
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", tmp_path / "s",
                       "--token", TOKEN)
    assert code == 8 and "another token" in one_error_line(err)
    assert "nothing to undo" in err
    assert qemu.status == "running" and qemu.kept() == ["0000:02:00.0"]


def test_undo_only_what_this_save_did(qemu, tmp_path):
    """A device kept alive before the save (same token) stays kept after the undo."""
    qemu.devices[0]["token"] = TOKEN
    qemu.migrate_outcome = "failed"
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", tmp_path / "s",
                       "--token", TOKEN, "--id", "gpu0")
    assert code == 8, err
    assert qemu.kept() == ["0000:01:00.0"]
    assert {"enable": False, "id": "gpu0"} not in called(qemu, "x-set-keepalive")


def test_kept_and_anonymous_devices_need_ids(qemu, tmp_path):
    qemu.devices[0]["token"] = TOKEN
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", tmp_path / "s",
                       "--token", TOKEN)
    assert code == 1 and "--id" in one_error_line(err)


def test_undo_that_fails_is_exit_9(qemu, tmp_path):
    state = _old_state(tmp_path)
    qemu.migrate_outcome = "failed"
    qemu.fail["cont"] = "Resetting the Virtual Machine is required"
    code, out, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token",
                         TOKEN, "--json")
    assert code == 9
    line = one_error_line(err)
    assert line.startswith("handover: rollback: ") and "NOT undone: cont: Resetting" in line
    assert "undone: migration cancelled, x-ignore-shared off, keepalive off" in line
    assert valid(json.loads(out))["kind"] == "rollback"
    _only_old_state(tmp_path, state)


def test_qemu_gone_during_the_migration(qemu, tmp_path):
    state = _old_state(tmp_path)
    qemu.gone_at = "query-migrate"
    qemu.calls.clear()
    # the first query-migrate (before anything changes) must answer: fail the later ones
    real = qemu.cmd
    seen = []

    def cmd(name, timeout=None, **a):
        if name == "query-migrate":
            seen.append(1)
            if len(seen) == 1:
                return {}
        return real(name, **a) if name != "query-migrate" else (_ for _ in ()).throw(
            QmpError("connection lost (EOFError)", name, gone=True))
    qemu.gone_at = None
    qemu.cmd = cmd
    qemu.migrate_outcome = "active"
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token", TOKEN)
    assert code == 9
    assert "connection lost" in one_error_line(err) and "QEMU is gone" in err
    _only_old_state(tmp_path, state)


def test_quit_failure_after_the_state_is_saved_keeps_it(qemu, tmp_path):
    state = _old_state(tmp_path)
    qemu.fail["quit"] = "no quitting today"
    code, _, err = run("vm", "save", "--qmp", qemu.path, "--state", state, "--token", TOKEN,
                       "--quit")
    assert code == 8 and "the state is saved in" in one_error_line(err)
    assert state.read_bytes() == qemu.payload and qemu.kept()


# ---- vm restore ---------------------------------------------------------------------------
@pytest.fixture
def incoming(monkeypatch):
    q = FakeQemu(status="inmigrate")
    for d in q.devices:
        d["token"] = TOKEN          # -device vfio-pci,...,keepalive_token=
    monkeypatch.setattr(ops, "connect", lambda path, timeout: q)
    monkeypatch.setattr(ops, "POLL", 0.001)
    return q


def test_restore_loads_then_keepalive_off_then_cont(incoming, tmp_path):
    state = tmp_path / "vm.state"
    state.write_bytes(b"QEVM" * 10)
    code, out, err = run("vm", "restore", "--qmp", incoming.path, "--state", state, "--json")
    assert code == 0, err
    doc = valid(json.loads(out))
    assert doc["status"] == "running" and doc["keepalive_off"] is True
    assert incoming.loaded == state.read_bytes() and incoming.caps["x-ignore-shared"]
    assert called(incoming, "x-set-keepalive") == [{"enable": False}]
    order = [n for n, _ in incoming.calls if n in ("migrate-set-capabilities",
                                                   "migrate-incoming", "x-set-keepalive",
                                                   "cont")]
    assert order == ["migrate-set-capabilities", "migrate-incoming", "x-set-keepalive", "cont"]
    assert set(doc["times"]) == {"load", "keepalive_off", "cont", "total"}
    assert state.exists() and TOKEN not in out + err


def test_restore_keep_keepalive_no_cont(incoming, tmp_path):
    state = tmp_path / "vm.state"
    state.write_bytes(b"QEVM")
    code, out, err = run("vm", "restore", "--qmp", incoming.path, "--state", state,
                         "--keep-keepalive", "--no-cont")
    assert code == 0, err
    assert "paused" in out and not called(incoming, "x-set-keepalive")
    assert not called(incoming, "cont") and incoming.kept()


def test_restore_error_paths(incoming, tmp_path):
    code, out, err = run("vm", "restore", "--qmp", incoming.path, "--state",
                         tmp_path / "none", "--json")
    assert code == 3 and "no saved VM state" in one_error_line(err)
    assert valid(json.loads(out))["kind"] == "no-state"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert run("vm", "restore", "--qmp", incoming.path, "--state", empty)[0] == 3
    assert incoming.calls == []
    state = tmp_path / "vm.state"
    state.write_bytes(b"QEVM")
    incoming.status = "running"
    code, _, err = run("vm", "restore", "--qmp", incoming.path, "--state", state)
    assert code == 1 and "-incoming defer" in one_error_line(err)
    incoming.status = "inmigrate"
    incoming.migrate_outcome = "failed"
    code, _, err = run("vm", "restore", "--qmp", incoming.path, "--state", state)
    assert code == 8 and "the migration failed" in one_error_line(err)
    assert state.exists() and not called(incoming, "cont")
    assert not called(incoming, "x-set-keepalive")


def test_restore_qemu_exits_during_the_load(incoming, tmp_path):
    state = tmp_path / "vm.state"
    state.write_bytes(b"QEVM")
    incoming.gone_at = "migrate-incoming"
    code, _, err = run("vm", "restore", "--qmp", incoming.path, "--state", state)
    assert code == 8
    assert "QEMU exits when an incoming state fails to load" in one_error_line(err)
    assert state.exists()


def test_restore_socket_missing(tmp_path):
    state = tmp_path / "vm.state"
    state.write_bytes(b"QEVM")
    code, _, err = run("vm", "restore", "--qmp", tmp_path / "no.sock", "--state", state)
    assert code == 8 and "cannot connect" in one_error_line(err)


# ---- the QMP connection against a small QMP server ----------------------------------------
class QmpServer:
    """A QMP server on a unix socket, in a thread: greeting, qmp_capabilities, then the
    answers of ``handler(command, arguments)`` (a dict: the return value; an exception:
    an error with its text; None: no answer)."""

    def __init__(self, path, handler, greet=True):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(1)
        self.handler, self.greet = handler, greet
        self.received = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            if not self.greet:
                conn.recv(1)                  # hold the connection, say nothing
                return
            try:
                self.talk(conn)
            except OSError:                   # the client went away
                pass

    def talk(self, conn):
        def send(obj):
            conn.sendall(json.dumps(obj).encode() + b"\r\n")
        send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                  "package": ""}, "capabilities": []}})
        buf, dec = "", json.JSONDecoder()
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break                     # the rest of the message is still coming
                buf = buf.lstrip()[end:]
                self.received.append(msg)
                name, args = msg["execute"], msg.get("arguments", {})
                if name == "qmp_capabilities":
                    ans = {"return": {}}
                else:
                    try:
                        r = self.handler(name, args)
                    except Exception as e:
                        r = {"error": {"class": "GenericError", "desc": str(e)}}
                    if r is None:
                        return                # close without answering
                    ans = r if "error" in r else {"return": r}
                if "id" in msg:
                    ans["id"] = msg["id"]
                send(ans)

    def close(self):
        self.sock.close()


def test_qmp_connection_peer_pid_and_a_redacted_token(tmp_path):
    def handler(name, args):
        if name == "x-set-keepalive":
            raise ValueError(f"keepalive token '{args['token']}' is not a UUID "
                             f"({args['token'].upper()})")
        return {"status": "running"}
    srv = QmpServer(str(tmp_path / "q.sock"), handler)
    with Qmp(str(tmp_path / "q.sock"), timeout=5) as q:
        assert q.pid == os.getpid()                  # SO_PEERCRED: the server is us
        assert q.cmd("query-status") == {"status": "running"}
        q.secrets.append(TOKEN)
        with pytest.raises(QmpError) as e:
            q.cmd("x-set-keepalive", enable=True, token=TOKEN)
        assert TOKEN not in str(e.value) and TOKEN.upper() not in str(e.value)
        assert "<token>" in str(e.value) and e.value.error_class == "GenericError"
    srv.close()


def test_qmp_connection_without_greeting_times_out(tmp_path):
    srv = QmpServer(str(tmp_path / "q.sock"), None, greet=False)
    t = time.monotonic()
    with pytest.raises(VmmError) as e:
        Qmp(str(tmp_path / "q.sock"), timeout=0.5)
    assert time.monotonic() - t < 5
    assert "no QMP greeting" in str(e.value) and "one at a time" in str(e.value)
    srv.close()


def test_qmp_connection_lost_mid_command(tmp_path):
    srv = QmpServer(str(tmp_path / "q.sock"), lambda name, args: None)
    with Qmp(str(tmp_path / "q.sock"), timeout=5) as q:
        with pytest.raises(QmpError) as e:
            q.cmd("stop")
        assert e.value.gone and "connection lost" in str(e.value)
    srv.close()


def test_qmp_quit_treats_the_close_as_success(tmp_path):
    srv = QmpServer(str(tmp_path / "q.sock"), lambda name, args: None)
    q = Qmp(str(tmp_path / "q.sock"), timeout=5)
    q.quit()                                    # no answer, connection closed: fine
    srv.close()


def test_the_library_never_logs_the_token(tmp_path, caplog):
    import logging

    srv = QmpServer(str(tmp_path / "q.sock"), lambda name, args: {})
    caplog.set_level(logging.DEBUG)
    with Qmp(str(tmp_path / "q.sock"), timeout=5) as q:
        q.cmd("x-set-keepalive", enable=True, token=TOKEN)
    assert srv.received[-1]["arguments"]["token"] == TOKEN      # sent...
    assert TOKEN not in caplog.text                               # ...never logged
    srv.close()


def test_errors_are_handover_errors():
    assert issubclass(QmpError, VmmError) and issubclass(VmmError, HandoverError)
    assert VmmError.exit_code == 8 and RollbackError.exit_code == 9


def test_the_lab_finds_the_qemu_namespace_package():
    """tests/system/lab/rootfs.py copies VENDORED_PY's directories into the lab's rootfs:
    "qemu" (qemu.qmp's namespace package, no __init__.py) is found as its one directory."""
    from pathlib import Path

    import qemu.qmp
    from handover.initramfs import find_py_package

    p = find_py_package("qemu")
    assert p is not None and p.is_dir() and not (p / "__init__.py").exists()
    assert Path(qemu.qmp.__file__).resolve().parent == (p / "qmp").resolve()


def test_arm_vm_resumes_the_saved_vms_when_arming_the_host_fails(qemu, tmp_path):
    """arm --vm: the VMs are saved first; a failure before the point of no return (here the
    next kernel's image is missing) resumes them: keepalive off for the devices the save kept,
    cont, and the error says so. The state file written stays."""
    from handover.ops import arm as ops_arm

    state = tmp_path / "vm.state"
    with pytest.raises(HandoverError) as e:
        ops_arm.arm(ops_arm.ArmRequest(image=str(tmp_path / "no-such-vmlinuz"), token=TOKEN,
                                       vms=((qemu.path, str(state)),), region=str(tmp_path / "r"),
                                       result_dir=str(tmp_path / "run")))
    msg = str(e.value)
    assert msg.startswith("arm: ") and "keepalive off, cont" in msg and TOKEN not in msg, msg
    names = [c[0] for c in qemu.calls]
    assert names.index("stop") < names.index("cont") and names[-1] == "cont", names
    assert qemu.status == "running" and all(not d["token"] for d in qemu.devices)
    assert state.read_bytes() == qemu.payload


def test_arm_vm_needs_the_token_and_a_pair(tmp_path):
    from click.testing import CliRunner

    from handover.cli import main
    from handover.ops import arm as ops_arm

    with pytest.raises(HandoverError, match="needs the owner's token"):
        ops_arm.arm(ops_arm.ArmRequest(image="x", vms=(("q", "s"),)))
    r = CliRunner().invoke(main, ["arm", "--kernel", "x", "--vm", "no-equals-sign"])
    assert r.exit_code == 2 and "expected QMP_SOCKET=STATE_FILE" in r.output
