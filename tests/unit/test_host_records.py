"""The host's typed records (handover.host.base) and the outputs built from them.

The JSON outputs of the commands that read a host, on every captured tree, are pinned
(tests/captured_outputs.py, tests/fixtures/captured-outputs.json): the records may change
shape, what the tool prints and saves may not.
"""

import dataclasses
import json
import os

import pytest

from handover.formats import enums as E
from handover.host import read_host
from handover.host.base import UNIT_REGS, Sysroot, UnitRegs
from tests import captured_outputs

CAPTURED = captured_outputs.CAPTURED
STOCK = [t for t in captured_outputs.trees() if t.startswith("debian-")]
PATCHED = "handover-6.12-debugfs"


def host_of(tree):
    return read_host(Sysroot(os.path.join(CAPTURED, tree)))


@pytest.fixture(scope="module")
def golden():
    with open(captured_outputs.GOLDEN) as f:
        return json.load(f)


@pytest.mark.parametrize("tree", captured_outputs.trees())
def test_outputs_on_captured_tree_are_unchanged(tree, golden):
    now = json.loads(json.dumps(captured_outputs.outputs(tree)))
    assert tree in golden, "a new captured tree: python -m tests.captured_outputs"
    for key in sorted(set(now) | set(golden[tree])):
        assert now.get(key) == golden[tree].get(key), f"{tree}: {key} changed"
    # key order too (the provenance of the capture manifest is written in note order)
    assert json.dumps(now) == json.dumps(golden[tree]), f"{tree}: the order of keys changed"


# --- UnitRegs --------------------------------------------------------------------------
def test_unit_regs_has_a_field_per_unit_record_register():
    assert tuple(f.name for f in dataclasses.fields(UnitRegs)) == UNIT_REGS
    assert tuple(E.UNIT_PRESENT.values()) == UNIT_REGS


def test_unit_regs_get_set_captured():
    r = UnitRegs()
    assert r.captured() == {} and r.get("irta") is None
    r.set("irta", 0x120000F)
    r.cap = 0xD2008C22260206
    assert r.get("irta") == 0x120000F and r.irta == 0x120000F
    # register order, not assignment order
    assert list(r.captured().items()) == [("cap", 0xD2008C22260206), ("irta", 0x120000F)]
    r.set("gsts", 0)            # zero is a captured value
    assert "gsts" in r.captured()
    with pytest.raises(KeyError):
        r.get("fsts")
    with pytest.raises(KeyError):
        r.set("irte", 1)


@pytest.mark.parametrize("tree", STOCK)
def test_unit_regs_on_a_stock_kernel_tree(tree):
    """A stock kernel without debugfs: VER, CAP and ECAP from sysfs, nothing else."""
    h = host_of(tree)
    u = h.units["dmar0"]
    d = os.path.join(CAPTURED, tree, "sys/class/iommu/dmar0/intel-iommu")
    with open(os.path.join(d, "cap")) as f:
        cap = int(f.read(), 16)
    with open(os.path.join(d, "ecap")) as f:
        ecap = int(f.read(), 16)
    assert u.regs == UnitRegs(ver=0x10, cap=cap, ecap=ecap)
    assert list(u.regs.captured()) == ["ver", "cap", "ecap"]
    assert u.dma_enabled is None                            # no GSTS
    assert not u.ir_enabled_source.startswith("intel-iommu")   # IR known from irq chips only


def test_unit_regs_on_the_patched_kernel_tree():
    """The 0003 sysfs files and debugfs iommu_regset (debugfs, read later, wins)."""
    h = host_of(PATCHED)
    u = h.units["dmar0"]
    assert u.regs == UnitRegs(ver=0x10, cap=0xD2008C22260206, ecap=0xF00F4A, gsts=0xC7000000,
                              rtaddr=0x196E000, irta=0x120000F, iqa=0x10DE000, iqh=0x820,
                              iqt=0x820)
    d = os.path.join(CAPTURED, PATCHED, "sys/class/iommu/dmar0/intel-iommu")
    for reg in ("gsts", "rtaddr", "irta", "iqa", "iqh", "iqt"):
        with open(os.path.join(d, reg)) as f:
            assert u.regs.get(reg) == int(f.read(), 16), reg
        assert u.reg_source[reg] == "intel-iommu-debugfs"
    assert u.dma_enabled is True and u.ir_enabled is True    # GSTS TES, IRES
