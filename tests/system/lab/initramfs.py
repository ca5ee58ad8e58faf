"""The guest's initrd, from cached parts concatenated (Linux unpacks concatenated archives as
one initramfs):

- the base archive (``base-<kver>-<key>.cpio.zst``): busybox, guest_init.sh as /init, the
  guest modules (decompressed) and their load list, kexec/ndctl/daxctl/zstd, Python 3.11 with
  a trimmed stdlib and the shared libraries of all of them;
- the overlay (``overlay-<hash>.cpio.gz``): the repository's ``handover`` package and its
  dependencies, rebuilt whenever one of their files changes;
- one module archive per extra kernel (``modules-<release>-<key>.cpio.zst``).

Each key covers what the part is made of (config.py's lists, guest_init.sh, the host
binaries, the module files), so the cache is never stale; 4 of each kind are kept.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from handover import initramfs as _rt

from .base import LabError, Step, ensure_host_packages, log, run
from .config import (BUILD_FORMAT, GUEST_BINARIES, GUEST_INIT, GUEST_MODULES, GUEST_PHASE,
                     GUEST_PYTHON, GUEST_STDLIB, GUEST_UNIT, LIB_DYNLOAD_EXCLUDE_RE,
                     ROOTFS_MODULES, STDLIB_EXCLUDE, cache_dir)
from .kernel import Kernel, fetch_kernel, module_closure

ldd = _rt.ldd
copy_into = _rt.copy_into


def busybox_links(root: Path) -> None:
    """/bin/busybox into ``root`` and a link to it for each of its applets."""
    copy_into(root, "/bin/busybox")
    out = run(["/bin/busybox", "--list-full"], capture_output=True, text=True).stdout
    for rel in out.split():
        p = root / rel
        if p.exists() or p.is_symlink():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", p)


def cpio(root: Path, out: Path, compress: list[str]) -> None:
    """A newc cpio of ``root`` (owned by root), piped through ``compress``, to ``out``."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "wb") as f:
        cp = subprocess.Popen(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        zp = subprocess.Popen(compress, stdin=cp.stdout, stdout=f)
        cp.stdout.close()
        cp.stdin.write(("\n".join(files) + "\n").encode())
        cp.stdin.close()
        if cp.wait() != 0 or zp.wait() != 0:
            raise LabError(f"cpio/compress of {root} failed")
    tmp.replace(out)


def tree_hash(paths) -> str:
    """Hash of the files under ``paths`` (names and contents; no bytecode)."""
    h = hashlib.sha256()
    for base in paths:
        base = Path(base)
        items = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for p in items:
            if "__pycache__" in p.parts or p.suffix == ".pyc":
                continue
            h.update(str(p.relative_to(base.parent)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def base_key(k: Kernel) -> str:
    """Cache key of the base archive of ``k``."""
    h = hashlib.sha256()
    h.update(repr((BUILD_FORMAT, k.version, GUEST_MODULES, GUEST_BINARIES, sorted(STDLIB_EXCLUDE),
                   LIB_DYNLOAD_EXCLUDE_RE.pattern)).encode())
    for f in [*GUEST_BINARIES, "/bin/busybox"]:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(repr(ROOTFS_MODULES).encode())
    for f in (GUEST_INIT, GUEST_PHASE, GUEST_UNIT):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


DECOMPRESS = {".xz": ["xz", "-dc"], ".zst": ["zstd", "-dcq"], ".gz": ["gzip", "-dc"]}


def rootfs_modules(k: Kernel) -> list[str]:
    """The modules.dep closure of the ROOTFS_MODULES that ``k`` has as modules, minus those
    GUEST_MODULES already load (paths as in modules.dep, dependencies first)."""
    have = set(module_closure(k, GUEST_MODULES))
    names = [n for n in ROOTFS_MODULES if _has_module(k, n)]
    return [m for m in module_closure(k, names) if m not in have]


def _has_module(k: Kernel, name: str) -> bool:
    dep = (k.modules / "modules.dep").read_text()
    return any(os.path.basename(ln.partition(":")[0]).split(".ko")[0].replace("-", "_") == name
               for ln in dep.splitlines())


def install_modules(root: Path, k: Kernel, extra: list[str] = ()) -> list[str]:
    """GUEST_MODULES of ``k`` and their modules.dep closure (and ``extra``, paths as in
    modules.dep) into ``root``/lib/modules/<version>, decompressed (busybox insmod takes plain
    .ko), with a modules.dep of their own (depmod, for modprobe). Returns the load list of
    the GUEST_MODULES: paths relative to that directory, dependencies first (``extra`` are
    installed, not listed)."""
    mdst = root / "lib" / "modules" / k.version
    mdst.mkdir(parents=True, exist_ok=True)
    loads = []
    guest = module_closure(k, GUEST_MODULES)
    for rel in guest + [m for m in extra if m not in guest]:
        src = k.modules / rel
        suffix = next((x for x in DECOMPRESS if rel.endswith(x)), "")
        plain = rel[:-len(suffix)] if suffix else rel
        (mdst / plain).parent.mkdir(parents=True, exist_ok=True)
        if suffix:
            with open(mdst / plain, "wb") as f:
                run([*DECOMPRESS[suffix], str(src)], stdout=f)
        else:
            shutil.copy2(src, mdst / plain)
        if rel in guest:
            loads.append(plain)
    for extra in ["modules.builtin", "modules.builtin.modinfo", "modules.order"]:
        if (k.modules / extra).exists():
            shutil.copy2(k.modules / extra, mdst / extra)
    run(["depmod", "-b", str(root), k.version], capture_output=True)
    return loads


def modules_key(k: Kernel) -> str:
    """Cache key of ``k``'s module cpio: the module list, modules.dep and every module of the
    closure (size and mtime: a rebuild of the kernel changes them)."""
    h = hashlib.sha256()
    h.update(repr((BUILD_FORMAT, k.version, GUEST_MODULES, ROOTFS_MODULES)).encode())
    h.update((k.modules / "modules.dep").read_bytes())
    for rel in module_closure(k, GUEST_MODULES) + rootfs_modules(k):
        st = os.stat(k.modules / rel)
        h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached_archive(out: Path, force: bool, step: str, timings: dict | None, fill,
                   compress: list[str]) -> Path:
    """``out``, unless it exists (and not ``force``): a cpio of the tree that ``fill(root)``
    makes in a temporary directory, piped through ``compress``."""
    if out.exists() and not force:
        return out
    out.parent.mkdir(exist_ok=True)
    with Step(step, timings), tempfile.TemporaryDirectory(dir=out.parent) as td:
        root = Path(td) / "root"
        fill(root)
        cpio(root, out, compress)
    return out


def _plain(rel: str) -> str:
    """A module's path without its compression suffix (as install_modules writes it)."""
    suffix = next((x for x in DECOMPRESS if rel.endswith(x)), "")
    return rel[:-len(suffix)] if suffix else rel


ZSTD = ["zstd", "-3", "-T0", "-q", "-c"]


def build_modules_cpio(k: Kernel, force: bool = False, timings: dict | None = None) -> Path:
    """An extra initramfs archive (cached) with the guest modules of another kernel ``k``
    (e.g. the patched kernel's Debian-config build: ``Kernel(release, mod_root)``, an
    installed tree with lib/modules/<release>/modules.dep; it needs no boot/vmlinuz):
    /lib/modules/<release>/... and the load list /etc/lab/modules.load.<release>, which
    guest_init.sh prefers to /etc/lab/modules.load when ``uname -r`` is <release>.
    Linux unpacks concatenated archives as one initramfs: build_initramfs appends it."""
    if not (k.modules / "modules.dep").exists():
        raise LabError(f"{k.modules}/modules.dep missing: not an installed module tree")
    out = cache_dir() / "initramfs" / f"modules-{k.version}-{modules_key(k)}.cpio.zst"
    if out.exists() and not force:
        return out

    def fill(root: Path) -> None:
        extra = rootfs_modules(k)
        loads = install_modules(root, k, extra)
        (root / "etc" / "lab").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "lab" / f"modules.load.{k.version}").write_text("\n".join(loads) + "\n")
        # ext4 & co., for a phase of a rootfs run on this kernel
        (root / "etc" / "lab" / f"modules.rootfs.{k.version}").write_text(
            "".join(_plain(m) + "\n" for m in extra))
    cached_archive(out, force, f"build module archive for {k.version}", timings, fill, ZSTD)
    log(f"module archive {out.name}: {out.stat().st_size / 1e6:.1f} MB")
    return out


def build_base_initramfs(k: Kernel, force: bool = False, timings: dict | None = None) -> Path:
    """busybox + modules + kexec/ndctl/daxctl + Python 3.11 and trimmed stdlib (cached)."""
    out = cache_dir() / "initramfs" / f"base-{k.version}-{base_key(k)}.cpio.zst"
    if out.exists() and not force:
        return out

    def fill(root: Path) -> None:
        for d in ["proc", "sys", "dev", "tmp", "run", "payload", "root", "etc/lab", "lab", "mnt"]:
            (root / d).mkdir(parents=True, exist_ok=True)
        busybox_links(root)
        shutil.copy(GUEST_INIT, root / "init")
        os.chmod(root / "init", 0o755)
        (root / "lib/lab").mkdir(parents=True, exist_ok=True)
        shutil.copy(GUEST_PHASE, root / "lib/lab/phase.sh")
        shutil.copy(GUEST_UNIT, root / "lib/lab/lab-phase.service")
        # kernel modules, decompressed (busybox insmod takes plain .ko); ext4 & co. for a
        # root file system in a list of their own
        extra = rootfs_modules(k)
        loads = install_modules(root, k, extra)
        (root / "etc/lab/modules.load").write_text("\n".join(loads) + "\n")
        (root / f"etc/lab/modules.rootfs.{k.version}").write_text(
            "".join(_plain(m) + "\n" for m in extra))
        # binaries + stdlib + shared libraries
        for b in GUEST_BINARIES:
            p = root / b.lstrip("/")
            if p.is_symlink():
                p.unlink()
            copy_into(root, b)
        for lib in ldd(GUEST_BINARIES):
            copy_into(root, lib, overwrite=False)
        _rt.install_python(root, GUEST_PYTHON, GUEST_STDLIB)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
    cached_archive(out, force, "build base initramfs", timings, fill, ZSTD)
    log(f"base initramfs {out.name}: {out.stat().st_size / 1e6:.1f} MB")
    return out


def build_overlay(force: bool = False, timings: dict | None = None,
                  extra_packages: list[str] | None = None) -> Path:
    """The repo's ``handover`` package + its deps as a small gzip cpio (rebuilt when they change)."""
    try:
        pkgs = _rt.py_packages(extra_packages or ())
    except RuntimeError as e:
        raise LabError(str(e)) from None
    key = tree_hash(list(pkgs.values()))
    out = cache_dir() / "initramfs" / f"overlay-{key}.cpio.gz"
    return cached_archive(out, force, "build handover overlay", timings,
                          lambda root: _rt.install_packages(root, GUEST_PYTHON, extra_packages or ()),
                          ["gzip", "-1", "-n", "-c"])


def build_initramfs(kernel: Kernel | None = None, force: bool = False,
                    timings: dict | None = None, extra_kernels=()) -> Path:
    """Return the path of the guest initrd: cached base archive + handover overlay (+ one
    module archive per ``extra_kernels``, see build_modules_cpio), concatenated."""
    k = kernel or fetch_kernel()
    base = build_base_initramfs(k, force, timings)
    ov = build_overlay(force, timings)
    extras = [build_modules_cpio(x, force, timings) for x in extra_kernels or ()]
    name = f"initrd-{base.name.split('.cpio')[0]}-{ov.name.split('.cpio')[0]}"
    if extras:
        name += "-" + hashlib.sha256("".join(e.name for e in extras).encode()).hexdigest()[:12]
    out = cache_dir() / "initramfs" / f"{name}.img"
    if not out.exists() or force:
        tmp = out.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for part in (base, ov, *extras):
                f.write(part.read_bytes())
        tmp.replace(out)
        # keep the cache from growing without bound: drop older combined images
        for pat in ("initrd-*.img", "overlay-*.cpio.gz", "base-*.cpio.zst", "modules-*.cpio.zst"):
            olds = sorted(out.parent.glob(pat), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in olds[4:]:
                if old not in (out, ov, base, *extras):
                    old.unlink(missing_ok=True)
    return out


def setup(timings: dict | None = None, kernel: Kernel | None = None,
          extra_kernels=()) -> tuple[Kernel, Path]:
    """ensure_host_packages + fetch_kernel + build_initramfs.  Returns (kernel, initrd).

    ``kernel``: use this tree (e.g. a self-built one laid out as boot/vmlinuz-<v> and
    lib/modules/<v> with modules.dep) instead of Debian's.  ``extra_kernels``: Kernel trees
    (lib/modules/<release> with modules.dep; no vmlinuz needed) whose modules the initrd
    carries too, for phases that a test kexecs into such a kernel."""
    ensure_host_packages()
    k = kernel or fetch_kernel()
    return k, build_initramfs(k, timings=timings, extra_kernels=extra_kernels)
