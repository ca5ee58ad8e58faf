"""The lab's Debian root file system (``RunOptions(rootfs="debian")``): a Debian 12 (bookworm)
tree made once with debootstrap (systemd, python3, kexec-tools, ndctl, pciutils, QEMU, and
the handover tool's dependencies), as an ext4 image cached under
``$CACHE/rootfs/debian-<key>.img`` and keyed by what it is made of (the package lists, the
Python packages copied from the interpreter running the lab, ``ROOTFS_FORMAT``). Each run
boots a qcow2 overlay of it (``overlay``), so the cached image stays clean.

Only Debian packages are in the image: the lab's own guest logic (the phase unit and the
phase code, ``guest_phase.sh``) comes from the initrd, and the ``handover`` package from the
payload, on every boot; a change to either rebuilds nothing here.

Boot: the lab's initrd (guest_init.sh) sees ``handover.lab.rootfs=<slot>``, loads the guest
modules and ext4, mounts the disk, installs the phase unit, the modules and the phase code
into it and switch_roots to systemd (/sbin/init), which starts ``lab-phase.service``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from handover import initramfs as _rt

from .base import LabError, LabUnavailable, Step, apt_env, ensure_host_packages, log, run
from .config import cache_dir

#: the Debian release and the debootstrap variant
SUITE = "bookworm"
VARIANT = "minbase"
#: Debian packages in the image (debootstrap --include; Depends only, no Recommends)
ROOTFS_PACKAGES = [
    "systemd", "systemd-sysv", "udev", "kmod", "procps", "python3", "kexec-tools", "ndctl",
    "daxctl", "pciutils", "zstd",
    # handover's dependencies that bookworm packages in versions handover works with
    "python3-msgpack", "python3-crcmod",
    # the VMM: Debian's QEMU for its libraries and firmware (the patched binary comes in the
    # payload)
    "qemu-system-x86",
]
#: handover's dependencies bookworm lacks or has too old (construct 2.10.68, pyproject pins
#: 2.10.70; pyelftools 0.29 < 0.31; no google-crc32c; click 8.1.3 has no
#: click.exceptions.NoArgsIsHelpError, which handover/cli uses: click 8.2; no qemu.qmp, which
#: handover vm uses: "qemu" is its namespace package, one directory): copied from the
#: interpreter running the lab (the same versions the tests use), into PY_SITE
VENDORED_PY = ["construct", "google_crc32c", "elftools", "click", "qemu"]
PY_SITE = "/usr/local/lib/python3.11/dist-packages"
#: the size of the (sparse) ext4 image; the root file system's label
IMAGE_SIZE = "3G"
LABEL = "labroot"
#: units that only slow a lab boot (or write to its console): masked
MASKED_UNITS = ["serial-getty@ttyS0.service", "getty@tty1.service", "apt-daily.timer",
                "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
                "systemd-timesyncd.service", "man-db.timer", "dpkg-db-backup.timer",
                "getty-static.service", "e2scrub_reap.service",
                # exits 250 without NVDIMMs after seconds of CPU under TCG
                "ndctl-monitor.service"]
#: bump when the image's layout (what build() does beyond debootstrap) changes
ROOTFS_FORMAT = 1
#: host packages the build needs
BUILD_PACKAGES = {"debootstrap": "/usr/sbin/debootstrap", "qemu-utils": "/usr/bin/qemu-img",
                  "e2fsprogs": "/sbin/mkfs.ext4"}
KINDS = ("debian",)


def mirror() -> str:
    """The Debian mirror the host's apt uses (the first ``URIs:`` of a deb822 source, or
    ``deb`` line, that serves ``SUITE``), else deb.debian.org."""
    srcs = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for f in srcs:
        for stanza in f.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if ("deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split()
                    and "security" not in fields.get("URIs", "")):
                return fields["URIs"].split()[0]
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for f in lists:
        if f.exists():
            m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{SUITE}\s", f.read_text(), re.M)
            if m and "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def _vendored() -> dict[str, Path]:
    pkgs = {}
    for n in VENDORED_PY:
        p = _rt.find_py_package(n)
        if p is None or not p.is_dir():
            raise LabError(f"python package {n} is not importable by the lab's interpreter"
                           + (f" (found the module {p} instead: a directory on sys.path "
                              f"shadows it)" if p else ""))
        pkgs[n] = p
        libs = p.parent / (p.name + ".libs")
        if libs.is_dir():
            pkgs[libs.name] = libs
    return pkgs


def image_key() -> str:
    """What the image is made of: the suite, variant, package lists, masked units, the
    vendored Python packages (their files) and ROOTFS_FORMAT."""
    from .initramfs import tree_hash
    h = hashlib.sha256()
    h.update(repr((ROOTFS_FORMAT, SUITE, VARIANT, ROOTFS_PACKAGES, VENDORED_PY, PY_SITE,
                   IMAGE_SIZE, LABEL, MASKED_UNITS)).encode())
    h.update(tree_hash(list(_vendored().values())).encode())
    return h.hexdigest()[:16]


def image_path(kind: str = "debian") -> Path:
    if kind not in KINDS:
        raise LabError(f"unknown rootfs {kind!r} (one of {', '.join(KINDS)})")
    return cache_dir() / "rootfs" / f"{kind}-{image_key()}.img"


def build(kind: str = "debian", force: bool = False, timings: dict | None = None) -> Path:
    """The cached ext4 image of the root file system ``kind`` (built if missing or
    ``force``). Raises LabUnavailable when debootstrap cannot run (not root, no mirror)."""
    out = image_path(kind)
    if out.exists() and not force:
        return out
    if os.geteuid() != 0:
        raise LabUnavailable("building the lab rootfs needs root (debootstrap)")
    ensure_host_packages(BUILD_PACKAGES)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".build.lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)       # another build of the same image: wait for it
        if out.exists() and not force:
            return out
        with tempfile.TemporaryDirectory(dir=out.parent, prefix="build-") as td:
            root = Path(td) / "root"
            url = mirror()
            with Step(f"debootstrap {SUITE} ({len(ROOTFS_PACKAGES)} packages) from {url}", timings):
                r = subprocess.run(
                    ["nice", "-n", "19", "debootstrap", f"--variant={VARIANT}",
                     "--include=" + ",".join(ROOTFS_PACKAGES), SUITE, str(root), url],
                    env=apt_env(), capture_output=True, text=True)
                (out.parent / f"{out.stem}.debootstrap.log").write_text(r.stdout + r.stderr)
                if r.returncode != 0:
                    raise LabError(f"debootstrap failed (rc {r.returncode}): "
                                   f"{(r.stdout + r.stderr).strip().splitlines()[-1:]}; log "
                                   f"{out.parent / (out.stem + '.debootstrap.log')}")
            configure(root)
            with Step(f"mkfs.ext4 -d ({IMAGE_SIZE})", timings):
                tmp = out.with_suffix(".tmp")
                tmp.unlink(missing_ok=True)
                run(["nice", "-n", "19", "mkfs.ext4", "-q", "-F", "-L", LABEL, "-d", str(root),
                     str(tmp), IMAGE_SIZE], capture_output=True)
                tmp.replace(out)
    # keep the newest two images
    olds = sorted(out.parent.glob(f"{kind}-*.img"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds[2:]:
        old.unlink(missing_ok=True)
    log(f"rootfs {out.name}: {du(out) / 1e6:.0f} MB used of {IMAGE_SIZE}")
    return out


def configure(root: Path) -> None:
    """What a host's installer would do after debootstrap, for a lab guest: the fstab, the
    host name, no root password, masked units that only slow a boot, the vendored Python
    packages, an empty apt cache."""
    (root / "etc/fstab").write_text(f"LABEL={LABEL} / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("lab\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 lab\n")
    run(["chroot", str(root), "passwd", "-d", "root"], capture_output=True)
    mdir = root / "etc/systemd/system"
    mdir.mkdir(parents=True, exist_ok=True)
    for u in MASKED_UNITS:
        p = mdir / u
        p.unlink(missing_ok=True)
        os.symlink("/dev/null", p)
    site = root / PY_SITE.lstrip("/")
    site.mkdir(parents=True, exist_ok=True)
    ign = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")
    for p in _vendored().values():
        if p.is_dir():
            shutil.copytree(p, site / p.name, ignore=ign, dirs_exist_ok=True)
        else:
            shutil.copy2(p, site / p.name)
    run(["chroot", str(root), "python3", "-m", "compileall", "-q", PY_SITE], capture_output=True)
    r = subprocess.run(["chroot", str(root), "python3", "-c",
                        "import construct, click, msgpack, crcmod, google_crc32c, elftools"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"the rootfs's python3 cannot import handover's dependencies: "
                       f"{r.stderr.strip().splitlines()[-1:]}")
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / d).glob("*"):
            if p.is_file():
                p.unlink()


def du(path: Path) -> int:
    """Bytes a sparse file really uses."""
    return path.stat().st_blocks * 512


def overlay(image: Path, dest: Path) -> Path:
    """A fresh qcow2 at ``dest`` whose backing file is ``image`` (raw): a run writes there,
    never into the cached image."""
    ensure_host_packages(BUILD_PACKAGES)
    dest.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image), str(dest)],
        capture_output=True)
    return dest
