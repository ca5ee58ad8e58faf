"""Access to the four region kinds, each with the flush its medium needs.

==============  =====================  ==========================================================
kind            I/O                    durability (what ``persist()`` does)
==============  =====================  ==========================================================
``devdax``      mmap only, MAP_SHARED, libpmem ``pmem_persist`` (clwb/clflushopt + sfence) when
                whole device (a        libpmem.so.1 loads; else nothing: msync returns EINVAL on
                multiple of align)     device-dax, so only cache coherence remains (warm kexec
                                       and process kill: yes; power cut: NO)
``pmem-block``  pread/pwrite           fdatasync: the pmem driver copies with
(/dev/pmemN)                           memcpy_flushcache and flushes on REQ_PREFLUSH
``dax-file``    pread/pwrite           fdatasync (the DAX write path flushes CPU caches,
                                       fdatasync makes the metadata durable)
``file``        pread/pwrite           fdatasync (page cache to disk; on tmpfs: RAM only)
==============  =====================  ==========================================================
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
import struct

from handover.errors import HandoverError
from handover.formats.crc import crc32c

BLKGETSIZE64 = 0x80081272
STATX_ATTR_DAX = 0x00200000
SYSFS = "/sys"
CHUNK = 1 << 20            # piece size for CRC and writes: stays in L2/L3 between the passes


class RegionError(HandoverError):
    """Generic region problem (exit 1): permissions, locking, size, not initialized."""


class RegionLockedError(RegionError):
    pass


# --------------------------------------------------------------------------------------------
# libpmem (PMDK) through ctypes

class _LibPmem:
    def __init__(self):
        self.lib = None
        self.error = None
        name = ctypes.util.find_library("pmem") or "libpmem.so.1"
        try:
            lib = ctypes.CDLL(name)
            lib.pmem_persist.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.pmem_persist.restype = None
            lib.pmem_memcpy_persist.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
            lib.pmem_memcpy_persist.restype = ctypes.c_void_p
            lib.pmem_has_hw_drain.argtypes = []
            lib.pmem_has_hw_drain.restype = ctypes.c_int
            self.lib = lib
            self.name = name
        except (OSError, AttributeError) as e:
            self.error = str(e)

    @property
    def available(self) -> bool:
        return self.lib is not None


_LIBPMEM: _LibPmem | None = None


def libpmem() -> _LibPmem:
    global _LIBPMEM
    if _LIBPMEM is None:
        _LIBPMEM = _LibPmem()
    return _LIBPMEM


# --------------------------------------------------------------------------------------------
# detection helpers

def read_sysfs(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def int_sysfs(path: str) -> int | None:
    v = read_sysfs(path)
    if v is None:
        return None
    try:
        return int(v, 0)
    except ValueError:
        return None


def statx_dax(path: str) -> bool:
    """True when the file has STATX_ATTR_DAX (a file on a DAX-mounted filesystem)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.statx
    except (OSError, AttributeError):
        return False
    buf = ctypes.create_string_buffer(256)
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(path), 0, 0x7FF, buf) != 0:
        return False
    attributes = struct.unpack_from("<Q", buf, 8)[0]
    attributes_mask = struct.unpack_from("<Q", buf, 0x28)[0]
    return bool(attributes & attributes_mask & STATX_ATTR_DAX)


def fs_type(path: str) -> str | None:
    """Filesystem type of the mount holding PATH (from /proc/self/mountinfo)."""
    try:
        real = os.path.realpath(path)
        best, best_type = "", None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, best_type = mnt, right.split()[0]
        return best_type
    except OSError:
        return None


def devdax_info(st: os.stat_result, sysfs: str = SYSFS) -> dict:
    """size, align and physical start of a device-dax character device, from sysfs."""
    base = f"{sysfs}/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    size = int_sysfs(f"{base}/size")
    align = int_sysfs(f"{base}/align") or 2 * 1024 * 1024
    start = int_sysfs(f"{base}/resource")
    if start is None:
        start = int_sysfs(f"{base}/mapping0/start")
    return {"size": size, "align": align, "phys_start": start}


def is_devdax(st: os.stat_result, path: str, sysfs: str = SYSFS) -> bool:
    if not stat.S_ISCHR(st.st_mode):
        return False
    link = f"{sysfs}/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/subsystem"
    try:
        if os.path.basename(os.readlink(link)) == "dax":
            return True
    except OSError:
        pass
    return os.path.basename(path).startswith("dax")


def check_permissions(path: str, st: os.stat_result, force: bool) -> None:
    """Refuse a region that users other than root can read or write (unless force)."""
    mode = stat.S_IMODE(st.st_mode)
    problems = []
    if mode & 0o066:
        problems.append(f"mode {mode:04o} gives group/other access")
    if st.st_uid != 0 and mode & 0o600:
        problems.append(f"owned by uid {st.st_uid}")
    if problems and not force:
        raise RegionError(
            f"{path}: refusing a region readable or writable by non-root users "
            f"({'; '.join(problems)}); fix with chown root:root and chmod 0600, or pass --force")


# --------------------------------------------------------------------------------------------
# access objects

class Access:
    """Byte access to a region.  Subclasses: PioAccess (read/write), MmapAccess (devdax)."""

    kind = "file"
    durability = ""
    size = 0
    align = 4096
    phys_start: int | None = None

    def read(self, off: int, n: int) -> bytes:
        raise NotImplementedError

    def write(self, off: int, data) -> None:
        raise NotImplementedError

    def persist(self, off: int, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def crc(self, off: int, n: int) -> tuple[int, int]:
        """(crc32c, bytes read) of [off, off+n), in cache-sized pieces (no full copy)."""
        c, got = 0, 0
        while got < n:
            piece = self.read(off + got, min(CHUNK, n - got))
            if not piece:
                break
            c = crc32c(piece, c)
            got += len(piece)
        return c, got

    def write_crc(self, off: int, data) -> int:
        """Write DATA at OFF and return its crc32c, computed piecewise while the piece is
        still in the CPU cache."""
        mv = memoryview(data)
        c = 0
        for p in range(0, len(mv), CHUNK):
            piece = mv[p:p + CHUNK]
            c = crc32c(data[p:p + CHUNK] if isinstance(data, bytes) else piece.tobytes(), c)
            self.write(off + p, piece)
        return c


class PioAccess(Access):
    def __init__(self, path: str, fd: int, size: int, kind: str, durability: str):
        self.path, self.fd, self.size, self.kind, self.durability = path, fd, size, kind, durability

    def read(self, off, n):
        out = os.pread(self.fd, n, off)
        if len(out) < n:  # pread may return short on large reads
            parts = [out]
            got = len(out)
            while got < n:
                b = os.pread(self.fd, n - got, off + got)
                if not b:
                    break
                parts.append(b)
                got += len(b)
            out = b"".join(parts)
        return out

    def write(self, off, data):
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            done += os.pwrite(self.fd, mv[done:], off + done)

    def persist(self, off, n):
        os.fdatasync(self.fd)


class MmapAccess(Access):
    """Whole-region shared mapping (device-dax; also usable on a file for tests)."""

    def __init__(self, path: str, fd: int, size: int, kind: str, align: int, flush: str,
                 writable: bool):
        self.path, self.fd, self.size, self.kind, self.align = path, fd, size, kind, align
        self.flush = flush  # "pmem" | "msync" | "none"
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=0)
        self._anchor = None
        self.base = None
        if flush == "pmem" and writable:
            self._anchor = ctypes.c_char.from_buffer(self.mm)
            self.base = ctypes.addressof(self._anchor)
        if flush == "pmem":
            self.durability = ("libpmem pmem_persist after the slot and after each header copy "
                               "(CPU cache-line flush + fence): survives process kill, warm kexec, "
                               "and power loss on real pmem with ADR")
        elif flush == "msync":
            self.durability = "msync(MS_SYNC) after the slot and after each header copy"
        else:
            self.durability = ("NO CPU cache flush (libpmem not available; msync is EINVAL on "
                               "device-dax): survives process kill and warm kexec (caches stay "
                               "coherent), NOT a power cut")

    def read(self, off, n):
        return self.mm[off:off + n]

    def write(self, off, data):
        if self.flush == "pmem":
            # non-temporal copy + fence: the data is in the persistence domain on return
            libpmem().lib.pmem_memcpy_persist(self.base + off, bytes(data), len(data))
        else:
            self.mm[off:off + len(data)] = data

    def persist(self, off, n):
        if self.flush == "pmem":
            libpmem().lib.pmem_persist(self.base + off, n)
        elif self.flush == "msync":
            start = off // mmap.PAGESIZE * mmap.PAGESIZE
            self.mm.flush(start, off + n - start)

    def close(self):
        self._anchor = None
        try:
            self.mm.close()
        except BufferError:  # pragma: no cover
            pass


def _block_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return struct.unpack("<Q", buf)[0]


def _block_phys(st: os.stat_result, sysfs: str = SYSFS) -> int | None:
    base = f"{sysfs}/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/device"
    # fsdax: the pfn device's resource is the data start (after the memmap reserve)
    try:
        for name in os.listdir(base):
            if name.startswith("pfn") and os.path.isdir(f"{base}/{name}"):
                v = int_sysfs(f"{base}/{name}/resource")
                if v is not None:
                    return v
    except OSError:
        pass
    return int_sysfs(f"{base}/resource")


def describe(path: str, sysfs: str = SYSFS) -> dict:
    """Kind, size, alignment and physical start of PATH without opening it for writing."""
    st = os.stat(path)
    if is_devdax(st, path, sysfs):
        info = devdax_info(st, sysfs)
        return {"kind": "devdax", **info}
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = _block_size(fd)
        finally:
            os.close(fd)
        name = os.path.basename(os.path.realpath(path))
        kind = "pmem-block" if name.startswith("pmem") else "block"
        return {"kind": kind, "size": size, "align": 4096, "phys_start": _block_phys(st, sysfs)}
    if stat.S_ISREG(st.st_mode):
        kind = "dax-file" if statx_dax(path) else "file"
        return {"kind": kind, "size": st.st_size, "align": 4096, "phys_start": None,
                "fs_type": fs_type(path)}
    raise RegionError(f"{path}: not a regular file, block device or device-dax character device")


def open_access(path: str, *, write: bool = False, mode: str | None = None,
                sysfs: str = SYSFS) -> tuple[Access, int, os.stat_result]:
    """Open PATH and return (access, fd, stat).  ``mode`` forces "mmap" or "pio" (tests)."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC
    try:
        # a FIFO or socket would block the open (a FIFO until a writer comes): a region is
        # a file or a device with random access, never a stream
        kind = os.stat(path).st_mode
        if stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind):
            raise RegionError(f"{path}: a {'FIFO' if stat.S_ISFIFO(kind) else 'socket'} is "
                              f"not a region (a region is a file or a pmem/dax device)")
        fd = os.open(path, flags | os.O_NONBLOCK)
        os.set_blocking(fd, True)
    except FileNotFoundError:
        raise RegionError(f"{path}: no such file or device") from None
    except PermissionError:
        raise RegionError(f"{path}: permission denied (run as root)") from None
    except OSError as e:
        raise RegionError(f"{path}: cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if is_devdax(st, path, sysfs):
            info = devdax_info(st, sysfs)
            if not info["size"]:
                raise RegionError(f"{path}: device-dax size unknown (no {sysfs}/dev/char/.../size)")
            size = info["size"] // info["align"] * info["align"]
            lp = libpmem()
            acc = MmapAccess(path, fd, size, "devdax", info["align"],
                             "pmem" if lp.available else "none", write)
            acc.phys_start = info["phys_start"]
            return acc, fd, st
        if stat.S_ISBLK(st.st_mode):
            size = _block_size(fd)
            name = os.path.basename(os.path.realpath(path))
            kind = "pmem-block" if name.startswith("pmem") else "block"
            if mode == "mmap":
                acc = MmapAccess(path, fd, size, kind, 4096, "msync", write)
            else:
                acc = PioAccess(path, fd, size, kind,
                                "fdatasync after the slot and after each header copy (pmem "
                                "driver: memcpy_flushcache + flush on REQ_PREFLUSH)")
            acc.phys_start = _block_phys(st, sysfs)
            return acc, fd, st
        if stat.S_ISREG(st.st_mode):
            dax = statx_dax(path)
            kind = "dax-file" if dax else "file"
            fst = fs_type(path)
            if mode == "mmap":
                acc = MmapAccess(path, fd, st.st_size, kind, 4096, "msync", write)
            else:
                note = "fdatasync after the slot and after each header copy"
                if fst in ("tmpfs", "ramfs"):
                    note += f" ({fst}: RAM only, lost at kexec/reboot; for tests)"
                elif dax:
                    note += " (DAX: data path flushes CPU caches)"
                acc = PioAccess(path, fd, st.st_size, kind, note)
            return acc, fd, st
        raise RegionError(f"{path}: not a regular file, block device or device-dax device")
    except BaseException:
        os.close(fd)
        raise


def lock_fd(fd: int, path: str, *, exclusive: bool = True, wait: bool = False) -> None:
    op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, op)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            holder = lock_holder(fd)
            who = f" (pid {holder})" if holder else ""
            raise RegionLockedError(
                f"{path}: region is locked by another handover process{who}; "
                f"retry, or pass --wait to wait for it") from None
        raise


def lock_holder(fd: int) -> int | None:
    """PID holding a FLOCK on the file of FD, from /proc/locks (best effort)."""
    try:
        st = os.fstat(fd)
        dev, ino = st.st_dev, st.st_ino
        want = f"{os.major(dev):02x}:{os.minor(dev):02x}:{ino}"
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts:
                    continue
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None
