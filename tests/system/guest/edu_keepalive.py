"""Guest-side helper: use QEMU's edu device in the kernel a keepalive kexec booted.

Runs inside the lab guest (Debian python3.11, stdlib only), next to vfio_edu.py, whose
constants it reuses. The previous kernel's vfio_edu.py mapped BUFFER (a device-dax node) at
IOVA 0x100000 and left edu with bus mastering and MSI on. Usage::

    python3 edu_keepalive.py probe BDF BUFFER OUT.json
        No driver: edu's BAR0 through sysfs resource0. Reads what the previous kernel's DMA
        left in BUFFER, then makes edu DMA with the OLD IOVA (RAM -> edu -> RAM) and checks
        the bytes land in BUFFER, then raises edu's MSI (it travels through the old IRTE).
    python3 edu_keepalive.py stage BDF BUFFER OUT.json
        Old kernel, before arming's kexec: put a random pattern into edu's own buffer (a
        DMA with the IOVA), clear its destination in BUFFER, write the pattern to OUT.json.
    python3 edu_keepalive.py kick BDF
        The last command before `kexec -e`: start edu's DMA of that pattern to the old IOVA
        and return without waiting (QEMU's edu completes a DMA 100 ms of guest time later).
    python3 edu_keepalive.py owner BDF BUFFER OUT.json TOKEN WRONG_TOKEN
        The new owner through vfio-pci: opening without a token and with WRONG_TOKEN must
        fail; with TOKEN too (EADDRNOTAVAIL) as long as the old IOVA is not mapped again;
        mapped onto the same dax buffer, the open works and hands the translation over to
        the owner's domain. edu DMAs with the old IOVA, then MSI with an eventfd. Then the
        owner's map and unmap decide: it maps memory of its own at a NEW IOVA and edu DMAs
        there; it unmaps the old IOVA and edu no longer reaches the buffer through it.
    python3 edu_keepalive.py poke PID BITS OUT.json
        Raise edu's interrupt from outside, as the device would while no VMM owns it: take
        edu's VFIO device fd of process PID (a VMM that saved its VM, or the holder of `handover
        arm`) with pidfd_getfd(2) and write BITS to edu's raise-interrupt register (0x60)
        through its BAR0 region; edu ORs them into its status and raises its MSI.
    python3 edu_keepalive.py intruder BDF OUT.json
        Not the owner: attaches edu's group to a container of its own, fails to open edu
        without the token, and closes everything. The adopted translation must survive.

Every step's outcome goes into OUT.json; the exit status is 0 whatever they are (the test
judges), unless the helper itself breaks.
"""

import ctypes
import errno
import fcntl
import json
import mmap
import os
import select
import struct
import sys
import time

from vfio_edu import (_T, CONFIG_REGION, DEVICE_GET_REGION_INFO, DEVICE_SET_IRQS, EDU_DMA_BUF,
                      GROUP_GET_DEVICE_FD, GROUP_SET_CONTAINER, IOMMU_MAP_DMA, IOVA,
                      IRQ_ACTION_TRIGGER, IRQ_DATA_EVENTFD, MSI_INDEX, REQUEST, SET_IOMMU,
                      TYPE1v2, Edu)

IOMMU_UNMAP_DMA = _T | 114
#: where the new owner maps memory of its own (not mapped by the previous kernel)
NEW_IOVA = 0x800000

BUF = 2 << 20
PRE_OFF, SRC_OFF, DST_OFF, OWNER_SRC, OWNER_DST = 4096, 8192, 12288, 16384, 20480
INFLIGHT_SRC, INFLIGHT_DST, INFLIGHT_EDU = 24576, 28672, EDU_DMA_BUF + 0x800


def roundtrip(edu, buf, src_off, dst_off, iova=IOVA):
    """RAM (at ``iova``, the old IOVA by default) -> edu -> RAM; True when the bytes arrived."""
    pattern = os.urandom(64)
    buf[src_off:src_off + 64] = pattern
    buf[dst_off:dst_off + 64] = bytes(64)
    done = edu.dma(iova + src_off, EDU_DMA_BUF + 0x100, 1) and \
        edu.dma(EDU_DMA_BUF + 0x100, iova + dst_off, 1 | 2)
    return done and bytes(buf[dst_off:dst_off + 64]) == pattern


def _map(cfd, vaddr, iova, size):
    """VFIO_IOMMU_MAP_DMA read/write; "ok" or the errno's name."""
    try:
        fcntl.ioctl(cfd, IOMMU_MAP_DMA, bytearray(struct.pack("IIQQQ", 32, 3, vaddr, iova, size)))
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def _unmap(cfd, iova, size):
    """VFIO_IOMMU_UNMAP_DMA; the bytes the kernel says it unmapped."""
    arg = bytearray(struct.pack("IIQQ", 24, 0, iova, size))
    fcntl.ioctl(cfd, IOMMU_UNMAP_DMA, arg)
    return struct.unpack("IIQQ", arg)[3]


def _translation(bdf):
    try:
        with open(f"/sys/kernel/handover/devices/{bdf}/translation") as f:
            return f.read().strip()
    except OSError as e:
        return f"unreadable: {e}"


def _buffer(path):
    fd = os.open(path, os.O_RDWR)
    return mmap.mmap(fd, BUF, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _config(bdf):
    with open(f"/sys/bus/pci/devices/{bdf}/config", "rb") as f:
        return f.read(256)


def _msi(cfg):
    """(enabled, address, data) of the MSI capability, from raw config bytes."""
    pos = cfg[0x34]
    while pos:
        cap_id, nxt = cfg[pos], cfg[pos + 1]
        if cap_id == 0x05:
            ctrl = struct.unpack_from("<H", cfg, pos + 2)[0]
            lo = struct.unpack_from("<I", cfg, pos + 4)[0]
            if ctrl & 0x80:
                hi, data = struct.unpack_from("<IH", cfg, pos + 8)
                return bool(ctrl & 1), hi << 32 | lo, data
            return bool(ctrl & 1), lo, struct.unpack_from("<H", cfg, pos + 8)[0]
        pos = nxt
    return None


class _Held:
    """edu's BAR0 through the vfio_edu.py process that owns the device (its VFIO mapping):
    the old kernel with Debian's config (CONFIG_IO_STRICT_DEVMEM) refuses to mmap resource0
    of a device vfio-pci claimed. The same calls as Edu (dma, start, rd)."""

    def __init__(self, bdf):
        self.req = REQUEST.format(bdf=bdf)

    def _call(self, op, *args):
        done = self.req + ".done"
        if os.path.exists(done):
            os.unlink(done)
        with open(self.req + ".tmp", "w") as f:
            json.dump({"op": op, "args": list(args)}, f)
        os.rename(self.req + ".tmp", self.req)
        for _ in range(400):
            if os.path.exists(done):
                with open(done) as f:
                    r = json.load(f)
                os.unlink(done)
                if "error" in r:
                    raise OSError(f"vfio_edu.py holder: {op}: {r['error']}")
                return r["result"]
            time.sleep(0.025)
        raise TimeoutError(f"vfio_edu.py holder did not answer {op}")

    def dma(self, src, dst, cmd, n=64):
        return self._call("dma", src, dst, cmd, n)

    def start(self, src, dst, cmd, n=64):
        return self._call("start", src, dst, cmd, n)

    def rd(self, off, fmt="<I"):
        return self._call("rd", off, fmt)


def _bar0(bdf, held_ok=False):
    """edu's BAR0 through sysfs resource0; ``held_ok``: through the vfio_edu.py holder when
    the kernel refuses the mapping (EINVAL: IO_STRICT_DEVMEM and a driver claimed edu)."""
    fd = os.open(f"/sys/bus/pci/devices/{bdf}/resource0", os.O_RDWR | os.O_SYNC)
    try:
        return Edu(mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
    except OSError as e:
        if not (held_ok and e.errno == errno.EINVAL
                and os.path.exists(REQUEST.format(bdf=bdf) + ".holder")):
            raise
        return _Held(bdf)
    finally:
        os.close(fd)


def stage(bdf, buffer, out):
    buf = _buffer(buffer)
    edu = _bar0(bdf, held_ok=True)
    pattern = os.urandom(64)
    buf[INFLIGHT_SRC:INFLIGHT_SRC + 64] = pattern
    buf[INFLIGHT_DST:INFLIGHT_DST + 64] = bytes(64)
    ok = edu.dma(IOVA + INFLIGHT_SRC, INFLIGHT_EDU, 1)
    with open(out, "w") as f:
        json.dump({"pattern": pattern.hex(), "staged": ok}, f)


def map_more(bdf, iova, size):
    """The owner (vfio_edu.py) maps fresh memory of its own at ``iova``: after the save,
    the translation then uses a page the saved state does not preserve."""
    print(f"map {iova}+{size}: {_Held(bdf)._call('map', int(iova, 0), int(size, 0))}", flush=True)


def kick(bdf):
    edu = _bar0(bdf, held_ok=True)
    edu.start(INFLIGHT_EDU, IOVA + INFLIGHT_DST, 1 | 2)
    print(f"edu DMA to the old IOVA started; busy when leaving: {edu.rd(0x98, '<Q') & 1}",
          flush=True)


def poke(pid, bits, out):
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, int(pid), 0)                  # pidfd_open
    if pidfd < 0:
        raise OSError(ctypes.get_errno(), f"pidfd_open {pid}")
    rep = {"pid": int(pid), "bits": int(bits, 0)}
    for name in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[vfio-device]":
            dfd = libc.syscall(438, pidfd, int(name), 0)    # pidfd_getfd
            if dfd < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd {pid} {name}")
            ri = bytearray(struct.pack("IIIIQQ", 32, 0, CONFIG_REGION, 0, 0, 0))
            fcntl.ioctl(dfd, DEVICE_GET_REGION_INFO, ri)
            if os.pread(dfd, 4, struct.unpack_from("IIIIQQ", ri)[5]) != bytes.fromhex("3412e811"):
                os.close(dfd)                               # another device (NVMe)
                continue
            ri = bytearray(struct.pack("IIIIQQ", 32, 0, 0, 0, 0, 0))
            fcntl.ioctl(dfd, DEVICE_GET_REGION_INFO, ri)
            off = struct.unpack_from("IIIIQQ", ri)[5]
            os.pwrite(dfd, struct.pack("<I", rep["bits"]), off + 0x60)
            rep["fd"], rep["status"] = int(name), struct.unpack("<I", os.pread(dfd, 4, off + 0x24))[0]
            os.close(dfd)
            break
    os.close(pidfd)
    with open(out, "w") as f:
        json.dump(rep, f)
    print(f"poke: {rep}", flush=True)


def probe(bdf, buffer, out):
    rep = {}
    buf = _buffer(buffer)
    rep["preserved"] = bytes(buf[PRE_OFF:PRE_OFF + 64]).hex()
    rep["inflight"] = bytes(buf[INFLIGHT_DST:INFLIGHT_DST + 64]).hex()
    cfg = _config(bdf)
    rep["command"] = struct.unpack_from("<H", cfg, 4)[0]
    rep["msi"] = _msi(cfg)
    edu = _bar0(bdf)
    rep["edu_id"] = edu.rd(0)
    rep["dma_old_iova"] = roundtrip(edu, buf, SRC_OFF, DST_OFF)
    print("@@LAB EDU-DMA-OK phase=%s" % os.environ.get("LAB_PHASE", "?") if rep["dma_old_iova"]
          else "edu DMA with the old IOVA failed", flush=True)
    # MSI through the old IRTE: nothing in this kernel owns its vector yet
    edu.wr(0x60, 0x1)
    time.sleep(0.2)
    rep["irq_status_after_raise"] = edu.rd(0x24)
    edu.wr(0x64, edu.rd(0x24))
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)


def intruder(bdf, out):
    """Not the owner: attach edu's group to a container of its own (its IOMMU domain is
    attached to edu), fail to open edu without the token, close everything (the group goes
    back to the kernel's domain). The adopted translation must survive both."""
    rep = {"translation_before": _translation(bdf)}
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    cfd = os.open("/dev/vfio/vfio", os.O_RDWR)
    gfd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    fcntl.ioctl(gfd, GROUP_SET_CONTAINER, bytearray(struct.pack("i", cfd)))
    fcntl.ioctl(cfd, SET_IOMMU, TYPE1v2)
    rep["attached"] = True
    try:
        os.close(fcntl.ioctl(gfd, GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0")))
        rep["open"] = "opened"
    except OSError as e:
        rep["open"] = errno.errorcode.get(e.errno, str(e.errno))
    os.close(gfd)
    os.close(cfd)
    rep["translation_after"] = _translation(bdf)
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)


def owner(bdf, buffer, out, token, wrong):
    rep = {}
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    cfd = os.open("/dev/vfio/vfio", os.O_RDWR)
    gfd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    fcntl.ioctl(gfd, GROUP_SET_CONTAINER, bytearray(struct.pack("i", cfd)))
    fcntl.ioctl(cfd, SET_IOMMU, TYPE1v2)
    dfd = None
    buf = _buffer(buffer)
    buf_va = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    # the token's open before the old IOVA is mapped again must fail and change nothing;
    # mapped onto the same dax buffer, the open hands the translation over
    steps = (("no_token", bdf, False), ("wrong_token", f"{bdf} vf_token={wrong}", False),
             ("owner_token_unmapped", f"{bdf} vf_token={token}", False),
             ("owner_token", f"{bdf} vf_token={token}", True))
    for label, name, map_first in steps:
        if map_first:
            rep["translation_before_map"] = _translation(bdf)
            rep["map_old"] = _map(cfd, buf_va, IOVA, BUF)
        try:
            dfd = fcntl.ioctl(gfd, GROUP_GET_DEVICE_FD, bytearray(name.encode() + b"\0"))
            rep[label] = "opened"
        except OSError as e:
            rep[label] = errno.errorcode.get(e.errno, str(e.errno))
            dfd = None
        if dfd is not None and label != "owner_token":
            os.close(dfd)
            dfd = None
    if dfd is None:
        with open(out, "w") as f:
            json.dump(rep, f, indent=1)
        return

    def region(index):
        ri = bytearray(struct.pack("IIIIQQ", 32, 0, index, 0, 0, 0))
        fcntl.ioctl(dfd, DEVICE_GET_REGION_INFO, ri)
        return struct.unpack("IIIIQQ", ri)[4:]

    _, cfg_off = region(CONFIG_REGION)
    rep["command_at_open"] = struct.unpack("<H", os.pread(dfd, 2, cfg_off + 4))[0]
    size, off = region(0)
    edu = Edu(mmap.mmap(dfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=off))
    # the old IOVA, mapped again by the owner: now through the owner's domain
    rep["dma_old_iova"] = roundtrip(edu, buf, OWNER_SRC, OWNER_DST)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    fcntl.ioctl(dfd, DEVICE_SET_IRQS,
                bytearray(struct.pack("IIIIIi", 24, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
                                      MSI_INDEX, 0, 1, efd)))
    rep["msi_after_owner"] = _msi(_config(bdf))
    try:
        with open("/sys/kernel/debug/iommu/intel/ir_translation_struct") as f:
            rep["ir_translation"] = f.read()
    except OSError as e:
        rep["ir_translation"] = f"unreadable: {e}"
    edu.wr(0x60, 0x1)
    r, _, _ = select.select([efd], [], [], 5)
    rep["msi_eventfd"] = "ok" if r else "timeout"
    edu.wr(0x64, edu.rd(0x24))
    print("@@LAB EDU-OWNER-OK phase=%s" % os.environ.get("LAB_PHASE", "?") if
          rep["dma_old_iova"] and r else "edu owner check failed", flush=True)
    # the owner's own domain now translates for edu: what it maps and unmaps decides
    rep["translation"] = _translation(bdf)
    own = mmap.mmap(-1, BUF, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    own_va = ctypes.addressof(ctypes.c_char.from_buffer(own))
    rep["map_new"] = _map(cfd, own_va, NEW_IOVA, BUF)
    rep["dma_new_iova"] = roundtrip(edu, own, SRC_OFF, DST_OFF, NEW_IOVA)
    # unmapped: edu can no longer reach the buffer through the old IOVA
    rep["unmapped_old"] = _unmap(cfd, IOVA, BUF)
    rep["dma_old_iova_unmapped"] = roundtrip(edu, buf, OWNER_SRC, OWNER_DST)
    rep["dma_new_iova_still"] = roundtrip(edu, own, SRC_OFF, DST_OFF, NEW_IOVA)
    rep["unmapped_new"] = _unmap(cfd, NEW_IOVA, BUF)
    rep["dma_new_iova_unmapped"] = roundtrip(edu, own, SRC_OFF, DST_OFF, NEW_IOVA)
    with open(out, "w") as f:
        json.dump(rep, f, indent=1)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"probe": probe, "owner": owner, "stage": stage, "kick": kick,
     "intruder": intruder, "map": map_more, "poke": poke}[cmd](*args)
