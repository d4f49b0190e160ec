/*
 * pyvmm_note.S - the pyvmm-specific ELF note.
 *
 * name "pyvmm\0", type PYVMM_NOTE_START_ALL_VCPUS (1), 4-byte descriptor 1:
 * pyvmm starts every vCPU at the PVH entry point at once (each in the PVH
 * initial state), so the guest needs no AP start-up (INIT/SIPI) code, and
 * the VM gets no in-kernel irqchip. Other VMMs ignore notes they do not
 * know; on QEMU the boot vCPU wakes the others with INIT-SIPI-SIPI through
 * ap_trampoline.S, so the same image runs on every vCPU there too.
 *
 * Linked into every image except hello-std.
 */
#include "boot.h"

        .section .note.pyvmm, "a"
        .balign 4
        .long   2f - 1f                 /* namesz = 6 (padded to 8 below) */
        .long   4f - 3f                 /* descsz = 4 */
        .long   PYVMM_NOTE_START_ALL_VCPUS
1:      .asciz  "pyvmm"
2:      .balign 4
3:      .long   1
4:      .balign 4
