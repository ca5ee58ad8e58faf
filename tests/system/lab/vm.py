"""Running a guest: the QEMU command line of the lab machine, the options of a run
(:class:`RunOptions`), one guest at a time per machine (an flock), the boot with its console
reader and timeout, and the result (:class:`GuestResult`).

Machine: ``-machine q35[,nvdimm=on] -accel tcg -smp 1 -m 1G -device
intel-iommu,intremap=on,x-scalable-mode=on`` (VT-d in scalable mode by default, as Debian's
kernel runs it; ``RunOptions(iommu="legacy")`` without it), edu at 03.0, e1000e at 04.0 (user net, restricted), the payload disk (read-only tar) at 05.0
and the results disk at 06.0 (both virtio-blk with ``iommu_platform=on``: behind VT-d too).
With ``RunOptions(nvme=True)`` also an NVMe controller at 08.0 on the root bus (NVME_BDF,
``-device nvme,serial=handover-nvme,drive=nvm0,addr=08.0,max_ioqpairs=4,msix_qsize=5``: MSI-X
with 5 vectors, one for the admin queue and one per I/O queue pair; 64-entry queues at most
(CAP.MQES=2047 in QEMU 7.2, the driver chooses); FLR capable, so vfio-pci resets it when it
is opened and closed) backed by ``nvme.img``, a fresh raw image of ``nvme_size`` bytes (8 MiB)
in the run's workdir. No guest driver claims it (the nvme module is not in the initrd).
The default machine has no NVMe controller.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .base import LabError, LabTimeout, Step, log
from .config import (BASE_CMDLINE, DEFAULT_TIMEOUT, LEGACY_PMEM_MEMMAP, REPO, RESULT_SLOT_MB,
                     ROOTFS_SLOT, cache_dir)
from . import rootfs as rootfs_mod
from .initramfs import setup
from .kernel import Kernel, module_names
from .payload import ConsoleReader, PhaseResult, marker_timings, read_results, write_payload

PMEM_KINDS = (None, "legacy", "nvdimm")
#: edu's place on the bus: the QEMU devices that put it there, and its address in the guest
#: (bus numbers as the firmware assigns them: depth-first below the root port at 00:07.0)
_RP = ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1,addr=07.0"]
TOPOLOGIES = {
    "root": ["-device", "edu,addr=03.0"],
    "two-edu": ["-device", "edu,addr=03.0", "-device", "edu,addr=09.0"],
    "root-port": _RP + ["-device", "edu,bus=rp1,addr=00.0"],
    "switch": _RP + ["-device", "x3130-upstream,id=up1,bus=rp1,addr=00.0",
                     "-device", "xio3130-downstream,id=dn1,bus=up1,chassis=2,slot=2,addr=00.0",
                     "-device", "edu,bus=dn1,addr=00.0"],
}
EDU_BDF = {"root": "0000:00:03.0", "two-edu": "0000:00:03.0", "root-port": "0000:01:00.0",
           "switch": "0000:03:00.0"}
ROOTFS_KINDS = (None, *rootfs_mod.KINDS)
#: what a rootfs run adds to the payload: handover from the repository (installed into the
#: system's Python by the phase unit) and the project's save unit (enabled)
ROOTFS_PAYLOAD = {"lab/py/handover": REPO / "handover",
                  "lab/systemd/handover-save.service": REPO / "initramfs/systemd/handover-save.service",
                  "lab/udev/60-handover-region.rules": REPO / "initramfs/udev/60-handover-region.rules"}


def rootfs_payload() -> dict:
    """ROOTFS_PAYLOAD and the udev probe the rule runs (handover.initramfs.udev_probe_script
    for the rootfs's python3, written into the cache): guest_phase.sh installs both, so the
    rootfs's udev gives a handover region root:root 0600 as a host's does."""
    from handover.initramfs import udev_probe_script

    probe = cache_dir() / "udev-probe"
    text = udev_probe_script("/usr/bin/python3")
    if not probe.exists() or probe.read_text() != text:
        probe.write_text(text)
    return {**ROOTFS_PAYLOAD, "lab/udev/udev-probe": probe}
KEXEC_MODES = ("l", "s", "p")
#: the emulated VT-d unit's translation mode: its QEMU device. In scalable mode (QEMU 7.2:
#: second-level translation only) the kernels run scalable mode, as Debian's config has it
#: on by default (INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON=y, the lab's config too)
IOMMU_MODES = {
    "legacy": "intel-iommu,intremap=on",
    "scalable": "intel-iommu,intremap=on,x-scalable-mode=on",
}
#: the NVMe controller of ``RunOptions(nvme=True)``: its QEMU device and guest address
NVME_BDF = "0000:00:08.0"
NVME_SERIAL = "handover-nvme"
NVME_DEVICE = f"nvme,serial={NVME_SERIAL},drive=nvm0,addr=08.0,max_ioqpairs=4,msix_qsize=5"


@dataclasses.dataclass
class RunOptions:
    """How :func:`run` boots the guest (``run_guest`` takes the same names as keywords).

    pmem: "legacy" (memmap=64M!0x30000000 on every kernel's cmdline), "nvdimm" (QEMU NVDIMM
    backed by ``nvdimm_file``, a fresh file in workdir by default, of ``nvdimm_size`` bytes,
    with a label area of ``nvdimm_label_size``), or None.
    append: extra kernel args for every phase.  kexec_append: extra args for the kexec'd
    phases only (default: same as append).  kexec_mode: "l" (``kexec -l``), "s" (``kexec -s
    -l``), "p" (``kexec -p`` then a sysrq crash, i.e. a kdump boot, with crashkernel=256M
    added to the first command line).
    files: {payload path: bytes | str | host Path}, visible in the guest under
    /payload/<path> (cwd of the scripts).
    memory, cpu, qemu_args: QEMU's ``-m``, ``-cpu`` and more arguments.
    topology: where edu sits (TOPOLOGIES): "root" (00:03.0 on the root bus), "root-port"
    (behind a PCIe root port at 00:07.0: 01:00.0), "switch" (behind the root port and a
    switch's upstream and downstream ports: 03:00.0), "two-edu" (a second edu at 00:09.0).
    EDU_BDF gives its address.
    nvme: add the NVMe controller (NVME_DEVICE at NVME_BDF, see the module's docstring),
    backed by a fresh raw ``nvme.img`` of ``nvme_size`` bytes in the workdir.
    iommu: the VT-d unit's mode (IOMMU_MODES): "scalable" (what Debian's kernel runs on
    a Xeon that has it) or "legacy".
    timeout: the whole run is killed after this many seconds (LabTimeout).
    workdir: where the payload, results disk, console.log and qemu-cmd.txt go (default: a
    new ``runs/run-*`` in the cache; the newest 6 are kept).  echo: copy the console to
    stderr.  shell: an interactive busybox shell instead of the scripts.
    kernel: boot this tree instead of Debian's.  extra_kernels: Kernel trees
    (``Kernel(release, mod_root)``: lib/modules/<release> with modules.dep; no vmlinuz
    needed) whose GUEST_MODULES the initrd carries as well, loaded by /init when ``uname
    -r`` is that release; the test puts such a kernel's image for phase N at
    ``files={"lab/vmlinuz.N": ...}``.
    rootfs: None (the initramfs guest: the scripts run under the initrd's /init) or
    "debian": the same kernel and initrd mount a Debian 12 root file system (rootfs.py:
    built once, cached; each run boots a qcow2 overlay of it, ``root.qcow2`` in the workdir,
    a virtio-blk disk at 00:0a.0) and switch_root to systemd, whose lab-phase.service runs
    the phase (the scripts under dash, with Debian's tools; ``handover`` from the payload
    installed in the system's Python and as /usr/bin/handover, the project's
    handover-save.service enabled); the next phase is reached through ``kexec -l`` and
    ``systemctl kexec``. The overlay persists across the run's kexecs, like a host's disk.
    """

    pmem: str | None = "legacy"
    append: str = ""
    kexec_append: str | None = None
    kexec_mode: str = "l"
    files: dict | None = None
    nvdimm_file: str | Path | None = None
    nvdimm_size: int = 256 << 20
    nvdimm_label_size: int | None = None
    memory: str = "1G"
    cpu: str | None = None
    qemu_args: list | None = None
    topology: str = "root"
    nvme: bool = False
    nvme_size: int = 8 << 20
    iommu: str = "scalable"
    timeout: float = DEFAULT_TIMEOUT
    workdir: str | Path | None = None
    echo: bool = False
    shell: bool = False
    kernel: Kernel | None = None
    extra_kernels: tuple | list = ()
    rootfs: str | None = None

    def __post_init__(self):
        if self.pmem not in PMEM_KINDS:
            raise ValueError(f"pmem={self.pmem!r}")
        if self.kexec_mode not in KEXEC_MODES:
            raise ValueError(f"kexec_mode={self.kexec_mode!r}")
        self.extra_kernels = list(self.extra_kernels or ())
        if self.rootfs not in ROOTFS_KINDS:
            raise ValueError(f"rootfs={self.rootfs!r} (one of {ROOTFS_KINDS})")
        if self.iommu not in IOMMU_MODES:
            raise ValueError(f"iommu={self.iommu!r} (one of {', '.join(IOMMU_MODES)})")

    def cmdline(self, n: int, extra: str) -> str:
        """The kernel command line of phase ``n`` with the test's words ``extra``."""
        pm = LEGACY_PMEM_MEMMAP if self.pmem == "legacy" else ""
        root = f"handover.lab.rootfs={ROOTFS_SLOT}" if self.rootfs else ""
        return " ".join(x for x in [BASE_CMDLINE, pm, root, extra, f"handover.lab.phase={n}",
                                    "handover.lab.shell=1" if self.shell and n == 1 else ""] if x)

    def cmdlines(self, nphases: int) -> tuple[str, dict]:
        """(phase 1's command line, {n: phase n's} for the kexec'd phases 2..nphases)."""
        first = self.cmdline(1, self.append)
        if self.kexec_mode == "p" and "crashkernel=" not in first:
            first += " crashkernel=256M"
        later = self.append if self.kexec_append is None else self.kexec_append
        return first, {n: self.cmdline(n, later) for n in range(2, nphases + 1)}


@dataclasses.dataclass
class GuestResult:
    phases: list                          # PhaseResult, one per script, in order
    console: str                          # whole serial console log
    qemu_cmd: list
    qemu_rc: int | None
    timings: dict                         # step name -> seconds (host wall clock)
    markers: list                         # (host seconds since QEMU start, marker, rest)
    workdir: Path
    nvdimm_file: Path | None = None
    #: {release: module names} of run_guest's extra_kernels: a phase that runs on such a
    #: kernel must have loaded all of them (check())
    expected_modules: dict = dataclasses.field(default_factory=dict)

    def check(self) -> "GuestResult":
        """Raise LabError with the console tail unless every phase ran and exited 0, and every
        phase booted into one of run_guest's ``extra_kernels`` loaded that kernel's modules."""
        bad = [p for p in self.phases if p.rc != 0]
        if bad:
            p = bad[0]
            raise LabError(
                f"guest phase {p.phase} rc={p.rc}\n--- stdout ---\n{p.stdout[-3000:]}\n"
                f"--- stderr ---\n{p.stderr[-3000:]}\n--- console tail ---\n{self.console[-4000:]}")
        for p in self.phases:
            missing = self.missing_modules(p)
            if missing:
                raise LabError(
                    f"guest phase {p.phase} ran on {p.release} without its modules {missing} "
                    f"(load list {p.modules_list or '?'}, insmod failed: {p.modules_failed})\n"
                    f"--- console tail ---\n{self.console[-4000:]}")
        return self

    def missing_modules(self, p: PhaseResult) -> list:
        """The modules of an extra kernel that phase ``p`` ran on but did not load (else [])."""
        want = self.expected_modules.get(p.release)
        if want is None:
            return []
        if not p.modules_list.endswith(f"modules.load.{p.release}"):
            return list(want)
        return [m for m in want if m not in p.modules] + [
            f"insmod {m}" for m in p.modules_failed]

    def format_timings(self) -> str:
        return format_timings(self.timings)


def format_timings(timings: dict) -> str:
    """{step: seconds} as aligned lines."""
    return "\n".join(f"  {k:32s} {v:7.2f} s" for k, v in timings.items())


def qemu_command(kernel: Kernel, initrd: Path, cmdline: str, payload: Path, results: Path,
                 nvdimm: Path | None = None, nvdimm_size: int = 256 << 20,
                 nvdimm_label_size: int | None = None, memory: str = "1G",
                 cpu: str | None = None, extra_args: list | None = None,
                 topology: str = "root", nvme: Path | None = None,
                 root_disk: Path | None = None, iommu: str = "scalable") -> list:
    """The QEMU command line of the lab machine (see the module's docstring)."""
    if topology not in TOPOLOGIES:
        raise LabError(f"unknown topology {topology!r} (one of {', '.join(TOPOLOGIES)})")
    machine = "q35,nvdimm=on" if nvdimm else "q35"
    mem = f"{memory},slots=2,maxmem=4G" if nvdimm else memory
    cmd = [
        "qemu-system-x86_64", "-machine", machine, "-accel", "tcg", "-smp", "1", "-m", mem,
        "-device", IOMMU_MODES[iommu],
        *TOPOLOGIES[topology],
        "-netdev", "user,id=n0,restrict=on", "-device", "e1000e,netdev=n0,addr=04.0",
        "-drive", f"if=none,id=pay,file={payload},format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=pay,iommu_platform=on,disable-legacy=on,addr=05.0",
        "-drive", f"if=none,id=res,file={results},format=raw,cache=writethrough",
        "-device", "virtio-blk-pci,drive=res,iommu_platform=on,disable-legacy=on,addr=06.0",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", cmdline,
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
    ]
    if root_disk:
        cmd += ["-drive", f"if=none,id=root,file={root_disk},format=qcow2,discard=unmap",
                "-device", f"virtio-blk-pci,drive=root,iommu_platform=on,disable-legacy=on,"
                           f"addr={ROOTFS_SLOT}"]
    if cpu:
        cmd += ["-cpu", cpu]
    if nvdimm:
        dev = "nvdimm,id=nv0,memdev=nvm0"
        if nvdimm_label_size:
            dev += f",label-size={nvdimm_label_size}"
        cmd += ["-object", f"memory-backend-file,id=nvm0,mem-path={nvdimm},size={nvdimm_size},share=on",
                "-device", dev]
    if nvme:
        cmd += ["-drive", f"if=none,id=nvm0,file={nvme},format=raw", "-device", NVME_DEVICE]
    return cmd + list(extra_args or [])


def run_guest(scripts, options: RunOptions | None = None, **kw) -> GuestResult:
    """Boot the lab guest and run ``scripts`` (a str or a list of str, shell source):
    :func:`run` with ``RunOptions(**kw)`` (or ``options``, with ``kw`` replacing some).

    scripts[0] runs in the first kernel; for each further script the guest init kexecs
    (see RunOptions.kexec_mode) into the same kernel+initrd (or the test's
    ``lab/vmlinuz.N``) and runs it. Results: GuestResult; check() then also fails a phase
    that ran on one of ``extra_kernels`` without loading its modules.
    """
    opts = dataclasses.replace(options, **kw) if options is not None else RunOptions(**kw)
    return run(scripts, opts)


def run(scripts, opts: RunOptions) -> GuestResult:
    """:func:`run_guest` with its options as one record. With ``opts.shell``: QEMU's exit
    code (an interactive session on this terminal)."""
    if isinstance(scripts, str):
        scripts = [scripts]
    if opts.shell:
        scripts = scripts or [""]
    timings: dict[str, float] = {}
    kernel, initrd = setup(timings, opts.kernel, opts.extra_kernels)
    expected = {x.version: module_names(x) for x in opts.extra_kernels}
    if not opts.workdir:
        _prune_runs()
    wd = Path(opts.workdir) if opts.workdir else Path(tempfile.mkdtemp(prefix="run-", dir=cache_dir() / "runs"))
    wd.mkdir(parents=True, exist_ok=True)
    inuse = open(wd / ".inuse", "a")          # closed (unlocked) when this call returns
    fcntl.flock(inuse, fcntl.LOCK_SH)
    nv = None
    if opts.pmem == "nvdimm":
        nv = Path(opts.nvdimm_file) if opts.nvdimm_file else wd / "nvdimm.img"
        if not nv.exists() or nv.stat().st_size != opts.nvdimm_size:
            with open(nv, "wb") as f:
                f.truncate(opts.nvdimm_size)
    nvme = None
    if opts.nvme:
        nvme = wd / "nvme.img"
        with open(nvme, "wb") as f:      # fresh every run: zeros
            f.truncate(opts.nvme_size)
    first, cmdlines = opts.cmdlines(len(scripts))
    payload, results = wd / "payload.tar", wd / "results.img"
    files, root_disk = opts.files, None
    if opts.rootfs:
        image = rootfs_mod.build(opts.rootfs, timings=timings)
        root_disk = rootfs_mod.overlay(image, wd / "root.qcow2")
        files = {**rootfs_payload(), **(files or {})}
    with Step("write payload", timings):
        write_payload(payload, scripts, files, kernel, initrd, cmdlines, opts.kexec_mode)
    with open(results, "wb") as f:
        f.truncate(RESULT_SLOT_MB * max(1, len(scripts)) << 20)
    cmd = qemu_command(kernel, initrd, first, payload, results, nv, opts.nvdimm_size,
                       opts.nvdimm_label_size, opts.memory, opts.cpu, opts.qemu_args,
                       opts.topology, nvme, root_disk=root_disk, iommu=opts.iommu)
    (wd / "qemu-cmd.txt").write_text(shlex.join(cmd) + "\n")
    log(f"boot: {shlex.join(cmd)}")
    if opts.shell:
        cmd[cmd.index("-serial") + 1] = "mon:stdio"
        del cmd[cmd.index("-monitor"):cmd.index("-monitor") + 2]
        return subprocess.call(cmd)  # type: ignore[return-value]
    try:
        with GuestLock():
            res = _boot(cmd, wd, scripts, opts.timeout, opts.echo, timings, nv)
            res.expected_modules = expected
            return res
    finally:
        inuse.close()


class GuestLock:
    """One guest at a time per machine (TCG on 2 shared cores): an flock in the cache dir,
    waited for at most ``HANDOVER_LAB_LOCK_TIMEOUT`` seconds (default 1800; then LabTimeout)."""

    def __enter__(self):
        self.f = open(cache_dir() / "qemu.lock", "w")
        t = time.monotonic()
        limit = float(os.environ.get("HANDOVER_LAB_LOCK_TIMEOUT", 1800))
        waited = False
        while True:
            try:
                fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log("another lab guest is running; waiting for it")
                    waited = True
                if time.monotonic() - t > limit:
                    self.f.close()
                    raise LabTimeout(f"another lab guest held {cache_dir() / 'qemu.lock'} for "
                                     f"more than {limit:.0f} s (HANDOVER_LAB_LOCK_TIMEOUT)")
                time.sleep(0.5)
        if waited:
            log(f"waited {time.monotonic() - t:.1f} s for the other guest")
        return self

    def __exit__(self, *exc):
        self.f.close()


def _boot(cmd, wd: Path, scripts, timeout: float, echo: bool, timings: dict, nv) -> GuestResult:
    t0 = time.monotonic()
    with open(wd / "console.log", "w") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        reader = ConsoleReader(proc.stdout, logf, t0, echo)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            reader.join(5)
            tail = "\n".join(reader.lines[-60:])
            raise LabTimeout(f"guest did not finish in {timeout:.0f} s (killed); workdir {wd}\n"
                             f"--- console tail ---\n{tail}")
        finally:
            if proc.poll() is None:
                _kill(proc)
        t_exit = time.monotonic() - t0
        reader.join(10)
    timings.update(marker_timings(reader.markers, t_exit))
    phases = read_results(wd / "results.img", len(scripts))
    res = GuestResult(phases, "\n".join(reader.lines), cmd, rc, timings, reader.markers, wd, nv)
    log("timings:\n" + res.format_timings())
    return res


def _prune_runs(keep: int = 6) -> None:
    """Keep only the newest ``keep`` automatic work dirs (each holds a ~40 MB payload)."""
    d = cache_dir() / "runs"
    d.mkdir(exist_ok=True)
    runs = sorted(d.glob("run-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in runs[keep - 1:]:
        # a run still waiting for the guest lock (or booting) holds .inuse: leave it alone
        try:
            with open(old / ".inuse", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(old, ignore_errors=True)
        except (BlockingIOError, FileNotFoundError, NotADirectoryError):
            continue


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
