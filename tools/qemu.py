#!/usr/bin/env python3
"""Build the patched QEMU (the VMM side): Debian's qemu source package + qemu-patches/.

    python tools/qemu.py source          # apt-get source qemu into the cache, as a git tree
    python tools/qemu.py series-branch   # the patches as commits of a git branch, to edit
    python tools/qemu.py series-export   # git format-patch that branch into qemu-patches/
    python tools/qemu.py build [--jobs N]   # configure + build qemu-system-x86_64 (out of tree)
    python tools/qemu.py check           # the series applies in order; checkpatch.pl on each
    python tools/qemu.py paths           # where things are (nothing is built)

Everything lives outside the repository, in $HANDOVER_QEMU_CACHE (default
~/.cache/handover-qemu): the files ``apt-get source qemu`` downloads (.dsc, .orig and
.debian tarballs), the unpacked tree (Debian's debian/patches applied by dpkg-source, as it
ships) as a git repository whose first commit is tagged ``handover-base``, the series
worktree (branch ``handover``) and the build directory. The series is made on
DEBIAN_VERSION; ``source`` refuses another one (the patches would not apply, or worse,
apply to something else).

The build is the x86_64 system emulator only (``--target-list=x86_64-softmmu``) with what
the lab uses: TCG and KVM, slirp user networking, the monitor (HMP/QMP); no docs, GUI,
audio, tools or guest agent. Every compiler runs under ``nice -n 19`` (the machine's cores
are shared with kernel builds).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(ROOT, "qemu-patches", "patches")
CACHE = os.environ.get("HANDOVER_QEMU_CACHE", os.path.expanduser("~/.cache/handover-qemu"))
#: Debian bookworm's qemu source package the series is made on (dpkg-parsechangelog)
DEBIAN_VERSION = "1:7.2+dfsg-7+deb12u18"
UPSTREAM = "7.2"
TREE = os.path.join(CACHE, "qemu-7.2+dfsg")          # dpkg-source -x's directory
SERIES_WT = os.path.join(CACHE, "series")             # a worktree of TREE on branch `handover`
BUILD = os.path.join(CACHE, "build")
BRANCH = "handover"
BASE_TAG = "handover-base"
#: our own deb-src entry (the machine's Debian entry, with Types: deb-src)
SRC_LIST = "/etc/apt/sources.list.d/handover-deb-src.sources"
#: what the x86_64 system emulator needs (not `apt-get build-dep qemu`: hundreds of packages)
APT = ["dpkg-dev", "build-essential", "git", "ninja-build", "meson", "pkg-config", "python3",
       "python3-venv", "libglib2.0-dev", "libpixman-1-dev", "libslirp-dev", "zlib1g-dev",
       "libfdt-dev"]   # x86_64-softmmu.mak: TARGET_NEED_FDT (microvm; the tarball has no dtc)
NICE = ["nice", "-n", "19"]
#: meson uses ccache when it is installed: a cache of our own, not the kernel builds' one
CCACHE_DIR = os.path.join(CACHE, "ccache")
CONFIGURE = [
    "--target-list=x86_64-softmmu", "--enable-kvm", "--enable-tcg", "--enable-slirp",
    "--disable-docs", "--disable-tools", "--disable-guest-agent", "--disable-gtk",
    "--disable-sdl", "--disable-opengl", "--disable-vnc", "--disable-spice",
    "--disable-curses", "--disable-cocoa", "--disable-virglrenderer", "--disable-alsa",
    "--disable-pa", "--disable-jack", "--disable-oss", "--disable-sndio",
    "--audio-drv-list=", "--disable-xen", "--disable-werror", "--disable-libusb",
    "--disable-usb-redir", "--disable-smartcard", "--disable-gnutls", "--disable-gcrypt",
    "--disable-nettle", "--disable-curl", "--disable-rbd", "--disable-glusterfs",
    "--disable-libiscsi", "--disable-libnfs", "--disable-vde", "--disable-capstone",
    "--disable-debug-info", "--without-default-devices",
    "--with-devices-x86_64=handover",   # DEVICES_NAME
]
#: devices and machines the lab uses, on top of --without-default-devices (Kconfig names)
DEVICES = ["I440FX", "Q35", "VTD", "VFIO_PCI", "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_NET",
           "VIRTIO_SERIAL", "VIRTIO_RNG", "E1000_PCI", "E1000E_PCI_EXPRESS", "EDU", "NVDIMM",
           "SERIAL_ISA", "ISA_DEBUG", "PCIE_PORT", "AHCI_ICH9", "IDE_ISA", "VGA_PCI", "HPET"]
#: the devices file (configs/devices/x86_64-softmmu/<name>.mak of the build tree)
DEVICES_NAME = "handover"


def log(msg: str) -> None:
    print(f"qemu: {msg}", file=sys.stderr, flush=True)


def sh(*cmd: str, cwd: str | None = None, quiet: bool = False, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=True, text=True, capture_output=quiet, **kw)


def _git(*args: str, cwd: str = TREE, **kw) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          **kw).stdout


GIT_ID = ["-c", "user.name=handover developers", "-c", "user.email=handover@example.invalid"]
GIT_ENV = dict(os.environ, GIT_COMMITTER_NAME="handover developers",
               GIT_COMMITTER_EMAIL="handover@example.invalid")


def ensure_packages() -> None:
    missing = [p for p in APT if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if missing:
        log(f"apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env,
           quiet=True)


def _debian_entry() -> str:
    """The machine's Debian archive entry (deb822) with ``Types: deb-src``."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        if path == SRC_LIST:
            continue
        with open(path) as f:
            stanzas = re.split(r"\n\s*\n", f.read())
        for st in stanzas:
            if re.search(r"^URIs:.*/debian/?\s*$", st, re.M) and re.search(r"^Types:.*\bdeb\b", st, re.M):
                return re.sub(r"^Types:.*$", "Types: deb-src", st.strip(), flags=re.M) + "\n"
    if os.path.exists("/etc/apt/sources.list"):     # one-line format
        with open("/etc/apt/sources.list") as f:
            for ln in f:
                m = re.match(r"\s*deb\s+(\[[^]]*\]\s+)?(\S+/debian/?)\s+(\S+)\s+(.*)$", ln)
                if m:
                    return (f"Types: deb-src\nURIs: {m.group(2)}\nSuites: {m.group(3)}\n"
                            f"Components: {m.group(4).strip()}\n")
    raise SystemExit("qemu: no Debian apt source on this machine to copy as deb-src")


def _have_deb_src() -> bool:
    r = subprocess.run(["apt-cache", "showsrc", "qemu"], capture_output=True, text=True)
    return r.returncode == 0 and "Package: qemu" in r.stdout


def ensure_deb_src() -> None:
    if _have_deb_src():
        return
    if not os.path.exists(SRC_LIST):
        with open(SRC_LIST, "w") as f:
            f.write("# handover tools/qemu.py: the source packages of the Debian archive\n")
            f.write(_debian_entry())
        log(f"wrote {SRC_LIST}")
    sh("apt-get", "update", "-qq", env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if not _have_deb_src():
        raise SystemExit(f"qemu: apt-get has no source for qemu even with {SRC_LIST}")


def debian_version(tree: str = TREE) -> str:
    return subprocess.run(["dpkg-parsechangelog", "-S", "Version"], cwd=tree, check=True,
                          capture_output=True, text=True).stdout.strip()


def source() -> str:
    """apt-get source qemu into the cache (once), committed as ``handover-base``."""
    ensure_packages()
    if os.path.isdir(os.path.join(TREE, ".git")):
        return TREE
    ensure_deb_src()
    os.makedirs(CACHE, exist_ok=True)
    dl = os.path.join(CACHE, "debian-source")
    os.makedirs(dl, exist_ok=True)
    ver = DEBIAN_VERSION
    log(f"apt-get source qemu={ver} into {dl}")
    sh("apt-get", "source", "-qq", f"qemu={ver}", cwd=dl, quiet=True)
    unpacked = os.path.join(dl, os.path.basename(TREE))
    have = debian_version(unpacked)
    if have != DEBIAN_VERSION:
        raise SystemExit(f"qemu: apt-get source gave {have}, the series is made on {DEBIAN_VERSION}")
    shutil.move(unpacked, TREE)
    sh("git", "init", "-q", ".", cwd=TREE)
    sh("git", "add", "-f", ".", cwd=TREE, quiet=True)
    sh("git", *GIT_ID, "commit", "-q", "-m",
       f"base: Debian qemu {DEBIAN_VERSION} (dpkg-source -x, debian/patches applied)", cwd=TREE)
    sh("git", "tag", BASE_TAG, cwd=TREE)
    log(f"{TREE}: Debian qemu {have}, tagged {BASE_TAG}")
    return TREE


def series() -> list[str]:
    path = os.path.join(PATCHES, "series")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [os.path.join(PATCHES, ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")]


def _worktree(path: str, branch: str | None) -> None:
    """``path``: a clean worktree of TREE at handover-base (on ``branch``, else detached)."""
    if not os.path.isdir(path):
        _git("worktree", "prune")
        _git("worktree", "add", "-q", "-f", "--detach", path, BASE_TAG)
    subprocess.run(["git", "am", "--abort"], cwd=path, capture_output=True)   # a stale one
    if branch:
        _git("checkout", "-q", "-f", "-B", branch, BASE_TAG, cwd=path)
    else:
        _git("checkout", "-q", "-f", "--detach", BASE_TAG, cwd=path)
    _git("clean", "-f", "-d", "-q", "-x", cwd=path)


def series_branch() -> str:
    """(Re)create branch ``handover`` in the series worktree: handover-base plus every patch
    of qemu-patches/patches as a commit (git am keeps the messages). Edit there, commit
    (rebase -i for earlier patches), then ``series-export``."""
    source()
    _worktree(SERIES_WT, BRANCH)
    if series():
        subprocess.run(["git", "am", "-q", "--keep-cr", *series()], cwd=SERIES_WT, check=True,
                       env=GIT_ENV)
    log(f"branch {BRANCH} in {SERIES_WT}: {len(series())} patches on {BASE_TAG}")
    return SERIES_WT


def series_export() -> list[str]:
    """git format-patch handover-base..handover into qemu-patches/patches (+ series)."""
    tmp = tempfile.mkdtemp()
    _git("format-patch", "-q", "--no-signature", "--zero-commit", "--no-numbered", "-o", tmp,
         f"{BASE_TAG}..{BRANCH}", cwd=SERIES_WT)
    os.makedirs(PATCHES, exist_ok=True)
    for old in glob.glob(os.path.join(PATCHES, "*.patch")):
        os.unlink(old)
    names = []
    for fp in sorted(glob.glob(os.path.join(tmp, "*.patch"))):
        name = os.path.basename(fp)
        shutil.move(fp, os.path.join(PATCHES, name))
        names.append(name)
    with open(os.path.join(PATCHES, "series"), "w") as f:
        f.write(f"# on Debian qemu {DEBIAN_VERSION} (tools/qemu.py); git am in this order\n")
        f.write("".join(n + "\n" for n in names))
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {len(names)} patches to {PATCHES}")
    return names


def apply(path: str) -> None:
    """handover-base plus the series in the worktree ``path`` (detached: git apply, so file
    mtimes of untouched files stay and ninja rebuilds only what the series changes)."""
    source()
    if not os.path.isdir(path):
        _worktree(path, None)
    _git("reset", "-q", "--hard", BASE_TAG, cwd=path)
    _git("clean", "-f", "-d", "-q", "-x", "-e", DEVICES_MAK, cwd=path)
    for p in series():
        r = subprocess.run(["git", "apply", "--index", p], cwd=path, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"qemu: {os.path.basename(p)} does not apply:\n{r.stderr}")


def checkpatch() -> dict:
    """Every patch applies on handover-base in series order (git apply --check, in a scratch
    worktree); QEMU's scripts/checkpatch.pl on each: {patch: {errors, warnings, output}}."""
    source()
    wt = os.path.join(CACHE, "series-check")
    _worktree(wt, None)
    out = {}
    for p in series():
        name = os.path.basename(p)
        r = subprocess.run(["git", "apply", "--index", p], cwd=wt, capture_output=True, text=True)
        if r.returncode:
            out[name] = {"applies": False, "output": r.stderr.strip()}
            log(f"{name}: does NOT apply")
            break
        r = subprocess.run(["perl", os.path.join(TREE, "scripts", "checkpatch.pl"), "--no-color", p],
                           cwd=wt, capture_output=True, text=True)
        m = re.search(r"total: (\d+) errors, (\d+) warnings", r.stdout)
        if not m:
            raise SystemExit(f"qemu: checkpatch gave no verdict on {p}:\n{r.stdout}{r.stderr}")
        e, w = int(m.group(1)), int(m.group(2))
        out[name] = {"applies": True, "errors": e, "warnings": w}
        if e or w:
            out[name]["output"] = r.stdout.strip()
        log(f"{name}: applies, checkpatch {e} errors, {w} warnings")
    return out


def paths() -> dict:
    return {"cache": CACHE, "tree": TREE, "series_worktree": SERIES_WT,
            "build": BUILD, "src": os.path.join(CACHE, "src"),
            "binary": os.path.join(BUILD, "qemu-system-x86_64"),
            "debian_version": DEBIAN_VERSION, "patches": [os.path.basename(p) for p in series()]}


DEVICES_MAK = os.path.join("configs", "devices", "x86_64-softmmu", f"{DEVICES_NAME}.mak")


def _devices_mak(src: str) -> None:
    """--without-default-devices: the machines and devices the lab uses (Kconfig pulls in
    what they select). Written only when it changes (a new mtime makes meson reconfigure)."""
    text = ("# handover tools/qemu.py: the machines and devices the lab uses\n"
            + "".join(f"CONFIG_{d}=y\n" for d in DEVICES))
    mak = os.path.join(src, DEVICES_MAK)
    if os.path.exists(mak):
        with open(mak) as f:
            if f.read() == text:
                return
    with open(mak, "w") as f:
        f.write(text)


def build(jobs: int) -> dict:
    """Apply the series to a build worktree (src/), configure out of tree (build/), ninja."""
    src = os.path.join(CACHE, "src")
    apply(src)
    _devices_mak(src)
    t = time.time()
    logf = os.path.join(CACHE, "build.log")
    os.makedirs(BUILD, exist_ok=True)
    env = dict(os.environ, CCACHE_DIR=CCACHE_DIR)
    with open(logf, "w") as lf:
        stamp = os.path.join(BUILD, "handover-configure.json")
        want = {"args": CONFIGURE, "devices": DEVICES}
        old = None
        if os.path.exists(stamp):
            with open(stamp) as f:
                old = json.load(f)
        if old != want or not os.path.exists(os.path.join(BUILD, "build.ninja")):
            log(f"configure {' '.join(CONFIGURE)}")
            r = subprocess.run([*NICE, os.path.join(src, "configure"), *CONFIGURE], cwd=BUILD,
                               stdout=lf, stderr=subprocess.STDOUT, env=env)
            if r.returncode:
                raise SystemExit(f"qemu: configure failed (log {logf}):\n{_tail(logf)}")
            with open(stamp, "w") as f:
                json.dump(want, f)
        log(f"ninja -j{jobs} qemu-system-x86_64 in {BUILD} (nice -n 19; a cold build takes "
            "10-20 minutes on 2 cores)")
        r = subprocess.run([*NICE, "ninja", f"-j{jobs}", "qemu-system-x86_64"], cwd=BUILD,
                           stdout=lf, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise SystemExit(f"qemu: build failed (log {logf}):\n{_tail(logf)}")
    out = paths()
    out["build_seconds"] = round(time.time() - t, 1)
    with open(os.path.join(BUILD, "handover-build.json"), "w") as f:
        json.dump({"build_seconds": out["build_seconds"], "patches": out["patches"]}, f)
    log(f"built {out['binary']} in {out['build_seconds']} s")
    return out


def _tail(path: str, n: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


def built() -> str | None:
    """The binary of an existing build that is newer than every patch, else None."""
    b = paths()["binary"]
    if not os.path.exists(b):
        return None
    pat = series() + glob.glob(os.path.join(PATCHES, "series"))
    newest = max((os.path.getmtime(x) for x in pat), default=0)
    return b if os.path.getmtime(b) >= newest else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("cmd", choices=["source", "series-branch", "series-export", "build", "check",
                                    "paths"])
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 2))
    a = ap.parse_args()
    if a.cmd == "paths":
        print(json.dumps(paths(), indent=2))
    elif a.cmd == "source":
        print(source())
    elif a.cmd == "series-branch":
        print(series_branch())
    elif a.cmd == "series-export":
        print("\n".join(series_export()))
    elif a.cmd == "check":
        res = checkpatch()
        print(json.dumps(res, indent=1))
        bad = [n for n, r in res.items() if not r["applies"] or r["errors"]]
        if len(res) != len(series()) or bad:
            log(f"check failed: {', '.join(bad) or 'the series stopped applying'}")
            return 1
        log(f"{len(res)} patches apply in order; checkpatch: no errors")
    else:
        print(json.dumps(build(a.jobs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
