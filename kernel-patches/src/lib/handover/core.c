// SPDX-License-Identifier: GPL-2.0-only
/*
 * core.c - early reservation, validation and sysfs reporting of the handover state.
 *
 * handover=<size>@<phys>
 *	The persistent-memory region that holds the state (the same range that a legacy
 *	memmap=<size>!<phys> or an NVDIMM namespace exposes). The region is reserved at once.
 *	In setup_arch(), after the direct map exists and before the page allocator takes
 *	memory, handover_reserve() maps the two region header copies, picks the newest slot
 *	whose header and blob CRCs verify (falling back to the older one), copies the blob to
 *	RAM, validates it and, if it is valid, memblock-reserves every RESERVED range it lists.
 *	A bad state is refused with a log line and a status, never a panic.
 *
 * /sys/kernel/handover/
 *	status    (0444) what was found, one "key: value" per line
 *	blob      (0400) the validated RAM copy of the state
 *	formats   (0444) the format versions this kernel reads
 *	decision  (0644) "accept" or "abort": written by `handover load` in the initramfs
 *	keepalive (0644) on the old kernel: the devices a kexec must leave running
 */
#define pr_fmt(fmt) "handover: " fmt

#include <crypto/algapi.h>
#include <crypto/sha2.h>
#include <linux/bitmap.h>
#include <linux/crc32.h>
#include <linux/elfnote.h>
#include <linux/handover.h>
#include <linux/handover_parse.h>
#include <linux/init.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/kobject.h>
#include <linux/memblock.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/string.h>
#include <linux/sysfs.h>
#include <linux/vmcore_info.h>
#include <asm/early_ioremap.h>

/* The format versions this kernel reads, for `handover check-kernel`: desc = major << 16 | minor */
ELFNOTE32("Handover", 1, (HO_READ_MAJOR << 16) | HO_FORMAT_MINOR);

/* region layout 1.0 (handover/pmem/layout.py) */
#define HOVR_REGION_MAGIC	"HOVRREGN"
#define HOVR_HDR_SIZE		512
#define HOVR_HDR_BLOCK		4096
#define HOVR_HDR_CRC_OFF	508
#define HOVR_OFF_MAJOR		8
#define HOVR_OFF_HEADER_SIZE	12
#define HOVR_OFF_REGION_SIZE	32
#define HOVR_OFF_SLOT		104
#define HOVR_SLOT_DESC_SIZE	48
#define HOVR_CHUNK		(64 * 1024)

enum ho_status {
	HO_ST_NONE,		/* no handover= on the command line */
	HO_ST_NO_STATE,		/* region has no valid header or slot */
	HO_ST_REJECTED,		/* a blob was found but the parser refused it */
	HO_ST_VALID,		/* validated, ranges reserved */
	HO_ST_ACCEPTED,		/* `handover load` accepted it */
	HO_ST_ABORTED,		/* `handover load` aborted the handover */
};

static const char *const ho_status_names[] = {
	[HO_ST_NONE] = "none", [HO_ST_NO_STATE] = "no-state", [HO_ST_REJECTED] = "rejected",
	[HO_ST_VALID] = "valid", [HO_ST_ACCEPTED] = "accepted", [HO_ST_ABORTED] = "aborted",
};

static u64 ho_region_phys, ho_region_size;
static enum ho_status ho_state = HO_ST_NONE;
static int ho_error;
static u64 ho_error_off, ho_gen, ho_blob_phys, ho_blob_len, ho_copy_phys;
static u64 ho_reserved_count, ho_reserved_bytes, ho_reserved_skipped;
static struct ho_view ho_view;		/* points into the RAM copy */
static const char *ho_reason = "";
static DEFINE_MUTEX(ho_lock);

static void __init ho_kept_init(void);

static int __init handover_param(char *arg)
{
	char *p = arg;
	u64 size, phys;

	if (!arg)
		return -EINVAL;
	size = memparse(p, &p);
	if (*p != '@' || !size)
		goto bad;
	phys = memparse(p + 1, &p);
	if (*p || phys + size < phys)
		goto bad;
	ho_region_phys = phys;
	ho_region_size = size;
	/* never hand the region to the allocator, whatever its contents */
	memblock_reserve(phys, size);
	return 0;
bad:
	pr_err("ignoring malformed handover=%s (want <size>@<phys>)\n", arg);
	return -EINVAL;
}
early_param("handover", handover_param);

struct ho_slot_desc {
	u64 offset, capacity, generation, length;
	u32 crc;
};

/* read @len bytes at region offset @off into @dst through early mappings */
static void __init ho_copy_in(void *dst, u64 off, u64 len)
{
	while (len) {
		u64 n = min_t(u64, len, HOVR_CHUNK);
		void *src = early_memremap(ho_region_phys + off, n);

		memcpy(dst, src, n);
		early_memunmap(src, n);
		dst += n;
		off += n;
		len -= n;
	}
}

/* collect the slot descriptors of the header copies that verify */
static int __init ho_region_slots(struct ho_slot_desc *out)
{
	int n = 0;

	for (int copy = 0; copy < 2; copy++) {
		u8 *h = early_memremap(ho_region_phys + copy * HOVR_HDR_BLOCK, HOVR_HDR_SIZE);
		u32 crc;

		if (!h)
			continue;
		crc = ho_crc32c(0, h, HOVR_HDR_CRC_OFF);
		if (!memcmp(h, HOVR_REGION_MAGIC, 8) && ho_get_le16(h + HOVR_OFF_MAJOR) == 1 &&
		    ho_get_le32(h + HOVR_OFF_HEADER_SIZE) == HOVR_HDR_SIZE &&
		    crc == ho_get_le32(h + HOVR_HDR_CRC_OFF) &&
		    ho_get_le64(h + HOVR_OFF_REGION_SIZE) <= ho_region_size) {
			for (int s = 0; s < 2; s++) {
				const u8 *d = h + HOVR_OFF_SLOT + s * HOVR_SLOT_DESC_SIZE;
				struct ho_slot_desc sd = {
					.offset = ho_get_le64(d), .capacity = ho_get_le64(d + 8),
					.generation = ho_get_le64(d + 16), .length = ho_get_le64(d + 24),
					.crc = ho_get_le32(d + 40),
				};

				if (sd.generation && sd.length <= sd.capacity &&
				    sd.offset <= ho_region_size &&
				    sd.length <= ho_region_size - sd.offset &&
				    sd.length <= HO_MAX_BLOB_SIZE)
					out[n++] = sd;
			}
		}
		early_memunmap(h, HOVR_HDR_SIZE);
	}
	return n;
}

static void __init ho_reserve_one(void *ctx, u64 start, u64 size, unsigned int kind)
{
	memblock_reserve(start, size);
	ho_reserved_count++;
	ho_reserved_bytes += size;
}

/* the RESERVED ranges and the pages of the posted-interrupt descriptors */
static void __init ho_reserve_ranges(void)
{
	ho_reserved_skipped = ho_preserved_ranges(&ho_view, ho_reserve_one, NULL);
}

void __init handover_reserve(void)
{
	struct ho_slot_desc slots[4];
	int n, tried = 0;
	u8 *copy;

	if (!ho_region_size)
		return;
	if (ho_region_size < 2 * HOVR_HDR_BLOCK) {
		ho_state = HO_ST_NO_STATE;
		ho_reason = "region smaller than its headers";
		return;
	}
	n = ho_region_slots(slots);
	ho_state = HO_ST_NO_STATE;
	ho_reason = n ? "no slot whose blob checksum verifies" : "no valid region header";
	while (n) {
		int best = 0;

		for (int i = 1; i < n; i++)
			if (slots[i].generation > slots[best].generation)
				best = i;
		tried++;
		copy = memblock_alloc(max_t(u64, slots[best].length, 1), PAGE_SIZE);
		if (!copy) {
			ho_reason = "no memory for the RAM copy";
			return;
		}
		ho_copy_in(copy, slots[best].offset, slots[best].length);
		if (ho_crc32c(0, copy, slots[best].length) == slots[best].crc) {
			ho_gen = slots[best].generation;
			ho_blob_phys = ho_region_phys + slots[best].offset;
			ho_blob_len = slots[best].length;
			ho_copy_phys = __pa(copy);
			ho_error = ho_parse(copy, ho_blob_len, &ho_view, &ho_error_off);
			if (ho_error) {
				ho_state = HO_ST_REJECTED;
				ho_reason = ho_strerror(ho_error);
				pr_err("state generation %llu at %#llx refused: %s at offset %llu; devices will be reset as usual\n",
				       ho_gen, ho_blob_phys, ho_reason, ho_error_off);
				return;
			}
			ho_state = HO_ST_VALID;
			ho_reason = tried > 1 ? "newest slot damaged, older generation used" : "";
			ho_reserve_ranges();
			ho_kept_init();
			pr_info("state %u.%u generation %llu (%llu bytes at %#llx) valid; reserved %llu ranges (%llu bytes)%s\n",
				ho_view.major, ho_view.minor, ho_gen, ho_blob_len, ho_blob_phys,
				ho_reserved_count, ho_reserved_bytes,
				tried > 1 ? " [fallback to an older generation]" : "");
			return;
		}
		memblock_free(copy, max_t(u64, slots[best].length, 1));
		slots[best] = slots[--n];
	}
	pr_warn("region %#llx+%#llx: %s\n", ho_region_phys, ho_region_size, ho_reason);
}

bool handover_state_valid(void)
{
	return ho_state == HO_ST_VALID || ho_state == HO_ST_ACCEPTED;
}

/* the UNIT record of the unit whose registers are at @reg_phys, or NULL */
static const u8 *ho_unit_find(u64 reg_phys)
{
	const struct ho_section *us = ho_find_section(&ho_view, HO_SEC_UNIT);

	for (u32 i = 0; us && i < us->count; i++) {
		const u8 *r = ho_record(&ho_view, us, i);

		if (ho_get_le64(r + HO_UNIT_OFF_REG_BASE) == reg_phys)
			return r;
	}
	return NULL;
}

/* [@phys, @phys + @size) lies inside one reserved range of @kind */
static bool ho_reserved_holds(u64 phys, u64 size, unsigned int kind)
{
	const struct ho_section *rs = ho_find_section(&ho_view, HO_SEC_RESERVED);

	for (u32 j = 0; rs && j < rs->count; j++) {
		const u8 *q = ho_record(&ho_view, rs, j);
		u64 start = ho_get_le64(q + HO_RESERVED_OFF_START);
		u64 len = ho_get_le64(q + HO_RESERVED_OFF_SIZE);

		if (ho_get_le16(q + HO_RESERVED_OFF_KIND) == kind && start <= phys &&
		    phys + size <= start + len)
			return true;
	}
	return false;
}

/*
 * A register of the unit at @reg_phys still holds what the previous kernel programmed
 * (@value, masked with ~0xfff gives a table of @size bytes). The structures it points to
 * may be kept only when the validated state describes this unit with the same value, the
 * register was captured with its enable flag set, and the whole table is among the ranges
 * reserved before the page allocator started.
 */
static int ho_unit_keep(const char *name, const char *what, u64 reg_phys, u64 cap, u64 ecap,
			unsigned int off, u32 present_bit, u32 flag_bit, u64 value, u64 size,
			unsigned int kind)
{
	u64 table = value & ~0xfffULL;
	const char *why = NULL;
	const u8 *r;
	u32 present;

	if (!handover_state_valid())
		return -1;
	r = ho_unit_find(reg_phys);
	present = r ? ho_get_le32(r + HO_UNIT_OFF_PRESENT) : 0;
	if (!r)
		why = "not in the handed-over state";
	else if ((present & HO_UNIT_P_CAP && ho_get_le64(r + HO_UNIT_OFF_CAP) != cap) ||
		 (present & HO_UNIT_P_ECAP && ho_get_le64(r + HO_UNIT_OFF_ECAP) != ecap))
		why = "its capabilities differ from the saved ones (other hardware)";
	else if (!(present & present_bit) || !(ho_get_le32(r + HO_UNIT_OFF_FLAGS) & flag_bit))
		why = "the register was not captured with the feature on";
	else if (ho_get_le64(r + off) != value)
		why = "the register differs from the saved one";
	else if (!ho_reserved_holds(table, size, kind))
		why = "its table is not among the reserved ranges";
	if (why) {
		pr_info("%s: %s not kept: %s\n", name, what, why);
		return -1;
	}
	pr_info("%s: keeping the %s at %#llx\n", name, what, table);
	return ho_get_le16(r + HO_UNIT_OFF_UNIT);
}

static u32 ho_ir_kept;
static u64 ho_ir_units;		/* bit n: the IR table of state unit n was kept */

/* interrupt remapping left enabled by the previous kernel: keep its IRTEs? */
bool handover_keep_ir(const char *name, u64 reg_phys, u64 cap, u64 ecap, u64 irta)
{
	int unit = ho_unit_keep(name, "interrupt-remapping table", reg_phys, cap, ecap, HO_UNIT_OFF_IRTA,
				 HO_UNIT_P_IRTA, HO_UNIT_F_IRE, irta, 16ULL << ((irta & 0xf) + 1),
				 HO_RES_IR_TABLE);

	if (unit < 0)
		return false;
	ho_ir_kept++;
	if (unit < 64)
		ho_ir_units |= 1ULL << unit;
	return true;
}

/* ---- the new kernel: the keepalive devices of a validated state ------------------------- */
#define HO_MAX_KEPT 64

enum ho_kept_state {
	HO_KEPT_LISTED,		/* named by the state, not met yet */
	HO_KEPT_HELD,		/* found with the saved identity: not touched by enumeration */
	HO_KEPT_RELEASED,	/* given back: disabled, reset if possible, fresh IOMMU state */
};

static const char *const ho_kept_names[] = {
	[HO_KEPT_LISTED] = "listed", [HO_KEPT_HELD] = "held", [HO_KEPT_RELEASED] = "released",
};

struct ho_kept {
	u32 sbdf;
	enum ho_kept_state state;
	bool adopted;		/* its context entry was adopted from the previous kernel */
	bool authorized;	/* its owner presented the token (vfio group path) */
	u16 did;
	const u8 *rec;		/* its DEVICE record in the RAM copy */
	struct pci_dev *pdev;
	const char *why;	/* why it was released */
};

#define HO_MAX_VECTORS 4096
static DECLARE_BITMAP(ho_vector_taken, HO_MAX_VECTORS);
static struct ho_kept ho_kept[HO_MAX_KEPT];
static int ho_nkept;
static void (*ho_iommu_release)(struct pci_dev *pdev);

static void __init ho_kept_init(void)
{
	const struct ho_section *s = ho_find_section(&ho_view, HO_SEC_DEVICE);

	for (u32 i = 0; s && i < s->count && ho_nkept < HO_MAX_KEPT; i++) {
		const u8 *r = ho_record(&ho_view, s, i);

		if (!(ho_get_le16(r + HO_DEVICE_OFF_FLAGS) & HO_DEV_F_KEEPALIVE))
			continue;
		ho_kept[ho_nkept].sbdf = ho_get_le32(r + HO_DEVICE_OFF_SBDF);
		ho_kept[ho_nkept].rec = r;
		ho_nkept++;
	}
}

static struct ho_kept *ho_kept_find(u32 sbdf)
{
	for (int i = 0; i < ho_nkept; i++)
		if (ho_kept[i].sbdf == sbdf)
			return &ho_kept[i];
	return NULL;
}

/* segment 31:16, bus 15:8, devfn 7:0, as the state's sbdf fields */
static u32 ho_mk_sbdf(u16 seg, u8 bus, u8 devfn)
{
	return (u32)seg << 16 | bus << 8 | devfn;
}

static u32 ho_sbdf(struct pci_dev *pdev)
{
	return ho_mk_sbdf(pci_domain_nr(pdev->bus), pdev->bus->number, pdev->devfn);
}

/* translation left on by the previous kernel: adopt its root table in place? */
static u32 ho_root_kept;

bool handover_keep_dma(const char *name, u64 reg_phys, u64 cap, u64 ecap, u64 rtaddr)
{
	bool keep = ho_nkept && ho_unit_keep(name, "root table", reg_phys, cap, ecap,
					     HO_UNIT_OFF_RTADDR, HO_UNIT_P_RTADDR, HO_UNIT_F_TE,
					     rtaddr, 4096, HO_RES_ROOT_TABLE) >= 0;

	ho_root_kept += keep;
	return keep;
}

/* a context table the root table points to was reserved as one */
bool handover_keep_context_table(u64 phys)
{
	return handover_state_valid() && ho_reserved_holds(phys, 4096, HO_RES_CONTEXT_TABLE);
}

/*
 * The live legacy-mode context entry (@lo, @hi) of @seg:@bus:@devfn: keep it (adopt the
 * previous kernel's translation) only for a keepalive device whose saved entry is the
 * same and whose second-level page-table root was reserved.
 */
bool handover_keep_context(const char *name, u16 seg, u8 bus, u8 devfn, u64 lo, u64 hi)
{
	const struct ho_section *cs = ho_find_section(&ho_view, HO_SEC_CONTEXT);
	u32 sbdf = ho_mk_sbdf(seg, bus, devfn);
	struct ho_kept *k = ho_kept_find(sbdf);
	const char *why = "no saved context entry";

	/* only a device enumeration found and held (identity and BARs checked) */
	if (!k || k->state != HO_KEPT_HELD)
		return false;
	for (u32 i = 0; cs && i < cs->count; i++) {
		const u8 *r = ho_record(&ho_view, cs, i);

		if (ho_get_le32(r + HO_CONTEXT_OFF_SBDF) != sbdf ||
		    ho_get_le32(r + HO_CONTEXT_OFF_PASID))
			continue;
		why = "the live context entry differs from the saved one";
		if (ho_get_le64(r + HO_CONTEXT_OFF_LO) != lo || ho_get_le64(r + HO_CONTEXT_OFF_HI) != hi)
			break;
		why = "its page-table root is not among the reserved ranges";
		/* translation type 2 (pass-through) has no page table */
		if (((lo >> 2) & 3) != 2 && !ho_reserved_holds(lo & ~0xfffULL, 4096, HO_RES_PAGE_TABLE))
			break;
		k->adopted = true;
		k->did = (hi >> 8) & 0xffff;
		pr_info("%s: %04x:%02x:%02x.%x: adopted the context entry (domain %u, page tables at %#llx)\n",
			name, seg, bus, PCI_SLOT(devfn), PCI_FUNC(devfn), k->did, lo & ~0xfffULL);
		return true;
	}
	k->why = why;
	pr_warn("%s: %04x:%02x:%02x.%x: context entry not adopted: %s\n", name, seg, bus,
		PCI_SLOT(devfn), PCI_FUNC(devfn), why);
	return false;
}

/* the adopted context of @seg:@bus:@devfn must survive attaches (until a release) */
bool handover_context_held(u16 seg, u8 bus, u8 devfn)
{
	struct ho_kept *k = ho_kept_find(ho_mk_sbdf(seg, bus, devfn));

	return k && k->adopted && k->state != HO_KEPT_RELEASED && ho_state != HO_ST_ABORTED;
}

void handover_register_iommu_release(void (*fn)(struct pci_dev *pdev))
{
	ho_iommu_release = fn;
}

/* a device the kernel must leave running: found with its saved identity, not released */
bool handover_pci_held(struct pci_dev *pdev)
{
	struct ho_kept *k = ho_kept_find(ho_sbdf(pdev));

	return k && k->state == HO_KEPT_HELD && k->pdev == pdev;
}

/* the address BAR @index (PCI_ROM_RESOURCE: the ROM BAR) decodes, from config reads only */
static u64 ho_pci_bar_live(struct pci_dev *pdev, int index, unsigned long flags)
{
	int pos = index == PCI_ROM_RESOURCE ? PCI_ROM_ADDRESS : PCI_BASE_ADDRESS_0 + 4 * index;
	u32 lo, hi = 0;

	pci_read_config_dword(pdev, pos, &lo);
	if (index == PCI_ROM_RESOURCE)
		return lo & PCI_ROM_ADDRESS_MASK;
	if (lo & PCI_BASE_ADDRESS_SPACE_IO)
		return lo & PCI_BASE_ADDRESS_IO_MASK;
	if (flags & IORESOURCE_MEM_64)
		pci_read_config_dword(pdev, pos + 4, &hi);
	return (u64)hi << 32 | (lo & PCI_BASE_ADDRESS_MEM_MASK);
}

/* enumeration of a held device: its BARs come from the state, never from sizing writes */
bool handover_pci_bar(struct pci_dev *pdev, int index, struct resource *res)
{
	const struct ho_section *bs = ho_find_section(&ho_view, HO_SEC_BAR);
	u32 sbdf = ho_sbdf(pdev);

	if (!handover_pci_held(pdev))
		return false;
	for (u32 i = 0; bs && i < bs->count; i++) {
		const u8 *r = ho_record(&ho_view, bs, i);
		u64 start = ho_get_le64(r + HO_BAR_OFF_START), size = ho_get_le64(r + HO_BAR_OFF_SIZE);

		if (ho_get_le32(r + HO_BAR_OFF_SBDF) != sbdf || r[HO_BAR_OFF_INDEX] != index)
			continue;
		res->name = pci_name(pdev);
		res->flags = ho_get_le64(r + HO_BAR_OFF_RES_FLAGS);
		if (!size || (res->flags & IORESOURCE_UNSET)) {
			res->flags = 0;
			return true;
		}
		/* x86: bus addresses are CPU addresses; never move it */
		res->start = start;
		res->end = start + size - 1;
		res->flags |= IORESOURCE_PCI_FIXED;
		pci_info(pdev, "handover: BAR %d %pR taken from the state\n", index, res);
		return true;
	}
	return false;
}

/*
 * The IRTE index MSI (@msix false) or MSI-X vector @msi_index of a held device used in the
 * previous kernel, on the unit at @reg_phys; each saved vector is handed out once.
 * -1 when unknown.
 */
int handover_irte_index(struct pci_dev *pdev, u64 reg_phys, bool msix, unsigned int msi_index)
{
	const struct ho_section *vs = ho_find_section(&ho_view, HO_SEC_VECTOR);
	const u8 *u = ho_unit_find(reg_phys);
	u32 sbdf = ho_sbdf(pdev);
	int unit;

	if (!handover_pci_held(pdev) || !vs || !u)
		return -1;
	unit = ho_get_le16(u + HO_UNIT_OFF_UNIT);
	for (u32 i = 0; i < vs->count && i < HO_MAX_VECTORS; i++) {
		const u8 *r = ho_record(&ho_view, vs, i);
		u8 fl = r[HO_VECTOR_OFF_FLAGS];

		if (ho_get_le32(r + HO_VECTOR_OFF_SBDF) != sbdf ||
		    r[HO_VECTOR_OFF_KIND] != (msix ? HO_VEC_MSIX : HO_VEC_MSI) ||
		    ho_get_le32(r + HO_VECTOR_OFF_VECTOR) != msi_index ||
		    ho_get_le16(r + HO_VECTOR_OFF_UNIT) != unit || !(fl & HO_VEC_F_IRTE_KNOWN) ||
		    (fl & HO_VEC_F_POSTED) || ho_get_le16(r + HO_VECTOR_OFF_SUB_HANDLE) ||
		    test_and_set_bit(i, ho_vector_taken))
			continue;
		pci_info(pdev, "handover: %s vector %u keeps IRTE %u\n", msix ? "MSI-X" : "MSI",
			 msi_index, ho_get_le32(r + HO_VECTOR_OFF_IRTE_INDEX));
		return ho_get_le32(r + HO_VECTOR_OFF_IRTE_INDEX);
	}
	return -1;
}

/* stop a device the previous kernel left running: no DMA, no interrupts */
static void ho_pci_quiesce(struct pci_dev *pdev)
{
	/* at the early fixup msi_cap and msix_cap are not set yet */
	int msi = pdev->msi_cap ?: pci_find_capability(pdev, PCI_CAP_ID_MSI);
	int msix = pdev->msix_cap ?: pci_find_capability(pdev, PCI_CAP_ID_MSIX);
	u16 cmd, ctrl;

	pci_read_config_word(pdev, PCI_COMMAND, &cmd);
	pci_write_config_word(pdev, PCI_COMMAND, (cmd & ~PCI_COMMAND_MASTER) | PCI_COMMAND_INTX_DISABLE);
	if (msi) {
		pci_read_config_word(pdev, msi + PCI_MSI_FLAGS, &ctrl);
		pci_write_config_word(pdev, msi + PCI_MSI_FLAGS, ctrl & ~PCI_MSI_FLAGS_ENABLE);
	}
	if (msix) {
		pci_read_config_word(pdev, msix + PCI_MSIX_FLAGS, &ctrl);
		pci_write_config_word(pdev, msix + PCI_MSIX_FLAGS, ctrl & ~PCI_MSIX_FLAGS_ENABLE);
	}
}

/* a remapped vector of @sbdf lives in an IR table that was not kept */
static bool ho_vectors_lost(u32 sbdf)
{
	const struct ho_section *vs = ho_find_section(&ho_view, HO_SEC_VECTOR);

	for (u32 i = 0; vs && i < vs->count; i++) {
		const u8 *r = ho_record(&ho_view, vs, i);
		u16 unit = ho_get_le16(r + HO_VECTOR_OFF_UNIT);

		if (ho_get_le32(r + HO_VECTOR_OFF_SBDF) == sbdf &&
		    (r[HO_VECTOR_OFF_FLAGS] & HO_VEC_F_IRTE_KNOWN) &&
		    (unit >= 64 || !(ho_ir_units & (1ULL << unit))))
			return true;
	}
	return false;
}

/* every assigned BAR the state records for @pdev still decodes where the state says */
static bool ho_pci_bars_match(struct pci_dev *pdev)
{
	const struct ho_section *bs = ho_find_section(&ho_view, HO_SEC_BAR);
	u32 sbdf = ho_sbdf(pdev);

	for (u32 i = 0; bs && i < bs->count; i++) {
		const u8 *r = ho_record(&ho_view, bs, i);
		u64 start = ho_get_le64(r + HO_BAR_OFF_START), flags = ho_get_le64(r + HO_BAR_OFF_RES_FLAGS);
		int index = r[HO_BAR_OFF_INDEX];
		u64 live;

		if (ho_get_le32(r + HO_BAR_OFF_SBDF) != sbdf || index > PCI_ROM_RESOURCE ||
		    !ho_get_le64(r + HO_BAR_OFF_SIZE) || (flags & IORESOURCE_UNSET))
			continue;
		live = ho_pci_bar_live(pdev, index, flags);
		if (live != start) {
			pci_warn(pdev, "handover: BAR %d decodes %#llx, the state says %#llx\n",
				 index, live, start);
			return false;
		}
	}
	return true;
}

/*
 * Before the BARs are read: a device of a handover boot either is a keepalive device found
 * with its saved identity (held: enumeration leaves it running), or, if the previous
 * kernel left it bus-mastering, is stopped here and reset once it is added.
 */
static void ho_pci_early(struct pci_dev *pdev)
{
	struct ho_kept *k;
	const char *why = NULL;
	u16 cmd;

	if (!ho_region_size || pdev->hdr_type != PCI_HEADER_TYPE_NORMAL)
		return;
	k = ho_kept_find(ho_sbdf(pdev));
	if (k && k->state == HO_KEPT_LISTED) {
		const u8 *r = k->rec;

		if (ho_state == HO_ST_ABORTED)
			why = "the handover was aborted";
		else if (pdev->vendor != ho_get_le16(r + HO_DEVICE_OFF_VENDOR) ||
			 pdev->device != ho_get_le16(r + HO_DEVICE_OFF_DEVICE) ||
			 pdev->class != (ho_get_le32(r + HO_DEVICE_OFF_CLASS) & 0xffffff) ||
			 pdev->revision != r[HO_DEVICE_OFF_REVISION])
			why = "its identity differs from the saved one";
		else if (!ho_pci_bars_match(pdev))
			why = "a BAR differs from the saved one";
		else if (ho_vectors_lost(k->sbdf))	/* IR was set up before PCI */
			why = "its interrupt-remapping table was not kept";
		if (!why) {
			k->state = HO_KEPT_HELD;
			k->pdev = pdev;
			pci_info(pdev, "handover: keepalive device held (BARs, MSI, bus mastering untouched)\n");
			return;
		}
		k->state = HO_KEPT_RELEASED;
		k->why = why;
	}
	pci_read_config_word(pdev, PCI_COMMAND, &cmd);
	if (!(cmd & PCI_COMMAND_MASTER))
		return;
	if (!why)
		why = handover_state_valid() ? "not a keepalive device of the state" :
		      "no valid state";
	ho_pci_quiesce(pdev);
	pci_warn(pdev, "handover: left bus-mastering by the previous kernel but not adopted (%s): stopped\n",
		 why);
	if (k)
		k->pdev = pdev;
}
DECLARE_PCI_FIXUP_EARLY(PCI_ANY_ID, PCI_ANY_ID, ho_pci_early);

static void ho_release_one(struct ho_kept *k, const char *why)
{
	struct pci_dev *pdev = k->pdev;
	int ret;

	k->state = HO_KEPT_RELEASED;
	k->why = why;
	if (!pdev)
		return;
	ho_pci_quiesce(pdev);
	if (k->adopted && ho_iommu_release)
		ho_iommu_release(pdev);
	ret = pci_reset_function(pdev);
	pci_warn(pdev, "handover: released (%s): bus mastering and MSI off, %s\n", why,
		 ret ? "no reset method" : "reset");
}

/* a listed device stopped during enumeration: reset it now that it can be */
static void ho_pci_final(struct pci_dev *pdev)
{
	struct ho_kept *k = ho_kept_find(ho_sbdf(pdev));

	if (k && k->state == HO_KEPT_RELEASED && k->pdev == pdev)
		ho_release_one(k, k->why);
}
DECLARE_PCI_FIXUP_FINAL(PCI_ANY_ID, PCI_ANY_ID, ho_pci_final);

/*
 * Opening a held device through vfio-pci: only the previous owner may, with the token
 * whose salted SHA-256 the state holds. 0: not a held device; 1: token accepted;
 * -EPERM: refused.
 */
int handover_pci_open(struct pci_dev *pdev, const u8 *token)
{
	struct ho_kept *k = ho_kept_find(ho_sbdf(pdev));
	u8 buf[32], digest[32];

	if (!k || k->state != HO_KEPT_HELD || k->pdev != pdev)
		return 0;
	if (!(ho_get_le16(k->rec + HO_DEVICE_OFF_FLAGS) & HO_DEV_F_TOKEN))
		return 1;
	k->authorized = false;
	if (!token) {
		pci_warn(pdev, "handover: open refused: a keepalive device needs its owner token (vf_token=)\n");
		return -EPERM;
	}
	memcpy(buf, k->rec + HO_DEVICE_OFF_TOKEN_SALT, 16);
	memcpy(buf + 16, token, 16);
	sha256(buf, sizeof(buf), digest);
	if (crypto_memneq(digest, k->rec + HO_DEVICE_OFF_TOKEN_HASH, 32)) {
		pci_warn(pdev, "handover: open refused: the token is not the owner's\n");
		return -EPERM;
	}
	pci_info(pdev, "handover: owner token accepted\n");
	k->authorized = true;
	return 1;
}

/*
 * vfio-pci enabling a held device (any open path): only after the owner's token was
 * accepted, since the iommufd cdev path has no way to present one.
 */
bool handover_pci_may_open(struct pci_dev *pdev)
{
	struct ho_kept *k = ho_kept_find(ho_sbdf(pdev));

	if (!k || k->state != HO_KEPT_HELD || k->pdev != pdev || k->authorized ||
	    !(ho_get_le16(k->rec + HO_DEVICE_OFF_FLAGS) & HO_DEV_F_TOKEN))
		return true;
	pci_warn(pdev, "handover: open refused: the owner token was not presented (vfio group, vf_token=)\n");
	return false;
}

/* `handover load` aborted, or the kernel gave up: every held device goes back to normal */
static void ho_release_all(const char *why)
{
	for (int i = 0; i < ho_nkept; i++)
		if (ho_kept[i].state != HO_KEPT_RELEASED)
			ho_release_one(&ho_kept[i], why);
}

/* a held device's BAR that the resource tree refused (it conflicts with another one);
 * the expansion ROM is left out: x86 claims it only when it is enabled */
static bool ho_pci_bar_conflict(struct pci_dev *pdev)
{
	for (int i = 0; i < PCI_ROM_RESOURCE; i++) {
		struct resource *r = &pdev->resource[i];

		if (r->flags && resource_size(r) && !r->parent) {
			pci_warn(pdev, "handover: BAR %d %pR conflicts: not claimed\n", i, r);
			return true;
		}
	}
	return false;
}

/*
 * After the IOMMU took over (and once more at late_initcall, when there is no IOMMU): a
 * held device without an adopted context entry, whose interrupts went through an IR table
 * that was not kept, or whose BARs could not be claimed where the state put them, is
 * released. The boot goes on.
 */
void handover_release_unadopted(void)
{
	for (int i = 0; i < ho_nkept; i++) {
		struct ho_kept *k = &ho_kept[i];

		if (k->state != HO_KEPT_HELD)
			continue;
		if (!k->adopted)
			ho_release_one(k, k->why ?: "its DMA translation was not adopted");
		else if (ho_vectors_lost(k->sbdf))
			ho_release_one(k, "its interrupt-remapping table was not kept");
		else if (k->pdev && ho_pci_bar_conflict(k->pdev))
			ho_release_one(k, "a BAR conflicts with another resource");
	}
}

/* ---- the old kernel: which devices a kexec must leave running ------------------------- */
#define HO_MAX_KEEPALIVE 64
static u32 ho_keep[HO_MAX_KEEPALIVE];
static int ho_nkeep;

bool handover_armed(void)
{
	return READ_ONCE(ho_nkeep) > 0;
}

/* @pdev is a keepalive device, or a bridge on the path to one (its bus range holds one) */
bool handover_keepalive_pci(struct pci_dev *pdev)
{
	u32 seg = pci_domain_nr(pdev->bus);
	u32 me = seg << 16 | pdev->bus->number << 8 | pdev->devfn;

	for (int i = 0; i < READ_ONCE(ho_nkeep); i++) {
		u32 k = ho_keep[i], kbus = (k >> 8) & 0xff;

		if (k == me)
			return true;
		if (pdev->subordinate && (k >> 16) == seg &&
		    kbus >= pdev->subordinate->busn_res.start &&
		    kbus <= pdev->subordinate->busn_res.end)
			return true;
	}
	return false;
}

/* ---- sysfs ---------------------------------------------------------------------------- */
static u32 ho_count(unsigned int type)
{
	const struct ho_section *s = ho_find_section(&ho_view, type);

	return s ? s->count : 0;
}

static ssize_t status_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	int len;

	mutex_lock(&ho_lock);
	len = sysfs_emit(buf, "state: %s\n", ho_status_names[ho_state]);
	if (ho_region_size)
		len += sysfs_emit_at(buf, len, "region: %#llx@%#llx\n", ho_region_size, ho_region_phys);
	if (ho_reason && *ho_reason)
		len += sysfs_emit_at(buf, len, "reason: %s\n", ho_reason);
	if (ho_nkeep)
		len += sysfs_emit_at(buf, len, "armed: %d keepalive devices\n", ho_nkeep);
	if (ho_state == HO_ST_REJECTED)
		len += sysfs_emit_at(buf, len, "error: %s at offset %llu\n", ho_strerror(ho_error),
				     ho_error_off);
	if (ho_blob_len) {
		len += sysfs_emit_at(buf, len, "generation: %llu\nblob: %llu@%#llx\ncopy: %#llx\n",
				     ho_gen, ho_blob_len, ho_blob_phys, ho_copy_phys);
	}
	if (ho_state >= HO_ST_VALID) {
		len += sysfs_emit_at(buf, len, "format: %u.%u\nsections: %u\n", ho_view.major,
				     ho_view.minor, ho_view.nsections);
		len += sysfs_emit_at(buf, len,
				     "units: %u\ndomains: %u\ncontexts: %u\nirtes: %u\nvectors: %u\npi_descs: %u\nbars: %u\ndevices: %u\nbridges: %u\nreserved: %u\n",
				     ho_count(HO_SEC_UNIT), ho_count(HO_SEC_DOMAIN),
				     ho_count(HO_SEC_CONTEXT), ho_count(HO_SEC_IRTE),
				     ho_count(HO_SEC_VECTOR), ho_count(HO_SEC_PI_DESC),
				     ho_count(HO_SEC_BAR), ho_count(HO_SEC_DEVICE),
				     ho_count(HO_SEC_BRIDGE), ho_count(HO_SEC_RESERVED));
		len += sysfs_emit_at(buf, len, "reserved_ranges: %llu\nreserved_bytes: %llu\nreserved_skipped: %llu\n",
				     ho_reserved_count, ho_reserved_bytes, ho_reserved_skipped);
		len += sysfs_emit_at(buf, len, "ir_tables_kept: %u\nroot_tables_kept: %u\n",
				     ho_ir_kept, ho_root_kept);
		for (int i = 0; i < ho_nkept; i++) {
			const struct ho_kept *k = &ho_kept[i];

			len += sysfs_emit_at(buf, len, "device: %04x:%02x:%02x.%x %s", k->sbdf >> 16,
					     (k->sbdf >> 8) & 0xff, (k->sbdf >> 3) & 0x1f, k->sbdf & 7,
					     ho_kept_names[k->state]);
			if (k->adopted)
				len += sysfs_emit_at(buf, len, " adopted domain=%u", k->did);
			if (k->state == HO_KEPT_RELEASED && k->why)
				len += sysfs_emit_at(buf, len, " (%s)", k->why);
			len += sysfs_emit_at(buf, len, "\n");
		}
	}
	mutex_unlock(&ho_lock);
	return len;
}

static ssize_t formats_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	return sysfs_emit(buf, "%u.0-%u.%u\n", HO_READ_MAJOR, HO_READ_MAJOR, HO_FORMAT_MINOR);
}

static ssize_t decision_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	return sysfs_emit(buf, "%s\n", ho_state == HO_ST_ACCEPTED ? "accept" :
			  ho_state == HO_ST_ABORTED ? "abort" : "pending");
}

static ssize_t decision_store(struct kobject *k, struct kobj_attribute *a, const char *buf,
			      size_t count)
{
	bool release = false;
	int ret = count;

	mutex_lock(&ho_lock);
	if (sysfs_streq(buf, "accept")) {
		if (ho_state == HO_ST_VALID || ho_state == HO_ST_ACCEPTED)
			ho_state = HO_ST_ACCEPTED;
		else
			ret = -EINVAL;	/* nothing valid to accept */
	} else if (sysfs_streq(buf, "abort")) {
		if (ho_state == HO_ST_VALID || ho_state == HO_ST_ACCEPTED) {
			ho_state = HO_ST_ABORTED;
			ho_reason = "aborted from user space";
			pr_warn("handover aborted from user space: releasing the keepalive devices\n");
			release = true;
		}
	} else {
		ret = -EINVAL;
	}
	mutex_unlock(&ho_lock);
	if (release)
		ho_release_all("the handover was aborted");
	return ret;
}

static ssize_t keepalive_show(struct kobject *k, struct kobj_attribute *a, char *buf)
{
	int len = 0;

	mutex_lock(&ho_lock);
	for (int i = 0; i < ho_nkeep; i++)
		len += sysfs_emit_at(buf, len, "%04x:%02x:%02x.%x\n", ho_keep[i] >> 16,
				     (ho_keep[i] >> 8) & 0xff, (ho_keep[i] >> 3) & 0x1f, ho_keep[i] & 7);
	mutex_unlock(&ho_lock);
	return len;
}

/*
 * `handover arm` writes one keepalive device ("ssss:bb:dd.f") per write, or "clear".
 * While any is armed, a kexec leaves DMA translation on and does not clear bus mastering
 * of those devices and their upstream bridges; everything else shuts down as before.
 */
static ssize_t keepalive_store(struct kobject *k, struct kobj_attribute *a, const char *buf,
			       size_t count)
{
	unsigned int seg, bus, dev, fn;
	int ret = count;

	mutex_lock(&ho_lock);
	if (sysfs_streq(buf, "clear")) {
		WRITE_ONCE(ho_nkeep, 0);
	} else if (sscanf(buf, "%x:%x:%x.%x", &seg, &bus, &dev, &fn) != 4 || seg > 0xffff ||
		   bus > 0xff || dev > 0x1f || fn > 7) {
		ret = -EINVAL;
	} else if (ho_nkeep >= HO_MAX_KEEPALIVE) {
		ret = -ENOSPC;
	} else {
		ho_keep[ho_nkeep] = seg << 16 | bus << 8 | dev << 3 | fn;
		WRITE_ONCE(ho_nkeep, ho_nkeep + 1);
		pr_info("armed: %04x:%02x:%02x.%x stays alive across kexec\n", seg, bus, dev, fn);
	}
	mutex_unlock(&ho_lock);
	return ret;
}

static ssize_t blob_read(struct file *f, struct kobject *k, struct bin_attribute *a, char *buf,
			 loff_t off, size_t count)
{
	if (!ho_blob_len || off >= ho_blob_len)
		return 0;
	count = min_t(u64, count, ho_blob_len - off);
	memcpy(buf, phys_to_virt(ho_copy_phys) + off, count);
	return count;
}

static struct kobj_attribute ho_status_attr = __ATTR_RO(status);
static struct kobj_attribute ho_formats_attr = __ATTR_RO(formats);
static struct kobj_attribute ho_decision_attr = __ATTR(decision, 0644, decision_show, decision_store);
static struct kobj_attribute ho_keepalive_attr = __ATTR(keepalive, 0644, keepalive_show, keepalive_store);
static struct bin_attribute ho_blob_attr = __BIN_ATTR(blob, 0400, blob_read, NULL, 0);

static struct attribute *ho_attrs[] = {
	&ho_status_attr.attr, &ho_formats_attr.attr, &ho_decision_attr.attr,
	&ho_keepalive_attr.attr, NULL,
};
static struct bin_attribute *ho_bin_attrs[] = { &ho_blob_attr, NULL };
static const struct attribute_group ho_group = { .attrs = ho_attrs, .bin_attrs = ho_bin_attrs };

static int __init handover_sysfs_init(void)
{
	handover_release_unadopted();
	struct kobject *kobj = kobject_create_and_add("handover", kernel_kobj);

	if (!kobj)
		return -ENOMEM;
	ho_blob_attr.size = ho_blob_len;
#ifdef CONFIG_VMCORE_INFO
	/* a crash dump carries the RAM copy: its address and size, for `handover inspect --vmcore` */
	if (ho_blob_len)
		vmcoreinfo_append_str("HANDOVER_STATE=%llx@%llx\n", ho_blob_len, ho_copy_phys);
#endif
	return sysfs_create_group(kobj, &ho_group);
}
late_initcall(handover_sysfs_init);
