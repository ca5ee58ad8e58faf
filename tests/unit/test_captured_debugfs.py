"""The sources on a tree captured from the PATCHED kernel (CONFIG_INTEL_IOMMU_DEBUGFS=y,
kernel-patches 0003): real debugfs text, not constructed (tests/fixtures/captured/
handover-6.12-debugfs/CAPTURED.md says how it was captured)."""

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from handover.cli import main
from handover.formats.codec import decode
from handover.formats.enums import RESERVED_KIND_VALUE

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "captured" / "handover-6.12-debugfs"
EDU = "0000:00:03.0"


def _save(tmp_path, *extra):
    root = tmp_path / "host"
    shutil.copytree(FIX, root, symlinks=True, ignore=shutil.ignore_patterns("_capture"))
    out = tmp_path / "state.bin"
    r = CliRunner().invoke(main, ["save", "--sysroot", str(root), "--output", str(out), "--json",
                                  *extra])
    assert r.exit_code == 0, r.stderr
    return root, out, json.loads(r.stdout)


def _debugfs_irtes(root):
    text = (root / "sys/kernel/debug/iommu/intel/ir_translation_struct").read_text()
    rows = {}
    for ln in text.splitlines():
        parts = ln.split()
        if len(parts) == 6 and parts[0].isdigit():
            rows[int(parts[0])] = (parts[1], int(parts[4], 16), int(parts[5], 16))
    return rows


def test_save_captures_tables_from_real_debugfs(tmp_path):
    root, out, rep = _save(tmp_path)
    st = decode(out.read_bytes())
    unit = list(st.units)[0]
    regs = (root / "sys/class/iommu/dmar0/intel-iommu")
    # the 0003 sysfs registers and debugfs agree, and the state holds them
    assert unit.irta == int((regs / "irta").read_text(), 16)
    assert unit.rtaddr == int((regs / "rtaddr").read_text(), 16)
    assert unit.irta & ~0xFFF == 0x1200000  # "IR table address:1200000" in debugfs
    # edu's IRTEs are exactly the debugfs rows whose source id is 00:03.0
    want = {i: (hi, lo) for i, (sid, hi, lo) in _debugfs_irtes(root).items() if sid == "00:03.0"}
    got = {r.index: (r.hi, r.lo) for r in st.irtes}
    assert want and got == want
    # edu's context entry (legacy mode) and its domain
    ctx = [c for c in st.contexts if c.sbdf == 0x18]
    assert len(ctx) == 1 and (ctx[0].lo & 1) and ctx[0].did == (ctx[0].hi >> 8) & 0xFFFF
    assert any(d.did == ctx[0].did for d in st.domains)
    kinds = {r.kind for r in st.reserved}
    assert RESERVED_KIND_VALUE["ir-table"] in kinds and RESERVED_KIND_VALUE["root-table"] in kinds
    assert "irtes" not in st.absent and "contexts" not in st.absent


def test_load_on_the_same_tree_matches_and_a_moved_irt_does_not(tmp_path):
    root, out, _ = _save(tmp_path)
    res = tmp_path / "res"

    def load():
        r = CliRunner().invoke(main, ["load", "--sysroot", str(root), "--region", str(out),
                                      "--result-dir", str(res), "--json", "--check-only"])
        return r.exit_code, json.loads(r.stdout)

    code, doc = load()
    assert code == 0, doc["failures"]
    # the next kernel put its IR table elsewhere: every view of the register says so
    (root / "sys/class/iommu/dmar0/intel-iommu/irta").write_text("2200000f\n")
    dbg = root / "sys/kernel/debug/iommu/intel"
    for name, old, new in (("iommu_regset", "0x000000000120000f", "0x000000000220000f"),
                           ("ir_translation_struct", "address:1200000", "address:2200000")):
        text = (dbg / name).read_text()
        assert old in text
        (dbg / name).write_text(text.replace(old, new))
    code, doc = load()
    assert code == 6 and any("IRTA" in f for f in doc["failures"])


def test_save_takes_every_table_page_from_live_ranges(tmp_path):
    """A patched kernel (0011) lists in debugfs every range a vfio-pci device's translation
    uses, the page tables with no leaf among them (an unmap leaves them; the IOMMU's debugfs
    shows only leaves, and the kexec check and the next kernel's walk visit them). The save
    preserves exactly those page tables and DMA buffers; without the file, those derived from
    debugfs's leaves. The live_ranges text is hand-written in the kernel's format (a page-table
    page 0x9f9e000 without leaves added to the captured tree's tables, and the patched kernel's
    /sys/kernel/handover/formats, which this capture lacks)."""
    from handover.host.kernel_handover import parse_live_ranges

    _root0, out0, _rep = _save(tmp_path / "a")
    before = {(r.start, r.size, r.kind) for r in decode(out0.read_bytes()).reserved}
    tables = sorted(s for s, n, k in before if k == RESERVED_KIND_VALUE["page-table"])
    bufs = sorted((s, n) for s, n, k in before if k == RESERVED_KIND_VALUE["dma-buffer"])
    assert tables
    lines = [f"{EDU} 5 {t:#x} 0x1000" for t in tables] + [f"{EDU} 5 0x9f9e000 0x1000"]
    lines += [f"{EDU} 10 {s:#x} {n:#x}" for s, n in bufs] + [f"{EDU} context 0x1 0x2"]
    # scalable mode (0012): the PASID directory and table come from the live ranges too
    lines += [f"{EDU} 3 0x9f9c000 0x1000", f"{EDU} 4 0x9f9b000 0x1000",
              f"{EDU} pasid 0x9f9a089 0x4 0x0"]
    live = tmp_path / "b" / "host" / "sys/kernel/debug/handover/live_ranges"
    assert (5, 0x9f9e000, 0x1000) in parse_live_ranges("\n".join(lines))[EDU]
    root = tmp_path / "b" / "host"
    shutil.copytree(FIX, root, symlinks=True, ignore=shutil.ignore_patterns("_capture"))
    live.parent.mkdir(parents=True, exist_ok=True)
    live.write_text("\n".join(lines) + "\n")
    (root / "sys/kernel/handover").mkdir(parents=True)     # the patched kernel's directory
    (root / "sys/kernel/handover/formats").write_text("1.0-1.1\n")
    out = tmp_path / "b" / "state.bin"
    r = CliRunner().invoke(main, ["save", "--sysroot", str(root), "--output", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    after = {(r.start, r.size, r.kind) for r in decode(out.read_bytes()).reserved}
    assert (0x9f9e000, 0x1000, RESERVED_KIND_VALUE["page-table"]) in after
    assert after - before == {(0x9f9e000, 0x1000, RESERVED_KIND_VALUE["page-table"]),
                              (0x9f9c000, 0x1000, RESERVED_KIND_VALUE["pasid-dir"]),
                              (0x9f9b000, 0x1000, RESERVED_KIND_VALUE["pasid-table"])}


def test_live_ranges_parse():
    from handover.host.kernel_handover import parse_live_ranges

    text = ("0000:00:08.0 1 0x1973000 0x1000\n0000:00:08.0 5 0x9fa8000 0x2000\n"
            "0000:00:08.0 10 0x38200000 0x200000\n0000:00:08.0 context 0x9fa8001 0x802\n"
            "0000:00:08.0 pasid 0x9fa8089 0x4 0x0\n"
            "0000:00:09.0 error -95\ngarbage line\n")
    assert parse_live_ranges(text) == {"0000:00:08.0": [(1, 0x1973000, 0x1000),
                                                        (5, 0x9fa8000, 0x2000),
                                                        (10, 0x38200000, 0x200000)]}
    assert parse_live_ranges(None) is None and parse_live_ranges("") == {}
