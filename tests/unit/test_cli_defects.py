"""The defects a hostile trial of the command line found, one test each,
and the output rules: one error line format, sanitized strings, strict JSON."""

import json
import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from handover.cli import main
from handover.formats.codec import decode, encode
from handover.formats.model import StateBuilder
from handover.synth import synth_state
from tests.elfwriter import elf, note

from hosttree import EDU, TOKEN, copy_host

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ERROR_LINE = re.compile(r"^handover: [a-z-]+: \S.*$")


def run(*args, input=None):
    r = CliRunner().invoke(main, [str(a) for a in args], input=input)
    return r.exit_code, r.stdout, r.stderr


def cli(*args, stdin=None, timeout=60):
    """The real entry point in a subprocess (for pipes, FIFOs and what CliRunner hides)."""
    return subprocess.run([sys.executable, "-m", "handover", *map(str, args)], cwd=ROOT,
                          stdin=stdin, capture_output=True, timeout=timeout)


def strict_json(text: str):
    def no_constant(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=no_constant)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ERROR_LINE.match(lines[0]), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def host(tmp_path):
    return copy_host(tmp_path / "host")


@pytest.fixture
def region(tmp_path):
    r = tmp_path / "region.img"
    assert run("region", "init", r, "--size", "4M")[0] == 0
    return r


def blob_file(tmp_path, name="s.bin", **meta):
    st = synth_state("tiny")
    st.meta.update(meta)
    p = tmp_path / name
    p.write_bytes(encode(st))
    return p


# 1 -----------------------------------------------------------------------------------------
def test_save_output_never_destroys_a_region(host, region, tmp_path):
    assert run("save", "--sysroot", host, "--region", region, "-q")[0] == 0
    link = tmp_path / "link"
    link.symlink_to(region)
    for target, extra in ((region, ()), (link, ()), (region, ("--region", region))):
        code, _, err = run("save", "--sysroot", host, "--output", target, *extra, "-q")
        assert code == 1, err
        one_error_line(err)
    # same path as --region: refused even with --force
    code, _, err = run("save", "--sysroot", host, "--region", region, "--output", link,
                       "--force", "-q")
    assert code == 1 and "region" in err
    assert run("region", "status", region)[0] == 0            # the state is still there
    # an existing plain file needs --force, like convert
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    assert run("save", "--sysroot", host, "--output", f, "-q")[0] == 1
    assert run("save", "--sysroot", host, "--output", f, "--force", "-q")[0] == 0


# 2 -----------------------------------------------------------------------------------------
def test_region_init_larger_than_the_free_space_fails_cleanly(tmp_path):
    vfs = os.statvfs(tmp_path)
    too_big = vfs.f_bavail * vfs.f_frsize + (1 << 30)
    path = tmp_path / "huge.img"
    code, _, err = run("region", "init", path, "--size", too_big)
    assert code == 1 and "free" in one_error_line(err)
    assert not path.exists()


# 3 -----------------------------------------------------------------------------------------
def test_meta_with_bin_and_nan_values_reads_everywhere(host, tmp_path):
    p = blob_file(tmp_path, hostname=b"\x00\xffbin", ratio=float("nan"), big=float("inf"))
    assert run("verify", p)[0] == 0
    code, out, err = run("inspect", "--json", p)
    assert code == 0, err
    doc = strict_json(out)
    assert doc["meta"]["hostname"] == "00ff62696e" and doc["meta"]["ratio"] == "nan"
    assert run("inspect", p)[0] == 0
    res = tmp_path / "res"
    code, out, err = run("load", "--region", p, "--sysroot", host, "--result-dir", res, "--json")
    assert code == 6, err                       # another host: a mismatch, not a crash
    strict_json(out)
    strict_json((res / "result.json").read_text())
    assert os.listdir(res) == ["result.json"]   # no result.json.tmp left behind


# 4 -----------------------------------------------------------------------------------------
def test_load_says_when_the_newest_generation_was_damaged(host, region, tmp_path):
    for _ in range(2):
        assert run("save", "--sysroot", host, "--region", region, "-q")[0] == 0
    st = json.loads(run("region", "status", region, "--json")[1])["state"]
    assert st["generation"] == 2
    with open(region, "r+b") as f:               # one byte of generation 2's blob
        f.seek(int(st["offset"], 16) + 200)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    code, out, err = run("load", "--region", region, "--sysroot", host, "--result-dir",
                         tmp_path / "res")
    assert code == 7, err
    assert "newest generation" in err and out.strip().splitlines()[-1].startswith("MATCH")
    # a patched kernel is not told to accept an older generation
    k = host / "sys/kernel/handover"
    k.mkdir(parents=True)
    (k / "state").write_text("valid\n")
    (k / "formats").write_text("1.0-1.1\n")
    (k / "decision").write_text("pending\n")
    code, _, err = run("load", "--region", region, "--sysroot", host, "--result-dir",
                       tmp_path / "res")
    assert code == 7 and (k / "decision").read_text() == "abort\n", err


# 5 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("meta_gen", ["x", -1, 1.5, True, None])
def test_convert_takes_the_header_generation_not_meta(tmp_path, meta_gen):
    st = synth_state("tiny")
    st.meta["generation"] = meta_gen
    src = tmp_path / "src.bin"
    src.write_bytes(encode(st, generation=5))
    code, _, err = run("convert", src, tmp_path / "out.bin", "--format-version", "1.0")
    assert code == 0, err
    assert decode((tmp_path / "out.bin").read_bytes()).generation == 5


def test_diff_meta_sees_the_header_generation(tmp_path):
    st = synth_state("tiny")
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(encode(st, generation=5))
    b.write_bytes(encode(st, generation=6))
    code, out, _ = run("diff", a, b, "--meta")
    assert code == 1 and "generation 5 -> 6" in out
    assert run("diff", a, b)[0] == 0            # without --meta, generations are volatile


# 6 -----------------------------------------------------------------------------------------
def test_check_kernel_json_is_one_document_on_a_stock_kernel(tmp_path):
    img = tmp_path / "vmlinux"
    img.write_bytes(elf([("note", note("Linux", 256, b"6.12"), 0)], e_type=2))
    code, out, err = run("check-kernel", img, "--json")
    assert code == 5
    doc = json.loads(out)                       # one document (two would not parse)
    assert doc["ok"] is False and doc["declares"] is None and doc["kind"] == "version"
    one_error_line(err)


# 7 -----------------------------------------------------------------------------------------
def test_fifo_never_hangs_and_stdin_is_a_source(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for args in (("inspect", fifo), ("verify", fifo), ("region", "status", fifo),
                 ("load", "--region", fifo, "--result-dir", tmp_path / "r"),
                 ("check-kernel", fifo), ("save", "--region", fifo, "-q"),
                 ("region", "init", fifo), ("diff", fifo, fifo)):
        r = cli(*args, timeout=30)
        assert r.returncode == 1, (args, r.stderr)
        one_error_line(r.stderr.decode())
    blob = blob_file(tmp_path)
    with open(blob, "rb") as f:
        r = cli("verify", "-", stdin=f)
    assert r.returncode == 0 and b"OK: format 1.1" in r.stdout, r.stderr
    with open(blob, "rb") as f:
        r = cli("inspect", "--json", "-", stdin=f)
    assert r.returncode == 0 and json.loads(r.stdout)["source"]["kind"] == "stdin"


# 9 -----------------------------------------------------------------------------------------
def test_exit_codes_of_unreadable_sources(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, _, err = run("inspect", loop)
    assert code == 1 and "does not exist" not in err
    one_error_line(err)
    code, _, err = run("inspect", tmp_path)           # a directory
    assert code == 1
    one_error_line(err)
    code, _, err = run("inspect", tmp_path / "missing")
    assert code == 3
    one_error_line(err)


@pytest.mark.skipif(not os.path.exists("/usr/bin/setpriv"), reason="needs setpriv")
def test_exit_code_of_a_file_without_read_permission(tmp_path):
    p = blob_file(tmp_path)
    p.chmod(0)
    d = tmp_path / "closed"
    d.mkdir()
    inner = blob_file(d)
    d.chmod(0)
    try:
        for path in (p, inner):       # an unreadable file; a file in an unreadable directory
            # root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH: the permission bits apply
            r = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                                "--inh-caps=-all", sys.executable, "-m", "handover", "inspect",
                                str(path)], cwd=ROOT, capture_output=True, timeout=60)
            if r.returncode == 0:
                pytest.skip("setpriv could not drop the capabilities here")
            assert r.returncode == 1, r.stderr
            line = one_error_line(r.stderr.decode())
            assert "ermission denied" in line and "does not exist" not in line
    finally:
        d.chmod(0o755)


def test_load_with_a_missing_sysroot_is_an_error_not_a_mismatch(tmp_path):
    p = blob_file(tmp_path)
    code, _, err = run("load", "--region", p, "--sysroot", tmp_path / "nonexistent",
                       "--result-dir", tmp_path / "r")
    assert code in (1, 2) and code != 6
    assert "sysroot" in err.lower()


# 11 ----------------------------------------------------------------------------------------
def _state(irtes=(), irta=None):
    b = StateBuilder()
    b.meta = {"generation": 1}
    from handover.formats import enums as E

    present = E.UNIT_PRESENT_BIT["irta"] if irta is not None else 0
    b.add("units", unit=0, segment=0, flags=0, present=present, reg_base=0xFED90000,
          **({"irta": irta} if irta is not None else {}))
    for idx, lo in irtes:
        b.add("irtes", unit=0, index=idx, lo=lo, hi=0)
    return b.build()


def test_diff_registers_not_captured_and_numeric_order(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(encode(_state([(9, 1), (10, 1)], irta=0x12345F)))
    b.write_bytes(encode(_state([(9, 2), (10, 2)])))
    code, out, _ = run("diff", a, b)
    assert code == 1
    assert "irta 0x12345f -> not captured" in out and "0x0" not in out.split("irta")[1].split(",")[0]
    order = [ln for ln in out.splitlines() if "IRTE" in ln]
    assert ["IRTE 9" in order[0], "IRTE 10" in order[1]] == [True, True], out


# 12 ----------------------------------------------------------------------------------------
def test_negative_limit_is_a_usage_error(tmp_path):
    assert run("inspect", "--limit", "-1", blob_file(tmp_path))[0] == 2


def test_save_on_a_region_at_the_last_generation(host, region):
    from handover.pmem.layout import HEADER_OFFSETS, HEADER_SIZE, decode_header, encode_header

    with open(region, "r+b") as f:
        for copy, off in enumerate(HEADER_OFFSETS):
            f.seek(off)
            h = decode_header(f.read(HEADER_SIZE), copy=copy)
            h.generation = 2 ** 64 - 1
            f.seek(off)
            f.write(encode_header(h))
    code, _, err = run("save", "--sysroot", host, "--region", region, "-q")
    assert code == 1 and "generation" in one_error_line(err)


# 13 ----------------------------------------------------------------------------------------
def test_global_quiet_silences_progress(host, tmp_path):
    code, _, err = run("-q", "save", "--sysroot", host, "--dry-run")
    assert code == 0 and err == "", err
    code, _, err = run("save", "--sysroot", host, "--dry-run")
    assert code == 0 and "reading host" in err


def test_a_closed_pipe_ends_quietly():
    typical = os.path.join(ROOT, "tests", "vectors", "typical-1.1.bin")
    p = subprocess.Popen([sys.executable, "-m", "handover", "inspect", "--limit", "0", typical],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()                            # what `| head -1` does
    err = p.stderr.read()
    assert p.wait(timeout=60) == 141 and err == b"", err


def test_json_and_msgpack_together_is_a_usage_error(tmp_path):
    assert run("inspect", "--json", "--msgpack", blob_file(tmp_path))[0] == 2


def test_no_python_reprs_in_text(host, tmp_path):
    st = synth_state("tiny")
    st.meta.update(hostname=None, kernel_release=None)
    p = tmp_path / "s.bin"
    p.write_bytes(encode(st))
    code, out, _ = run("inspect", p)
    assert code == 0 and "None" not in out and "[]" not in out
    code, out, _ = run("load", "--region", p, "--sysroot", host, "--result-dir", tmp_path / "r")
    assert code == 6 and "None" not in out and "[]" not in out


# 14 ----------------------------------------------------------------------------------------
def test_one_error_format_everywhere(host, region, tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    bad = tmp_path / "bad"
    bad.write_bytes(b"HOVRSTAT" + bytes(100))
    cases = [("inspect", tmp_path / "missing"), ("verify", empty), ("verify", bad),
             ("region", "status", tmp_path / "missing"), ("region", "wipe", tmp_path / "no", "--yes"),
             ("region", "init", region), ("-q", "save", "--sysroot", host, "--device", "00:1f.7",
                                          "--dry-run"),
             ("convert", bad, tmp_path / "o.bin"), ("diff", bad, empty)]
    for args in cases:
        code, _, err = run(*args)
        assert code not in (0, 2), (args, err)
        one_error_line(err)
    # usage errors too (exit 2): click's multi-line block becomes the same one line
    for args in (("save",), ("inspect", "--limit", "-1", empty), ("bogus",),
                 ("region", "bogus"), ("diff", empty), ("arm", "--kernel", empty, "--pass-token",
                                                        "--sysroot", host, "--dry-run")):
        code, _, err = run(*args)
        assert code == 2, (args, err)
        assert one_error_line(err).startswith("handover: usage: "), err


# security: strings read from a state are sanitized ---------------------------------------
def test_strings_from_a_state_cannot_forge_lines_or_drive_the_terminal(host, tmp_path):
    evil = "h\x1b[2J\x9b31m\rFAKE: MATCH\nMATCH: 99 match"
    st = synth_state("tiny")
    st.meta.update(hostname=evil, kernel_release=evil)
    p = tmp_path / "evil.bin"
    p.write_bytes(encode(st))
    for args in (("inspect", p), ("diff", p, blob_file(tmp_path)),
                 ("load", "--region", p, "--sysroot", host, "--result-dir", tmp_path / "r")):
        code, out, err = run(*args)
        for text in (out, err):
            assert "\x1b" not in text and "\r" not in text and "\x9b" not in text, args
            assert not any(ln.startswith(("FAKE", "MATCH: 99")) for ln in text.splitlines())
    code, out, _ = run("inspect", "--json", p)
    assert json.loads(out)["meta"]["hostname"] == evil    # JSON carries it, escaped
    assert "\x1b" not in out


def test_save_and_load_report_the_kept_device(host, tmp_path):
    """The commands still do their job through the layers."""
    blob = tmp_path / "b.bin"
    code, out, err = run("save", "--sysroot", host, "--output", blob, "--token", TOKEN, "--json")
    assert code == 0 and json.loads(out)["devices"] == [EDU], err


# 8 -----------------------------------------------------------------------------------------
def test_inspect_json_of_the_max_blob_streams_in_bounded_memory(tmp_path):
    """The largest state (19 MB blob, ~690k records): the JSON goes out record by record;
    the process stays far below the 2.7 GB the whole-document dict took."""
    import resource

    p = tmp_path / "max.bin"
    p.write_bytes(encode(synth_state("max")))
    script = ("import resource, sys\n"
              "from handover.cli import main\n"
              "try:\n    main(['inspect', '--json', sys.argv[1]])\n"
              "except SystemExit as e:\n    code = e.code\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    with open(tmp_path / "out.json", "wb") as out:
        r = subprocess.run([sys.executable, "-c", script, str(p)], cwd=ROOT, stdout=out,
                           stderr=subprocess.PIPE, timeout=600)
    rss_kib = int(r.stderr.split()[-1])
    assert rss_kib < 400 * 1024, f"{rss_kib} KiB"
    with open(tmp_path / "out.json") as f:
        doc = json.load(f)
    assert doc["counts"]["irtes"] == len(doc["irtes"]) == 8 * 65536
    del resource


def test_a_flipped_major_bit_is_an_integrity_failure_another_major_a_version(tmp_path):
    """The header CRC covers the major: a flipped bit there fails the CRC (exit 4); a blob
    of another major with a valid CRC is refused as a version (exit 5)."""
    from handover.formats import codec

    tiny = encode(synth_state("tiny"))
    for bit in range(16):                         # the u16 major at offset 8
        b = bytearray(tiny)
        b[8 + bit // 8] ^= 1 << (bit % 8)
        p = tmp_path / f"flip{bit}.bin"
        p.write_bytes(bytes(b))
        code, _, err = run("verify", p)
        assert code == 4 and "checksum" in one_error_line(err), (bit, err)
    hdr = codec.read_header(tiny)
    secs = [(e["type"], e["version"], e["flags"], e["count"], e["record_size"], e["data"])
            for e in codec.read_sections(tiny, hdr)]
    p = tmp_path / "two.bin"
    p.write_bytes(codec.assemble(secs, 2, 0, 1))
    code, _, err = run("verify", p)
    assert code == 5 and "format 2.0 is not supported" in one_error_line(err)
