"""Physical memory map from /proc/iomem: reserved and persistent-memory ranges, the IOMMU
register windows (``dmarN``) and PCI BAR claims. Addresses read as 0 for non-root users
(kernel/resource.c hides them without CAP_SYS_ADMIN)."""

from __future__ import annotations

from ..formats.iomem import parse_iomem
from .base import Host, Source, register

PROC_IOMEM = "/proc/iomem"
PMEM_NAMES = ("Persistent Memory", "Persistent Memory (legacy)")


def read_iomem(sr) -> list[tuple[int, int, str, int]]:
    """/proc/iomem under ``sr``, parsed ([] when unreadable or malformed)."""
    try:
        return parse_iomem(sr.try_text(PROC_IOMEM) or "")
    except ValueError:
        return []


def pmem_ranges(iomem) -> list[tuple[int, int, str]]:
    return [(s, e, n) for s, e, n, d in iomem if d == 0 and n in PMEM_NAMES]


def ranges_named(iomem, name: str) -> list[tuple[int, int]]:
    return [(s, e) for s, e, n, _d in iomem if n == name]


@register
class IomemSource(Source):
    name = "iomem"
    order = 50
    items = ("iomem",)

    def collect(self, host: Host) -> None:
        text = host.sysroot.try_text(PROC_IOMEM)
        if text is None:
            host.note("iomem", "absent", self.name, f"{PROC_IOMEM} unreadable")
            return
        try:
            host.iomem = parse_iomem(text)
        except ValueError as e:
            host.note("iomem", "absent", self.name, str(e))
            return
        if host.iomem and all(s == 0 and e == 0 for s, e, _n, _d in host.iomem):
            host.note("iomem", "absent", self.name,
                      f"{PROC_IOMEM} shows zero addresses (needs CAP_SYS_ADMIN)")
            host.iomem = []
            return
        host.note("iomem", "captured", self.name,
                  f"{len(host.iomem)} ranges, {len(pmem_ranges(host.iomem))} persistent-memory")
