"""The cycle into the PATCHED kernel (kernel-patches/, tools/kernel.py): `handover arm` reads
its Handover ELF note and adds `handover=<size>@<phys>`; the kernel validates the state early
(/sys/kernel/handover/, one value per file); the initramfs (real mkinitramfs, our hook) runs `handover load`
with handover.policy=abort and tells the kernel `accept` (match) or `abort` (stale state)
through /sys/kernel/handover/decision, and the boot goes on to the root's /sbin/init.

The patched lab kernel has no modules and no ext4, so its root is a vfat disk
(tests/system/e2e.py).  Part of `make test-kernel` (marker `kernel`): skipped unless the
kernel is built (make kernel; HANDOVER_BUILD_KERNEL=1 builds it here, 15-25 min).
"""

from __future__ import annotations

import os

import pytest

from tests.system import e2e, lab

pytestmark = [pytest.mark.system, pytest.mark.kernel]


@pytest.fixture(scope="module")
def kernel(patched):
    """The lab tree of the kernel that the ``patched`` fixture (tests/conftest.py) builds or
    skips for.
    Only the lab configuration: e2e builds its mkinitramfs tree and vfat root for a kernel
    without modules (e2e.patched_kernel)."""
    if patched["config"] != "lab":
        pytest.skip(f"the mkinitramfs cycle runs on the lab build only (e2e.patched_kernel), "
                    f"not on the {patched['config']} configuration")
    return e2e.patched_kernel(stale_ok=os.environ.get("HANDOVER_KERNEL_STALE_OK") == "1")


def _cycle(k, **kw) -> e2e.Cycle:
    try:
        c = e2e.run_cycle(kind="initramfs-tools", pmem="legacy", policy="abort", next_kernel=k, **kw)
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    print(f"\npatched kernel {k.version} {kw}:\n{e2e.format_timings(c.timings)}")
    assert c.reached_root, "\n".join(c.console_lines) + c.guest.console[-3000:]
    assert c.arm["kernel_declaration"] == "kernel reads 1.0-1.1: writing 1.1"
    assert "handover=0x4000000@0x30000000" in c.arm["cmdline"].split()
    ki = c.result["kernel_interface"]
    assert ki["present"] and ki["state"] == "valid" and ki["formats"] == "1.0-1.1"
    assert ki["status"]["region"] == "0x4000000@0x30000000"
    return c


def test_match_accepts(kernel):
    c = _cycle(kernel)
    assert c.boot["rc"] == 0 and c.boot["action"] == "accept"
    assert c.result["ok"] and c.result["kernel_interface"]["written"] == "accept"
    assert any("kernel: accept" in ln for ln in c.console_lines)


def test_stale_state_aborts_and_boots_on(kernel):
    c = _cycle(kernel, stale=True)
    assert c.boot["rc"] == 6 and c.boot["action"] == "abort"
    assert not c.result["ok"] and c.result["kernel_interface"]["written"] == "abort"
    assert any("MISMATCH" in ln and "kernel: abort" in ln for ln in c.console_lines)
