/*
 * ringprobe - write one marker word into each of `pages` consecutive usable
 * pages, once, then end the VM. A dirty-tracking probe counts what the VMM
 * reports against the exact set this guest wrote.
 *
 * Parameters:
 *   pages=N   pages to write (default 3000)
 *   cpl=0|3   write from ring 0 (default) or ring 3. On a host that runs
 *             guest ring-0 code through its instruction emulator (kvm_pvm),
 *             ring-0 stores go through that emulator, many per batch; ring-3
 *             stores run natively and fault one page at a time.
 *
 * Each page of the sweep gets word 0 = RINGPROBE_MAGIC. RAM starts zeroed, so
 * afterwards the written set is exactly the pages whose first word holds the
 * marker: the VMM checks RAM, it does not trust this guest's count.
 *
 * Output (vCPU 0; any other vCPU halts at once):
 *   ringprobe: vcpus=<n> ... ram=<MiB> MiB at 0x<start>-0x<end> ...  (usable RAM;
 *             the sweep covers the first `pages` pages of it)
 *   ringprobe start pages=<N> cpl=<c>
 *   ringprobe done pages=<N>                      (then exit code 0)
 *   ringprobe: <N> pages do not fit in <M>        (exit code 2)
 */
#include "lib.h"

const char guest_name[] = "ringprobe";

#define RINGPROBE_MAGIC 0x52494e4750524f42ULL   /* "RINGPROB" */
#define MAX_SEGS 8
#define WORDS_PER_PAGE (PAGE_SIZE / 8)

enum { P_PAGES };

/* Sixteen stores of one register per loop turn, 19 instructions for 16 pages:
 * the denser the stores, the more fresh pages one batch of emulated
 * instructions dirties before the host next looks at the ring, which is the
 * case the probe is after. */
#define STORE(k) p[(k) * WORDS_PER_PAGE] = RINGPROBE_MAGIC
static void sweep(const struct guest *g, u64 npages)
{
    struct seg segs[MAX_SEGS];
    u32 nsegs = ram_segments(g, 0, npages, segs, MAX_SEGS), s;

    for (s = 0; s < nsegs; s++) {
        volatile u64 *p = (volatile u64 *)segs[s].pa;
        volatile u64 *end = p + segs[s].npages * WORDS_PER_PAGE;

        for (; p + 16 * WORDS_PER_PAGE <= end; p += 16 * WORDS_PER_PAGE) {
            STORE(0); STORE(1); STORE(2); STORE(3); STORE(4); STORE(5); STORE(6); STORE(7);
            STORE(8); STORE(9); STORE(10); STORE(11); STORE(12); STORE(13); STORE(14);
            STORE(15);
        }
        for (; p < end; p += WORDS_PER_PAGE)
            STORE(0);
    }
}

static __attribute__((noreturn)) void sweep_and_exit(const struct guest *g, u64 npages)
{
    sweep(g, npages);
    say("ringprobe done pages=%llu", npages);
    vm_exit(0);
}

/* Ring 0: parameters, then the sweep itself unless cpl=3. */
int guest_kernel(struct guest *g)
{
    u64 pages, cpl;

    if (g->cpu != 0)
        return GUEST_HALT;
    if (!arg_u64(g, "pages", 3000, &pages) || !arg_u64(g, "cpl", 0, &cpl))
        vm_exit(2);
    if (cpl != 0 && cpl != 3) {
        say("ringprobe: cpl= must be 0 or 3");
        vm_exit(2);
    }
    if (pages > g->ram_pages) {
        say("ringprobe: %llu pages do not fit in %llu", pages, g->ram_pages);
        vm_exit(2);
    }
    describe_machine(g);
    say("ringprobe start pages=%llu cpl=%llu", pages, cpl);
    if (cpl == 3) {
        g->param[P_PAGES] = pages;
        return GUEST_USER;
    }
    sweep_and_exit(g, pages);
}

/* Ring 3: the same sweep at native speed. */
void guest_user(struct guest *g)
{
    sweep_and_exit(g, g->param[P_PAGES]);
}
