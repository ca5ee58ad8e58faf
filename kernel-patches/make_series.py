#!/usr/bin/env python3
"""Build the quilt-style patch series from kernel-patches/src/ and small in-tree edits.

    python kernel-patches/make_series.py --tree LINUX_GIT [--check]

LINUX_GIT is a git work tree of Debian's linux-source-6.12 (6.12.117) whose HEAD is the
unmodified source (tools/kernel.py prepares one in ~/.cache/handover-kernel). The script
resets the tree to its base commit, applies each patch's changes, commits them, and writes
``git format-patch`` output to kernel-patches/patches/ plus the quilt ``series`` file.
``--check`` instead verifies that the committed patches are what the sources produce.
The new files are copied from kernel-patches/src/ (the generated format header among
them), so the C the tests compile is exactly the C the kernel builds.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "src")
OUT = os.path.join(HERE, "patches")
BASE_TAG = "handover-base"
AUTHOR = "handover developers <handover@example.invalid>"
DATE = "Wed, 25 Nov 2026 00:00:00 +0000"


def edit(path: str, old: str, new: str, count: int = 1):
    def apply(tree: str):
        p = os.path.join(tree, path)
        with open(p) as f:
            s = f.read()
        if s.count(old) != count:
            raise SystemExit(f"make_series: {path}: anchor found {s.count(old)} times, want {count}: {old[:60]!r}")
        with open(p, "w") as f:
            f.write(s.replace(old, new))
    return apply


def copy(rel: str, dest: str | None = None):
    def apply(tree: str):
        d = os.path.join(tree, dest or rel)
        os.makedirs(os.path.dirname(d), exist_ok=True)
        shutil.copyfile(os.path.join(SRC, rel), d)
    return apply


PATCHES = [
    ("0001-lib-handover-add-the-state-format-and-a-freestanding-parser.patch",
     "lib/handover: add the handover state format and a freestanding parser",
     """The handover tool (user space) saves the IOMMU, interrupt-remapping and PCI
state of passthrough devices before a kexec. Add its format as C: the header
generated from the tool's format definitions, and a validator that the kernel
and the tool's own tests compile from the same source (no allocation, bounded,
precise error code and offset).""",
     [copy("include/linux/handover_format.h"), copy("include/linux/handover_parse.h"),
      copy("lib/handover/parse.c"), copy("lib/handover/Makefile"), copy("lib/handover/Kconfig"),
      edit("lib/Kconfig", 'source "lib/fonts/Kconfig"\n',
           'source "lib/fonts/Kconfig"\n\nsource "lib/handover/Kconfig"\n'),
      edit("lib/Makefile", "obj-$(CONFIG_CRC32)\t+= crc32.o\n",
           "obj-$(CONFIG_CRC32)\t+= crc32.o\nobj-$(CONFIG_HANDOVER) += handover/\n")]),
    ("0002-handover-reserve-the-region-and-the-ranges-of-a-valid-state.patch",
     "handover: reserve the region and the ranges of a valid state early",
     """handover=<size>@<phys> names the persistent-memory region that holds the state.
Reserve it at once; in setup_arch(), before the page allocator takes memory,
find the newest slot whose checksums verify, copy the blob to RAM, validate it
and memblock-reserve every range it lists (root, context and page tables, the
IR table, posted-interrupt descriptors). A bad state is refused with a log line,
never a panic. Report under /sys/kernel/handover/ (status, the blob, the
formats read, and a decision attribute for `handover load`), declare the format
versions read in an ELF note, and put the RAM copy in VMCOREINFO.""",
     [copy("include/linux/handover.h"), copy("lib/handover/core.c"),
      edit("arch/x86/kernel/setup.c", "#include <linux/hugetlb.h>\n",
           "#include <linux/handover.h>\n#include <linux/hugetlb.h>\n"),
      edit("arch/x86/kernel/setup.c", "\treserve_initrd();\n\n\tacpi_table_upgrade();\n",
           "\treserve_initrd();\n\n\t/* before anything allocates: the handed-over tables must stay */\n"
           "\thandover_reserve();\n\n\tacpi_table_upgrade();\n")]),
]


REG_ATTRS = r"""
/*
 * Live register values that handover save/load compare across a kexec (GSTS, RTADDR,
 * IRTA, IQA, IQH, IQT): without them user space needs debugfs or /dev/mem.
 */
#define HANDOVER_REG_ATTR(_name, _reg, _read)				\
static ssize_t _name##_show(struct device *dev,				\
			    struct device_attribute *attr, char *buf)	\
{									\
	struct intel_iommu *iommu = dev_to_intel_iommu(dev);		\
	return sysfs_emit(buf, "%llx\n", (u64)_read(iommu->reg + _reg));	\
}									\
static DEVICE_ATTR_ADMIN_RO(_name)

HANDOVER_REG_ATTR(gsts, DMAR_GSTS_REG, readl);
HANDOVER_REG_ATTR(rtaddr, DMAR_RTADDR_REG, dmar_readq);
HANDOVER_REG_ATTR(irta, DMAR_IRTA_REG, dmar_readq);
HANDOVER_REG_ATTR(iqa, DMAR_IQA_REG, dmar_readq);
HANDOVER_REG_ATTR(iqh, DMAR_IQH_REG, dmar_readq);
HANDOVER_REG_ATTR(iqt, DMAR_IQT_REG, dmar_readq);

static struct attribute *intel_iommu_attrs[] = {"""

PATCHES_EXTRA = [
    ("0003-iommu-vt-d-show-the-translation-and-remapping-registers-in-sysfs.patch",
     "iommu/vt-d: show the translation and remapping registers in sysfs",
     """User space that carries IOMMU state across a kexec (handover save / load) needs
GSTS, RTADDR, IRTA and the invalidation queue registers of each unit; sysfs
shows only VER, CAP and ECAP, and debugfs is not built on distribution
kernels. Add read-only (root) attributes with the live values.""",
     [edit("drivers/iommu/intel/iommu.c", "static struct attribute *intel_iommu_attrs[] = {", REG_ATTRS),
      edit("drivers/iommu/intel/iommu.c", "\t&dev_attr_domains_used.attr,\n\tNULL,\n",
           "\t&dev_attr_domains_used.attr,\n\t&dev_attr_gsts.attr,\n\t&dev_attr_rtaddr.attr,\n"
           "\t&dev_attr_irta.attr,\n\t&dev_attr_iqa.attr,\n\t&dev_attr_iqh.attr,\n"
           "\t&dev_attr_iqt.attr,\n\tNULL,\n")]),
]
PATCHES += PATCHES_EXTRA

PATCHES += [
    ("0004-iommu-vt-d-keep-the-interrupt-remapping-table-of-a-handed-over-state.patch",
     "iommu/vt-d: keep the interrupt-remapping table of a handed-over state",
     """A kexec leaves interrupt remapping enabled, and a kdump kernel keeps the old
entries (iommu_load_old_irte) while any other kernel disables it. Keep them
also when a validated handover state describes the unit with the same IRTA and
reserved its table before the page allocator started: devices kept alive
across the kexec go on raising interrupts through their old entries, and new
vectors get fresh indices as in kdump. Any other unit is treated as before.""",
     [edit("drivers/iommu/intel/irq_remapping.c", '#include "../irq_remapping.h"\n',
           '#include <linux/handover.h>\n\n#include "../irq_remapping.h"\n'),
      edit("drivers/iommu/intel/irq_remapping.c",
           "\tif (ir_pre_enabled(iommu)) {\n\t\tif (!is_kdump_kernel()) {\n",
           "\tif (ir_pre_enabled(iommu)) {\n\t\tif (!is_kdump_kernel() &&\n"
           "\t\t    !handover_keep_ir(iommu->name, iommu->reg_phys,\n"
           "\t\t\t\t      dmar_readq(iommu->reg + DMAR_IRTA_REG))) {\n")]),
]


PATCHES += [
    ("0005-handover-leave-DMA-translation-and-bus-mastering-on-for-keepalive-devices.patch",
     "handover: leave DMA translation and bus mastering on for keepalive devices",
     """`handover arm` names the keepalive devices in /sys/kernel/handover/keepalive.
While any is armed, the kexec shutdown path leaves VT-d translation (and
interrupt remapping) on, and does not clear bus mastering of those devices and
of the bridges above them; everything else shuts down as before. The next
kernel still decides what to adopt.""",
     [edit("drivers/iommu/intel/iommu.c", '#include <linux/crash_dump.h>\n',
           '#include <linux/crash_dump.h>\n#include <linux/handover.h>\n'),
      edit("drivers/iommu/intel/iommu.c",
           "\t/* Make sure the IOMMUs are switched off */\n\tintel_disable_iommus();\n",
           "\t/* Make sure the IOMMUs are switched off, unless devices are kept alive */\n"
           "\tif (handover_armed())\n"
           "\t\tpr_info(\"handover armed: DMA translation left on for the next kernel\\n\");\n"
           "\telse\n\t\tintel_disable_iommus();\n"),
      edit("drivers/pci/pci-driver.c", "#include <linux/kexec.h>\n",
           "#include <linux/handover.h>\n#include <linux/kexec.h>\n"),
      edit("drivers/pci/pci-driver.c",
           "\tif (kexec_in_progress && (pci_dev->current_state <= PCI_D3hot))\n",
           "\tif (kexec_in_progress && (pci_dev->current_state <= PCI_D3hot) &&\n"
           "\t    !handover_keepalive_pci(pci_dev))\n")]),
]


def git(tree: str, *args: str, **kw) -> str:
    return subprocess.run(["git", "-C", tree, *args], check=True, capture_output=True, text=True,
                          **kw).stdout


def build(tree: str, out: str) -> list[str]:
    base = git(tree, "rev-list", "--max-parents=0", "HEAD").split()[0]
    git(tree, "checkout", "-q", "-f", base)
    git(tree, "clean", "-q", "-f", "-d", "lib/handover", "include/linux")
    env = dict(os.environ, GIT_AUTHOR_DATE=DATE, GIT_COMMITTER_DATE=DATE)
    name, email = AUTHOR.rsplit(" <", 1)
    for fname, subject, body, steps in PATCHES:
        for step in steps:
            step(tree)
        git(tree, "add", "-f", "-A", "lib", "include", "arch", "drivers")
        subprocess.run(["git", "-C", tree, "-c", f"user.name={name}", "-c", f"user.email={email[:-1]}",
                        "commit", "-q", "-m", f"{subject}\n\n{body}"], check=True, env=env)
    os.makedirs(out, exist_ok=True)
    files = subprocess.run(["git", "-C", tree, "format-patch", "--no-signature", "--zero-commit",
                            "--no-numbered", "-o", out, f"{base}..HEAD"], check=True,
                           capture_output=True, text=True).stdout.split()
    names = []
    for fpath, (want, *_r) in zip(files, PATCHES):
        dst = os.path.join(out, want)
        if fpath != dst:
            os.replace(fpath, dst)
        names.append(want)
    with open(os.path.join(out, "series"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    git(tree, "checkout", "-q", "-f", base)
    git(tree, "clean", "-q", "-f", "-d", "lib/handover")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--tree", required=True)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.check:
        import tempfile

        tmp = tempfile.mkdtemp()
        build(a.tree, tmp)
        bad = 0
        for n in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, n)) as f1:
                got = f1.read()
            try:
                with open(os.path.join(OUT, n)) as f2:
                    have = f2.read()
            except FileNotFoundError:
                have = None
            if got != have:
                print(f"{n}: not current: run make_series.py", file=sys.stderr)
                bad = 1
        shutil.rmtree(tmp)
        return bad
    for n in build(a.tree, OUT):
        print(f"wrote patches/{n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
