/*
 * edu_dma: a freestanding x86 guest program (multiboot, 32-bit protected mode, no paging)
 * for a nested VM in the handover lab. It finds QEMU's edu device (1234:11e8, passed through
 * with vfio-pci), then does DMA rounds forever: a pattern RAM -> edu's buffer, back edu ->
 * RAM, compared; every DMA asks for edu's completion interrupt (INTx through the 8259 PIC,
 * as SeaBIOS routed it). Progress is a record in its own RAM at PROGRESS_ADDR, which the lab
 * backs with a device-dax file (memory-backend-file share=on), so the host reads it from
 * outside. Built by tests/system/guest/edu_dma/build.py: gcc -m32 -ffreestanding.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define PROGRESS_ADDR 0x300000u     /* the record (guest physical = offset in the RAM file) */
#define SRC_ADDR      0x400000u     /* RAM -> edu */
#define DST_ADDR      0x401000u     /* edu -> RAM */
#define EDU_BUF       0x40000u      /* edu's internal DMA buffer */
#define ROUND_BYTES   256u
#define PIC_BASE      0x20u         /* IRQ n -> vector 0x20 + n */

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
	u32 irq_line;           /* the PIC line SeaBIOS gave edu */
	u32 edu_id;             /* edu register 0x00 */
	u32 last_pattern;
};

static volatile struct progress *const P = (volatile struct progress *)PROGRESS_ADDR;
static volatile u32 *edu;
static volatile u32 edu_irqs, ticks;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static u32 pci_rd(u32 bdf, u32 off) { outl(0xcf8, 0x80000000u | bdf << 8 | (off & 0xfc)); return inl(0xcfc); }
static void pci_wr(u32 bdf, u32 off, u32 v) { outl(0xcf8, 0x80000000u | bdf << 8 | (off & 0xfc)); outl(0xcfc, v); }

static void eoi(u32 irq)
{
	if (irq >= 8)
		outb(0xa0, 0x20);
	outb(0x20, 0x20);
}

/* called from the interrupt stubs (start.S) */
void on_timer(void) { ticks++; P->ticks = ticks; eoi(0); }

void on_edu(void)
{
	u32 st = edu[0x24 / 4];
	if (st) {
		edu[0x64 / 4] = st;     /* acknowledge: edu lowers INTx */
		edu_irqs++;
		P->irqs = edu_irqs;
	}
	eoi(P->irq_line);
}

/* the IDT: every vector to an iret, the timer and edu's line to their handlers */
struct gate { u16 lo, sel; u8 zero, type; u16 hi; } __attribute__((packed));
static struct gate idt[256];
static struct { u16 limit; u32 base; } __attribute__((packed)) idtr;
extern void isr_other(void), isr_timer(void), isr_edu(void);

static void set_gate(int v, void (*h)(void))
{
	u32 a = (u32)h;
	idt[v].lo = a & 0xffff; idt[v].hi = a >> 16; idt[v].sel = 0x08; idt[v].zero = 0; idt[v].type = 0x8e;
}

static void setup_interrupts(u32 line)
{
	for (int v = 0; v < 256; v++)
		set_gate(v, isr_other);
	set_gate(PIC_BASE + 0, isr_timer);
	set_gate(PIC_BASE + line, isr_edu);
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
	u16 mask = 0xffff & ~(1u << 0) & ~(1u << 2) & ~(1u << line);
	outb(0x21, mask & 0xff); outb(0xa1, mask >> 8);
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
	/* memory space and bus master on, INTx not disabled */
	pci_wr(bdf, 0x04, (pci_rd(bdf, 0x04) & 0xffff & ~0x400u) | 0x6);
	edu = (volatile u32 *)P->bar0;
	P->edu_id = edu[0];
	edu[0x04 / 4] = 0x12345678;
	if ((P->edu_id & 0xff) != 0xed || edu[0x04 / 4] != ~0x12345678u || P->irq_line >= 16 || P->irq_line == 2) {
		P->state = 0xdead0002;      /* not edu's registers, or no usable INTx line */
		for (;;) __asm__ volatile("cli; hlt");
	}
	const char *m = "EDUPROG1";
	for (int i = 0; i < 8; i++)
		P->magic[i] = m[i];
	P->state = 2;
	setup_interrupts(P->irq_line);
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
	}
}
