// SPDX-License-Identifier: GPL-2.0-only OR MIT
/* libFuzzer target for the freestanding parser: it must never read out of bounds, hang or
 * trip UBSan, whatever the input. Build: see tests/c/Makefile (make fuzz). */
#include <stddef.h>
#include <stdint.h>

#include "handover_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct ho_view v;
	__u64 off;
	int rc = ho_parse(data, size, &v, &off);

	if (rc == HO_OK) {
		/* walk every record of every section like a consumer would */
		volatile __u64 sink = 0;

		for (__u32 i = 0; i < v.nsections; i++)
			for (__u32 j = 0; j < v.sec[i].count; j++)
				sink += *ho_record(&v, &v.sec[i], j);
	} else if (off > size) {
		__builtin_trap();	/* an error offset must point inside (or at the end of) the input */
	}
	return 0;
}
