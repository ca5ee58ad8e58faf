"""What the kernel cannot keep yet is refused before the kexec (``arm``) and explained by
``doctor``: a device behind a PCIe-to-PCI bridge (DMA aliases), a scalable-mode unit, an
SR-IOV VF or a PF with VF Enable on; unless the running kernel declares the feature in
/sys/kernel/handover/features. Trees: tests/unit/hosttree.py behind_pci_bridge (derived by
hand from a capture, see its DERIVED.md) and the debugfs capture with RTADDR edited."""

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from handover.cli import main
from handover.host.base import Caps, Host, PciDev, SriovCap, Sysroot, Unit
from handover.ops.keepable import refusals
from tests.elfwriter import elf, note

from hosttree import EDU, EDU_BEHIND, PCI_BRIDGE, behind_pci_bridge

CAPTURED = Path(__file__).resolve().parent.parent / "fixtures" / "captured"


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def kernel_image(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(elf([("note", note("Linux", 256, b"6.12")
                        + note("Handover", 1, struct.pack("<I", 1 << 16 | 1)), 0)], e_type=2))
    return p


def patched(root: Path, features: str | None = None) -> Path:
    """What a running patched kernel adds: /sys/kernel/handover with keepalive (and the
    features file when given)."""
    h = root / "sys/kernel/handover"
    h.mkdir(parents=True, exist_ok=True)
    (h / "formats").write_text("1.0-1.1\n")
    (h / "keepalive").write_text("")
    if features is not None:
        (h / "features").write_text(features + "\n")
    return root


@pytest.fixture
def bridged(tmp_path):
    return behind_pci_bridge(tmp_path / "host")


@pytest.fixture
def region(tmp_path):
    r = tmp_path / "region.img"
    assert run("region", "init", r, "--size", "4M")[0] == 0
    return r


def arm(root, region, tmp_path):
    return run("arm", "--kernel", kernel_image(tmp_path), "--region", region, "--sysroot", root,
               "--dry-run", "--json", "--result-dir", tmp_path / "run",
               "--command-line", "console=ttyS0")


def test_the_derived_tree_reads_as_a_device_behind_a_pcie_to_pci_bridge(bridged):
    from handover.host import read_host
    from handover.host.pci import dma_alias_bridges

    host = read_host(Sysroot(str(bridged)))
    dev = host.devices[EDU_BEHIND]
    assert EDU not in host.devices and dev.driver == "vfio-pci" and dev.iommu_group == 2
    assert dev.upstream == [PCI_BRIDGE] and dev.iommu == "dmar0"
    assert [v.irte_index for v in dev.vectors] == [26]           # its MSI, renamed chip
    assert dma_alias_bridges(host, dev) == [(PCI_BRIDGE, "PCIe-to-PCI bridge")]
    assert "NOT captured" in (bridged / "DERIVED.md").read_text()


def test_doctor_names_the_bridge_and_the_alias(bridged):
    code, out, _ = run("doctor", "--sysroot", bridged, "--json")
    c = {x["check"]: x for x in json.loads(out)["checks"]}[f"device.{EDU_BEHIND}"]
    assert c["status"] == "warn"          # a stock running kernel keeps nothing anyway
    assert c["facts"]["dma_alias_via"] == [PCI_BRIDGE]
    assert c["facts"]["bridge_path"] == [{"bdf": PCI_BRIDGE, "kind": "PCIe-to-PCI bridge",
                                          "bus_master": True}]
    assert c["facts"]["vectors"] == {"MSI": 1}
    assert "DMA aliases" in c["text"] and f"behind {PCI_BRIDGE} (PCIe-to-PCI bridge)" in c["text"]
    assert f"bridges: {PCI_BRIDGE} (PCIe-to-PCI bridge, bus master on)" in c["text"]


def test_doctor_fails_it_on_a_kernel_that_keeps_devices(bridged):
    code, out, _ = run("doctor", "--sysroot", patched(bridged), "--json")
    doc = json.loads(out)
    c = {x["check"]: x for x in doc["checks"]}[f"device.{EDU_BEHIND}"]
    assert code == 1 and c["status"] == "fail" and "arm refuses it before the kexec" in c["text"]
    assert EDU_BEHIND not in doc["kept"]


def test_arm_refuses_a_device_with_dma_aliases_before_anything(bridged, region, tmp_path):
    code, out, err = arm(patched(bridged), region, tmp_path)
    assert code == 1 and "Traceback" not in err
    msg = err.strip().splitlines()[-1] if not out else json.loads(out)["error"]
    assert f"{EDU_BEHIND}: it has DMA aliases: behind {PCI_BRIDGE} (PCIe-to-PCI bridge)" in msg
    assert "refused before the kexec" in msg
    assert not (tmp_path / "run").exists()


def test_arm_keeps_it_when_the_kernel_declares_dma_alias(bridged, region, tmp_path):
    code, out, err = arm(patched(bridged, "dma-alias"), region, tmp_path)
    assert code == 0, err
    assert json.loads(out)["save"]["devices"] == [EDU_BEHIND]


def test_arm_on_a_stock_kernel_does_not_refuse(bridged, region, tmp_path):
    code, _out, err = arm(bridged, region, tmp_path)    # no keepalive: nothing is kept
    assert code == 0, err


@pytest.fixture
def scalable(tmp_path):
    """The debugfs capture with dmar0's RTADDR edited to scalable mode (TTM 01)."""
    root = tmp_path / "host"
    shutil.copytree(CAPTURED / "handover-6.12-debugfs", root, symlinks=True,
                    ignore=shutil.ignore_patterns("_capture"))
    (root / "sys/devices/virtual/iommu/dmar0/intel-iommu/rtaddr").write_text("196e400\n")
    p = root / "sys/kernel/debug/iommu/intel/iommu_regset"
    p.write_text(re.sub(r"^(RTADDR\s+0x20\s+)0x[0-9a-f]+$", r"\g<1>0x000000000196e400",
                        p.read_text(), flags=re.M))
    return root


def test_scalable_unit_refused_unless_declared(scalable, region, tmp_path):
    code, out, err = arm(patched(scalable), region, tmp_path)
    assert code == 1
    assert "its unit dmar0 is in scalable mode" in err + out
    assert "'scalable' in /sys/kernel/handover/features" in err + out
    code, out, _ = run("doctor", "--sysroot", scalable, "--json")
    u = {x["check"]: x for x in json.loads(out)["checks"]}["iommu.dmar0"]
    assert u["status"] == "warn" and u["facts"]["mode"] == "scalable"
    assert not u["facts"]["mode_kept"] and "scalable mode is not kept yet" in u["text"]
    (scalable / "sys/kernel/handover/features").write_text("scalable\n")
    code, out, err = arm(scalable, region, tmp_path)
    assert code == 0, err


def _sriov_host(vf_enable: bool):
    host = Host(sysroot=Sysroot("/nonexistent"))
    host.units["dmar0"] = Unit(name="dmar0", seq=0, devices=[], )
    host.units["dmar0"].regs.rtaddr = 0x1000
    pf = PciDev(bdf="0000:01:00.0", sbdf=0x100, iommu="dmar0", driver="vfio-pci",
                caps=Caps(sriov=SriovCap(0x160, 0x19 if vf_enable else 0x18, 8, 2, 0x80, 2,
                                         0x1520, [0] * 6)),
                virtfns=["0000:01:10.0"])
    vf = PciDev(bdf="0000:01:10.0", sbdf=0x180, iommu="dmar0", driver="vfio-pci",
                physfn="0000:01:00.0")
    host.devices = {pf.bdf: pf, vf.bdf: vf}
    return host, pf, vf


def test_sriov_vf_and_enabled_pf_are_not_kept_yet():
    host, pf, vf = _sriov_host(vf_enable=True)
    assert any("SR-IOV VF of 0000:01:00.0: not kept yet" in r for r in refusals(host, vf, frozenset()))
    assert any("SR-IOV PF with VF Enable on (2 of 8 VFs)" in r
               for r in refusals(host, pf, frozenset()))
    assert refusals(host, pf, frozenset({"sriov"})) == []
    assert refusals(host, vf, frozenset({"sriov"})) == []
    host, pf, _vf = _sriov_host(vf_enable=False)
    assert refusals(host, pf, frozenset()) == []       # VFs off: the PF alone is kept


def test_doctor_topology_of_a_pf():
    from handover.ops.doctor import _devices

    host, pf, vf = _sriov_host(vf_enable=True)
    pf.iommu_group, vf.iommu_group = 5, 6
    checks, kept, _ = _devices(host, (), frozenset(), keeps=True)
    c = {x.check: x for x in checks}
    assert c[f"device.{pf.bdf}"].status == "fail" and kept == []
    assert c[f"device.{pf.bdf}"].facts["sriov"] == {"role": "PF", "num_vfs": 2, "total_vfs": 8,
                                                    "vf_enable": True}
    assert "SR-IOV PF, 2 of 8 VFs, VF Enable on" in c[f"device.{pf.bdf}"].text
    assert c[f"device.{vf.bdf}"].facts["sriov"] == {"role": "VF", "physfn": pf.bdf}
