"""``handover doctor``: can this host do a keepalive kexec, and if not, why (one line per
check; ``--json`` for tools). Exit 0 ready, 1 not ready (a check failed), 2 usage."""

from __future__ import annotations

import click

from .common import emit_json, exit_with, handle_errors, out, sysroot_option

MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL", "info": "    "}


@click.command()
@click.option("--kernel", "image", type=click.Path(dir_okay=False), metavar="IMAGE",
              help="The next kernel: does it read the state (its Handover ELF note)?")
@click.option("--region", metavar="R", help="Check this region (default: every pmem region "
              "of the host).")
@click.option("--device", "devices", multiple=True, metavar="BDF",
              help="Check these devices (default: every device bound to vfio-pci).")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON on stdout.")
@sysroot_option
@handle_errors
def doctor(image, region, devices, as_json, sysroot):
    """Preflight: can this host do a keepalive kexec, and if not, why.

    Checks the running and the next kernel (do they declare the format), the IOMMU (legacy
    or scalable mode, interrupt remapping, xAPIC or x2APIC/EIM), each passthrough device
    (vfio-pci, alone in its IOMMU group, its bridges and DMA aliases, SR-IOV role, MSI/MSI-X
    vectors, what the kernel cannot keep yet: /sys/kernel/handover/features), the region
    (kind, physical address, memmap=), kexec-tools, and says what would be kept and what
    released. Exit 0 ready, 1 not ready."""
    from ..ops.doctor import DoctorRequest, doctor as run

    rep = run(DoctorRequest(sysroot=sysroot, kernel=image, region=region, devices=devices))
    if as_json:
        emit_json(rep)
    else:
        for c in rep["checks"]:
            out(f"{MARK[c['status']]}  {c['check']:<22} {c['text']}")
        out(("READY: a keepalive kexec can go ahead" if rep["keepalive"] else
             "READY: a kexec with user-space validation only (no keepalive)") if rep["ok"] else
            "NOT READY: " + str(sum(c["status"] == "fail" for c in rep["checks"]))
            + " check(s) failed")
    exit_with(rep["exit_code"])
