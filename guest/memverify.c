/*
 * memverify - fill memory with known content and keep checking it.
 *
 * Parameters:
 *   mb=N        MiB per vCPU (default: an equal share of all usable RAM)
 *   rate=N      MiB/s of pages written per vCPU (0 = flat out, default)
 *   tsc_khz=N   TSC frequency, when CPUID leaf 0x40000010 is absent
 *
 * Every 8-byte word w of page p (its guest-physical page number) at
 * generation g holds f(p, g, w) = (p * K1 ^ g * K2) + w. Pass 1 writes
 * generation 1; pass n >= 2 first checks that each page still holds
 * generation n-1, then writes generation n. A page that lost a write
 * (stale content), got another page's content, or was zeroed is caught.
 * That is exactly what a buggy live migration does.
 *
 * Output:
 *   memverify vcpu=<i> start mb=<mb> rate=<rate>
 *   memverify vcpu=<i> ok pages=<pages verified so far>     (every second)
 *   memverify CORRUPT page=<pfn> expected=<hex> got=<hex>    (exit 3)
 */
#include "lib.h"

const char guest_name[] = "memverify";

#define BATCH_PAGES 16
#define MAX_SEGS 8
#define WORDS (PAGE_SIZE / 8)

#define K1 0x9E3779B97F4A7C15ULL    /* odd: p -> p * K1 is a bijection */
#define K2 0xC2B2AE3D27D4EB4FULL    /* odd: g -> g * K2 is a bijection */

static inline u64 page_base(u64 pfn, u64 gen)
{
    return (pfn * K1) ^ (gen * K2);
}

static void fill_page(u64 *p, u64 base)
{
    u64 w;

    for (w = 0; w < WORDS; w++)
        p[w] = base + w;
}

/* Returns the index of the first bad word, or WORDS when all are good. */
static u64 check_page(const u64 *p, u64 base)
{
    u64 w, diff = 0;

    /* Branch-free so the compiler can vectorise it; find the word after. */
    for (w = 0; w < WORDS; w++)
        diff |= p[w] ^ (base + w);
    if (!diff)
        return WORDS;
    for (w = 0; w < WORDS; w++)
        if (p[w] != base + w)
            return w;
    return WORDS;   /* changed under us between the two loops */
}

enum { P_MB, P_RATE };

/* Ring 0: check the parameters; halt or exit on a bad one. */
int guest_kernel(struct guest *g)
{
    u64 mb, rate, share;

    share = g->ram_pages / g->ncpus / PAGES_PER_MIB;
    if (!arg_u64(g, "mb", share, &mb) || !arg_u64(g, "rate", 0, &rate))
        goto bad_args;
    if (mb == 0 || mb > (1ULL << 30) ||
        mb * PAGES_PER_MIB * g->ncpus > g->ram_pages) {
        if (g->cpu == 0)
            say("memverify: %llu MiB x %u vCPUs does not fit in %llu MiB",
                mb, g->ncpus, g->ram_pages / PAGES_PER_MIB);
        goto bad_args;
    }
    g->param[P_MB] = mb;
    g->param[P_RATE] = rate;
    describe_machine(g);
    tsc_check(g);
    return GUEST_USER;

bad_args:
    if (g->cpu == 0)
        vm_exit(2);
    return GUEST_HALT;
}

/* Ring 3: fill, then verify-and-rewrite forever. */
void guest_user(struct guest *g)
{
    u64 per_cpu = g->param[P_MB] * PAGES_PER_MIB;
    u64 written = 0, verified = 0, gen;
    struct seg segs[MAX_SEGS];
    struct pacer pacer;
    struct ticker tick;
    u32 nsegs, s;

    nsegs = ram_segments(g, g->cpu * per_cpu, per_cpu, segs, MAX_SEGS);
    say("memverify vcpu=%u start mb=%llu rate=%llu", g->cpu, g->param[P_MB],
        g->param[P_RATE]);

    pacer_start(&pacer, g, g->param[P_RATE]);
    ticker_start(&tick, g);
    for (gen = 1;; gen++) {
        for (s = 0; s < nsegs; s++) {
            u64 i, n, k;

            for (i = 0; i < segs[s].npages; i += n) {
                n = segs[s].npages - i;
                if (n > BATCH_PAGES)
                    n = BATCH_PAGES;
                for (k = 0; k < n; k++) {
                    u64 pa = segs[s].pa + (i + k) * PAGE_SIZE;
                    u64 pfn = pa / PAGE_SIZE;
                    u64 *p = (u64 *)pa;

                    if (gen >= 2) {
                        u64 base = page_base(pfn, gen - 1);
                        u64 w = check_page(p, base);

                        if (w != WORDS) {
                            say("memverify CORRUPT page=%llu expected=0x%016llx got=0x%016llx",
                                pfn, base + w, p[w]);
                            vm_exit(3);
                        }
                        verified++;
                    }
                    fill_page(p, page_base(pfn, gen));
                }
                compiler_barrier();
                written += n;
                pacer_wait(&pacer, written);
                if (ticker_due(&tick))
                    say("memverify vcpu=%u ok pages=%llu", g->cpu, verified);
            }
        }
        if (!tick.period)       /* no clock: report every pass instead */
            say("memverify vcpu=%u ok pages=%llu", g->cpu, verified);
    }
}
