/*
 * edu_dma: a freestanding x86 guest program (multiboot, 32-bit protected mode, no paging)
 * for a nested VM in the handover lab. It finds QEMU's edu device (1234:11e8, passed through
 * with vfio-pci), then does DMA rounds forever: a pattern RAM -> edu's buffer, back edu ->
 * RAM, compared; every DMA asks for edu's completion interrupt, an MSI (edu's MSI capability,
 * to the local APIC; a keepalive device must use MSI or MSI-X: set-keepalive refuses INTx).
 * Each round it also checks a register it wrote once at start (edu's liveness register, which
 * returns the complement of what was written) and reads the CMOS clock, which follows the host's
 * wall clock, so that a pause of the VM (stop, save, restart) shows as a gap between two rounds.
 * An interrupt whose status has POKE_BIT was raised by someone else (the lab host, through
 * edu's raise register, while no VMM owned the device): it is counted apart.
 * With an NVMe controller too, each round also writes a block and reads it back (nvme.c).
 * Progress is a record in its own RAM at PROGRESS_ADDR, which the lab backs with a device-dax
 * file (memory-backend-file share=on), so the host reads it from outside. Built by
 * tests/system/nested.py: gcc -m32 -ffreestanding.
 */
#include "workload.h"

static volatile u32 *edu;
static volatile u32 edu_irqs;
volatile u32 ticks;
volatile struct progress *const P = (volatile struct progress *)PROGRESS_ADDR;



/* called from the interrupt stubs (start.S); the timer comes through the 8259 (ExtINT) */
void on_timer(void) { ticks++; P->ticks = ticks; outb(0x20, 0x20); }

void on_edu(void)
{
	u32 st = edu[0x24 / 4];
	if (st) {
		edu[0x64 / 4] = st;     /* acknowledge */
		if (st & POKE_BIT)
			P->poked++;
		if (st & ~POKE_BIT) {
			edu_irqs++;
			P->irqs = edu_irqs;
		}
	} else {
		P->spurious++;
	}
	lapic_eoi();
}

/* the CMOS clock (host wall clock), seconds of the day; BCD unless status B says binary */
static u32 cmos(u8 reg) { outb(0x70, reg); return inb(0x71); }
static u32 bcd(u32 v, int binary) { return binary ? v : (v >> 4) * 10 + (v & 0xf); }

static u32 rtc_seconds(void)
{
	u32 s, m, h;
	do {
		while (cmos(0x0a) & 0x80)
			;
		s = cmos(0x00); m = cmos(0x02); h = cmos(0x04);
	} while (s != cmos(0x00));
	int bin = cmos(0x0b) & 4;
	return bcd(h & 0x7f, bin) * 3600 + bcd(m, bin) * 60 + bcd(s, bin);
}

/* MSI to APIC ID 0 (the only CPU), fixed delivery, edge, MSI_VECTOR */
static void enable_msi(u32 bdf, u32 pos)
{
	u32 ctl = pci_rd(bdf, pos) >> 16;
	pci_wr(bdf, pos + 4, LAPIC);
	if (ctl & 0x80) {               /* 64-bit address */
		pci_wr(bdf, pos + 8, 0);
		pci_wr(bdf, pos + 12, MSI_VECTOR);
	} else {
		pci_wr(bdf, pos + 8, MSI_VECTOR);
	}
	ctl = (ctl & ~0x70u) | 1;       /* one vector, enabled */
	pci_wr(bdf, pos, (pci_rd(bdf, pos) & 0xffff) | ctl << 16);
}

/* the IDT: every vector to an iret, the timer and edu's MSI to their handlers */
struct gate { u16 lo, sel; u8 zero, type; u16 hi; } __attribute__((packed));
static struct gate idt[256];
static struct { u16 limit; u32 base; } __attribute__((packed)) idtr;
extern void isr_other(void), isr_timer(void), isr_edu(void), isr_nvme_admin(void), isr_nvme_io(void);

static void set_gate(int v, void (*h)(void))
{
	u32 a = (u32)h;
	idt[v].lo = a & 0xffff; idt[v].hi = a >> 16; idt[v].sel = 0x08; idt[v].zero = 0; idt[v].type = 0x8e;
}

static void setup_interrupts(void)
{
	for (int v = 0; v < 256; v++)
		set_gate(v, isr_other);
	set_gate(PIC_BASE + 0, isr_timer);
	set_gate(MSI_VECTOR, isr_edu);
	set_gate(0x50, isr_nvme_admin);
	set_gate(0x51, isr_nvme_io);
	idtr.limit = sizeof(idt) - 1;
	idtr.base = (u32)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr));
	/* 8259 pair: ICW1..4, vectors 0x20 and 0x28, cascade on IRQ2; ELCR (level for PCI
	 * lines) as SeaBIOS left it */
	u8 elcr0 = inb(0x4d0), elcr1 = inb(0x4d1);
	outb(0x20, 0x11); outb(0xa0, 0x11);
	outb(0x21, PIC_BASE); outb(0xa1, PIC_BASE + 8);
	outb(0x21, 4); outb(0xa1, 2);
	outb(0x21, 1); outb(0xa1, 1);
	outb(0x4d0, elcr0); outb(0x4d1, elcr1);
	u16 mask = 0xffff & ~(1u << 0) & ~(1u << 2);
	outb(0x21, mask & 0xff); outb(0xa1, mask >> 8);
	/* the local APIC: software-enabled (spurious vector 0xff), LINT0 ExtINT for the 8259,
	 * LINT1 NMI (virtual wire), all priorities accepted */
	lapic_wr(0xf0, 0x1ff);
	lapic_wr(0x350, 0x700);
	lapic_wr(0x360, 0x400);
	lapic_wr(0x80, 0);
	/* PIT channel 0: 100 Hz */
	outb(0x43, 0x34); outb(0x40, 11932 & 0xff); outb(0x40, 11932 >> 8);
	__asm__ volatile("sti");
}

/* one DMA; waits for edu's interrupt (hlt), or sees the end by polling after 0.5 s */
static int dma(u32 src, u32 dst, u32 to_ram)
{
	u32 before = edu_irqs, t0 = ticks;
	edu[0x80 / 4] = src;          /* a 4-byte write sets the whole 64-bit register */
	edu[0x88 / 4] = dst;
	edu[0x90 / 4] = ROUND_BYTES;
	edu[0x98 / 4] = 1 | (to_ram ? 2 : 0) | 4;     /* run, direction, interrupt */
	for (;;) {
		__asm__ volatile("hlt");
		if (edu_irqs != before)
			return 0;
		if (ticks - t0 > 50 && !(edu[0x98 / 4] & 1)) {
			P->polled++;
			return 0;
		}
		if (ticks - t0 > 1000)
			return -1;
	}
}

void main(void)
{
	for (int i = 0; i < (int)sizeof(*P) / 4; i++)
		((volatile u32 *)P)[i] = 0;
	P->state = 1;
	u32 bdf = 0xffffffff;
	for (u32 d = 0; d < 32 * 8 && bdf == 0xffffffff; d++)
		if (pci_rd(d, 0) == 0x11e81234)
			bdf = d;
	if (bdf == 0xffffffff) {
		P->state = 0xdead0001;      /* no edu */
		for (;;) __asm__ volatile("cli; hlt");
	}
	P->bdf = bdf;
	P->bar0 = pci_rd(bdf, 0x10) & ~0xfu;
	P->irq_line = pci_rd(bdf, 0x3c) & 0xff;
	P->msi_cap = pci_find_cap(bdf, 0x05);
	/* memory space and bus master on, INTx disabled */
	pci_wr(bdf, 0x04, (pci_rd(bdf, 0x04) & 0xffff) | 0x406);
	edu = (volatile u32 *)P->bar0;
	P->edu_id = edu[0];
	edu[0x04 / 4] = ALIVE_VALUE;
	if ((P->edu_id & 0xff) != 0xed || edu[0x04 / 4] != ~ALIVE_VALUE || !P->msi_cap) {
		P->state = 0xdead0002;      /* not edu's registers, or no MSI capability */
		for (;;) __asm__ volatile("cli; hlt");
	}
	const char *m = "EDUPROG1";
	for (int i = 0; i < 8; i++)
		P->magic[i] = m[i];
	P->state = 2;
	setup_interrupts();
	enable_msi(bdf, P->msi_cap);
	P->nvme_state = (u32)nvme_setup();
	P->rtc = rtc_seconds();
	P->state = 3;
	volatile u8 *src = (volatile u8 *)SRC_ADDR, *dst = (volatile u8 *)DST_ADDR;
	for (u32 round = 1;; round++) {
		for (u32 i = 0; i < ROUND_BYTES; i++) {
			src[i] = (u8)(round * 31 + i);
			dst[i] = 0;
		}
		P->last_pattern = round;
		if (dma(SRC_ADDR, EDU_BUF, 0) || dma(EDU_BUF, DST_ADDR, 1)) {
			P->state = 0xdead0003;  /* edu never ended a DMA */
			for (;;) __asm__ volatile("cli; hlt");
		}
		int same = 1;
		for (u32 i = 0; i < ROUND_BYTES; i++)
			same &= src[i] == dst[i];
		if (same)
			P->rounds++;
		else
			P->errors++;
		if (P->nvme_state == 1 && nvme_round(round))
			P->nvme_hung++;
		if (edu[0x04 / 4] != ~ALIVE_VALUE)
			P->alive_bad++;
		u32 now = rtc_seconds(), gap = (now + 86400 - P->rtc) % 86400;
		if (gap > P->max_gap) {
			P->max_gap = gap;
			P->gap_round = P->rounds;
		}
		P->rtc = now;
	}
}
