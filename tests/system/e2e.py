"""The whole handover cycle in the QEMU lab, with the second kernel's initramfs built by the
REAL initramfs-tools (mkinitramfs) or dracut and our hook / module in it.

First kernel (the lab's own guest init, Debian's stock 6.12): bind edu to vfio-pci, make the
region, ``handover arm --kernel ... --initrd <real initrd> --append 'root=LABEL=horoot ...'``
(save + kexec -l with the current command line, handover.region=phys:..., memmap= again),
then ``handover arm --exec`` (``kexec -e``; the lab saves this phase's results first).
Second kernel: the real initramfs runs our boot script (init-premount / dracut pre-mount),
which runs ``handover load`` and writes /run/handover/{result,boot}.json, then mounts a tiny
ext4 root (a virtio disk at 00:07.0) whose /sbin/init copies /run/handover into the lab's
results disk (slot 2) and powers off: reaching it proves the boot went on to the end.

Used by tests/system/test_initramfs_e2e.py and tests/system/demo_cycle.py (``make demo``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.system import lab

REPO = lab.REPO
INITRAMFS_DIR = REPO / "initramfs"
TOKEN = "8c1f3a52-6b0e-4d7a-9e21-5f4c2b9d7a10"
ROOT_LABEL = "horoot"
STALE_BAR = "0000:00:03.0:0:0xfe000000"

#: Host tools the real initramfs builders need (package: a file it installs).
BUILD_PACKAGES = {
    "initramfs-tools-core": "/usr/sbin/mkinitramfs",
    "dracut-core": "/usr/bin/dracut",
    "e2fsprogs": "/sbin/mke2fs",
    "util-linux": "/usr/bin/unshare",
}

#: initramfs-tools configuration for the test images (Debian's defaults, but MODULES=list
#: with the few drivers the lab machine needs, so that the image is small and builds fast).
INITRAMFS_CONF = "MODULES=list\nBUSYBOX=y\nCOMPRESS=zstd\nCOMPRESSLEVEL=3\nRUNSIZE=10%\n"
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "ext4"]
#: dracut modules of the test images (no systemd in the initrd: the shell init runs hooks).
DRACUT_MODULES = ["base", "udev-rules", "rootfs-block", "kernel-modules"]
#: Extra words for the second kernel: a failing initramfs powers off instead of waiting in
#: a rescue shell (initramfs-tools does that with the lab's panic=1).
NEXT_APPEND = {"initramfs-tools": "", "dracut": "rd.shell=0 rd.emergency=poweroff"}

ROOT_INIT = r"""#!/bin/sh
# end of the boot: the real root's init (a test stand-in for systemd)
PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "@@LAB INIT phase=2 uptime=$(cut -d' ' -f1 /proc/uptime) root-init" > /dev/console
mkdir -p /tmp/out/files
cp -a /run/handover/. /tmp/out/files/ 2>/dev/null
ls -la /run/handover > /tmp/out/stdout 2>&1
dmesg > /tmp/out/lab-dmesg.txt 2>/dev/null
cp /proc/cmdline /tmp/out/lab-cmdline.txt
echo 0 > /tmp/out/rc
(cd /tmp/out && tar -cf /tmp/res.tar .)
for b in /sys/bus/pci/devices/0000:00:06.0/virtio*/block/*; do RES=/dev/${b##*/}; done
echo "@@LAB RESULTS-BEGIN phase=2 uptime=$(cut -d' ' -f1 /proc/uptime)" > /dev/console
dd if=/tmp/res.tar of="$RES" bs=1M seek=SLOT conv=notrunc,fsync 2>/dev/null
sync
echo "@@LAB POWEROFF phase=2 uptime=$(cut -d' ' -f1 /proc/uptime)" > /dev/console
poweroff -f
"""

PHASE1 = r"""
set -eu
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
{region_setup}
python3 -m handover region init {region} --force > /dev/null
python3 -m handover arm --kernel {next_kernel} --initrd /payload/e2e-initrd.img \
    --region {region} --token {token} --pass-token --policy {policy} --kexec-mode {mode} {extra} \
    --append 'root=LABEL={label} rootfstype={fstype} ro {next_append}' --json > "$LAB_OUT/arm.json"
python3 -m handover inspect {region} --limit 3 > "$LAB_OUT/inspect.txt" 2>&1 || true
echo 'python3 -m handover arm --exec' > /lab/exec
"""

REGION_SETUP = {
    "legacy": ("", "/dev/pmem0"),
    "nvdimm": ("ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M > /dev/null", "/dev/dax0.0"),
}


def ensure_tools() -> None:
    lab.ensure_host_packages()
    lab.ensure_host_packages(BUILD_PACKAGES)


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path):
            items = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
            for f in items:
                if "__pycache__" in f.parts:
                    continue
                h.update(str(f).encode() + b"\0" + f.read_bytes())
        else:
            h.update(repr(p).encode())
    return h.hexdigest()[:16]


def _bind_modules_script(k: lab.Kernel, cmd: list[str]) -> list[str]:
    """Run ``cmd`` in a private mount namespace where /lib/modules and /boot are the lab
    kernel's unpacked tree (mkinitramfs has MODULESDIR=/lib/modules/$version hard-wired)."""
    os.makedirs("/lib/modules", exist_ok=True)
    os.makedirs("/boot", exist_ok=True)
    sh = (f"mount --bind {shlex.quote(str(k.root / 'lib/modules'))} /lib/modules && "
          f"mount --bind {shlex.quote(str(k.root / 'boot'))} /boot && exec {shlex.join(cmd)}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", sh]


def _builder_env() -> dict:
    return dict(os.environ, HANDOVER_PYTHON=sys.executable, HANDOVER_REQUIRED="1",
                HANDOVER_BOOT_LIB=str(INITRAMFS_DIR / "handover-boot.sh"))


def build_mkinitramfs(k: lab.Kernel, out: Path, with_hook: bool = True) -> dict:
    """mkinitramfs -d <confdir> with our hook and boot script.  Returns build facts."""
    import time
    with tempfile.TemporaryDirectory() as td:
        conf = Path(td) / "conf"
        (conf / "conf.d").mkdir(parents=True)
        (conf / "initramfs.conf").write_text(INITRAMFS_CONF)
        (conf / "modules").write_text("\n".join(INITRAMFS_MODULES) + "\n")
        for d in ("hooks", "scripts/init-premount"):
            (conf / d).mkdir(parents=True)
        if with_hook:
            shutil.copy2(INITRAMFS_DIR / "initramfs-tools/hooks/handover", conf / "hooks/handover")
            shutil.copy2(INITRAMFS_DIR / "initramfs-tools/scripts/init-premount/handover",
                         conf / "scripts/init-premount/handover")
        t = time.monotonic()
        r = subprocess.run(_bind_modules_script(k, ["mkinitramfs", "-d", str(conf), "-o", str(out),
                                                    k.version]),
                           env=_builder_env(), capture_output=True, text=True)
        dt = time.monotonic() - t
    if r.returncode != 0 or not out.exists():
        raise lab.LabError(f"mkinitramfs failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return {"seconds": round(dt, 2), "bytes": out.stat().st_size, "log": r.stderr}


def _dracut_basedir(td: Path) -> Path:
    """A copy of /usr/lib/dracut (symlinks) with our module added to modules.d."""
    base = td / "dracut"
    base.mkdir()
    for e in Path("/usr/lib/dracut").iterdir():
        if e.name != "modules.d":
            os.symlink(e, base / e.name)
    md = base / "modules.d"
    md.mkdir()
    for e in Path("/usr/lib/dracut/modules.d").iterdir():
        os.symlink(e, md / e.name)
    shutil.copytree(INITRAMFS_DIR / "dracut/90handover", md / "90handover", symlinks=False)
    return base


def build_dracut(k: lab.Kernel, out: Path, with_hook: bool = True) -> dict:
    import time
    with tempfile.TemporaryDirectory() as td:
        base = _dracut_basedir(Path(td))
        # an explicit module list (-m) and driver list: --no-hostonly alone gives a 34 MB
        # image that takes 50 s to build; this is the small end of what dracut makes
        mods = DRACUT_MODULES + (["handover"] if with_hook else [])
        cmd = ["dracut", "--force", "--no-hostonly", "--no-hostonly-cmdline", "--zstd",
               "--kmoddir", str(k.modules), "-m", " ".join(mods),
               "--drivers", " ".join(INITRAMFS_MODULES), "--conf", "/dev/null",
               "--confdir", str(Path(td))]
        cmd += [str(out), k.version]
        t = time.monotonic()
        r = subprocess.run(cmd, env=dict(_builder_env(), dracutbasedir=str(base)),
                           capture_output=True, text=True)
        dt = time.monotonic() - t
    if r.returncode != 0 or not out.exists():
        raise lab.LabError(f"dracut failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return {"seconds": round(dt, 2), "bytes": out.stat().st_size, "log": r.stderr}


BUILDERS = {"initramfs-tools": build_mkinitramfs, "dracut": build_dracut}


def initrd(kind: str, k: lab.Kernel, with_hook: bool = True) -> tuple[Path, dict]:
    """The cached initrd of ``kind`` for kernel ``k`` (rebuilt when our files change)."""
    from handover import initramfs as rt
    # the packages come from the interpreter running this (another venv: another image)
    key = _key(kind, with_hook, k.version, INITRAMFS_CONF, INITRAMFS_MODULES, DRACUT_MODULES,
               sorted(str(p) for p in rt.py_packages().values()), INITRAMFS_DIR, REPO / "handover")
    d = lab.cache_dir() / "e2e"
    d.mkdir(exist_ok=True)
    out = d / f"{kind}-{'hook' if with_hook else 'plain'}-{k.version}-{key}.img"
    facts_f = out.with_suffix(".json")
    if out.exists() and facts_f.exists():
        return out, json.loads(facts_f.read_text())
    for old in d.glob(f"{kind}-{'hook' if with_hook else 'plain'}-{k.version}-*"):
        old.unlink()
    facts = BUILDERS[kind](k, out, with_hook)
    facts.pop("log", None)
    facts_f.write_text(json.dumps(facts))
    return out, facts


def list_initrd(kind: str, img: Path) -> list[str]:
    """File list of an image by the tools' own listers (lsinitramfs / lsinitrd)."""
    cmd = ["lsinitramfs", str(img)] if kind == "initramfs-tools" else ["lsinitrd", str(img)]
    r = subprocess.run(cmd, capture_output=True, check=True)
    lines = r.stdout.decode(errors="replace").splitlines()
    if kind == "initramfs-tools":
        return lines
    # lsinitrd prints `ls -l` lines (after a header): the name is the 9th field
    return [f[8] for f in (ln.split() for ln in lines)
            if len(f) >= 9 and f[0][:1] in "-dlcbps" and len(f[0]) == 10]


#: For a root file system without symlinks (vfat): busybox applets installed into a tmpfs.
VFAT_PRELUDE = r"""#!/bin/busybox sh
/bin/busybox mount -t tmpfs tmpfs /tmp
/bin/busybox mkdir -p /tmp/bb
/bin/busybox --install -s /tmp/bb
PATH=/tmp/bb
"""
VFAT_LABEL = "HOROOT"


def vfat_rootfs() -> Path:
    """A 16 MiB vfat image (label HOROOT) with busybox and ROOT_INIT: for the patched lab
    kernel, which has vfat but no ext4 and no modules (tools/kernel.py)."""
    init = VFAT_PRELUDE + ROOT_INIT.replace("SLOT", str(lab.RESULT_SLOT_MB)).split("\n", 1)[1]
    init = init.replace("mount -t tmpfs tmpfs /tmp\n", "", 1)
    out = lab.cache_dir() / "e2e" / f"rootfs-vfat-{_key(init, Path('/bin/busybox'))}.img"
    if out.exists():
        return out
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as td:
        f = Path(td) / "init"
        f.write_text(init)
        subprocess.run(["mkfs.vfat", "-C", "-n", VFAT_LABEL, str(tmp), "16384"], check=True,
                       capture_output=True)
        env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
        for d in ("proc", "sys", "dev", "run", "tmp", "sbin", "bin"):
            subprocess.run(["mmd", "-i", str(tmp), f"::/{d}"], check=True, env=env)
        subprocess.run(["mcopy", "-i", str(tmp), str(f), "::/sbin/init"], check=True, env=env)
        subprocess.run(["mcopy", "-i", str(tmp), "/bin/busybox", "::/bin/busybox"], check=True, env=env)
    tmp.replace(out)
    return out


def patched_kernel(stale_ok: bool = False) -> lab.Kernel | None:
    """The patched lab kernel (tools/kernel.py build) as a lab.Kernel tree that mkinitramfs
    can use (boot/vmlinuz-V, boot/config-V, lib/modules/V with modules.builtin; no modules),
    or None when it has not been built (``stale_ok``: or is older than the patches)."""
    from tools import kernel as kt

    p = kt.built() or (kt.paths() if stale_ok else None)
    if p is None or not os.path.exists(p["bzImage"]):
        return None
    build = Path(p["build"])
    release = (build / "include/config/kernel.release").read_text().strip()
    root = lab.cache_dir() / "e2e" / f"ktree-{release}"
    k = lab.Kernel(release, root)
    stamp = root / ".complete"
    src_mtime = str(os.path.getmtime(p["bzImage"]))
    if stamp.exists() and stamp.read_text() == src_mtime:
        return k
    shutil.rmtree(root, ignore_errors=True)
    (root / "boot").mkdir(parents=True)
    k.modules.mkdir(parents=True)
    shutil.copy2(p["bzImage"], k.vmlinuz)
    shutil.copy2(build / ".config", k.config)
    for n in ("modules.builtin", "modules.builtin.modinfo"):
        shutil.copy2(build / n, k.modules / n)
    (k.modules / "modules.order").write_text("")
    subprocess.run(["depmod", "-b", str(root), release], check=True, capture_output=True)
    stamp.write_text(src_mtime)
    return k


def rootfs() -> Path:
    """A 16 MiB ext4 image (label horoot): busybox and ROOT_INIT as /sbin/init."""
    init = ROOT_INIT.replace("SLOT", str(lab.RESULT_SLOT_MB))
    out = lab.cache_dir() / "e2e" / f"rootfs-{_key(init, Path('/bin/busybox'))}.img"
    if out.exists():
        return out
    out.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        root = Path(td) / "root"
        for d in ("proc", "sys", "dev", "run", "tmp", "sbin", "bin"):
            (root / d).mkdir(parents=True)
        lab._busybox_links(root)
        for p in (root / "sbin/init", ):
            if p.exists() or p.is_symlink():
                p.unlink()
        (root / "sbin/init").write_text(init)
        (root / "sbin/init").chmod(0o755)
        tmp = out.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-L", ROOT_LABEL, "-d", str(root), str(tmp), "16M"],
                       check=True, capture_output=True)
        tmp.replace(out)
    return out


@dataclasses.dataclass
class Cycle:
    kind: str
    pmem: str
    stale: bool
    policy: str
    guest: lab.GuestResult
    arm: dict
    inspect: str
    result: dict | None
    boot: dict | None
    reached_root: bool
    timings: dict
    initrd_facts: dict
    console_lines: list


def _console_times(workdir: Path) -> list[tuple[float, str]]:
    out = []
    for ln in (workdir / "console.log").read_text(errors="replace").splitlines():
        m = re.match(r"\[\s*([0-9.]+)\] (.*)", ln)
        if m:
            out.append((float(m.group(1)), m.group(2)))
    return out


def run_cycle(kind: str = "initramfs-tools", pmem: str = "legacy", stale: bool = False,
              policy: str = "report", timeout: float = 300, echo: bool = False,
              kexec_mode: str = "l", next_kernel: lab.Kernel | None = None) -> Cycle:
    """One cycle; ``next_kernel``: kexec into this kernel (e.g. ``patched_kernel()``) instead
    of the lab's Debian kernel, with an initramfs built for it and a vfat root."""
    ensure_tools()
    k = lab.fetch_kernel()
    files = {}
    if next_kernel is None:
        img, facts = initrd(kind, k)
        root, label, fstype, kpath = rootfs(), ROOT_LABEL, "ext4", "/payload/lab/vmlinuz"
    else:
        lab.ensure_host_packages({"dosfstools": "/usr/sbin/mkfs.vfat", "mtools": "/usr/bin/mcopy"})
        img, facts = initrd(kind, next_kernel)
        root, label, fstype, kpath = vfat_rootfs(), VFAT_LABEL, "vfat", "/payload/e2e-vmlinuz"
        files["e2e-vmlinuz"] = next_kernel.vmlinuz
    files["e2e-initrd.img"] = img
    setup, region = REGION_SETUP[pmem]
    extra = f"--test-alter-bar {STALE_BAR}" if stale else ""
    script = PHASE1.format(region_setup=setup, region=region, token=TOKEN, policy=policy,
                           extra=extra, label=label, next_append=NEXT_APPEND[kind],
                           mode=kexec_mode, next_kernel=kpath, fstype=fstype)
    # snapshot=on: writable for the guest (dracut's fsck opens it read-write), never changed
    qargs = ["-drive", f"if=none,id=root,file={root},format=raw,snapshot=on",
             "-device", "virtio-blk-pci,drive=root,iommu_platform=on,disable-legacy=on,addr=07.0"]
    # two "phases": the lab runs the first; the second kernel's root init fills slot 2
    res = lab.run_guest([script, "# run by the real initramfs + root init\n"], pmem=pmem,
                        files=files, qemu_args=qargs, timeout=timeout,
                        echo=echo)
    p1, p2 = res.phases
    if p1.rc != 0:
        raise lab.LabError(f"first kernel failed rc={p1.rc}\n{p1.stderr[-3000:]}\n"
                           f"--- console tail ---\n{res.console[-3000:]}")
    arm = json.loads(p1.files["arm.json"])
    result = json.loads(p2.files["result.json"]) if "result.json" in p2.files else None
    boot = json.loads(p2.files["boot.json"]) if "boot.json" in p2.files else None
    ct = _console_times(res.workdir)
    tm = {"save (arm, in guest)": arm["timings"]["save"],
          "kexec load (arm, in guest)": arm["timings"].get("kexec_load")}
    t_exec = next((t for t, ln in ct if "@@LAB KEXEC-EXEC phase=1" in ln), None)
    t_hook = next((t for t, ln in ct if "handover: checking saved state" in ln), None)
    t_done = next((t for t, ln in ct if re.search(r"handover: done rc=", ln)), None)
    t_root = next((t for t, ln in ct if "root-init" in ln and "@@LAB INIT phase=2" in ln), None)
    if t_exec is not None and t_hook is not None:
        tm["kexec -e -> hook start"] = round(t_hook - t_exec, 2)
    if boot:
        tm["hook (uptime in 2nd kernel)"] = round(boot["uptime_end"] - boot["uptime_start"], 2)
    if t_hook is not None and t_done is not None:
        tm["hook (console)"] = round(t_done - t_hook, 2)
    if t_done is not None and t_root is not None:
        tm["hook end -> root /sbin/init"] = round(t_root - t_done, 2)
    if "qemu total" in res.timings:
        tm["qemu total"] = res.timings["qemu total"]
    hook_lines = [ln[ln.index("handover: "):] for _t, ln in ct
                  if "handover: " in ln and "@@LAB" not in ln]
    return Cycle(kind, pmem, stale, policy, res, arm, p1.files.get("inspect.txt", b"").decode(),
                 result, boot, p2.rc == 0 and t_root is not None, tm, facts, hook_lines)


def format_timings(tm: dict) -> str:
    return "\n".join(f"  {k:34s} {v:7.2f} s" for k, v in tm.items() if v is not None)
