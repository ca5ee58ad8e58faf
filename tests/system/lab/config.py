"""The lab's configuration, in one place: the host packages, what goes into the guest
(modules, binaries, Python), the machine layout, the kernel command line, the results disk,
and where things live (the repository, the cache outside it).

Every name here is part of a cache key or of a guest convention: a change rebuilds the
initramfs (``BUILD_FORMAT`` covers the layout of the image; the key also hashes
``guest_init.sh``, ``guest_phase.sh`` and ``lab-phase.service``).
"""

from __future__ import annotations

import os
from pathlib import Path

from handover import initramfs as _rt

#: tests/system: guest_init.sh, guest/ (scripts the tests put in the payload)
SYSTEM_DIR = Path(__file__).resolve().parent.parent
#: the repository's root
REPO = SYSTEM_DIR.parent.parent
#: the guest's /init (busybox sh), copied into the base initramfs
GUEST_INIT = SYSTEM_DIR / "guest_init.sh"
#: the phase (payload, script, results, kexec), sourced by /init and run by GUEST_UNIT on a
#: root file system: /lib/lab/phase.sh in the initramfs
GUEST_PHASE = SYSTEM_DIR / "guest_phase.sh"
#: the systemd unit that runs the phase on a root file system: /lib/lab/lab-phase.service
GUEST_UNIT = SYSTEM_DIR / "lab-phase.service"

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
#: Modules /init loads (with their dependencies) only to mount a root file system
#: (RunOptions(rootfs=...)); a kernel without them (built in, or none) skips them.
ROOTFS_MODULES = ["crc32c_generic", "ext4"]   # ext4 asks the crypto API for crc32c (no modules.dep edge)
#: The PCI slot of the root file system's disk (virtio-blk) on the lab machine
ROOTFS_SLOT = "0a.0"

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

# no_timer_check: the IO-APIC timer check counts ticks over a delay loop, which TCG on a
# loaded host may fail ("timer doesn't work through Interrupt-remapped IO-APIC" panic)
#: Every phase's kernel command line starts with this (then the pmem memmap=, the test's
#: words, handover.lab.phase=N).
BASE_CMDLINE = "console=ttyS0,115200 panic=1 oops=panic loglevel=4 no_timer_check rdinit=/init"
DEFAULT_TIMEOUT = 300.0
#: Each phase's results tar goes into its own slot of this many MiB of the results disk.
RESULT_SLOT_MB = 32

#: Bump when the initramfs layout changes (guest_init.sh, guest_phase.sh and the unit are
#: part of the cache key by their contents).
BUILD_FORMAT = 4


def cache_dir() -> Path:
    """``$HANDOVER_LAB_CACHE`` (default ``~/.cache/handover-lab``), created."""
    d = Path(os.environ.get("HANDOVER_LAB_CACHE") or Path.home() / ".cache" / "handover-lab")
    d.mkdir(parents=True, exist_ok=True)
    return d
