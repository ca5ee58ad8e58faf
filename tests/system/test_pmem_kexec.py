"""System test (ISSUE 3): a region survives kexec on real kernels, read back in the second one.

1. legacy ``memmap=64M!0x30000000`` -> /dev/pmem0 (raw); the kexec'd kernel gets the same
   ``memmap=`` (the lab repeats it on every phase's command line).
2. a QEMU NVDIMM turned into device-dax with ndctl (``/dev/dax0.0``, 2 MiB align, mmap-only
   access); the bytes of the committed slot are also checked from the host in the NVDIMM's
   backing file, at (dax phys start - NVDIMM region phys start) + slot offset.

Each phase commits a random 4 MiB state (two commits, so both slots and a generation > 1 are
exercised), records its sha256, and the second kernel must read exactly that state back.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.system import lab

pytestmark = pytest.mark.system

SAVE = r"""
set -eu
DEV={dev}
{prepare}
ls -l "$DEV"
python3 -m handover region init "$DEV" --force
python3 - "$DEV" <<'EOF'
import hashlib, json, os, sys
import handover.pmem as pmem
dev = sys.argv[1]
out = os.environ["LAB_OUT"]
for i in range(2):
    blob = os.urandom(4 << 20)
    res = pmem.commit(dev, blob, force=True)
with open(f"{{out}}/saved.json", "w") as f:
    json.dump({{"sha256": hashlib.sha256(blob).hexdigest(), "generation": res.generation,
               "slot": res.slot, "slot_offset": res.slot_offset, "length": res.length,
               "phys_blob": res.phys_blob, "kind": res.kind, "durability": res.durability}}, f)
EOF
python3 -m handover region status "$DEV" --json > "$LAB_OUT/status1.json"
python3 -m handover region list --json > "$LAB_OUT/list1.json"
cat /sys/bus/nd/devices/region*/resource > "$LAB_OUT/nd_region_resource.txt" || true
cat /proc/iomem | grep -i persist > "$LAB_OUT/iomem1.txt" || true
"""

LOAD = r"""
set -eu
DEV={dev}
ls -l "$DEV"
cat /proc/cmdline
rc=0
python3 -m handover region status "$DEV" --json > "$LAB_OUT/status2.json" || rc=$?
echo "$rc" > "$LAB_OUT/status2.rc"
python3 - "$DEV" <<'EOF'
import hashlib, json, os, sys
import handover.pmem as pmem
r = pmem.read_latest(sys.argv[1])
with open(os.environ["LAB_OUT"] + "/loaded.json", "w") as f:
    json.dump({{"sha256": hashlib.sha256(r.blob).hexdigest(), "generation": r.generation,
               "slot": r.slot, "fallback": r.fallback, "phys_blob": r.phys_blob}}, f)
EOF
"""

NDCTL_DEVDAX = "ndctl create-namespace -f -e namespace0.0 -m devdax -a 2M > \"$LAB_OUT/ndctl.json\""



def _int(v):
    """JSON writes addresses as "0x..." strings (older output: numbers)."""
    return int(v, 0) if isinstance(v, str) else v

def _run(dev, prepare, **kw):
    try:
        res = lab.run_guest([SAVE.format(dev=dev, prepare=prepare), LOAD.format(dev=dev)],
                            timeout=420, **kw)
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    res.check()
    p1, p2 = res.phases[0].files, res.phases[1].files
    return res, json.loads(p1["saved.json"]), json.loads(p2["loaded.json"]), p1, p2


def test_legacy_memmap_region_survives_kexec():
    res, saved, loaded, p1, p2 = _run("/dev/pmem0", "", pmem="legacy")
    assert saved["kind"] == "pmem-block" and saved["generation"] == 2
    assert loaded["sha256"] == saved["sha256"] and loaded["generation"] == 2
    assert not loaded["fallback"]
    # the kexec'd kernel had the same memmap= (else the range would be RAM, not /dev/pmem0)
    assert "memmap=64M!0x30000000" in res.phases[1].cmdline
    st1 = json.loads(p1["status1.json"])
    assert _int(st1["phys_start"]) == 0x30000000
    assert saved["phys_blob"] == 0x30000000 + saved["slot_offset"]
    lst = json.loads(p1["list1.json"])["regions"]
    pm = [e for e in lst if e["device"] == "/dev/pmem0"][0]
    assert pm["legacy"] and pm["next_cmdline"] == "memmap=64M!0x30000000"
    assert pm["handover"] == "state" and pm["generation"] == 2
    assert int(p2["status2.rc"]) == 0


def test_nvdimm_devdax_region_survives_kexec(tmp_path):
    nv = tmp_path / "nvdimm.img"
    res, saved, loaded, p1, p2 = _run("/dev/dax0.0", NDCTL_DEVDAX, pmem="nvdimm",
                                      nvdimm_file=nv, nvdimm_size=256 << 20)
    assert saved["kind"] == "devdax" and saved["slot_offset"] % (2 << 20) == 0
    assert loaded["sha256"] == saved["sha256"] and loaded["generation"] == 2
    assert not loaded["fallback"]
    st1 = json.loads(p1["status1.json"])
    dax_phys = _int(st1["phys_start"])
    region_phys = int(p1["nd_region_resource.txt"].split()[0], 0)
    file_off = dax_phys - region_phys
    data = nv.read_bytes()
    assert data[file_off:file_off + 8] == b"HOVRREGN"
    blob = data[file_off + saved["slot_offset"]:file_off + saved["slot_offset"] + saved["length"]]
    assert hashlib.sha256(blob).hexdigest() == saved["sha256"]
    # the region layer reads the host file too (the NVDIMM data starts at file_off)
    assert _int(st1["slots"][saved["slot"]]["phys"]) == _int(saved["phys_blob"])
