"""The patched kernel in the lab: what the kernel tests share (test_kernel_handover,
test_keepalive, test_keepalive_safety, test_initramfs_patched, the keepalive benchmark).

The ``patched`` fixture (tests/conftest.py) is :func:`patched_kernel` of one build
configuration, ``lab`` or ``debian`` (tools/kernel.py); :func:`on_patched` checks that phases
of a run booted it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.system import lab

ROOT = lab.REPO
#: the handover= region of the kernel tests: the lab's legacy pmem range
REGION = "64M@0x30000000"
CONFIGS = ("lab", "debian")


def status(text: str) -> dict:
    """``hstatus`` output as {key: value} (lab.parse_hstatus)."""
    return lab.parse_hstatus(text)


def patched_kernel(config: str) -> dict:
    """The patched kernel of one build configuration (tools/kernel.py paths() + "release"
    and "run_guest": the run_guest arguments its phases need, i.e. for ``debian`` the
    initrd with its modules). Skips the test when that configuration is not built, unless
    HANDOVER_BUILD_KERNEL=1 (then it builds it) or HANDOVER_KERNEL_STALE_OK=1 (then an older
    build does)."""
    from tools import kernel

    b = kernel.built(config)
    if b is None and os.environ.get("HANDOVER_KERNEL_STALE_OK") == "1":
        p = kernel.paths(config)
        if os.path.exists(p["bzImage"]) and (config != "debian" or os.path.isdir(p.get("modules", ""))):
            print(f"\nusing the {config} build older than the patches (HANDOVER_KERNEL_STALE_OK=1)")
            b = p
    if b is None:
        # building takes 15-45 minutes: only when asked (make test-kernel sets this)
        if os.environ.get("HANDOVER_BUILD_KERNEL") != "1":
            pytest.skip(f"patched kernel ({config} configuration) not built or older than the "
                        f"patches: python tools/kernel.py build --config {config} "
                        f"(make {'kernel' if config == 'lab' else 'kernel-debian'}), or "
                        f"HANDOVER_BUILD_KERNEL=1")
        b = kernel.build(os.cpu_count() or 2, config)
    b = dict(b, release=kernel.release(config))
    if config == "debian":
        b["run_guest"] = {"extra_kernels": [lab.Kernel(b["release"], Path(b["mod_root"]))]}
    else:
        b["run_guest"] = {}
    return b


def on_patched(patched, res, *phases) -> None:
    """Phases ``phases`` (1-based) ran on ``patched``'s kernel; on the debian build with its
    modules (vfio_pci among them, none refused), so nothing passes without them."""
    for n in phases:
        p = res.phases[n - 1]
        assert p.release == patched["release"], (n, p.release, patched["release"])
        if patched["config"] == "debian":
            assert "vfio_pci" in p.modules and "virtio_blk" in p.modules, (n, p.modules)
            assert p.modules_list.endswith(f"modules.load.{p.release}"), p.modules_list
            assert not res.missing_modules(p), (n, res.missing_modules(p))
        else:
            assert not p.modules, (n, p.modules)   # MODULES=n: everything built in
