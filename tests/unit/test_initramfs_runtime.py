"""handover.initramfs: the boot-time Python runtime, installed into a tree and run there
(chroot: the interpreter, stdlib and libraries it uses are only those that were copied)."""

import json
import os
import shutil
import subprocess

import pytest

from handover import initramfs as rt

from hosttree import TOKEN, copy_host

pytestmark = pytest.mark.skipif(not os.path.exists(rt.PYTHON) or os.geteuid() != 0
                                or not shutil.which("chroot"),
                                reason="needs Debian's python3.11 and root (chroot)")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("initramfs")
    rep = rt.install(root)
    return root, rep


def test_minimal_runtime_contents(tree):
    root, rep = tree
    assert rep["stdlib"] == "minimal" and "elftools" not in rep["packages"]
    assert (root / "usr/sbin/handover").read_text() == rt.WRAPPER
    std = root / rt.STDLIB.lstrip("/")
    assert (std / "encodings/utf_8.py").exists() and (std / "json/__init__.py").exists()
    assert not (std / "unittest").exists() and not (std / "tkinter").exists()
    assert not list((std / "lib-dynload").glob("_hashlib*"))
    assert not (root / "usr/lib/python3/dist-packages/elftools").exists()
    # much smaller than the whole stdlib
    assert rep["bytes_added"] < 40e6, rep


def test_load_runs_inside_the_tree(tree, tmp_path):
    root, _ = tree
    host = copy_host(root / "host")
    blob = root / "state.bin"
    r = subprocess.run(["chroot", str(root), rt.PYTHON, "-m", "handover", "save", "--sysroot",
                        "/host", "--output", "/state.bin", "--token", TOKEN, "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["chroot", str(root), rt.PYTHON, "-m", "handover", "load", "--region",
                        "/state.bin", "--sysroot", "/host", "--token", TOKEN, "--result-dir",
                        "/out", "--check-only"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((root / "out/result.json").read_text())["ok"]
    r = subprocess.run(["chroot", str(root), rt.PYTHON, "-m", "handover", "load", "--region",
                        "/nothing"], capture_output=True, text=True)
    assert r.returncode == 3 and "no saved state" in r.stderr
    del host, blob


def test_udev_probe_runs_inside_the_tree(tree):
    """The udev rule's program, as the initramfs's udev runs it (no environment)."""
    root, _ = tree
    probe = root / rt.UDEV_PROBE.lstrip("/")
    assert probe.read_text() == rt.udev_probe_script(rt.PYTHON) and os.access(probe, os.X_OK)
    r = subprocess.run(["chroot", str(root), rt.PYTHON, "-m", "handover", "region", "init",
                        "/udev-region.img", "--size", "1M", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    uuid = json.loads(r.stdout)["uuid"]
    chroot = shutil.which("chroot")
    r = subprocess.run([chroot, str(root), rt.UDEV_PROBE, "/udev-region.img"],
                       capture_output=True, text=True, env={})
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout.splitlines() == ["HANDOVER_REGION=1", "HANDOVER_REGION_LAYOUT=1.0",
                                     "HANDOVER_REGION_HEADERS=AB", f"HANDOVER_REGION_UUID={uuid}"]
    r = subprocess.run([chroot, str(root), rt.UDEV_PROBE, "/usr/sbin/handover"],
                       capture_output=True, text=True, env={})
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
