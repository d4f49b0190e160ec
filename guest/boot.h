/*
 * boot.h - constants shared by the assembly entry stub and the C code.
 *
 * Only #defines here: this header is included from .S files too.
 */
#ifndef GUEST_BOOT_H
#define GUEST_BOOT_H

/* Where the image is linked and loaded (guest-physical). */
#define IMAGE_BASE          0x100000

/* Per-vCPU stacks live in .bss: MAX_VCPUS stacks of STACK_SIZE bytes. */
#define MAX_VCPUS           64
#define STACK_SHIFT         14                  /* 16 KiB per vCPU */
#define STACK_SIZE          (1 << STACK_SHIFT)

/* The static page tables identity-map this much with 2 MiB pages. */
#define IDMAP_GIB           64

/* PVH: hvm_start_info magic ("xEn3" with the high bit of 'x' set). */
#define HVM_START_MAGIC     0x336ec578

/* ELF notes. */
#define XEN_ELFNOTE_PHYS32_ENTRY      18
#define PYVMM_NOTE_START_ALL_VCPUS    1

/*
 * GDT selectors (see entry.S). The layout is Linux's (kernel CS 0x10,
 * kernel DS 0x18, user CS32 0x23, user DS 0x2b, user CS64 0x33), the one
 * hypervisors such as PVM expect.
 */
#define SEL_KERNEL32_CS     0x08    /* the AP trampoline's far jump */
#define SEL_KERNEL_CS       0x10
#define SEL_KERNEL_DS       0x18
#define SEL_USER_DS         0x2b
#define SEL_USER_CS         0x33
/* One 16-byte TSS descriptor per vCPU from 0x40 on (the busy bit lives in the
 * descriptor, so vCPUs cannot share one). They all point at the same TSS. */
#define SEL_TSS0            0x40
#define TSS_IOMAP_OFFSET    104                 /* right after the 64-bit TSS */
#define TSS_LIMIT           (TSS_IOMAP_OFFSET + 8192)  /* bitmap + the 0xff byte */

/* User-mode RFLAGS: IOPL=3 (in/out/outs/cli allowed in ring 3), IF=0. */
#define USER_RFLAGS         0x3002

/*
 * The local APIC (xAPIC mode, memory-mapped at IA32_APIC_BASE, 0xFEE00000
 * after reset), used only to start the other vCPUs on a VMM that did not
 * (ap_start.c): INIT, then STARTUP (SIPI), to all but ourselves.
 */
#define LAPIC_ICR_LO        0x300
#define ICR_INIT            0x00000500
#define ICR_STARTUP         0x00000600  /* | the vector: page number < 0x100 */
#define ICR_BUSY            0x00001000  /* delivery status: send pending */
#define ICR_ASSERT          0x00004000
#define ICR_ALL_BUT_SELF    0x000C0000

/* Control register / MSR bits written by the entry stub. */
#define CR0_PE              (1 << 0)
#define CR0_MP              (1 << 1)
#define CR0_ET              (1 << 4)
#define CR0_NE              (1 << 5)
#define CR0_PG              (1 << 31)
#define CR4_PAE             (1 << 5)
#define MSR_EFER            0xC0000080
#define EFER_LME            (1 << 8)

/* Port contract with the VMM. */
#define PORT_COM1           0x3f8   /* line output: one rep outsb per line */
#define PORT_EXIT           0x501   /* outl(code): end the VM with exit code */
#define PORT_PYVMM          0x504   /* inl: presence magic; outl(us): sleep */
#define PORT_POST           0x80    /* unhandled on pyvmm: iospin's target */
#define PYVMM_MAGIC         0x4d4d5950   /* "PYMM" little-endian */

#endif
