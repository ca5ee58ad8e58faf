"""QEMU (TCG) + emulated VT-d + pmem + kexec lab for handover system tests.

Everything that is downloaded or built lives in a cache outside the repository:
``$HANDOVER_LAB_CACHE`` (default ``~/.cache/handover-lab``).  See tests/system/README.md.

Python API (what tests call)::

    from tests.system import lab
    res = lab.run_guest(
        ["dd if=/dev/urandom of=/dev/pmem0 bs=4k count=1; md5sum /dev/pmem0",   # phase 1
         "cat /proc/cmdline"],                                                   # phase 2 (after kexec)
        pmem="legacy",            # or "nvdimm" or None
        timeout=300)
    res.check()                   # raises LabError unless every phase ran and exited 0
    print(res.phases[1].stdout, res.timings)

CLI: ``python -m tests.system.lab {setup,build,run,shell,timings} ...`` (``--help``).

Guest conventions (see guest_init.sh): phase N runs ``/payload/lab/phaseN.sh`` under busybox
``sh`` with ``cd /payload``; env ``LAB_PHASE``, ``LAB_PAYLOAD=/payload`` and ``LAB_OUT`` (a
directory; everything put there comes back as ``PhaseResult.files``).  ``python3`` (Debian's
3.11) with ``handover``, construct, click, msgpack, crcmod, google_crc32c and elftools is on
PATH, as are busybox, kexec, ndctl, daxctl.  Modules for pmem/dax/nfit/vfio/virtio/e1000e are
loaded before the script runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from handover import initramfs as _rt

# --------------------------------------------------------------------------------------
# Configuration (the single place for package lists, module lists, machine layout)
# --------------------------------------------------------------------------------------

#: Debian packages the lab needs on the host, with one file each that proves it installed.
HOST_PACKAGES = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "kexec-tools": "/sbin/kexec",
    "busybox-static": "/bin/busybox",
    "cpio": "/usr/bin/cpio",
    "zstd": "/usr/bin/zstd",
    "ndctl": "/usr/bin/ndctl",
    "daxctl": "/usr/bin/daxctl",
    "kmod": "/sbin/depmod",
    "python3.11": "/usr/bin/python3.11",
    "xz-utils": "/usr/bin/xz",
}

#: Kernel modules loaded (with their modules.dep dependencies) at guest boot, in this order.
GUEST_MODULES = [
    "virtio_blk", "e1000e",
    "libnvdimm", "nd_pmem", "nd_e820", "nfit", "nd_btt",
    "dax", "device_dax", "dax_pmem",
    "vfio", "vfio_iommu_type1", "vfio_pci",
]

#: Host binaries copied into the guest (plus every shared library ldd names for them).
GUEST_BINARIES = ["/sbin/kexec", "/usr/bin/ndctl", "/usr/bin/daxctl", "/usr/bin/python3.11",
                  "/usr/bin/zstd"]  # zstd: handover reads the Handover note of a zstd bzImage

#: Python in the guest: the same runtime the initramfs integrations install
#: (handover/initramfs.py: interpreter, trimmed stdlib, handover's dependencies).
GUEST_PY_PACKAGES = _rt.PY_PACKAGES
GUEST_PY_OPTIONAL = _rt.PY_OPTIONAL
GUEST_PYTHON = _rt.PYTHON
GUEST_STDLIB = _rt.STDLIB
STDLIB_EXCLUDE = _rt.STDLIB_EXCLUDE
LIB_DYNLOAD_EXCLUDE_RE = _rt.LIB_DYNLOAD_EXCLUDE_RE

#: Legacy pmem carve-out used by pmem="legacy" (64 MiB at 768 MiB; guest RAM is 1 GiB).
LEGACY_PMEM_MEMMAP = "memmap=64M!0x30000000"
LEGACY_PMEM_START = 0x30000000
LEGACY_PMEM_SIZE = 64 << 20

BASE_CMDLINE = "console=ttyS0,115200 panic=1 oops=panic loglevel=4 rdinit=/init"
DEFAULT_TIMEOUT = 300.0
RESULT_SLOT_MB = 32

#: Bump when guest_init.sh or the initramfs layout changes (part of the cache key).
BUILD_FORMAT = 3

#: Guest shell snippet (prepend it to a script): ``hstatus`` prints what a patched kernel says
#: in /sys/kernel/handover/ as ``key: value`` lines. A kernel of the first series has one
#: multi-line ``status`` file: printed as it is. The current one has one value per file:
#: a line for each non-empty file of HSTATUS_KEYS, then one line per keepalive device,
#: ``device: <bdf> <state>[ adopted domain=<n>][ (<reason>)]``. Exit 1 (and a line saying
#: so) without /sys/kernel/handover (``HSTATUS_DIR``: another directory, for tests). Parse the
#: text with ``parse_hstatus``.
HSTATUS_KEYS = ("state", "reason", "region", "error", "generation", "format", "reserved_ranges",
                "reserved_bytes", "ir_tables_kept", "root_tables_kept")
HSTATUS = r"""
hstatus() {
    _hd=${HSTATUS_DIR:-/sys/kernel/handover}
    if [ -f $_hd/status ]; then cat $_hd/status; return; fi
    [ -d $_hd ] || { echo "no $_hd"; return 1; }
    for _hk in KEYS; do
        [ -f $_hd/$_hk ] || continue
        _hv=$(cat $_hd/$_hk 2>/dev/null)
        [ -n "$_hv" ] && echo "$_hk: $_hv"
    done
    for _hdev in $_hd/devices/*; do
        [ -d "$_hdev" ] || continue
        _hl="device: ${_hdev##*/} $(cat $_hdev/state 2>/dev/null)"
        _hv=$(cat $_hdev/domain 2>/dev/null)
        [ -n "$_hv" ] && _hl="$_hl adopted domain=$_hv"
        _hv=$(cat $_hdev/reason 2>/dev/null)
        [ -n "$_hv" ] && _hl="$_hl ($_hv)"
        echo "$_hl"
    done
    return 0
}
""".replace("KEYS", " ".join(HSTATUS_KEYS))


def parse_hstatus(text: str) -> dict:
    """``hstatus`` output -> {key: value} (device lines: the last one under "device"; use
    the text for those)."""
    return dict(ln.split(": ", 1) for ln in text.splitlines() if ": " in ln)


HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MARK_RE = re.compile(r"@@LAB ([A-Z-]+)(.*)")


class LabError(RuntimeError):
    """The lab itself failed (build, boot, guest script) in a way a test should report."""


class LabUnavailable(LabError):
    """The host cannot run the lab at all (QEMU cannot be installed)."""


class LabTimeout(LabError):
    """The guest did not finish in time and was killed."""


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


class _Step:
    """Context manager that reports how long a step took (stderr) and records it."""

    def __init__(self, name: str, sink: dict | None = None):
        self.name, self.sink = name, sink

    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        dt = time.monotonic() - self.t0
        if self.sink is not None:
            self.sink[self.name] = round(dt, 3)
        log(f"{self.name}: {dt:.2f} s")


def cache_dir() -> Path:
    d = Path(os.environ.get("HANDOVER_LAB_CACHE") or Path.home() / ".cache" / "handover-lab")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def _apt_env() -> dict:
    return dict(os.environ, DEBIAN_FRONTEND="noninteractive")


# --------------------------------------------------------------------------------------
# Host packages
# --------------------------------------------------------------------------------------

def ensure_host_packages(packages: dict | None = None) -> None:
    """apt-get install whatever of HOST_PACKAGES (or ``packages``, {package: a file it
    installs}) is missing.  Raises LabUnavailable."""
    packages = HOST_PACKAGES if packages is None else packages
    missing = [p for p, f in packages.items() if not os.path.exists(f)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise LabUnavailable(f"missing packages {missing} and cannot apt-get install them")
    with _Step(f"apt-get install {' '.join(missing)}"):
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
        r = subprocess.run(cmd, env=_apt_env(), capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=_apt_env(), capture_output=True)
            r = subprocess.run(cmd, env=_apt_env(), capture_output=True, text=True)
    still = [p for p, f in packages.items() if not os.path.exists(f)]
    if still:
        raise LabUnavailable(f"apt-get could not install {still}: {r.stderr[-2000:]}")


# --------------------------------------------------------------------------------------
# Guest kernel (Debian's stock linux-image-6.12.N+deb12-amd64, unpacked, never installed)
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kernel:
    version: str          # uname -r, e.g. "6.12.117+deb12-amd64"
    root: Path            # dpkg -x tree
    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.version}"
    @property
    def config(self) -> Path:
        return self.root / "boot" / f"config-{self.version}"
    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def _kver_key(v: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"[.+-]", v)]


def fetch_kernel(version: str | None = None) -> Kernel:
    """Return the cached Debian 6.12 kernel, downloading it (apt-get download + dpkg -x) if needed.

    ``version`` (or env HANDOVER_LAB_KERNEL) pins ``6.12.N+deb12-amd64``; otherwise the newest
    already cached is used, and if none is, the newest that apt-cache knows.
    """
    version = version or os.environ.get("HANDOVER_LAB_KERNEL")
    kroot = cache_dir() / "kernel"
    kroot.mkdir(exist_ok=True)
    if not version:
        cached = [p.name for p in kroot.iterdir() if (p / ".complete").exists()]
        if cached:
            version = max(cached, key=_kver_key)
    if not version:
        pat = r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$"
        out = _run(["apt-cache", "search", pat], capture_output=True, text=True).stdout
        if not out.strip():
            _run(["apt-get", "update", "-q"], env=_apt_env(), capture_output=True)
            out = _run(["apt-cache", "search", pat], capture_output=True, text=True).stdout
        names = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
        if not names:
            raise LabUnavailable("apt-cache knows no linux-image-6.12.N+deb12-amd64")
        version = max((n[len("linux-image-"):] for n in names), key=_kver_key)
    k = Kernel(version, kroot / version)
    if (k.root / ".complete").exists():
        return k
    with _Step(f"fetch kernel {version}"):
        shutil.rmtree(k.root, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=kroot) as td:
            os.chmod(td, 0o755)  # so that _apt can write into it
            _run(["apt-get", "download", "-q", f"linux-image-{version}"], cwd=td,
                 env=_apt_env(), capture_output=True)
            debs = list(Path(td).glob("*.deb"))
            if not debs:
                raise LabUnavailable(f"apt-get download linux-image-{version} gave no .deb")
            _run(["dpkg-deb", "-x", str(debs[0]), str(k.root)])
        if not k.vmlinuz.exists():
            raise LabError(f"{k.vmlinuz} missing after dpkg -x")
        # the .deb ships no modules.dep (postinst runs depmod); make one for this tree
        _run(["depmod", "-b", str(k.root), version], capture_output=True)
        (k.root / ".complete").write_text(version + "\n")
    return k


# --------------------------------------------------------------------------------------
# Initramfs
# --------------------------------------------------------------------------------------

_ldd = _rt.ldd
_copy_into = _rt.copy_into


def _module_closure(k: Kernel, names) -> list[str]:
    """Module paths (relative to modules dir, as in modules.dep) for ``names`` plus deps,
    dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for ln in (k.modules / "modules.dep").read_text().splitlines():
        mod, _, rest = ln.partition(":")
        deps[mod] = rest.split()
        base = os.path.basename(mod).split(".ko")[0].replace("-", "_")
        by_name[base] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in deps.get(mod, []):
            visit(d)
        order.append(mod)

    builtin = (k.modules / "modules.builtin").read_text() if (k.modules / "modules.builtin").exists() else ""
    for n in names:
        n = n.replace("-", "_")
        if n not in by_name:
            if f"/{n}.ko" in builtin:
                continue
            raise LabError(f"kernel module {n} not found in {k.version}")
        visit(by_name[n])
    return order


def _busybox_links(root: Path) -> None:
    _copy_into(root, "/bin/busybox")
    out = _run(["/bin/busybox", "--list-full"], capture_output=True, text=True).stdout
    for rel in out.split():
        p = root / rel
        if p.exists() or p.is_symlink():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/bin/busybox", p)


def _cpio(root: Path, out: Path, compress: list[str]) -> None:
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


def _tree_hash(paths) -> str:
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


def _base_key(k: Kernel) -> str:
    h = hashlib.sha256()
    h.update(repr((BUILD_FORMAT, k.version, GUEST_MODULES, GUEST_BINARIES, sorted(STDLIB_EXCLUDE),
                   LIB_DYNLOAD_EXCLUDE_RE.pattern)).encode())
    for f in [*GUEST_BINARIES, "/bin/busybox"]:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update((HERE / "guest_init.sh").read_bytes())
    return h.hexdigest()[:16]


_DECOMPRESS = {".xz": ["xz", "-dc"], ".zst": ["zstd", "-dcq"], ".gz": ["gzip", "-dc"]}


def _install_modules(root: Path, k: Kernel) -> list[str]:
    """GUEST_MODULES of ``k`` and their modules.dep closure into ``root``/lib/modules/<version>,
    decompressed (busybox insmod takes plain .ko), with a modules.dep of their own (depmod, for
    modprobe). Returns the load list: paths relative to that directory, dependencies first."""
    mdst = root / "lib" / "modules" / k.version
    mdst.mkdir(parents=True, exist_ok=True)
    loads = []
    for rel in _module_closure(k, GUEST_MODULES):
        src = k.modules / rel
        suffix = next((x for x in _DECOMPRESS if rel.endswith(x)), "")
        plain = rel[:-len(suffix)] if suffix else rel
        (mdst / plain).parent.mkdir(parents=True, exist_ok=True)
        if suffix:
            with open(mdst / plain, "wb") as f:
                _run([*_DECOMPRESS[suffix], str(src)], stdout=f)
        else:
            shutil.copy2(src, mdst / plain)
        loads.append(plain)
    for extra in ["modules.builtin", "modules.builtin.modinfo", "modules.order"]:
        if (k.modules / extra).exists():
            shutil.copy2(k.modules / extra, mdst / extra)
    _run(["depmod", "-b", str(root), k.version], capture_output=True)
    return loads


def _modules_key(k: Kernel) -> str:
    """Cache key of ``k``'s module cpio: the module list, modules.dep and every module of the
    closure (size and mtime: a rebuild of the kernel changes them)."""
    h = hashlib.sha256()
    h.update(repr((BUILD_FORMAT, k.version, GUEST_MODULES)).encode())
    h.update((k.modules / "modules.dep").read_bytes())
    for rel in _module_closure(k, GUEST_MODULES):
        st = os.stat(k.modules / rel)
        h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_modules_cpio(k: Kernel, force: bool = False, timings: dict | None = None) -> Path:
    """An extra initramfs archive (cached) with the guest modules of another kernel ``k``
    (e.g. the patched kernel's Debian-config build: ``Kernel(release, mod_root)``, an
    installed tree with lib/modules/<release>/modules.dep; it needs no boot/vmlinuz):
    /lib/modules/<release>/... and the load list /etc/lab/modules.load.<release>, which
    guest_init.sh prefers to /etc/lab/modules.load when ``uname -r`` is <release>.
    Linux unpacks concatenated archives as one initramfs: build_initramfs appends it."""
    if not (k.modules / "modules.dep").exists():
        raise LabError(f"{k.modules}/modules.dep missing: not an installed module tree")
    out = cache_dir() / "initramfs" / f"modules-{k.version}-{_modules_key(k)}.cpio.zst"
    if out.exists() and not force:
        return out
    out.parent.mkdir(exist_ok=True)
    with _Step(f"build module archive for {k.version}", timings), \
            tempfile.TemporaryDirectory(dir=out.parent) as td:
        root = Path(td) / "root"
        loads = _install_modules(root, k)
        (root / "etc" / "lab").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "lab" / f"modules.load.{k.version}").write_text("\n".join(loads) + "\n")
        _cpio(root, out, ["zstd", "-3", "-T0", "-q", "-c"])
    log(f"module archive {out.name}: {out.stat().st_size / 1e6:.1f} MB")
    return out


def module_names(k: Kernel) -> list[str]:
    """Names (as in /proc/modules) of the loadable modules the guest loads for ``k``."""
    return [os.path.basename(m).split(".ko")[0].replace("-", "_")
            for m in _module_closure(k, GUEST_MODULES)]


def build_base_initramfs(k: Kernel, force: bool = False, timings: dict | None = None) -> Path:
    """busybox + modules + kexec/ndctl/daxctl + Python 3.11 and trimmed stdlib (cached)."""
    out = cache_dir() / "initramfs" / f"base-{k.version}-{_base_key(k)}.cpio.zst"
    if out.exists() and not force:
        return out
    out.parent.mkdir(exist_ok=True)
    with _Step("build base initramfs", timings), tempfile.TemporaryDirectory(dir=out.parent) as td:
        root = Path(td) / "root"
        for d in ["proc", "sys", "dev", "tmp", "run", "payload", "root", "etc/lab", "lab", "mnt"]:
            (root / d).mkdir(parents=True, exist_ok=True)
        _busybox_links(root)
        shutil.copy(HERE / "guest_init.sh", root / "init")
        os.chmod(root / "init", 0o755)
        # kernel modules, decompressed (busybox insmod takes plain .ko)
        loads = _install_modules(root, k)
        (root / "etc/lab/modules.load").write_text("\n".join(loads) + "\n")
        # binaries + stdlib + shared libraries
        for b in GUEST_BINARIES:
            p = root / b.lstrip("/")
            if p.is_symlink():
                p.unlink()
            _copy_into(root, b)
        for lib in _ldd(GUEST_BINARIES):
            _copy_into(root, lib, overwrite=False)
        _rt.install_python(root, GUEST_PYTHON, GUEST_STDLIB)
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\n")
        _cpio(root, out, ["zstd", "-3", "-T0", "-q", "-c"])
    log(f"base initramfs {out.name}: {out.stat().st_size / 1e6:.1f} MB")
    return out


def build_overlay(force: bool = False, timings: dict | None = None,
                  extra_packages: list[str] | None = None) -> Path:
    """The repo's ``handover`` package + its deps as a small gzip cpio (rebuilt when they change)."""
    try:
        pkgs = _rt.py_packages(extra_packages or ())
    except RuntimeError as e:
        raise LabError(str(e)) from None
    key = _tree_hash(list(pkgs.values()))
    out = cache_dir() / "initramfs" / f"overlay-{key}.cpio.gz"
    if out.exists() and not force:
        return out
    out.parent.mkdir(exist_ok=True)
    with _Step("build handover overlay", timings), tempfile.TemporaryDirectory(dir=out.parent) as td:
        root = Path(td) / "root"
        _rt.install_packages(root, GUEST_PYTHON, extra_packages or ())
        _cpio(root, out, ["gzip", "-1", "-n", "-c"])
    return out


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


# --------------------------------------------------------------------------------------
# Running a guest
# --------------------------------------------------------------------------------------

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

    def extract(self, dest: str | Path, subdir: str = "") -> Path:
        """Extract ``$LAB_OUT/<subdir>`` of this phase to ``dest``, symlinks and empty dirs
        included (``files`` only holds regular files)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        pre = "./files/" + (subdir.strip("/") + "/" if subdir else "")
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

    def missing_modules(self, p: "PhaseResult") -> list:
        """The modules of an extra kernel that phase ``p`` ran on but did not load (else [])."""
        want = self.expected_modules.get(p.release)
        if want is None:
            return []
        if not p.modules_list.endswith(f"modules.load.{p.release}"):
            return list(want)
        return [m for m in want if m not in p.modules] + [
            f"insmod {m}" for m in p.modules_failed]

    def format_timings(self) -> str:
        return "\n".join(f"  {k:32s} {v:7.2f} s" for k, v in self.timings.items())


def _write_payload(path: Path, scripts, files, kernel: Kernel | None, initrd: Path | None,
                   cmdlines: dict, kexec_mode: str) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        def add_bytes(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, int(time.time())
            tar.addfile(ti, io.BytesIO(data))
        for i, s in enumerate(scripts, 1):
            add_bytes(f"lab/phase{i}.sh", s.encode() if isinstance(s, str) else s, 0o755)
        for n, c in cmdlines.items():
            add_bytes(f"lab/cmdline.{n}", c.encode())
        add_bytes("lab/kexec.mode", kexec_mode.encode())
        add_bytes("lab/slot_mb", str(RESULT_SLOT_MB).encode())
        if len(scripts) > 1:
            tar.add(str(kernel.vmlinuz), "lab/vmlinuz")
            tar.add(str(initrd), "lab/initrd.img")
        for name, content in (files or {}).items():
            if isinstance(content, (bytes, bytearray)):
                add_bytes(name, bytes(content))
            elif isinstance(content, str) and not os.path.exists(content):
                add_bytes(name, content.encode())
            else:
                tar.add(str(content), name)
    # pad to a multiple of 512 (virtio-blk sector)
    sz = path.stat().st_size
    if sz % 4096:
        with open(path, "ab") as f:
            f.write(b"\0" * (4096 - sz % 4096))


def _read_results(res_img: Path, nphases: int) -> list[PhaseResult]:
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
                            name = m.name[2:] if m.name.startswith("./") else m.name
                            if name.startswith("files/"):
                                pr.files[name[6:]] = data
                            elif name == "rc":
                                pr.rc = int(data.strip() or -1)
                            elif name == "kexec.rc":
                                pr.kexec_rc = int(data.strip() or -1)
                            else:
                                txt = data.decode(errors="replace")
                                attr = {"stdout": "stdout", "stderr": "stderr", "lab-dmesg.txt": "dmesg",
                                        "lab-cmdline.txt": "cmdline", "kexec.log": "kexec_log"}.get(name)
                                if attr:
                                    setattr(pr, attr, txt)
                                elif name == "lab-release.txt":
                                    pr.release = txt.strip()
                                elif name == "lab-modules.txt":
                                    pr.modules = [ln.split()[0] for ln in txt.splitlines() if ln.strip()]
                                elif name == "lab-modules-load.txt":
                                    lines = [ln for ln in txt.splitlines() if ln.strip()]
                                    pr.modules_list = lines[0] if lines else ""
                                    pr.modules_failed = lines[1:]
                except tarfile.TarError as e:
                    pr.stderr += f"\n[lab] results slot {n} unreadable: {e}"
            out.append(pr)
    return out


class _ConsoleReader(threading.Thread):
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


def _marker_timings(markers, t_qemu_exit: float | None) -> dict:
    """Turn console marker arrival times into named step durations."""
    tm: dict[str, float] = {}
    by = {k: t for k, (t, _up) in index_markers(markers).items()}

    def d(key, a, b):
        if a in by and b in by:
            tm[key] = round(by[b] - by[a], 3)
    if ("INIT", 1) in by:
        tm["qemu start -> /init (phase 1)"] = round(by[("INIT", 1)], 3)
    n = 1
    while ("INIT", n) in by:
        d(f"phase {n}: init -> modules loaded", ("INIT", n), ("MODULES-LOADED", n))
        d(f"phase {n}: modules -> payload", ("MODULES-LOADED", n), ("PAYLOAD", n))
        d(f"phase {n}: script", ("SCRIPT-BEGIN", n), ("SCRIPT-END", n))
        d(f"phase {n}: kexec load", ("KEXEC-LOAD-BEGIN", n), ("KEXEC-LOAD-END", n))
        d(f"phase {n}: write results", ("RESULTS-BEGIN", n), ("RESULTS-END", n))
        d(f"kexec -e -> /init (phase {n + 1})", ("KEXEC-EXEC", n), ("INIT", n + 1))
        n += 1
    if t_qemu_exit is not None:
        tm["qemu total"] = round(t_qemu_exit, 3)
    return tm


def qemu_command(kernel: Kernel, initrd: Path, cmdline: str, payload: Path, results: Path,
                 nvdimm: Path | None = None, nvdimm_size: int = 256 << 20,
                 nvdimm_label_size: int | None = None, memory: str = "1G",
                 cpu: str | None = None, extra_args: list | None = None) -> list:
    machine = "q35,nvdimm=on" if nvdimm else "q35"
    mem = f"{memory},slots=2,maxmem=4G" if nvdimm else memory
    cmd = [
        "qemu-system-x86_64", "-machine", machine, "-accel", "tcg", "-smp", "1", "-m", mem,
        "-device", "intel-iommu,intremap=on",
        "-device", "edu,addr=03.0",
        "-netdev", "user,id=n0,restrict=on", "-device", "e1000e,netdev=n0,addr=04.0",
        "-drive", f"if=none,id=pay,file={payload},format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=pay,iommu_platform=on,disable-legacy=on,addr=05.0",
        "-drive", f"if=none,id=res,file={results},format=raw,cache=writethrough",
        "-device", "virtio-blk-pci,drive=res,iommu_platform=on,disable-legacy=on,addr=06.0",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", cmdline,
        "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
    ]
    if cpu:
        cmd += ["-cpu", cpu]
    if nvdimm:
        dev = "nvdimm,id=nv0,memdev=nvm0"
        if nvdimm_label_size:
            dev += f",label-size={nvdimm_label_size}"
        cmd += ["-object", f"memory-backend-file,id=nvm0,mem-path={nvdimm},size={nvdimm_size},share=on",
                "-device", dev]
    return cmd + list(extra_args or [])


def run_guest(scripts, *, pmem: str | None = "legacy", append: str = "",
              kexec_append: str | None = None, kexec_mode: str = "l",
              files: dict | None = None, nvdimm_file: str | Path | None = None,
              nvdimm_size: int = 256 << 20, nvdimm_label_size: int | None = None,
              memory: str = "1G", cpu: str | None = None, qemu_args: list | None = None,
              timeout: float = DEFAULT_TIMEOUT, workdir: str | Path | None = None,
              echo: bool = False, shell: bool = False,
              kernel: Kernel | None = None, extra_kernels=()) -> GuestResult:
    """Boot the lab guest and run ``scripts`` (a str or a list of str, shell source).

    scripts[0] runs in the first kernel; for each further script the guest init kexecs
    (``kexec -l``; kexec_mode="s": ``kexec -s -l``; kexec_mode="p": ``kexec -p`` then a
    sysrq crash, i.e. a kdump boot, with crashkernel=256M added to the first command line)
    into the same kernel+initrd and runs it.
    pmem: "legacy" (memmap=64M!0x30000000 on every kernel's cmdline), "nvdimm" (QEMU NVDIMM
    backed by ``nvdimm_file``, a fresh file in workdir by default), or None.
    append: extra kernel args for every phase.  kexec_append: extra args for the kexec'd
    phases only (default: same as append).  files: {payload path: bytes | str | host Path},
    visible in the guest under /payload/<path> (cwd of the scripts).
    extra_kernels: Kernel trees (``Kernel(release, mod_root)``: lib/modules/<release> with
    modules.dep; no vmlinuz needed) whose GUEST_MODULES the initrd carries as well, loaded
    by /init when ``uname -r`` is that release; the test puts such a kernel's image for phase
    N at ``files={"lab/vmlinuz.N": ...}``.  check() then also fails a phase that ran on one of
    them without loading its modules.
    Whole run killed after ``timeout`` seconds (LabTimeout).  Results: GuestResult.
    """
    if isinstance(scripts, str):
        scripts = [scripts]
    if shell:
        scripts = scripts or [""]
    timings: dict[str, float] = {}
    extra_kernels = list(extra_kernels or ())
    kernel, initrd = setup(timings, kernel, extra_kernels)
    expected = {x.version: module_names(x) for x in extra_kernels}
    if not workdir:
        _prune_runs()
    wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="run-", dir=cache_dir() / "runs"))
    wd.mkdir(parents=True, exist_ok=True)
    import fcntl
    inuse = open(wd / ".inuse", "a")          # closed (unlocked) when this call returns
    fcntl.flock(inuse, fcntl.LOCK_SH)
    if pmem not in (None, "legacy", "nvdimm"):
        raise ValueError(f"pmem={pmem!r}")
    nv = None
    if pmem == "nvdimm":
        nv = Path(nvdimm_file) if nvdimm_file else wd / "nvdimm.img"
        if not nv.exists() or nv.stat().st_size != nvdimm_size:
            with open(nv, "wb") as f:
                f.truncate(nvdimm_size)
    pm = LEGACY_PMEM_MEMMAP if pmem == "legacy" else ""

    def cmdline(n: int, extra: str) -> str:
        return " ".join(x for x in [BASE_CMDLINE, pm, extra, f"handover.lab.phase={n}",
                                    "handover.lab.shell=1" if shell and n == 1 else ""] if x)
    if kexec_mode not in ("l", "s", "p"):
        raise ValueError(f"kexec_mode={kexec_mode!r}")
    first = cmdline(1, append)
    if kexec_mode == "p" and "crashkernel=" not in first:
        first += " crashkernel=256M"
    cmdlines = {n: cmdline(n, append if kexec_append is None else kexec_append)
                for n in range(2, len(scripts) + 1)}
    payload, results = wd / "payload.tar", wd / "results.img"
    with _Step("write payload", timings):
        _write_payload(payload, scripts, files, kernel, initrd, cmdlines, kexec_mode)
    with open(results, "wb") as f:
        f.truncate(RESULT_SLOT_MB * max(1, len(scripts)) << 20)
    cmd = qemu_command(kernel, initrd, first, payload, results, nv, nvdimm_size,
                       nvdimm_label_size, memory, cpu, qemu_args)
    (wd / "qemu-cmd.txt").write_text(shlex.join(cmd) + "\n")
    log(f"boot: {shlex.join(cmd)}")
    if shell:
        cmd[cmd.index("-serial") + 1] = "mon:stdio"
        del cmd[cmd.index("-monitor"):cmd.index("-monitor") + 2]
        return subprocess.call(cmd)  # type: ignore[return-value]
    try:
        with _guest_lock():
            res = _boot(cmd, wd, scripts, timeout, echo, timings, nv)
            res.expected_modules = expected
            return res
    finally:
        inuse.close()


class _guest_lock:
    """One guest at a time per machine (TCG on 2 shared cores): an flock in the cache dir."""

    def __enter__(self):
        import fcntl
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
        reader = _ConsoleReader(proc.stdout, logf, t0, echo)
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
    timings.update(_marker_timings(reader.markers, t_exit))
    phases = _read_results(wd / "results.img", len(scripts))
    res = GuestResult(phases, "\n".join(reader.lines), cmd, rc, timings, reader.markers, wd, nv)
    log("timings:\n" + res.format_timings())
    return res


def _prune_runs(keep: int = 6) -> None:
    """Keep only the newest ``keep`` automatic work dirs (each holds a ~40 MB payload)."""
    d = cache_dir() / "runs"
    d.mkdir(exist_ok=True)
    import fcntl
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


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.system.lab", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="install host packages, fetch the kernel, build the initramfs")
    b = sub.add_parser("build", help="(re)build the initramfs")
    b.add_argument("--force", action="store_true")
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
        r.add_argument("--file", action="append", default=[], metavar="GUESTPATH=HOSTPATH")
        r.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
        r.add_argument("--workdir")
        r.add_argument("--quiet", action="store_true", help="do not echo the console")
    a = ap.parse_args(argv)
    if a.cmd == "setup":
        k, initrd = setup()
        print(f"kernel {k.version}: {k.vmlinuz}\ninitrd {initrd} ({initrd.stat().st_size / 1e6:.1f} MB)")
        return 0
    if a.cmd == "build":
        ensure_host_packages()
        k = fetch_kernel()
        initrd = build_initramfs(k, force=a.force)
        print(f"initrd {initrd} ({initrd.stat().st_size / 1e6:.1f} MB)")
        return 0
    files = dict(f.split("=", 1) for f in a.file)
    kw = dict(pmem=None if a.pmem == "none" else a.pmem, append=a.append,
              kexec_append=a.kexec_append, kexec_mode=a.kexec_mode, files=files,
              nvdimm_file=a.nvdimm_file, nvdimm_label_size=a.nvdimm_label_size,
              timeout=a.timeout, workdir=a.workdir)
    if a.cmd == "shell":
        return run_guest([], shell=True, **kw)  # type: ignore[return-value]
    scripts = [Path(s).read_text() if os.path.exists(s) else s for s in a.scripts]
    res = run_guest(scripts, echo=not a.quiet, **kw)
    for p in res.phases:
        print(f"=== phase {p.phase} rc={p.rc} ===\n{p.stdout}", end="")
        if p.stderr:
            print(f"--- stderr ---\n{p.stderr}", end="")
    print(f"workdir: {res.workdir}\ntimings:\n{res.format_timings()}")
    return 0 if all(p.rc == 0 for p in res.phases) else 1


if __name__ == "__main__":
    sys.exit(_main())
