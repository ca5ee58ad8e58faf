"""save -> load through the CLI against captured trees, including deliberate mismatches."""

import json
import tarfile

import pytest
from click.testing import CliRunner

from handover.ops import source as src
from handover.cli import main
from handover.formats import enums as E
from handover.render import diff_states

from hosttree import E1000E, EDU, TOKEN, copy_host, patch_config, remove_device, set_resource


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def save(root, blob, *extra):
    code, out, err = run("save", "--sysroot", root, "--output", blob, "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def load(root, blob, tmp_path, *extra):
    res = tmp_path / "res"
    code, out, err = run("load", "--sysroot", root, "--region", blob, "--result-dir", res,
                         "--json", *extra)
    doc = json.loads(out)
    on_disk = json.loads((res / "result.json").read_text())
    assert on_disk["verdicts"] == doc["verdicts"]
    assert doc["exit_code"] == code
    return code, doc, err


def failing(doc):
    return {v["item"]: v for v in doc["verdicts"] if v["status"] in ("mismatch", "missing")}


@pytest.fixture
def saved(tmp_path):
    root = copy_host(tmp_path / "host")
    blob = tmp_path / "state.bin"
    rep = save(root, blob, "--token", TOKEN)
    return root, blob, rep


def test_save_reports_sources_and_absent(saved):
    _root, blob, rep = saved
    assert rep["devices"] == [EDU]
    assert rep["captured"]["devices"] == "pci-sysfs" and rep["captured"]["units"] == "intel-iommu-sysfs"
    assert set(rep["absent"]) == {"irtes", "contexts", "domains", "reserved"}
    assert rep["captured"]["pi_descs"] == "intel-iommu-sysfs"
    assert "CONFIG_INTEL_IOMMU_DEBUGFS" in rep["not_captured"]["irtes"]
    st = src.load(str(blob)).state
    assert "irtes" in st.absent and st.provenance["irtes"]["status"] == "absent"
    assert st.provenance["devices"]["source"] == "pci-sysfs"
    d = st.devices[0]
    assert (d.vendor, d.device) == (0x1234, 0x11E8) and d.flags & E.DEV_F_TOKEN
    assert [(b.index, b.start, b.size) for b in st.bars] == [(0, 0xFEA00000, 0x100000)]
    assert [(v.kind, v.irte_index, v.irq) for v in st.vectors] == [(E.VEC_MSI, 26, 32)]
    assert st.units[0].reg_base == 0xFED90000 and st.units[0].flags & E.UNIT_F_IRE


def test_load_matches_same_host(saved, tmp_path):
    root, blob, _ = saved
    code, doc, _ = load(root, blob, tmp_path, "--token", TOKEN)
    assert code == 0 and doc["ok"] and doc["summary"]["mismatch"] == 0
    items = {v["item"]: v["status"] for v in doc["verdicts"]}
    assert items["device 0000:00:03.0 BAR0"] == "match"
    assert items["device 0000:00:03.0 token"] == "match"
    assert items["unit dmar0 IRTA"] == "unverified"
    assert doc["kernel_interface"]["present"] is False


def test_load_text_output_and_exit(saved, tmp_path):
    root, blob, _ = saved
    code, out, err = run("load", "--sysroot", root, "--region", blob, "--result-dir", tmp_path / "r")
    assert code == 0 and "MATCH:" in out and "result written" in err


@pytest.mark.parametrize("case", ["device-gone", "bar-moved", "iommu-base", "vendor", "token"])
def test_mismatches_are_named(saved, tmp_path, case):
    root, blob, _ = saved
    extra = []
    if case == "device-gone":
        remove_device(root, EDU)
        want = "device 0000:00:03.0 present"
    elif case == "bar-moved":
        set_resource(root, EDU, 0, 0xFE800000, 0xFE8FFFFF, 0x40200)
        want = "device 0000:00:03.0 BAR0"
    elif case == "iommu-base":
        (root / "sys/devices/virtual/iommu/dmar0/intel-iommu/address").write_text("fed91000\n")
        want = "unit dmar0 register base"
    elif case == "vendor":
        (root / "sys/devices/pci0000:00" / EDU / "device").write_text("0x11e9\n")
        want = "device 0000:00:03.0 vendor:device"
    else:
        extra = ["--token", "00000000-0000-4000-8000-000000000000"]
        want = "device 0000:00:03.0 token"
    code, doc, err = load(root, blob, tmp_path, *extra)
    assert code == 6 and not doc["ok"]
    assert want in failing(doc), sorted(failing(doc))
    assert any(f.startswith(want) for f in doc["failures"])
    assert "handover: mismatch:" in err and want in err


def test_bar_moved_verdict_values(saved, tmp_path):
    root, blob, _ = saved
    set_resource(root, EDU, 0, 0xFE800000, 0xFE8FFFFF, 0x40200)
    _code, doc, _ = load(root, blob, tmp_path)
    v = failing(doc)["device 0000:00:03.0 BAR0"]
    assert v["saved"] == "0xfea00000 size 0x100000" and v["host"] == "0xfe800000 size 0x100000"


def test_dsn_changed(tmp_path):
    root = copy_host(tmp_path / "host")
    blob = tmp_path / "s.bin"
    rep = save(root, blob, "--device", E1000E, "--force")
    assert any("not vfio-pci" in w for w in rep["warnings"])
    st = src.load(str(blob)).state
    assert st.devices[0].flags & E.DEV_F_DSN
    off = 0x140 + 4   # DSN capability of this e1000e (captured config)
    patch_config(root, E1000E, off, b"\x99\x88\x77\x66")
    code, doc, _ = load(root, blob, tmp_path)
    assert code == 6
    v = failing(doc)["device 0000:00:04.0 DSN"]
    assert v["saved"] != v["host"]


def test_refuses_non_vfio_and_shared_group(tmp_path):
    root = copy_host(tmp_path / "host")
    code, _out, err = run("save", "--sysroot", root, "--dry-run", "--device", E1000E)
    assert code == 1 and "bound to e1000e, not vfio-pci" in err
    code, _out, err = run("save", "--sysroot", root, "--dry-run", "--device", "0000:00:1f.2")
    assert code == 1 and "shares IOMMU group 6 with 0000:00:1f.0, 0000:00:1f.3" in err
    code, _out, err = run("save", "--sysroot", root, "--dry-run", "--device", "0000:00:09.0")
    assert code == 1 and "no such PCI device" in err


def test_require_full_fails_on_stock_kernel(tmp_path):
    root = copy_host(tmp_path / "host")
    code, _out, err = run("save", "--sysroot", root, "--dry-run", "--require", "full")
    assert code == 1 and "--require full: not captured:" in err and "irtes" in err


def test_stale_state_via_test_option(tmp_path):
    root = copy_host(tmp_path / "host")
    blob = tmp_path / "s.bin"
    save(root, blob, "--test-alter-bar", f"{EDU}:0:0xfe000000")
    code, doc, _ = load(root, blob, tmp_path)
    assert code == 6 and "device 0000:00:03.0 BAR0" in failing(doc)


def test_debugfs_host_saves_tables_and_checks_irtes(tmp_path):
    root = copy_host(tmp_path / "host", debugfs=True)
    blob = tmp_path / "s.bin"
    rep = save(root, blob)
    assert rep["absent"] == []
    st = src.load(str(blob)).state
    u = st.units[0]
    assert u.gsts == 0xC7000000 and u.irta == 0x2E0000F and u.flags & E.UNIT_F_TE
    assert [(r.index, r.hi & 0xFFFF) for r in st.irtes] == [(26, 0x18)]
    assert [(c.sbdf, c.did) for c in st.contexts] == [(0x18, 6)]
    assert [(d.did, d.agaw, d.gaw, d.pgd) for d in st.domains] == [(6, 1, 39, 0x3A5C000)]
    kinds = {(E.RESERVED_KIND[r.kind], r.start, r.size) for r in st.reserved}
    assert ("root-table", 0x2F0E000, 0x1000) in kinds
    assert ("ir-table", 0x2E00000, 1 << 20) in kinds
    assert ("context-table", 0x2F10000, 0x1000) in kinds
    assert {("page-table", a, 0x1000) for a in (0x3A5C000, 0x3A5D000, 0x3A5E000)} <= kinds
    assert ("dma-buffer", 0x5000000, 0x8000) in kinds and ("dma-buffer", 0x5200000, 0x200000) in kinds
    code, doc, _ = load(root, blob, tmp_path)
    assert code == 0, doc["failures"]
    items = {v["item"]: v["status"] for v in doc["verdicts"]}
    assert items["unit dmar0 IRTE 26"] == "match" and items["unit dmar0 IRTA"] == "match"
    # the new kernel put a different IR table in place: named
    p = root / "sys/kernel/debug/iommu/intel/iommu_regset"
    p.write_text(p.read_text().replace("0x0000000002e0000f", "0x0000000003e0000f"))
    code, doc, _ = load(root, blob, tmp_path)
    assert code == 6 and "unit dmar0 IRTA" in failing(doc)


def test_capture_sysroot_roundtrip(tmp_path):
    root = copy_host(tmp_path / "host", debugfs=True)
    tar = tmp_path / "cap.tar"
    code, _out, err = run("capture-sysroot", "--sysroot", root, tar)
    assert code == 0, err
    out = tmp_path / "x"
    with tarfile.open(tar) as t:
        names = t.getnames()
        t.extractall(out)
    assert "HANDOVER-CAPTURE.json" in names
    assert "sys/kernel/debug/iommu/intel/ir_translation_struct" in names
    assert not any(n.startswith("sys/bus/nd") for n in names)   # only what the sources read
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    save(root, a)
    save(out, b)
    changes = [c for c in diff_states(src.load(str(a)).state, src.load(str(b)).state)
               if not (c["section"] == "meta" and c["key"] in ("sysroot", "created"))]
    assert changes == [], changes
    code, _out, err = run("capture-sysroot", "--sysroot", root, tar)
    assert code == 1 and "exists" in err


def test_region_commit_and_load(tmp_path):
    from handover import pmem

    root = copy_host(tmp_path / "host")
    region = tmp_path / "region.img"
    pmem.init(str(region), size=1 << 20)
    code, out, err = run("save", "--sysroot", root, "--region", region, "--json")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["commit"]["generation"] == 1
    code, out, err = run("save", "--sysroot", root, "--region", region, "--json")
    assert json.loads(out)["commit"]["generation"] == 2
    assert src.load(str(region)).state.generation == 2
    code, doc, _ = load(root, region, tmp_path)
    assert code == 0 and doc["generation"] == 2


def _kernel_files(k, **files):
    for name, text in files.items():
        p = k / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")


@pytest.mark.parametrize("abi", ["one-value", "status-file"])
def test_kernel_interface_is_fed(saved, tmp_path, abi):
    """/sys/kernel/handover/ as the series lays it out: one value per file (0002) with a
    directory per keepalive device (0006/0007); the first series' multi-line status file
    is still read."""
    root, blob, _ = saved
    k = root / "sys/kernel/handover"
    k.mkdir(parents=True)
    if abi == "one-value":
        _kernel_files(k, state="valid", region="0x4000000@0x30000000", reason="", error="",
                      generation="1", format="1.1", reserved_ranges="3")
    else:
        (k / "status").write_text("state: valid\nregion: 0x4000000@0x30000000\ngeneration: 1\n"
                                  "blob: 4096@0x30200000\ncopy: 0x3ff00000\nformat: 1.1\n")
    (k / "formats").write_text("1.0-1.1\n")
    (k / "decision").write_text("pending\n")
    code, doc, _ = load(root, blob, tmp_path, "--check-only")
    assert code == 0 and doc["kernel_interface"]["action"].startswith("none")
    assert doc["kernel_interface"]["state"] == "valid"
    assert "reason" not in doc["kernel_interface"]["status"]   # empty file: nothing to say
    assert (k / "decision").read_text() == "pending\n"
    code, doc, _ = load(root, blob, tmp_path)
    assert code == 0 and (k / "decision").read_text() == "accept\n"
    # the kernel's keepalive devices in the human report
    if abi == "one-value":
        _kernel_files(k / "devices/0000:00:03.0", state="held", domain="4", reason="")
        _kernel_files(k / "devices/0000:00:04.0", state="released", domain="",
                      reason="its identity differs from the saved one")
    else:
        with open(k / "status", "a") as f:
            f.write("device: 0000:00:03.0 held adopted domain=4\n"
                    "device: 0000:00:04.0 released (its identity differs from the saved one)\n")
    code, out, err = run("load", "--sysroot", root, "--region", blob, "--result-dir", tmp_path / "r")
    assert code == 0, err
    assert "kernel keepalive 0000:00:03.0: held, translation adopted (domain 4)" in out
    assert "0000:00:04.0" in out and "its identity differs from the saved one" in out
    assert out.splitlines()[-1].startswith("MATCH: ")  # the boot script logs the last line
    set_resource(root, EDU, 0, 0xFE800000, 0xFE8FFFFF, 0x40200)
    code, doc, _ = load(root, blob, tmp_path)
    assert code == 6 and (k / "decision").read_text() == "abort\n"
    assert "device 0000:00:03.0 BAR0" in doc["kernel_interface"].get("reason", "") or any(
        "BAR0" in f for f in doc["failures"])


def test_patched_sysfs_registers_are_read(saved, tmp_path):
    """With kernel-patches 0003 the unit registers come from sysfs (feature detected)."""
    root, blob, _ = saved
    d = root / "sys/devices/virtual/iommu/dmar0/intel-iommu"
    if not d.exists():
        d = next((root / "sys/class/iommu").glob("dmar0")).resolve() / "intel-iommu"
    (d / "gsts").write_text("c7000000\n")
    (d / "irta").write_text("3fd0000f\n")
    (d / "rtaddr").write_text("3fc00000\n")
    blob2 = tmp_path / "with-regs.bin"
    rep = save(root, blob2)
    assert rep
    code, doc, _ = load(root, blob2, tmp_path, "--check-only")
    irta = [v for v in doc["verdicts"] if v["check"] == "IRTA"]
    assert code == 0 and irta and irta[0]["status"] == "match", irta
    (d / "irta").write_text("3fe0000f\n")  # the new kernel put its IR table elsewhere
    code, doc, _ = load(root, blob2, tmp_path, "--check-only")
    irta = [v for v in doc["verdicts"] if v["check"] == "IRTA"]
    assert code == 6 and irta[0]["status"] == "mismatch"


def test_save_format_version_and_target_kernel(tmp_path):
    """--format-version writes an older minor; --target-kernel follows the image's ELF note."""
    import struct as _s

    from handover.formats.codec import decode
    from tests.elfwriter import elf, note

    root = copy_host(tmp_path / "host")
    old = tmp_path / "old.bin"
    save(root, old, "--format-version", "1.0")
    assert decode(old.read_bytes()).version == (1, 0)
    img = tmp_path / "vmlinux"
    img.write_bytes(elf([("note", note("Handover", 1, _s.pack("<I", 1 << 16 | 0)), 0)], e_type=2))
    out = tmp_path / "t.bin"
    save(root, out, "--target-kernel", img)
    assert decode(out.read_bytes()).version == (1, 0)
    img.write_bytes(elf([("note", note("Handover", 1, _s.pack("<I", 2 << 16 | 0)), 0)], e_type=2))
    code, _, err = run("save", "--sysroot", root, "--output", tmp_path / "x.bin", "--target-kernel", img)
    assert code == 5 and "reads handover format 2.0-2.0" in err and not (tmp_path / "x.bin").exists()


def test_save_holds_the_region_lock(tmp_path):
    """A save into a region that another save holds fails at once (no --wait), and the
    region keeps its state; with the lock free the generation in the blob is the region's."""
    from handover import pmem
    from handover.formats.codec import decode

    root = copy_host(tmp_path / "host")
    reg = tmp_path / "region"
    code, _, err = run("region", "init", reg, "--size", "8M")
    assert code == 0, err
    rep = save(root, tmp_path / "a.bin", "--region", reg)
    assert rep["commit"]["generation"] == 1
    with pmem.open_region(str(reg), write=True):
        code, out, err = run("save", "--sysroot", root, "--region", reg, "--json")
        assert code != 0 and "lock" in err.lower()
    rep = save(root, tmp_path / "b.bin", "--region", reg)
    got = pmem.read_latest(str(reg))
    assert got.generation == 2 == rep["commit"]["generation"] == decode(got.blob).generation
