"""Every ``--json`` document names its schema and validates against the published JSON
Schema (handover/schemas, checked with the ``jsonschema`` library)."""

import json

import re
import struct
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from handover import schemas
from handover.cli import main
from handover.formats.codec import encode
from handover.synth import synth_state
from tests.elfwriter import elf, note

from hosttree import TOKEN, copy_host

VEC = Path(__file__).resolve().parents[1] / "vectors"
PKG = Path(schemas.__file__).resolve().parents[1]


def run(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, (args, r.exit_code, r.stderr)
    return json.loads(r.stdout)


def valid(doc: dict) -> dict:
    name = doc["schema"]
    jsonschema.Draft202012Validator(schemas.load(name)).validate(doc)
    return doc


def test_schema_files_are_valid_schemas_named_as_their_documents():
    for name in schemas.names():
        s = schemas.load(name)
        jsonschema.Draft202012Validator.check_schema(s)
        assert s["properties"]["schema"] == {"const": name}


def test_every_schema_a_command_emits_is_published():
    emitted = set()
    for p in PKG.rglob("*.py"):
        emitted |= set(re.findall(r'"(handover\.[a-z-]+/[0-9]+)"', p.read_text()))
    emitted -= {"handover.armed/2"}            # the marker file, not a --json document
    assert emitted <= set(schemas.names()), emitted - set(schemas.names())


@pytest.fixture
def host(tmp_path):
    return copy_host(tmp_path / "host")


def kernel(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(elf([("note", note("Linux", 256, b"6.12")
                        + note("Handover", 1, struct.pack("<I", 1 << 16 | 1)), 0)], e_type=2))
    return p


def test_forensic_documents(tmp_path):
    tiny, typical = VEC / "tiny-1.1.bin", VEC / "typical-1.1.bin"
    for blob in (tiny, typical, VEC / "tiny-1.0.bin"):
        doc = valid(run("inspect", "--json", blob))
        assert doc["source"]["path"] == str(blob)          # absolute
    valid(run("verify", "--json", tiny))
    valid(run("diff", "--json", tiny, typical, code=1))
    valid(run("convert", "--json", tiny, tmp_path / "o.bin", "--format-version", "1.0"))
    valid(run("check-kernel", "--json", kernel(tmp_path)))
    stock = tmp_path / "stock"
    stock.write_bytes(elf([("note", note("Linux", 256, b"6.12"), 0)], e_type=2))
    err = run("check-kernel", "--json", stock, code=5)
    valid(err)                                               # handover.error/1
    assert err["declares"] is None                           # with the declaration's keys
    jsonschema.validate({**err, "schema": "handover.check-kernel/1"},
                        schemas.load("handover.check-kernel/1"))


def test_host_documents(host, tmp_path):
    region = tmp_path / "region.img"
    valid(run("region", "init", region, "--size", "4M", "--json"))
    save = valid(run("save", "--sysroot", host, "--region", region, "--token", TOKEN, "--json"))
    assert save["commit"]["region"] == str(region)
    st = valid(run("region", "status", region, "--json"))
    assert st["state"]["crc"].startswith("0x")
    valid(run("region", "list", "--json"))
    res = tmp_path / "res"
    doc = valid(run("load", "--region", region, "--sysroot", host, "--result-dir", res, "--json"))
    valid(json.loads((res / "result.json").read_text()))
    assert doc["ok"]
    arm = valid(run("arm", "--kernel", kernel(tmp_path), "--initrd", "/boot/initrd.img",
                    "--region", region, "--token", TOKEN, "--pass-token", "--sysroot", host,
                    "--dry-run", "--json"))
    assert TOKEN not in json.dumps(arm)
    valid(run("doctor", "--sysroot", host, "--region", region, "--json", code=1))


def test_error_documents(tmp_path):
    doc = valid(run("inspect", "--json", tmp_path / "missing", code=3))
    assert doc["kind"] == "no-state" and doc["exit_code"] == 3
    bad = tmp_path / "bad"
    bad.write_bytes(encode(synth_state("tiny"))[:-1])
    assert valid(run("verify", "--json", bad, code=4))["kind"] == "integrity"



def test_kernel_interface_of_load(host, tmp_path):
    """``load --json`` on a patched kernel: kernel_interface comes from the typed records of
    handover.host (KernelInterface, KernelStatus, KeepaliveDevice) and is, key for key, the
    document the dicts of the reader used to make (captured before the change)."""
    region = tmp_path / "region.img"
    run("region", "init", region, "--size", "4M", "--json")
    run("save", "--sysroot", host, "--region", region, "--token", TOKEN, "--json")
    k = host / "sys/kernel/handover"
    files = {"state": "valid", "region": "0x4000000@0x30000000", "reason": "", "error": "",
             "generation": "1", "format": "1.1", "reserved_ranges": "3", "formats": "1.0-1.1",
             "decision": "pending", "devices/0000:00:03.0/state": "held",
             "devices/0000:00:03.0/domain": "4", "devices/0000:00:03.0/reason": "",
             "devices/0000:00:04.0/state": "released", "devices/0000:00:04.0/domain": "",
             "devices/0000:00:04.0/reason": "why not"}
    for rel, text in files.items():
        (k / rel).parent.mkdir(parents=True, exist_ok=True)
        (k / rel).write_text(text + "\n")
    doc = valid(run("load", "--region", region, "--sysroot", host, "--result-dir",
                    tmp_path / "res", "--json"))
    status = {"format": "1.1", "generation": "1", "region": "0x4000000@0x30000000",
              "reserved_ranges": "3", "state": "valid",
              "keepalive": [{"adopted": True, "bdf": "0000:00:03.0", "domain": 4,
                             "state": "held", "why": None},
                            {"adopted": False, "bdf": "0000:00:04.0", "domain": None,
                             "state": "released", "why": "why not"}]}
    assert doc["kernel_interface"] == {
        "action": "accept", "decision": "pending", "formats": "1.0-1.1", "generation": 1,
        "path": "/sys/kernel/handover", "present": True, "state": "valid", "status": status,
        "status_after": status, "written": "accept"}
