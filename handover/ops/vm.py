"""Use cases ``vm save``, ``vm restore``, ``vm list``: the VMM side of a fast restart.

The old QEMU keeps its vfio-pci devices alive (``x-set-keepalive``, qemu-patches 0004), stops,
and migrates its state with ``x-ignore-shared`` to a file (guest RAM is on a shared memory
backend: it is not copied); the next QEMU, started with ``-incoming defer`` and
``-device vfio-pci,...,keepalive_token=UUID``, loads the file (its kept devices open in the
post_load of their ``vfio-pci-keepalive`` section, 0006), the devices go back to the normal
reset semantics (``x-set-keepalive`` off) and the VM continues.

:func:`save` and :func:`restore` work over one QMP connection (``host.qemu.Qmp``, or any
object with ``cmd(name, **arguments)``, ``pid``, ``path``, ``secrets``, ``quit()`` and
``close()``: the unit tests pass a fake); they return a report or raise
:class:`~handover.errors.HandoverError`, and print nothing (``progress`` is a callback).
:func:`parse_qemu_argv` reads a QEMU command line (pure); :func:`list_vms` applies it to the
QEMU processes of a sysroot. The token is sent to QEMU only: never in a report, a message
or a log line (QEMU's own error messages have it replaced by ``<token>``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import HandoverError, NoStateError, RollbackError, VmmError

Progress = Callable[[str], None] | None

#: a canonical UUID, as QEMU's keepalive_token wants it (8-4-4-4-12 hex digits)
CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
#: query-migrate states of a migration in progress (anything else: none, or finished)
MIGRATION_RUNNING = {"setup", "active", "cancelling", "pre-switchover", "device",
                     "wait-unplug", "postcopy-active", "postcopy-paused",
                     "postcopy-recover", "colo"}
#: qdev drivers of a VFIO PCI device
VFIO_DRIVERS = {"vfio-pci", "vfio-pci-nohotplug"}
POLL = 0.02   # seconds between two query-migrate


# ---- the token ----------------------------------------------------------------------------
def check_token(token: str) -> str:
    """The token as QEMU wants it (canonical, lower case); HandoverError naming the rule,
    never the token."""
    import uuid

    if not isinstance(token, str) or not CANONICAL_UUID.fullmatch(token.strip()):
        raise HandoverError("the token is not a canonical UUID "
                            "(xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    t = token.strip().lower()
    if uuid.UUID(t).int == 0:
        raise HandoverError("the token must not be the nil UUID")
    return t


# ---- QEMU command lines (pure) ------------------------------------------------------------
def split_opts(text: str, implied: str | None = None) -> list[tuple[str, str]]:
    """QemuOpts text (``a=b,c,,d,flag``: ``,,`` is a comma in a value) as (key, value) pairs;
    a first element without ``=`` is the value of ``implied`` when given, any other one
    is a flag (``flag`` -> ``on``, ``noflag`` stays ``noflag=on``: we only read values)."""
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    out = []
    for n, p in enumerate(parts):
        if "=" in p:
            k, v = p.split("=", 1)
            out.append((k, v))
        elif n == 0 and implied is not None:
            out.append((implied, p))
        elif p:
            out.append((p, "on"))
    return out


def _opts_dict(text: str, implied: str | None = None) -> dict:
    """-device/-chardev/-name text (QemuOpts, or the JSON form ``{...}``) as a dict."""
    if text.lstrip().startswith("{"):
        try:
            d = json.loads(text)
        except ValueError:
            return {}
        return {str(k): v for k, v in d.items()} if isinstance(d, dict) else {}
    return dict(split_opts(text, implied))


#: QEMU options that take no argument (every other option takes the next argv element)
FLAG_OPTIONS = {
    "S", "s", "nodefaults", "no-user-config", "nographic", "no-reboot", "no-shutdown",
    "enable-kvm", "daemonize", "snapshot", "no-hpet", "no-acpi", "full-screen", "no-quit",
    "alt-grab", "ctrl-grab", "win2k-hack", "rtc-td-hack", "no-fd-bootchk", "preconfig",
    "only-migratable", "enable-fips", "no-frame", "semihosting", "version", "help", "h",
    "enable-sync-profile", "old-param", "no-kvm", "no-kvm-irqchip", "no-kvm-pit",
    "no-kvm-pit-reinjection", "curses", "portrait", "singlestep", "xen-attach", "nouserconfig",
    "perfmap", "jitdump", "usb",
}


def parse_qemu_argv(argv: list[str], cwd: str | None = None) -> dict:
    """What a QEMU command line says about its monitors and VFIO devices (pure).

    QMP sockets: ``-qmp``/``-qmp-pretty unix:PATH,...``, and ``-chardev socket,id=X,path=P``
    used by ``-mon chardev=X,mode=control``; a relative path is joined to ``cwd`` (the
    process's working directory) when known. VFIO devices: ``-device vfio-pci,...`` (also
    ``driver=vfio-pci``, ``vfio-pci-nohotplug`` and the JSON form) with their ``id``,
    ``host`` (or the ``sysfsdev`` basename) and whether a ``keepalive_token`` is given:
    ``token`` true/false, never its value. ``-readconfig`` files are not read (``notes``)."""
    opts: list[tuple[str, str]] = []
    i = 1
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and len(a) > 1:
            name = a.lstrip("-")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if name in FLAG_OPTIONS or nxt is None or (
                    re.match(r"^--?[a-z][a-z0-9-]*$", nxt) and name not in ("append",)):
                opts.append((name, ""))
                i += 1
                continue
            opts.append((name, nxt))
            i += 2
            continue
        i += 1                      # the disk image of `qemu IMAGE`: nothing of ours
    chardevs: dict[str, dict] = {}
    for name, val in opts:
        if name == "chardev":
            d = _opts_dict(val, implied="backend")
            if isinstance(d.get("id"), str):
                chardevs[d["id"]] = d

    def where(path: str) -> str:
        if cwd and not os.path.isabs(path):
            return os.path.normpath(os.path.join(cwd, path))
        return path

    qmp, devices, notes = [], [], []
    vm = {"binary": argv[0] if argv else "", "name": None, "incoming": None}
    for name, val in opts:
        if name in ("qmp", "qmp-pretty"):
            if val.startswith("unix:"):
                path = dict(split_opts(val[len("unix:"):], implied="path")).get("path")
                if path:
                    qmp.append({"path": where(path), "via": f"-{name}"})
            else:
                kind = val.split(":", 1)[0] if ":" in val else val
                qmp.append({"path": None, "via": f"-{name}", "kind": kind})
        elif name == "mon":
            d = dict(split_opts(val, implied="chardev"))
            if d.get("mode") == "control" and d.get("chardev") in chardevs:
                cd = chardevs[d["chardev"]]
                path = cd.get("path")
                if cd.get("backend") == "socket" and isinstance(path, str) and path:
                    qmp.append({"path": where(path), "via": "-mon", "chardev": d["chardev"]})
                else:
                    qmp.append({"path": None, "via": "-mon", "chardev": d["chardev"],
                                "kind": str(cd.get("backend"))})
        elif name == "device":
            d = _opts_dict(val, implied="driver")
            if d.get("driver") not in VFIO_DRIVERS:
                continue
            host = d.get("host")
            sysfsdev = d.get("sysfsdev")
            if not host and isinstance(sysfsdev, str):
                host = os.path.basename(sysfsdev.rstrip("/"))
            devices.append({"id": d.get("id") if isinstance(d.get("id"), str) else None,
                            "driver": d["driver"],
                            "host": _bdf(host) if isinstance(host, str) else None,
                            "token": bool(d.get("keepalive_token"))})
        elif name == "name":
            vm["name"] = dict(split_opts(val, implied="guest")).get("guest")
        elif name == "incoming":
            vm["incoming"] = val
        elif name == "readconfig":
            notes.append(f"-readconfig {val}: not read (its devices and monitors are not listed)")
    return {**vm, "qmp": qmp, "devices": devices, "notes": notes}


def _bdf(text: str) -> str:
    """A host PCI address in sysfs spelling when it is one ('01:00.0' -> '0000:01:00.0'),
    else the text as given."""
    from ..host.pci import normalize_bdf

    try:
        return normalize_bdf(text)
    except HandoverError:
        return text


def list_vms(sysroot: str = "/") -> list[dict]:
    """The running QEMU processes under ``sysroot`` with their QMP sockets and VFIO
    devices (see :func:`parse_qemu_argv`)."""
    from ..host import Sysroot
    from ..host.qemu import qemu_processes

    sr = Sysroot(sysroot)
    if not sr.isdir("/proc"):
        raise HandoverError(f"{sr.root}: no proc/ there (--sysroot: a host tree)")
    return [{"pid": p.pid, **parse_qemu_argv(p.argv, p.cwd)} for p in qemu_processes(sr)]


# ---- over QMP -------------------------------------------------------------------------------
def connect(path: str, timeout: float):
    """The default connection: host.qemu.Qmp."""
    from ..host.qemu import Qmp

    return Qmp(path, timeout=timeout)


def qmp_error_class():
    from ..host.qemu import QmpError

    return QmpError


def _connect(req, what: str):
    QmpError = qmp_error_class()
    try:
        return (req.connect or connect)(req.qmp, min(req.timeout, 30.0))
    except QmpError as e:
        raise VmmError(f"{what}: connect: {e}; nothing was changed") from None


def vfio_devices(conn) -> list[dict]:
    """The vfio-pci devices of the QEMU at ``conn`` from its QOM tree: ``id`` (None for a
    device without one), ``qom_path``, ``host`` (BDF, or the sysfsdev basename), ``kept``
    (it has a keepalive token: the value is read, compared with "" and dropped)."""
    QmpError = qmp_error_class()
    found = []
    for base in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = conn.cmd("qom-list", path=base)
        except QmpError as e:
            if e.gone:
                raise
            continue                        # no such container: no device of that kind
        for c in children or []:
            m = re.fullmatch(r"child<(.+)>", str(c.get("type", "")))
            if not m or m.group(1) not in VFIO_DRIVERS:
                continue
            path = f"{base}/{c['name']}"
            host = None
            try:
                sysfsdev = conn.cmd("qom-get", path=path, property="sysfsdev")
            except QmpError as e:
                if e.gone:
                    raise
                sysfsdev = None
            if isinstance(sysfsdev, str) and sysfsdev:
                host = os.path.basename(sysfsdev.rstrip("/"))
            else:
                host = conn.cmd("qom-get", path=path, property="host")
            try:
                kept = bool(conn.cmd("qom-get", path=path, property="keepalive_token"))
            except QmpError as e:
                if e.gone:
                    raise
                kept = None                 # not the patched QEMU (no such property)
            found.append({"id": c["name"] if base == "/machine/peripheral" else None,
                          "qom_path": path, "host": _bdf(host) if host else None,
                          "kept": kept})
    return found


def _status(conn) -> str:
    return str(conn.cmd("query-status").get("status"))


def _migration_status(conn) -> str | None:
    return conn.cmd("query-migrate").get("status")


def _capability(conn, name: str) -> bool | None:
    for c in conn.cmd("query-migrate-capabilities"):
        if c.get("capability") == name:
            return bool(c.get("state"))
    return None


def _set_capability(conn, name: str, state: bool) -> None:
    conn.cmd("migrate-set-capabilities", capabilities=[{"capability": name, "state": state}])


def _where(conn) -> str:
    pid = getattr(conn, "pid", None)
    return f"QEMU pid {pid}, QMP {conn.path}" if pid else f"QMP {conn.path}"


def _describe(devs: list[dict]) -> str:
    return ", ".join(f"{d['id'] or d['qom_path']} ({d['host'] or '?'})" for d in devs) or "none"


def _round(t: float) -> float:
    return round(t, 4)


# ---- vm save ------------------------------------------------------------------------------
@dataclass
class VmSaveRequest:
    qmp: str
    state: str
    token: str | None
    ids: tuple = ()
    quit: bool = False
    allow_no_device: bool = False
    timeout: float = 60.0
    progress: Progress = None
    connect: Callable | None = None     # (path, timeout) -> connection (tests: a fake)


class _Undo:
    """What ``vm save`` did in QEMU, undone in reverse order on failure; a ``last`` step
    (``cont``) after every other one, so that the guest runs again only once its devices
    are back to the normal resets."""

    def __init__(self):
        self.steps: list[tuple[str, Callable[[], None]]] = []
        self.last: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None], last: bool = False) -> None:
        (self.last if last else self.steps).append((what, fn))

    def clear(self) -> None:
        self.steps, self.last = [], []

    def run(self) -> tuple[list[str], list[str]]:
        done, failed = [], []
        for what, fn in [*reversed(self.steps), *reversed(self.last)]:
            try:
                fn()
                done.append(what)
            except Exception as e:      # each undo step is tried, whatever the others did
                failed.append(f"{what}: {e}")
        self.clear()
        return done, failed


def _unlink(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(req: VmSaveRequest) -> dict:
    """Keep the devices alive, stop the VM, migrate its state to ``req.state``.

    The state is written under a temporary name in the same directory (created first: an
    unwritable directory is refused before QEMU is touched); the migration's command renames
    it once ``cat`` has written everything, then it is fsync'ed and renamed onto
    ``req.state``, so a state saved before is replaced only by a complete one. Any failure
    before that undoes what was done (migration cancelled, keepalive off for the devices
    this call kept, x-ignore-shared as it was, ``cont`` when the VM ran) and raises
    VmmError (exit 8), or RollbackError (exit 9) when the undoing failed too."""
    t0 = time.monotonic()
    say = req.progress or (lambda _m: None)
    token = check_token(req.token) if req.token is not None else None
    state = os.path.abspath(req.state)
    if os.path.isdir(state):
        raise HandoverError(f"{state}: is a directory")
    d = os.path.dirname(state)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(state)}.", suffix=".tmp", dir=d)
    except OSError as e:
        raise HandoverError(f"{d}: cannot write the state there: {e.strerror or e}") from None
    done = tmp[:-len(".tmp")] + ".done"
    conn = None
    try:
        conn = _connect(req, "vm save")
        if token:
            conn.secrets.append(token)
        return _save(req, conn, token, state, fd, tmp, done, t0, say)
    finally:
        os.close(fd)
        _unlink(tmp, done)
        if conn is not None:
            conn.close()


def _save(req, conn, token, state, fd, tmp, done, t0, say) -> dict:
    QmpError = qmp_error_class()
    where = _where(conn)
    report = {"qmp": os.path.abspath(req.qmp), "pid": conn.pid, "state": state, "size": None,
              "devices": [], "keepalive": {"set": False, "ids": list(req.ids) or None},
              "was_running": None, "status": None, "quit": req.quit, "exited": None,
              "times": {}}

    def refuse(msg: str) -> HandoverError:
        return HandoverError(f"vm save: {msg} ({where}); nothing was changed")

    # -- what is there (nothing changes yet) --------------------------------------------
    try:
        status = _status(conn)
        mig = _migration_status(conn)
        devs = vfio_devices(conn)
    except QmpError as e:
        raise VmmError(f"vm save: {e.command}: {e} ({where}); nothing was changed") from None
    report["devices"] = devs
    report["was_running"] = status == "running"
    if status == "inmigrate":
        raise refuse("QEMU waits for an incoming state (-incoming): use vm restore")
    if mig in MIGRATION_RUNNING:
        raise refuse(f"a migration is already {mig}")
    if req.ids:
        known = {x["id"] for x in devs if x["id"]}
        missing = [i for i in req.ids if i not in known]
        if missing:
            raise refuse(f"no vfio-pci device with id {', '.join(missing)} (vfio-pci "
                         f"devices: {_describe(devs)})")
        targets = [x for x in devs if x["id"] in req.ids]
    else:
        targets = devs
    if not devs and not req.allow_no_device:
        raise refuse("QEMU has no vfio-pci device: nothing would be kept alive "
                      "(--allow-no-device saves the VM anyway)")
    if targets and token is None:
        raise refuse("keeping devices alive needs the owner's token (--token-file)")
    if any(x["kept"] is None for x in targets):
        raise refuse("QEMU's vfio-pci has no keepalive_token property: not the patched QEMU")
    kept_before = [x for x in targets if x["kept"]]
    changed = [x for x in targets if not x["kept"]]
    if not req.ids and kept_before and any(x["id"] is None for x in changed):
        raise refuse("some devices are kept alive already and a device without an id is "
                     "not: name the devices to keep with --id")
    say(f"QEMU pid {conn.pid or '?'} at {conn.path}: {status}, vfio-pci devices: "
        f"{_describe(devs)}")

    undo = _Undo()
    step = "set-keepalive"
    try:
        # -- keepalive on -------------------------------------------------------------------
        t = time.monotonic()
        if targets:
            if req.ids:
                for x in targets:
                    conn.cmd("x-set-keepalive", enable=True, token=token, id=x["id"])
                    if x in changed:
                        undo.push(f"keepalive off for {x['id']}",
                                  lambda i=x["id"]: conn.cmd("x-set-keepalive", enable=False,
                                                             id=i))
            else:
                conn.cmd("x-set-keepalive", enable=True, token=token)
                if changed and not kept_before:
                    undo.push("keepalive off", lambda: conn.cmd("x-set-keepalive",
                                                                enable=False))
                else:
                    for x in changed:
                        undo.push(f"keepalive off for {x['id']}",
                                  lambda i=x["id"]: conn.cmd("x-set-keepalive", enable=False,
                                                             id=i))
            report["keepalive"]["set"] = True
            say(f"keepalive on: {_describe(targets)}")
        report["times"]["set_keepalive"] = _round(time.monotonic() - t)

        # -- stop -----------------------------------------------------------------------------
        step = "stop"
        t = time.monotonic()
        if report["was_running"]:
            conn.cmd("stop")
            undo.push("cont", lambda: conn.cmd("cont"), last=True)
            say("VM stopped")
        report["times"]["stop"] = _round(time.monotonic() - t)

        # -- migrate to the file --------------------------------------------------------------
        step = "x-ignore-shared"
        t = time.monotonic()
        if not _capability(conn, "x-ignore-shared"):
            _set_capability(conn, "x-ignore-shared", True)
            undo.push("x-ignore-shared off",
                      lambda: _set_capability(conn, "x-ignore-shared", False))
        step = "migrate"
        q = shlex.quote
        uri = f"exec:cat > {q(tmp)} && mv -f -- {q(tmp)} {q(done)} || rm -f -- {q(tmp)}"
        conn.cmd("migrate", uri=uri)
        undo.push("migration cancelled", lambda: _cancel(conn, tmp, req.timeout))
        say(f"migrating the VM state to {state}")
        info = _wait_migration(conn, t + req.timeout, req.timeout)
        step = "state file"
        _wait_written(tmp, done, max(t + req.timeout, time.monotonic() + 5.0))
        st = os.fstat(fd)
        if os.stat(done).st_ino == st.st_ino:
            os.fsync(fd)
        else:                                   # cat replaced the file: fsync the new one
            with open(done, "rb") as f:
                os.fsync(f.fileno())
        size = os.stat(done).st_size
        if size == 0:
            raise HandoverError("the state written is empty")
        os.replace(done, state)
        _fsync_dir(os.path.dirname(state))
        undo.clear()                            # the state is complete: nothing to undo
        report["size"] = size
        report["migration"] = {k: info.get(k) for k in ("total-time", "downtime")
                               if k in info}
        report["times"]["migrate"] = _round(time.monotonic() - t)
        say(f"saved {state}: {size} bytes")
    except (QmpError, HandoverError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError) and e.filename:
            why = f"{e.filename}: {why}"
        gone = isinstance(e, QmpError) and e.gone
        undone, failed = undo.run()
        if gone:
            failed = [f"{f} (QEMU is gone)" for f in failed]
        msg = f"vm save: {step}: {why} ({where})"
        if failed:
            raise RollbackError(f"{msg}; NOT undone: {'; '.join(failed)}"
                                + (f"; undone: {', '.join(undone)}" if undone else ""),
                                document=report) from None
        raise VmmError(f"{msg}; undone: {', '.join(undone) or 'nothing to undo'}",
                       document=report) from None

    # -- the state is saved: quit (a failure now is not undone) -----------------------------
    if req.quit:
        t = time.monotonic()
        try:
            conn.quit(timeout=min(req.timeout, 30.0))
        except QmpError as e:
            raise VmmError(f"vm save: quit: {e} ({where}); the state is saved in {state} "
                           f"({report['size']} bytes), the VM is stopped with its devices "
                           f"kept alive", document=report) from None
        report["exited"] = _wait_exit(conn.pid, time.monotonic() + min(req.timeout, 10.0))
        report["times"]["quit"] = _round(time.monotonic() - t)
        say(f"QEMU quit{'' if report['exited'] is not False else ' (still running)'}")
    else:
        try:
            report["status"] = _status(conn)
        except QmpError:
            report["status"] = None
    report["times"]["total"] = _round(time.monotonic() - t0)
    return report


def _wait_migration(conn, deadline: float, timeout: float) -> dict:
    """query-migrate until completed; VmmError-worthy failures as HandoverError."""
    while True:
        info = conn.cmd("query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise HandoverError(f"the migration {status}"
                                + (f": {info['error-desc']}" if info.get("error-desc") else ""))
        if time.monotonic() > deadline:
            raise HandoverError(f"the migration did not complete within {timeout:g} s "
                                f"(status {status})")
        time.sleep(POLL)


def _wait_written(tmp: str, done: str, deadline: float) -> None:
    """The migration's command renames ``tmp`` to ``done`` once cat has written all of it
    (QEMU reports completed before its command has exited), or removes ``tmp`` when cat
    failed."""
    while True:
        if os.path.exists(done):
            return
        if not os.path.exists(tmp):
            raise HandoverError(f"{tmp}: the migration's command failed to write the state "
                                f"(QEMU's stderr has cat's error)")
        if time.monotonic() > deadline:
            raise HandoverError(f"{tmp}: the migration's command did not finish writing")
        time.sleep(POLL)


def _cancel(conn, tmp: str, timeout: float) -> None:
    """Undo a migration: cancel it when it runs, then wait until its command has let go of
    the temporary file (bounded), so that nothing is written after the cleanup."""
    status = _migration_status(conn)
    if status in MIGRATION_RUNNING:
        conn.cmd("migrate_cancel")
        end = time.monotonic() + min(timeout, 10.0)
        while _migration_status(conn) in MIGRATION_RUNNING:
            if time.monotonic() > end:
                raise HandoverError("the migration is still running after migrate_cancel")
            time.sleep(POLL)
    end = time.monotonic() + 2.0
    while os.path.exists(tmp) and time.monotonic() < end:
        time.sleep(POLL)


def _wait_exit(pid: int | None, deadline: float) -> bool | None:
    from ..host.qemu import pid_running

    if not pid:
        return None
    while pid_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True


# ---- undo a save (arm --vm) ---------------------------------------------------------------
def resume_saved(report: dict, timeout: float = 10.0, connect_fn: Callable | None = None) -> list[str]:
    """Undo a completed ``save`` (``report``, its report) while its QEMU still runs: keepalive
    off for the devices that save kept (not those kept before it), and ``cont`` when the VM
    ran. For a caller whose later step failed before the point of no return (``arm --vm``):
    the VM goes on where it was. Returns what was done; VmmError when QEMU refused or is gone."""
    QmpError = qmp_error_class()
    done = []
    try:
        conn = (connect_fn or connect)(report["qmp"], timeout)
    except QmpError as e:
        raise VmmError(f"vm resume: connect: {e} (QMP {report['qmp']})") from None
    try:
        changed = [d for d in report["devices"] if d.get("kept") is False]
        ids = report["keepalive"].get("ids")
        if report["keepalive"].get("set") and changed:
            if ids:
                for d in changed:
                    if d["id"] in ids:
                        conn.cmd("x-set-keepalive", enable=False, id=d["id"])
            elif len(changed) == len(report["devices"]):
                conn.cmd("x-set-keepalive", enable=False)
            else:
                for d in changed:
                    conn.cmd("x-set-keepalive", enable=False, id=d["id"])
            done.append("keepalive off")
        if report.get("was_running"):
            conn.cmd("cont")
            done.append("cont")
    except QmpError as e:
        raise VmmError(f"vm resume: {e.command}: {e} ({_where(conn)}); done: "
                       f"{', '.join(done) or 'nothing'}") from None
    finally:
        conn.close()
    return done


# ---- vm restore ---------------------------------------------------------------------------
@dataclass
class VmRestoreRequest:
    qmp: str
    state: str
    keepalive_off: bool = True
    cont: bool = True
    timeout: float = 60.0
    progress: Progress = None
    connect: Callable | None = None


def restore(req: VmRestoreRequest) -> dict:
    """Load ``req.state`` into a QEMU started with ``-incoming defer``, then keepalive off
    (unless ``keepalive_off`` is false) and ``cont`` (unless ``cont`` is false). A failure
    leaves QEMU as it is (paused, or exited when the load failed: QEMU 7.2 exits then) and
    deletes nothing: VmmError (exit 8)."""
    t0 = time.monotonic()
    say = req.progress or (lambda _m: None)
    state = os.path.abspath(req.state)
    try:
        with open(state, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0 or not f.read(4):
                raise NoStateError(f"{state}: empty: no saved VM state")
    except FileNotFoundError:
        raise NoStateError(f"{state}: no such file: no saved VM state") from None
    except IsADirectoryError:
        raise HandoverError(f"{state}: is a directory") from None
    conn = _connect(req, "vm restore")
    try:
        return _restore(req, conn, state, size, t0, say)
    finally:
        conn.close()


def _restore(req, conn, state, size, t0, say) -> dict:
    QmpError = qmp_error_class()
    where = _where(conn)
    report = {"qmp": os.path.abspath(req.qmp), "pid": conn.pid, "state": state, "size": size,
              "devices": [], "keepalive_off": False, "status": None, "times": {}}
    try:
        status = _status(conn)
        mig = _migration_status(conn)
        report["devices"] = vfio_devices(conn)
    except QmpError as e:
        raise VmmError(f"vm restore: {e.command}: {e} ({where}); nothing was changed") from None
    if status != "inmigrate":
        raise HandoverError(f"vm restore: QEMU is {status}, not waiting for an incoming state "
                            f"(start it with -incoming defer) ({where}); nothing was changed")
    if mig is not None and mig != "none":
        raise HandoverError(f"vm restore: an incoming migration is {mig} already ({where}); "
                            f"nothing was changed")
    say(f"QEMU pid {conn.pid or '?'} at {conn.path}: inmigrate, vfio-pci devices: "
        f"{_describe(report['devices'])}")
    step = "x-ignore-shared"
    try:
        t = time.monotonic()
        if not _capability(conn, "x-ignore-shared"):
            _set_capability(conn, "x-ignore-shared", True)
        step = "migrate-incoming"
        conn.cmd("migrate-incoming", uri=f"exec:cat {shlex.quote(state)}")
        say(f"loading {state} ({size} bytes)")
        _wait_migration(conn, t + req.timeout, req.timeout)
        step = "query-status"
        end = t + req.timeout
        while (status := _status(conn)) == "inmigrate":
            if time.monotonic() > end:
                raise HandoverError(f"still inmigrate {req.timeout:g} s after the load")
            time.sleep(POLL)
        report["times"]["load"] = _round(time.monotonic() - t)

        step = "set-keepalive off"
        t = time.monotonic()
        kept = [x for x in report["devices"] if x["kept"]]
        if req.keepalive_off and kept:
            conn.cmd("x-set-keepalive", enable=False)
            report["keepalive_off"] = True
            say(f"keepalive off: {_describe(kept)}")
        report["times"]["keepalive_off"] = _round(time.monotonic() - t)

        step = "cont"
        t = time.monotonic()
        if req.cont and status != "running":
            conn.cmd("cont")
            say("VM continues")
        report["times"]["cont"] = _round(time.monotonic() - t)
        step = "query-status"
        report["status"] = _status(conn)
        report["devices"] = vfio_devices(conn)
    except (QmpError, HandoverError) as e:
        extra = " (QEMU exits when an incoming state fails to load: its stderr says why)" \
            if isinstance(e, QmpError) and e.gone and step in ("migrate-incoming",
                                                               "query-status") else ""
        raise VmmError(f"vm restore: {step}: {e} ({where}){extra}; QEMU is left as it is, "
                       f"{state} is kept", document=report) from None
    report["times"]["total"] = _round(time.monotonic() - t0)
    return report
