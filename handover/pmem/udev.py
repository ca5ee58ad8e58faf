"""udev's probe of a region device: ``handover region udev-probe DEVICE``.

udev runs it for every pmem block device and device-dax character device
(``initramfs/udev/60-handover-region.rules``, through the wrapper ``/usr/lib/handover/udev-probe``
that ``python -m handover.initramfs udev-probe`` writes) and imports what it prints. For a
device that holds a handover region (the region magic in header copy A or B)::

    HANDOVER_REGION=1                 the rule then makes the node root:root 0600
    HANDOVER_REGION_LAYOUT=1.0        layout of the newest verified header copy, else of the
                                      first copy with the magic (a newer layout is a region too)
    HANDOVER_REGION_HEADERS=AB        the copies whose magic, layout 1, size, copy index and CRC
                                      verify: AB, A, B or none
    HANDOVER_REGION_UUID=<uuid>       the region's identity (from a verified copy only)

For anything else (no magic, zeros, a short or unreadable device, not a block/dax/regular
file, a missing path) it prints nothing. It exits 0 in every case (udev drops the imported
keys of a program that fails); 2 only for a wrong command line.

Bounded and read-only: the node is opened O_RDONLY|O_NONBLOCK (never a FIFO that blocks,
never a terminal that it would own), only after ``stat`` says it is a block device, a regular
file, or a character device of the dax subsystem (opening an arbitrary character device can
have side effects, a tape rewinds); block devices and files are read with two 512-byte
preads, device-dax (no read(), mmap only, as ``kinds`` does it) with a PROT_READ shared
mapping of one ``align`` of which only the two header copies are touched. Nothing here
imports construct or ctypes (``handover.pmem`` imports its submodules lazily): the start-up
is the interpreter's plus google_crc32c. The layout constants are repeated from
``handover.formats.region`` (which needs construct); a unit test checks they agree.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import sys

from handover.formats.crc import crc32c

SYSFS = "/sys"
MAGIC = b"HOVRREGN"
LAYOUT_MAJOR = 1
HEADER_SIZE = 512
HEADER_OFFSETS = (0, 0x1000)
CRC_OFFSET = HEADER_SIZE - 4
#: offsets of the fields read here (handover.formats.region.FIELD_OFFSETS)
OFF_LAYOUT, OFF_HEADER_SIZE, OFF_COPY, OFF_SEQ, OFF_UUID = 8, 12, 16, 24, 72
DEFAULT_DAX_ALIGN = 2 << 20
USAGE = "usage: handover region udev-probe DEVICE"


def _sysfs_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip(), 0)
    except (OSError, ValueError):
        return None


def _is_dax(st: os.stat_result, sysfs: str) -> bool:
    link = f"{sysfs}/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/subsystem"
    try:
        return os.path.basename(os.readlink(link)) == "dax"
    except OSError:
        return False


def read_devdax(fd: int, st: os.stat_result, sysfs: str = SYSFS) -> list[bytes]:
    """Header copies A and B of the device-dax FD (size and align from sysfs): a read-only
    shared mapping of the first ``align`` bytes (device-dax has no read())."""
    base = f"{sysfs}/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    align = _sysfs_int(f"{base}/align") or DEFAULT_DAX_ALIGN
    size = _sysfs_int(f"{base}/size")
    need = HEADER_OFFSETS[-1] + HEADER_SIZE
    length = -(-need // align) * align
    if size is None or size < length:
        return []
    mm = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    try:
        return [mm[off:off + HEADER_SIZE] for off in HEADER_OFFSETS]
    finally:
        mm.close()


def read_headers(path: str, sysfs: str = SYSFS) -> list[bytes]:
    """The raw bytes of header copies A and B of PATH (fewer or shorter when the device is
    short; [] when PATH is not a device or file a region can be on).  Raises OSError."""
    st = os.stat(path)
    if stat.S_ISCHR(st.st_mode):
        if not _is_dax(st, sysfs):
            return []
    elif not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return []
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fst = os.fstat(fd)
        if stat.S_IFMT(fst.st_mode) != stat.S_IFMT(st.st_mode) or fst.st_rdev != st.st_rdev:
            return []      # replaced between the stat and the open
        if stat.S_ISCHR(fst.st_mode):
            return read_devdax(fd, fst, sysfs)
        return [os.pread(fd, HEADER_SIZE, off) for off in HEADER_OFFSETS]
    finally:
        os.close(fd)


def _verified(raw: bytes, copy: int) -> bool:
    if len(raw) < HEADER_SIZE or raw[:len(MAGIC)] != MAGIC:
        return False
    major, = struct.unpack_from("<H", raw, OFF_LAYOUT)
    size, index = struct.unpack_from("<II", raw, OFF_HEADER_SIZE)
    crc, = struct.unpack_from("<I", raw, CRC_OFFSET)
    return (major == LAYOUT_MAJOR and size == HEADER_SIZE and index == copy
            and crc == crc32c(raw[:CRC_OFFSET]))


def properties(headers: list[bytes]) -> dict[str, str]:
    """The udev keys for the header copies HEADERS ({} when no whole copy has the magic)."""
    magic = [h for h in headers if len(h) >= HEADER_SIZE and h[:len(MAGIC)] == MAGIC]
    if not magic:
        return {}
    good = [(struct.unpack_from("<Q", h, OFF_SEQ)[0], i, h)
            for i, h in enumerate(headers) if _verified(h, i)]
    best = max(good)[2] if good else magic[0]
    major, minor = struct.unpack_from("<HH", best, OFF_LAYOUT)
    props = {"HANDOVER_REGION": "1", "HANDOVER_REGION_LAYOUT": f"{major}.{minor}",
             "HANDOVER_REGION_HEADERS": "".join("AB"[i] for _s, i, _h in good) or "none"}
    if good:
        u = best[OFF_UUID:OFF_UUID + 16].hex()   # as str(uuid.UUID(bytes=...)); uuid costs 4 ms
        props["HANDOVER_REGION_UUID"] = f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"
    return props


def probe(path: str, sysfs: str = SYSFS) -> dict[str, str]:
    """The udev keys for PATH; {} for anything that is not a region.  Never raises."""
    try:
        return properties(read_headers(path, sysfs))
    except Exception:   # noqa: BLE001 - udev must get an answer, never a traceback
        return {}


def format_properties(props: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in props.items())


def main(argv: list[str] | None = None) -> int:
    """``udev-probe DEVICE``: print the keys, exit 0 (2: a wrong command line)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(args) != 1 or not args[0] or args[0].startswith("-"):
        print("handover: usage: udev-probe: takes exactly one DEVICE (udev passes $devnode)",
              file=sys.stderr)
        return 2
    text = format_properties(probe(args[0]))
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError):
        try:   # the reader went away: no second failure (and message) at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
