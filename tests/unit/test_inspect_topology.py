"""``handover inspect`` shows what a real host's configuration adds: a scalable-mode unit with
x2APIC (EIM) interrupt remapping, devices behind bridges (bus-master bit of each), MSI and
MSI-X vectors grouped by kind (IRTE index, posted or remapped), an SR-IOV PF and its VF, and
context entries in legacy and scalable (PASID entry) form; in the tree and in --json (which
validates against the published schema)."""

import json

import jsonschema
import pytest
from click.testing import CliRunner

from handover import schemas
from handover.cli import main
from handover.formats import enums as E
from handover.formats.codec import encode
from handover.formats.model import StateBuilder
from handover.formats.structs import make_sbdf

PF, VF, NVME, LEGACY = (make_sbdf(0, 1, 0, 0), make_sbdf(0, 1, 0, 2), make_sbdf(0, 3, 0, 0),
                        make_sbdf(0, 0, 3, 0))
ROOT_PORT, SWITCH_DOWN, PCI_BRIDGE = make_sbdf(0, 0, 0x1C, 0), make_sbdf(0, 2, 1, 0), \
    make_sbdf(0, 0, 0x1E, 0)


def topology_state():
    """Two units: dmar0 scalable + EIM (registers captured), dmar1 legacy, xAPIC, known only
    from its flags (no RTADDR/IRTA captured)."""
    b = StateBuilder()
    b.meta = {"tool": "handover", "hostname": "topology"}
    b.add("units", unit=0, flags=E.UNIT_F_TE | E.UNIT_F_IRE | E.UNIT_F_SM | E.UNIT_F_X2APIC,
          present=E.UNIT_PRESENT_BIT["rtaddr"] | E.UNIT_PRESENT_BIT["irta"],
          reg_base=0xFED90000, rtaddr=0x1_0000_0000 | 1 << 10, irta=0x1_0010_0000 | 1 << 11 | 0xF)
    b.add("units", unit=1, flags=E.UNIT_F_IRE | E.UNIT_F_SM, present=0, reg_base=0xFED91000)
    # PF with 2 of 8 VFs enabled, and one of its VFs; behind a root port
    b.add_device(sbdf=PF, vendor=0x8086, device=0x1521, flags=E.DEV_F_PF | E.DEV_F_SRIOV_EN
                 | E.DEV_F_KEEPALIVE, num_vfs=2, total_vfs=8, sriov_ctrl=0x19, unit=0,
                 config=b"\0" * 64)
    b.add_device(sbdf=VF, vendor=0x8086, device=0x1520, flags=E.DEV_F_VF | E.DEV_F_KEEPALIVE,
                 physfn=PF, unit=0, config=b"\0" * 64)
    # NVMe behind a switch: downstream port (bus master on), then the root port (off)
    b.add_device(sbdf=NVME, vendor=0x144D, device=0xA808, flags=E.DEV_F_KEEPALIVE, unit=0,
                 config=b"\0" * 64)
    b.add("bridges", sbdf=NVME, depth=1, command=0x0403, bridge=ROOT_PORT)
    b.add("bridges", sbdf=NVME, depth=0, command=0x0407, bridge=SWITCH_DOWN)
    for sbdf in (PF, VF):
        b.add("bridges", sbdf=sbdf, depth=0, command=0x0407, bridge=ROOT_PORT)
    b.add_device(sbdf=LEGACY, vendor=0x1234, device=0x11E8, flags=E.DEV_F_KEEPALIVE, unit=1,
                 config=b"\0" * 64)
    b.add("bridges", sbdf=LEGACY, depth=0, command=0x0007, bridge=PCI_BRIDGE)
    # NVMe: 3 MSI-X vectors, IRTE 10 remapped, 11 posted (IM in the IRTE), 12 not in the state
    known = E.VEC_F_IRTE_KNOWN | E.VEC_F_ENABLED | E.VEC_F_MSG_KNOWN | E.VEC_F_REMAPPED
    for i in range(3):
        b.add("vectors", sbdf=NVME, unit=0, kind=E.VEC_MSIX, flags=known, vector=i,
              irte_index=10 + i, irq=40 + i)
    b.add("irtes", unit=0, index=10, lo=1 | 0x30 << 16, hi=NVME & 0xFFFF | 1 << 18)
    b.add("irtes", unit=0, index=11, lo=1 | 1 << 15 | 0x31 << 16, hi=NVME & 0xFFFF | 1 << 18)
    # the PF: one MSI vector in compatibility format (not remapped)
    b.add("vectors", sbdf=PF, unit=0, kind=E.VEC_MSI, flags=E.VEC_F_ENABLED | E.VEC_F_MSG_KNOWN,
          vector=0, irq=50)
    # scalable context entry of the NVMe (PASID 0: second-level, DID 5) and a legacy one
    b.add("contexts", sbdf=NVME, pasid=0, unit=0, did=5, flags=E.CTX_F_SM | E.CTX_F_PASID,
          root_lo=0x1_0000_1001, lo=0x1_0000_2001 | 2 << 9, hi=0,
          pasid_val0=0x2_0000_0000 | 1 | 2 << 2 | 2 << 6, pasid_val1=5, pasid_val2=0)
    b.add("contexts", sbdf=LEGACY, pasid=0, unit=1, did=2, flags=0, root_lo=0x1_0000_3001,
          lo=0x2_0000_1000 | 1, hi=2 << 8 | 2)
    return b.build()


@pytest.fixture
def blob(tmp_path):
    p = tmp_path / "topology.bin"
    p.write_bytes(encode(topology_state()))
    return p


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr
    return r.stdout


def test_tree_shows_modes_bridges_vectors_sriov_and_contexts(blob):
    out = run("inspect", blob)
    assert "modes: translation scalable (RTADDR), interrupt remapping x2APIC (EIM) (IRTA)" in out
    assert "modes: translation scalable (flags), interrupt remapping unknown (not recorded)" in out
    assert ("bridges (nearest first): 0000:02:01.0 (COMMAND 0x0407, bus master on) > "
            "0000:00:1c.0 (COMMAND 0x0403, bus master OFF)") in out
    assert "bridges: none (root bus)" not in out
    assert "SR-IOV PF: 2 of 8 VFs, VF Enable on" in out
    assert "SR-IOV VF of PF 0000:01:00.0" in out
    lines = out.splitlines()
    i = lines.index("    MSI-X (3)")
    assert lines[i + 1:i + 4] == ["      [0] -> dmar0 IRTE 10  remapped  irq 40",
                                  "      [1] -> dmar0 IRTE 11  posted  irq 41",
                                  "      [2] -> dmar0 IRTE 12  remapped  irq 42"]
    assert "      [0] -> IRTE unknown  compatibility  irq 50" in lines
    assert any("scalable: PASID directory 0x100002000 (512 entries)" in ln
               and "PASID 0: PGTT second-level, DID 5, SSPTPTR 0x200000000" in ln for ln in lines)
    assert any("legacy: multi-level, 48-bit, DID 2, SLPTPTR 0x200001000" in ln for ln in lines)


def test_json_carries_the_same_and_validates(blob):
    doc = json.loads(run("inspect", "--json", blob))
    jsonschema.Draft202012Validator(schemas.load(doc["schema"])).validate(doc)
    u0, u1 = doc["units"]
    assert (u0["translation_mode"], u0["translation_mode_from"]) == ("scalable", "RTADDR")
    assert (u0["ir_mode"], u0["ir_mode_from"]) == ("x2APIC (EIM)", "IRTA")
    assert u0["rtaddr_decoded"]["mode"] == "scalable" and u0["irta_decoded"]["eime"]
    assert (u1["translation_mode"], u1["ir_mode"]) == ("scalable", None)
    devs = {d["device"]: d for d in doc["devices"]}
    nvme = devs["0000:03:00.0"]
    assert [(b["bridge"], b["bus_master"]) for b in nvme["bridge_path"]] == [
        ("0000:02:01.0", True), ("0000:00:1c.0", False)]
    assert devs["0000:00:03.0"]["bridge_path"][0]["bridge"] == "0000:00:1e.0"
    assert devs["0000:01:00.0"]["sriov"]["role"] == "PF"
    assert devs["0000:01:00.0"]["sriov"]["vf_enable"] is True
    assert devs["0000:01:00.0"]["sriov"]["num_vfs"] == 2
    assert devs["0000:01:00.2"]["sriov"] == {**devs["0000:01:00.2"]["sriov"], "role": "VF",
                                             "physfn": "0000:01:00.0"}
    assert "sriov" not in nvme
    deliv = {(v["device"], v["kind"], v["vector"]): v["delivery"] for v in doc["vectors"]}
    assert deliv == {("0000:03:00.0", "MSI-X", 0): "remapped",
                     ("0000:03:00.0", "MSI-X", 1): "posted",
                     ("0000:03:00.0", "MSI-X", 2): "remapped",
                     ("0000:01:00.0", "MSI", 0): "compatibility"}
    assert all("bus_master" in b for b in doc["bridges"])
    ctx = {c["device"]: c for c in doc["contexts"]}
    assert ctx["0000:03:00.0"]["pasid_decoded"]["pgtt"] == "second-level"
    assert ctx["0000:03:00.0"]["pasid_decoded"]["did"] == 5


def test_schema_rejects_a_wrong_delivery_and_mode(blob):
    doc = json.loads(run("inspect", "--json", blob))
    v = jsonschema.Draft202012Validator(schemas.load(doc["schema"]))
    bad = json.loads(json.dumps(doc))
    bad["vectors"][0]["delivery"] = "teleported"
    assert not v.is_valid(bad)
    bad = json.loads(json.dumps(doc))
    bad["units"][0]["ir_mode"] = "x3APIC"
    assert not v.is_valid(bad)


def test_save_flags_a_vector_whose_irte_is_posted(tmp_path):
    """build_state sets VECTOR POSTED from the IRTE's IM bit (the format had the flag, no
    writer set it), so that a state without its IRTEs still says posted."""
    from handover.host.base import Host, PciDev, Sysroot, Unit, Vector
    from handover.ops.build import SaveOptions, build_state

    (tmp_path / "sys").mkdir()
    host = Host(sysroot=Sysroot(str(tmp_path)))
    u = Unit(name="dmar0", seq=0, reg_base=0xFED90000)
    u.irtes = {7: (1 | 1 << 15 | 0x31 << 16, 0x18), 8: (1 | 0x32 << 16, 0x18)}
    host.units["dmar0"] = u
    dev = PciDev(bdf="0000:00:03.0", sbdf=0x18, iommu="dmar0", driver="vfio-pci",
                 vectors=[Vector(E.VEC_MSIX, 0, 40, 0, remapped=True, irte_index=7),
                          Vector(E.VEC_MSIX, 1, 41, 0, remapped=True, irte_index=8)])
    host.devices[dev.bdf] = dev
    st, _ = build_state(host, [dev], SaveOptions())
    flags = {v.vector: v.flags for v in st.vectors}
    assert flags[0] & E.VEC_F_POSTED and not flags[1] & E.VEC_F_POSTED
