"""The live host (or a captured tree under ``--sysroot``): the only code that reads /sys,
/proc and debugfs, always through :class:`~handover.host.base.Sysroot`.

``base`` holds the Sysroot and the typed records (Host, Unit, PciDev, Vector, ContextEntry,
Caps, and KernelInterface / KernelStatus / KeepaliveDevice for /sys/kernel/handover/); one *source* module per kernel subsystem (pci, intel_iommu, iommu_debugfs,
interrupts, iomem, kernel_handover) defines a :class:`~handover.host.base.Source` subclass
decorated with :func:`~handover.host.base.register`. Every module of this package is
imported by :func:`all_sources`, so a new source slots in by adding a file: nothing else
changes. ``kernelimage`` reads kernel images, /sys/kernel/notes and crash dumps.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (REGISTRY, Caps, ContextEntry, DomainWalk, Host, Irq, KeepaliveDevice,
                   KernelInterface, KernelStatus, Note, PciDev, Source, Sysroot, Unit, UnitRegs,
                   Vector, register)

__all__ = ["REGISTRY", "Caps", "ContextEntry", "DomainWalk", "Host", "Irq", "KeepaliveDevice",
           "KernelInterface", "KernelStatus", "Note", "PciDev", "Source", "Sysroot", "Unit",
           "UnitRegs", "Vector", "register",
           "all_sources", "read_host"]

_LOADED = False


def _load_modules() -> None:
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "base":
            continue
        importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def all_sources() -> list[Source]:
    """One instance of every registered source, in run order."""
    _load_modules()
    return [cls() for cls in sorted(REGISTRY.values(), key=lambda c: (c.order, c.name))]


def read_host(sysroot: Sysroot | str = "/", *, only: list[str] | None = None,
              progress=None, wanted: set | None = None) -> Host:
    """Run every source (or those named in ``only``) against ``sysroot``.

    A source that fails unexpectedly does not stop the others: its items are noted absent
    with the error (collect/--require full decides whether that is fatal)."""
    sr = sysroot if isinstance(sysroot, Sysroot) else Sysroot(sysroot)
    host = Host(sysroot=sr, wanted=wanted)
    for src in all_sources():
        if only is not None and src.name not in only:
            continue
        if progress:
            progress(f"reading {src.name}")
        try:
            src.collect(host)
            host.sources_run.append(src.name)
        except (OSError, ValueError, KeyError, IndexError) as e:  # a reader bug or odd host
            for item in src.items:
                host.notes.setdefault(item, Note("absent", src.name,
                                                 reason=f"source {src.name} failed: {e}"))
            host.sources_run.append(f"{src.name} (failed: {e})")
    return host
