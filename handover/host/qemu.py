"""QEMU processes on this host and their QMP monitors (``handover vm``).

- :func:`qemu_processes`: the pid, argv and working directory of every running QEMU system
  emulator, from ``/proc/PID/cmdline`` read through :class:`~handover.host.base.Sysroot`
  (so a captured tree works too); what their command lines mean is ``ops.vm``'s business;
- :class:`Qmp`: one synchronous QMP connection to a unix socket (the ``qemu.qmp`` library's
  ``QMPClient`` on a private event loop), the pid of the QEMU at the other end (SO_PEERCRED),
  a timeout on every step, and errors as one-line :class:`~handover.errors.VmmError`;
- :func:`pid_running`: whether a process still runs (not a zombie).

``qemu.qmp`` is imported only when a connection is made: every module of this package is
imported by ``all_sources()``, in the initramfs too, which does not ship it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import struct
from dataclasses import dataclass

from ..errors import VmmError
from .base import Sysroot

#: argv[0] of a QEMU system emulator (Debian's qemu-system-x86_64, RHEL's qemu-kvm, kvm)
QEMU_BINARY = re.compile(r"^(qemu-system-[A-Za-z0-9_.-]+|qemu-kvm|kvm)$")


@dataclass
class QemuProcess:
    pid: int
    argv: list[str]
    cwd: str | None          # where a relative socket path in argv is resolved


def qemu_processes(sr: Sysroot) -> list[QemuProcess]:
    """Every process under ``sr``'s /proc whose argv[0] names a QEMU system emulator, by
    pid. A process that ends while it is read is skipped."""
    found = []
    for name in sr.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = sr.read_bytes(f"/proc/{name}/cmdline", limit=1 << 20)
        except OSError:
            continue
        argv = [a.decode("utf-8", "replace") for a in raw.split(b"\0")]
        if argv and argv[-1] == "":
            argv.pop()
        if not argv or not QEMU_BINARY.match(os.path.basename(argv[0])):
            continue
        found.append(QemuProcess(int(name), argv, sr.readlink(f"/proc/{name}/cwd")))
    return sorted(found, key=lambda p: p.pid)


def pid_running(pid: int, sr: Sysroot | None = None) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    sr = sr or Sysroot("/")
    stat = sr.try_text(f"/proc/{pid}/stat")
    if stat is None:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def peer_pid(sock: socket.socket) -> int | None:
    """The pid of the process at the other end of a unix socket (SO_PEERCRED)."""
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid = struct.unpack("3i", cred)[0]
    return pid or None


class QmpError(VmmError):
    """A QMP step failed: ``command`` is the QMP command (or "connect"), ``error_class``
    QEMU's error class when QEMU answered with an error, ``gone`` when the connection was
    lost (QEMU exited or closed it)."""

    def __init__(self, msg: str, command: str, error_class: str | None = None,
                 gone: bool = False, desc: str | None = None):
        super().__init__(msg)
        self.command = command
        self.error_class = error_class
        self.gone = gone
        self.desc = desc if desc is not None else msg


def _quiet_library_logs() -> None:
    """qemu.qmp logs every message it sends at DEBUG (the token of x-set-keepalive with
    them) and connection failures at ERROR (extra stderr lines): none of it reaches our
    log; handover logs its own steps."""
    lg = logging.getLogger("qemu.qmp")
    lg.propagate = False
    lg.setLevel(logging.CRITICAL + 1)
    if not lg.handlers:
        lg.addHandler(logging.NullHandler())


class Qmp:
    """A QMP connection: ``cmd(name, **arguments)`` returns QEMU's ``return`` value.

    Every string of ``secrets`` is replaced by ``<token>`` in the error messages this
    connection raises (QEMU echoes a malformed token in its error)."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self.pid: int | None = None
        self.secrets: list[str] = []
        self._loop = None
        self._client = None
        self._connect()

    # -- connection --------------------------------------------------------------------
    def _connect(self) -> None:
        try:
            from qemu.qmp import QMPClient
        except ImportError:
            raise VmmError("the Python package qemu.qmp is not installed (pip install "
                           "qemu.qmp)") from None
        _quiet_library_logs()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise QmpError(f"{self.path}: cannot connect to the QMP socket: "
                           f"{e.strerror or e}", "connect") from None
        self.pid = peer_pid(sock)
        sock.setblocking(False)
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("handover")
        try:
            self._run(self._client.connect(sock), "connect")
        except QmpError as e:
            self.close()
            raise QmpError(f"{self.path}{self._who()}: no QMP greeting and negotiation "
                           f"({e.desc}; another client may hold the monitor: QEMU serves "
                           f"one at a time)", "connect", gone=e.gone) from None

    def _who(self) -> str:
        return f" (QEMU pid {self.pid})" if self.pid else ""

    def _redact(self, text: str) -> str:
        for s in self.secrets:
            if s:
                text = re.sub(re.escape(s), "<token>", text, flags=re.I)
        return text

    def _run(self, coro, command: str, timeout: float | None = None):
        from qemu.qmp import ExecuteError, QMPError

        timeout = self.timeout if timeout is None else timeout
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except ExecuteError as e:
            desc = self._redact(str(e))
            raise QmpError(desc, command, error_class=e.error_class, desc=desc) from None
        except asyncio.TimeoutError:
            raise QmpError(f"no answer within {timeout:g} s", command) from None
        except (QMPError, EOFError, OSError) as e:
            why = self._redact(str(e) or type(e).__name__)
            raise QmpError(f"connection lost ({why})", command, gone=True) from None

    def cmd(self, name: str, timeout: float | None = None, **arguments):
        if self._client is None:
            raise QmpError("not connected", name, gone=True)
        return self._run(self._client.execute(name, arguments or None), name, timeout)

    def quit(self, timeout: float | None = None) -> None:
        """``quit``: QEMU answers and closes the connection; either order is success."""
        try:
            self.cmd("quit", timeout=timeout)
        except QmpError as e:
            if not e.gone:
                raise
        self.close()

    def close(self) -> None:
        """Disconnect (quietly: the peer may be gone) and drop the event loop."""
        client, loop = self._client, self._loop
        self._client = None
        if client is not None and loop is not None:
            try:
                loop.run_until_complete(asyncio.wait_for(client.disconnect(), 5))
            except Exception:   # EOF after quit, a reset connection: nothing left to do
                pass
        if loop is not None:
            loop.close()
            self._loop = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
