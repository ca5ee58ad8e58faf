/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * handover.h - device keepalive state handed over across kexec (the kernel side).
 *
 * The state lives in a persistent-memory region named on the command line with
 * handover=<size>@<phys>. Early in setup_arch() the kernel finds the newest valid blob in
 * the region (layout: handover/pmem/layout.py), copies it to RAM, validates it with the
 * freestanding parser (lib/handover/parse.c) and, if it is valid, reserves every physical
 * range it lists before the page allocator takes memory. /sys/kernel/handover/ reports.
 */
#ifndef _LINUX_HANDOVER_H
#define _LINUX_HANDOVER_H

#include <linux/init.h>
#include <linux/types.h>

struct pci_dev;

#ifdef CONFIG_HANDOVER
void __init handover_reserve(void);
bool handover_state_valid(void);
bool handover_keep_ir(const char *name, u64 reg_phys, u64 irta);
bool handover_armed(void);
bool handover_keepalive_pci(struct pci_dev *pdev);
#else
static inline void handover_reserve(void) { }
static inline bool handover_state_valid(void) { return false; }
static inline bool handover_keep_ir(const char *name, u64 reg_phys, u64 irta) { return false; }
static inline bool handover_armed(void) { return false; }
static inline bool handover_keepalive_pci(struct pci_dev *pdev) { return false; }
#endif

#endif /* _LINUX_HANDOVER_H */
