"""Guest-side helper: a small user-space NVMe driver over VFIO, whose queues survive its process.

Runs inside the lab guest (Debian python3.11, stdlib only), on QEMU's nvme controller
(``lab.RunOptions(nvme=True)``: 00:08.0, MSI-X). Usage::

    python3 vfio_nvme.py init BDF BUFFER OUT.json [--queues N] [--rounds R] [--token T]
                              [--inflight QID] [--hold READY STOP]
    python3 vfio_nvme.py resume BDF BUFFER OUT.json [--rounds R] [--token T] [--inflight QID]
                              [--hold READY STOP]
    python3 vfio_nvme.py request BDF OP [ARG ...]       # ask a holding process (see serve())

BUFFER is the DMA memory: a file to map (a device-dax node /dev/daxN.M, whose memory
survives a kexec; or a regular file, created at 2 MiB) or ``anon`` (anonymous memory, lost
with the process). It is mapped at IOVA 0x400000 (read/write) of a type1v2 container
BEFORE the device is opened (a device a keepalive kexec kept opens only once its old IOVA
is mapped again). TOKEN: the owner's UUID, the device is opened as "BDF vf_token=TOKEN".

init: disables the controller (CC.EN=0, waits CSTS.RDY=0), puts the admin queue pair in the
buffer (AQA/ASQ/ACQ), enables it (CC.EN=1 with IOSQES=6, IOCQES=4, MPS=4 KiB; waits
CSTS.RDY=1), Identify Controller and Namespace 1, Set Features Number of Queues, then creates
N I/O queue pairs (16 entries each), CQ n on MSI-X vector n (the admin CQ is vector 0; one
eventfd per vector through VFIO_DEVICE_SET_IRQS, VFIO_PCI_MSIX_IRQ_INDEX), and runs R rounds
of a 4 KiB write + read-back of a random pattern on every I/O queue, each completion waited
for by its vector's eventfd and found by its phase tag. R >= 8 wraps the queues (the phase
flips).

--inflight QID: after the rounds, submit one more write on queue QID, ring its doorbell, save
the state and leave its CQE in the queue's CQ for the next owner (what a kexec in the middle
of I/O leaves): the process only watches the CQ memory until the CQE is there (without
reaping it or writing the CQ head doorbell), since a stock kernel clears bus mastering at
close. ``request inflight`` in hold mode does not wait at all.

resume: maps BUFFER again at the same IOVA, reads the saved state from the buffer itself,
notes the CQEs already posted past the saved CQ heads (reading the buffer only), opens the
device, and checks, with register READS only, that the controller is the one it
left: CC.EN=1, CSTS.RDY=1 (and not CFS), AQA/ASQ/ACQ equal to the saved ones. If not, the
controller was reset in between (vfio-pci's FLR at close/open on a stock kernel): it reports
``controller_reset: true`` and does nothing else (no CC write, no re-initialisation).
Otherwise it enables MSI-X with eventfds for the same vectors (no controller register is
written), reaps what completed while no process owned the device (a command left in flight
by ``request inflight``; its data is read back and checked), then goes on submitting on the
same queues from the saved SQ tails / CQ heads / phase tags / command ids, one Identify on
the admin queue, R rounds of I/O on every queue, each completion on its queue's vector.

Every register and doorbell access is one aligned 32-bit load or store (BAR0 seen as a
memoryview of 32-bit words), never ``struct.pack_into``, which stores 0 before the value: a
doorbell at 0 for a moment is a doorbell write the controller acts on (see ``Nvme.rd32``). A
CQE is taken by its status word (the phase tag) first, its other fields read after it.

State (``STATE_OFF``, page 0 of the buffer: b"HOVNVME1", length, crc32, JSON; also OUT.json's
"state"): IOVA and layout, AQA/ASQ/ACQ, every queue's size, addresses, vector, SQ tail, SQ head
(from the last CQE), CQ head, phase, next command id and the commands in flight, the
namespace's LBA size, the last pattern written per queue. It is saved after every command
(and written to ``--state FILE`` then too); resume trusts the buffer's copy.

hold: after init/resume, writes READY and keeps everything open until STOP exists, serving
requests (REQUEST): "io" (one round on every queue), "inflight" (submit a write on a queue,
ring the doorbell and return without waiting: the command in flight across a kexec),
"reload" (drop the in-memory queue state, reload it from the buffer and do a round: the
resume path without a new open), "regs", "save". On STOP it saves the state and exits.

Every outcome goes into OUT.json ("ok": every check passed); the exit status is 1 when a
check failed or the helper broke, else 0 (also when resume found the controller reset: the
test judges "controller_reset").
"""

import argparse
import binascii
import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import select
import struct
import sys
import time

# VFIO (include/uapi/linux/vfio.h)
_T = ord(";") << 8
GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU = _T | 100, _T | 101, _T | 102
GROUP_GET_STATUS, GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD = _T | 103, _T | 104, _T | 106
DEVICE_GET_REGION_INFO, DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS = _T | 108, _T | 109, _T | 110
IOMMU_MAP_DMA = _T | 113
TYPE1v2 = 3
MSIX_INDEX, CONFIG_REGION = 2, 7
IRQ_DATA_NONE, IRQ_DATA_EVENTFD, IRQ_ACTION_TRIGGER = 1, 4, 32

# NVMe controller registers (BAR0) and commands
REG_CAP, REG_VS, REG_INTMS, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = \
    0x00, 0x08, 0x0C, 0x14, 0x1C, 0x24, 0x28, 0x30
DOORBELLS = 0x1000
CC_EN, CC_IOSQES, CC_IOCQES = 1, 6 << 16, 4 << 20
CSTS_RDY, CSTS_CFS = 1, 2
ADM_CREATE_SQ, ADM_CREATE_CQ, ADM_IDENTIFY, ADM_SET_FEATURES = 0x01, 0x05, 0x06, 0x09
IO_WRITE, IO_READ = 0x01, 0x02
FEAT_NUM_QUEUES = 0x07

# the DMA buffer: IOVA and layout
IOVA, BUF = 0x400000, 2 << 20
PAGE = 4096
STATE_OFF, ASQ_OFF, ACQ_OFF, IDC_OFF, IDN_OFF = 0x0000, 0x1000, 0x2000, 0x3000, 0x4000
ADMIN_QSIZE, IO_QSIZE = 32, 16
MAGIC = b"HOVNVME1"
BAR_MAP = 0x2000            # registers + doorbells (the MSI-X table lies above)


def ioq_off(qid):
    """(SQ, CQ) offsets of I/O queue pair ``qid`` (1-based) in the buffer."""
    return 0x10000 + (qid - 1) * 0x2000, 0x10000 + (qid - 1) * 0x2000 + 0x1000


def data_off(qid):
    """Data pages of queue ``qid``: write source, read destination, in-flight source."""
    base = 0x40000 + (qid - 1) * 0x10000
    return base, base + PAGE, base + 2 * PAGE


def _errname(e):
    return errno.errorcode.get(e.errno, str(e.errno))


class NvmeError(Exception):
    pass


class Queue:
    """One submission/completion queue pair as the driver sees it (qid 0: admin)."""

    FIELDS = ("qid", "size", "sq_off", "cq_off", "vector", "sq_tail", "sq_head", "cq_head",
              "phase", "next_cid", "inflight")

    def __init__(self, qid, size, sq_off, cq_off, vector):
        self.qid, self.size, self.sq_off, self.cq_off, self.vector = qid, size, sq_off, cq_off, vector
        self.sq_tail = self.sq_head = self.cq_head = 0
        self.phase = 1
        self.next_cid = 1
        self.inflight = {}      # str(cid) -> what the command was (dict)

    def to_dict(self):
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_dict(cls, d):
        q = cls(d["qid"], d["size"], d["sq_off"], d["cq_off"], d["vector"])
        for k in cls.FIELDS:
            setattr(q, k, d[k])
        return q


class Vfio:
    """A type1v2 container with the device's group, the buffer mapped at IOVA, the device fd."""

    def __init__(self, bdf, buffer, report):
        self.bdf, self.report = bdf, report
        self.group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
        report["group"] = self.group
        self.cfd = os.open("/dev/vfio/vfio", os.O_RDWR)
        report["api_version"] = fcntl.ioctl(self.cfd, GET_API_VERSION)
        try:
            self.gfd = os.open(f"/dev/vfio/{self.group}", os.O_RDWR)
        except OSError as e:
            report["open"] = {"stage": "group", "error": _errname(e)}
            raise
        st = bytearray(struct.pack("II", 8, 0))
        fcntl.ioctl(self.gfd, GROUP_GET_STATUS, st)
        report["group_flags"] = struct.unpack("II", st)[1]
        fcntl.ioctl(self.gfd, GROUP_SET_CONTAINER, bytearray(struct.pack("i", self.cfd)))
        fcntl.ioctl(self.cfd, SET_IOMMU, TYPE1v2)
        self.buf = self._buffer(buffer)
        va = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        fcntl.ioctl(self.cfd, IOMMU_MAP_DMA, bytearray(struct.pack("IIQQQ", 32, 3, va, IOVA, BUF)))
        report["dma_map"] = {"iova": IOVA, "size": BUF, "buffer": buffer}

    @staticmethod
    def _buffer(path):
        """"anon", a file, or a device-dax node; "PATH@OFFSET" maps it from OFFSET (a
        device-dax shared with another device's driver)."""
        if path == "anon":
            return mmap.mmap(-1, BUF, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        path, _, off = path.partition("@")
        off = int(off or "0", 0)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.path.isfile(path) and os.fstat(fd).st_size < off + BUF:
                os.ftruncate(fd, off + BUF)
            return mmap.mmap(fd, BUF, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=off)
        finally:
            os.close(fd)

    def open_device(self, token=None):
        name = f"{self.bdf} vf_token={token}" if token else self.bdf
        try:
            self.dfd = fcntl.ioctl(self.gfd, GROUP_GET_DEVICE_FD, bytearray(name.encode() + b"\0"))
        except OSError as e:
            self.report["open"] = {"stage": "device", "error": _errname(e)}
            raise
        self.report["open"] = {"stage": "device", "error": None, "token": bool(token)}
        _, self.cfg_off = self.region(CONFIG_REGION)
        size, off = self.region(0)
        self.bar = mmap.mmap(self.dfd, min(size, BAR_MAP), mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
        self.report["bar0_size"] = size

    def region(self, index):
        ri = bytearray(struct.pack("IIIIQQ", 32, 0, index, 0, 0, 0))
        fcntl.ioctl(self.dfd, DEVICE_GET_REGION_INFO, ri)
        return struct.unpack("IIIIQQ", ri)[4:]

    def command(self, value=None):
        """PCI command register (config space through VFIO); set it when ``value`` is given."""
        if value is not None:
            os.pwrite(self.dfd, struct.pack("<H", value), self.cfg_off + 4)
        return struct.unpack("<H", os.pread(self.dfd, 2, self.cfg_off + 4))[0]

    def msix(self, nvec):
        """MSI-X vectors 0..nvec-1 -> one eventfd each."""
        info = bytearray(struct.pack("IIII", 16, 0, MSIX_INDEX, 0))
        fcntl.ioctl(self.dfd, DEVICE_GET_IRQ_INFO, info)
        count = struct.unpack("IIII", info)[3]
        self.report["msix_count"] = count
        if count < nvec:
            raise NvmeError(f"{nvec} MSI-X vectors wanted, the device has {count}")
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(nvec)]
        fcntl.ioctl(self.dfd, DEVICE_SET_IRQS,
                    bytearray(struct.pack(f"IIIII{nvec}i", 20 + 4 * nvec,
                                          IRQ_DATA_EVENTFD | IRQ_ACTION_TRIGGER, MSIX_INDEX, 0,
                                          nvec, *efds)))
        return efds


class Nvme:
    """The controller through BAR0 and the queues in the DMA buffer."""

    def __init__(self, bar, buf, efds, log):
        self.bar, self.buf, self.efds, self.log = bar, buf, efds, log
        self.reg = memoryview(bar).cast("I")     # BAR0 as 32-bit words: see rd32/wr32
        self.irq_counts = [0] * len(efds)
        self.queues = {}
        self.state = {}
        self.state_file = None      # also written at every save when set (--state)
        cap = self.rd64(REG_CAP)
        self.dstrd = 4 << ((cap >> 32) & 0xF)

    # registers: aligned 32-bit accesses, each ONE load or store (x86: native order is the
    # registers' little-endian). Not struct.pack_into: CPython's pack_into zero-fills its
    # destination before it packs the value (s_pack_internal's memset), so every register
    # write through it was two stores, 0 and then the value. A doorbell that reads 0 for a
    # moment is a real doorbell write: an SQ tail of 0 made the controller fetch and run
    # every slot from its head to the end of the ring (stale commands of the previous lap,
    # executed again, and zeroed slots) and post their CQEs; a CQ head of 0 hands back
    # entries not yet consumed.
    def rd32(self, off):
        assert off % 4 == 0, off
        return self.reg[off >> 2]

    def wr32(self, off, val):
        assert off % 4 == 0, off
        self.reg[off >> 2] = val & 0xFFFFFFFF

    def rd64(self, off):
        return self.rd32(off) | self.rd32(off + 4) << 32

    def wr64(self, off, val):
        self.wr32(off, val)
        self.wr32(off + 4, val >> 32)

    def regs(self):
        return {"cap": hex(self.rd64(REG_CAP)), "vs": hex(self.rd32(REG_VS)),
                "cc": self.rd32(REG_CC), "csts": self.rd32(REG_CSTS), "aqa": self.rd32(REG_AQA),
                "asq": self.rd64(REG_ASQ), "acq": self.rd64(REG_ACQ)}

    def wait_rdy(self, want, timeout):
        t = time.monotonic()
        while (self.rd32(REG_CSTS) & CSTS_RDY) != want:
            if self.rd32(REG_CSTS) & CSTS_CFS:
                raise NvmeError(f"CSTS.CFS waiting for RDY={want}")
            if time.monotonic() - t > timeout:
                raise NvmeError(f"CSTS.RDY did not become {want} in {timeout} s")
            time.sleep(0.001)
        return time.monotonic() - t

    # queues
    def submit(self, q, opcode, nsid=0, prp1=0, prp2=0, cdw=(), what=None):
        if (q.sq_tail + 1) % q.size == q.sq_head:
            raise NvmeError(f"SQ {q.qid} full")
        cid = q.next_cid
        q.next_cid = q.next_cid % 0xFFFF + 1
        dw = list(cdw) + [0] * (6 - len(cdw))
        sqe = struct.pack("<BBHIQQQQ6I", opcode, 0, cid, nsid, 0, 0, prp1, prp2, *dw)
        off = q.sq_off + q.sq_tail * 64
        self.buf[off:off + 64] = sqe
        q.sq_tail = (q.sq_tail + 1) % q.size
        q.inflight[str(cid)] = dict(what or {}, opcode=opcode)
        self.wr32(DOORBELLS + (2 * q.qid) * self.dstrd, q.sq_tail)
        return cid

    def reap(self, q):
        """Every CQE the controller posted (phase tag = the expected phase), in order; the CQ
        head doorbell is written once after them."""
        out = []
        while True:
            slot = q.cq_head
            cqe = read_cqe(self.buf, q.cq_off + slot * 16, q.phase)
            if cqe is None:
                break
            dw0, sq_head, sq_id, cid, status = cqe
            q.cq_head += 1
            if q.cq_head == q.size:
                q.cq_head, q.phase = 0, q.phase ^ 1
            q.sq_head = sq_head
            what = q.inflight.pop(str(cid), None)
            out.append({"cid": cid, "sq_id": sq_id, "status": status >> 1, "result": dw0,
                        "phase": status & 1, "known": what is not None, "what": what,
                        "slot": slot, "sq_head": sq_head})
        if out:
            self.wr32(DOORBELLS + (2 * q.qid + 1) * self.dstrd, q.cq_head)
        return out

    def _drain(self, vector, timeout):
        r, _, _ = select.select([self.efds[vector]], [], [], timeout)
        if r:
            self.irq_counts[vector] += struct.unpack("Q", os.read(self.efds[vector], 8))[0]
            return True
        return False

    def wait(self, q, cid, timeout=20.0):
        """Wait for command ``cid`` on ``q``: its vector's eventfd, then the CQE by its phase
        tag. Returns the CQE (with "irq": whether the vector fired for it)."""
        t = time.monotonic()
        irq = False
        found = None
        while found is None:
            if self._drain(q.vector, 0.5):
                irq = True
            for c in self.reap(q):
                if c["cid"] == cid:
                    found = c
                else:
                    self.log.setdefault("other_cqes", []).append(c)
            if time.monotonic() - t > timeout:
                raise NvmeError(f"no completion of cid {cid} on queue {q.qid} in {timeout} s")
        if not irq:    # the CQE can be seen just before the interrupt is handled
            irq = self._drain(q.vector, 2.0)
        found["irq"] = irq
        found["vector"] = q.vector
        found["wait_s"] = round(time.monotonic() - t, 4)
        return found

    def command(self, q, opcode, what=None, **kw):
        cid = self.submit(q, opcode, what=what, **kw)
        c = self.wait(q, cid)
        if c["status"]:
            raise NvmeError(f"queue {q.qid} opcode {opcode:#x} cid {cid}: status {c['status']:#x}")
        return c

    def admin(self, opcode, **kw):
        return self.command(self.queues[0], opcode, **kw)

    # identify
    def identify(self):
        self.buf[IDC_OFF:IDC_OFF + PAGE] = bytes(PAGE)
        self.admin(ADM_IDENTIFY, prp1=IOVA + IDC_OFF, cdw=(1,), what={"cmd": "identify-ctrl"})
        idc = bytes(self.buf[IDC_OFF:IDC_OFF + PAGE])
        ctrl = {"vid": hex(struct.unpack_from("<H", idc, 0)[0]),
                "sn": idc[4:24].decode(errors="replace").strip(),
                "mn": idc[24:64].decode(errors="replace").strip(),
                "fr": idc[64:72].decode(errors="replace").strip(),
                "sqes": idc[512], "cqes": idc[513], "nn": struct.unpack_from("<I", idc, 516)[0]}
        self.buf[IDN_OFF:IDN_OFF + PAGE] = bytes(PAGE)
        self.admin(ADM_IDENTIFY, nsid=1, prp1=IOVA + IDN_OFF, cdw=(0,), what={"cmd": "identify-ns"})
        idn = bytes(self.buf[IDN_OFF:IDN_OFF + PAGE])
        flbas = idn[26] & 0xF
        lbads = (struct.unpack_from("<I", idn, 128 + 4 * flbas)[0] >> 16) & 0xFF
        ns = {"nsid": 1, "nsze": struct.unpack_from("<Q", idn, 0)[0], "lba_size": 1 << lbads}
        return ctrl, ns

    # I/O
    def io_round(self, q, seq):
        """Write a random 4 KiB pattern from the queue's write page to its next LBA slot, read it
        back into the read page, compare. Returns the record of both commands."""
        lba_size = self.state["ns"]["lba_size"]
        nlb = PAGE // lba_size
        slba = (q.qid - 1) * 1024 + (seq % 64) * nlb
        src, dst, _ = data_off(q.qid)
        pattern = os.urandom(PAGE)
        self.buf[src:src + PAGE] = pattern
        self.buf[dst:dst + PAGE] = bytes(PAGE)
        tail0, phase0 = q.sq_tail, q.phase
        w = self.command(q, IO_WRITE, nsid=1, prp1=IOVA + src, cdw=(slba, 0, nlb - 1),
                         what={"cmd": "write", "slba": slba})
        r = self.command(q, IO_READ, nsid=1, prp1=IOVA + dst, cdw=(slba, 0, nlb - 1),
                         what={"cmd": "read", "slba": slba})
        ok = bytes(self.buf[dst:dst + PAGE]) == pattern
        sha = hashlib.sha256(pattern).hexdigest()[:16]
        self.state["written"][str(q.qid)] = {"slba": slba, "sha": sha}
        return {"qid": q.qid, "seq": seq, "slba": slba, "sq_tail_before": tail0,
                "phase_before": phase0, "write_cid": w["cid"], "read_cid": r["cid"],
                "irq": w["irq"] and r["irq"], "vector": q.vector, "data_ok": ok,
                "sq_head_seen": [w["sq_head"], r["sq_head"]],
                "sq_tail_after": q.sq_tail, "cq_head_after": q.cq_head, "phase_after": q.phase}

    def read_check(self, q, slba, sha):
        """Read 4 KiB at ``slba`` on ``q`` and compare with the pattern's hash."""
        nlb = PAGE // self.state["ns"]["lba_size"]
        _, dst, _ = data_off(q.qid)
        self.buf[dst:dst + PAGE] = bytes(PAGE)
        c = self.command(q, IO_READ, nsid=1, prp1=IOVA + dst, cdw=(slba, 0, nlb - 1),
                         what={"cmd": "read", "slba": slba})
        got = hashlib.sha256(bytes(self.buf[dst:dst + PAGE])).hexdigest()[:16]
        return {"qid": q.qid, "slba": slba, "cid": c["cid"], "irq": c["irq"],
                "data_ok": got == sha}

    def inflight(self, q):
        """Submit a write and return without waiting for it (its CQE comes later)."""
        lba_size = self.state["ns"]["lba_size"]
        nlb = PAGE // lba_size
        slba = (q.qid - 1) * 1024 + 512
        _, _, src = data_off(q.qid)
        pattern = os.urandom(PAGE)
        self.buf[src:src + PAGE] = pattern
        sha = hashlib.sha256(pattern).hexdigest()[:16]
        cid = self.submit(q, IO_WRITE, nsid=1, prp1=IOVA + src, cdw=(slba, 0, nlb - 1),
                          what={"cmd": "write", "slba": slba, "sha": sha, "inflight": True})
        self.save()
        return {"qid": q.qid, "cid": cid, "slba": slba, "sha": sha, "sq_tail": q.sq_tail}

    # state
    def snapshot(self):
        st = dict(self.state)
        st["queues"] = [self.queues[k].to_dict() for k in sorted(self.queues)]
        st["saved_at"] = time.time()
        st["generation"] = st.get("generation", 0) + 1
        return st

    def save(self, path=None):
        path = path or self.state_file
        st = self.snapshot()
        self.state["generation"] = st["generation"]
        blob = json.dumps(st, sort_keys=True).encode()
        if 16 + len(blob) > PAGE:
            raise NvmeError(f"state of {len(blob)} bytes does not fit in a page")
        self.buf[STATE_OFF + 16:STATE_OFF + 16 + len(blob)] = blob
        self.buf[STATE_OFF:STATE_OFF + 16] = MAGIC + struct.pack("<II", len(blob),
                                                                 binascii.crc32(blob))
        if path:
            with open(path + ".tmp", "w") as f:
                json.dump(st, f, indent=1, sort_keys=True)
            os.rename(path + ".tmp", path)
        return st

    def load(self, st):
        self.state = {k: v for k, v in st.items() if k != "queues"}
        self.queues = {d["qid"]: Queue.from_dict(d) for d in st["queues"]}


def read_cqe(buf, off, phase):
    """The CQE at ``off`` if its phase tag is ``phase`` (posted in the current lap), else None:
    (DW0, SQ head, SQ id, command id, status field with the phase tag in bit 0). The status
    word is read first and the rest only after it, so an entry the controller writes while
    we look is never taken half old, half new (x86 does not reorder loads)."""
    (status,) = struct.unpack_from("<H", buf, off + 14)
    if status & 1 != phase:
        return None
    dw0, _, sq_head, sq_id, cid = struct.unpack_from("<IIHHH", buf, off)
    return dw0, sq_head, sq_id, cid, status


def peek(buf, st):
    """Read-only: the CQEs the controller posted past each saved CQ head (expected phase)."""
    out = {}
    for q in st["queues"]:
        head, phase, cids = q["cq_head"], q["phase"], []
        for _ in range(q["size"]):
            cqe = read_cqe(buf, q["cq_off"] + head * 16, phase)
            if cqe is None:
                break
            cids.append(cqe[3])
            head += 1
            if head == q["size"]:
                head, phase = 0, phase ^ 1
        out[str(q["qid"])] = cids
    return out


def read_state(buf):
    """The state block of the buffer (page 0), or None with the reason."""
    if bytes(buf[STATE_OFF:STATE_OFF + 8]) != MAGIC:
        return None, "no state block (magic)"
    n, crc = struct.unpack_from("<II", buf, STATE_OFF + 8)
    blob = bytes(buf[STATE_OFF + 16:STATE_OFF + 16 + n])
    if n > PAGE - 16 or binascii.crc32(blob) != crc:
        return None, "state block crc mismatch"
    return json.loads(blob), None


def _write(out, report):
    with open(out + ".tmp", "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.rename(out + ".tmp", out)


def _timed(report, name, t0):
    report.setdefault("timings", {})[name] = round(time.monotonic() - t0, 4)


def init(args, report):
    t0 = time.monotonic()
    v = Vfio(args.bdf, args.buffer, report)
    v.open_device(args.token)
    report["command_at_open"] = v.command()
    v.command(report["command_at_open"] | 0x6)           # memory space + bus master
    nq = args.queues
    efds = v.msix(nq + 1)
    n = Nvme(v.bar, v.buf, efds, report)
    n.state_file = args.state
    _timed(report, "open", t0)
    report["regs_at_open"] = n.regs()
    cap = n.rd64(REG_CAP)
    timeout = max(((cap >> 24) & 0xFF) * 0.5, 1.0)
    report["cap"] = {"mqes": (cap & 0xFFFF) + 1, "dstrd": n.dstrd, "to_s": timeout,
                     "mpsmin": 1 << (12 + ((cap >> 48) & 0xF))}
    t = time.monotonic()
    if n.rd32(REG_CC) & CC_EN:
        n.wr32(REG_CC, 0)
    report["disable_s"] = round(n.wait_rdy(0, timeout), 4)
    # the admin queue pair in the buffer; the rest of the buffer cleared
    v.buf[0:BUF] = bytes(BUF)
    aq = Queue(0, ADMIN_QSIZE, ASQ_OFF, ACQ_OFF, 0)
    n.queues = {0: aq}
    n.state = {"version": 1, "bdf": args.bdf, "iova": IOVA, "size": BUF, "vectors": nq + 1,
               "layout": {"state": STATE_OFF, "asq": ASQ_OFF, "acq": ACQ_OFF,
                          "io_queues": [ioq_off(i) for i in range(1, nq + 1)],
                          "data": [data_off(i) for i in range(1, nq + 1)]},
               "written": {}}
    aqa = (ADMIN_QSIZE - 1) << 16 | (ADMIN_QSIZE - 1)
    n.wr32(REG_AQA, aqa)
    n.wr64(REG_ASQ, IOVA + ASQ_OFF)
    n.wr64(REG_ACQ, IOVA + ACQ_OFF)
    n.wr32(REG_CC, CC_EN | CC_IOSQES | CC_IOCQES)
    report["enable_s"] = round(n.wait_rdy(1, timeout), 4)
    n.state["regs"] = {"aqa": aqa, "asq": IOVA + ASQ_OFF, "acq": IOVA + ACQ_OFF,
                       "cc": CC_EN | CC_IOSQES | CC_IOCQES}
    _timed(report, "enable", t)
    t = time.monotonic()
    report["identify"], n.state["ns"] = n.identify()
    report["ns"] = n.state["ns"]
    c = n.admin(ADM_SET_FEATURES, cdw=(FEAT_NUM_QUEUES, (nq - 1) << 16 | (nq - 1)),
                what={"cmd": "set-features num-queues"})
    report["num_queues_result"] = {"nsqa": (c["result"] & 0xFFFF) + 1, "ncqa": (c["result"] >> 16) + 1}
    for qid in range(1, nq + 1):
        sq_off, cq_off = ioq_off(qid)
        q = Queue(qid, IO_QSIZE, sq_off, cq_off, qid)
        n.admin(ADM_CREATE_CQ, prp1=IOVA + cq_off,
                cdw=((IO_QSIZE - 1) << 16 | qid, qid << 16 | 0x3),   # IV=qid, IEN, PC
                what={"cmd": "create-cq", "qid": qid})
        n.admin(ADM_CREATE_SQ, prp1=IOVA + sq_off,
                cdw=((IO_QSIZE - 1) << 16 | qid, qid << 16 | 0x1),   # CQID=qid, PC
                what={"cmd": "create-sq", "qid": qid})
        n.queues[qid] = q
    n.save()
    _timed(report, "identify+queues", t)
    return v, n


def run_io(n, rounds, report, key="io"):
    t = time.monotonic()
    recs = report.setdefault(key, [])
    seq0 = n.state.get("seq", 0)
    for i in range(rounds):
        for qid in sorted(n.queues):
            if qid:
                recs.append(n.io_round(n.queues[qid], seq0 + i))
                n.save()
    n.state["seq"] = seq0 + rounds
    n.save()
    _timed(report, key, t)
    return all(r["data_ok"] and r["irq"] for r in recs)


def resume(args, report):
    t0 = time.monotonic()
    v = Vfio(args.bdf, args.buffer, report)       # maps the buffer at IOVA before the open
    st, why = read_state(v.buf)
    if st is None:
        raise NvmeError(f"resume: {why}")
    report["saved"] = {"generation": st["generation"],
                       "queues": {str(q["qid"]): {k: q[k] for k in ("sq_tail", "sq_head", "cq_head",
                                                                    "phase", "next_cid")}
                                  for q in st["queues"]},
                       # copies: load() shares these dicts and reaping empties them
                       "inflight": {str(q["qid"]): dict(q["inflight"]) for q in st["queues"]}}
    report["cq_posted_before_open"] = peek(v.buf, st)
    v.open_device(args.token)
    report["command_at_open"] = v.command()
    # read-only look at the controller: is it the one the state describes?
    n = Nvme(v.bar, v.buf, [], report)
    regs = n.regs()
    report["regs_at_open"] = regs
    saved = st["regs"]
    evidence = {"cc_en": bool(regs["cc"] & CC_EN), "csts_rdy": bool(regs["csts"] & CSTS_RDY),
                "csts_cfs": bool(regs["csts"] & CSTS_CFS), "aqa": regs["aqa"] == saved["aqa"],
                "asq": regs["asq"] == saved["asq"], "acq": regs["acq"] == saved["acq"]}
    report["reset_evidence"] = evidence
    kept = (evidence["cc_en"] and evidence["csts_rdy"] and not evidence["csts_cfs"]
            and evidence["aqa"] and evidence["asq"] and evidence["acq"])
    report["controller_reset"] = not kept
    _timed(report, "open+check", t0)
    if not kept:
        report["action"] = "none: the controller was reset (not re-initialised)"
        report["regs_after"] = n.regs()
        return v, None
    if not report["command_at_open"] & 0x4:
        v.command(report["command_at_open"] | 0x6)
    n.state_file = args.state
    n.efds = v.msix(st["vectors"])
    n.irq_counts = [0] * len(n.efds)
    n.load(st)
    t = time.monotonic()
    # what completed while nobody owned the device (interrupts then went nowhere)
    reaped, checks = [], []
    for qid in sorted(n.queues):
        q = n.queues[qid]
        got = n.reap(q)
        pending = {c: w for c, w in q.inflight.items()}
        for c in got:
            c["qid"] = qid
        reaped += got
        for cid, w in pending.items():       # still in flight: wait for it on its vector
            c = n.wait(q, int(cid))
            c["qid"] = qid
            c["waited"] = True
            reaped.append(c)
    for c in reaped:
        w = c.get("what") or {}
        if w.get("inflight"):
            checks.append(dict(n.read_check(n.queues[c["qid"]], w["slba"], w["sha"]),
                               status=c["status"]))
    report["reaped"] = reaped
    report["inflight_checks"] = checks
    n.save()
    # the admin queue goes on too, then I/O on every queue
    n.state.setdefault("written", {})
    report["identify_after_resume"], _ = n.identify()
    report["admin_after"] = n.queues[0].to_dict()
    _timed(report, "reap+identify", t)
    ok = run_io(n, args.rounds, report)
    report["ok_io"] = ok
    report["ok_inflight"] = all(c["data_ok"] and not c["status"] for c in checks)
    return v, n


def serve(n, req, report):
    with open(req) as f:
        r = json.load(f)
    os.unlink(req)
    op, a = r["op"], r.get("args", [])
    try:
        if op == "io":
            rep = {}
            ok = run_io(n, int(a[0]) if a else 1, rep)
            out = {"result": {"ok": ok, "io": rep["io"]}}
        elif op == "inflight":
            out = {"result": n.inflight(n.queues[int(a[0]) if a else 1])}
        elif op == "reload":        # the resume path without a new open
            st, why = read_state(n.buf)
            if st is None:
                raise NvmeError(why)
            n.load(st)
            rep = {}
            ok = run_io(n, int(a[0]) if a else 1, rep)
            out = {"result": {"ok": ok, "generation": st["generation"], "io": rep["io"]}}
        elif op == "regs":
            out = {"result": n.regs()}
        elif op == "save":
            out = {"result": n.save()["generation"]}
        else:
            raise NvmeError(f"unknown op {op}")
    except Exception as e:  # noqa: BLE001 - the asking process reports it
        out = {"error": repr(e)}
    report.setdefault("requests", []).append({"op": op, "args": a, "out": out})
    with open(req + ".tmp", "w") as f:
        json.dump(out, f)
    os.rename(req + ".tmp", req + ".done")


#: a request to the holding process: {"op": ..., "args": [...]} as JSON; the answer
#: {"result": ...} or {"error": ...} comes back in REQUEST + ".done"
REQUEST = "/tmp/vfio-nvme-{bdf}.req"


def request(bdf, op, *args, timeout=30.0):
    req = REQUEST.format(bdf=bdf)
    done = req + ".done"
    if os.path.exists(done):
        os.unlink(done)
    with open(req + ".tmp", "w") as f:
        json.dump({"op": op, "args": list(args)}, f)
    os.rename(req + ".tmp", req)
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if os.path.exists(done):
            with open(done) as f:
                r = json.load(f)
            os.unlink(done)
            return r
        time.sleep(0.02)
    raise TimeoutError(f"vfio_nvme.py holder did not answer {op}")


def hold(n, args, report):
    with open(args.hold[0] + ".tmp", "w") as f:
        json.dump({"ok": report.get("ok"), "pid": os.getpid(),
                   "generation": n.state["generation"]}, f)
    os.rename(args.hold[0] + ".tmp", args.hold[0])
    req = REQUEST.format(bdf=args.bdf)
    open(req + ".holder", "w").close()
    while not os.path.exists(args.hold[1]):
        if os.path.exists(req):
            serve(n, req, report)
        time.sleep(0.05)
    os.unlink(req + ".holder")


def main(argv=None):
    p = argparse.ArgumentParser(prog="vfio_nvme.py")
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("init", "resume"):
        s = sub.add_parser(mode)
        s.add_argument("bdf")
        s.add_argument("buffer")
        s.add_argument("out")
        s.add_argument("--rounds", type=int, default=2)
        s.add_argument("--token")
        s.add_argument("--hold", nargs=2, metavar=("READY", "STOP"))
        s.add_argument("--state", metavar="FILE", help="write the state here at every save too")
        s.add_argument("--inflight", type=int, metavar="QID",
                       help="at the end, leave a write in flight on this queue")
        if mode == "init":
            s.add_argument("--queues", type=int, default=2)
    s = sub.add_parser("request")
    s.add_argument("bdf")
    s.add_argument("op")
    s.add_argument("args", nargs="*")
    args = p.parse_args(argv)
    if args.mode == "request":
        r = request(args.bdf, args.op, *args.args)
        print(json.dumps(r, indent=1))
        return 0 if "error" not in r else 1
    report = {"mode": args.mode, "bdf": args.bdf, "pid": os.getpid()}
    rc = 1
    n = None
    try:
        if args.mode == "init":
            v, n = init(args, report)
            report["ok"] = run_io(n, args.rounds, report)
        else:
            v, n = resume(args, report)
            report["ok"] = n is None or (report["ok_io"] and report["ok_inflight"])
        if n is not None and args.inflight:
            left = n.inflight(n.queues[args.inflight])
            # not reaped; but wait (buffer reads only) until the controller posted its CQE:
            # a stock kernel clears bus mastering at close, which would fail a later CQE write
            t = time.monotonic()
            while str(left["cid"]) not in map(str, peek(n.buf, n.snapshot())[str(args.inflight)]):
                if time.monotonic() - t > 5:
                    break
                time.sleep(0.01)
            left["posted_s"] = round(time.monotonic() - t, 4)
            left["posted"] = left["posted_s"] <= 5
            report["left_inflight"] = left
        if n is not None:
            report["irq_counts"] = n.irq_counts
            report["state"] = n.save()
            if args.hold:
                _write(args.out, report)
                hold(n, args, report)
                report["irq_counts"] = n.irq_counts
                report["state"] = n.save()
        rc = 0 if report["ok"] else 1
    except Exception as e:  # noqa: BLE001 - reported in OUT.json, and on stderr
        report["error"] = repr(e)
        report["ok"] = False
        print(f"vfio_nvme.py {args.mode}: {e!r}", file=sys.stderr)
    finally:
        _write(args.out, report)
    return rc


if __name__ == "__main__":
    sys.exit(main())
