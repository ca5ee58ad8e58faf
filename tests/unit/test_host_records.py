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
from handover.host.base import UNIT_REGS, Host, Note, Sysroot, UnitRegs
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


# --- Note ------------------------------------------------------------------------------
def test_note_as_dict_keeps_the_provenance_layout():
    assert Note("captured", "iomem").as_dict() == {"status": "captured", "source": "iomem"}
    d = Note("absent", "intel-iommu-debugfs", reason="not mounted").as_dict()
    assert list(d.items()) == [("status", "absent"), ("source", "intel-iommu-debugfs"),
                               ("reason", "not mounted")]
    d = Note("partial", "collect", detail="some", reason="not all").as_dict()
    assert list(d) == ["status", "source", "detail", "reason"]


def test_host_note_puts_the_text_in_detail_or_reason():
    h = Host(sysroot=Sysroot("/nonexistent"))
    h.note("units", "captured", "intel-iommu-sysfs", "dmar0")
    h.note("irtes", "absent", "intel-iommu-debugfs", "no debugfs")
    h.note("domains", "partial", "intel-iommu-debugfs", "some")
    h.note("iomem", "captured", "iomem")
    assert h.notes == {
        "units": Note("captured", "intel-iommu-sysfs", detail="dmar0"),
        "irtes": Note("absent", "intel-iommu-debugfs", reason="no debugfs"),
        "domains": Note("partial", "intel-iommu-debugfs", reason="some"),
        "iomem": Note("captured", "iomem"),
    }


def test_a_failing_source_leaves_absent_notes(monkeypatch):
    from handover.host.iomem import IomemSource

    def boom(self, host):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(IomemSource, "collect", boom)
    h = host_of(PATCHED)
    n = h.notes["iomem"]
    assert isinstance(n, Note) and n.status == "absent" and n.source == "iomem"
    assert n.reason.startswith("source iomem failed: ") and n.detail is None


@pytest.mark.parametrize("tree", captured_outputs.trees())
def test_notes_on_captured_trees_are_notes(tree):
    h = host_of(tree)
    assert h.notes and all(isinstance(n, Note) for n in h.notes.values())
    for item, n in h.notes.items():
        assert n.status in ("captured", "partial", "absent"), item
        assert n.source and (n.reason is None or n.status != "captured"), item
        assert n.detail is None or n.status == "captured", item


def test_notes_on_the_patched_tree():
    h = host_of(PATCHED)
    assert h.notes["units.irta"] == Note("captured", "intel-iommu-debugfs",
                                         detail="/sys/kernel/debug/iommu/intel/iommu_regset")
    assert h.notes["domains"].status == "partial"
    assert "page tables not walked" in h.notes["domains"].reason
    stock = host_of(STOCK[0])
    assert stock.notes["irtes"].status == "absent" and stock.notes["irtes"].reason


def test_state_provenance_is_written_from_the_notes():
    """build_state writes a host note as its as_dict() (the items of the format, with
    their defaults, and any other note as it is)."""
    from handover.formats.enums import ITEMS
    from handover.ops.build import SaveOptions, build_state, select_devices

    h = host_of(PATCHED)
    kept, _ = select_devices(h, None)
    st, _report = build_state(h, kept, SaveOptions())
    for item, n in h.notes.items():
        if item in ITEMS and item in st.absent:
            continue
        assert st.provenance[item] == n.as_dict(), item
    # notes of build_state itself; an item nobody noted: captured by collect
    assert st.provenance["pi_descs"] == {
        "status": "captured", "source": "intel-iommu-sysfs",
        "detail": "none: no unit supports posted interrupts (CAP.PI clear)"}
    assert st.provenance["reserved"] == {"status": "captured", "source": "collect"}
    assert list(st.provenance["reserved.region"]) == ["status", "source", "reason"]


def test_capture_manifest_provenance_is_the_notes(tmp_path, golden):
    """capture-sysroot writes the notes as JSON objects, as before (its manifest sorts keys)."""
    import shutil
    import tarfile

    from handover.ops.capture import capture

    root = tmp_path / "host"
    shutil.copytree(os.path.join(CAPTURED, PATCHED), root, symlinks=True,
                    ignore=shutil.ignore_patterns("_capture"))
    out = tmp_path / "capture.tar"
    capture(str(root), str(out))
    with tarfile.open(out) as tar:
        manifest = json.load(tar.extractfile("HANDOVER-CAPTURE.json"))
    prov = json.loads(json.dumps(manifest["provenance"]).replace(str(tmp_path), "<TMP>"))
    assert prov == golden[PATCHED]["capture_provenance"]
