/* SPDX-License-Identifier: GPL-2.0-only OR MIT */
/*
 * handover_parse.h - freestanding validator of a handover state blob.
 *
 * Compiles in the kernel and in user space: no libc beyond <stddef.h>/<stdint.h>, no
 * allocation, no recursion, bounded time (every loop is bounded by the blob size). It
 * applies the same checks, in the same order, as handover/formats/codec.py decode(), so
 * both return the same verdict (enum ho_error) for every input: tests/c/ checks that.
 */
#ifndef _HANDOVER_PARSE_H
#define _HANDOVER_PARSE_H

#include "handover_format.h"
#include "handover_region.h"

struct ho_section {
	__u16 type;
	__u16 version;
	__u32 flags;
	__u64 offset;
	__u64 length;
	__u32 count;
	__u32 record_size;
};

struct ho_view {
	const __u8 *blob;
	__u64 size;
	__u16 major, minor;
	__u64 generation;
	__u32 nsections;
	struct ho_section sec[HO_MAX_SECTIONS];
};

/*
 * Validate @blob of @size bytes. Returns HO_OK (0) and fills @v, or an enum ho_error
 * and sets *@err_off to the byte offset the error refers to.
 */
int ho_parse(const void *blob, __u64 size, struct ho_view *v, __u64 *err_off);

/* The section of @type, or NULL. */
const struct ho_section *ho_find_section(const struct ho_view *v, unsigned int type);

/* Record @i of section @s (caller checks i < s->count). */
static inline const __u8 *ho_record(const struct ho_view *v, const struct ho_section *s, __u32 i)
{
	return v->blob + s->offset + (__u64)i * s->record_size;
}

const char *ho_strerror(int err);

/*
 * The physical ranges the next kernel must keep out of its allocator, of a validated
 * state: every RESERVED record, then the 4-KiB page of every posted-interrupt descriptor
 * (a vCPU's pi_desc must stay where the IRTEs point even if the writer did not list its
 * page). Calls @fn(ctx, start, size, kind) for each usable range; returns how many were
 * skipped (zero size, or wrapping past the top of the address space).
 */
__u32 ho_preserved_ranges(const struct ho_view *v,
			   void (*fn)(void *ctx, __u64 start, __u64 size, unsigned int kind),
			   void *ctx);

/* A slot descriptor of a persistent-memory region header copy (handover_region.h). */
struct ho_region_slot {
	__u64 offset, capacity, generation, length;
	__u32 crc;
};

/*
 * The non-empty slots of the region header copy @hdr (HO_REGION_HDR_SIZE bytes) of a
 * region of @region_size bytes, whose blob of at most HO_MAX_BLOB_SIZE bytes lies inside
 * the region: stored in @out, their number returned (0 to HO_REGION_SLOTS), or -1 when
 * the copy itself is not valid (magic, layout major, header size, CRC, region size).
 */
int ho_region_slots(const __u8 *hdr, __u64 region_size,
		    struct ho_region_slot out[HO_REGION_SLOTS]);

/* The same walk over record arrays given directly (@nres RESERVED records of @res_size
 * bytes at @res, @npi PI_DESC records of @pi_size bytes at @pi): early boot maps them
 * before the blob can be copied.
 */
__u32 ho_preserved_ranges_raw(const __u8 *res, __u32 nres, __u32 res_size,
			       const __u8 *pi, __u32 npi, __u32 pi_size,
			       void (*fn)(void *ctx, __u64 start, __u64 size, unsigned int kind),
			       void *ctx);

/*
 * For early boot, before the blob can be copied: the header and section table of a blob
 * of @size bytes (whose checksum the caller verified), from its first @head_len bytes.
 * Checks magic, major, section count, header size, header CRC, total size, that every
 * section lies inside the blob, and the record size and count of the RESERVED and
 * PI_DESC sections; fills @v (sections only, @v->blob is NULL). ho_parse() checks the
 * whole blob once it is copied.
 */
int ho_parse_head(const __u8 *head, __u64 head_len, __u64 size, struct ho_view *v,
		  __u64 *err_off);

/* CRC32C of @len bytes continuing @crc (0 to start), as zlib-style crc32 functions do. */
__u32 ho_crc32c(__u32 crc, const void *data, __u64 len);

/* 0 when @data is the strict msgpack map META/PROVENANCE hold; else an offset + 1. */
__u64 ho_msgpack_check(const __u8 *data, __u64 len);

#endif /* _HANDOVER_PARSE_H */
