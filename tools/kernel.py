#!/usr/bin/env python3
"""Build the patched kernel for the lab: Debian's linux-source-6.12 + kernel-patches/.

    python tools/kernel.py build [--config lab|debian] [--jobs N]   # prints the build's paths
    python tools/kernel.py check                # does the series apply (git apply --check)?
    python tools/kernel.py paths [--config C]   # where things are (nothing is built)
    python tools/kernel.py series-branch        # the patches as commits of a git branch, to edit
    python tools/kernel.py series-export        # git format-patch that branch into kernel-patches/
    python tools/kernel.py checkpatch           # checkpatch.pl --strict on every patch
    python tools/kernel.py check-series [--config C]  # every patch compiles on its own

Everything lives outside the repository, in $HANDOVER_KERNEL_CACHE (default
~/.cache/handover-kernel): the unpacked source as a git tree whose first commit is the
unmodified Debian source (``base``), a separate build directory (O=), and ccache. A cold
build takes ~15-25 minutes on 2 cores; after a patch change ccache and make's dependency
tracking make it a few minutes. Two configurations, each in its own build directory:

``lab``     x86_64_defconfig + kvm_guest.config + what the lab needs (VT-d with debugfs, IR,
            kexec, kdump, pmem/dax, VFIO), everything built in (MODULES off): build/.
``debian``  Debian's own config (/boot/config-* of the linux-image package the lab boots),
            with modules, trimmed by ``make localmodconfig`` to the modules the lab guest
            loads (tests/system/lab.py GUEST_MODULES and their dependencies); Debian's
            built-in choices stay (INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON=y,
            INTEL_IOMMU_DEFAULT_ON unset, VFIO and vfio-pci as modules). Changed: no debug
            info or BTF (build time), no Debian signing certificates (the build signs its
            modules with a key of its own), IOMMU debugfs on (the lab reads the context and
            IR tables from it), LOCALVERSION "-handover". Modules are installed into
            build-debian-root/lib/modules/<release> for the lab's initramfs.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES = os.path.join(ROOT, "kernel-patches", "patches")
CACHE = os.environ.get("HANDOVER_KERNEL_CACHE", os.path.expanduser("~/.cache/handover-kernel"))
TREE = os.path.join(CACHE, "linux-source-6.12")
BUILD = os.path.join(CACHE, "build")        # the lab configuration (kept path)
CONFIGS = ("lab", "debian")
TARBALL = "/usr/src/linux-source-6.12.tar.xz"
BASE_VERSION = "6.12.118"   # Debian bookworm-backports linux-source-6.12 the series is made on
APT = ["linux-source-6.12", "build-essential", "bc", "bison", "flex", "libelf-dev", "libssl-dev",
       "ccache", "cpio", "kmod"]
CONFIG_ON = ["INTEL_IOMMU", "IRQ_REMAP", "IOMMU_DEBUGFS", "INTEL_IOMMU_DEBUGFS", "KEXEC", "KEXEC_FILE",
             "CRASH_DUMP", "X86_PMEM_LEGACY", "LIBNVDIMM", "BLK_DEV_PMEM", "ND_BTT",
             "TRANSPARENT_HUGEPAGE", "FS_DAX", "MEMORY_HOTPLUG", "MEMORY_HOTREMOVE", "ZONE_DEVICE", "DEV_DAX", "DEV_DAX_PMEM", "ACPI_NFIT", "VFIO",
             "VFIO_PCI", "VFIO_IOMMU_TYPE1", "E1000E", "VIRTIO_BLK", "VIRTIO_PCI", "BLK_DEV_INITRD",
             "DEBUG_FS", "DEBUG_INFO_NONE", "PROC_KCORE", "CRC32", "IKCONFIG", "IKCONFIG_PROC",
             "HANDOVER", "EXT4_FS"]   # EXT4_FS: the lab's Debian root file system (rootfs mode)
# what the lab never uses: off, to keep the build near 15 minutes on 2 cores
CONFIG_OFF = ["MODULES", "SOUND", "DRM", "WLAN", "WIRELESS", "CFG80211", "MAC80211", "NFS_FS", "NFSD",
              "NETWORK_FILESYSTEMS", "AGP", "BT", "HAMRADIO", "MEDIA_SUPPORT", "INPUT_JOYSTICK",
              "INPUT_TABLET", "INPUT_TOUCHSCREEN", "FB", "USB_SUPPORT", "HID", "ATA", "MD", "WATCHDOG",
              "HWMON", "THERMAL", "EFI", "CPU_FREQ", "SECURITY_SELINUX", "AUDIT", "XFS_FS",
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
    # the files a series created (untracked, and ignored by Debian's .gitignore: -x); the
    # builds are out of tree (O=), so nothing else in the tree is untracked
    sh("git", "clean", "-f", "-d", "-q", "-x", cwd=TREE)
    for p in series():
        sh("git", "apply", "--check", p, cwd=TREE)
        if not check_only:
            sh("git", "apply", p, cwd=TREE)
    log(f"series {'applies' if check_only else 'applied'} cleanly to {version()} ({len(series())} patches)")


# ---- the series as a git branch: edit, export, check -----------------------------------
SERIES_WT = os.path.join(CACHE, "series")     # a worktree of TREE on branch `handover`
BRANCH = "handover"


def _git(*args: str, cwd: str = SERIES_WT, **kw) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          **kw).stdout


def series_branch() -> str:
    """(Re)create branch `handover` in the series worktree: the base plus every patch of
    kernel-patches/patches as a commit (git am keeps the messages). Edit there, commit
    (rebase -i for earlier patches), then `series-export`."""
    prepare()
    if not os.path.isdir(SERIES_WT):
        _git("worktree", "add", "-q", "-f", "-B", BRANCH, SERIES_WT, "handover-base", cwd=TREE)
    subprocess.run(["git", "am", "--abort"], cwd=SERIES_WT, capture_output=True)  # a stale one
    _git("checkout", "-q", "-f", "-B", BRANCH, "handover-base")
    _git("clean", "-f", "-d", "-q", "-x")
    env = dict(os.environ, GIT_COMMITTER_NAME="handover developers",
               GIT_COMMITTER_EMAIL="handover@example.invalid")
    subprocess.run(["git", "am", "-q", "--keep-cr", *series()], cwd=SERIES_WT, check=True, env=env)
    log(f"branch {BRANCH} in {SERIES_WT}: {len(series())} patches on handover-base")
    return SERIES_WT


def series_export() -> list[str]:
    """git format-patch handover-base..handover into kernel-patches/patches (+ series)."""
    import tempfile

    tmp = tempfile.mkdtemp()
    files = _git("format-patch", "-q", "--no-signature", "--zero-commit", "--no-numbered",
                 "-o", tmp, f"handover-base..{BRANCH}").split() or sorted(
        os.path.join(tmp, f) for f in os.listdir(tmp))
    for old in glob.glob(os.path.join(PATCHES, "*.patch")):
        os.unlink(old)
    names = []
    for fp in sorted(files):
        name = os.path.basename(fp)
        shutil.move(fp, os.path.join(PATCHES, name))
        names.append(name)
    with open(os.path.join(PATCHES, "series"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {len(names)} patches to {PATCHES}")
    return names


def _patch_files(patch: str) -> list[str]:
    with open(patch) as f:
        return [ln.split(" b/", 1)[1].strip() for ln in f if ln.startswith("diff --git ")]


def checkpatch() -> dict:
    """scripts/checkpatch.pl --strict on every patch: {patch: (errors, warnings, checks)}."""
    prepare()
    out = {}
    for p in series():
        r = subprocess.run([os.path.join(TREE, "scripts", "checkpatch.pl"), "--strict",
                            "--no-tree", "--terse", p], capture_output=True, text=True)
        m = re.search(r"total: (\d+) errors, (\d+) warnings, (\d+) checks", r.stdout)
        if not m and r.returncode == 0 and not r.stdout.strip():
            out[os.path.basename(p)] = (0, 0, 0)   # --terse prints nothing for a clean patch
            continue
        if not m:
            raise SystemExit(f"kernel: checkpatch gave no verdict on {p}:\n{r.stdout}{r.stderr}")
        out[os.path.basename(p)] = tuple(int(x) for x in m.groups())
        for ln in r.stdout.splitlines():
            if ": ERROR:" in ln:
                log(ln)
    return out


def check_series(jobs: int, config: str = "lab") -> list[dict]:
    """Every patch compiles on its own: in a worktree of its own (the builds' tree is not
    touched), apply the patches one by one in series order and, after each, build every
    object of a C file the series has touched so far (make's targets for those .o files),
    in a build directory configured like ``config``'s. Returns one entry per patch."""
    prepare()
    wt = os.path.join(CACHE, "series-check")
    bdir = os.path.join(CACHE, f"build-check-{config}")
    if not os.path.isdir(wt):
        _git("worktree", "add", "-q", "-f", "--detach", wt, "handover-base", cwd=TREE)
    _git("checkout", "-q", "-f", "--detach", "handover-base", cwd=wt)
    _git("clean", "-f", "-d", "-q", "-x", cwd=wt)
    os.makedirs(bdir, exist_ok=True)
    src_cfg = os.path.join(build_dir(config), ".config")
    if not os.path.exists(src_cfg):
        configure(config)
    shutil.copyfile(src_cfg, os.path.join(bdir, ".config"))
    cc = "ccache gcc" if shutil.which("ccache") else "gcc"
    mk = ["make", f"O={bdir}", f"CC={cc}", f"-j{jobs}", "-s"]
    results, touched = [], []
    logf = os.path.join(CACHE, f"check-series-{config}.log")
    with open(logf, "w") as lf:
        for p in series():
            t = time.time()
            subprocess.run(["git", "apply", p], cwd=wt, check=True)
            touched += [f for f in _patch_files(p) if f.endswith(".c") and f not in touched]
            objs = [f[:-2] + ".o" for f in touched]
            r = subprocess.run(mk + ["olddefconfig"], cwd=wt, stdout=lf, stderr=subprocess.STDOUT)
            if not r.returncode:
                # the generated headers and tools a single object needs, then the objects
                r = subprocess.run(mk + ["prepare"], cwd=wt, stdout=lf, stderr=subprocess.STDOUT)
            if not r.returncode:
                r = subprocess.run(mk + ["W=1", *objs], cwd=wt, stdout=lf, stderr=subprocess.STDOUT)
            entry = {"patch": os.path.basename(p), "objects": objs, "ok": r.returncode == 0,
                     "seconds": round(time.time() - t, 1)}
            results.append(entry)
            log(f"{entry['patch']}: {'compiles' if entry['ok'] else 'FAILS'} "
                f"({len(objs)} objects, {entry['seconds']} s)")
            if not entry["ok"]:
                lf.flush()
                with open(logf) as f:
                    entry["log_tail"] = f.read()[-3000:]
                break
    return results


def build_dir(config: str = "lab") -> str:
    if config not in CONFIGS:
        raise SystemExit(f"kernel: unknown configuration {config!r} (one of {', '.join(CONFIGS)})")
    return BUILD if config == "lab" else os.path.join(CACHE, f"build-{config}")


def mod_root(config: str) -> str:
    return os.path.join(CACHE, f"build-{config}-root")


# Debian config: what changes, and why (everything else is Debian's choice)
DEBIAN_SET = {"DEBUG_INFO_NONE": "y", "DEBUG_INFO": "n", "DEBUG_INFO_BTF": "n",
              "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT": "n",
              "SYSTEM_TRUSTED_KEYS": '""', "SYSTEM_REVOCATION_KEYS": '""',
              "MODULE_SIG_KEY": '"certs/signing_key.pem"',
              "IOMMU_DEBUGFS": "y", "INTEL_IOMMU_DEBUGFS": "y",
              "LOCALVERSION": '"-handover"', "HANDOVER": "y",
              "EXT4_FS": "m"}   # the lab's Debian root file system (localmodconfig drops it)
# Debian's built-in choices the series must live with: checked after configuration
DEBIAN_KEEP = {"MODULES": "y", "INTEL_IOMMU": "y", "IRQ_REMAP": "y",
               "INTEL_IOMMU_SCALABLE_MODE_DEFAULT_ON": "y", "INTEL_IOMMU_DEFAULT_ON": None,
               "VFIO": "m", "VFIO_PCI": "m", "VFIO_PCI_CORE": "m", "VFIO_IOMMU_TYPE1": "m",
               "DEV_DAX": "m", "X86_PMEM_LEGACY": "m", "HANDOVER": "y"}


def _lab():
    sys.path.insert(0, ROOT)
    from tests.system import lab

    return lab


def _lsmod_file(path: str) -> None:
    """An lsmod listing of the modules the lab guest loads (localmodconfig keeps these)."""
    lab = _lab()
    k = lab.fetch_kernel()
    names = [os.path.basename(m).split(".ko")[0].replace("-", "_")
             for m in lab._module_closure(k, lab.GUEST_MODULES)]
    with open(path, "w") as f:
        f.write("Module                  Size  Used by\n")
        f.writelines(f"{n:<24}0 0\n" for n in names)


def configure_debian(bdir: str) -> None:
    cfg = os.path.join(bdir, ".config")
    if not os.path.exists(cfg):
        k = _lab().fetch_kernel()
        shutil.copyfile(k.config, cfg)
        lsmod = os.path.join(bdir, "lab.lsmod")
        _lsmod_file(lsmod)
        log(f"config: Debian's {os.path.basename(str(k.config))}, localmodconfig against {lsmod}")
        subprocess.run(["make", f"O={bdir}", "-s", f"LSMOD={lsmod}", "localmodconfig"], cwd=TREE,
                       check=True, input="\n" * 2000, text=True, capture_output=True)
    args = []
    for o, v in DEBIAN_SET.items():
        if v == "y":
            args += ["-e", o]
        elif v == "n":
            args += ["-d", o]
        else:
            args += ["--set-val", o, v]
    sh(os.path.join(TREE, "scripts", "config"), "--file", cfg, *args)
    sh("make", f"O={bdir}", "-s", "olddefconfig", cwd=TREE, quiet=True)
    with open(cfg) as f:
        text = f.read()
    for o, v in DEBIAN_KEEP.items():
        have = re.search(rf"^CONFIG_{o}=(.*)$", text, re.M)
        if (have.group(1) if have else None) != v:
            raise SystemExit(f"kernel: CONFIG_{o} is {have.group(1) if have else 'unset'} in {cfg}, "
                             f"want {v or 'unset'}")


def configure(config: str = "lab") -> None:
    bdir = build_dir(config)
    os.makedirs(bdir, exist_ok=True)
    if config == "debian":
        return configure_debian(bdir)
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


def build(jobs: int, config: str = "lab") -> dict:
    prepare()
    apply()
    configure(config)
    bdir = build_dir(config)
    t = time.time()
    cc = "ccache gcc" if shutil.which("ccache") else "gcc"
    targets = ["bzImage"] + (["modules"] if config == "debian" else [])
    log(f"make -j{jobs} {' '.join(targets)} in {bdir} (CC={cc}); a cold build takes 15-45 minutes")
    logf = os.path.join(CACHE, f"build-{config}.log")
    with open(logf, "w") as f:
        r = subprocess.run(["make", f"O={bdir}", f"CC={cc}", f"-j{jobs}", *targets], cwd=TREE,
                           stdout=f, stderr=subprocess.STDOUT)
        if not r.returncode and config == "debian":
            root = mod_root(config)
            shutil.rmtree(root, ignore_errors=True)
            r = subprocess.run(["make", f"O={bdir}", "-s", f"INSTALL_MOD_PATH={root}",
                                "INSTALL_MOD_STRIP=1", "DEPMOD=/sbin/depmod", "modules_install"],
                               cwd=TREE, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        with open(logf) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"kernel: build failed (log {logf}):\n{tail}")
    out = paths(config)
    out["build_seconds"] = round(time.time() - t, 1)
    out.update(sizes(config))
    with open(os.path.join(bdir, "handover-build.json"), "w") as f:
        import json

        json.dump({"build_seconds": out["build_seconds"], **sizes(config)}, f)
    log(f"built {out['bzImage']} in {out['build_seconds']} s")
    return out


def release(config: str = "lab") -> str:
    """uname -r of the build (include/config/kernel.release)."""
    with open(os.path.join(build_dir(config), "include", "config", "kernel.release")) as f:
        return f.read().strip()


def sizes(config: str = "lab") -> dict:
    p = paths(config)
    out = {"bzImage_bytes": os.path.getsize(p["bzImage"])}
    if config == "debian":
        total = n = 0
        for dp, _d, fs in os.walk(p["modules"]):
            for fn in fs:
                if fn.endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz")):
                    total += os.path.getsize(os.path.join(dp, fn))
                    n += 1
        out.update(modules=n, modules_bytes=total)
    return out


def paths(config: str = "lab") -> dict:
    bdir = build_dir(config)
    out = {"config": config, "tree": TREE, "build": bdir,
           "bzImage": os.path.join(bdir, "arch/x86/boot/bzImage"),
           "vmlinux": os.path.join(bdir, "vmlinux"), "base_version": BASE_VERSION,
           "patches": series()}
    if config == "debian" and os.path.exists(os.path.join(bdir, "include/config/kernel.release")):
        out["release"] = release(config)
        out["mod_root"] = mod_root(config)
        out["modules"] = os.path.join(mod_root(config), "lib", "modules", out["release"])
    return out


def built(config: str = "lab") -> dict | None:
    """Paths of an existing build whose bzImage is newer than every patch, else None."""
    p = paths(config)
    if not os.path.exists(p["bzImage"]):
        return None
    if config == "debian" and not os.path.isdir(p.get("modules", "")):
        return None
    newest = max(os.path.getmtime(x) for x in series() + glob.glob(os.path.join(PATCHES, "series")))
    return p if os.path.getmtime(p["bzImage"]) >= newest else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("cmd", choices=["build", "check", "paths", "series-branch", "series-export",
                                    "checkpatch", "check-series"])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--config", choices=CONFIGS, default="lab")
    a = ap.parse_args()
    if a.cmd == "paths":
        print(paths(a.config))
    elif a.cmd == "check":
        prepare()
        apply(check_only=True)
    elif a.cmd == "series-branch":
        print(series_branch())
    elif a.cmd == "series-export":
        print("\n".join(series_export()))
    elif a.cmd == "checkpatch":
        import json

        res = checkpatch()
        print(json.dumps(res, indent=1))
        return 1 if any(e for e, _w, _c in res.values()) else 0
    elif a.cmd == "check-series":
        import json

        res = check_series(a.jobs, a.config)
        print(json.dumps(res, indent=1))
        return 0 if all(r["ok"] for r in res) and len(res) == len(series()) else 1
    else:
        import json

        print(json.dumps(build(a.jobs, a.config), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
