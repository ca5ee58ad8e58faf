"""End to end: `handover arm` + `handover arm --exec` in the first kernel (stock Debian 6.12,
edu bound to vfio-pci), and in the second kernel an initramfs built by the REAL
initramfs-tools (mkinitramfs) or dracut with our hook / module, whose boot script runs
`handover load` and writes /run/handover/result.json before the boot goes on to the root
file system's /sbin/init (tests/system/e2e.py explains the set-up).

Runs: initramfs-tools + legacy memmap= pmem (raw /dev/pmem0, kexec -l), initramfs-tools +
QEMU NVDIMM in devdax mode (kexec -s -l), dracut + legacy pmem, and a stale state
(initramfs-tools, policy=abort).
Each prints its phase timings.  Plus the images themselves, checked with lsinitramfs /
lsinitrd, and the systemd unit with systemd-analyze verify.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.system import e2e, lab

pytestmark = pytest.mark.system


def _cycle(**kw) -> e2e.Cycle:
    try:
        c = e2e.run_cycle(**kw)
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    print(f"\n{kw}: initrd {c.initrd_facts['bytes'] / 1e6:.1f} MB built in "
          f"{c.initrd_facts['seconds']:.1f} s\n{e2e.format_timings(c.timings)}")
    return c


def _diag(c: e2e.Cycle) -> str:
    return (f"boot={c.boot}\nresult={c.result}\nhook lines:\n" + "\n".join(c.console_lines)
            + f"\n--- console tail ---\n{c.guest.console[-3000:]}")


def _assert_match(c: e2e.Cycle, region_dev: str):
    assert c.reached_root, _diag(c)                  # the boot went on to the real root
    assert c.boot is not None and c.boot["rc"] == 0, _diag(c)
    assert c.boot["device"] == region_dev and c.boot["region"].startswith("phys:0x")
    assert c.result["ok"] and c.result["summary"]["mismatch"] == 0
    assert c.result["summary"]["missing"] == 0 and c.result["summary"]["match"] >= 10
    items = {v["item"]: v["status"] for v in c.result["verdicts"]}
    assert items["device 0000:00:03.0 BAR0"] == "match"
    assert items["device 0000:00:03.0 token"] == "match"
    assert c.result["kernel_interface"]["present"] is False          # stock kernel
    # what arm did: the stock kernel declares nothing, so no handover= word
    assert c.arm["kernel_declaration"].startswith("stock kernel")
    assert "handover=" not in c.arm["cmdline"].replace("handover.", "")
    assert c.arm["save"]["devices"] == ["0000:00:03.0"]
    assert any("MATCH:" in ln for ln in c.console_lines), _diag(c)
    for k in ("save (arm, in guest)", "kexec load (arm, in guest)", "kexec -e -> hook start",
              "hook (uptime in 2nd kernel)"):
        assert c.timings.get(k) is not None and c.timings[k] > 0, c.timings


def test_initramfs_tools_legacy_pmem_match():
    c = _cycle(kind="initramfs-tools", pmem="legacy")
    _assert_match(c, "/dev/pmem0")
    # the legacy range was handed on: the same memmap= once, and the region by address
    words = c.arm["cmdline"].split()
    assert words.count(lab.LEGACY_PMEM_MEMMAP) == 1
    assert "handover.region=phys:0x30000000" in words
    assert lab.LEGACY_PMEM_MEMMAP in c.guest.phases[1].cmdline


def test_initramfs_tools_nvdimm_devdax_match_kexec_file_load():
    c = _cycle(kind="initramfs-tools", pmem="nvdimm", kexec_mode="s")
    _assert_match(c, "/dev/dax0.0")
    assert "memmap=" not in c.arm["cmdline"]
    assert c.arm["kexec_command"][:3] == ["kexec", "-s", "-l"]


def test_dracut_legacy_pmem_match():
    c = _cycle(kind="dracut", pmem="legacy")
    _assert_match(c, "/dev/pmem0")


def test_stale_state_mismatch_reported_policy_followed_boot_continues():
    c = _cycle(kind="initramfs-tools", pmem="legacy", stale=True, policy="abort")
    assert c.reached_root, _diag(c)
    assert c.boot["rc"] == 6 and c.boot["policy"] == "abort", _diag(c)
    # stock kernel: no /sys/kernel/handover/decision, so nothing to abort; reported only
    assert c.boot["action"].startswith("none (stock kernel"), c.boot
    assert not c.result["ok"]
    bad = {v["item"]: v for v in c.result["verdicts"] if v["status"] == "mismatch"}
    assert bad["device 0000:00:03.0 BAR0"]["saved"].startswith("0xfe000000")
    assert any("MISMATCH" in ln for ln in c.console_lines), _diag(c)
    assert "handover.policy=abort" in c.guest.phases[1].cmdline


@pytest.mark.parametrize("kind", ["initramfs-tools", "dracut"])
def test_images_contain_the_hook(kind):
    try:
        e2e.ensure_tools()
        k = lab.fetch_kernel()
        img, facts = e2e.initrd(kind, k)
        plain, pfacts = e2e.initrd(kind, k, with_hook=False)
    except lab.LabUnavailable as e:
        pytest.skip(str(e))
    names = set(e2e.list_initrd(kind, img))
    want = {"usr/bin/python3.11", "usr/sbin/handover", "usr/lib/handover/handover-boot.sh",
            "usr/lib/python3/dist-packages/handover/cli/host.py",
            "usr/lib/python3/dist-packages/construct/core.py",
            "usr/lib/python3.11/encodings/utf_8.py"}
    want.add("scripts/init-premount/handover" if kind == "initramfs-tools"
             else "usr/lib/dracut/hooks/pre-mount/50-handover-pre-mount.sh")
    assert want <= names, sorted(want - names)
    assert any(n.endswith("/nd_pmem.ko") or "/nd_pmem.ko" in n for n in names)
    assert any("device_dax.ko" in n for n in names)
    assert not any("/python3.11/test/" in n or "/tkinter/" in n for n in names)
    plain_names = set(e2e.list_initrd(kind, plain))
    assert "usr/sbin/handover" not in plain_names
    print(f"\n{kind}: {pfacts['bytes'] / 1e6:.1f} MB without the hook, {facts['bytes'] / 1e6:.1f} MB "
          f"with it (+{(facts['bytes'] - pfacts['bytes']) / 1e6:.1f} MB); build "
          f"{pfacts['seconds']:.1f} s -> {facts['seconds']:.1f} s")


def test_systemd_unit_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    unit = e2e.INITRAMFS_DIR / "systemd" / "handover-save.service"
    shutil.copy2(unit, tmp_path / unit.name)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit.name)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "handover-save" not in r.stderr, r.stderr
    text = unit.read_text()
    assert "ExecStop=-/usr/bin/handover arm --on-shutdown" in text and "RemainAfterExit=yes" in text
    # the check can fail: a broken copy is refused
    (tmp_path / "broken.service").write_text(text.replace("Type=oneshot", "Type=oneshoot"))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "broken.service")],
                       capture_output=True, text=True)
    assert "oneshoot" in r.stderr
