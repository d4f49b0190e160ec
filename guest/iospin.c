/*
 * iospin - measure port-I/O exit throughput.
 *
 * vCPU 0 writes 0 to port 0x80 `count` times (default 1000000). No device
 * sits there on pyvmm, so each write is one complete trip guest -> KVM ->
 * VMM -> guest. Then it prints "iospin done count=<N>" and exits with 0.
 *
 * The loop stays in ring 0: every iteration is an exit anyway, and on a
 * host that interprets ring-0 code (kvm_pvm) that is cheaper than a trip
 * from ring 3 into the interpreter and out again per write (measured under
 * QEMU/KVM there: 19 us vs 40 us per write).
 */
#include "lib.h"

const char guest_name[] = "iospin";

int guest_kernel(struct guest *g)
{
    u64 count, i;

    if (g->cpu != 0)
        return GUEST_HALT;
    if (!arg_u64(g, "count", 1000000, &count))
        vm_exit(2);
    for (i = 0; i < count; i++)
        outb(PORT_POST, 0);
    say("iospin done count=%llu", count);
    vm_exit(0);
}
