// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * ho_check: run the freestanding C parser on blobs, for the differential tests.
 *
 *   ho_check FILE...        one verdict line per file
 *   ho_check --stream       stdin holds records of (u64 little-endian length, bytes);
 *                           one verdict line per record on stdout
 *   ho_check --ranges FILE  the verdict, then one "<start> <size> <kind>" line (hex, hex,
 *                           decimal) per range the kernel reserves (ho_preserved_ranges),
 *                           then "skipped <n>"
 *   ho_check --head FILE    the early-boot view: ho_parse_head() on the first bytes of FILE
 *                           (at most the largest header and section table), then, when it
 *                           is OK, the ranges ho_preserved_ranges_raw() gives for the
 *                           RESERVED and PI_DESC sections, as --ranges prints them
 *   ho_check --region FILE  FILE is a whole region: per header copy, "copy <n> invalid" or
 *                           "copy <n> slots <k>" then one "<generation> <offset> <length>
 *                           <capacity> <crc>" line (decimal) per slot ho_region_slots() keeps
 *
 * A verdict line is "OK <major>.<minor> <nsections>" or "<ERROR_NAME> <offset>".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handover_parse.h"

static void verdict(const unsigned char *buf, unsigned long long n)
{
	static struct ho_view v;
	__u64 off = 0;
	int rc = ho_parse(buf, n, &v, &off);

	if (rc == HO_OK)
		printf("OK %u.%u %u\n", v.major, v.minor, v.nsections);
	else
		printf("%s %llu\n", ho_strerror(rc), (unsigned long long)off);
}

static void print_range(void *ctx, __u64 start, __u64 size, unsigned int kind)
{
	(void)ctx;
	printf("%llx %llx %u\n", (unsigned long long)start, (unsigned long long)size, kind);
}

static unsigned char *read_all(FILE *f, size_t n)
{
	unsigned char *buf = malloc(n ? n : 1);

	if (!buf || fread(buf, 1, n, f) != n) {
		free(buf);
		return NULL;
	}
	return buf;
}

static int region(const char *path)
{
	FILE *f = fopen(path, "rb");
	long n;
	unsigned char *buf;

	if (!f || fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) ||
	    n < HO_REGION_DATA_START) {
		fprintf(stderr, "ho_check: %s: not a region\n", path);
		return 2;
	}
	buf = read_all(f, (size_t)n);
	fclose(f);
	if (!buf)
		return 2;
	for (int c = 0; c < HO_REGION_HDR_COPIES; c++) {
		struct ho_region_slot s[HO_REGION_SLOTS];
		int k = ho_region_slots(buf + c * HO_REGION_HDR_BLOCK, (__u64)n, s);

		if (k < 0) {
			printf("copy %d invalid\n", c);
			continue;
		}
		printf("copy %d slots %d\n", c, k);
		for (int i = 0; i < k; i++)
			printf("%llu %llu %llu %llu %u\n", (unsigned long long)s[i].generation,
			       (unsigned long long)s[i].offset, (unsigned long long)s[i].length,
			       (unsigned long long)s[i].capacity, s[i].crc);
	}
	free(buf);
	return 0;
}

static int head(const char *path)
{
	FILE *f = fopen(path, "rb");
	static struct ho_view v;
	const struct ho_section *rs, *ps;
	unsigned char *buf;
	__u64 off = 0, hl;
	long n;
	int rc;

	if (!f || fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
		perror(path);
		return 2;
	}
	buf = read_all(f, (size_t)n);
	fclose(f);
	if (!buf)
		return 2;
	hl = HO_HEADER_SIZE + HO_SECTION_ENTRY_SIZE * HO_MAX_SECTIONS;
	if (hl > (__u64)n)
		hl = (__u64)n;
	rc = ho_parse_head(buf, hl, (__u64)n, &v, &off);
	if (rc != HO_OK) {
		printf("%s %llu\n", ho_strerror(rc), (unsigned long long)off);
		free(buf);
		return 0;
	}
	printf("OK %u.%u %u\n", v.major, v.minor, v.nsections);
	rs = ho_find_section(&v, HO_SEC_RESERVED);
	ps = ho_find_section(&v, HO_SEC_PI_DESC);
	printf("skipped %u\n", ho_preserved_ranges_raw(rs ? buf + rs->offset : NULL, rs ? rs->count : 0,
						       rs ? rs->record_size : 0,
						       ps ? buf + ps->offset : NULL, ps ? ps->count : 0,
						       ps ? ps->record_size : 0, print_range, NULL));
	free(buf);
	return 0;
}

int main(int argc, char **argv)
{
	if (ho_crc32c(0, "123456789", 9) != HO_CRC32C_CHECK) {
		fprintf(stderr, "ho_check: CRC32C self-test failed\n");
		return 2;
	}
	if (argc == 2 && !strcmp(argv[1], "--stream")) {
		unsigned char len[8];

		while (fread(len, 1, 8, stdin) == 8) {
			unsigned long long n = 0;
			unsigned char *buf;

			for (int i = 7; i >= 0; i--)
				n = n << 8 | len[i];
			buf = read_all(stdin, n);
			if (!buf) {
				fprintf(stderr, "ho_check: short record\n");
				return 2;
			}
			verdict(buf, n);
			free(buf);
		}
		fflush(stdout);
		return 0;
	}
	if (argc == 3 && !strcmp(argv[1], "--region"))
		return region(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "--head"))
		return head(argv[2]);
	int ranges = argc == 3 && !strcmp(argv[1], "--ranges");

	for (int i = 1 + ranges; i < argc; i++) {
		FILE *f = fopen(argv[i], "rb");
		long n;
		unsigned char *buf;

		if (!f || fseek(f, 0, SEEK_END) || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
			perror(argv[i]);
			return 2;
		}
		buf = read_all(f, (size_t)n);
		fclose(f);
		if (!buf)
			return 2;
		verdict(buf, (unsigned long long)n);
		if (ranges) {
			static struct ho_view v;
			__u64 off;

			if (ho_parse(buf, (__u64)n, &v, &off) == HO_OK)
				printf("skipped %u\n", ho_preserved_ranges(&v, print_range, NULL));
		}
		free(buf);
	}
	return 0;
}
