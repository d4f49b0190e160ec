/*
 * memstress - dirty (or read) memory at a controlled rate, forever.
 *
 * Parameters (command line, all optional):
 *   mb=N          MiB per vCPU (default 64)
 *   rate=N        MiB/s per vCPU, counted as pages x 4 KiB (0 = flat out)
 *   pattern=word  one 8-byte store per page (default)
 *   pattern=page  every 8-byte word of the page
 *   readers=K     the K highest-numbered vCPUs only read their pages
 *   tsc_khz=N     TSC frequency, when CPUID leaf 0x40000010 is absent
 *
 * vCPU i owns linear usable pages [i * mb * 256, (i + 1) * mb * 256).
 * Each pass stores a value derived from the pass number (never 0, never
 * the previous pass's value), so every pass changes every page's content.
 *
 * Output:
 *   memstress vcpu=<i> start mb=<mb> rate=<rate> pattern=<p> role=<r>
 *   memstress vcpu=<i> mib=<MiB written or read so far>   (every second)
 *   memstress: <mb> MiB x <n> vCPUs does not fit in <avail> MiB  (exit 2)
 */
#include "lib.h"

const char guest_name[] = "memstress";

#define BATCH_PAGES 16          /* pages between pacing checks */
#define MAX_SEGS 8

static u64 write_pages(u64 pa, u64 n, u64 value, int whole_page)
{
    u64 i, w;

    for (i = 0; i < n; i++, pa += PAGE_SIZE) {
        u64 *p = (u64 *)pa;
        u64 v = value ^ (pa >> 12);     /* pass << 32 ^ page frame number */

        if (whole_page) {
            for (w = 0; w < PAGE_SIZE / 8; w++)
                p[w] = v;
        } else {
            *p = v;
        }
    }
    compiler_barrier();
    return n;
}

static u64 read_pages(u64 pa, u64 n, int whole_page)
{
    u64 i, w, sum = 0;

    for (i = 0; i < n; i++, pa += PAGE_SIZE) {
        const u64 *p = (const u64 *)pa;

        if (whole_page) {
            for (w = 0; w < PAGE_SIZE / 8; w++)
                sum += p[w];
        } else {
            sum += *(const volatile u64 *)p;
        }
    }
    return sum;
}

enum { P_MB, P_RATE, P_WHOLE_PAGE, P_READER };

/* Ring 0: check the parameters; halt or exit on a bad one. */
int guest_kernel(struct guest *g)
{
    u64 mb, rate, readers;

    if (!arg_u64(g, "mb", 64, &mb) || !arg_u64(g, "rate", 0, &rate) ||
        !arg_u64(g, "readers", 0, &readers))
        goto bad_args;
    if (arg_find(g, "pattern", NULL) && !arg_eq(g, "pattern", "word") &&
        !arg_eq(g, "pattern", "page")) {
        if (g->cpu == 0)
            say("memstress: pattern= must be word or page");
        goto bad_args;
    }
    if (mb == 0 || mb > (1ULL << 30)) {
        if (g->cpu == 0)
            say("memstress: mb= must be 1..%llu", 1ULL << 30);
        goto bad_args;
    }
    if (mb * PAGES_PER_MIB * g->ncpus > g->ram_pages) {
        if (g->cpu == 0)
            say("memstress: %llu MiB x %u vCPUs does not fit in %llu MiB",
                mb, g->ncpus, g->ram_pages / PAGES_PER_MIB);
        goto bad_args;
    }
    g->param[P_MB] = mb;
    g->param[P_RATE] = rate;
    g->param[P_WHOLE_PAGE] = arg_eq(g, "pattern", "page");
    g->param[P_READER] = (u64)g->cpu + readers >= g->ncpus;
    describe_machine(g);
    tsc_check(g);
    return GUEST_USER;

bad_args:
    if (g->cpu == 0)
        vm_exit(2);
    return GUEST_HALT;
}

/* Ring 3: the workload, forever. */
void guest_user(struct guest *g)
{
    u64 per_cpu = g->param[P_MB] * PAGES_PER_MIB;
    int whole_page = (int)g->param[P_WHOLE_PAGE];
    int reader = (int)g->param[P_READER];
    u64 done = 0, pass, sum = 0;
    struct seg segs[MAX_SEGS];
    struct pacer pacer;
    struct ticker tick;
    u32 nsegs, s;

    nsegs = ram_segments(g, g->cpu * per_cpu, per_cpu, segs, MAX_SEGS);
    say("memstress vcpu=%u start mb=%llu rate=%llu pattern=%s role=%s",
        g->cpu, g->param[P_MB], g->param[P_RATE],
        whole_page ? "page" : "word", reader ? "reader" : "writer");

    pacer_start(&pacer, g, g->param[P_RATE]);
    ticker_start(&tick, g);
    for (pass = 1;; pass++) {
        for (s = 0; s < nsegs; s++) {
            u64 i, n;

            for (i = 0; i < segs[s].npages; i += n) {
                u64 pa = segs[s].pa + i * PAGE_SIZE;

                n = segs[s].npages - i;
                if (n > BATCH_PAGES)
                    n = BATCH_PAGES;
                if (reader)
                    sum += read_pages(pa, n, whole_page);
                else
                    write_pages(pa, n, pass << 32, whole_page);
                done += n;
                pacer_wait(&pacer, done);
                if (ticker_due(&tick))
                    say("memstress vcpu=%u mib=%llu", g->cpu,
                        done / PAGES_PER_MIB);
            }
        }
        consume(sum);
        if (!tick.period)       /* no clock: report every pass instead */
            say("memstress vcpu=%u mib=%llu", g->cpu, done / PAGES_PER_MIB);
    }
}
