/* multiboot header, GDT, stack, entry, interrupt stubs of edu_dma (see edu_dma.c) */
	.section .multiboot, "a"
	.align 4
	.long 0x1badb002                /* magic */
	.long 0                         /* flags: nothing asked of the loader */
	.long -0x1badb002               /* checksum */

	.text
	.globl _start
_start:
	cli
	mov $stack_top, %esp
	lgdt gdt_desc
	ljmp $0x08, $1f
1:	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %ax, %fs
	mov %ax, %gs
	call main
2:	cli
	hlt
	jmp 2b

	.globl isr_other, isr_timer, isr_edu, isr_nvme_admin, isr_nvme_io
isr_other:
	iret
isr_timer:
	pusha
	cld
	call on_timer
	popa
	iret
isr_edu:
	pusha
	cld
	call on_edu
	popa
	iret
isr_nvme_admin:
	pusha
	cld
	call on_nvme_admin
	popa
	iret
isr_nvme_io:
	pusha
	cld
	call on_nvme_io
	popa
	iret

	.data
	.align 8
gdt:	.quad 0
	.quad 0x00cf9a000000ffff        /* 0x08: flat 32-bit code */
	.quad 0x00cf92000000ffff        /* 0x10: flat data */
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt

	.bss
	.align 16
	.space 16384
stack_top:
