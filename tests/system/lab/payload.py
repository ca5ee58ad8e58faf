"""The host <-> guest protocol, defined once for the host side (guest_init.sh is the guest
side): the payload disk the host writes, the console markers the guest prints, and the
results disk the guest writes and the host reads.

Payload (virtio-blk at 00:05.0, read-only): a plain tar the guest unpacks into /payload::

    lab/phaseN.sh      the script of phase N (N = 1, 2, ...)
    lab/cmdline.N      the kernel command line of phase N >= 2
    lab/kexec.mode     l | s | p (kexec -l, kexec -s -l, kexec -p + crash)
    lab/slot_mb        the size of a results slot, MiB (RESULT_SLOT_MB)
    lab/vmlinuz, lab/initrd.img   what the guest kexecs into (when there is a phase 2)
    lab/vmlinuz.N      (a test's file) another kernel for phase N
    lab/py/<pkg>       (rootfs runs) Python packages the phase unit installs (handover)
    lab/systemd/*.service   (rootfs runs) units the phase unit installs and starts
    <name>             the test's files (``run_guest(files=...)``)

Console: a line ``@@LAB <NAME> phase=N ... uptime=<s>`` is a marker (MARK_RE); the host
times the lab's steps from their arrival (``marker_timings``).

Results (virtio-blk at 00:06.0): phase N writes a tar of its /lab/out into slot N of
RESULT_SLOT_MB MiB; the members are RESULT_FILES (``./files/...`` is $LAB_OUT).
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import sys
import tarfile
import threading
import time
from pathlib import Path

from .base import LabError
from .config import RESULT_SLOT_MB

# -- the payload ----------------------------------------------------------------------

#: names in the payload tar (guest_init.sh reads them under /payload/)
PAYLOAD_SCRIPT = "lab/phase{n}.sh"
PAYLOAD_CMDLINE = "lab/cmdline.{n}"
PAYLOAD_KEXEC_MODE = "lab/kexec.mode"
PAYLOAD_SLOT_MB = "lab/slot_mb"
PAYLOAD_VMLINUZ = "lab/vmlinuz"
PAYLOAD_INITRD = "lab/initrd.img"


def write_payload(path: Path, scripts, files, kernel, initrd: Path | None,
                  cmdlines: dict, kexec_mode: str) -> None:
    """The payload tar at ``path``: the phase scripts, the command lines of the kexec'd
    phases ({n: text}), the kexec mode, the slot size, ``kernel``'s vmlinuz and ``initrd``
    when there is more than one phase, and ``files`` ({payload path: bytes | str | host
    path}; a str that names no host file is the content)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        def add_bytes(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, int(time.time())
            tar.addfile(ti, io.BytesIO(data))
        for i, s in enumerate(scripts, 1):
            add_bytes(PAYLOAD_SCRIPT.format(n=i), s.encode() if isinstance(s, str) else s, 0o755)
        for n, c in cmdlines.items():
            add_bytes(PAYLOAD_CMDLINE.format(n=n), c.encode())
        add_bytes(PAYLOAD_KEXEC_MODE, kexec_mode.encode())
        add_bytes(PAYLOAD_SLOT_MB, str(RESULT_SLOT_MB).encode())
        if len(scripts) > 1:
            tar.add(str(kernel.vmlinuz), PAYLOAD_VMLINUZ)
            tar.add(str(initrd), PAYLOAD_INITRD)
        for name, content in (files or {}).items():
            if isinstance(content, (bytes, bytearray)):
                add_bytes(name, bytes(content))
            elif isinstance(content, str) and not os.path.exists(content):
                add_bytes(name, content.encode())
            else:
                tar.add(str(content), name, filter=_no_bytecode)
    # pad to a multiple of 512 (virtio-blk sector)
    sz = path.stat().st_size
    if sz % 4096:
        with open(path, "ab") as f:
            f.write(b"\0" * (4096 - sz % 4096))


def _no_bytecode(ti: tarfile.TarInfo):
    """tar.add's filter: a directory's ``__pycache__`` and ``*.pyc`` stay out."""
    if "__pycache__" in ti.name.split("/") or ti.name.endswith(".pyc"):
        return None
    return ti


# -- the results ----------------------------------------------------------------------

#: members of a phase's results tar (guest_init.sh ``finish``) -> PhaseResult attribute
RESULT_FILES = {
    "rc": "rc",                         # the script's exit code
    "kexec.rc": "kexec_rc",             # kexec load's exit code
    "stdout": "stdout",
    "stderr": "stderr",
    "lab-dmesg.txt": "dmesg",
    "lab-cmdline.txt": "cmdline",
    "kexec.log": "kexec_log",
    "lab-release.txt": "release",       # uname -r
    "lab-modules.txt": "modules",       # /proc/modules
    "lab-modules-load.txt": "modules_list",   # the load list used, then what insmod refused
    "lab-journal.txt": "journal",       # rootfs runs: journalctl -b at the end of the phase
}
#: the directory of $LAB_OUT in the results tar
RESULT_FILES_DIR = "files/"


@dataclasses.dataclass
class PhaseResult:
    phase: int
    rc: int | None = None                # exit code of the phase script (None: did not finish)
    stdout: str = ""
    stderr: str = ""
    dmesg: str = ""
    cmdline: str = ""
    files: dict = dataclasses.field(default_factory=dict)   # relpath under $LAB_OUT -> bytes
    kexec_rc: int | None = None
    kexec_log: str = ""
    tar: bytes = b""                     # the raw results tar of this phase (./files/... etc.)
    release: str = ""                    # uname -r of the kernel this phase ran on
    modules: list = dataclasses.field(default_factory=list)   # names in /proc/modules at the end
    modules_list: str = ""               # the load list /init used (/etc/lab/modules.load[.<release>])
    modules_failed: list = dataclasses.field(default_factory=list)  # its entries insmod refused
    journal: str = ""                    # rootfs runs: the systemd journal of this boot

    def extract(self, dest: str | Path, subdir: str = "") -> Path:
        """Extract ``$LAB_OUT/<subdir>`` of this phase to ``dest``, symlinks and empty dirs
        included (``files`` only holds regular files)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        pre = "./" + RESULT_FILES_DIR + (subdir.strip("/") + "/" if subdir else "")
        with tarfile.open(fileobj=io.BytesIO(self.tar), mode="r:") as t:
            members = []
            for m in t.getmembers():
                name = m.name if m.name.startswith("./") else "./" + m.name
                if not name.startswith(pre) or name == pre:
                    continue
                m.name = name[len(pre):]
                m.uid = m.gid = 0
                m.uname = m.gname = ""
                members.append(m)
            for m in members:
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    raise LabError(f"unsafe path in results tar: {m.name}")
            kw = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
            t.extractall(dest, members=members, **kw)
        return dest

    def _set(self, name: str, data: bytes) -> None:
        """One member ``name`` of the results tar."""
        if name.startswith(RESULT_FILES_DIR):
            self.files[name[len(RESULT_FILES_DIR):]] = data
            return
        attr = RESULT_FILES.get(name)
        if attr in ("rc", "kexec_rc"):
            setattr(self, attr, int(data.strip() or -1))
            return
        txt = data.decode(errors="replace")
        if attr == "release":
            self.release = txt.strip()
        elif attr == "modules":
            self.modules = [ln.split()[0] for ln in txt.splitlines() if ln.strip()]
        elif attr == "modules_list":
            lines = [ln for ln in txt.splitlines() if ln.strip()]
            self.modules_list = lines[0] if lines else ""
            self.modules_failed = lines[1:]
        elif attr:
            setattr(self, attr, txt)


def read_results(res_img: Path, nphases: int) -> list[PhaseResult]:
    """The PhaseResult of each of ``nphases`` slots of the results disk (an empty slot: a
    phase that wrote nothing, rc None)."""
    out = []
    slot = RESULT_SLOT_MB << 20
    with open(res_img, "rb") as f:
        for n in range(1, nphases + 1):
            pr = PhaseResult(phase=n)
            f.seek((n - 1) * slot)
            blob = f.read(slot)
            if blob[:512].strip(b"\0"):
                try:
                    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
                        members = tar.getmembers()
                        pr.tar = blob[:tar.offset]
                        for m in members:
                            if not m.isfile():
                                continue
                            data = tar.extractfile(m).read()
                            pr._set(m.name[2:] if m.name.startswith("./") else m.name, data)
                except tarfile.TarError as e:
                    pr.stderr += f"\n[lab] results slot {n} unreadable: {e}"
            out.append(pr)
    return out


# -- the console ----------------------------------------------------------------------

#: a marker line: ``@@LAB <NAME> <rest>`` (rest: ``phase=N ... uptime=S``)
MARK_RE = re.compile(r"@@LAB ([A-Z-]+)(.*)")


class ConsoleReader(threading.Thread):
    """Reads the guest's serial console: every line into ``lines`` and the log file (with
    host seconds since ``t0``), markers into ``markers`` as (seconds, name, rest)."""

    def __init__(self, stream, logf, t0: float, echo: bool):
        super().__init__(daemon=True)
        self.stream, self.logf, self.t0, self.echo = stream, logf, t0, echo
        self.lines: list[str] = []
        self.markers: list[tuple[float, str, str]] = []
        self.first_kernel_line: float | None = None

    def run(self):
        for raw in iter(self.stream.readline, b""):
            t = time.monotonic() - self.t0
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append(line)
            self.logf.write(f"[{t:8.3f}] {line}\n")
            self.logf.flush()
            if self.echo:
                print(line, file=sys.stderr, flush=True)
            m = MARK_RE.search(line)
            if m:
                self.markers.append((t, m.group(1), m.group(2).strip()))
            elif self.first_kernel_line is None and "Linux version" in line:
                self.first_kernel_line = t


#: a line of a run's console.log: host seconds since QEMU started, the console line
LOG_LINE_RE = re.compile(r"^\[\s*([\d.]+)\] (.*)$")


def console_markers(log_text: str) -> tuple[list, float | None]:
    """The markers of a run's console.log (as ConsoleReader.markers) and the time of its
    last line."""
    markers, t = [], None
    for ln in log_text.splitlines():
        m = LOG_LINE_RE.match(ln)
        if not m:
            continue
        t = float(m.group(1))
        mk = MARK_RE.search(m.group(2))
        if mk:
            markers.append((t, mk.group(1), mk.group(2).strip()))
    return markers, t


def index_markers(markers) -> dict:
    """{(marker, phase): (host seconds, guest uptime or None)} of the first occurrence of each
    marker per phase (phase 0: the marker names none). ``GuestResult.markers`` in, e.g.
    ``index_markers(res.markers)[("INIT", 2)]``."""
    out: dict = {}
    for t, name, rest in markers:
        ph = re.search(r"phase=(\d+)", rest)
        up = re.search(r"uptime=([\d.]+)", rest)
        out.setdefault((name, int(ph.group(1)) if ph else 0), (t, float(up.group(1)) if up else None))
    return out


def marker_timings(markers, t_qemu_exit: float | None) -> dict:
    """Turn console marker arrival times into named step durations."""
    tm: dict[str, float] = {}
    by = {k: t for k, (t, _up) in index_markers(markers).items()}

    def d(key, a, b):
        if a in by and b in by:
            tm[key] = round(by[b] - by[a], 3)
    if ("INIT", 1) in by:
        tm["qemu start -> /init (phase 1)"] = round(by[("INIT", 1)], 3)
    if ("SCRIPT-BEGIN", 1) in by:
        tm["qemu start -> script (phase 1)"] = round(by[("SCRIPT-BEGIN", 1)], 3)
    n = 1
    while ("INIT", n) in by:
        d(f"phase {n}: init -> modules loaded", ("INIT", n), ("MODULES-LOADED", n))
        d(f"phase {n}: modules -> payload", ("MODULES-LOADED", n), ("PAYLOAD", n))
        # rootfs runs: /init installs the payload's tools into the mounted disk,
        # switch_root, systemd boots and starts lab-phase.service
        d(f"phase {n}: payload -> tools", ("PAYLOAD", n), ("TOOLS", n))
        d(f"phase {n}: tools -> switch_root", ("TOOLS", n), ("SWITCH-ROOT", n))
        d(f"phase {n}: switch_root -> unit (systemd)", ("SWITCH-ROOT", n), ("UNIT", n))
        d(f"phase {n}: unit -> script", ("UNIT", n), ("SCRIPT-BEGIN", n))
        d(f"phase {n}: script", ("SCRIPT-BEGIN", n), ("SCRIPT-END", n))
        d(f"phase {n}: kexec load", ("KEXEC-LOAD-BEGIN", n), ("KEXEC-LOAD-END", n))
        d(f"phase {n}: write results", ("RESULTS-BEGIN", n), ("RESULTS-END", n))
        d(f"kexec -e -> /init (phase {n + 1})", ("KEXEC-EXEC", n), ("INIT", n + 1))
        n += 1
    if t_qemu_exit is not None:
        tm["qemu total"] = round(t_qemu_exit, 3)
    return tm
