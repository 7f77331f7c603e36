/*
 * pyrovm test guest: CPL0 set-up, kept to a handful of instructions
 * (CPL0 code is emulated on PVM hosts at ~0.5 us per instruction).
 *
 * Entries:
 *   pvh_start  (Xen PVH note): 32-bit protected mode, paging off, EBX = hvm_start_info.
 *   start64    (ELF e_entry):  long mode, paging on, CPL0, RSI = Linux zero page.
 *   ap_tramp   copied to 0x8000 by the BSP, started by SIPI vector 0x08 (real mode).
 * All three switch to our GDT and page tables and iretq to CPL3 with IOPL=3 using a
 * static iretq frame (no pushes).  CPL3 code then gets RDI = boot kind (0 PVH, 1 Linux),
 * RSI = boot info address, EBX = CPUID.1:EBX.  CPUID runs at CPL0 on purpose: on PVM hosts
 * CPUID at CPL3 is not intercepted and reports the host CPU, not the VMM's vCPU.
 */
#include "guest.h"

#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR4_PAE 0x20
#define CR0_PE_ET_PG 0x80000011

/* ---- PVH entry note (read by QEMU, cloud-hypervisor, firecracker, pyrovm) ---- */
	.section .note.Xen, "a"
	.balign 4
	.long 4			/* namesz */
	.long 8			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_start

	.section .text.boot, "ax"
	.code32
	.globl pvh_start
pvh_start:				/* 18 instructions at CPL0 (+8 at to_user), counting the iretq */
	mov $CR4_PAE, %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	mov $EFER_LME, %eax
	xor %edx, %edx
	wrmsr
	lgdt gdtr
	mov $CR0_PE_ET_PG, %eax
	mov %eax, %cr0
	mov $bsp_iret_frame, %esp
	mov %ebx, %esi			/* boot info: hvm_start_info (32-bit address) */
	mov $1, %eax
	cpuid
	xor %edi, %edi			/* boot kind 0 = PVH */
	ljmp $KERNEL_CS, $to_user

	.code64
	.globl start64
start64:				/* 10 instructions at CPL0 (+8 at to_user), counting the iretq */
	mov $CR4_PAE, %eax		/* also clears SMEP/SMAP a VMM might have set */
	mov %rax, %cr4
	mov $pml4, %eax
	mov %rax, %cr3
	lgdt gdtr
	mov $bsp_iret_frame, %esp
	mov $1, %eax
	cpuid
	mov $1, %edi			/* boot kind 1 = Linux zero page in RSI */
to_user:				/* + 8: CPUID 0x40000000 as CPL0 sees it (test=hv), leaf 1's EBX kept */
	mov %ebx, %r8d
	mov $0x40000000, %eax
	cpuid
	mov %eax, hv_leaf(%rip)
	mov %ebx, hv_leaf+4(%rip)
	mov %ecx, hv_leaf+8(%rip)
	mov %edx, hv_leaf+12(%rip)
	mov %r8d, %ebx
	iretq

/* ---- CPL3 entry stubs ---- */
	.text
user_entry:				/* BSP: RSP = top of cpu_stacks[0] */
	mov %ebx, %edx			/* guest_main(kind, info, apic_id) */
	shr $24, %edx
	call guest_main
	ud2

ap_user_entry:				/* AP: no stack yet; take an index, then a stack */
	mov $1, %eax
	lock xaddl %eax, next_cpu_index(%rip)
	cmp $MAX_CPUS, %eax
	jae 2f
	mov %eax, %edi
	mov %ebx, %esi
	shr $24, %esi
	lea 1(%rax), %edx
	shl $13, %rdx			/* * STACK_SIZE */
	lea cpu_stacks(%rdx), %rsp
	call ap_main
2:	pause
	jmp 2b
#if STACK_SIZE != 8192
#error "fix the shift above"
#endif

/* ---- AP trampoline: copied to AP_TRAMP_ADDR, not a load segment of its own ---- */
	.section .rodata.ap_tramp, "a"
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:				/* CS base = 0x8000, IP = 0; 16 at CPL0 with the iretq */
	lgdtl %cs:(ap_tramp_gdtr - ap_tramp_start)
	mov $CR4_PAE, %eax
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $MSR_EFER, %ecx
	mov $EFER_LME, %eax
	xor %edx, %edx
	wrmsr
	mov $CR0_PE_ET_PG, %eax		/* real mode straight to long mode */
	mov %eax, %cr0
	mov $ap_iret_frame, %esp
	mov $1, %eax
	cpuid
	ljmpl $KERNEL_CS, $to_user
	.balign 4
ap_tramp_gdtr:
	.word gdt_end - gdt - 1
	.long gdt
ap_tramp_end:
	.code64

/* ---- GDT (accessed bits preset so the CPU never writes it) and iretq frames ---- */
	.section .rodata
	.balign 16
gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 0x08 64-bit code, DPL0 */
	.quad 0x00cf93000000ffff	/* 0x10 data, DPL0 */
	.quad 0x00affb000000ffff	/* 0x18 64-bit code, DPL3 */
	.quad 0x00cff3000000ffff	/* 0x20 data, DPL3 */
gdt_end:
	.balign 8
gdtr:
	.word gdt_end - gdt - 1
	.quad gdt

	.balign 8
bsp_iret_frame:
	.quad user_entry, USER_CS, RFLAGS_USER, cpu_stacks + STACK_SIZE, USER_DS
ap_iret_frame:
	.quad ap_user_entry, USER_CS, RFLAGS_USER, 0, USER_DS

	.data
	.balign 4
	.globl next_cpu_index
next_cpu_index:
	.long 1

/* ---- page tables: identity map of 0..4 GiB, 2 MiB pages, P|W|U (+A|D preset) ---- */
	.section .data.pagetables, "aw"
	.balign 4096
pml4:
	.quad pdpt + 0x27
	.fill 511, 8, 0
pdpt:
	.quad pd + 0x0000 + 0x27
	.quad pd + 0x1000 + 0x27
	.quad pd + 0x2000 + 0x27
	.quad pd + 0x3000 + 0x27
	.fill 508, 8, 0
pd:
	.set i, 0
	.rept 2048
	.quad (i << 21) + 0xe7		/* P|W|U|A|D|PS */
	.set i, i + 1
	.endr

	.bss
	.balign 4096
	.globl cpu_stacks
cpu_stacks:
	.skip MAX_CPUS * STACK_SIZE

	.section .note.GNU-stack, "", @progbits
