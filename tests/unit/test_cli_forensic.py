"""The forensic commands through the real entry point (subprocess) and CliRunner."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from handover.cli import main
from handover.formats.codec import decode, encode
from handover.synth import synth_state

VEC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "vectors")
TINY = os.path.join(VEC, "tiny-1.1.bin")
TYPICAL = os.path.join(VEC, "typical-1.1.bin")


def run(*args):
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def test_version_reports_formats_and_crc():
    code, out, _ = run("--version")
    assert code == 0
    assert "reads 1.x" in out and "writes 1.0, 1.1" in out and "crc32c:" in out


def test_verify_ok_and_json():
    code, out, _ = run("verify", TINY)
    assert code == 0 and "OK: format 1.1" in out
    code, out, _ = run("verify", "--json", TINY)
    d = json.loads(out)
    assert code == 0 and d["ok"] and d["format"] == "1.1" and len(d["sections"]) == 13


def test_inspect_tree_decodes_irtes_devices_bars():
    code, out, _ = run("inspect", TINY)
    assert code == 0
    assert "dmar0" in out and "remapped vec=0x20" in out and "0000:01:00.0" in out
    assert "BAR0" in out and "    MSI-X (" in out and "[0] -> dmar0 IRTE 0  remapped" in out


def test_inspect_json_is_stdout_only(tmp_path):
    code, out, err = run("inspect", "--json", TYPICAL)
    d = json.loads(out)
    assert code == 0 and d["schema"] == "handover.inspect/2"
    assert d["counts"]["irtes"] == 1024 and len(d["irtes"]) == 1024
    posted = [i for i in d["irtes"] if i["decoded"]["posted"]]
    assert posted and all("pda" in i["decoded"] for i in posted)


def test_inspect_msgpack_matches_json():
    import msgpack

    r = CliRunner().invoke(main, ["inspect", "--msgpack", TINY])
    assert r.exit_code == 0
    code, out, _ = run("inspect", "--json", TINY)
    assert msgpack.unpackb(r.stdout_bytes) == json.loads(out)


def test_diff_same_and_different(tmp_path):
    code, out, err = run("diff", TINY, TINY)
    assert code == 0 and "same" in err
    st = synth_state("tiny", seed=1)
    b = encode(st)
    st2 = decode(b)
    # move one BAR: build a modified copy through the builder
    from handover.formats.model import Table

    rows = list(st2.bars)
    rows[0] = rows[0]._replace(start=rows[0].start + 0x1000)
    st2.bars = Table.from_rows(st2.bars.spec, rows)
    p = tmp_path / "moved.bin"
    p.write_bytes(encode(st2))
    code, out, _ = run("diff", "--json", TINY, str(p))
    d = json.loads(out)
    assert code == 1 and not d["same"]
    assert d["changes"] == [{"section": "bars", "key": "0000:01:00.0 BAR0", "change": "changed",
                             "fields": {"start": ["0xfe000000", "0xfe001000"]}}]


def test_errors_exit_codes_one_line(tmp_path):
    blob = open(TINY, "rb").read()
    cases = {
        "missing": (None, 3),
        "empty": (b"", 3),
        "zeros": (bytes(4096), 3),
        "flip": (blob[:500] + bytes([blob[500] ^ 4]) + blob[501:], 4),
        "trunc": (blob[:-1], 4),
        "garbage": (b"not a handover state at all" * 10, 4),
    }
    for name, (data, want) in cases.items():
        p = tmp_path / name
        if data is not None:
            p.write_bytes(data)
        code, out, err = run("verify", str(p))
        assert code == want, (name, code, err)
        assert err.count("\n") == 1 and err.startswith("handover: "), (name, err)
        assert "Traceback" not in err


def test_wrong_major_exit_5(tmp_path):
    from handover.formats import codec

    blob = open(TINY, "rb").read()
    hdr = codec.read_header(blob)
    secs = [(e["type"], e["version"], e["flags"], e["count"], e["record_size"], e["data"])
            for e in codec.read_sections(blob, hdr)]
    p = tmp_path / "v2.bin"
    p.write_bytes(codec.assemble(secs, 2, 3, 1))
    code, out, err = run("verify", "--json", str(p))
    assert code == 5 and "format 2.3 is not supported" in err
    assert json.loads(out)["exit_code"] == 5


def test_convert_to_older_minor(tmp_path):
    out = tmp_path / "old.bin"
    code, _, err = run("convert", TINY, str(out), "--format-version", "1.0")
    assert code == 0
    assert out.read_bytes() == open(os.path.join(VEC, "tiny-1.0.bin"), "rb").read()
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    code, _, err = run("convert", TINY, str(out), "--format-version", "1.0")
    assert code == 1 and "exists" in err  # never overwrites without --force
    code, _, err = run("convert", TINY, str(tmp_path / "x"), "--format-version", "1.9")
    assert code == 5
    code, _, err = run("convert", TINY, str(tmp_path / "x"), "--format-version", "banana")
    assert code == 2


def test_console_script_subprocess():
    """The installed-style entry point: python -m handover, real process, real exit code."""
    r = subprocess.run([sys.executable, "-m", "handover", "verify", TINY], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout and r.stderr == ""
    r = subprocess.run([sys.executable, "-m", "handover", "inspect", "/nonexistent/x"],
                       capture_output=True, text=True)
    assert r.returncode == 3 and r.stdout == "" and len(r.stderr.splitlines()) == 1


def test_diff_two_generations_of_one_region(tmp_path):
    from handover import pmem
    from handover.formats.model import Table

    reg = tmp_path / "region"
    pmem.init(str(reg), size=8 << 20)
    st = decode(open(TINY, "rb").read())
    pmem.commit(str(reg), encode(st))
    rows = list(st.bars)
    rows[0] = rows[0]._replace(size=rows[0].size * 2)
    st.bars = Table.from_rows(st.bars.spec, rows)
    pmem.commit(str(reg), encode(st))
    code, out, _ = run("diff", "--json", "--generation-a", "1", str(reg), str(reg))
    d = json.loads(out)
    assert code == 1 and d["a"]["generation"] == 1 and d["b"]["generation"] == 2
    assert [c["fields"] for c in d["changes"]] == [{"size": ["0x100000", "0x200000"]}]
    code, _, _ = run("diff", str(reg), str(reg))
    assert code == 0
    code, _, err = run("diff", "--generation-a", "7", str(reg), str(reg))
    assert code == 3, err
