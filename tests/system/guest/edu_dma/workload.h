/* workload.h: what edu_dma.c and nvme.c share (the freestanding workload of the lab's VM) */
#ifndef WORKLOAD_H
#define WORKLOAD_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define PROGRESS_ADDR 0x300000u     /* the record (guest physical = offset in the RAM file) */
#define SRC_ADDR      0x400000u     /* RAM -> edu */
#define DST_ADDR      0x401000u     /* edu -> RAM */
#define EDU_BUF       0x40000u      /* edu's internal DMA buffer */
#define ROUND_BYTES   256u
#define PIC_BASE      0x20u         /* IRQ n -> vector 0x20 + n */
#define MSI_VECTOR    0x41u         /* edu's MSI */
#define LAPIC         0xfee00000u   /* the local APIC (and the MSI address of APIC ID 0) */
#define ALIVE_VALUE   0x12345678u   /* written once to edu's liveness register (0x04) */
#define POKE_BIT      0x10000u      /* an interrupt status the workload never asks for */

/* an NVMe queue pair's state, kept in guest RAM with the queues */
struct nvme_q {
	u32 sq_tail, cq_head, phase, next_cid;
	u32 inflight;           /* cid + 1 of the command awaited, 0 when none */
};

/* read by tests/system/guest/edu_progress.py: field order is its FIELDS */
struct progress {
	char magic[8];          /* "EDUPROG1" once the record is live */
	u32 state;              /* 1 searching, 2 edu found, 3 running, 0xdead... errors */
	u32 rounds;             /* DMA rounds (2 DMAs each) whose data compared equal */
	u32 irqs;               /* edu completion interrupts handled */
	u32 polled;             /* DMAs whose end was seen by polling (no interrupt in 0.5 s) */
	u32 errors;             /* rounds whose data differed */
	u32 ticks;              /* PIT ticks (100 Hz) */
	u32 bdf;                /* bus << 8 | dev << 3 | fn of edu */
	u32 bar0;               /* edu's BAR0 */
	u32 irq_line;           /* the PIC line SeaBIOS gave edu (unused: MSI) */
	u32 edu_id;             /* edu register 0x00 */
	u32 last_pattern;
	u32 msi_cap;            /* config offset of edu's MSI capability */
	u32 alive_bad;          /* rounds that found the liveness register lost */
	u32 poked;              /* interrupts with POKE_BIT in their status (raised from outside) */
	u32 spurious;           /* interrupts with no status bit set */
	u32 rtc;                /* CMOS clock at the last round, seconds of the day */
	u32 max_gap;            /* the longest CMOS-clock gap between two rounds, seconds */
	u32 gap_round;          /* the round that ended that gap */
	/* NVMe (nvme.c), when the VM has a controller */
	u32 nvme_state;         /* 0 none, 1 running, negative (as u32): its setup failed */
	u32 nvme_bdf;
	u32 nvme_rounds;        /* write + read back of 4 KiB, compared equal */
	u32 nvme_errors;        /* rounds whose data differed */
	u32 nvme_status_errors; /* commands completed with an error status */
	u32 nvme_irqs_admin;    /* MSI-X vector 0 interrupts */
	u32 nvme_irqs_io;       /* MSI-X vector 1 interrupts */
	u32 nvme_stray;         /* completions of no command in flight */
	u32 nvme_hung;          /* commands not completed within 10 s */
	struct nvme_q nq[2];    /* admin, I/O queue 1 */
};

extern volatile struct progress *const P;
extern volatile u32 ticks;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 pci_rd(u32 bdf, u32 off) { outl(0xcf8, 0x80000000u | bdf << 8 | (off & 0xfc)); return inl(0xcfc); }
static inline void pci_wr(u32 bdf, u32 off, u32 v) { outl(0xcf8, 0x80000000u | bdf << 8 | (off & 0xfc)); outl(0xcfc, v); }
/* the config offset of capability @id of function @bdf, 0 when it has none */
static inline u32 pci_find_cap(u32 bdf, u32 id)
{
	if (!(pci_rd(bdf, 0x04) & (1u << 20)))
		return 0;
	u32 pos = pci_rd(bdf, 0x34) & 0xfc;
	for (int n = 0; pos && n < 48; n++) {
		u32 hdr = pci_rd(bdf, pos);
		if ((hdr & 0xff) == id)
			return pos;
		pos = (hdr >> 8) & 0xfc;
	}
	return 0;
}

static inline void lapic_wr(u32 reg, u32 v) { *(volatile u32 *)(LAPIC + reg) = v; }
static inline void lapic_eoi(void) { lapic_wr(0xb0, 0); }

int nvme_setup(void);
int nvme_round(u32 round);

#endif
