"""Keep the VFIO file descriptors of keepalive devices open after their owner exits.

A VMM that quits (the fast-restart flow: ``set-keepalive on``, ``savevm``, quit) closes its
VFIO fds, and the kernel then disables and resets the device, unmaps its IOMMU mappings and
unpins its memory: there is nothing left to keep across the kexec. ``handover arm`` therefore
duplicates the VFIO fds of every process that holds an armed device's group (the container,
``/dev/vfio/vfio``; the group, ``/dev/vfio/<N>``; the device fds, ``anon_inode:[vfio-device]``)
with ``pidfd_getfd(2)`` into a small holder process. Those files stay open, with their
mappings and pinned memory, until the kexec or until the holder is stopped.

The holder's ``argv[0]`` starts with ``@``: systemd's final killing spree before a
``systemctl kexec`` spares such processes (its convention for root-storage daemons), so the
device is still open when the kexec syscall runs. Before that spree, the shutdown transaction
stops every unit that conflicts with shutdown.target, the caller's session scope or service
among them, and the holder with it: so under systemd the holder moves at once into a scope
of its own, ``handover-hold-<pid>.scope``, without default dependencies (``systemd-run
--scope``, which execs the holder in place), which the transaction leaves alone.

Reading ``/proc`` goes through :class:`Sysroot`; the syscalls act on the live system only.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import dataclass, field

from ..errors import HandoverError
from .base import Sysroot

#: x86-64 syscall numbers (include/uapi/asm-generic/unistd.h: pidfd_open 434, pidfd_getfd 438)
SYS_PIDFD_GETFD = 438
HOLDER_NAME = "@handover-hold"
PIDFILE = "hold.json"

#: what a VFIO device fd's /proc/<pid>/fd link reads (container and groups: /dev/vfio/...)
DEVICE = "anon_inode:[vfio-device]"


@dataclass(frozen=True)
class VfioOwner:
    """A process that holds the VFIO group of a device to keep, and its VFIO fds."""

    pid: int
    comm: str
    groups: tuple[str, ...]         # the groups it holds ("7", ...)
    fds: tuple[int, ...]            # its fd numbers: container, groups, devices


@dataclass
class HoldReport:
    holder: int | None = None
    owners: list = field(default_factory=list)     # VfioOwner as dicts
    fds: int = 0
    groups_without_owner: list = field(default_factory=list)
    scope: str | None = None        # the holder's own systemd scope (systemd is PID 1)


#: systemd runs as PID 1 (sd_booted(3): this directory exists)
SYSTEMD_RUNTIME = "/run/systemd/system"


def scope_command(pid: int) -> list[str]:
    """The prefix that runs the holder (pid ``pid``, in place: ``systemd-run --scope``
    execs its command) in a transient scope of its own, which no shutdown transaction stops
    (DefaultDependencies=no: no Conflicts= or Before=shutdown.target). systemd-run talks to
    the manager as systemctl does (its private socket for root: no D-Bus daemon needed)."""
    return ["systemd-run", "--scope", "--quiet", f"--unit=handover-hold-{pid}",
            "--property=DefaultDependencies=no",
            "--description=handover: VFIO files of keepalive devices, kept for the kexec", "--"]


def device_group(sr: Sysroot, bdf: str) -> str | None:
    """The IOMMU group of a PCI device (``/sys/bus/pci/devices/<bdf>/iommu_group``)."""
    link = sr.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group")
    return os.path.basename(link) if link else None


#: the VFIO container node (groups: /dev/vfio/<N>)
CONTAINER = "/dev/vfio/vfio"


def vfio_files(sr: Sysroot, pid: int | str) -> list[tuple[int, str]]:
    """(fd, target) of process ``pid``'s VFIO files, by fd: the container (CONTAINER), its
    groups (``/dev/vfio/<N>``), its devices (DEVICE); [] when its fds cannot be read."""
    try:
        entries = sr.listdir(f"/proc/{pid}/fd")
    except HandoverError:
        return []
    out = []
    for fd in entries:
        target = sr.readlink(f"/proc/{pid}/fd/{fd}") if fd.isdigit() else None
        if target is not None and (target == DEVICE or target.startswith("/dev/vfio/")):
            out.append((int(fd), target))
    return sorted(out)


def group_of(target: str) -> str | None:
    """The IOMMU group a VFIO file's target names ("7" for /dev/vfio/7), else None."""
    if target.startswith("/dev/vfio/") and target != CONTAINER:
        return target.rsplit("/", 1)[1]
    return None


def vfio_owners(sr: Sysroot, groups: set[str], exclude: int | None = None) -> list[VfioOwner]:
    """Every process (but ``exclude``) with an open fd on one of ``groups``' VFIO nodes."""
    out = []
    for name in sr.listdir("/proc"):
        if not name.isdigit() or int(name) == exclude:
            continue
        files = vfio_files(sr, name)
        held = {g for _fd, t in files if (g := group_of(t)) in groups}
        if held:
            comm = (sr.try_text(f"/proc/{name}/comm") or "?").strip()
            out.append(VfioOwner(int(name), comm, tuple(sorted(held)),
                                 tuple(fd for fd, _t in files)))
    return out


def pidfd_getfd(pid: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        new = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return new
    finally:
        os.close(pidfd)


def stop_holder(result_dir: str) -> int | None:
    """Stop a holder this tool started (its fds close: the kernel resets the devices as
    for any VFIO close). Returns its pid, or None when there was none."""
    path = os.path.join(result_dir, PIDFILE)
    try:
        with open(path) as f:
            pid = int(json.load(f)["holder"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if not f.read().startswith(HOLDER_NAME.encode()):
                pid = None          # not ours any more (the pid was reused)
        if pid:
            os.kill(pid, signal.SIGTERM)
    except OSError:
        pid = None
    try:
        os.unlink(path)
    except OSError:
        pass
    return pid


def hold(sr: Sysroot, devices: list[str], result_dir: str) -> HoldReport:
    """Duplicate the VFIO fds of the owners of ``devices`` into a new holder process.

    Raises HandoverError when an fd cannot be taken (no permission, the process went)."""
    groups = {g for g in (device_group(sr, d) for d in devices) if g}
    if not groups:
        return HoldReport()
    owners = vfio_owners(sr, groups, exclude=os.getpid())
    rep = hold_owners(owners, result_dir)
    rep.groups_without_owner = sorted(groups - {g for o in owners for g in o.groups})
    return rep


def hold_owners(owners: list[VfioOwner], result_dir: str, systemd: bool | None = None) -> HoldReport:
    """Duplicate ``owners``' fds into a new holder process and record it in
    ``result_dir``; ``systemd`` (default: is it PID 1?) moves the holder into its own scope.
    An earlier holder is stopped only once the new one runs: it may be the only owner left
    (the VMM quit), and stopping it first would close the devices (a reset)."""
    if systemd is None:
        systemd = os.path.isdir(SYSTEMD_RUNTIME)
    rep = HoldReport()
    if not owners:
        stop_holder(result_dir)
        return rep
    taken = []
    try:
        for o in owners:
            for fd in o.fds:
                try:
                    taken.append(pidfd_getfd(o.pid, fd))
                except OSError as e:
                    raise HandoverError(f"pid {o.pid} ({o.comm}) fd {fd}: cannot hold its VFIO "
                                        f"file: {e.strerror}") from None
        for fd in taken:
            os.set_inheritable(fd, True)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # pragma: no cover - the holder
            try:
                os.close(r)
                os.setsid()
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)    # nothing of the caller's pipes stays open
                os.dup2(null, 2)
                os.dup2(w, 1)       # stdout: tells the parent it runs, then closed
                code = ("import os, signal; os.write(1, b'ok'); os.close(1); "
                        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
                        "while True: signal.pause()")
                if systemd:
                    # in its own scope first, then as "@handover-hold" (the same process)
                    again = (f"import os, sys; os.execv(sys.executable, "
                             f"[{HOLDER_NAME!r}, '-c', {code!r}])")
                    cmd = scope_command(os.getpid()) + [sys.executable, "-c", again]
                    os.execvp(cmd[0], cmd)
                os.execv(sys.executable, [HOLDER_NAME, "-c", code])
            finally:
                os._exit(127)
        os.close(w)
        ok = os.read(r, 2) == b"ok"
        os.close(r)
        if not ok:
            os.waitpid(pid, 0)
            raise HandoverError("the VFIO holder process did not start" + (
                " (systemd-run --scope failed: the holder needs a scope of its own, else "
                "the shutdown stops it with the caller's unit)" if systemd else ""))
        if systemd:
            rep.scope = f"handover-hold-{pid}.scope"
    finally:
        for fd in taken:
            os.close(fd)
    stop_holder(result_dir)            # the earlier holder: its files are the new one's too
    rep.holder = pid
    rep.owners = [dict(pid=o.pid, comm=o.comm, groups=list(o.groups), fds=len(o.fds))
                  for o in owners]
    rep.fds = len(taken)
    os.makedirs(result_dir, exist_ok=True)
    with open(os.path.join(result_dir, PIDFILE), "w") as f:
        json.dump({"holder": pid, "owners": rep.owners, "scope": rep.scope}, f)
    return rep
