"""The udev rule that makes the region's device root:root 0600
(initramfs/udev/60-handover-region.rules): its keys, its installation by install.sh and the
initramfs integrations, and the rule run by the real ``udevadm test`` (in a private mount
namespace, over a loop device's sysfs entry) when this host can.  The probe it runs:
test_pmem_udev.py."""

import grp
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import handover.pmem as pmem
from handover import initramfs as rt

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "initramfs" / "udev" / rt.UDEV_RULES
MB = 1 << 20


@pytest.fixture
def region(tmp_path):
    """A 4 MiB region file made by ``region init``; (path, uuid)."""
    p = tmp_path / "region.img"
    info = pmem.init(p, size=4 * MB)
    return p, info["uuid"]


@pytest.fixture
def probe_program(tmp_path):
    """The program udev runs, written for this interpreter (as install.sh does)."""
    return str(rt.install_udev_probe(tmp_path / "root", sys.executable))


TOKEN = re.compile(r'\s*([A-Z]+(?:\{[^}]*\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(,|$)')


def parse_rules(text: str) -> list[list[tuple[str, str, str]]]:
    """udev rules as lists of (key, operator, value); raises on a line udev would reject."""
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.endswith("\\"), f"line {n}: continuation lines are not used here"
        pos, toks = 0, []
        while pos < len(line):
            m = TOKEN.match(line, pos)
            assert m, f"line {n}: cannot parse at {line[pos:]!r}"
            toks.append(m.group(1, 2, 3))
            pos = m.end()
        rules.append(toks)
    return rules


def test_rule_file():
    rules = parse_rules(RULES.read_text())
    keys = {k for r in rules for k, _op, _v in r}
    assert keys <= {"ACTION", "SUBSYSTEM", "KERNEL", "ENV{DEVNAME}", "ENV{HANDOVER_REGION}",
                    "TEST", "IMPORT{program}", "OWNER", "GROUP", "MODE", "GOTO", "LABEL"}, keys
    labels = [v for r in rules for k, _op, v in r if k == "LABEL"]
    gotos = {v for r in rules for k, _op, v in r if k == "GOTO"}
    assert len(labels) == len(set(labels)) and gotos <= set(labels)
    # the probe runs for pmem block devices and device-dax devices only, never on remove
    assert [("ACTION", "==", "remove"), ("GOTO", "=", "handover_region_end")] in rules
    entries = {(r[0][2], r[1][2]) for r in rules if [k for k, _o, _v in r] == ["SUBSYSTEM", "KERNEL", "GOTO"]}
    assert entries == {("block", "pmem*"), ("dax", "dax*")}
    imp = [v for r in rules for k, _op, v in r if k == "IMPORT{program}"]
    assert imp == [f"{rt.UDEV_PROBE} $devnode"]
    assert [("TEST", "!=", rt.UDEV_PROBE), ("GOTO", "=", "handover_region_end")] in rules
    # root:root 0600, final (":="), and only when the probe said so
    assert [("ENV{HANDOVER_REGION}", "==", "1"), ("OWNER", ":=", "root"), ("GROUP", ":=", "root"),
            ("MODE", ":=", "0600")] in rules
    assert all(op == "==" or k in ("GOTO", "LABEL", "IMPORT{program}") or op == ":="
               for r in rules for k, op, _v in r if k not in ("ENV{DEVNAME}", "TEST"))


def test_rule_file_udevadm_verify():
    """systemd >= 253 checks rule files itself (Debian 12's 252 has no ``udevadm verify``)."""
    if not shutil.which("udevadm"):
        pytest.skip("no udevadm")
    r = subprocess.run(["udevadm", "verify", "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("udevadm has no verify (systemd < 253)")
    r = subprocess.run(["udevadm", "verify", "--resolve-names=never", str(RULES)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_sh_installs_rule_and_probe(tmp_path):
    dest = tmp_path / "dest"
    r = subprocess.run(["sh", str(ROOT / "initramfs/install.sh"), sys.executable],
                       env=dict(os.environ, DESTROOT=str(dest)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rule = dest / "usr/lib/udev/rules.d" / rt.UDEV_RULES
    assert rule.read_text() == RULES.read_text() and stat.S_IMODE(rule.stat().st_mode) == 0o644
    probe = dest / rt.UDEV_PROBE.lstrip("/")
    assert probe.read_text() == rt.udev_probe_script(sys.executable)
    assert stat.S_IMODE(probe.stat().st_mode) == 0o755


def test_initramfs_integrations_carry_the_rule():
    hook = (ROOT / "initramfs/initramfs-tools/hooks/handover").read_text()
    assert f'cp "$d/{rt.UDEV_RULES}" "$DESTDIR/usr/lib/udev/rules.d/"' in hook
    assert "for d in /etc/udev/rules.d /usr/lib/udev/rules.d /lib/udev/rules.d; do" in hook
    dracut = (ROOT / "initramfs/dracut/90handover/module-setup.sh").read_text()
    install = dracut[dracut.index("install() {"):]
    # after the runtime, which wrote the probe for the initramfs's interpreter
    assert install.index("handover.initramfs install") < install.index(f"inst_rules {rt.UDEV_RULES}")


def test_initramfs_runtime_writes_the_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "install_python", lambda *a, **k: None)
    monkeypatch.setattr(rt, "install_packages", lambda *a, **k: None)
    rt.install(tmp_path)
    p = tmp_path / rt.UDEV_PROBE.lstrip("/")
    assert p.read_text() == rt.udev_probe_script(rt.PYTHON) and os.access(p, os.X_OK)
    assert p.read_text().startswith("#!/usr/bin/python3.11 -I\n")


# --- the real udev -------------------------------------------------------------------------

def _loop_device():
    for d in sorted(Path("/sys/class/block").glob("loop[0-9]*")):
        if (d / "dev").exists():
            return d.name, (d / "dev").read_text().strip()
    return None


UDEV_SCRIPT = r"""set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/udev/rules.d
cp "$RULES_DIR"/*.rules /run/udev/rules.d/
mount -t tmpfs tmpfs /dev
mknod -m 666 /dev/null c 1 3
mknod -m 660 "/dev/$DEV" b "$MAJ" "$MIN"
chgrp disk "/dev/$DEV" 2>/dev/null || chgrp 6 "/dev/$DEV"
udevadm test --action="$ACTION" "/sys/class/block/$DEV"
stat -c '%a %u %g' "/dev/$DEV" > "$STAT_OUT"
"""


def _udevadm_test(tmp_path, rule_text, action="add", extra=None):
    """``udevadm test`` of the loop device with RULE_TEXT (and EXTRA rules) in a private
    mount namespace: tmpfs on /run (the udev database) and /dev (its own node of the loop
    device), so nothing of the host changes.  Returns (properties, log, node stat)."""
    name, devnum = _loop_device()
    rules = Path(tempfile.mkdtemp(dir=tmp_path, prefix="rules-"))
    (rules / rt.UDEV_RULES).write_text(rule_text)
    for fname, text in (extra or {}).items():
        (rules / fname).write_text(text)
    out = rules / "stat"
    maj, mi = devnum.split(":")
    env = dict(os.environ, RULES_DIR=str(rules), DEV=name, MAJ=maj, MIN=mi, ACTION=action,
               STAT_OUT=str(out))
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", UDEV_SCRIPT],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    props = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if re.match(r"^[A-Z_]+=", ln))
    return props, r.stderr, out.read_text().split()


needs_udev = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("udevadm") or not shutil.which("unshare")
    or _loop_device() is None,
    reason="needs root, udevadm, unshare and a loop device (udevadm test in a namespace)")


def _rule_for(probe_program: str, name: str, devnode: str | None = None) -> str:
    """The shipped rule for the loop device NAME and this test's probe; with DEVNODE the probe
    reads that file instead of the node (a region without a pmem device)."""
    text = RULES.read_text().replace('KERNEL=="pmem*"', f'KERNEL=="pmem*|{name}"', 1)
    text = text.replace(rt.UDEV_PROBE, probe_program)
    return text.replace("$devnode", devnode) if devnode else text


def _our_log(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if rt.UDEV_RULES in ln]


@needs_udev
def test_udev_parses_the_rule_as_shipped(tmp_path):
    """No pmem device here: the rule matches nothing, but udev reads it without a complaint."""
    props, log, _ = _udevadm_test(tmp_path, RULES.read_text())
    ours = _our_log(log)
    assert ours and all("Reading rules file" in ln for ln in ours), ours
    assert not any(k.startswith("HANDOVER") for k in props)


@needs_udev
@pytest.mark.parametrize("action", ["add", "change"])
def test_udev_makes_a_region_root_0600(tmp_path, probe_program, region, action):
    name, _ = _loop_device()
    # a later rule that would loosen it again: ":=" wins
    loosen = {"99-loosen.rules": f'KERNEL=="{name}", GROUP="disk", MODE="0666"\n'}
    props, log, st = _udevadm_test(tmp_path, _rule_for(probe_program, name, str(region[0])),
                                   action, loosen)
    assert props["HANDOVER_REGION"] == "1" and props["HANDOVER_REGION_UUID"] == region[1]
    assert props["HANDOVER_REGION_HEADERS"] == "AB"
    assert st == ["600", "0", "0"], log[-3000:]
    assert not [ln for ln in _our_log(log) if re.search(r"(?i)invalid|error|fail", ln)]


@needs_udev
def test_udev_leaves_other_devices_alone(tmp_path, probe_program):
    name, _ = _loop_device()
    zero = tmp_path / "zero"
    zero.write_bytes(bytes(16384))
    props, log, st = _udevadm_test(tmp_path, _rule_for(probe_program, name, str(zero)))
    assert not any(k.startswith("HANDOVER") for k in props)
    assert st == ["660", "0", str(grp.getgrnam("disk").gr_gid)], st    # 50-udev-default
    assert any("Importing properties" in ln for ln in _our_log(log))


@needs_udev
def test_udev_passes_the_device_node(tmp_path, probe_program):
    """$devnode as shipped: the probe gets the node (the namespace's node of the loop device,
    not a region: no keys)."""
    name, _ = _loop_device()
    props, log, _ = _udevadm_test(tmp_path, _rule_for(probe_program, name))
    assert f"'{probe_program} /dev/{name}'" in "\n".join(_our_log(log))
    assert not any(k.startswith("HANDOVER") for k in props)
