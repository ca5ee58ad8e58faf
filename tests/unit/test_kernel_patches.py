"""The kernel patch series carries exactly the C that the tests compile.

kernel-patches/src/ holds the files the host tests compile too (the generated format and
region headers, the freestanding parser): the series must create exactly those, byte for
byte (so the parser the differential tests check is the one the kernel builds). Building
each patch and booting the kernel are the kernel tests (tests/system/, `make test-kernel`).
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
    src_files = sorted(os.path.relpath(os.path.join(d, n), os.path.join(KP, "src"))
                       for d, _x, fs in os.walk(os.path.join(KP, "src")) for n in fs)
    assert "lib/handover/parse.c" in src_files and "include/linux/handover_region.h" in src_files
    for rel in src_files:
        made = os.path.join(tmp_path, rel)
        assert os.path.exists(made), f"the series does not create {rel}"
        assert filecmp.cmp(made, os.path.join(KP, "src", rel), shallow=False), rel


def test_patches_are_signed_off_and_documented():
    """Each patch says who signed it off; the sysfs ABI and the parameter are documented."""
    with open(os.path.join(KP, "patches", "series")) as f:
        series = [ln.strip() for ln in f if ln.strip()]
    text = ""
    for p in series:
        with open(os.path.join(KP, "patches", p)) as f:
            body = f.read()
        assert "\nSigned-off-by: " in body.split("\n---\n", 1)[0], p
        text += body
    assert "+++ b/Documentation/ABI/testing/sysfs-kernel-handover" in text
    assert "+\thandover=\t[X86,PCI,IOMMU]" in text
    # what modules call is exported
    for sym in ("handover_pci_held", "handover_pci_open", "handover_pci_may_open"):
        assert f"+EXPORT_SYMBOL_GPL({sym});" in text, sym
