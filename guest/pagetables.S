/*
 * pagetables.S - a static identity map of the first 64 GiB.
 *
 *   pml4[0]  -> pdpt
 *   pdpt[i]  -> pd + i * 4 KiB                      (i = 0..63)
 *   pd[i*512 + j] = 2 MiB page at (i*512 + j) * 2 MiB
 *
 * 1 + 1 + 64 pages = 264 KiB of read-only data shared by every vCPU.
 *
 * The Accessed (and, in the 2 MiB leaf entries, Dirty) bits are preset so
 * the CPU never needs to write them back: the tables stay read-only and
 * never show up as dirty pages during a migration.
 */
#include "boot.h"

#define PTE_P    0x001      /* present */
#define PTE_RW   0x002      /* writable */
#define PTE_US   0x004      /* user-accessible (the workloads run in ring 3) */
#define PTE_A    0x020      /* accessed */
#define PTE_D    0x040      /* dirty (leaf entries only) */
#define PTE_PS   0x080      /* 2 MiB page (in a PD entry) */

#define TABLE_FLAGS (PTE_P | PTE_RW | PTE_US | PTE_A)
#define LEAF_FLAGS  (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_PS)

        .section .rodata.pagetables, "a"
        .balign 4096
        .globl  pml4
pml4:
        .quad   pdpt + TABLE_FLAGS
        .fill   511, 8, 0

        .balign 4096
pdpt:
        .set    i, 0
        .rept   IDMAP_GIB
        .quad   pd + i * 4096 + TABLE_FLAGS
        .set    i, i + 1
        .endr
        .fill   512 - IDMAP_GIB, 8, 0

        .balign 4096
pd:
        .set    addr, 0
        .rept   IDMAP_GIB * 512
        .quad   addr + LEAF_FLAGS
        .set    addr, addr + 0x200000
        .endr
