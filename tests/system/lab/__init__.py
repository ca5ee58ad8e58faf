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

``run_guest``'s keywords are the fields of :class:`RunOptions`; ``lab.run(scripts,
RunOptions(...))`` takes them as one record.

CLI: ``python -m tests.system.lab {setup,build,run,shell,timings} ...`` (``--help``).

The package, one module per job:

- ``config``     package lists, guest modules and binaries, machine constants, cache dir
- ``base``       exceptions, log, timed steps, apt-get of the host packages
- ``kernel``     Debian's kernel (fetch_kernel) and the Kernel record of a kernel tree
- ``initramfs``  the cached base / module / overlay archives and the initrd made of them
- ``rootfs``     the cached Debian root file system (debootstrap) of ``RunOptions(rootfs=...)``
- ``payload``    the host side of the guest protocol: payload disk, console markers,
                 results disk
- ``hstatus``    the guest's ``hstatus`` shell function and its parser
- ``vm``         the QEMU command line, RunOptions, the guest lock, run_guest, GuestResult
- ``__main__``   the CLI

Guest conventions (see guest_init.sh): phase N runs ``/payload/lab/phaseN.sh`` under busybox
``sh`` with ``cd /payload``; env ``LAB_PHASE``, ``LAB_PAYLOAD=/payload`` and ``LAB_OUT`` (a
directory; everything put there comes back as ``PhaseResult.files``).  ``python3`` (Debian's
3.11) with ``handover``, construct, click, msgpack, crcmod, google_crc32c and elftools is on
PATH, as are busybox, kexec, ndctl, daxctl.  Modules for pmem/dax/nfit/vfio/virtio/e1000e are
loaded before the script runs.
"""

from __future__ import annotations

from .base import (LabError, LabTimeout, LabUnavailable, Step, apt_env, ensure_host_packages,
                   log, run as run_cmd)
from . import rootfs
from .config import (BASE_CMDLINE, BUILD_FORMAT, DEFAULT_TIMEOUT, GUEST_BINARIES, GUEST_INIT,
                     GUEST_MODULES, GUEST_PHASE, GUEST_UNIT, ROOTFS_MODULES, ROOTFS_SLOT, GUEST_PY_OPTIONAL, GUEST_PY_PACKAGES, GUEST_PYTHON,
                     GUEST_STDLIB, HOST_PACKAGES, LEGACY_PMEM_MEMMAP, LEGACY_PMEM_SIZE,
                     LEGACY_PMEM_START, LIB_DYNLOAD_EXCLUDE_RE, REPO, RESULT_SLOT_MB,
                     STDLIB_EXCLUDE, SYSTEM_DIR, cache_dir)
from .hstatus import HSTATUS, HSTATUS_KEYS, parse_hstatus
from .initramfs import (build_base_initramfs, build_initramfs, build_modules_cpio, build_overlay,
                        busybox_links, setup)
from .kernel import Kernel, fetch_kernel, module_closure, module_names
from .payload import MARK_RE, PhaseResult, index_markers, marker_timings
from .vm import EDU_BDF, NVME_BDF, NVME_DEVICE, NVME_SERIAL, TOPOLOGIES, GuestLock, GuestResult, RunOptions, qemu_command, run, run_guest

#: tests/system (the directory the single-file lab lived in)
HERE = SYSTEM_DIR

# the names of the single-file lab that other files use (tools/kernel.py, tests/system/e2e.py)
_module_closure = module_closure
_busybox_links = busybox_links

__all__ = [
    "BASE_CMDLINE", "BUILD_FORMAT", "DEFAULT_TIMEOUT", "GUEST_BINARIES", "GUEST_INIT",
    "GUEST_MODULES", "GUEST_PHASE", "GUEST_UNIT", "ROOTFS_MODULES", "ROOTFS_SLOT", "rootfs",
    "GUEST_PY_OPTIONAL", "GUEST_PY_PACKAGES", "GUEST_PYTHON", "GUEST_STDLIB",
    "EDU_BDF", "HERE", "HOST_PACKAGES", "HSTATUS", "HSTATUS_KEYS", "LEGACY_PMEM_MEMMAP", "LEGACY_PMEM_SIZE",
    "LEGACY_PMEM_START", "LIB_DYNLOAD_EXCLUDE_RE", "MARK_RE", "REPO", "RESULT_SLOT_MB",
    "NVME_BDF", "NVME_DEVICE", "NVME_SERIAL", "STDLIB_EXCLUDE", "SYSTEM_DIR", "TOPOLOGIES",
    "GuestLock", "GuestResult", "Kernel", "LabError", "LabTimeout", "LabUnavailable",
    "PhaseResult", "RunOptions", "Step",
    "apt_env", "build_base_initramfs", "build_initramfs", "build_modules_cpio", "build_overlay",
    "busybox_links", "cache_dir", "ensure_host_packages", "fetch_kernel", "index_markers", "log",
    "marker_timings", "module_closure", "module_names", "parse_hstatus", "qemu_command", "run",
    "run_cmd", "run_guest", "setup",
]
