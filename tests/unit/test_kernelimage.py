"""check-kernel (ELF note in vmlinux / bzImage) and inspect --vmcore, on built ELF files."""

import gzip
import json
import lzma
import os
import struct
import subprocess
import sys

import jsonschema
import pytest
from click.testing import CliRunner

from handover import schemas
from handover.cli import main
from handover.formats.codec import encode
from handover.host.kernelimage import read_declaration
from handover.synth import synth_state
from tests.elfwriter import elf, note


def vmlinux(minor=1, major=1):
    return elf([("note", note("Linux", 256, b"6.12") + note("Handover", 1, struct.pack("<I", major << 16 | minor)), 0)],
               e_type=2)


def bzimage(payload: bytes, compress) -> bytes:
    setup = bytearray(0x400)
    setup[0x202:0x206] = b"HdrS"
    return bytes(setup) + b"junk" + compress(payload) + b"trailer"


def run(*args):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_note_in_vmlinux(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(vmlinux())
    d = read_declaration(str(p))
    assert (d.major, d.max_minor) == (1, 1)
    code, out, _ = run("check-kernel", "--json", str(p))
    assert code == 0 and json.loads(out)["write"] == "1.1"


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress])
def test_note_in_bzimage(tmp_path, compress):
    p = tmp_path / "bzImage"
    p.write_bytes(bzimage(vmlinux(minor=0), compress))
    code, out, _ = run("check-kernel", "--json", str(p))
    d = json.loads(out)
    assert code == 0 and d["declares"] == "1.0-1.0" and d["write"] == "1.0"


def test_no_note_and_wrong_major(tmp_path):
    p = tmp_path / "plain"
    p.write_bytes(elf([("note", note("Linux", 256, b"x"), 0)], e_type=2))
    code, _, err = run("check-kernel", str(p))
    assert code == 5 and "declares no handover format support" in err
    p.write_bytes(vmlinux(major=2, minor=0))
    code, _, err = run("check-kernel", str(p))
    assert code == 5 and "reads 2.0-2.0" in err
    p.write_bytes(b"garbage" * 100)
    code, _, err = run("check-kernel", str(p))
    assert code == 1 and "neither an ELF vmlinux nor a bzImage" in err


def test_inspect_vmcore(tmp_path):
    blob = encode(synth_state("tiny"))
    phys = 0x1234000
    ram = bytes(0x800) + blob + bytes(100)
    info = f"OSRELEASE=6.12.117\nHANDOVER_STATE={len(blob):x}@{phys:x}\n".encode()
    core = elf([("note", note("CORE", 1, bytes(16)) + note("VMCOREINFO", 0, info), 0),
                ("load", ram, phys - 0x800)])
    p = tmp_path / "vmcore"
    p.write_bytes(core)
    code, out, err = run("inspect", "--json", "--vmcore", str(p))
    assert code == 0, err
    d = json.loads(out)
    assert d["source"]["kind"] == "vmcore" and d["source"]["phys"] == hex(phys)
    assert d["counts"]["irtes"] == 6
    jsonschema.validate(d, schemas.load(d["schema"]))      # absolute path, hex offset
    assert d["source"]["file_offset"].startswith("0x")
    # the state is not in the dump
    core2 = elf([("note", note("VMCOREINFO", 0, info), 0), ("load", ram, 0x9000000)])
    p.write_bytes(core2)
    code, _, err = run("inspect", "--vmcore", str(p))
    assert code == 3 and "not in any PT_LOAD" in err
    # no line
    p.write_bytes(elf([("note", note("VMCOREINFO", 0, b"OSRELEASE=x\n"), 0)]))
    code, _, err = run("inspect", "--vmcore", str(p))
    assert code == 3 and "no HANDOVER_STATE line" in err
    # a FIFO never blocks the reader (a subprocess: a hang fails by its timeout)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = subprocess.run([sys.executable, "-m", "handover", "inspect", "--vmcore", str(fifo)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "FIFO" in r.stderr
