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

struct ho_section {
	ho_u16 type;
	ho_u16 version;
	ho_u32 flags;
	ho_u64 offset;
	ho_u64 length;
	ho_u32 count;
	ho_u32 record_size;
};

struct ho_view {
	const ho_u8 *blob;
	ho_u64 size;
	ho_u16 major, minor;
	ho_u64 generation;
	ho_u32 nsections;
	struct ho_section sec[HO_MAX_SECTIONS];
};

/*
 * Validate @blob of @size bytes. Returns HO_OK (0) and fills @v, or an enum ho_error
 * and sets *@err_off to the byte offset the error refers to.
 */
int ho_parse(const void *blob, ho_u64 size, struct ho_view *v, ho_u64 *err_off);

/* The section of @type, or NULL. */
const struct ho_section *ho_find_section(const struct ho_view *v, unsigned int type);

/* Record @i of section @s (caller checks i < s->count). */
static inline const ho_u8 *ho_record(const struct ho_view *v, const struct ho_section *s, ho_u32 i)
{
	return v->blob + s->offset + (ho_u64)i * s->record_size;
}

const char *ho_strerror(int err);

/*
 * The physical ranges the next kernel must keep out of its allocator, of a validated
 * state: every RESERVED record, then the 4-KiB page of every posted-interrupt descriptor
 * (a vCPU's pi_desc must stay where the IRTEs point even if the writer did not list its
 * page). Calls @fn(ctx, start, size, kind) for each usable range; returns how many were
 * skipped (zero size, or wrapping past the top of the address space).
 */
ho_u32 ho_preserved_ranges(const struct ho_view *v,
			   void (*fn)(void *ctx, ho_u64 start, ho_u64 size, unsigned int kind),
			   void *ctx);

/* CRC32C of @len bytes continuing @crc (0 to start), as zlib-style crc32 functions do. */
ho_u32 ho_crc32c(ho_u32 crc, const void *data, ho_u64 len);

/* 0 when @data is the strict msgpack map META/PROVENANCE hold; else an offset + 1. */
ho_u64 ho_msgpack_check(const ho_u8 *data, ho_u64 len);

#endif /* _HANDOVER_PARSE_H */
