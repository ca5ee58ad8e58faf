"""The patched kernel's own interface, /sys/kernel/handover/ (kernel-patches 0002-0007).

Absent on stock kernels: this source then notes that and changes nothing. One value per
file (documented in the series' Documentation/ABI/testing/sysfs-kernel-handover):

``state``, ``reason``, ``region``, ``error``, ``generation``, ``format``
    What became of the state named by handover=: ``state`` is none, no-state, rejected,
    valid, accepted or aborted; ``region`` ``<size>@<phys>``; ``error`` ``<HO_E name> at
    offset N`` when the kernel's parser refused the state; empty files say "nothing".
``reserved_ranges``, ``reserved_bytes``, ``ir_tables_kept``, ``root_tables_kept``
    Counters (decimal).
``devices/<bdf>/{state,domain,reason}``
    One directory per keepalive device of the state: ``listed``, ``held`` or
    ``released``; the adopted domain ID; why it was released. Gathered into a list under
    ``keepalive``.
``formats``
    The format versions the kernel reads, ``1.0-1.1``.
``features``
    Words naming what the kernel can keep beyond the base case (a legacy-mode unit, a device
    without DMA aliases, no SR-IOV): ``scalable``, ``sriov``, ``dma-alias``. Missing (the
    current series has no such file): the base case only. Expected of a future series;
    user space refuses, before the kexec, what the kernel does not declare.
``blob`` (0400)
    The RAM copy of the state the kernel validated.
``decision`` (0644)
    Reads ``pending``, ``accept`` or ``abort``; ``handover load`` writes ``accept`` or
    ``abort`` after comparing the state with the machine.

Kernels of the first series had one multi-line ``status`` file of ``key: value`` lines
(``device: <bdf> held [adopted domain=N] [(why)]`` per device); it is still read when
present. The registers the stock sysfs lacks (GSTS, RTADDR, IRTA, IQA, IQH, IQT) come from
the same series through /sys/class/iommu/dmarN/intel-iommu/ (see intel_iommu.py).
Newer kernels may add files; this reader ignores what it does not know.
"""

from __future__ import annotations

import errno
import re

from ..errors import HandoverError
from ..formats.descriptions import BDF_PATTERN
from .base import (KERNEL_STATUS_FILES, Host, KeepaliveDevice, KernelInterface, KernelStatus,
                   Source, Sysroot, register)

ROOT = "/sys/kernel/handover"


_DEVICE = re.compile(rf"^(?P<bdf>{BDF_PATTERN}) (?P<state>[a-z]+)"
                     r"(?: adopted domain=(?P<domain>\d+))?(?: \((?P<why>.*)\))?$")


def parse_status(text: str) -> KernelStatus:
    """The first series' multi-line ``status`` file: ``key: value`` lines, one ``device:``
    line per keepalive device."""
    out = KernelStatus()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "device":
            m = _DEVICE.match(value)
            out.keepalive.append(KeepaliveDevice(line=value) if m is None else KeepaliveDevice(
                bdf=m["bdf"], state=m["state"], adopted=m["domain"] is not None,
                domain=int(m["domain"]) if m["domain"] else None, why=m["why"]))
        else:
            out.set(key, value)
    return out


#: the one-value files of the kernel's interface (a field each in KernelStatus)
STATUS_FILES = KERNEL_STATUS_FILES


def read_status(sysroot: Sysroot) -> KernelStatus:
    """/sys/kernel/handover/ now (an empty KernelStatus when absent): the one-value files
    that are not empty, and the keepalive devices."""
    old = sysroot.try_text(f"{ROOT}/status")
    if old is not None:
        return parse_status(old)
    out = KernelStatus()
    for name in STATUS_FILES:
        v = (sysroot.try_text(f"{ROOT}/{name}") or "").strip()
        if v:
            out.set(name, v)
    ddir = f"{ROOT}/devices"
    if sysroot.isdir(ddir):
        for bdf in sorted(sysroot.listdir(ddir)):
            def val(f: str) -> str:
                return (sysroot.try_text(f"{ddir}/{bdf}/{f}") or "").strip()
            dom = val("domain")
            out.keepalive.append(KeepaliveDevice(
                bdf=bdf, state=val("state"), adopted=bool(dom),
                domain=int(dom) if dom.isdigit() else None, why=val("reason") or None))
    return out


@register
class KernelHandover(Source):
    name = "kernel-handover"
    order = 25
    items = ("kernel-handover",)

    def collect(self, host: Host) -> None:
        sr = host.sysroot
        if not sr.isdir(ROOT):
            host.note("kernel-handover", "absent", self.name,
                      f"{ROOT} missing: kernel without handover patches")
            return
        info = KernelInterface(path=ROOT, formats=sr.try_text(f"{ROOT}/formats"),
                               decision=sr.try_text(f"{ROOT}/decision"), status=read_status(sr),
                               features=read_features(sr),
                               live_ranges=parse_live_ranges(sr.try_text(LIVE_RANGES)))
        host.kernel_handover = info
        host.note("kernel-handover", "captured", self.name,
                  f"{ROOT}: state {info.state}, formats {info.formats}")


FEATURES = f"{ROOT}/features"
#: debugfs of a patched kernel (0011): every range each vfio-pci device's translation uses
LIVE_RANGES = "/sys/kernel/debug/handover/live_ranges"
_LIVE = re.compile(rf"^(?P<bdf>{BDF_PATTERN}) (?P<kind>\d+) 0x(?P<start>[0-9a-f]+) "
                   r"0x(?P<size>[0-9a-f]+)$")


def parse_live_ranges(text: str | None) -> dict | None:
    """{bdf: [(kind, start, size)]} from live_ranges ("<bdf> <kind> <start> <size>" lines;
    "context" and "error" lines are not ranges); None for no file. At most 1,000,000 lines
    are read (the kernel's walk is bounded at 65,536 table pages per device)."""
    if text is None:
        return None
    out: dict = {}
    for n, ln in enumerate(text.splitlines()):
        if n >= 1_000_000:
            break
        m = _LIVE.match(ln.strip())
        if m:
            out.setdefault(m["bdf"], []).append(
                (int(m["kind"]), int(m["start"], 16), int(m["size"], 16)))
    return out


def read_features(sysroot: Sysroot) -> frozenset:
    """The words of /sys/kernel/handover/features: what the running kernel can keep beyond
    the base case (a legacy-mode unit, a device without DMA aliases, no SR-IOV). Missing
    (every kernel of the current series): nothing beyond the base case, "legacy only"."""
    return frozenset((sysroot.try_text(FEATURES) or "").split())


def feed(sysroot: Sysroot, verdict: str, reason: str = "") -> str:
    """Tell the kernel userspace's verdict ("accept" / "abort"). Returns what was written.

    The reason of an abort goes to the log (stderr, result.json); the kernel takes the word."""
    if verdict not in ("accept", "abort"):
        raise ValueError(verdict)
    try:
        sysroot.write_text(f"{ROOT}/decision", verdict + "\n")
    except OSError as e:
        raise HandoverError(f"{ROOT}/decision: cannot write {verdict!r}: "
                            f"{errno.errorcode.get(e.errno or 0, e)}: {e.strerror}") from None
    return verdict


KEEPALIVE = f"{ROOT}/keepalive"
NEXT_REGION = f"{ROOT}/next_region"


def arm_keepalive(sysroot: Sysroot, devices: list[str], next_reads_state: bool = True,
                  region: str | None = None) -> dict:
    """Tell a patched running kernel which devices its kexec must leave running (DMA
    translation on, bus mastering kept: kernel-patches 0005). Feature-detected: on a stock
    kernel the file does not exist and nothing changes.

    Only when the next kernel reads the state (it declares so in its Handover ELF note): a
    kernel that does not would find translation on, disable it as a stock kernel does, and
    the devices still bus-mastering would DMA to their IOVAs as physical addresses. Then
    any earlier arming is cleared and the kexec stops the devices as usual.

    ``region`` (``<size>@<phys>``, the next kernel's ``handover=``) goes to
    ``next_region`` where the kernel has it (kernel-patches 0011): at the kexec the old
    kernel checks the newest state there against its live tables and disarms if they
    differ; without a region it would disarm, so nothing is armed."""
    if not sysroot.exists(KEEPALIVE):
        return {"armed": False, "reason": f"{KEEPALIVE} missing: kernel without handover patches"}
    checks = sysroot.exists(NEXT_REGION)
    why = None
    if not next_reads_state:
        why = "the next kernel does not declare that it reads the handover state: the " \
              "kexec stops the devices as usual"
    elif checks and not region:
        why = "the region has no physical address the kernel can check the saved state at: " \
              "the kexec stops the devices as usual"
    if why:
        devices = []
    word, path = "clear", KEEPALIVE
    try:
        sysroot.write_text(KEEPALIVE, "clear\n")
        if checks:
            path = NEXT_REGION
            sysroot.write_text(NEXT_REGION, (region if devices else "clear") + "\n")
        path = KEEPALIVE
        for word in devices:
            sysroot.write_text(KEEPALIVE, word + "\n")
    except OSError as e:
        raise HandoverError(f"{path}: cannot arm {word}: {e.strerror}") from None
    if why:
        return {"armed": False, "reason": why}
    return {"armed": True, "devices": list(devices)}
