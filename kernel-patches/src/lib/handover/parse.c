// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * parse.c - freestanding validator of a handover state blob (see handover_parse.h).
 *
 * Mirrors handover/formats/codec.py: read_header(), read_sections(), decode() and
 * check_state(), check for check, in the same order, so that the verdicts agree.
 */
#ifdef __KERNEL__
#include <linux/crc32.h>
#include <linux/string.h>
#include <linux/handover_parse.h>
#else
#include "handover_parse.h"
#endif

/* the fuzz build skips checksum verdicts so that mutations reach the structure checks */
#ifdef HO_FUZZ_IGNORE_CRC
#define HO_IGNORE_CRC 1
#else
#define HO_IGNORE_CRC 0
#endif

static const char *const ho_error_names[] = HO_ERROR_NAMES;

const char *ho_strerror(int err)
{
	if (err < 0 || (unsigned int)err >= sizeof(ho_error_names) / sizeof(ho_error_names[0]) ||
	    !ho_error_names[err])
		return "UNKNOWN";
	return ho_error_names[err];
}

/* ---- CRC32C ------------------------------------------------------------------------ */
#ifdef __KERNEL__
__u32 ho_crc32c(__u32 crc, const void *data, __u64 len)
{
	return ~__crc32c_le(~crc, data, len);
}
#else
static const __u32 ho_crc_nibble[16] = {
	0x00000000, 0x105ec76f, 0x20bd8ede, 0x30e349b1, 0x417b1dbc, 0x5125dad3,
	0x61c69362, 0x7198540d, 0x82f63b78, 0x92a8fc17, 0xa24bb5a6, 0xb21572c9,
	0xc38d26c4, 0xd3d3e1ab, 0xe330a81a, 0xf36e6f75,
};

__u32 ho_crc32c(__u32 crc, const void *data, __u64 len)
{
	const __u8 *p = data;

	crc = ~crc;
	while (len--) {
		crc ^= *p++;
		crc = (crc >> 4) ^ ho_crc_nibble[crc & 15];
		crc = (crc >> 4) ^ ho_crc_nibble[crc & 15];
	}
	return ~crc;
}
#endif

static int ho_memeq(const __u8 *a, const char *b, __u64 n)
{
	while (n--)
		if (*a++ != (__u8)*b++)
			return 0;
	return 1;
}

static int ho_all_zero(const __u8 *p, __u64 n)
{
	while (n--)
		if (*p++)
			return 0;
	return 1;
}

static __u64 ho_align(__u64 n)
{
	return (n + HO_SECTION_ALIGN - 1) & ~(__u64)(HO_SECTION_ALIGN - 1);
}

/* ---- strict msgpack (handover/formats/mpcheck.py) ----------------------------------- */
static int ho_utf8_ok(const __u8 *s, __u64 n)
{
	__u64 i = 0;

	while (i < n) {
		__u8 c = s[i];
		__u64 need;
		__u8 lo = 0x80, hi = 0xbf;

		if (c < 0x80) {
			i++;
			continue;
		} else if (c >= 0xc2 && c <= 0xdf) {
			need = 1;
		} else if (c >= 0xe0 && c <= 0xef) {
			need = 2;
			if (c == 0xe0)
				lo = 0xa0;
			else if (c == 0xed)
				hi = 0x9f;
		} else if (c >= 0xf0 && c <= 0xf4) {
			need = 3;
			if (c == 0xf0)
				lo = 0x90;
			else if (c == 0xf4)
				hi = 0x8f;
		} else {
			return 0;
		}
		if (need > n - i - 1)
			return 0;
		if (s[i + 1] < lo || s[i + 1] > hi)
			return 0;
		for (__u64 k = 2; k <= need; k++)
			if (s[i + k] < 0x80 || s[i + k] > 0xbf)
				return 0;
		i += need + 1;
	}
	return 1;
}

static __u64 ho_be(const __u8 *p, int w)
{
	__u64 v = 0;

	for (int i = 0; i < w; i++)
		v = v << 8 | p[i];
	return v;
}

__u64 ho_msgpack_check(const __u8 *d, __u64 n)
{
	struct { __u64 remaining; int is_map; __u64 seen; } st[HO_MSGPACK_MAX_DEPTH];
	int depth = 0, first = 1;
	__u64 pos = 0;

	for (;;) {
		__u64 start, count = 0, w, ln;
		int container = 0, cmap = 0, is_key;
		__u8 t;

		if (!first && depth == 0)
			break;
		if (pos >= n)
			return pos + 1;
		t = d[pos];
		start = pos;
		is_key = depth && st[depth - 1].is_map && st[depth - 1].seen % 2 == 0;
		pos++;
		if (t <= 0x7f || t >= 0xe0) {
			/* fixint */
		} else if (t <= 0x8f) {
			container = 1; cmap = 1; count = t & 0x0f;
		} else if (t <= 0x9f) {
			container = 1; count = t & 0x0f;
		} else if (t <= 0xbf) {
			ln = t & 0x1f;
			if (ln > n - pos || !ho_utf8_ok(d + pos, ln))
				return start + 1;
			pos += ln;
		} else if (t == 0xc0 || t == 0xc2 || t == 0xc3 || (t >= 0xca && t <= 0xd3)) {
			static const __u8 width[] = { [0xca - 0xca] = 4, 8, 1, 2, 4, 8, 1, 2, 4, 8 };

			w = (t < 0xca) ? 0 : width[t - 0xca];
			if (w > n - pos)
				return start + 1;
			pos += w;
		} else if ((t >= 0xc4 && t <= 0xc6) || (t >= 0xd9 && t <= 0xdb)) {
			int is_str = t >= 0xd9;

			w = is_str ? (t == 0xd9 ? 1 : t == 0xda ? 2 : 4) : (t == 0xc4 ? 1 : t == 0xc5 ? 2 : 4);
			if (w > n - pos)
				return start + 1;
			ln = ho_be(d + pos, (int)w);
			pos += w;
			if (ln > n - pos)
				return start + 1;
			if (is_str && !ho_utf8_ok(d + pos, ln))
				return start + 1;
			pos += ln;
		} else if (t >= 0xdc && t <= 0xdf) {
			w = (t == 0xdc || t == 0xde) ? 2 : 4;
			if (w > n - pos)
				return start + 1;
			count = ho_be(d + pos, (int)w);
			pos += w;
			container = 1;
			cmap = t >= 0xde;
		} else {
			return start + 1;	/* 0xc1, ext, fixext */
		}
		if (first) {
			if (!container || !cmap)
				return start + 1;
			first = 0;
		} else if (is_key && container) {
			return start + 1;
		}
		if (depth) {
			st[depth - 1].remaining--;
			st[depth - 1].seen++;
		}
		if (container) {
			__u64 items = cmap ? count * 2 : count;

			if (items > n - pos)
				return start + 1;
			if (depth >= HO_MSGPACK_MAX_DEPTH)
				return start + 1;
			if (items) {
				st[depth].remaining = items;
				st[depth].is_map = cmap;
				st[depth].seen = 0;
				depth++;
			}
		}
		while (depth && st[depth - 1].remaining == 0)
			depth--;
	}
	if (pos != n)
		return pos + 1;
	return 0;
}

/* ---- the blob ------------------------------------------------------------------------ */
const struct ho_section *ho_find_section(const struct ho_view *v, unsigned int type)
{
	for (__u32 i = 0; i < v->nsections; i++)
		if (v->sec[i].type == type)
			return &v->sec[i];
	return 0;
}

/* record where a check failed; returns @code for the caller to return */
static int ho_fail(__u64 *err_off, __u64 off, int code)
{
	*err_off = off;
	return code;
}

static int ho_key_cmp(unsigned int type, const __u8 *a, const __u8 *b)
{
	switch (type) {
	case HO_SEC_UNIT: return ho_unit_key_cmp(a, b);
	case HO_SEC_DOMAIN: return ho_domain_key_cmp(a, b);
	case HO_SEC_CONTEXT: return ho_context_key_cmp(a, b);
	case HO_SEC_IRTE: return ho_irte_key_cmp(a, b);
	case HO_SEC_VECTOR: return ho_vector_key_cmp(a, b);
	case HO_SEC_PI_DESC: return ho_pi_desc_key_cmp(a, b);
	case HO_SEC_BAR: return ho_bar_key_cmp(a, b);
	case HO_SEC_DEVICE: return ho_device_key_cmp(a, b);
	case HO_SEC_BRIDGE: return ho_bridge_key_cmp(a, b);
	case HO_SEC_RESERVED: return ho_reserved_key_cmp(a, b);
	}
	return 0;
}

/* index of the UNIT record whose unit == u (units are strictly increasing), or -1 */
static long ho_unit_find(const struct ho_view *v, const struct ho_section *us, __u64 u)
{
	__u64 lo = 0, hi = us ? us->count : 0;

	while (lo < hi) {
		__u64 mid = lo + (hi - lo) / 2;
		__u64 m = ho_get_le16(ho_record(v, us, (__u32)mid) + HO_UNIT_OFF_UNIT);

		if (m == u)
			return (long)mid;
		if (m < u)
			lo = mid + 1;
		else
			hi = mid;
	}
	return -1;
}

/* first IRTE record whose word 0 >= key */
static __u64 ho_irte_lower(const struct ho_view *v, const struct ho_section *s, __u64 key)
{
	__u64 lo = 0, hi = s->count;

	while (lo < hi) {
		__u64 mid = lo + (hi - lo) / 2;

		if (ho_get_le64(ho_record(v, s, (__u32)mid)) < key)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static int ho_check_state(const struct ho_view *v, __u64 *err_off)
{
	const struct ho_section *us = ho_find_section(v, HO_SEC_UNIT);
	const struct ho_section *s;
	static const unsigned int order[] = {
		HO_SEC_UNIT, HO_SEC_DOMAIN, HO_SEC_CONTEXT, HO_SEC_IRTE, HO_SEC_VECTOR,
		HO_SEC_PI_DESC, HO_SEC_BAR, HO_SEC_DEVICE, HO_SEC_BRIDGE, HO_SEC_RESERVED,
	};

	/* every record table strictly increasing by key */
	for (unsigned int k = 0; k < sizeof(order) / sizeof(order[0]); k++) {
		s = ho_find_section(v, order[k]);
		if (!s || s->count < 2)
			continue;
		for (__u32 i = 1; i < s->count; i++)
			if (ho_key_cmp(s->type, ho_record(v, s, i - 1), ho_record(v, s, i)) >= 0)
				return ho_fail(err_off, s->offset + (__u64)i * s->record_size, HO_E_ORDER);
	}

	/* IRTEs: a run per unit, indices inside the unit's table, no unknown unit */
	s = ho_find_section(v, HO_SEC_IRTE);
	if (s && s->count) {
		__u64 found = 0;

		for (__u32 j = 0; us && j < us->count; j++) {
			const __u8 *ur = ho_record(v, us, j);
			__u64 u = ho_get_le16(ur + HO_UNIT_OFF_UNIT);
			__u64 irta = ho_get_le64(ur + HO_UNIT_OFF_IRTA);
			__u64 lo = ho_irte_lower(v, s, u << 32);
			__u64 hi = ho_irte_lower(v, s, (u + 1) << 32);

			found += hi - lo;
			if (hi > lo && irta) {
				__u64 max = 1ULL << ((irta & 0xf) + 1);
				__u64 last = ho_get_le64(ho_record(v, s, (__u32)(hi - 1))) & 0xffffffffULL;

				if (last >= max)
					return ho_fail(err_off, s->offset + (hi - 1) * s->record_size, HO_E_IRTE_INDEX);
			}
		}
		if (found != s->count) {
			for (__u32 j = 0; j < s->count; j++)
				if (ho_unit_find(v, us, ho_get_le64(ho_record(v, s, j)) >> 32) < 0)
					return ho_fail(err_off, s->offset + (__u64)j * s->record_size, HO_E_UNIT_REF);
		}
	}

	/* unit references */
	{
		static const struct { unsigned int type; unsigned int off; int none_ok; } refs[] = {
			{ HO_SEC_DOMAIN, HO_DOMAIN_OFF_UNIT, 0 },
			{ HO_SEC_CONTEXT, HO_CONTEXT_OFF_UNIT, 0 },
			{ HO_SEC_VECTOR, HO_VECTOR_OFF_UNIT, 1 },
			{ HO_SEC_DEVICE, HO_DEVICE_OFF_UNIT, 1 },
		};

		for (unsigned int k = 0; k < sizeof(refs) / sizeof(refs[0]); k++) {
			s = ho_find_section(v, refs[k].type);
			for (__u32 j = 0; s && j < s->count; j++) {
				__u64 u = ho_get_le16(ho_record(v, s, j) + refs[k].off);

				if (refs[k].none_ok && u == HO_NONE16)
					continue;
				if (ho_unit_find(v, us, u) < 0)
					return ho_fail(err_off, s->offset + (__u64)j * s->record_size, HO_E_UNIT_REF);
			}
		}
	}

	/* config snapshots inside CONFIG */
	s = ho_find_section(v, HO_SEC_DEVICE);
	if (s && s->count) {
		const struct ho_section *cs = ho_find_section(v, HO_SEC_CONFIG);
		__u64 clen = cs ? cs->length : 0;

		for (__u32 j = 0; j < s->count; j++) {
			const __u8 *r = ho_record(v, s, j);
			__u64 off = ho_get_le32(r + HO_DEVICE_OFF_CONFIG_OFFSET);
			__u64 len = ho_get_le32(r + HO_DEVICE_OFF_CONFIG_LEN);

			if (off + len > clen)
				return ho_fail(err_off, s->offset + (__u64)j * s->record_size, HO_E_CONFIG);
		}
	}
	return HO_OK;
}

/* section table entry @e */
static void ho_section_entry(const __u8 *e, struct ho_section *s)
{
	s->type = ho_get_le16(e + HO_SEC_OFF_TYPE);
	s->version = ho_get_le16(e + HO_SEC_OFF_VERSION);
	s->flags = ho_get_le32(e + HO_SEC_OFF_FLAGS);
	s->offset = ho_get_le64(e + HO_SEC_OFF_OFFSET);
	s->length = ho_get_le64(e + HO_SEC_OFF_LENGTH);
	s->count = ho_get_le32(e + HO_SEC_OFF_COUNT);
	s->record_size = ho_get_le32(e + HO_SEC_OFF_RECORD_SIZE);
}

/*
 * The header's checks once its magic and fixed part are there, in the Python reader's
 * order: version, section count, header size, @avail bytes holding the section table,
 * header CRC. Fills @v's version and generation, @header_size and @count.
 */
static int ho_check_header(const __u8 *b, __u64 avail, struct ho_view *v,
			   __u64 *header_size, __u32 *count, __u64 *err_off)
{
	v->major = ho_get_le16(b + HO_HDR_OFF_MAJOR);
	v->minor = ho_get_le16(b + HO_HDR_OFF_MINOR);
	v->generation = ho_get_le64(b + HO_HDR_OFF_GENERATION);
	*header_size = ho_get_le32(b + HO_HDR_OFF_HEADER_SIZE);
	*count = ho_get_le32(b + HO_HDR_OFF_SECTION_COUNT);
	if (v->major != HO_READ_MAJOR)
		return ho_fail(err_off, HO_HDR_OFF_MAJOR, HO_E_VERSION);
	if (*count > HO_MAX_SECTIONS)
		return ho_fail(err_off, HO_HDR_OFF_SECTION_COUNT, HO_E_SECTION_COUNT);
	if (*header_size != HO_HEADER_SIZE + (__u64)HO_SECTION_ENTRY_SIZE * *count)
		return ho_fail(err_off, HO_HDR_OFF_HEADER_SIZE, HO_E_HEADER_SIZE);
	if (avail < *header_size)
		return ho_fail(err_off, avail, HO_E_TRUNCATED);
	if (ho_crc32c(ho_crc32c(0, b, HO_HEADER_CRC_OFFSET), b + HO_HEADER_SIZE,
		      *header_size - HO_HEADER_SIZE) != ho_get_le32(b + HO_HDR_OFF_HEADER_CRC) &&
	    !HO_IGNORE_CRC)
		return ho_fail(err_off, HO_HDR_OFF_HEADER_CRC, HO_E_HEADER_CRC);
	return 0;
}

int ho_parse(const void *blob, __u64 n, struct ho_view *v, __u64 *err_off)
{
	const __u8 *b = blob;
	__u64 header_size, total, expect;
	__u32 count;
	int rc;

	*err_off = 0;
	v->blob = b;
	v->size = n;
	v->nsections = 0;
	/* header (read_header) */
	if (n == 0)
		return ho_fail(err_off, 0, HO_E_NOSTATE);
	if (n < HO_MAGIC_LEN || !ho_memeq(b, HO_MAGIC, HO_MAGIC_LEN)) {
		__u64 head = n < HO_NOSTATE_PROBE ? n : HO_NOSTATE_PROBE;

		if (ho_all_zero(b, head))
			return ho_fail(err_off, 0, HO_E_NOSTATE);
		if (n < HO_MAGIC_LEN && ho_memeq(b, HO_MAGIC, n))
			return ho_fail(err_off, n, HO_E_TRUNCATED);
		return ho_fail(err_off, 0, HO_E_MAGIC);
	}
	if (n < HO_HEADER_SIZE)
		return ho_fail(err_off, n, HO_E_TRUNCATED);
	rc = ho_check_header(b, n, v, &header_size, &count, err_off);
	if (rc)
		return rc;
	total = ho_get_le64(b + HO_HDR_OFF_TOTAL_SIZE);
	if (total > HO_MAX_BLOB_SIZE)
		return ho_fail(err_off, HO_HDR_OFF_TOTAL_SIZE, HO_E_TOTAL_SIZE);
	if (total > n)
		return ho_fail(err_off, n, HO_E_TRUNCATED);
	if (total < n)
		return ho_fail(err_off, total, HO_E_TRAILING);

	/* section table and section CRCs (read_sections) */
	expect = ho_align(header_size);
	if (!ho_all_zero(b + header_size, expect - header_size))
		return ho_fail(err_off, header_size, HO_E_PADDING);
	for (__u32 i = 0; i < count; i++) {
		const __u8 *e = b + HO_HEADER_SIZE + (__u64)i * HO_SECTION_ENTRY_SIZE;
		struct ho_section *s = &v->sec[i];
		__u64 end, nxt;
		int last = i + 1 == count;

		ho_section_entry(e, s);
		if (s->offset != expect)
			return ho_fail(err_off, (__u64)(e - b) + HO_SEC_OFF_OFFSET, HO_E_SECTION_OFFSET);
		if (s->length > total - s->offset)
			return ho_fail(err_off, (__u64)(e - b) + HO_SEC_OFF_LENGTH, HO_E_SECTION_LENGTH);
		for (__u32 k = 0; k < i; k++)
			if (v->sec[k].type == s->type)
				return ho_fail(err_off, (__u64)(e - b), HO_E_SECTION_DUP);
		end = s->offset + s->length;
		nxt = last ? end : ho_align(end);
		if (last && end != total)
			return ho_fail(err_off, end, HO_E_SECTION_END);
		if (nxt > total)
			return ho_fail(err_off, end, HO_E_SECTION_END);
		if (!ho_all_zero(b + end, nxt - end))
			return ho_fail(err_off, end, HO_E_PADDING);
		if (ho_crc32c(0, b + s->offset, s->length) != ho_get_le32(e + HO_SEC_OFF_CRC) &&
		    !HO_IGNORE_CRC)
			return ho_fail(err_off, s->offset, HO_E_SECTION_CRC);
		v->nsections = i + 1;
		expect = nxt;
	}
	if (count == 0 && total != header_size)
		return ho_fail(err_off, header_size, HO_E_SECTION_END);

	/* per-section structure (decode) */
	for (__u32 i = 0; i < count; i++) {
		const struct ho_section *s = &v->sec[i];
		int rsize = ho_record_size(s->type, 0), min = ho_record_size(s->type, 1);

		if (rsize < 0) {	/* unknown type */
			if (s->flags & HO_SEC_F_REQUIRED)
				return ho_fail(err_off, s->offset, HO_E_REQUIRED);
			/* records of a newer minor must still tile the section: ho_record() stays in bounds */
			if ((s->count || s->record_size) &&
			    (__u64)s->count * s->record_size != s->length)
				return ho_fail(err_off, s->offset, HO_E_RECORD_COUNT);
			continue;
		}
		if (rsize == 0) {	/* byte section */
			if (s->count || s->record_size)
				return ho_fail(err_off, s->offset, HO_E_BYTE_SECTION);
			if (s->type == HO_SEC_META || s->type == HO_SEC_PROVENANCE) {
				__u64 bad = ho_msgpack_check(b + s->offset, s->length);

				if (bad)
					return ho_fail(err_off, s->offset + bad - 1, HO_E_MSGPACK);
			}
			continue;
		}
		if (s->record_size < (__u32)min)
			return ho_fail(err_off, s->offset, HO_E_RECORD_SIZE);
		if ((__u64)s->count * s->record_size != s->length)
			return ho_fail(err_off, s->offset, HO_E_RECORD_COUNT);
		if ((s->flags & HO_SEC_F_ABSENT) && s->count)
			return ho_fail(err_off, s->offset, HO_E_ABSENT);
	}
	rc = ho_check_state(v, err_off);
	return rc;
}

__u32 ho_preserved_ranges_raw(const __u8 *res, __u32 nres, __u32 res_size,
			       const __u8 *pi, __u32 npi, __u32 pi_size,
			       void (*fn)(void *ctx, __u64 start, __u64 size, unsigned int kind),
			       void *ctx)
{
	__u32 skipped = 0;

	for (__u32 i = 0; i < nres; i++) {
		const __u8 *r = res + (__u64)i * res_size;
		__u64 start = ho_get_le64(r + HO_RESERVED_OFF_START);
		__u64 size = ho_get_le64(r + HO_RESERVED_OFF_SIZE);

		if (!size || start + size < start) {
			skipped++;
			continue;
		}
		fn(ctx, start, size, ho_get_le16(r + HO_RESERVED_OFF_KIND));
	}
	for (__u32 i = 0; i < npi; i++) {
		__u64 phys = ho_get_le64(pi + (__u64)i * pi_size + HO_PI_DESC_OFF_PHYS);

		if (phys > ~0ULL - 4096) {
			skipped++;
			continue;
		}
		fn(ctx, phys & ~0xfffULL, 4096, HO_RES_PI_DESC);
	}
	return skipped;
}

__u32 ho_preserved_ranges(const struct ho_view *v,
			   void (*fn)(void *ctx, __u64 start, __u64 size, unsigned int kind),
			   void *ctx)
{
	const struct ho_section *rs = ho_find_section(v, HO_SEC_RESERVED);
	const struct ho_section *ps = ho_find_section(v, HO_SEC_PI_DESC);

	return ho_preserved_ranges_raw(rs ? v->blob + rs->offset : 0, rs ? rs->count : 0,
				       rs ? rs->record_size : 0, ps ? v->blob + ps->offset : 0,
				       ps ? ps->count : 0, ps ? ps->record_size : 0, fn, ctx);
}

int ho_parse_head(const __u8 *b, __u64 head_len, __u64 size, struct ho_view *v,
		  __u64 *err_off)
{
	__u64 header_size;
	__u32 count;
	int rc;

	*err_off = 0;
	v->blob = 0;
	v->size = size;
	v->nsections = 0;
	if (head_len < HO_HEADER_SIZE || head_len > size)
		return ho_fail(err_off, head_len, HO_E_TRUNCATED);
	if (!ho_memeq(b, HO_MAGIC, HO_MAGIC_LEN))
		return ho_fail(err_off, 0, HO_E_MAGIC);
	rc = ho_check_header(b, head_len, v, &header_size, &count, err_off);
	if (rc)
		return rc;
	if (ho_get_le64(b + HO_HDR_OFF_TOTAL_SIZE) != size)
		return ho_fail(err_off, HO_HDR_OFF_TOTAL_SIZE, HO_E_TOTAL_SIZE);
	for (__u32 i = 0; i < count; i++) {
		const __u8 *e = b + HO_HEADER_SIZE + (__u64)i * HO_SECTION_ENTRY_SIZE;
		struct ho_section *s = &v->sec[i];
		__u64 at = (__u64)(e - b);

		ho_section_entry(e, s);
		if (s->offset < header_size || s->offset > size)
			return ho_fail(err_off, at + HO_SEC_OFF_OFFSET, HO_E_SECTION_OFFSET);
		if (s->length > size - s->offset)
			return ho_fail(err_off, at + HO_SEC_OFF_LENGTH, HO_E_SECTION_LENGTH);
		for (__u32 k = 0; k < i; k++)
			if (v->sec[k].type == s->type)
				return ho_fail(err_off, at, HO_E_SECTION_DUP);
		if (s->type == HO_SEC_RESERVED || s->type == HO_SEC_PI_DESC) {
			if (s->record_size < (__u32)ho_record_size(s->type, 1))
				return ho_fail(err_off, s->offset, HO_E_RECORD_SIZE);
			if ((__u64)s->count * s->record_size != s->length)
				return ho_fail(err_off, s->offset, HO_E_RECORD_COUNT);
		}
		v->nsections = i + 1;
	}
	return HO_OK;
}

/* ---- the region header (handover_region.h) ---------------------------------------- */
int ho_region_slots(const __u8 *hdr, __u64 region_size,
		    struct ho_region_slot out[HO_REGION_SLOTS])
{
	int n = 0;

	if (!ho_memeq(hdr + HO_REGION_HDR_OFF_MAGIC, HO_REGION_MAGIC, HO_REGION_MAGIC_LEN) ||
	    ho_get_le16(hdr + HO_REGION_HDR_OFF_LAYOUT_MAJOR) != HO_REGION_LAYOUT_MAJOR ||
	    ho_get_le32(hdr + HO_REGION_HDR_OFF_HEADER_SIZE) != HO_REGION_HDR_SIZE ||
	    ho_crc32c(0, hdr, HO_REGION_HDR_CRC_LEN) !=
	    ho_get_le32(hdr + HO_REGION_HDR_OFF_HDR_CRC) ||
	    ho_get_le64(hdr + HO_REGION_HDR_OFF_REGION_SIZE) > region_size)
		return -1;
	for (int i = 0; i < HO_REGION_SLOTS; i++) {
		const __u8 *d = hdr + HO_REGION_HDR_OFF_SLOT + i * HO_REGION_SLOT_SIZE;
		struct ho_region_slot s = {
			.offset = ho_get_le64(d + HO_REGION_SLOT_OFF_OFFSET),
			.capacity = ho_get_le64(d + HO_REGION_SLOT_OFF_CAPACITY),
			.generation = ho_get_le64(d + HO_REGION_SLOT_OFF_GENERATION),
			.length = ho_get_le64(d + HO_REGION_SLOT_OFF_LENGTH),
			.crc = ho_get_le32(d + HO_REGION_SLOT_OFF_CRC),
		};

		if (s.generation && s.length <= s.capacity && s.offset <= region_size &&
		    s.length <= region_size - s.offset && s.length <= HO_MAX_BLOB_SIZE)
			out[n++] = s;
	}
	return n;
}
