"""`handover arm`: the next command line and the kexec command, built without running kexec
(--dry-run on a captured host tree).  tests/system/test_initramfs_e2e.py runs it for real."""

import json
import os
import struct

import pytest
from click.testing import CliRunner

from handover.cli import main  # noqa: I001 (first: it registers the subcommand modules)
from handover.ops import arm as A
from tests.elfwriter import elf, note

from hosttree import TOKEN, copy_host

CURRENT = ("BOOT_IMAGE=/vmlinuz-6.12 root=/dev/vda1 ro console=ttyS0,115200 initrd=/initrd.img "
           "memmap=64M!0x30000000 memmap=16M!2G handover.region=/dev/pmem9 handover=0x1@0x2 quiet")
LEGACY = {"phys_start": 0x30000000, "size": 64 << 20, "legacy": True,
          "memmap_option": "memmap=64M!0x30000000"}
NVDIMM = {"phys_start": 0x100600000, "size": 254 << 20, "legacy": False, "memmap_option": None}


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def kernel(tmp_path, declares=None):
    notes = note("Linux", 256, b"6.12")
    if declares is not None:
        major, minor = declares
        notes += note("Handover", 1, struct.pack("<I", major << 16 | minor))
    p = tmp_path / f"vmlinux-{declares}"
    p.write_bytes(elf([("note", notes, 0)], e_type=2))
    return p


def test_carried_cmdline_drops_boot_image_initrd_and_old_handover_words():
    assert A.carried_cmdline(CURRENT) == [
        "root=/dev/vda1", "ro", "console=ttyS0,115200", "memmap=64M!0x30000000", "memmap=16M!2G",
        "quiet"]


def test_memmap_words_for_picks_the_range_holding_the_region():
    assert A.memmap_words_for(CURRENT, 0x30000000) == ["memmap=64M!0x30000000"]
    assert A.memmap_words_for(CURRENT, 0x33ffffff) == ["memmap=64M!0x30000000"]
    assert A.memmap_words_for(CURRENT, 0x80000000 + 5) == ["memmap=16M!2G"]
    assert A.memmap_words_for(CURRENT, 0x34000000) == []
    assert A.memmap_words_for(CURRENT, None) == []


def test_plan_reuses_cmdline_and_does_not_repeat_memmap():
    cmd, word = A.plan_cmdline(CURRENT, None, "root=LABEL=x", "/dev/pmem0", LEGACY, policy="abort")
    assert word == "phys:0x30000000"
    assert cmd.split().count("memmap=64M!0x30000000") == 1
    assert cmd.endswith("root=LABEL=x handover.region=phys:0x30000000 handover.policy=abort")
    assert "BOOT_IMAGE" not in cmd and "handover=" not in cmd and "/dev/pmem9" not in cmd


def test_plan_with_command_line_adds_the_legacy_memmap_again():
    cmd, _ = A.plan_cmdline(CURRENT, "console=ttyS0 root=/dev/vda", "", "/dev/pmem0", LEGACY)
    assert cmd == "console=ttyS0 root=/dev/vda handover.region=phys:0x30000000 memmap=64M!0x30000000"
    # the current line has no memmap= for it (the range came from elsewhere): the iomem one
    cmd, _ = A.plan_cmdline("console=ttyS0", None, "", "/dev/pmem0", LEGACY)
    assert cmd.split()[-1] == "memmap=64M!0x30000000"


def test_plan_nvdimm_no_memmap_and_handover_param_only_for_a_declaring_kernel():
    cmd, word = A.plan_cmdline("console=ttyS0", None, "", "/dev/dax0.0", NVDIMM)
    assert cmd == "console=ttyS0 handover.region=phys:0x100600000"
    cmd, _ = A.plan_cmdline("console=ttyS0", None, "", "/dev/dax0.0", NVDIMM, declared=True,
                            next_region="/dev/dax0.0")
    assert cmd == ("console=ttyS0 handover.region=/dev/dax0.0 handover=0xfe00000@0x100600000 "
                   "nokaslr")
    # the next kernel runs where kexec placed it: KASLR off, once
    cmd, _ = A.plan_cmdline("console=ttyS0 nokaslr", None, "", "/dev/dax0.0", NVDIMM,
                            declared=True)
    assert cmd.split().count("nokaslr") == 1
    # a plain file (no physical address): the path itself, never handover=
    cmd, word = A.plan_cmdline("", None, "", "/var/tmp/blob", {"phys_start": None}, declared=True)
    assert (cmd, word) == ("handover.region=/var/tmp/blob", "/var/tmp/blob")
    cmd, _ = A.plan_cmdline("", None, "", "/var/tmp/blob", {"phys_start": None}, token=TOKEN)
    assert cmd == f"handover.region=/var/tmp/blob handover.token={TOKEN}"


def test_kexec_and_exec_commands():
    assert A.kexec_command("/boot/vmlinuz", "/boot/initrd", "a b", "l") == [
        "kexec", "-l", "/boot/vmlinuz", "--initrd=/boot/initrd", "--command-line=a b"]
    assert A.kexec_command("/boot/vmlinuz", None, "a", "s") == [
        "kexec", "-s", "-l", "/boot/vmlinuz", "--command-line=a"]
    assert A.exec_command(True) == ["systemctl", "kexec"]
    assert A.exec_command(False) == ["kexec", "-e"]


def test_systemd_running_is_sd_booted(tmp_path):
    assert not A.systemd_running(str(tmp_path))
    (tmp_path / "run/systemd/system").mkdir(parents=True)
    assert A.systemd_running(str(tmp_path))


@pytest.fixture
def host(tmp_path):
    root = copy_host(tmp_path / "host")
    region = tmp_path / "region.img"
    code, _, err = run("region", "init", region, "--size", "4M")
    assert code == 0, err
    return root, region


def test_dry_run_stock_kernel(host, tmp_path):
    root, region = host
    code, out, err = run("arm", "--kernel", kernel(tmp_path), "--initrd", "/boot/i.img",
                         "--region", region, "--token", TOKEN, "--append", "root=LABEL=r",
                         "--sysroot", root, "--dry-run", "--json", "--result-dir", tmp_path / "run")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["kernel_declaration"].startswith("stock kernel")
    assert doc["save"]["devices"] == ["0000:00:03.0"] and doc["save"]["dry_run"]
    cmd = doc["kexec_command"]
    assert cmd[:3] == ["kexec", "-l", str(kernel(tmp_path))] and cmd[3] == "--initrd=/boot/i.img"
    # the captured guest's own command line (its handover.* words dropped), memmap= kept
    assert cmd[4] == ("--command-line=console=ttyS0,115200 panic=1 oops=panic loglevel=4 "
                      "rdinit=/init memmap=64M!0x30000000 root=LABEL=r "
                      f"handover.region={region}")
    assert not (tmp_path / "run" / "armed").exists()     # dry run: no marker
    assert run("region", "status", region)[0] == 3        # and nothing saved


def test_dry_run_text_and_exec(host, tmp_path):
    root, region = host
    code, out, err = run("arm", "--kernel", kernel(tmp_path, (1, 1)), "--region", region,
                         "--sysroot", root, "--dry-run", "--exec", "-q")
    assert code == 0, err
    assert "would run: kexec -l" in out and "reads 1.0-1.1: writing 1.1" in out
    assert "would run: kexec -e" in err


def test_refuses_a_kernel_that_cannot_read_our_format(host, tmp_path):
    root, region = host
    code, out, err = run("arm", "--kernel", kernel(tmp_path, (2, 0)), "--region", region,
                         "--sysroot", root, "--dry-run")
    assert code == 5 and "reads handover format 2.0-2.0" in err and "refusing" in err
    assert out == ""


def test_older_minor_for_a_kernel_that_reads_only_1_0(host, tmp_path):
    root, region = host
    blob = tmp_path / "b.bin"
    code, out, err = run("arm", "--kernel", kernel(tmp_path, (1, 0)), "--region", region,
                         "--sysroot", root, "--dry-run", "--json")
    assert code == 0, err
    assert "writing 1.0" in json.loads(out)["kernel_declaration"]
    del blob


def test_pass_token_needs_token(host, tmp_path):
    root, region = host
    code, _, err = run("arm", "--kernel", kernel(tmp_path), "--region", region, "--pass-token",
                       "--sysroot", root, "--dry-run")
    assert code == 2 and "--pass-token needs --token" in err


def test_exec_alone_needs_an_armed_kernel(tmp_path):
    code, _, err = run("arm", "--exec", "--result-dir", tmp_path, "--sysroot", tmp_path)
    assert code == 1 and "not armed" in err
    code, _, err = run("arm")
    assert code == 2


def _marker(region, token=None) -> dict:
    from handover.formats.token import hash_token

    m = {"schema": "handover.armed/2", "region": str(region)}
    if token:
        salt, digest = hash_token(token)
        m.update(token_salt=salt.hex(), token_hash=digest.hex())
    return m


def test_on_shutdown_gate(host, tmp_path):
    root, region = host
    rd = tmp_path / "run"
    code, _, err = run("arm", "--on-shutdown", "--result-dir", rd, "--sysroot", root)
    assert code == 0 and "not armed" in err
    rd.mkdir()
    (rd / "armed").write_text(json.dumps(_marker(region, TOKEN)))
    kl = root / "sys/kernel/kexec_loaded"
    kl.write_text("0\n")
    code, _, err = run("arm", "--on-shutdown", "--result-dir", rd, "--sysroot", root)
    assert code == 0 and "no kexec kernel is loaded" in err
    assert run("region", "status", region)[0] == 3
    kl.write_text("1\n")
    code, _, err = run("arm", "--on-shutdown", "--result-dir", rd, "--sysroot", root, "-q")
    assert code == 0 and "saved at shutdown: generation 1" in err, err
    assert run("region", "status", region)[0] == 0


def test_on_shutdown_refuses_a_marker_with_a_clear_token(host, tmp_path):
    """A marker of the old layout held the token in clear: it is refused, not used."""
    root, region = host
    rd = tmp_path / "run"
    rd.mkdir()
    (rd / "armed").write_text(json.dumps({"region": str(region), "token": TOKEN}))
    (root / "sys/kernel/kexec_loaded").write_text("1\n")
    code, _, err = run("arm", "--on-shutdown", "--result-dir", rd, "--sysroot", root)
    assert code == 1 and "token in clear" in err and TOKEN not in err
    assert run("region", "status", region)[0] == 3


@pytest.fixture
def fake_kexec(tmp_path, monkeypatch):
    """A ``kexec`` on PATH that records its arguments (the real one would load a kernel)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "kexec.args"
    (bindir / "kexec").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {log}\n")
    (bindir / "kexec").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return log


def test_arm_marker_never_holds_the_token_and_the_shutdown_save_keeps_it_checkable(
        host, tmp_path, fake_kexec):
    root, region = host
    rd = tmp_path / "run"
    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    code, out, err = run("arm", "--kernel", kernel(tmp_path), "--initrd", "/boot/i.img",
                         "--region", region, "--token-file", tf, "--pass-token",
                         "--sysroot", root, "--result-dir", rd, "--json")
    assert code == 0, err
    marker = (rd / "armed").read_text()
    assert TOKEN not in marker and TOKEN.replace("-", "") not in marker
    assert "/proc/cmdline" in err and "--pass-token" in err        # the exposure is said
    # the kexec got the token (that is what --pass-token is for); the report hides it
    assert f"handover.token={TOKEN}" in fake_kexec.read_text()
    assert TOKEN not in out and "handover.token=<hidden>" in json.loads(out)["cmdline"]
    # the shutdown save writes a state whose token still checks, from the hash alone
    (root / "sys/kernel/kexec_loaded").write_text("1\n")
    code, _, err = run("arm", "--on-shutdown", "--result-dir", rd, "--sysroot", root)
    assert code == 0 and "generation 2" in err, err
    code, out, err = run("load", "--region", region, "--token", TOKEN, "--sysroot", root,
                         "--result-dir", tmp_path / "res", "--json")
    items = {v["item"]: v["status"] for v in json.loads(out)["verdicts"]}
    assert code == 0 and items["device 0000:00:03.0 token"] == "match", err
    wrong = "00000000-0000-4000-8000-000000000000"
    code, out, _ = run("load", "--region", region, "--token", wrong, "--sysroot", root,
                       "--result-dir", tmp_path / "res", "--json")
    assert code == 6


def test_token_from_stdin_and_errors_never_echo_it(host, tmp_path):
    root, region = host
    r = CliRunner().invoke(main, ["save", "--sysroot", str(root), "--output",
                                  str(tmp_path / "b.bin"), "--token-file", "-", "--json"],
                           input=TOKEN + "\n")
    assert r.exit_code == 0, r.stderr
    code, _, err = run("save", "--sysroot", root, "--dry-run", "--token", "not-a-uuid-secret")
    assert code == 1 and "not a UUID" in err and "not-a-uuid-secret" not in err
    code, _, err = run("save", "--sysroot", root, "--dry-run", "--token", TOKEN,
                       "--token-file", "-")
    assert code == 2


def test_arm_relative_region_goes_absolute_and_no_initrd_warns(host, tmp_path, monkeypatch):
    root, region = host
    monkeypatch.chdir(tmp_path)
    code, out, err = run("arm", "--kernel", kernel(tmp_path), "--region", "region.img",
                         "--sysroot", root, "--dry-run", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert f"handover.region={tmp_path}/region.img" in doc["cmdline"].split()
    assert "warning: no --initrd" in err


def test_arm_keepalive_feature_detected(tmp_path):
    from handover.host import Sysroot
    from handover.host.kernel_handover import KEEPALIVE, arm_keepalive

    assert arm_keepalive(Sysroot(str(tmp_path)), ["0000:00:03.0"])["armed"] is False
    f = tmp_path / KEEPALIVE.lstrip("/")
    f.parent.mkdir(parents=True)
    f.write_text("")
    got = arm_keepalive(Sysroot(str(tmp_path)), ["0000:00:03.0", "0000:00:04.0"])
    assert got == {"armed": True, "devices": ["0000:00:03.0", "0000:00:04.0"]}
    assert f.read_text() == "0000:00:04.0\n"  # one device per write, after a "clear"


def test_arm_keepalive_only_for_a_kernel_that_reads_the_state(tmp_path):
    """A next kernel without the Handover note would disable translation while the devices
    still bus-master: nothing is armed, and an earlier arming is cleared."""
    from handover.host import Sysroot
    from handover.host.kernel_handover import KEEPALIVE, arm_keepalive

    f = tmp_path / KEEPALIVE.lstrip("/")
    f.parent.mkdir(parents=True)
    f.write_text("")
    got = arm_keepalive(Sysroot(str(tmp_path)), ["0000:00:03.0"], next_reads_state=False)
    assert got["armed"] is False and "does not declare" in got["reason"]
    assert f.read_text() == "clear\n"


def test_arm_keepalive_names_the_region_the_kexec_checks(tmp_path):
    """A kernel with next_region checks, at the kexec, the newest state of that region
    against its live tables: arm writes the next kernel's handover= there before any
    device, and arms nothing when the region has no physical address to name."""
    from handover.host import Sysroot
    from handover.host.kernel_handover import KEEPALIVE, NEXT_REGION, arm_keepalive

    keep = tmp_path / KEEPALIVE.lstrip("/")
    nxt = tmp_path / NEXT_REGION.lstrip("/")
    keep.parent.mkdir(parents=True)
    keep.write_text("")
    nxt.write_text("")
    got = arm_keepalive(Sysroot(str(tmp_path)), ["0000:00:03.0"], region="0x4000000@0x30000000")
    assert got == {"armed": True, "devices": ["0000:00:03.0"]}
    assert nxt.read_text() == "0x4000000@0x30000000\n" and keep.read_text() == "0000:00:03.0\n"
    got = arm_keepalive(Sysroot(str(tmp_path)), ["0000:00:03.0"], region=None)
    assert got["armed"] is False and "physical address" in got["reason"]
    assert nxt.read_text() == "clear\n" and keep.read_text() == "clear\n"


def test_region_spec_is_the_kernel_parameter():
    from handover.ops.arm import region_spec

    assert region_spec({"phys_start": 0x30000000, "size": 64 << 20}) == "0x4000000@0x30000000"
    assert region_spec({"phys_start": None, "size": 64 << 20}) is None
    assert region_spec({"phys_start": 0x30000000, "size": 0}) is None


def test_the_segment_window_avoids_every_preserved_range():
    """kexec -l places its segments where kexec-tools sees free RAM, a kept device's page
    tables included (the Debian build's 20 MiB initrd once landed on one: the old kernel
    disarmed the kexec). arm gives it the highest stretch of RAM below 4 GiB that no
    preserved range touches."""
    from handover.ops.arm import WINDOW_ALIGN, kexec_command, segment_window

    ram = [(0x1000, 0x9efff), (0x100000, 0x2fffffff), (0x3a000000, 0x3ffdffff)]
    preserved = [(0x3c592000, 0x1000), (0x8518000, 0x1000), (0x1a40000, 0x1000),
                 (0x3f000000, 0x200000)]
    need = 40 << 20
    lo, hi = segment_window(ram, preserved, need)
    assert hi - lo >= need and lo % WINDOW_ALIGN == 0 and hi % WINDOW_ALIGN == 0
    assert not any(s < hi and s + n > lo for s, n in preserved)
    assert any(a <= lo and hi <= b + 1 for a, b in ram)
    assert (lo, hi) == (0x3c600000, 0x3f000000)      # the highest stretch large enough
    # nothing large enough: no window (arm warns and lets kexec-tools choose)
    assert segment_window(ram, preserved + [(0x2000000, 0x2e000000), (0x3a000000, 0x5000000)], need) is None
    cmd = kexec_command("/boot/vmlinuz", "/boot/initrd", "ro", "l", window=(lo, hi))
    assert cmd[-2:] == ["--mem-min=0x3c600000", "--mem-max=0x3effffff"]
    # kexec_file_load places segments in the kernel: no window options
    assert not any(w.startswith("--mem-") for w in
                   kexec_command("/boot/vmlinuz", None, "ro", "s", window=(lo, hi)))
