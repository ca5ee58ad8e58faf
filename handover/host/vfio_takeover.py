"""Hand the VFIO files of devices kept running to the next QEMU on the same kernel (Stage-1
of a fast restart: no kexec).

The last close of a VFIO device resets it, and the container's close unmaps and unpins its
memory; one process only can hold a group. So the next QEMU does not open the device: it
takes the files the previous QEMU had (through the holder that ``handover vm save --hold``
started, or from the previous QEMU itself while it still runs). This module:

- takes them with ``pidfd_getfd(2)`` and tells them apart: the container
  (``/dev/vfio/vfio``), each group (``/dev/vfio/<N>``), each device (``anon_inode:
  [vfio-device]``, named by the PCI function of its groups whose vendor and device ID its
  config space shows);
- invalidates the virtual address of every mapping of the container
  (``VFIO_IOMMU_UNMAP_DMA`` with ``VFIO_DMA_UNMAP_FLAG_VADDR | VFIO_DMA_UNMAP_FLAG_ALL``): the
  IOMMU mappings and the pinned memory stay; the next QEMU gives each its new address
  (``VFIO_DMA_MAP_FLAG_VADDR``), QEMU patch 0009;
- names them to QEMU as fdsets (``-add-fd fd=N,set=S,opaque=vfio-container |
  vfio-group-<N> | vfio-device-<bdf>``), which 0009 looks up.

Reading ``/proc`` and sysfs goes through :class:`Sysroot`; the syscalls act on the live system.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass, field

from ..errors import HandoverError
from .base import Sysroot
from .vfio_hold import CONTAINER, DEVICE, group_of, pidfd_getfd, vfio_files

#: include/uapi/linux/vfio.h: VFIO_TYPE ';', VFIO_BASE 100
_T = ord(";") << 8
IOMMU_UNMAP_DMA = _T | 114
DEVICE_GET_REGION_INFO = _T | 108
CONFIG_REGION = 7                       # VFIO_PCI_CONFIG_REGION_INDEX
UNMAP_FLAG_ALL = 1 << 1
UNMAP_FLAG_VADDR = 1 << 2


@dataclass
class TakenFiles:
    """The VFIO files taken from process ``pid``: fd numbers in this process."""

    pid: int
    container: int | None = None
    groups: dict = field(default_factory=dict)      # group "7" -> fd
    devices: dict = field(default_factory=dict)     # "0000:00:03.0" -> fd

    def fds(self) -> list[int]:
        return [fd for fd in [self.container, *self.groups.values(), *self.devices.values()]
                if fd is not None]

    def add_fd_args(self) -> list[str]:
        """QEMU's ``-add-fd`` options naming every file (one fdset each)."""
        named = ([("vfio-container", self.container)] if self.container is not None else [])
        named += [(f"vfio-group-{g}", fd) for g, fd in sorted(self.groups.items())]
        named += [(f"vfio-device-{d}", fd) for d, fd in sorted(self.devices.items())]
        out = []
        for n, (what, fd) in enumerate(named, start=1):
            out += ["-add-fd", f"fd={fd},set={n},opaque={what}"]
        return out

    def close(self) -> None:
        for fd in self.fds():
            try:
                os.close(fd)
            except OSError:
                pass


def _config_ids(dfd: int) -> tuple[int, int]:
    """(vendor, device) from a VFIO PCI device's config space."""
    ri = bytearray(struct.pack("IIIIQQ", 32, 0, CONFIG_REGION, 0, 0, 0))
    fcntl.ioctl(dfd, DEVICE_GET_REGION_INFO, ri)
    off = struct.unpack_from("IIIIQQ", ri)[5]
    return struct.unpack("<HH", os.pread(dfd, 4, off))


def group_functions(sr: Sysroot, group: str) -> dict:
    """{bdf: (vendor, device)} of the PCI functions of IOMMU group ``group``."""
    out = {}
    for bdf in sr.listdir(f"/sys/kernel/iommu_groups/{group}/devices"):
        v = sr.try_text(f"/sys/bus/pci/devices/{bdf}/vendor")
        d = sr.try_text(f"/sys/bus/pci/devices/{bdf}/device")
        if v and d:
            out[bdf] = (int(v, 16), int(d, 16))
    return out


def name_device(ids: tuple[int, int], functions: dict, taken: set) -> str:
    """The one function of ``functions`` ({bdf: ids}) not yet ``taken`` with ``ids``."""
    match = sorted(b for b, i in functions.items() if i == ids and b not in taken)
    if len(match) != 1:
        raise HandoverError(f"a VFIO device file ({ids[0]:04x}:{ids[1]:04x}) matches "
                            f"{len(match)} functions of its groups: cannot tell which it is")
    return match[0]


def take_files(sr: Sysroot, pid: int) -> TakenFiles:
    """Take every VFIO file of process ``pid`` (root: ``pidfd_getfd``)."""
    t = TakenFiles(pid)
    devices = []
    try:
        for num, target in vfio_files(sr, pid):
            try:
                fd = pidfd_getfd(pid, num)
            except OSError as e:
                raise HandoverError(f"pid {pid} fd {num}: cannot take its VFIO file: "
                                    f"{e.strerror}") from None
            if target == CONTAINER:
                if t.container is not None:
                    os.close(fd)
                    raise HandoverError(f"pid {pid} has two VFIO containers: not supported")
                t.container = fd
            elif target == DEVICE:
                devices.append(fd)
            else:
                t.groups[group_of(target)] = fd
        functions = {}
        for g in t.groups:
            functions.update(group_functions(sr, g))
        for fd in devices:
            t.devices[name_device(_config_ids(fd), functions, set(t.devices))] = fd
    except BaseException:
        named = set(t.devices.values())
        t.close()
        for fd in devices:
            if fd not in named:
                os.close(fd)
        raise
    if t.container is None or not t.groups:
        t.close()
        raise HandoverError(f"pid {pid} holds no VFIO container and group")
    return t


def invalidate_vaddr(container_fd: int) -> None:
    """Mark the virtual address of every mapping of the container invalid (the mappings
    and the pinned memory stay) until the next QEMU gives each its own."""
    arg = bytearray(struct.pack("IIQQ", 24, UNMAP_FLAG_ALL | UNMAP_FLAG_VADDR, 0, 0))
    try:
        fcntl.ioctl(container_fd, IOMMU_UNMAP_DMA, arg)
    except OSError as e:
        raise HandoverError(f"cannot invalidate the mappings' addresses of the VFIO container: "
                            f"{e.strerror} (VFIO_DMA_UNMAP_FLAG_VADDR needs type1v2, and "
                            f"fails when an address is invalid already)") from None
