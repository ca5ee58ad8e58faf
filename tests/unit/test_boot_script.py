"""initramfs/handover-boot.sh (the boot logic of both initramfs integrations), run by busybox
sh and dash against a captured host tree (HANDOVER_BOOT_ROOT) with the real `handover`:
command-line words, region lookup, policies (including a patched kernel's decision file,
which the QEMU tests with Debian's kernel cannot reach), result files, and that it always
returns 0."""

import json
import os
import subprocess
import sys

import pytest

from hosttree import EDU, TOKEN, copy_host

LIB = os.path.join(os.path.dirname(__file__), "..", "..", "initramfs", "handover-boot.sh")
SHELLS = [s for s in ("/bin/busybox", "/bin/dash") if os.path.exists(s)]
BIN = os.path.dirname(sys.executable)


def handover(*args):
    r = subprocess.run([sys.executable, "-m", "handover", *map(str, args)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(params=SHELLS)
def boot(request, tmp_path):
    root = copy_host(tmp_path / "host")
    (root / "proc/uptime").write_text("12.50 11.00\n")
    (root / "dev").mkdir()
    shell = [request.param, "sh"] if request.param.endswith("busybox") else [request.param]

    def run(cmdline, *, stale=False, decision=False):
        (root / "proc/cmdline").write_text(cmdline + "\n")
        if not (root / "dev/pmem0").exists():
            handover("save", "--sysroot", root, "--output", root / "dev/pmem0", "--token", TOKEN,
                     "-q", *(["--test-alter-bar", f"{EDU}:0:0xfe000000"] if stale else []))
        if decision:
            d = root / "sys/kernel/handover"
            d.mkdir(parents=True, exist_ok=True)
            (d / "status").write_text("state: valid\n")
            (d / "formats").write_text("1.0-1.1\n")
            (d / "decision").write_text("pending\n")
        env = dict(os.environ, HANDOVER_BOOT_ROOT=str(root), PATH=f"{BIN}:{os.environ['PATH']}")
        r = subprocess.run([*shell, "-c", f'. "{LIB}"; handover_boot; echo "ret=$?"; '
                            'echo "leak=${_ho_rc:-none}"'], env=env, capture_output=True, text=True)
        assert r.stdout.splitlines()[-2:] == ["ret=0", "leak=none"], r.stdout + r.stderr
        run_dir = root / "run/handover"
        out = {"console": (root / "dev/console").read_text() if (root / "dev/console").exists() else ""}
        for n in ("boot.json", "result.json"):
            out[n] = json.loads((run_dir / n).read_text()) if (run_dir / n).exists() else None
        if decision:
            out["decision"] = (root / "sys/kernel/handover/decision").read_text().strip()
        return out
    return run


def test_no_region_word_no_check(boot):
    out = boot("console=ttyS0 root=/dev/vda")
    assert out["boot.json"] is None and out["console"] == ""


def test_match_report(boot):
    out = boot(f"quiet handover.region=/dev/pmem0 handover.token={TOKEN}")
    b = out["boot.json"]
    assert b["rc"] == 0 and b["policy"] == "report" and b["action"] == "none"
    assert b["uptime_start"] == 12.5 and b["device"].endswith("/dev/pmem0")
    assert out["result.json"]["ok"] and out["result.json"]["check_only"]
    items = {v["item"]: v["status"] for v in out["result.json"]["verdicts"]}
    assert items[f"device {EDU} token"] == "match"
    assert "MATCH:" in out["console"] and "boot continues" in out["console"]


def test_mismatch_abort_on_a_patched_kernel_writes_abort(boot):
    out = boot("handover.region=/dev/pmem0 handover.policy=abort", stale=True, decision=True)
    assert out["boot.json"]["rc"] == 6 and out["boot.json"]["action"] == "abort"
    assert out["decision"] == "abort"              # written by handover load itself
    assert not out["result.json"]["ok"]
    assert "MISMATCH" in out["console"] and f"device {EDU} BAR0" in out["console"]


def test_match_abort_policy_accepts(boot):
    out = boot("handover.region=/dev/pmem0 handover.policy=abort", decision=True)
    assert out["boot.json"]["rc"] == 0 and out["boot.json"]["action"] == "accept"
    assert out["decision"] == "accept"


def test_mismatch_report_policy_leaves_the_kernel_alone(boot):
    out = boot("handover.region=/dev/pmem0", stale=True, decision=True)
    assert out["boot.json"]["rc"] == 6 and out["boot.json"]["action"] == "none"
    assert out["decision"] == "pending"


def test_missing_region_abort_writes_abort_and_a_stub_result(boot):
    out = boot("handover.region=/dev/dax9.0 handover.policy=abort handover.wait=0", decision=True)
    assert out["boot.json"]["rc"] == 3 and out["boot.json"]["action"] == "abort"
    assert out["decision"] == "abort"
    assert out["result.json"]["ok"] is False and out["result.json"]["exit_code"] == 3
    assert "no such device" in out["result.json"]["error"]
    assert "NOT CHECKED (exit 3)" in out["console"]


def test_phys_spec_resolves_through_sysfs_and_unknown_policy_is_report(boot, tmp_path):
    # the captured host has a devdax device whose data starts at 0x30200000
    root = tmp_path / "host"
    assert (root / "sys/bus/dax/devices/dax0.0/resource").read_text().strip() == "0x30200000"
    handover("save", "--sysroot", root, "--output", root / "dev/dax0.0", "-q")
    out = boot("handover.region=phys:0x30200000 handover.policy=bogus handover.wait=0")
    b = out["boot.json"]
    assert b["device"].endswith("/dev/dax0.0") and b["policy"] == "report" and b["rc"] == 0
    assert "unknown policy 'bogus'" in out["console"]
    out = boot("handover.region=phys:0x40000000 handover.wait=0")
    assert out["boot.json"]["rc"] == 3
