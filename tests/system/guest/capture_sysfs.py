"""Guest-side helper: copy the sysfs/procfs parts handover parses into a tree mirroring /.

Runs inside the lab guest (Debian python3.11, stdlib only)::

    python3 capture_sysfs.py OUTDIR

Directories are copied shallowly (regular files + symlinks, a few named subdirectories one
level deep).  Symlinks are recreated as symlinks with the kernel's relative target text, and
each copied sysfs device is copied at its real location (/sys/devices/...) so that links such
as bus/pci/devices/X -> ../../../devices/pci0000:00/X resolve inside the fixture.
Attributes that cannot be read are listed in OUTDIR/_capture/errors.txt.
"""

import fnmatch
import glob
import os
import re
import sys

MAX_FILE = 64 * 1024
SKIP = {"remove", "rescan", "reset", "rom", "new_id", "remove_id", "bind", "unbind",
        "uevent_seqnum", "vpd", "delete", "create"}
SKIP_RE = re.compile(r"^resource\d+(_wc)?$")

OUT = ""
errors = []
done = set()


def out(path: str) -> str:
    return OUT + path


def copy_link(path: str) -> None:
    dst = out(path)
    if os.path.lexists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(os.readlink(path), dst)


def copy_file(path: str, limit: int = MAX_FILE) -> None:
    dst = out(path)
    if os.path.lexists(dst):
        return
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        errors.append(f"{path}: {e.strerror}")
        return
    if len(data) > limit:
        errors.append(f"{path}: larger than {limit} bytes, skipped")
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst, "wb") as f:
        f.write(data)


def copy_dir(path: str, subdirs=(), limit: int = MAX_FILE) -> None:
    """Shallow copy of a real directory; ``subdirs`` are glob patterns copied one level."""
    path = os.path.realpath(path)
    if path in done or not os.path.isdir(path):
        return
    done.add(path)
    os.makedirs(out(path), exist_ok=True)
    for e in sorted(os.scandir(path), key=lambda e: e.name):
        if e.is_symlink():
            copy_link(e.path)
        elif e.is_file(follow_symlinks=False):
            if e.name in SKIP or SKIP_RE.match(e.name):
                continue
            copy_file(e.path, limit)
        elif e.is_dir(follow_symlinks=False) and any(fnmatch.fnmatch(e.name, p) for p in subdirs):
            copy_dir(e.path, (), limit)


def copy_linked_dirs(pattern: str, subdirs=()) -> None:
    """For class/bus views: copy each entry as a link, then its real directory."""
    for p in sorted(glob.glob(pattern)):
        if os.path.islink(p):
            copy_link(p)
        copy_dir(p, subdirs)


def main(outdir: str) -> None:
    global OUT
    OUT = os.path.abspath(outdir)
    os.makedirs(OUT, exist_ok=True)
    # PCI devices, their drivers and the driver directories the links point to
    copy_linked_dirs("/sys/bus/pci/devices/*", ("msi_irqs",))
    for d in sorted(glob.glob("/sys/bus/pci/devices/*/driver")):
        drv = os.path.realpath(d)
        os.makedirs(out(drv), exist_ok=True)
        for e in os.scandir(drv):
            if e.is_symlink() and e.name != "module":
                copy_link(e.path)
    # IOMMUs, groups, irqs
    copy_linked_dirs("/sys/class/iommu/*", ("intel-iommu", "amd-iommu", "devices"))
    for g in sorted(glob.glob("/sys/kernel/iommu_groups/*")):
        copy_dir(g, ("devices",))
    for i in sorted(glob.glob("/sys/kernel/irq/*")):
        copy_dir(i)
    # nvdimm / dax
    copy_linked_dirs("/sys/bus/nd/devices/*", ("nfit", "dax_region", "mapping*"))
    copy_linked_dirs("/sys/bus/dax/devices/*", ("mapping*",))
    for d in sorted(glob.glob("/sys/bus/dax/devices/*")):
        parent = os.path.dirname(os.path.realpath(d))
        if os.path.isdir(os.path.join(parent, "dax_region")):
            copy_dir(os.path.join(parent, "dax_region"))
    for p in sorted(glob.glob("/sys/firmware/memmap/*")):
        copy_dir(p)
    for m in ("vfio", "vfio_pci", "vfio_pci_core", "vfio_iommu_type1", "nd_pmem", "nd_e820",
              "libnvdimm", "dax", "device_dax", "dax_pmem", "nfit"):
        copy_dir(f"/sys/module/{m}/parameters")
    # intel-iommu debugfs exists only on kernels with CONFIG_INTEL_IOMMU_DEBUGFS
    for p in sorted(glob.glob("/sys/kernel/debug/iommu/intel/*")):
        if os.path.isfile(p):
            copy_file(p, 1 << 20)
    # procfs
    for p in ("/proc/interrupts", "/proc/iomem", "/proc/ioports", "/proc/cmdline", "/proc/version",
              "/proc/cpuinfo", "/proc/modules", "/proc/sys/kernel/osrelease",
              "/proc/sys/kernel/kexec_load_disabled"):
        copy_file(p)
    os.makedirs(os.path.join(OUT, "_capture"), exist_ok=True)
    with open(os.path.join(OUT, "_capture", "errors.txt"), "w") as f:
        f.write("\n".join(errors) + ("\n" if errors else ""))


if __name__ == "__main__":
    main(sys.argv[1])
