"""The kernel patch series carries exactly the C that the tests compile.

The new files of kernel-patches/patches/ must equal kernel-patches/src/ (so the parser the
differential tests check is the one the kernel builds, and the format header in the series
is the generated one). Applying the whole series to Debian's linux-source-6.12 and booting
it is the kernel test (tests/system/test_kernel_handover.py, its own command).
"""

import filecmp
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KP = os.path.join(ROOT, "kernel-patches")


def test_series_lists_every_patch():
    with open(os.path.join(KP, "patches", "series")) as f:
        series = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    on_disk = sorted(n for n in os.listdir(os.path.join(KP, "patches")) if n.endswith(".patch"))
    assert series == on_disk and series


def test_new_files_in_the_series_equal_the_sources(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with open(os.path.join(KP, "patches", "series")) as f:
        series = [ln.strip() for ln in f if ln.strip()]
    for p in series:
        subprocess.run(["git", "-C", str(tmp_path), "apply", "--include=include/linux/handover*",
                        "--include=lib/handover/*", os.path.join(KP, "patches", p)], check=True)
    added = []
    for dirpath, _d, files in os.walk(tmp_path):
        if ".git" in dirpath:
            continue
        for n in files:
            rel = os.path.relpath(os.path.join(dirpath, n), tmp_path)
            added.append(rel)
            assert filecmp.cmp(os.path.join(tmp_path, rel), os.path.join(KP, "src", rel), shallow=False), rel
    src_files = sorted(os.path.relpath(os.path.join(d, n), os.path.join(KP, "src"))
                       for d, _x, fs in os.walk(os.path.join(KP, "src")) for n in fs)
    assert sorted(added) == src_files
