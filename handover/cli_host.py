"""Compatibility: the commands ``save``, ``load`` and ``capture-sysroot`` at their old module
path. They live in :mod:`handover.cli.host`; this name stays because the system test of the
initramfs images (tests/system/test_initramfs_e2e.py) looks for this file in the image.
Remove it once that test names handover/cli/host.py."""

from .cli.host import capture_sysroot, load, save  # noqa: F401
