/*
 * hello - the smallest guest: vCPU 0 prints one line and ends the VM with
 * exit code 0. Every other vCPU halts at once.
 *
 * Built twice: hello.elf (with the pyvmm note: all vCPUs start) and
 * hello-std.elf (PVH note only: a standard boot, only vCPU 0 runs).
 * Everything happens in ring 0; there is no user-mode part.
 */
#include "lib.h"

const char guest_name[] = "hello";

int guest_kernel(struct guest *g)
{
    if (g->cpu != 0)
        return GUEST_HALT;
    say("hello from pyvmm guest");
    vm_exit(0);
}
