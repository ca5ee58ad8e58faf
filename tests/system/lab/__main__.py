"""``python -m tests.system.lab {setup,build,run,shell,timings}``: the lab from a shell."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import rootfs
from .base import LabError, ensure_host_packages
from .config import DEFAULT_TIMEOUT, cache_dir
from .initramfs import build_initramfs, setup
from .kernel import fetch_kernel
from .payload import console_markers, marker_timings
from .vm import RunOptions, format_timings, run

DESCRIPTION = "QEMU (TCG) + emulated VT-d + pmem + kexec lab for handover system tests."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.system.lab", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="install host packages, fetch the kernel, build the initramfs")
    b = sub.add_parser("build", help="(re)build the initramfs")
    b.add_argument("--force", action="store_true")
    rf = sub.add_parser("rootfs", help="build (once) the Debian root file system of --rootfs "
                        "debian (debootstrap; cached) and print its path")
    rf.add_argument("--force", action="store_true")
    for name in ("run", "shell"):
        r = sub.add_parser(name, help="boot the guest and run scripts" if name == "run"
                           else "boot the guest into an interactive busybox shell (Ctrl-a x quits)")
        if name == "run":
            r.add_argument("scripts", nargs="+", help="script file per phase (or '-c CODE')")
        r.add_argument("--pmem", choices=["legacy", "nvdimm", "none"], default="legacy")
        r.add_argument("--append", default="")
        r.add_argument("--kexec-append")
        r.add_argument("--kexec-mode", choices=["l", "s", "p"], default="l")
        r.add_argument("--nvdimm-file")
        r.add_argument("--nvdimm-label-size", type=int)
        r.add_argument("--nvme", action="store_true", help="add the NVMe controller at 00:08.0")
        r.add_argument("--file", action="append", default=[], metavar="GUESTPATH=HOSTPATH")
        r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
        r.add_argument("--workdir")
        r.add_argument("--rootfs", choices=list(rootfs.KINDS),
                       help="boot a Debian root file system with systemd (phases run as a unit)")
        r.add_argument("--quiet", action="store_true", help="do not echo the console")
    t = sub.add_parser("timings", help="the step timings of a run, from its console.log")
    t.add_argument("workdir", nargs="?", help="a run's workdir (default: the newest run)")
    a = ap.parse_args(argv)
    if a.cmd == "timings":
        return timings(a.workdir)
    if a.cmd == "setup":
        k, initrd = setup()
        print(f"kernel {k.version}: {k.vmlinuz}\ninitrd {initrd} ({initrd.stat().st_size / 1e6:.1f} MB)")
        return 0
    if a.cmd == "rootfs":
        img = rootfs.build(force=a.force)
        print(f"rootfs {img} ({rootfs.du(img) / 1e6:.0f} MB used)")
        return 0
    if a.cmd == "build":
        ensure_host_packages()
        k = fetch_kernel()
        initrd = build_initramfs(k, force=a.force)
        print(f"initrd {initrd} ({initrd.stat().st_size / 1e6:.1f} MB)")
        return 0
    files = dict(f.split("=", 1) for f in a.file)
    opts = RunOptions(pmem=None if a.pmem == "none" else a.pmem, append=a.append,
                      kexec_append=a.kexec_append, kexec_mode=a.kexec_mode, files=files,
                      nvdimm_file=a.nvdimm_file, nvdimm_label_size=a.nvdimm_label_size,
                      nvme=a.nvme, timeout=a.timeout, workdir=a.workdir, rootfs=a.rootfs)
    if a.cmd == "shell":
        opts.shell = True
        return run([], opts)  # type: ignore[return-value]
    scripts = [Path(s).read_text() if os.path.exists(s) else s for s in a.scripts]
    opts.echo = not a.quiet
    res = run(scripts, opts)
    for p in res.phases:
        print(f"=== phase {p.phase} rc={p.rc} ===\n{p.stdout}", end="")
        if p.stderr:
            print(f"--- stderr ---\n{p.stderr}", end="")
    print(f"workdir: {res.workdir}\ntimings:\n{res.format_timings()}")
    return 0 if all(p.rc == 0 for p in res.phases) else 1


def timings(workdir: str | None) -> int:
    """Print the step timings of the run in ``workdir`` (default: the newest of the cache's
    runs/), from the host timestamps and markers of its console.log."""
    if workdir is None:
        runs = sorted((cache_dir() / "runs").glob("run-*/console.log"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise SystemExit(f"no run in {cache_dir() / 'runs'}")
        log = runs[-1]
    else:
        log = Path(workdir) / "console.log"
    try:
        text = log.read_text(errors="replace")
    except OSError as e:
        raise SystemExit(f"{log}: {e.strerror}") from None
    markers, t_end = console_markers(text)
    if not markers:
        raise LabError(f"{log}: no @@LAB markers")
    print(f"{log.parent}:\n{format_timings(marker_timings(markers, t_end))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
