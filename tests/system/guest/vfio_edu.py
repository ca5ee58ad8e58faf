"""Guest-side helper: open QEMU's edu device through VFIO and leave it "live".

Runs inside the lab guest (Debian python3.11, stdlib only).  Usage::

    python3 vfio_edu.py 0000:00:03.0 READY_FILE STOP_FILE [BUFFER [TOKEN]]

BUFFER (optional) is a file to map as the DMA buffer instead of anonymous memory: a
device-dax node (/dev/daxN.M), whose memory survives a kexec, as guest RAM does in a VMM
fast restart. TOKEN (optional): the owner's UUID, presented as vf_token= to open a device a
keepalive kexec kept (the kernel hands the adopted translation over to this container's
domain at the open, once it checked that step 2 mapped the old IOVA onto the same memory).

It binds nothing itself (the caller sets driver_override and probes vfio-pci first).  It:
  1. attaches the device's IOMMU group to a type1 container,
  2. maps a 2 MiB buffer at IOVA 0x100000 (read/write) -> an IOMMU mapping exists, and
     opens the device,
  3. enables bus mastering and MSI vector 0 with an eventfd trigger -> an IRTE exists,
  4. makes edu DMA 64 bytes RAM -> edu -> RAM through the IOMMU and checks them,
  5. makes edu raise its interrupt and waits for the eventfd (MSI through IR),
then writes a report to READY_FILE and sleeps (holding everything) until STOP_FILE exists.
"""

import ctypes
import fcntl
import json
import mmap
import os
import select
import struct
import sys
import time

_T = ord(";") << 8
GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU = _T | 100, _T | 101, _T | 102
GROUP_GET_STATUS, GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD = _T | 103, _T | 104, _T | 106
DEVICE_GET_REGION_INFO, DEVICE_SET_IRQS, IOMMU_MAP_DMA = _T | 108, _T | 110, _T | 113
TYPE1v2 = 3
MSI_INDEX, CONFIG_REGION = 1, 7
IRQ_DATA_EVENTFD, IRQ_ACTION_TRIGGER = 4, 32
IOVA, BUF = 0x100000, 2 << 20
EDU_DMA_BUF = 0x40000


class Edu:
    """edu's registers through a mapping of BAR0 (QEMU hw/misc/edu.c)."""

    def __init__(self, bar):
        self.bar = bar
        # one aligned store per register write: struct.pack_into zero-fills its destination
        # before packing, i.e. two MMIO stores (0, then the value); a 0 written to edu's
        # raise register (0x60) re-fires a pending MSI (see vfio_nvme.py, where the same
        # double store re-ran whole submission queues)
        self.words = {"<I": memoryview(bar).cast("I"), "<Q": memoryview(bar).cast("Q")}

    def rd(self, off, fmt="<I"):
        return struct.unpack_from(fmt, self.bar, off)[0]

    def wr(self, off, val, fmt="<I"):
        w = self.words[fmt]
        w[off // w.itemsize] = val

    def start(self, src, dst, cmd, n=64):
        """Start a DMA (cmd bit 0 start, bit 1 edu -> RAM); edu ends it 100 ms later."""
        self.wr(0x80, src, "<Q")
        self.wr(0x88, dst, "<Q")
        self.wr(0x90, n, "<Q")
        self.wr(0x98, cmd, "<Q")

    def dma(self, src, dst, cmd, n=64):
        """A DMA to its end; False if edu still runs it after 5 s."""
        self.start(src, dst, cmd, n)
        t = time.monotonic()
        while self.rd(0x98, "<Q") & 1:
            if time.monotonic() - t > 5:
                return False
            time.sleep(0.001)
        return True


def main(bdf: str, ready: str, stop: str, buffer: str | None = None,
         token: str | None = None) -> None:
    report = []
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    cfd = os.open("/dev/vfio/vfio", os.O_RDWR)
    report.append(f"api_version={fcntl.ioctl(cfd, GET_API_VERSION)}")
    gfd = os.open(f"/dev/vfio/{group}", os.O_RDWR)
    st = bytearray(struct.pack("II", 8, 0))
    fcntl.ioctl(gfd, GROUP_GET_STATUS, st)
    report.append(f"group={group} status_flags={struct.unpack('II', st)[1]:#x}")
    fcntl.ioctl(gfd, GROUP_SET_CONTAINER, bytearray(struct.pack("i", cfd)))
    fcntl.ioctl(cfd, SET_IOMMU, TYPE1v2)
    # DMA buffer, mapped before the device is opened (a kept device's translation goes
    # over to this container only once every old IOVA is mapped again)
    if buffer:
        bfd = os.open(buffer, os.O_RDWR)
        buf = mmap.mmap(bfd, BUF, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        report.append(f"buffer={buffer}")
    else:
        buf = mmap.mmap(-1, BUF, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    vaddr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    fcntl.ioctl(cfd, IOMMU_MAP_DMA, bytearray(struct.pack("IIQQQ", 32, 3, vaddr, IOVA, BUF)))
    report.append(f"dma_map iova={IOVA:#x} size={BUF:#x}")
    # a device kept alive across a kexec opens only with its owner's token
    name = f"{bdf} vf_token={token}" if token else bdf
    dfd = fcntl.ioctl(gfd, GROUP_GET_DEVICE_FD, bytearray(name.encode() + b"\0"))

    def region(index):
        ri = bytearray(struct.pack("IIIIQQ", 32, 0, index, 0, 0, 0))
        fcntl.ioctl(dfd, DEVICE_GET_REGION_INFO, ri)
        _, flags, _, _, size, offset = struct.unpack("IIIIQQ", ri)
        return size, offset

    _, cfg_off = region(CONFIG_REGION)
    cmd = struct.unpack("<H", os.pread(dfd, 2, cfg_off + 4))[0]
    os.pwrite(dfd, struct.pack("<H", cmd | 0x6), cfg_off + 4)  # memory space + bus master
    # MSI vector 0 -> eventfd
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    fcntl.ioctl(dfd, DEVICE_SET_IRQS,
                bytearray(struct.pack("IIIIIi", 24, IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER,
                                      MSI_INDEX, 0, 1, efd)))
    report.append("msi enabled (1 vector, eventfd)")
    bar0_size, bar0_off = region(0)
    edu = Edu(mmap.mmap(dfd, bar0_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=bar0_off))
    report.append(f"edu id={edu.rd(0):#x}")
    # DMA RAM -> edu -> RAM through the IOMMU
    pattern = os.urandom(64)
    buf[0:64] = pattern
    for src, dst, cmd in ((IOVA, EDU_DMA_BUF, 1),              # from PCI (RAM) to edu
                          (EDU_DMA_BUF, IOVA + 4096, 1 | 2)):  # from edu to PCI (RAM)
        if not edu.dma(src, dst, cmd):
            raise TimeoutError("edu DMA did not finish")
    ok = bytes(buf[4096:4096 + 64]) == pattern
    report.append(f"dma_roundtrip={'ok' if ok else 'MISMATCH'}")
    report.append(f"pattern={pattern.hex()}")
    # interrupt: edu raises MSI when 0x60 is written; acknowledge via 0x64
    edu.wr(0x60, 0x1)
    r, _, _ = select.select([efd], [], [], 5)
    if r:
        n = struct.unpack("Q", os.read(efd, 8))[0]
        report.append(f"msi_eventfd=ok count={n}")
    else:
        report.append("msi_eventfd=TIMEOUT")
    edu.wr(0x64, edu.rd(0x24))
    with open(ready + ".tmp", "w") as f:
        f.write("\n".join(report) + "\n")
    os.rename(ready + ".tmp", ready)
    # edu's BAR0 for other processes while this one owns the device: a kernel with
    # CONFIG_IO_STRICT_DEVMEM (Debian's) refuses to mmap sysfs resource0 of a device a driver
    # (vfio-pci) claimed, so edu_keepalive.py stage/kick ask here (REQUEST, see serve())
    req = REQUEST.format(bdf=bdf)
    open(req + ".holder", "w").close()
    more = []   # memory mapped on request ("map"), kept for as long as the mapping

    def map_more(iova, size):
        m = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        more.append(m)
        va = ctypes.addressof(ctypes.c_char.from_buffer(m))
        fcntl.ioctl(cfd, IOMMU_MAP_DMA, bytearray(struct.pack("IIQQQ", 32, 3, va, iova, size)))
        return "ok"

    ops = {"dma": edu.dma, "start": edu.start, "rd": edu.rd, "map": map_more}
    while not os.path.exists(stop):
        if os.path.exists(req):
            serve(ops, req)
        time.sleep(0.05)


#: edu_keepalive.py's request to the holder: {"op": "dma"|"start"|"rd"|"map", "args": [...]}
#: as JSON ("map": fresh anonymous memory at an IOVA of this container); the answer
#: {"result": ...} comes back in REQUEST + ".done"
REQUEST = "/tmp/vfio-edu-{bdf}.req"


def serve(ops, req):
    with open(req) as f:
        r = json.load(f)
    os.unlink(req)
    try:
        out = {"result": ops[r["op"]](*r["args"])}
    except Exception as e:  # noqa: BLE001 - the asking process reports it
        out = {"error": repr(e)}
    with open(req + ".tmp", "w") as f:
        json.dump(out, f)
    os.rename(req + ".tmp", req + ".done")


if __name__ == "__main__":
    main(*sys.argv[1:6])
