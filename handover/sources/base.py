"""Compatibility: :mod:`handover.host.base` at its old name (see handover.sources)."""

from ..host.base import Host, PciDev, Source, Sysroot, Unit  # noqa: F401
