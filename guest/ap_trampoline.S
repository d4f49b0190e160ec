/*
 * ap_trampoline.S - how an application processor (AP) woken by INIT-SIPI-SIPI
 * reaches pvh_start, the entry every vCPU runs on pyvmm.
 *
 * A STARTUP IPI with vector VV starts the AP in 16-bit real mode at
 * CS:IP = VV00:0000, i.e. at physical address VV000, which must be below
 * 1 MiB. The image lives at 1 MiB, so vCPU 0 (ap_start.c) copies the bytes
 * from ap_tramp_start to ap_tramp_end to a free page below 1 MiB first. They
 * only use addresses relative to CS (the GDT descriptor) or absolute ones in
 * the image (the far jump), so they run wherever they land.
 *
 *   real mode:   DS = CS; lgdt the image's GDT; CR0.PE = 1
 *   far jump:    to ap_entry32 in the image, through the 32-bit ring-0 code
 *                descriptor (0x08)
 *   32-bit:      flat data segments, EBX = the hvm_start_info vCPU 0 was
 *                given, count ourselves in, and continue at pvh_start exactly
 *                as a vCPU that the VMM started there (CPUID gives our index).
 *
 * No stack is used before pvh_start sets one up.
 */
#include "boot.h"

        .section .text.ap_trampoline, "ax"
        .code16
        .globl  ap_tramp_start, ap_tramp_end
ap_tramp_start:
        cli
        cld
        movw    %cs, %ax
        movw    %ax, %ds
        /* 0x66: load all 32 bits of the GDT base (at 1 MiB + something). */
        lgdtl   (tramp_gdt_desc - ap_tramp_start)
        movl    $(CR0_PE | CR0_ET), %eax
        movl    %eax, %cr0
        /* 16-bit protected mode until this jump: 0x66 ea, a 32-bit offset. */
        ljmpl   $SEL_KERNEL32_CS, $ap_entry32

        .balign 4
        .word   0                       /* pad so the base is 4-byte aligned */
tramp_gdt_desc:
        .word   gdt_limit
        .long   gdt
ap_tramp_end:

        .code32
ap_entry32:
        movl    $SEL_KERNEL_DS, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        movl    ap_start_info, %ebx
        /* vCPU 0 waits for this count (ap_start.c): one locked write per AP,
         * once, at boot. */
        lock incl ap_arrived
        jmp     pvh_start

/* Written by vCPU 0 before the INIT IPI, read by the APs. */
        .section .data.ap_trampoline, "aw"
        .balign 64
        .globl  ap_start_info, ap_arrived
ap_start_info:
        .long   0
        .balign 64                      /* the counter in its own cache line */
ap_arrived:
        .long   0
        .balign 64
