"""Reading a live host (or a captured copy of one) under a sysroot, and the host model.

Every source module reads files through a :class:`Sysroot`, never with bare ``open``, so
that (a) tests run against captured trees (``--sysroot DIR``), and (b) ``handover
capture-sysroot`` can record exactly the files the sources read.

A source fills part of a :class:`Host` and writes, for each item it is responsible for, a
provenance note: ``host.note(item, "captured", source, detail)`` or
``host.note(item, "absent", source, reason)``.
"""

from __future__ import annotations

import errno
import mmap
import os
import posixpath
from dataclasses import dataclass, field
from typing import Callable

# ---------------------------------------------------------------------------------------
# Sysroot


class Sysroot:
    """Files of a root filesystem (``/`` or a captured tree), with an access log.

    Paths are absolute host paths ("/sys/bus/pci/devices"); symlinks are resolved inside the
    root (an absolute link target is re-rooted), so a captured tree behaves like the host.
    """

    def __init__(self, root: str = "/", record: bool = False):
        self.root = os.path.abspath(root or "/")
        self.record = record
        # recorded accesses (host paths): file contents, link targets, listed directories
        self.files: dict[str, bytes] = {}
        self.links: dict[str, str] = {}
        self.dirs: set[str] = set()
        self.errors: dict[str, str] = {}     # host path -> "EACCES: Permission denied"
        self.mapped: dict[str, dict[int, bytes]] = {}  # path -> {offset: bytes} (mmap reads)

    # -- path handling ---------------------------------------------------------------
    def host(self, path: str) -> str:
        """The real filesystem path of host path ``path``."""
        p = posixpath.normpath("/" + path.lstrip("/"))
        return p if self.root == "/" else self.root + p

    def resolve(self, path: str, _depth: int = 0) -> str:
        """Canonical host path, symlinks resolved within the root (like realpath)."""
        parts = [p for p in posixpath.normpath("/" + path.lstrip("/")).split("/") if p]
        cur = "/"
        for i, part in enumerate(parts):
            nxt = posixpath.join(cur, part)
            real = self.host(nxt)
            if os.path.islink(real):
                if _depth > 40:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", nxt)
                target = os.readlink(real)
                self._rec_link(nxt, target)
                base = target if target.startswith("/") else posixpath.join(cur, target)
                cur = self.resolve(base, _depth + 1)
            else:
                cur = nxt
        return posixpath.normpath(cur)

    def _rec_link(self, path: str, target: str) -> None:
        if self.record:
            self.links[posixpath.normpath(path)] = target

    def _err(self, path: str, e: OSError) -> None:
        name = errno.errorcode.get(e.errno or 0, "EIO")
        self.errors[path] = f"{name}: {e.strerror or e}"

    # -- reads ----------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return os.path.lexists(self.host(path))

    def isdir(self, path: str) -> bool:
        return os.path.isdir(self.host(path))

    def read_bytes(self, path: str, limit: int = 1 << 24) -> bytes:
        """Raises OSError (recorded in ``errors``)."""
        real_path = self.resolve(path)
        try:
            with open(self.host(real_path), "rb", buffering=0) as f:
                data = f.read(limit)
        except OSError as e:
            self._err(real_path, e)
            raise
        if self.record:
            self.files[real_path] = data
        return data

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode("utf-8", "replace")

    def try_text(self, path: str) -> str | None:
        """The stripped content, or None when the file is missing or unreadable."""
        try:
            return self.read_text(path).strip()
        except OSError:
            return None

    def try_int(self, path: str, base: int = 0) -> int | None:
        t = self.try_text(path)
        if t is None or t == "":
            return None
        try:
            return int(t, base)
        except ValueError:
            return None

    def listdir(self, path: str) -> list[str]:
        """Sorted entries; [] when the directory is missing or unreadable."""
        real_path = self.resolve(path)
        try:
            names = sorted(os.listdir(self.host(real_path)))
        except OSError as e:
            if e.errno != errno.ENOENT:
                self._err(real_path, e)
            return []
        if self.record:
            self.dirs.add(real_path)
            for n in names:  # keep links found by listing (iommu_groups/N/devices/*, ...)
                child = posixpath.join(real_path, n)
                if os.path.islink(self.host(child)):
                    self._rec_link(child, os.readlink(self.host(child)))
        return names

    def readlink(self, path: str) -> str | None:
        """The link target (as stored), or None when ``path`` is not a link."""
        parent = self.resolve(posixpath.dirname(path) or "/")
        p = posixpath.join(parent, posixpath.basename(path))
        try:
            t = os.readlink(self.host(p))
        except OSError:
            return None
        self._rec_link(p, t)
        return t

    def link_name(self, path: str) -> str | None:
        """Basename of the link target ('vfio-pci' for .../driver), or None."""
        t = self.readlink(path)
        return posixpath.basename(t.rstrip("/")) if t else None

    def write_text(self, path: str, text: str) -> None:
        """Write ``text`` to a host file (a sysfs attribute: one write, no truncation
        semantics beyond the kernel's). Raises OSError."""
        with open(self.host(self.resolve(path)), "w") as f:
            f.write(text)

    def check(self) -> "Sysroot":
        """Raise HandoverError unless the root is a directory (``--sysroot /nonexistent``
        must not read as a host without devices)."""
        from ..errors import HandoverError

        if not os.path.isdir(self.root):
            raise HandoverError(f"{self.root}: --sysroot is not a directory")
        if not os.path.isdir(os.path.join(self.root, "sys")) and self.root != "/":
            raise HandoverError(f"{self.root}: --sysroot has no sys/ (not a host tree)")
        return self

    def map_read(self, path: str, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` of a file through mmap (sysfs resourceN only
        supports mmap for memory BARs). Raises OSError, like the kernel does (EPERM under
        lockdown, EINVAL for an exclusive / driver-claimed region)."""
        real_path = self.resolve(path)
        page = mmap.PAGESIZE
        start = offset - offset % page
        span = offset + length - start
        span = (span + page - 1) // page * page
        try:
            fd = os.open(self.host(real_path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            self._err(real_path, e)
            raise
        try:
            try:
                m = mmap.mmap(fd, span, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
            except (OSError, ValueError) as e:
                if isinstance(e, ValueError):  # mmap length beyond a regular file's end
                    e = OSError(errno.EINVAL, str(e))
                self._err(real_path, e)
                raise e
            try:
                # 32-bit reads, as the device expects for MSI-X table accesses
                import struct
                out = bytearray()
                base = offset - start
                for k in range(0, length, 4):
                    out += struct.pack("<I", struct.unpack_from("<I", m, base + k)[0])
                data = bytes(out)
            finally:
                m.close()
        finally:
            os.close(fd)
        if self.record:
            self.mapped.setdefault(real_path, {})[offset] = data
        return data


def errno_text(e: OSError) -> str:
    """'EPERM' style text of an OSError."""
    return errno.errorcode.get(e.errno or 0, str(e))


# ---------------------------------------------------------------------------------------
# Host model: what the sources found. Typed records; ops/build.py turns them into a State.


@dataclass
class MsiCap:
    offset: int
    ctrl: int
    enabled: bool
    mmc: int                       # multiple message capable (log2)
    mme: int                       # multiple message enable (log2)
    is64: bool
    maskable: bool
    addr_lo: int
    addr_hi: int
    data: int
    mask: int


@dataclass
class MsixCap:
    offset: int
    ctrl: int
    size: int                      # table entries
    enabled: bool
    masked: bool
    table_bir: int
    table_offset: int
    pba_bir: int
    pba_offset: int


@dataclass
class SriovCap:
    offset: int
    ctrl: int
    total_vfs: int
    num_vfs: int
    vf_offset: int
    vf_stride: int
    vf_device: int
    vf_bars: list


@dataclass
class Caps:
    """The capabilities of a config-space snapshot this tool needs (host.pci.walk_caps)."""

    cap_ids: list = field(default_factory=list)     # [(id, offset)] standard capabilities
    ecap_ids: list = field(default_factory=list)    # [(id, offset)] extended capabilities
    truncated_at: int | None = None
    msi: MsiCap | None = None
    msix: MsixCap | None = None
    pcie_type: int | None = None   # None: not a PCI Express device
    dsn: int | None = None         # device serial number
    dsn_offset: int | None = None
    sriov: SriovCap | None = None


@dataclass
class Vector:
    """One MSI/MSI-X vector of a device, as the host shows it."""

    kind: int                      # formats.enums VEC_MSI / VEC_MSIX
    vector: int                    # index within the capability
    irq: int                       # Linux irq (0: not allocated)
    unit: int | None               # seq of the covering IOMMU unit
    enabled: bool = True
    masked: bool | None = None     # None: not readable
    remapped: bool | None = None   # the message is in remappable format; None: not readable
    irte_index: int | None = None  # IRTE handle (+ sub-handle) when remapped
    sub_handle: int | None = None


@dataclass
class ContextEntry:
    """One row of debugfs dmar_translation_struct: a device's root/context (and PASID) entry."""

    bus: int
    devfn: int
    root_lo: int
    root_hi: int
    lo: int
    hi: int
    pasid: int | None = None       # None: legacy mode (no PASID table)
    pasid_val0: int = 0
    pasid_val1: int = 0
    pasid_val2: int = 0


@dataclass
class DomainWalk:
    """debugfs domain_translation_struct of one device: its page-table root and leaves."""

    device: str                    # "0000:00:03.0"
    pasid: int | None = None
    pgd: int | None = None         # None: not walked
    leaves: list = field(default_factory=list)   # [(iova_pfn, (pml5e, pml4e, pdpe, pde, pte))]


#: the registers of a unit the sources read, in the order of the UNIT record's fields
UNIT_REGS = ("ver", "cap", "ecap", "gsts", "rtaddr", "irta", "iqa", "iqh", "iqt")


@dataclass
class UnitRegs:
    """The registers of one IOMMU unit, as read (sysfs, the 0003 sysfs files, debugfs
    iommu_regset); None: not captured."""

    ver: int | None = None         # VER, major 7:4, minor 3:0
    cap: int | None = None
    ecap: int | None = None
    gsts: int | None = None        # TES 31, QIES 26, IRES 25
    rtaddr: int | None = None      # TTM 11:10 (bit 10: scalable mode)
    irta: int | None = None        # EIME 11 (x2APIC), S 3:0
    iqa: int | None = None
    iqh: int | None = None
    iqt: int | None = None

    def get(self, name: str) -> int | None:
        """The value of register ``name`` (one of UNIT_REGS), None if not captured."""
        if name not in UNIT_REGS:
            raise KeyError(name)
        return getattr(self, name)

    def set(self, name: str, value: int) -> None:
        if name not in UNIT_REGS:
            raise KeyError(name)
        setattr(self, name, value)

    def captured(self) -> dict[str, int]:
        """The captured registers, name -> value, in UNIT_REGS order."""
        return {n: v for n in UNIT_REGS if (v := getattr(self, n)) is not None}


@dataclass
class Unit:
    name: str                      # "dmar0"
    seq: int                       # the kernel's seq_id (N of dmarN)
    reg_base: int | None = None
    segment: int = 0
    regs: UnitRegs = field(default_factory=UnitRegs)
    reg_source: dict = field(default_factory=dict)  # register -> source name
    devices: list = field(default_factory=list)    # BDFs the unit covers (dmarN/devices)
    root_table: int | None = None                  # debugfs "Root Table Address"
    ir_table: int | None = None                    # debugfs " IR table address:"
    ir_enabled: bool | None = None
    ir_enabled_source: str = ""
    dma_enabled: bool | None = None                # TES
    irtes: dict | None = None                      # index -> (lo, hi); None = not readable
    contexts: list | None = None                   # [ContextEntry]; None = not readable

    def status_from_gsts(self, source: str) -> None:
        """TES (bit 31) and IRES (bit 25) of a GSTS value in regs."""
        gsts = self.regs.gsts
        if gsts is not None:
            self.dma_enabled = bool(gsts >> 31 & 1)
            self.ir_enabled = bool(gsts >> 25 & 1)
            self.ir_enabled_source = f"{source} GSTS.IRES"


@dataclass
class PciDev:
    bdf: str                       # "0000:00:03.0"
    sbdf: int
    path: str = ""                 # canonical sysfs directory
    vendor: int = 0
    device: int = 0
    subsystem_vendor: int = 0
    subsystem_device: int = 0
    class_: int = 0
    revision: int = 0
    header_type: int = 0
    config: bytes = b""
    config_full: bool = False
    driver: str | None = None
    iommu_group: int | None = None
    iommu: str | None = None       # dmarN
    resources: list = field(default_factory=list)   # [(start, end, flags)] by resource index
    caps: Caps = field(default_factory=Caps)
    physfn: str | None = None
    virtfns: list = field(default_factory=list)
    upstream: list = field(default_factory=list)    # bridge BDFs, nearest first
    msi_irqs: dict = field(default_factory=dict)    # irq -> "msi" | "msix"
    msix_entries: list | None = None                # [(addr_lo, addr_hi, data, ctrl)]
    msix_reason: str = ""
    domain: DomainWalk | None = None                # debugfs domain_translation_struct
    vectors: list = field(default_factory=list)     # [Vector]


@dataclass
class Irq:
    irq: int
    chip: str = ""
    hwirq: int | None = None
    name: str = ""
    actions: str = ""
    counts: list = field(default_factory=list)


#: the one-value files of /sys/kernel/handover/ (KernelStatus has a field for each)
KERNEL_STATUS_FILES = ("state", "region", "reason", "error", "generation", "format",
                       "reserved_ranges", "reserved_bytes", "ir_tables_kept", "root_tables_kept")


@dataclass
class KeepaliveDevice:
    """One keepalive device as the patched kernel reports it: /sys/kernel/handover/devices/
    <bdf>/{state,domain,reason}, or a ``device:`` line of the first series' status file."""

    bdf: str | None = None         # None: a line this reader does not understand (``line``)
    state: str | None = None       # listed | held | released
    adopted: bool = False          # its context entry (translation) was adopted
    domain: int | None = None      # the adopted domain ID
    why: str | None = None         # why it was released
    line: str | None = None        # the text of a line not understood, kept verbatim

    def as_dict(self) -> dict:
        """The JSON object of ``load --json`` (kernel_interface.status.keepalive[])."""
        if self.bdf is None:
            return {"line": self.line}
        return {"bdf": self.bdf, "state": self.state, "adopted": self.adopted,
                "domain": self.domain, "why": self.why}


@dataclass
class KernelStatus:
    """/sys/kernel/handover/ at one moment: each one-value file (None: missing, or empty on
    the current layout), the keepalive devices, and the keys of a status file this reader
    does not know (``other``: the first series printed more, e.g. ``blob``, ``copy``)."""

    state: str | None = None
    region: str | None = None
    reason: str | None = None
    error: str | None = None
    generation: str | None = None
    format: str | None = None
    reserved_ranges: str | None = None
    reserved_bytes: str | None = None
    ir_tables_kept: str | None = None
    root_tables_kept: str | None = None
    keepalive: list = field(default_factory=list)   # [KeepaliveDevice]
    other: dict = field(default_factory=dict)       # key -> value, as read

    def get(self, key: str) -> str | None:
        """The value of a key as the kernel names it (a one-value file, or another key of a
        first-series status file)."""
        if key in KERNEL_STATUS_FILES:
            return getattr(self, key)
        return self.other.get(key)

    def set(self, key: str, value: str) -> None:
        if key in KERNEL_STATUS_FILES:
            setattr(self, key, value)
        else:
            self.other[key] = value

    def as_dict(self) -> dict:
        """The JSON object of ``load --json`` (kernel_interface.status, .status_after): the
        keys that were read, and ``keepalive`` when there are devices."""
        out = {k: getattr(self, k) for k in KERNEL_STATUS_FILES if getattr(self, k) is not None}
        out.update(self.other)
        if self.keepalive:
            out["keepalive"] = [d.as_dict() for d in self.keepalive]
        return out


@dataclass
class KernelInterface:
    """The patched kernel's /sys/kernel/handover/ as the kernel-handover source found it."""

    path: str                      # "/sys/kernel/handover"
    formats: str | None            # the format versions the kernel reads, "1.0-1.1"
    decision: str | None           # pending | accept | abort
    status: KernelStatus = field(default_factory=KernelStatus)
    #: the words of /sys/kernel/handover/features (``scalable``, ``sriov``, ``dma-alias``:
    #: what the kernel can keep beyond a legacy-mode device without aliases); empty when
    #: the file is missing (legacy only)
    features: frozenset = frozenset()
    #: /sys/kernel/debug/handover/live_ranges (kernel-patches 0011): per vfio-pci device, the
    #: ranges its live translation and remapping use, [(kind, start, size)], every table page
    #: included (the IOMMU's debugfs shows only leaves); None when the file is missing
    live_ranges: dict | None = None

    @property
    def state(self) -> str | None:
        return self.status.state

    @property
    def generation(self) -> int | None:
        g = self.status.generation
        return int(g) if g and g.isdigit() else None

    def as_dict(self) -> dict:
        """The JSON object of ``load --json`` (kernel_interface, with what load adds)."""
        return {"path": self.path, "formats": self.formats, "state": self.state,
                "decision": self.decision, "status": self.status.as_dict(),
                "generation": self.generation}


@dataclass
class Note:
    """Provenance of one item (``units.irta``, ``irtes``, ...): which source read it, or why
    it could not be captured. Written into the state's META provenance as ``as_dict()``."""

    status: str                    # captured | partial | absent
    source: str                    # the source's name ("intel-iommu-debugfs", "collect", ...)
    detail: str | None = None      # captured: what was read, from where
    reason: str | None = None      # partial, absent: what is missing, and why

    def as_dict(self) -> dict:
        """The provenance entry: status, source, then detail and reason when set."""
        d = {"status": self.status, "source": self.source}
        if self.detail is not None:
            d["detail"] = self.detail
        if self.reason is not None:
            d["reason"] = self.reason
        return d


@dataclass
class Host:
    sysroot: Sysroot
    units: dict = field(default_factory=dict)      # name -> Unit
    devices: dict = field(default_factory=dict)    # bdf -> PciDev
    irqs: dict = field(default_factory=dict)       # irq -> Irq
    iomem: list = field(default_factory=list)      # (start, end, name, depth)
    #: /sys/kernel/handover/ of a patched kernel; None: a stock kernel (or not read)
    kernel_handover: KernelInterface | None = None
    notes: dict = field(default_factory=dict)      # provenance: item -> Note
    sources_run: list = field(default_factory=list)
    # devices whose deep state (MSI-X tables, page-table walks) the caller wants
    wanted: set | None = None

    def wants(self, dev: PciDev) -> bool:
        """Deep reads (MSI-X table, page-table walk) for this device? By default (wanted is
        None) for devices bound to vfio-pci, the default keepalive set."""
        if self.wanted is None:
            return dev.driver == "vfio-pci"
        return dev.bdf in self.wanted

    def note(self, item: str, status: str, source: str, text: str = "") -> None:
        """Provenance of one item: status "captured" (``text``: the detail), "partial" or
        "absent" (``text``: the reason)."""
        text = text or None
        self.notes[item] = (Note(status, source, detail=text) if status == "captured"
                            else Note(status, source, reason=text))

    def unit_for(self, dev: PciDev) -> Unit | None:
        if dev.iommu and dev.iommu in self.units:
            return self.units[dev.iommu]
        for u in self.units.values():
            if dev.bdf in u.devices:
                return u
        return None


# ---------------------------------------------------------------------------------------
# Source registry


class Source:
    """A reader of one kernel subsystem. Subclasses set ``name`` and ``order`` and
    implement ``collect(host)``; they are registered with :func:`register`."""

    name = "source"
    order = 100          # sources run in increasing order (later ones may use earlier data)
    items: tuple = ()    # provenance items this source may fill (documentation, tests)

    def collect(self, host: Host) -> None:  # pragma: no cover - interface
        raise NotImplementedError


REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    REGISTRY[cls.name] = cls
    return cls


ProgressFn = Callable[[str], None]
