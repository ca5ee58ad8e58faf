"""A nested VM in the lab's Debian rootfs (tests/system/nested.py): the patched QEMU runs as
a systemd unit in the lab guest with edu passed through (vfio-pci) and its RAM on
device-dax; the freestanding workload's DMA rounds (with edu's MSI) show up in its
progress record, read from the dax device. Skipped unless the patched QEMU is built
(python tools/qemu.py build). TCG inside TCG: several minutes.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.system import lab, nested

pytestmark = pytest.mark.system


def test_nested_vm_edu_dma_rounds_grow():
    try:
        files = nested.files()
        lab.setup()
        lab.rootfs.build()
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    res = lab.run_guest(nested.vm_script(watch=300), rootfs="debian", pmem="legacy",
                        files=files, timeout=900)
    print(f"\nnested VM run timings:\n{res.format_timings()}", file=sys.stderr)
    res.check()
    p = res.phases[0]
    assert "vfio-pci" in p.stdout, p.stdout
    samples = json.loads(p.files["progress.json"])
    last = samples[-1]
    assert last["magic"] == "EDUPROG1" and last["state"] == 3, last
    first = next(s for s in samples if s["rounds"] > 0)
    assert last["rounds"] > first["rounds"], samples
    assert last["errors"] == 0, last
    # every DMA asked for an interrupt, an MSI: two per round, handled (not merely polled)
    assert last["msi_cap"] != 0, last
    assert last["irqs"] >= last["rounds"] and last["polled"] == 0, last
    # the liveness register the program wrote once kept its value; nothing raised from outside
    assert last["alive_bad"] == 0 and last["poked"] == 0, last
    marks = lab.index_markers(res.markers)
    for m in ("VM-START", "VM-FIRST-ROUND", "VM-WATCHED"):
        assert (m, 1) in marks, res.markers
