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

static void __init ho_reserve_ranges(void)
{
	const struct ho_section *s = ho_find_section(&ho_view, HO_SEC_RESERVED);

	for (u32 i = 0; s && i < s->count; i++) {
		const u8 *r = ho_record(&ho_view, s, i);
		u64 start = ho_get_le64(r + HO_RESERVED_OFF_START);
		u64 size = ho_get_le64(r + HO_RESERVED_OFF_SIZE);

		if (!size || start + size < start) {
			ho_reserved_skipped++;
			continue;
		}
		memblock_reserve(start, size);
		ho_reserved_count++;
		ho_reserved_bytes += size;
	}
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

/*
 * A register of the unit at @reg_phys still holds what the previous kernel programmed
 * (@value, masked with ~0xfff gives a table of @size bytes). The structures it points to
 * may be kept only when the validated state describes this unit with the same value, the
 * register was captured with its enable flag set, and the whole table is among the ranges
 * reserved before the page allocator started.
 */
static bool ho_unit_keep(const char *name, const char *what, u64 reg_phys, unsigned int off,
			 u32 present_bit, u32 flag_bit, u64 value, u64 size, unsigned int kind)
{
	const struct ho_section *us, *rs;
	const char *why = "not in the handed-over state";
	u64 table = value & ~0xfffULL;

	if (!handover_state_valid())
		return false;
	us = ho_find_section(&ho_view, HO_SEC_UNIT);
	rs = ho_find_section(&ho_view, HO_SEC_RESERVED);
	for (u32 i = 0; us && i < us->count; i++) {
		const u8 *r = ho_record(&ho_view, us, i);

		if (ho_get_le64(r + HO_UNIT_OFF_REG_BASE) != reg_phys)
			continue;
		why = "the register was not captured with the feature on";
		if (!(ho_get_le32(r + HO_UNIT_OFF_PRESENT) & present_bit) ||
		    !(ho_get_le32(r + HO_UNIT_OFF_FLAGS) & flag_bit))
			break;
		why = "the register differs from the saved one";
		if (ho_get_le64(r + off) != value)
			break;
		why = "its table is not among the reserved ranges";
		for (u32 j = 0; rs && j < rs->count; j++) {
			const u8 *q = ho_record(&ho_view, rs, j);
			u64 start = ho_get_le64(q + HO_RESERVED_OFF_START);
			u64 len = ho_get_le64(q + HO_RESERVED_OFF_SIZE);

			if (ho_get_le16(q + HO_RESERVED_OFF_KIND) == kind &&
			    start <= table && table + size <= start + len) {
				pr_info("%s: keeping the %s at %#llx\n", name, what, table);
				return true;
			}
		}
		break;
	}
	pr_info("%s: %s not kept: %s\n", name, what, why);
	return false;
}

static u32 ho_ir_kept;

/* interrupt remapping left enabled by the previous kernel: keep its IRTEs? */
bool handover_keep_ir(const char *name, u64 reg_phys, u64 irta)
{
	bool keep = ho_unit_keep(name, "interrupt-remapping table", reg_phys, HO_UNIT_OFF_IRTA,
				 HO_UNIT_P_IRTA, HO_UNIT_F_IRE, irta, 16ULL << ((irta & 0xf) + 1),
				 HO_RES_IR_TABLE);

	ho_ir_kept += keep;
	return keep;
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
		len += sysfs_emit_at(buf, len, "ir_tables_kept: %u\n", ho_ir_kept);
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
			pr_warn("handover aborted from user space\n");
		}
	} else {
		ret = -EINVAL;
	}
	mutex_unlock(&ho_lock);
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
