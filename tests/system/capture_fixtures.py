"""Capture real sysfs/procfs fixtures from the QEMU lab guest into tests/fixtures/captured/.

    /opt/handover-venv/bin/python -m tests.system.capture_fixtures [NAME ...] [--out DIR]

NAME is one of the profiles below (default: all).  Each boots Debian's stock 6.12 kernel
(tests/system/lab/), turns the pmem into devdax with ndctl, binds QEMU's edu device
(00:03.0) to vfio-pci and opens it through VFIO with a DMA mapping and MSI enabled
(tests/system/guest/vfio_edu.py), then copies the interesting parts of /sys and /proc
(tests/system/guest/capture_sysfs.py) into tests/fixtures/captured/<NAME>/ as a tree that
mirrors /, symlinks kept as symlinks.  Extra command outputs go to <NAME>/_capture/.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import sys
from pathlib import Path

from tests.system import lab

GUEST = Path(__file__).resolve().parent / "guest"
DEFAULT_OUT = lab.REPO / "tests" / "fixtures" / "captured"

SCRIPT = r"""
set -u
X="$LAB_OUT/fixture/_capture"
mkdir -p "$X"
exec 2>>"$X/capture-stderr.txt"
echo "== ndctl create-namespace =="
ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M > "$X/ndctl-create-namespace.json" || echo "ndctl create-namespace failed rc=$?"
echo "== e1000e up (allocates its MSI-X vectors) =="
ip link set eth0 up || echo "ip link up failed"
echo "== bind edu to vfio-pci =="
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
ls -l /sys/bus/pci/devices/0000:00:03.0/driver
echo "== open edu through VFIO =="
python3 vfio_edu.py 0000:00:03.0 /tmp/vfio-ready /tmp/vfio-stop > "$X/vfio-edu.log" 2>&1 &
HOLDER=$!
i=0; while [ ! -f /tmp/vfio-ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/vfio-ready 2>/dev/null | tee "$X/vfio-edu.txt" || echo "vfio holder not ready"
echo "== capture =="
python3 capture_sysfs.py "$LAB_OUT/fixture"
ndctl list -RNDu > "$X/ndctl-list.json" 2>&1
daxctl list -RDu > "$X/daxctl-list.json" 2>&1
ls -l /dev/pmem* /dev/dax* /dev/vfio/ > "$X/dev.txt" 2>&1
dmesg > "$X/dmesg.txt"
touch /tmp/vfio-stop; wait $HOLDER
echo "holder rc=$?"
cat "$X/vfio-edu.log"
find "$LAB_OUT/fixture" | wc -l
"""

# Phase 1 of the *-after-kexec profiles: the same set-up (devdax, e1000e up, edu live under
# VFIO with a DMA mapping and MSI), then the lab's /init kexecs; phase 2 captures the new
# kernel's state as it boots, before anything rebinds or reopens a device.
SETUP_THEN_KEXEC = r"""
set -u
ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M
ip link set eth0 up
echo vfio-pci > /sys/bus/pci/devices/0000:00:03.0/driver_override
echo 0000:00:03.0 > /sys/bus/pci/drivers_probe
python3 vfio_edu.py 0000:00:03.0 /tmp/vfio-ready /tmp/vfio-stop > /tmp/vfio-holder.log 2>&1 &
i=0; while [ ! -f /tmp/vfio-ready ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
cat /tmp/vfio-ready
grep -E 'IR-|DMAR' /proc/interrupts
# the holder keeps the VFIO fds open (device live) while /init runs kexec
"""

CAPTURE_ONLY = r"""
set -u
X="$LAB_OUT/fixture/_capture"
mkdir -p "$X"
exec 2>>"$X/capture-stderr.txt"
python3 capture_sysfs.py "$LAB_OUT/fixture"
ndctl list -RNDu > "$X/ndctl-list.json" 2>&1
daxctl list -RDu > "$X/daxctl-list.json" 2>&1
ls -l /dev/pmem* /dev/dax* /dev/vfio/ > "$X/dev.txt" 2>&1
dmesg > "$X/dmesg.txt"
find "$LAB_OUT/fixture" | wc -l
"""

PROFILES = {
    "debian-6.12-legacy-pmem": dict(pmem="legacy"),
    "debian-6.12-nvdimm": dict(pmem="nvdimm", nvdimm_size=256 << 20),
    "debian-6.12-legacy-pmem-after-kexec": dict(pmem="legacy", scripts=[SETUP_THEN_KEXEC, CAPTURE_ONLY],
                                                kexec_mode="l"),
    "debian-6.12-legacy-pmem-kdump": dict(pmem="legacy", scripts=[SETUP_THEN_KEXEC, CAPTURE_ONLY],
                                          kexec_mode="p",
                                          kexec_append="irqpoll nr_cpus=1 reset_devices"),
    # the patched kernel (tools/kernel.py: linux-source-6.12 + kernel-patches/, built with
    # CONFIG_INTEL_IOMMU_DEBUGFS=y), reached by kexec from the stock one: the full capture,
    # debugfs iommu/intel/* and the 0003 sysfs registers included
    "handover-6.12-debugfs": dict(pmem="legacy", scripts=["true\n", SCRIPT], kexec_mode="l",
                                  patched=True),
}


def capture(name: str, out_root: Path, timeout: float = 180) -> Path:
    kw = dict(PROFILES[name])
    scripts = kw.pop("scripts", [SCRIPT])
    files = {"vfio_edu.py": GUEST / "vfio_edu.py", "capture_sysfs.py": GUEST / "capture_sysfs.py"}
    patched = kw.pop("patched", False)
    if patched:
        from tools import kernel as kbuild

        built = kbuild.built()
        if built is None:
            raise SystemExit(f"{name}: build the patched kernel first (make kernel)")
        files["lab/vmlinuz.2"] = Path(built["bzImage"])
    res = lab.run_guest(scripts, files=files, timeout=timeout, **kw)
    res.check()
    ph = res.phases[-1]
    dest = out_root / name
    if dest.exists():
        shutil.rmtree(dest)
    ph.extract(dest, "fixture")
    osrelease = (dest / "proc/sys/kernel/osrelease").read_text().strip()
    vfio = (dest / "_capture/vfio-edu.txt")
    if len(scripts) > 1:
        (dest / "_capture/phase1-stdout.txt").write_text(res.phases[0].stdout)
        (dest / "_capture/phase1-dmesg.txt").write_text(res.phases[0].dmesg)
        vfio = dest / "_capture/phase1-stdout.txt"
    kernel_note = (f"Debian `linux-image-{osrelease}` (stock, unpatched; `uname -r` = `{osrelease}`)"
                   if not patched else
                   f"`{osrelease}` built by `tools/kernel.py` from Debian's linux-source-6.12 "
                   f"(6.12.117) + `kernel-patches/` (CONFIG_INTEL_IOMMU_DEBUGFS=y, everything "
                   f"built in), booted by kexec from the stock Debian kernel (phase 1 does nothing)")
    (dest / "CAPTURED.md").write_text(f"""# Captured fixture `{name}`

Real sysfs/procfs state of a QEMU guest, copied by `tests/system/capture_fixtures.py`
(re-run: `/opt/handover-venv/bin/python -m tests.system.capture_fixtures {name}`).

- Captured: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
- Guest kernel: {kernel_note}
- Kernel command line: `{ph.cmdline.strip()}`
- QEMU (TCG, {_qemu_version()}):
  ```
  {shlex.join(res.qemu_cmd)}
  ```
  (paths under the lab cache; payload/results are the lab's virtio disks at 00:05.0 and 00:06.0)
{_scripts_md(scripts, kw)}
- Helpers: `tests/system/guest/vfio_edu.py` (opens edu 0000:00:03.0 via VFIO type1v2: DMA map
  IOVA 0x100000 size 2 MiB, bus master on, MSI vector 0 -> eventfd, one DMA round trip and one
  MSI, then holds all of it while the capture runs) and `tests/system/guest/capture_sysfs.py`
  (shallow copy of the directories below; symlinks kept with their relative targets; devices
  copied at their real /sys/devices/... location so bus/class links resolve inside the tree).
- VFIO holder report (phase 1 for the after-kexec/kdump profiles):
  ```
{_indent(vfio.read_text() if vfio.exists() else 'missing')}  ```

## Layout
- `sys/bus/pci/devices/*` (links) and `sys/devices/pci0000:00/*/` (vendor, device, class,
  revision, config (binary, full), resource, irq, driver_override, numa_node, msi_irqs/,
  links driver, iommu_group, iommu, ...).  `resourceN`, `rom`, `vpd`, `reset`, `remove` are not copied.
- `sys/bus/pci/drivers/<bound driver>/` (only its device links)
- `sys/class/iommu/dmar*` and `sys/devices/virtual/iommu/dmar*/intel-iommu/*`, `devices/`
- `sys/kernel/iommu_groups/*/{{type,reserved_regions,devices/}}`
- `sys/kernel/irq/*/*`
- `sys/bus/nd/devices/*`, `sys/bus/dax/devices/*` and their real directories (regions,
  namespaces, dax devices, `dax_region/`, `nfit/` for NVDIMMs)
- `sys/firmware/memmap/*`, `sys/module/<vfio/nvdimm/dax modules>/parameters`
- `proc/{{interrupts,iomem,ioports,cmdline,version,cpuinfo,modules}}`, `proc/sys/kernel/{{osrelease,kexec_load_disabled}}`
- `_capture/`: not part of the mirrored root: `dmesg.txt`, `phase1-*.txt` (first kernel, two-phase profiles), `ndctl-list.json`,
  `daxctl-list.json`, `ndctl-create-namespace.json`, `dev.txt` (`ls -l` of /dev nodes),
  `vfio-edu.txt`, `errors.txt` (attributes that could not be read).
""")
    lab.log(f"captured {name} into {dest}")
    return dest


def _scripts_md(scripts, kw) -> str:
    if len(scripts) == 1:
        return ("- Guest script (run by the lab's /init as phase 1, cwd = payload holding the two "
                f"helpers):\n  ```sh{scripts[0]}  ```")
    how = {"l": "`kexec -l` + `kexec -e`", "s": "`kexec -s -l` + `kexec -e`",
           "p": "`kexec -p` + `echo c > /proc/sysrq-trigger` (a kdump boot)"}[kw.get("kexec_mode", "l")]
    return ("- Phase 1 script (first kernel; cwd = payload holding the two helpers). The VFIO "
            "holder is still running with the device open when the lab's /init then does "
            f"{how} into the same kernel and initrd:\n  ```sh{scripts[0]}  ```\n"
            "- Phase 2 script (the new kernel, right after boot + module loading; this is the "
            f"captured state; command line in proc/cmdline):\n  ```sh{scripts[1]}  ```")


def _indent(t: str) -> str:
    return "".join("  " + ln + "\n" for ln in t.splitlines())


def _qemu_version() -> str:
    import subprocess
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    bad = [n for n in a.names if n not in PROFILES]
    if bad:
        ap.error(f"unknown profile(s) {bad}; known: {list(PROFILES)}")
    for n in a.names or list(PROFILES):
        capture(n, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
