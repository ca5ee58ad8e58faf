/*
 * nvme.c: the NVMe part of the edu_dma workload (a freestanding guest program, see edu_dma.c).
 * When the VM has an NVMe controller (class 01:08:02, passed through with vfio-pci), it is
 * brought up once (admin queue, one I/O queue pair, MSI-X: vector 0 admin, vector 1 I/O) and
 * every round writes a 4 KiB pattern to a block and reads it back, each command's completion
 * awaited on its MSI-X interrupt (hlt), the data compared. The queues live in guest RAM, so
 * a VM restored on the same RAM goes on with them: same doorbells, same phase tags, no
 * controller reset. Counts go to the progress record (edu_dma.c, struct progress).
 */
#include "workload.h"

#define NVME_ASQ      0x500000u     /* admin SQ: 16 entries of 64 bytes */
#define NVME_ACQ      0x501000u     /* admin CQ: 16 entries of 16 bytes */
#define NVME_IOSQ     0x502000u
#define NVME_IOCQ     0x503000u
#define NVME_WBUF     0x504000u     /* write data */
#define NVME_RBUF     0x505000u     /* read data */
#define NVME_IDBUF    0x506000u     /* identify data */
#define QDEPTH        16u
#define VEC_ADMIN     0x50u
#define VEC_IO        0x51u

struct sqe { u32 cdw0, nsid, rsvd2, rsvd3; u32 mptr_lo, mptr_hi; u32 prp1_lo, prp1_hi;
	     u32 prp2_lo, prp2_hi; u32 cdw10, cdw11, cdw12, cdw13, cdw14, cdw15; };
struct cqe { u32 result, rsvd; u16 sq_head, sq_id; u16 cid, status; };

/* the queue state lives in the progress record (guest RAM): it survives a save and restore */
static volatile u32 *nv;        /* BAR0 */
static u32 dstrd;

static void nv_wr64(u32 off, u32 lo, u32 hi) { nv[off / 4] = lo; nv[off / 4 + 1] = hi; }
static volatile u32 *sq_db(u32 qid) { return &nv[(0x1000 + (2 * qid) * (4u << dstrd)) / 4]; }
static volatile u32 *cq_db(u32 qid) { return &nv[(0x1000 + (2 * qid + 1) * (4u << dstrd)) / 4]; }

void on_nvme_admin(void) { P->nvme_irqs_admin++; lapic_eoi(); }
void on_nvme_io(void) { P->nvme_irqs_io++; lapic_eoi(); }

/* submit on queue qid (0 admin, 1 I/O), wait for its completion; -1 on timeout */
static int nvme_cmd(u32 qid, struct sqe *cmd, u32 *status)
{
	volatile struct nvme_q *q = &P->nq[qid];
	volatile struct sqe *sq = (volatile struct sqe *)(qid ? NVME_IOSQ : NVME_ASQ);
	volatile struct cqe *cq = (volatile struct cqe *)(qid ? NVME_IOCQ : NVME_ACQ);
	u32 cid = q->next_cid++ & 0xffff, t0 = ticks;

	cmd->cdw0 = (cmd->cdw0 & 0xffff) | cid << 16;
	volatile u32 *dst = (volatile u32 *)&sq[q->sq_tail];
	const u32 *src = (const u32 *)cmd;
	for (int i = 0; i < 16; i++)
		dst[i] = src[i];
	q->sq_tail = (q->sq_tail + 1) % QDEPTH;
	q->inflight = cid + 1;
	*sq_db(qid) = q->sq_tail;
	for (;;) {
		volatile struct cqe *e = &cq[q->cq_head];
		u32 st = e->status;
		if ((st & 1) == q->phase) {
			u32 got = e->cid;
			q->cq_head = (q->cq_head + 1) % QDEPTH;
			if (!q->cq_head)
				q->phase ^= 1;
			*cq_db(qid) = q->cq_head;
			if (got != cid) {
				P->nvme_stray++;            /* a completion of no command in flight */
				continue;
			}
			q->inflight = 0;
			*status = st >> 1;
			return 0;
		}
		if (ticks - t0 > 1000)
			return -1;
		__asm__ volatile("hlt");
	}
}

static u32 bar_addr(u32 bdf, u32 bir)
{
	u32 lo = pci_rd(bdf, 0x10 + 4 * bir);
	if ((lo & 6) == 4 && pci_rd(bdf, 0x14 + 4 * bir))
		return 0;                           /* above 4 GiB: unreachable without paging */
	return lo & ~0xfu;
}

/* find and bring up the controller; 0 when there is none, <0 when it failed */
int nvme_setup(void)
{
	u32 bdf = 0xffffffff;
	for (u32 d = 0; d < 32 * 8 && bdf == 0xffffffff; d++)
		if (pci_rd(d, 0) != 0xffffffff && (pci_rd(d, 0x08) >> 8) == 0x010802)
			bdf = d;
	if (bdf == 0xffffffff)
		return 0;
	P->nvme_bdf = bdf;
	u32 msix = pci_find_cap(bdf, 0x11);
	u32 bar0 = bar_addr(bdf, 0);
	if (!msix || !bar0)
		return -1;
	pci_wr(bdf, 0x04, (pci_rd(bdf, 0x04) & 0xffff) | 0x406);   /* memory, master, no INTx */
	nv = (volatile u32 *)bar0;
	/* MSI-X: entry 0 admin, entry 1 I/O, to APIC ID 0 */
	u32 tbl = pci_rd(bdf, msix + 4);
	u32 tbar = bar_addr(bdf, tbl & 7);
	if (!tbar)
		return -2;
	volatile u32 *t = (volatile u32 *)(tbar + (tbl & ~7u));
	for (u32 i = 0; i < 2; i++) {
		t[4 * i] = LAPIC;
		t[4 * i + 1] = 0;
		t[4 * i + 2] = i ? VEC_IO : VEC_ADMIN;
		t[4 * i + 3] = 0;                   /* unmasked */
	}
	pci_wr(bdf, msix, (pci_rd(bdf, msix) & 0xffff) | (0x8000u << 16));
	/* controller: disable, queues, enable */
	u32 cap_hi = nv[1];
	dstrd = cap_hi & 0xf;
	nv[0x14 / 4] = 0;
	for (u32 t0 = ticks; nv[0x1c / 4] & 1; )
		if (ticks - t0 > 500)
			return -3;
	for (u32 i = 0; i < 4096 / 4; i++) {
		((volatile u32 *)NVME_ASQ)[i] = 0; ((volatile u32 *)NVME_ACQ)[i] = 0;
		((volatile u32 *)NVME_IOSQ)[i] = 0; ((volatile u32 *)NVME_IOCQ)[i] = 0;
	}
	for (u32 q = 0; q < 2; q++) {
		P->nq[q].sq_tail = 0; P->nq[q].cq_head = 0; P->nq[q].phase = 1;
		P->nq[q].next_cid = 1; P->nq[q].inflight = 0;
	}
	nv[0x24 / 4] = (QDEPTH - 1) << 16 | (QDEPTH - 1);  /* AQA */
	nv_wr64(0x28, NVME_ASQ, 0);
	nv_wr64(0x30, NVME_ACQ, 0);
	nv[0x14 / 4] = 0x00460001;          /* IOCQES 4, IOSQES 6, MPS 0, CSS NVM, EN */
	for (u32 t0 = ticks; !(nv[0x1c / 4] & 1); )
		if (ticks - t0 > 500)
			return -4;
	struct sqe c;
	u32 st;
	for (u32 i = 0; i < 16; i++)
		((u32 *)&c)[i] = 0;
	c.cdw0 = 0x05;                      /* create I/O CQ 1: vector 1, interrupts on */
	c.prp1_lo = NVME_IOCQ;
	c.cdw10 = (QDEPTH - 1) << 16 | 1;
	c.cdw11 = 1u << 16 | 2 | 1;
	if (nvme_cmd(0, &c, &st) || st)
		return -5;
	for (u32 i = 0; i < 16; i++)
		((u32 *)&c)[i] = 0;
	c.cdw0 = 0x01;                      /* create I/O SQ 1 on CQ 1 */
	c.prp1_lo = NVME_IOSQ;
	c.cdw10 = (QDEPTH - 1) << 16 | 1;
	c.cdw11 = 1u << 16 | 1;
	if (nvme_cmd(0, &c, &st) || st)
		return -6;
	return 1;
}

/* one round: write a pattern to a block, read it back, compare; -1 when a command hung */
int nvme_round(u32 round)
{
	volatile u8 *w = (volatile u8 *)NVME_WBUF, *r = (volatile u8 *)NVME_RBUF;
	struct sqe c;
	u32 st, lba = (round % 64) * 8;

	for (u32 i = 0; i < 4096; i++) {
		w[i] = (u8)(round * 7 + i);
		r[i] = 0;
	}
	for (int op = 0; op < 2; op++) {
		for (u32 i = 0; i < 16; i++)
			((u32 *)&c)[i] = 0;
		c.cdw0 = op ? 0x02 : 0x01;      /* read : write */
		c.nsid = 1;
		c.prp1_lo = op ? NVME_RBUF : NVME_WBUF;
		c.cdw10 = lba;
		c.cdw12 = 7;                    /* 8 blocks of 512 bytes */
		if (nvme_cmd(1, &c, &st))
			return -1;
		if (st)
			P->nvme_status_errors++;
	}
	int same = 1;
	for (u32 i = 0; i < 4096; i++)
		same &= w[i] == r[i];
	if (same)
		P->nvme_rounds++;
	else
		P->nvme_errors++;
	return 0;
}
