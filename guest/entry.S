/*
 * entry.S - PVH entry point: 32-bit protected mode -> 64-bit long mode -> C,
 * and enter_user(), the drop from ring 0 to ring 3 for the workload loops.
 *
 * The VMM (pyvmm, QEMU, Xen, cloud-hypervisor...) reads the Xen PVH note
 * below, loads the PT_LOAD segments at their physical addresses and starts
 * the vCPU at the note's address in this state (the PVH boot ABI):
 *
 *   32-bit flat protected mode, paging off, interrupts off,
 *   CS/DS/ES/SS flat 4 GiB segments, EBX = physical address of the
 *   struct hvm_start_info, ESP undefined.
 *
 * With the pyvmm note (pyvmm_note.S) linked in, pyvmm starts EVERY vCPU
 * here at the same time. QEMU starts only vCPU 0 here; vCPU 0 then wakes
 * the others (ap_start.c) and they arrive through the real-mode trampoline
 * (ap_trampoline.S) in the same state, EBX included. So this code must be
 * re-entrant: no vCPU may write anything another vCPU reads. Each vCPU
 * learns its index from CPUID, picks its own stack, and loads the same
 * read-only GDT and page tables.
 *
 * Every privileged instruction (mov to CRn, wrmsr, lgdt) is a VM exit on
 * nested or shadow-paging KVM, so we do each exactly once and write
 * constants instead of read-modify-write. On kvm_pvm even ordinary ring-0
 * instructions are interpreted by the host, which is why the workloads
 * leave ring 0 (enter_user below; lib.h explains).
 */
#include "boot.h"

/* ---- the PVH note: "enter me at pvh_start in 32-bit mode" -------------- */
        .section .note.pvh, "a"
        .balign 4
        .long   2f - 1f                 /* namesz ("Xen\0" = 4) */
        .long   4f - 3f                 /* descsz (4) */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
1:      .asciz  "Xen"
2:      .balign 4
3:      .long   pvh_start               /* 32-bit physical entry address */
4:      .balign 4

/* ---- 32-bit entry ------------------------------------------------------ */
        .section .text.entry, "ax"
        .code32
        .globl  pvh_start
        .type   pvh_start, @function
pvh_start:
        cli
        cld
        movl    %ebx, %edi              /* keep hvm_start_info across CPUID */

        /* Our vCPU index: CPUID.1:EBX[31:24], the initial APIC ID. */
        movl    $1, %eax
        xorl    %ecx, %ecx
        cpuid
        shrl    $24, %ebx
        movl    %ebx, %esi
        cmpl    $MAX_VCPUS, %esi
        jae     too_many_vcpus

        /* Load our GDT now (its 32-bit code selector is never used). */
        lgdt    gdt_desc

        /* CR4.PAE is required for long mode. Nothing else: the guests are
         * integer-only code (no SSE, so no OSFXSR), see the Makefile. */
        movl    $CR4_PAE, %eax
        movl    %eax, %cr4

        /* The shared, read-only identity map (pagetables.S). */
        movl    $pml4, %eax
        movl    %eax, %cr3

        /* EFER.LME: long mode becomes active when paging is turned on. */
        movl    $MSR_EFER, %ecx
        movl    $EFER_LME, %eax
        xorl    %edx, %edx
        wrmsr

        /* Paging on. We are now in compatibility mode: 64-bit paging,
         * still 32-bit code. */
        movl    $(CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE), %eax
        movl    %eax, %cr0

        /* Far jump through the 64-bit code descriptor. */
        ljmp    $SEL_KERNEL_CS, $long_mode

/*
 * A vCPU we have no stack for. Print a fixed line (read-only, so no
 * shared buffer is written) and stop. No stack needed.
 */
too_many_vcpus:
        movl    $too_many_msg, %esi
        movl    $(too_many_end - too_many_msg), %ecx
        movw    $PORT_COM1, %dx
        rep outsb
1:      cli
        hlt
        jmp     1b

/* ---- 64-bit ------------------------------------------------------------ */
        .code64
long_mode:
        movl    $SEL_KERNEL_DS, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss

        /* Writing a 32-bit register zero-extends it: clear whatever the
         * VMM left in the upper halves. */
        movl    %edi, %edi              /* arg 0: hvm_start_info paddr */
        movl    %esi, %esi              /* arg 1: vCPU index (< MAX_VCPUS) */

        /*
         * Our own task register. Ring-3 port I/O on kvm_pvm is checked
         * against the TSS I/O bitmap even with IOPL 3 (the host emulates
         * it), and the PVH entry TR (a 0x67-byte TSS) has no bitmap: every
         * port would fault. So build this vCPU's descriptor for the shared
         * TSS below (whose bitmap allows every port) and load it. Each vCPU
         * writes only its own descriptor.
         */
        leaq    tss(%rip), %rax
        movq    %rax, %rdx
        shlq    $16, %rdx
        movabsq $0x000000ffffff0000, %rcx
        andq    %rcx, %rdx              /* base[23:0] at bits 16..39 */
        orq     $TSS_LIMIT, %rdx        /* limit[15:0] */
        movabsq $0x0000890000000000, %rcx
        orq     %rcx, %rdx              /* present, DPL 0, type 9: 64-bit TSS */
        movq    %rax, %rcx
        shrq    $24, %rcx
        andq    $0xff, %rcx
        shlq    $56, %rcx
        orq     %rcx, %rdx              /* base[31:24] */
        movl    %esi, %ecx
        shll    $4, %ecx
        leaq    gdt_tss(%rip), %r8
        addq    %rcx, %r8
        movq    %rdx, (%r8)
        shrq    $32, %rax
        movq    %rax, 8(%r8)            /* base[63:32] */
        addl    $SEL_TSS0, %ecx
        ltr     %cx

        /* Stack of vCPU i: top of slot i in vcpu_stacks (16-byte aligned). */
        leal    1(%esi), %eax
        shlq    $STACK_SHIFT, %rax
        addq    $vcpu_stacks, %rax
        movq    %rax, %rsp
        xorl    %ebp, %ebp

        call    c_entry                 /* never returns; halt if it does */
1:      cli
        hlt
        jmp     1b
        .size   pvh_start, . - pvh_start

/*
 * enter_user(struct guest *g, void (*fn)(struct guest *)): drop to ring 3
 * and run fn(g) there, on the current stack. Never returns.
 *
 * iretq pops RIP, CS, RFLAGS, RSP, SS: ring 3 (CS/SS DPL 3), IOPL 3 so
 * port I/O stays allowed, IF 0. Every page is user-accessible (pagetables.S)
 * and this vCPU keeps its own stack, so nothing else changes. If fn returns,
 * user_start spins: HLT is privileged, ring 3 cannot halt.
 */
        .globl  enter_user
        .type   enter_user, @function
enter_user:
        movq    %rsp, %rax
        andq    $-16, %rax              /* user_start's call then aligns */
        pushq   $SEL_USER_DS            /* SS */
        pushq   %rax                    /* RSP */
        pushq   $USER_RFLAGS            /* RFLAGS */
        pushq   $SEL_USER_CS            /* CS */
        pushq   $user_start             /* RIP */
        movq    %rsi, %rbx              /* rdi (g) passes through */
        iretq
        .size   enter_user, . - enter_user

user_start:
        call    *%rbx
1:      pause
        jmp     1b

/* ---- the TSS: no stacks (no interrupts), only an I/O bitmap ------------ */
        .section .data.tss, "aw"
        .balign 16
tss:
        .fill   TSS_IOMAP_OFFSET - 2, 1, 0
        .word   TSS_IOMAP_OFFSET        /* the I/O bitmap starts right after */
        .fill   8192, 1, 0              /* every port allowed */
        .byte   0xff                    /* the bitmap's required end byte */

/* ---- read-only data: GDT and the fixed error line ---------------------- */
        .section .rodata.boot, "a"
        .balign 16
        .globl  gdt, gdt_limit          /* the AP trampoline loads it too */
/*
 * Linux's layout (see boot.h). The Accessed bit (types 0x9b, 0x93, 0xfb,
 * 0xf3) is preset: the CPU would otherwise write it into the descriptor on
 * the first segment load, and no vCPU may write shared data.
 */
gdt:
        .quad   0                       /* 0x00: null */
        .quad   0x00cf9b000000ffff      /* 0x08: 32-bit code, DPL 0 (the AP trampoline's) */
        .quad   0x00af9b000000ffff      /* 0x10: 64-bit code, DPL 0 */
        .quad   0x00cf93000000ffff      /* 0x18: flat data, DPL 0 */
        .quad   0x00cffb000000ffff      /* 0x20: 32-bit code, DPL 3 (unused) */
        .quad   0x00cff3000000ffff      /* 0x28: flat data, DPL 3 */
        .quad   0x00affb000000ffff      /* 0x30: 64-bit code, DPL 3 */
        .quad   0                       /* 0x38: unused */
gdt_tss:                                /* 0x40: one TSS descriptor per vCPU, */
        .fill   MAX_VCPUS * 2, 8, 0     /* written by that vCPU before ltr */
gdt_end:
        .balign 8
        .word   0                       /* pad so gdt_desc's base is aligned */
gdt_desc:
        .word   gdt_limit
        .long   gdt
        .set    gdt_limit, gdt_end - gdt - 1

too_many_msg:
        .ascii  "guest: vCPU index >= 64, no stack for it; halting\n"
too_many_end:

/* ---- per-vCPU stacks --------------------------------------------------- */
        .section .bss.stacks, "aw", @nobits
        .balign 4096
        .globl  vcpu_stacks
vcpu_stacks:
        .skip   MAX_VCPUS * STACK_SIZE
