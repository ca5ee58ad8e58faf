"""Region kinds: device-dax access path (mmap + libpmem), discovery from a fake sysfs, CLI."""

import json
import os

import pytest
from click.testing import CliRunner

import handover.pmem as pmem
from handover.util import parse_size
from handover.cli.region import region as region_cli
from handover.pmem import discover as D
from handover.pmem import kinds as K
from handover.pmem import protocol as P

MB = 1 << 20


def _devdax_like(path, size, flush):
    """A region over a file, accessed the way device-dax is (whole mapping, no read/write)."""
    fd = os.open(path, os.O_RDWR)
    acc = K.MmapAccess(str(path), fd, size, "devdax", 2 * MB, flush, True)
    return P.Region(str(path), acc, fd, os.fstat(fd))


@pytest.mark.parametrize("flush", ["pmem", "none", "msync"])
def test_devdax_access_path(tmp_path, flush):
    if flush == "pmem" and not K.libpmem().available:
        pytest.skip(f"libpmem not available: {K.libpmem().error}")
    p = tmp_path / "dax"
    with open(p, "wb") as f:
        f.truncate(16 * MB)
    r = _devdax_like(p, 16 * MB, flush)
    try:
        h = r.init(force=True)
        # slots are aligned to the device alignment (2 MiB)
        assert h.slot_align == 2 * MB and all(s.offset % (2 * MB) == 0 for s in h.slots)
        blobs = [os.urandom(3 * MB + 17), os.urandom(1 * MB)]
        for b in blobs:
            r.commit(b)
        got = r.read_latest()
        assert got.blob == blobs[1] and got.generation == 2
        if flush == "none":
            assert "NOT a power cut" in r.acc.durability
        if flush == "pmem":
            assert "pmem_persist" in r.acc.durability
    finally:
        r.close()
    # what reached the mapping is in the file (shared mapping)
    assert pmem.read_latest(p).blob == blobs[1]


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def _fake_host(root):
    sysfs, proc, dev = f"{root}/sys", f"{root}/proc", f"{root}/dev"
    os.makedirs(proc)
    with open(f"{proc}/iomem", "w") as f:
        f.write("00000000-00000fff : Reserved\n"
                "00100000-2fffffff : System RAM\n"
                "30000000-33ffffff : Persistent Memory (legacy)\n"
                "  30000000-33ffffff : namespace0.0\n"
                "140000000-14fffffff : Persistent Memory\n"
                "  140000000-14fffffff : namespace1.0\n"
                "200000000-2000fffff : Persistent Memory (legacy)\n")
    # legacy range as raw /dev/pmem0
    ns0 = f"{sysfs}/devices/platform/e820_pmem/ndbus0/region0/namespace0.0"
    _write(f"{ns0}/mode", "raw")
    _write(f"{ns0}/resource", "0x30000000")
    _write(f"{ns0}/size", str(64 * MB))
    os.makedirs(f"{sysfs}/class/block/pmem0")
    os.symlink(os.path.relpath(ns0, f"{sysfs}/class/block/pmem0"), f"{sysfs}/class/block/pmem0/device")
    _write(f"{sysfs}/class/block/pmem0/size", str(64 * MB // 512))
    # NVDIMM namespace in devdax mode
    reg1 = f"{sysfs}/devices/LNXSYSTM:00/ndbus1/region1"
    _write(f"{reg1}/namespace1.0/mode", "devdax")
    _write(f"{reg1}/namespace1.0/resource", "0x140000000")
    _write(f"{reg1}/namespace1.0/size", str(256 * MB))
    _write(f"{reg1}/dax1.1/namespace", "namespace1.0")
    d = f"{reg1}/dax1.1/dax1.0"
    _write(f"{d}/resource", "0x140400000")
    _write(f"{d}/size", str(252 * MB))
    _write(f"{d}/align", str(2 * MB))
    os.makedirs(f"{sysfs}/bus/dax/devices")
    os.symlink(os.path.relpath(d, f"{sysfs}/bus/dax/devices"), f"{sysfs}/bus/dax/devices/dax1.0")
    os.makedirs(dev)
    return dict(sysfs=sysfs, proc=proc, dev=dev)


def test_discover_fake_host(tmp_path):
    roots = _fake_host(str(tmp_path))
    # the legacy pmem0 "device" is a region file here, holding state
    pmem.init(f"{roots['dev']}/pmem0", size=4 * MB)
    pmem.commit(f"{roots['dev']}/pmem0", b"state")
    ents = {e["device"] or f"iomem@{e['phys_start']:#x}": e for e in D.discover(**roots)}
    p0 = ents[f"{roots['dev']}/pmem0"]
    assert p0["kind"] == "pmem-block" and p0["mode"] == "raw" and p0["phys_start"] == 0x30000000
    assert p0["size"] == 64 * MB and p0["legacy"] and p0["next_cmdline"] == "memmap=64M!0x30000000"
    assert p0["handover"] == "state" and p0["generation"] == 1
    assert p0["handover_param"] == "handover=0x4000000@0x30000000"
    dx = ents[f"{roots['dev']}/dax1.0"]
    assert dx["kind"] == "devdax" and dx["phys_start"] == 0x140400000 and dx["align"] == 2 * MB
    assert dx["data_offset"] == 0x400000 and dx["namespace"] == "namespace1.0"
    assert not dx["legacy"] and dx["next_cmdline"] is None
    assert dx["handover"] == "unreadable"
    orphan = ents["iomem@0x200000000"]
    assert orphan["device"] is None and orphan["legacy"] and "nd_e820" in orphan["note"]
    assert orphan["next_cmdline"] == "memmap=1M!0x200000000"
    assert len(ents) == 3


def test_iomem_parse_and_memmap():
    r = D.parse_iomem("30000000-33ffffff : Persistent Memory (legacy)\n"
                      "100000000-13fffffff : Persistent Memory\n")
    assert [(x["start"], x["size"], x["legacy"]) for x in r] == [
        (0x30000000, 64 * MB, True), (0x100000000, 1 << 30, False)]
    assert D.memmap_option(0x30000000, 64 * MB) == "memmap=64M!0x30000000"
    assert D.memmap_option(0x30000000, 3 << 30) == "memmap=3G!0x30000000"


def test_parse_size():
    assert parse_size("64M") == 64 * MB and parse_size("4096") == 4096
    assert parse_size("1G") == 1 << 30 and parse_size("0x1000") == 4096
    assert parse_size("2MiB") == 2 * MB


def test_cli_init_status_wipe_list(tmp_path):
    p = str(tmp_path / "r")
    run = CliRunner().invoke
    res = run(region_cli, ["init", p, "--size", "8M"])
    assert res.exit_code == 0, res.output
    res = run(region_cli, ["init", p, "--size", "8M"])
    assert res.exit_code == 1 and "already" in res.stderr and res.stdout == ""
    res = run(region_cli, ["status", p])
    assert res.exit_code == 3 and "no committed state" in res.stdout
    pmem.commit(p, b"hello" * 1000)
    res = run(region_cli, ["status", p, "--json"])
    st = json.loads(res.stdout)
    assert res.exit_code == 0 and st["schema"] == "handover.region-status/2"
    assert st["state"]["generation"] == 1 and st["state"]["length"] == 5000
    # addresses as hex strings (a file region has no physical address)
    assert st["state"]["offset"].startswith("0x") and st["state"]["crc"].startswith("0x")
    assert st["phys_start"] is None and all(h["offset"].startswith("0x") for h in st["headers"])
    res = run(region_cli, ["wipe", p], input="")
    assert res.exit_code == 2 and "--yes" in res.stderr
    res = run(region_cli, ["wipe", p, "--yes"])
    assert res.exit_code == 0
    assert run(region_cli, ["status", p]).exit_code == 3
    res = run(region_cli, ["list", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["schema"] == "handover.region-list/2"
    res = run(region_cli, ["init", str(tmp_path / "x"), "--size", "lots"])
    assert res.exit_code == 2
