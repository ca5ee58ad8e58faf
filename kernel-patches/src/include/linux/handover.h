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
struct resource;

#ifdef CONFIG_HANDOVER
void __init handover_reserve(void);
bool handover_state_valid(void);
bool handover_keep_ir(const char *name, u64 reg_phys, u64 cap, u64 ecap, u64 irta);
bool handover_armed(void);
bool handover_keepalive_pci(struct pci_dev *pdev);
/* the new kernel: adoption of a validated state's keepalive devices */
bool handover_keep_dma(const char *name, u64 reg_phys, u64 cap, u64 ecap, u64 rtaddr);
bool handover_keep_context_table(u64 phys);
void handover_release_unadopted(void);
bool handover_keep_context(const char *name, u16 seg, u8 bus, u8 devfn, u64 lo, u64 hi);
bool handover_context_held(u16 seg, u8 bus, u8 devfn);
void handover_register_iommu_release(void (*fn)(struct pci_dev *pdev));
bool handover_pci_held(struct pci_dev *pdev);
bool handover_pci_bar(struct pci_dev *pdev, int index, struct resource *res);
int handover_pci_open(struct pci_dev *pdev, const u8 *token);
bool handover_pci_may_open(struct pci_dev *pdev);
int handover_irte_index(struct pci_dev *pdev, u64 reg_phys, bool msix, unsigned int msi_index);
#else
static inline void handover_reserve(void) { }
static inline bool handover_state_valid(void) { return false; }
static inline bool handover_keep_ir(const char *name, u64 reg_phys, u64 cap, u64 ecap, u64 irta)
{ return false; }
static inline bool handover_armed(void) { return false; }
static inline bool handover_keepalive_pci(struct pci_dev *pdev) { return false; }
static inline bool handover_keep_dma(const char *name, u64 reg_phys, u64 cap, u64 ecap, u64 rtaddr)
{ return false; }
static inline bool handover_keep_context_table(u64 phys) { return false; }
static inline void handover_release_unadopted(void) { }
static inline bool handover_keep_context(const char *name, u16 seg, u8 bus, u8 devfn, u64 lo, u64 hi)
{ return false; }
static inline bool handover_context_held(u16 seg, u8 bus, u8 devfn) { return false; }
static inline void handover_register_iommu_release(void (*fn)(struct pci_dev *pdev)) { }
static inline bool handover_pci_held(struct pci_dev *pdev) { return false; }
static inline bool handover_pci_bar(struct pci_dev *pdev, int index, struct resource *res)
{ return false; }
static inline int handover_pci_open(struct pci_dev *pdev, const u8 *token) { return 0; }
static inline bool handover_pci_may_open(struct pci_dev *pdev) { return true; }
static inline int handover_irte_index(struct pci_dev *pdev, u64 reg_phys, bool msix,
				      unsigned int msi_index) { return -1; }
#endif

#endif /* _LINUX_HANDOVER_H */
