#!/usr/bin/env python3
"""Build the patched kernel for the lab: Debian's linux-source-6.12 + kernel-patches/.

    python tools/kernel.py build [--jobs N]     # prints the bzImage and vmlinux paths
    python tools/kernel.py check                # does the series apply (git apply --check)?
    python tools/kernel.py paths                # where things are (nothing is built)

Everything lives outside the repository, in $HANDOVER_KERNEL_CACHE (default
~/.cache/handover-kernel): the unpacked source as a git tree whose first commit is the
unmodified Debian source (``base``), a separate build directory (O=), and ccache. A cold
build takes ~15-25 minutes on 2 cores; after a patch change ccache and make's dependency
tracking make it a few minutes. The config is x86_64_defconfig + kvm_guest.config + what
the lab needs (VT-d with debugfs, IR, kexec, kdump, pmem/dax, VFIO), everything built in.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(ROOT, "kernel-patches", "patches")
CACHE = os.environ.get("HANDOVER_KERNEL_CACHE", os.path.expanduser("~/.cache/handover-kernel"))
TREE = os.path.join(CACHE, "linux-source-6.12")
BUILD = os.path.join(CACHE, "build")
TARBALL = "/usr/src/linux-source-6.12.tar.xz"
BASE_VERSION = "6.12.117"   # Debian bookworm-backports linux-source-6.12 the series is made on
APT = ["linux-source-6.12", "build-essential", "bc", "bison", "flex", "libelf-dev", "libssl-dev",
       "ccache", "cpio", "kmod"]
CONFIG_ON = ["INTEL_IOMMU", "IRQ_REMAP", "IOMMU_DEBUGFS", "INTEL_IOMMU_DEBUGFS", "KEXEC", "KEXEC_FILE",
             "CRASH_DUMP", "X86_PMEM_LEGACY", "LIBNVDIMM", "BLK_DEV_PMEM", "ND_BTT",
             "TRANSPARENT_HUGEPAGE", "FS_DAX", "MEMORY_HOTPLUG", "MEMORY_HOTREMOVE", "ZONE_DEVICE", "DEV_DAX", "DEV_DAX_PMEM", "ACPI_NFIT", "VFIO",
             "VFIO_PCI", "VFIO_IOMMU_TYPE1", "E1000E", "VIRTIO_BLK", "VIRTIO_PCI", "BLK_DEV_INITRD",
             "DEBUG_FS", "DEBUG_INFO_NONE", "PROC_KCORE", "CRC32", "IKCONFIG", "IKCONFIG_PROC",
             "HANDOVER"]
# what the lab never uses: off, to keep the build near 15 minutes on 2 cores
CONFIG_OFF = ["MODULES", "SOUND", "DRM", "WLAN", "WIRELESS", "CFG80211", "MAC80211", "NFS_FS", "NFSD",
              "NETWORK_FILESYSTEMS", "AGP", "BT", "HAMRADIO", "MEDIA_SUPPORT", "INPUT_JOYSTICK",
              "INPUT_TABLET", "INPUT_TOUCHSCREEN", "FB", "USB_SUPPORT", "HID", "ATA", "MD", "WATCHDOG",
              "HWMON", "THERMAL", "EFI", "CPU_FREQ", "SECURITY_SELINUX", "AUDIT", "XFS_FS", "EXT4_FS",
              "BTRFS_FS", "ISO9660_FS", "AUTOFS_FS", "FUSE_FS"]


def log(msg: str) -> None:
    print(f"kernel: {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, cwd: str | None = None, quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=True, text=True,
                          capture_output=quiet, **kw)


def ensure_packages() -> None:
    missing = [p for p in APT if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if missing:
        log(f"apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        sh("apt-get", "install", "-y", "-qq", *missing, env=env, quiet=True)


def prepare() -> None:
    """Unpack the source once and commit it as the base of a git tree."""
    ensure_packages()
    if os.path.isdir(os.path.join(TREE, ".git")):
        return
    os.makedirs(CACHE, exist_ok=True)
    log(f"unpacking {TARBALL} into {CACHE}")
    sh("tar", "-xf", TARBALL, "-C", CACHE)
    git = ["git", "-c", "user.name=handover", "-c", "user.email=handover@example.invalid"]
    sh("git", "init", "-q", ".", cwd=TREE)
    # Debian's .gitignore ignores the whole top level: add everything by force
    sh("git", "add", "-f", ".", cwd=TREE, quiet=True)
    sh(*git, "commit", "-q", "-m", "base: Debian linux-source-6.12", cwd=TREE)
    sh("git", "tag", "handover-base", cwd=TREE)


def version() -> str:
    v = {}
    with open(os.path.join(TREE, "Makefile")) as f:
        for line in f:
            for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL"):
                if line.startswith(f"{k} ="):
                    v[k] = line.split("=", 1)[1].strip()
    return f"{v['VERSION']}.{v['PATCHLEVEL']}.{v['SUBLEVEL']}"


def series() -> list[str]:
    with open(os.path.join(PATCHES, "series")) as f:
        return [os.path.join(PATCHES, ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")]


def base_rev() -> str:
    return subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=TREE, check=True,
                          capture_output=True, text=True).stdout.split()[0]


def apply(check_only: bool = False) -> None:
    """Reset the tree to base and apply the series (the tree keeps file mtimes of unchanged
    files, so make rebuilds only what the series touches)."""
    base = base_rev()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=TREE, capture_output=True, text=True).stdout.strip()
    if head != base:
        sh("git", "checkout", "-q", "-f", base, cwd=TREE)
    # drop files the series added last time, keep everything else untouched
    sh("git", "reset", "-q", "--hard", base, cwd=TREE)
    # the files the series creates (untracked, and ignored by Debian's .gitignore: -x)
    created = []
    for p in series():
        with open(p) as f:
            created += [ln.split(" b/", 1)[1].strip() for ln in f if ln.startswith("diff --git ")]
    created = [c for c in created if not subprocess.run(
        ["git", "ls-files", "--error-unmatch", c], cwd=TREE, capture_output=True).returncode == 0]
    if created:
        sh("git", "clean", "-f", "-q", "-x", "--", *created, cwd=TREE)
    for p in series():
        sh("git", "apply", "--check", p, cwd=TREE)
        if not check_only:
            sh("git", "apply", p, cwd=TREE)
    log(f"series {'applies' if check_only else 'applied'} cleanly to {version()} ({len(series())} patches)")


def configure() -> None:
    os.makedirs(BUILD, exist_ok=True)
    cfg = os.path.join(BUILD, ".config")
    if not os.path.exists(cfg):
        sh("make", f"O={BUILD}", "-s", "x86_64_defconfig", cwd=TREE, quiet=True)
        sh("make", f"O={BUILD}", "-s", "kvm_guest.config", cwd=TREE, quiet=True)
    args = []
    for o in CONFIG_ON:
        args += ["-e", o]
    for o in CONFIG_OFF:
        args += ["-d", o]
    sh(os.path.join(TREE, "scripts", "config"), "--file", cfg, *args)
    sh("make", f"O={BUILD}", "-s", "olddefconfig", cwd=TREE, quiet=True)
    with open(cfg) as f:
        text = f.read()
    for o in CONFIG_ON:
        if f"CONFIG_{o}=y" not in text:
            raise SystemExit(f"kernel: CONFIG_{o} did not stick in {cfg}")


def build(jobs: int) -> dict:
    prepare()
    apply()
    configure()
    t = time.time()
    cc = "ccache gcc" if shutil.which("ccache") else "gcc"
    log(f"make -j{jobs} bzImage in {BUILD} (CC={cc}); a cold build takes 15-25 minutes")
    logf = os.path.join(CACHE, "build.log")
    with open(logf, "w") as f:
        r = subprocess.run(["make", f"O={BUILD}", f"CC={cc}", f"-j{jobs}", "bzImage"], cwd=TREE,
                           stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        with open(logf) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"kernel: build failed (log {logf}):\n{tail}")
    out = paths()
    out["build_seconds"] = round(time.time() - t, 1)
    log(f"built {out['bzImage']} in {out['build_seconds']} s")
    return out


def paths() -> dict:
    return {"tree": TREE, "build": BUILD, "bzImage": os.path.join(BUILD, "arch/x86/boot/bzImage"),
            "vmlinux": os.path.join(BUILD, "vmlinux"), "base_version": BASE_VERSION,
            "patches": series()}


def built() -> dict | None:
    """Paths of an existing build whose bzImage is newer than every patch, else None."""
    p = paths()
    if not os.path.exists(p["bzImage"]):
        return None
    newest = max(os.path.getmtime(x) for x in series() + glob.glob(os.path.join(PATCHES, "series")))
    return p if os.path.getmtime(p["bzImage"]) >= newest else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("cmd", choices=["build", "check", "paths"])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    if a.cmd == "paths":
        print(paths())
    elif a.cmd == "check":
        prepare()
        apply(check_only=True)
    else:
        import json

        print(json.dumps(build(a.jobs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
