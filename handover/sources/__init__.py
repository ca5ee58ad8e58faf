"""Compatibility: the host readers' old package name. They live in :mod:`handover.host`;
``handover.sources.base`` and ``handover.sources.kernel_handover`` stay importable for the
system tests that use them (tests/system/test_hstatus.py). New code imports handover.host."""

from ..host import Host, Sysroot, read_host  # noqa: F401
