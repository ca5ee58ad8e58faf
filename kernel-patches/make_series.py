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
versions read in an ELF note, and put the RAM copy in VMCOREINFO.

The same file keeps the state's keepalive devices for the patches that act on
them: the old kernel's arming list (0005), and in the new kernel which devices
are held, adopted or released and why, the owner-token check and the release
path (0006, 0007); until those patches are applied nothing calls it, apart
from the PCI fixups that stop a device left bus-mastering by a previous
kernel on a handover boot.""",
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
reserved its table before the page allocator started, and the unit's
capabilities are the saved ones: devices kept alive
across the kexec go on raising interrupts through their old entries, and new
vectors get fresh indices as in kdump. Any other unit is treated as before.""",
     [edit("drivers/iommu/intel/irq_remapping.c", '#include "../irq_remapping.h"\n',
           '#include <linux/handover.h>\n\n#include "../irq_remapping.h"\n'),
      edit("drivers/iommu/intel/irq_remapping.c",
           "\tif (ir_pre_enabled(iommu)) {\n\t\tif (!is_kdump_kernel()) {\n",
           "\tif (ir_pre_enabled(iommu)) {\n\t\tif (!is_kdump_kernel() &&\n"
           "\t\t    !handover_keep_ir(iommu->name, iommu->reg_phys, iommu->cap, iommu->ecap,\n"
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


ADOPT_TABLES = """/*
 * handover: adopt in place the root table the previous kernel left translating, for the
 * keepalive devices of a validated state (handover_keep_dma() checked the unit, RTADDR and
 * that the root table was reserved before the page allocator started). Their context
 * entries stay exactly as they are, marked copied, their domain IDs reserved; every other
 * entry, and the root entry of every bus whose context table was not reserved, is cleared,
 * so those devices start from fresh state. Legacy mode only. Returns the entries kept.
 */
static int handover_adopt_tables(struct intel_iommu *iommu)
{
	u64 rtaddr = dmar_readq(iommu->reg + DMAR_RTADDR_REG);
	struct root_entry *rt;
	int bus, devfn, kept = 0;

	if ((rtaddr & DMA_RTADDR_SMT) || sm_supported(iommu))
		return -EOPNOTSUPP;
	iommu->copied_tables = bitmap_zalloc(BIT_ULL(16), GFP_KERNEL);
	if (!iommu->copied_tables)
		return -ENOMEM;
	rt = phys_to_virt(rtaddr & VTD_PAGE_MASK);
	for (bus = 0; bus < 256; bus++) {
		phys_addr_t ctp = root_entry_lctp(&rt[bus]);
		struct context_entry *ce;

		if (!ctp)
			continue;
		if (!handover_keep_context_table(ctp)) {
			rt[bus].lo = rt[bus].hi = 0;
			continue;
		}
		ce = phys_to_virt(ctp);
		for (devfn = 0; devfn < 256; devfn++) {
			if (!context_present(&ce[devfn]))
				continue;
			if (handover_keep_context(iommu->name, iommu->segment, bus, devfn,
						  ce[devfn].lo, ce[devfn].hi)) {
				set_bit(context_domain_id(&ce[devfn]), iommu->domain_ids);
				set_context_copied(iommu, bus, devfn);
				kept++;
			} else {
				context_clear_entry(&ce[devfn]);
			}
		}
		__iommu_flush_cache(iommu, ce, VTD_PAGE_SIZE);
	}
	if (!kept) {
		pr_warn("%s: handover: no keepalive context entry to adopt\\n", iommu->name);
		return -ENOENT;
	}
	iommu_free_page(iommu->root_entry);
	iommu->root_entry = rt;
	__iommu_flush_cache(iommu, rt, VTD_PAGE_SIZE);
	return kept;
}

/* handover release of an adopted device: drop its old context entry (fresh state on attach) */
static void handover_release_context(struct pci_dev *pdev)
{
	struct device_domain_info *info = dev_iommu_priv_get(&pdev->dev);
	struct intel_iommu *iommu = info ? info->iommu : NULL;
	struct context_entry *context;

	if (!iommu)
		return;
	spin_lock(&iommu->lock);
	context = iommu_context_addr(iommu, info->bus, info->devfn, 1);
	if (context)
		copied_context_tear_down(iommu, context, info->bus, info->devfn);
	spin_unlock(&iommu->lock);
}

static int __init init_dmars(void)
{"""

CONTEXT_HELD = """/*
 * handover: the context entry of a keepalive device, adopted from the previous kernel,
 * goes on translating with the old tables whatever domain is attached, until the
 * handover releases the device.
 */
static bool context_held(struct intel_iommu *iommu, u8 bus, u8 devfn)
{
	return !is_kdump_kernel() && context_copied(iommu, bus, devfn) &&
	       handover_context_held(iommu->segment, bus, devfn);
}

static void copied_context_tear_down(struct intel_iommu *iommu,"""

TAKE_IRTE = """/*
 * handover: a held keepalive device sets up its MSI or MSI-X vector again (its new
 * owner enabled interrupts): give the vector the IRTE index it had in the previous
 * kernel. The entry is still allocated (the adopted table's present entries are), so the
 * device's remappable message keeps its handle and its interrupts go on arriving through
 * the same entry, which now points at the new vector. Single-vector allocations only.
 */
static int handover_take_irte(struct intel_iommu *iommu, struct irq_2_iommu *irq_iommu,
			      struct irq_alloc_info *info, unsigned int nr_irqs)
{
	unsigned long flags;
	int index;

	if (is_kdump_kernel() || nr_irqs != 1 || !info->desc ||
	    (info->type != X86_IRQ_ALLOC_TYPE_PCI_MSI &&
	     info->type != X86_IRQ_ALLOC_TYPE_PCI_MSIX))
		return -1;
	index = handover_irte_index(msi_desc_to_pci_dev(info->desc), iommu->reg_phys,
				    info->type == X86_IRQ_ALLOC_TYPE_PCI_MSIX,
				    info->desc->msi_index);
	if (index < 0 || index >= INTR_REMAP_TABLE_ENTRIES)
		return -1;
	raw_spin_lock_irqsave(&irq_2_ir_lock, flags);
	if (!test_bit(index, iommu->ir_table->bitmap)) {
		index = -1;	/* freed since: allocate as usual */
	} else {
		irq_iommu->iommu = iommu;
		irq_iommu->irte_index = index;
		irq_iommu->sub_handle = 0;
		irq_iommu->irte_mask = 0;
	}
	raw_spin_unlock_irqrestore(&irq_2_ir_lock, flags);
	return index;
}"""

I = "drivers/iommu/intel/iommu.c"
R = "drivers/iommu/intel/irq_remapping.c"
PATCHES += [
    ("0006-iommu-vt-d-adopt-the-tables-of-keepalive-devices-in-place.patch",
     "iommu/vt-d: adopt the DMA and IR tables of keepalive devices in place",
     """When the previous kernel left translation on (a handover was armed) and a
validated state describes the unit with the same register base, capabilities
and RTADDR, and reserved the root table: keep translation on and adopt the
root table in place. In it, keep exactly the context entries of keepalive
devices that equal the saved ones and whose context and page tables were
reserved; mark them copied and reserve their domain IDs. Every other entry is
cleared, so other devices get fresh state, attached at probe (only adopted
devices defer their attach). An adopted entry survives later attaches (default
domain, vfio's domain) until the handover releases the device. A held device
whose entry was not adopted is released. The IR table a validated state kept
(0004) is likewise adopted in place, so IRTA and the IRTEs keepalive devices
signal through stay where the state recorded them, and when a held device's
new owner sets up an MSI or MSI-X vector again, the vector gets the IRTE index
it had before: the device's message keeps its handle. debugfs shows copied
(adopted or kdump) context entries: they are what the hardware uses.
Legacy (non-scalable) mode only; kdump is unchanged.""",
     [edit(I, "\treturn translation_pre_enabled(info->iommu) && !info->domain;\n",
           "\treturn translation_pre_enabled(info->iommu) && !info->domain &&\n"
           "\t       (is_kdump_kernel() || context_copied(info->iommu, info->bus, info->devfn));\n"),
      edit(I, """	ret = 0;
	if (context_present(context) && !context_copied(iommu, bus, devfn))
		goto out_unlock;

	copied_context_tear_down(iommu, context, bus, devfn);
	context_clear_entry(context);

	context_set_domain_id(context, did);
""", """	ret = 0;
	if (context_present(context) && !context_copied(iommu, bus, devfn))
		goto out_unlock;
	if (context_held(iommu, bus, devfn))
		goto out_unlock;

	copied_context_tear_down(iommu, context, bus, devfn);
	context_clear_entry(context);

	context_set_domain_id(context, did);
"""),
      edit(I, """	if (context_present(context) && !context_copied(iommu, bus, devfn)) {
		spin_unlock(&iommu->lock);
		return 0;
	}

	copied_context_tear_down(iommu, context, bus, devfn);
	context_clear_entry(context);
	context_set_domain_id(context, FLPT_DEFAULT_DID);
""", """	if ((context_present(context) && !context_copied(iommu, bus, devfn)) ||
	    context_held(iommu, bus, devfn)) {
		spin_unlock(&iommu->lock);
		return 0;
	}

	copied_context_tear_down(iommu, context, bus, devfn);
	context_clear_entry(context);
	context_set_domain_id(context, FLPT_DEFAULT_DID);
"""),
      edit(I, "static void copied_context_tear_down(struct intel_iommu *iommu,", CONTEXT_HELD),
      edit(I, "static int __init init_dmars(void)\n{", ADOPT_TABLES),
      edit(I, """		if (translation_pre_enabled(iommu) && !is_kdump_kernel()) {
			iommu_disable_translation(iommu);""", """		if (translation_pre_enabled(iommu) && !is_kdump_kernel() &&
		    !handover_keep_dma(iommu->name, iommu->reg_phys, iommu->cap, iommu->ecap,
				       dmar_readq(iommu->reg + DMAR_RTADDR_REG))) {
			iommu_disable_translation(iommu);"""),
      edit(I, """			pr_info("Translation already enabled - trying to copy translation structures\\n");

			ret = copy_translation_tables(iommu);
			if (ret) {""", """			pr_info("Translation already enabled - trying to copy translation structures\\n");

			if (is_kdump_kernel()) {
				ret = copy_translation_tables(iommu);
			} else {
				ret = handover_adopt_tables(iommu);
				if (ret > 0) {
					pr_info("%s: adopted the root table of the previous kernel in place (%d keepalive context entries)\\n",
						iommu->name, ret);
					handover_register_iommu_release(handover_release_context);
				}
				ret = ret > 0 ? 0 : ret;
			}
			if (ret) {"""),
      edit(I, """		intel_svm_check(iommu);
	}
""", """		intel_svm_check(iommu);
	}

	/* a keepalive device whose translation was not adopted must not run on */
	handover_release_unadopted();
"""),
      edit(R, """	irt_phys = irta & VTD_PAGE_MASK;
	size     = INTR_REMAP_TABLE_ENTRIES*sizeof(struct irte);

	/* Map the old IR table */""", """	irt_phys = irta & VTD_PAGE_MASK;
	size     = INTR_REMAP_TABLE_ENTRIES*sizeof(struct irte);

	/*
	 * handover (not kdump): the table was reserved before the page allocator started
	 * and handover_keep_ir() checked it; adopt it in place, so the IRTEs keepalive
	 * devices signal through never move, and IRTA stays what the state recorded.
	 */
	if (!is_kdump_kernel()) {
		iommu_free_pages(iommu->ir_table->base, INTR_REMAP_PAGE_ORDER);
		iommu->ir_table->base = phys_to_virt(irt_phys);
		goto mark_used;
	}

	/* Map the old IR table */"""),
      edit(R, """	__iommu_flush_cache(iommu, iommu->ir_table->base, size);

	/*
	 * Now check the table for used entries and mark those as
	 * allocated in the bitmap
	 */""", """	__iommu_flush_cache(iommu, iommu->ir_table->base, size);
	memunmap(old_ir_table);

mark_used:
	/*
	 * Now check the table for used entries and mark those as
	 * allocated in the bitmap
	 */"""),
      edit(R, """			bitmap_set(iommu->ir_table->bitmap, i, 1);
	}

	memunmap(old_ir_table);

	return 0;""", """			bitmap_set(iommu->ir_table->bitmap, i, 1);
	}

	return 0;"""),
      edit(R, "static int qi_flush_iec(struct intel_iommu *iommu, int index, int mask)\n{",
           TAKE_IRTE + "\n\nstatic int qi_flush_iec(struct intel_iommu *iommu, int index, int mask)\n{"),
      edit(R, """	index = alloc_irte(iommu, &data->irq_2_iommu, nr_irqs);
	if (index < 0) {""", """	index = handover_take_irte(iommu, &data->irq_2_iommu, info, nr_irqs);
	if (index < 0)
		index = alloc_irte(iommu, &data->irq_2_iommu, nr_irqs);
	if (index < 0) {"""),
      edit("drivers/iommu/intel/debugfs.c", """		context = iommu_context_addr(iommu, bus, devfn, 0);
		if (!context)
			return;

		if (!context_present(context))
			continue;

		tbl_wlk.bus = bus;""", """		/*
		 * An entry copied from the previous kernel (kdump, or adopted by a
		 * handover) is what the hardware uses: show it too. Its table exists,
		 * so asking to "allocate" only looks it up.
		 */
		context = iommu_context_addr(iommu, bus, devfn,
					     context_copied(iommu, bus, devfn));
		if (!context)
			return;

		if (!context_present(context))
			continue;

		tbl_wlk.bus = bus;""")]),
]

V = "drivers/vfio/pci/vfio_pci_core.c"
M = "drivers/pci/msi/pcidev_msi.c"
P = "drivers/pci/probe.c"
PATCHES += [
    ("0007-PCI-vfio-pci-leave-keepalive-devices-running-and-check-their-owner.patch",
     "PCI, vfio-pci: leave keepalive devices running, and let only their owner open them",
     """A keepalive device of a validated handover state, found at enumeration with
its saved identity (vendor, device, class, revision) and BARs, is held
(lib/handover/core.c, an early fixup): its BARs are taken from the state and
marked fixed instead of being sized by writing them, and its MSI/MSI-X enable
bits are left set. A held device is not reset, not stripped of bus mastering
and not put into idle D3 by vfio-pci, and opening it through a vfio group
requires the previous owner's token (vf_token=<uuid>, checked against the
salted SHA-256 in the state); an open by any other path (the iommufd cdev
has no token argument) is refused until the token was accepted.

A device the previous kernel left bus-mastering that is not held (among
others: its BARs no longer decode where the state says, or the IR table its
vectors used was not kept), a held device whose BARs could not be claimed,
and a held device released because `handover load` aborted or its
translation was not adopted, is stopped (bus mastering, MSI, MSI-X off) and
reset when it has a reset method. The bookkeeping is in lib/handover/core.c
(patch 0002).""",
     [edit(P, "#include <linux/hypervisor.h>\n", "#include <linux/handover.h>\n#include <linux/hypervisor.h>\n"),
      edit(P, """	for (pos = 0; pos < howmany; pos++) {
		struct resource *res = &dev->resource[pos];
		reg = PCI_BASE_ADDRESS_0 + (pos << 2);
		pos += __pci_read_base(dev, pci_bar_unknown, res, reg);
	}

	if (rom) {
		struct resource *res = &dev->resource[PCI_ROM_RESOURCE];
		dev->rom_base_reg = rom;
""", """	for (pos = 0; pos < howmany; pos++) {
		struct resource *res = &dev->resource[pos];
		reg = PCI_BASE_ADDRESS_0 + (pos << 2);
		/* a keepalive device: no sizing writes, the BAR comes from the state */
		if (handover_pci_bar(dev, pos, res)) {
			pos += !!(res->flags & IORESOURCE_MEM_64);
			continue;
		}
		pos += __pci_read_base(dev, pci_bar_unknown, res, reg);
	}

	if (rom) {
		struct resource *res = &dev->resource[PCI_ROM_RESOURCE];
		dev->rom_base_reg = rom;
		if (handover_pci_bar(dev, PCI_ROM_RESOURCE, res))
			return;
"""),
      edit(M, '#include "../pci.h"\n', '#include <linux/handover.h>\n#include "../pci.h"\n'),
      edit(M, """	pci_read_config_word(dev, dev->msi_cap + PCI_MSI_FLAGS, &ctrl);
	if (ctrl & PCI_MSI_FLAGS_ENABLE) {""", """	pci_read_config_word(dev, dev->msi_cap + PCI_MSI_FLAGS, &ctrl);
	/* a keepalive device goes on signalling through its handed-over IRTEs */
	if ((ctrl & PCI_MSI_FLAGS_ENABLE) && !handover_pci_held(dev)) {"""),
      edit(M, """	pci_read_config_word(dev, dev->msix_cap + PCI_MSIX_FLAGS, &ctrl);
	if (ctrl & PCI_MSIX_FLAGS_ENABLE) {""", """	pci_read_config_word(dev, dev->msix_cap + PCI_MSIX_FLAGS, &ctrl);
	if ((ctrl & PCI_MSIX_FLAGS_ENABLE) && !handover_pci_held(dev)) {"""),
      edit(V, "#include <linux/iommufd.h>\n", "#include <linux/iommufd.h>\n#include <linux/handover.h>\n"),
      edit(V, """	if (!vdev->disable_idle_d3) {
		ret = pm_runtime_resume_and_get(&pdev->dev);
		if (ret < 0)
			return ret;
	}

	/* Don't allow our initial saved state to include busmaster */
	pci_clear_master(pdev);

	ret = pci_enable_device(pdev);
	if (ret)
		goto out_power;

	/* If reset fails because of the device lock, fail this path entirely */
	ret = pci_try_reset_function(pdev);
	if (ret == -EAGAIN)
		goto out_disable_device;
""", """	/* a keepalive device: only once its owner presented the token */
	if (!handover_pci_may_open(pdev))
		return -EPERM;

	if (!vdev->disable_idle_d3) {
		ret = pm_runtime_resume_and_get(&pdev->dev);
		if (ret < 0)
			return ret;
	}

	/* Don't allow our initial saved state to include busmaster */
	if (!handover_pci_held(pdev))
		pci_clear_master(pdev);

	ret = pci_enable_device(pdev);
	if (ret)
		goto out_power;

	/* If reset fails because of the device lock, fail this path entirely */
	if (handover_pci_held(pdev)) {
		/* kept alive across kexec: its DMA and interrupts are in flight */
		pci_info(pdev, "handover: keepalive device opened without a reset\\n");
		ret = -EBUSY;
	} else {
		ret = pci_try_reset_function(pdev);
	}
	if (ret == -EAGAIN)
		goto out_disable_device;
"""),
      edit(V, "\tvdev->disable_idle_d3 = disable_idle_d3;\n",
           "\t/* a keepalive device is never put into D3 while idle */\n"
           "\tvdev->disable_idle_d3 = disable_idle_d3 || handover_pci_held(vdev->pdev);\n"),
      edit(V, """	ret = vfio_pci_validate_vf_token(vdev, vf_token, &uuid);
	if (ret)
		return ret;

	return 1; /* Match */""", """	/* a keepalive device: only its previous owner, with its token, may open it */
	ret = handover_pci_open(vdev->pdev, vf_token ? uuid.b : NULL);
	if (ret)
		return ret;

	ret = vfio_pci_validate_vf_token(vdev, vf_token, &uuid);
	if (ret)
		return ret;

	return 1; /* Match */""")]),
]


def git(tree: str, *args: str, **kw) -> str:
    return subprocess.run(["git", "-C", tree, *args], check=True, capture_output=True, text=True,
                          **kw).stdout


def build(tree: str, out: str) -> list[str]:
    base = git(tree, "rev-list", "--max-parents=0", "HEAD").split()[0]
    git(tree, "checkout", "-q", "-f", base)
    git(tree, "clean", "-q", "-f", "-d", "-x", "lib/handover", "include/linux")
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
    git(tree, "clean", "-q", "-f", "-d", "-x", "lib/handover", "include/linux")
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
