/*
 * lib.c - the guests' shared runtime (see lib.h).
 *
 * c_entry() is called by entry.S on every vCPU, in 64-bit ring 0, on the
 * vCPU's own stack. It builds this vCPU's private `struct guest` (index,
 * vCPU count, command line, usable RAM, TSC frequency, pyvmm presence),
 * on vCPU 0 wakes the other vCPUs if the VMM did not (ap_start.c), calls
 * the guest program's guest_kernel() and then, if asked to, drops to
 * ring 3 and calls guest_user().
 */
#include "lib.h"

extern char _end[];     /* end of the image, including .bss (guest.ld) */

#define LINE_MAX 200

/* ---- ending ---------------------------------------------------------------- */
void halt_forever(void)
{
    if (in_user_mode())
        for (;;)
            cpu_relax();
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* Used when a guest program has no user-mode part. */
__attribute__((weak)) void guest_user(struct guest *g)
{
    (void)g;
}

void vm_exit(u32 code)
{
    outl(PORT_EXIT, code);
    halt_forever();     /* QEMU without isa-debug-exit ignores the write */
}

/* ---- freestanding helpers ----------------------------------------------------- */
void *memset(void *d, int c, size_t n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp < sp)
        return memcpy(d, s, n);
    while (n--)
        dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* ---- output: one line, one rep outsb ----------------------------------------- */
struct line {
    u32 len;
    char buf[LINE_MAX];
};

static void put_c(struct line *l, char c)
{
    if (l->len < LINE_MAX - 1)      /* keep room for the '\n' */
        l->buf[l->len++] = c;
}

static void put_num(struct line *l, u64 v, u32 base, int neg, u32 width,
                    char pad)
{
    char tmp[24];
    u32 n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    if (neg)
        tmp[n++] = '-';
    while (width > n) {
        put_c(l, pad);
        width--;
    }
    while (n)
        put_c(l, tmp[--n]);
}

/*
 * On pyvmm every vCPU's line goes to its own line buffer, so lines never mix
 * and no vCPU writes shared memory to print. A VMM that started only vCPU 0
 * (QEMU) has one 16550 that takes the bytes one at a time, and a `rep outsb`
 * that the host emulates becomes one exit per byte: two vCPUs printing at
 * once would interleave their bytes. There vCPU 0 sets console_shared before
 * it starts the others (ap_start.c), and each line is sent under a lock.
 */
volatile u32 console_shared;
static volatile u32 console_lock __attribute__((aligned(64)));

static void line_send(struct line *l)
{
    const char *p = l->buf;
    u64 n;
    int locked = console_shared;

    l->buf[l->len++] = '\n';
    n = l->len;
    if (locked)
        while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
            cpu_relax();
    /* The whole line in one instruction: one VM exit on pyvmm. */
    __asm__ volatile("rep outsb"
                     : "+S"(p), "+c"(n)
                     : "d"((u16)PORT_COM1)
                     : "memory");
    if (locked)
        __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
    l->len = 0;
}

void say(const char *fmt, ...)
{
    struct line l;
    __builtin_va_list ap;

    l.len = 0;
    __builtin_va_start(ap, fmt);
    for (; *fmt; fmt++) {
        u32 width = 0, lng = 0;
        char pad = ' ';

        if (*fmt != '%') {
            put_c(&l, *fmt);
            continue;
        }
        fmt++;
        if (*fmt == '0') {
            pad = '0';
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (u32)(*fmt++ - '0');
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        switch (*fmt) {
        case 'd': {
            long long v = lng ? __builtin_va_arg(ap, long long)
                              : __builtin_va_arg(ap, int);
            put_num(&l, v < 0 ? -(u64)v : (u64)v, 10, v < 0, width, pad);
            break;
        }
        case 'u':
        case 'x': {
            u64 v = lng ? __builtin_va_arg(ap, unsigned long long)
                        : __builtin_va_arg(ap, unsigned int);
            put_num(&l, v, *fmt == 'x' ? 16 : 10, 0, width, pad);
            break;
        }
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            while (*s)
                put_c(&l, *s++);
            break;
        }
        case 'c':
            put_c(&l, (char)__builtin_va_arg(ap, int));
            break;
        case '%':
            put_c(&l, '%');
            break;
        case '\0':
            fmt--;      /* stray '%' at the end */
            break;
        default:
            put_c(&l, '%');
            put_c(&l, *fmt);
        }
    }
    __builtin_va_end(ap);
    line_send(&l);
}

/* ---- command line: "key=value key2=value2 ..." ---------------------------------- */
const char *arg_find(const struct guest *g, const char *key, u32 *len)
{
    const char *p = g->cmdline;
    size_t klen = strlen(key);

    while (*p) {
        const char *w;
        u32 n = 0;

        while (*p == ' ' || *p == '\t' || *p == '\n')
            p++;
        w = p;
        while (w[n] && w[n] != ' ' && w[n] != '\t' && w[n] != '\n')
            n++;
        if (n > klen && w[klen] == '=' && !memcmp(w, key, klen)) {
            if (len)
                *len = n - (u32)klen - 1;
            return w + klen + 1;
        }
        p = w + n;
    }
    return NULL;
}

int arg_u64(const struct guest *g, const char *key, u64 def, u64 *out)
{
    u32 len, i;
    const char *v = arg_find(g, key, &len);
    u64 n = 0;

    if (!v) {
        *out = def;
        return 1;
    }
    for (i = 0; i < len; i++) {
        if (v[i] < '0' || v[i] > '9' || n > 1000000000000000000ULL)
            break;
        n = n * 10 + (u64)(v[i] - '0');
    }
    if (len == 0 || i != len) {
        if (g->cpu == 0)
            say("%s: %s= wants a decimal number", guest_name, key);
        return 0;
    }
    *out = n;
    return 1;
}

int arg_eq(const struct guest *g, const char *key, const char *value)
{
    u32 len;
    const char *v = arg_find(g, key, &len);

    return v && len == strlen(value) && !memcmp(v, value, len);
}

/* ---- usable RAM ------------------------------------------------------------- */
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~((u64)(a) - 1))
#define ALIGN_DOWN(x, a) ((x) & ~((u64)(a) - 1))

static void ram_add(struct guest *g, u64 start, u64 end)
{
    u32 i;

    if (start >= end || g->nram == MAX_RANGES)
        return;
    for (i = 0; i < g->nram; i++)
        if (start < g->ram[i].end && g->ram[i].start < end)
            return;     /* overlaps an earlier RAM entry: ignore it */
    /* Insert sorted by address. */
    i = g->nram++;
    while (i > 0 && g->ram[i - 1].start > start) {
        g->ram[i] = g->ram[i - 1];
        i--;
    }
    g->ram[i].start = start;
    g->ram[i].end = end;
}

/* Remove [a, b) (rounded out to whole pages) from the usable ranges. */
static void ram_exclude(struct guest *g, u64 a, u64 b)
{
    struct range out[MAX_RANGES];
    u32 i, n = 0;

    if (a >= b)
        return;
    a = ALIGN_DOWN(a, PAGE_SIZE);
    b = ALIGN_UP(b, PAGE_SIZE);
    for (i = 0; i < g->nram; i++) {
        struct range r = g->ram[i];

        if (b <= r.start || r.end <= a) {
            out[n++] = r;
            continue;
        }
        if (r.start < a && n < MAX_RANGES)
            out[n++] = (struct range){ r.start, a };
        if (b < r.end && n < MAX_RANGES)
            out[n++] = (struct range){ b, r.end };
    }
    memcpy(g->ram, out, n * sizeof(out[0]));
    g->nram = n;
}

/*
 * The boot data the VMM handed us (start_info, memory map, command line,
 * module list, modules and their command lines): fn(ctx, start, end) for
 * each byte range. Nothing may be written there: another vCPU may still be
 * reading it.
 */
void boot_data_each(const struct guest *g,
                    void (*fn)(void *ctx, u64 start, u64 end), void *ctx)
{
    const struct hvm_start_info *si = g->si;
    u32 i;

    fn(ctx, (u64)si, (u64)si + sizeof(*si));
    if (si->version >= 1 && si->memmap_paddr)
        fn(ctx, si->memmap_paddr,
           si->memmap_paddr +
               si->memmap_entries * sizeof(struct hvm_memmap_table_entry));
    if (si->cmdline_paddr)
        fn(ctx, si->cmdline_paddr,
           si->cmdline_paddr + strlen(g->cmdline) + 1);
    if (si->nr_modules && si->modlist_paddr) {
        const struct hvm_modlist_entry *m = (const void *)si->modlist_paddr;

        fn(ctx, si->modlist_paddr,
           si->modlist_paddr + si->nr_modules * sizeof(*m));
        for (i = 0; i < si->nr_modules; i++) {
            fn(ctx, m[i].paddr, m[i].paddr + m[i].size);
            if (m[i].cmdline_paddr)
                fn(ctx, m[i].cmdline_paddr,
                   m[i].cmdline_paddr +
                       strlen((const char *)m[i].cmdline_paddr) + 1);
        }
    }
}

static void ram_exclude_cb(void *g, u64 start, u64 end)
{
    ram_exclude(g, start, end);
}

/*
 * Usable RAM = memmap RAM entries, minus everything below the image's end
 * rounded up to 2 MiB (and below 1 MiB), minus anything above the 64 GiB
 * identity map, minus the boot data.
 */
static void ram_init(struct guest *g)
{
    const struct hvm_start_info *si = g->si;
    u64 lo = ALIGN_UP((u64)_end, 2 * MIB);
    u64 hi = (u64)IDMAP_GIB << 30;
    u32 i;

    if (lo < MIB)
        lo = MIB;
    g->nram = 0;
    if (si->version >= 1 && si->memmap_paddr) {
        const struct hvm_memmap_table_entry *e =
            (const void *)si->memmap_paddr;

        for (i = 0; i < si->memmap_entries; i++) {
            u64 s = e[i].addr, t = e[i].addr + e[i].size;

            if (e[i].type != HVM_MEMMAP_RAM || t < s)
                continue;
            if (s < lo)
                s = lo;
            if (t > hi)
                t = hi;
            ram_add(g, ALIGN_UP(s, PAGE_SIZE), ALIGN_DOWN(t, PAGE_SIZE));
        }
    }
    boot_data_each(g, ram_exclude_cb, g);
    g->ram_pages = 0;
    for (i = 0; i < g->nram; i++)
        g->ram_pages += (g->ram[i].end - g->ram[i].start) / PAGE_SIZE;
}

u64 ram_page(const struct guest *g, u64 n)
{
    u32 i;

    for (i = 0; i < g->nram; i++) {
        u64 pages = (g->ram[i].end - g->ram[i].start) / PAGE_SIZE;

        if (n < pages)
            return g->ram[i].start + n * PAGE_SIZE;
        n -= pages;
    }
    return 0;   /* out of range: callers check the size first */
}

u32 ram_segments(const struct guest *g, u64 first, u64 npages,
                 struct seg *out, u32 max)
{
    u32 i, n = 0;

    for (i = 0; i < g->nram && npages && n < max; i++) {
        u64 pages = (g->ram[i].end - g->ram[i].start) / PAGE_SIZE;
        u64 take;

        if (first >= pages) {
            first -= pages;
            continue;
        }
        take = pages - first;
        if (take > npages)
            take = npages;
        out[n].pa = g->ram[i].start + first * PAGE_SIZE;
        out[n].npages = take;
        n++;
        npages -= take;
        first = 0;
    }
    return n;
}

void describe_machine(const struct guest *g)
{
    char buf[LINE_MAX - 64];
    u32 i, n = 0;

    if (g->cpu != 0)
        return;
    for (i = 0; i < g->nram; i++) {
        struct line l;     /* reuse the formatter on a scratch line */

        l.len = 0;
        put_c(&l, ' ');
        put_c(&l, '0');
        put_c(&l, 'x');
        put_num(&l, g->ram[i].start, 16, 0, 0, ' ');
        put_c(&l, '-');
        put_c(&l, '0');
        put_c(&l, 'x');
        put_num(&l, g->ram[i].end, 16, 0, 0, ' ');
        if (n + l.len >= sizeof(buf))
            break;
        memcpy(buf + n, l.buf, l.len);
        n += l.len;
    }
    buf[n] = 0;
    say("%s: vcpus=%u tsc_khz=%llu pyvmm=%d ram=%llu MiB at%s", guest_name,
        g->ncpus, g->tsc_khz, g->pyvmm, g->ram_pages / PAGES_PER_MIB, buf);
}

/* ---- TSC ------------------------------------------------------------------ */
/*
 * 1. The hypervisor timing leaf 0x40000010 (VMware convention; pyvmm and
 *    QEMU with vmware-cpuid-freq provide it): EAX = TSC kHz. Trusted only
 *    when leaf 0x40000000 says it exists; the range check also rejects the
 *    garbage a CPU without hypervisor leaves returns for 0x40000000.
 * 2. The command line: tsc_khz=N.
 * 3. Unknown (0).
 */
static u64 tsc_detect(const struct guest *g)
{
    u32 a, b, c, d;
    u64 khz;

    cpuid(0x40000000, &a, &b, &c, &d);
    if (a >= 0x40000010 && a <= 0x4000ffff) {
        cpuid(0x40000010, &a, &b, &c, &d);
        if (a)
            return a;
    }
    if (arg_find(g, "tsc_khz", NULL) && arg_u64(g, "tsc_khz", 0, &khz) &&
        khz <= 100000000)       /* up to 100 GHz; keeps the math in range */
        return khz;
    return 0;
}

void tsc_check(const struct guest *g)
{
    if (!g->tsc_khz && g->cpu == 0)
        say("%s: no TSC frequency, pacing off", guest_name);
}

/* ---- pacing ------------------------------------------------------------------ */
/*
 * Ticks per page = tsc_khz * 1000 * 4096 / (rate * 1048576)
 *                = tsc_khz * 125 / (rate * 32)          (exact)
 * The deadline for `done` pages is start + done * num / den, computed as
 * q * num + r * num / den with q, r = divmod(done, den) so it never
 * overflows 64 bits however long the run.
 */
#define MAX_RATE_MIB 1000000ULL

void pacer_start(struct pacer *p, const struct guest *g, u64 rate_mib)
{
    if (rate_mib > MAX_RATE_MIB)
        rate_mib = MAX_RATE_MIB;
    p->tsc_khz = g->tsc_khz;
    p->on = rate_mib && g->tsc_khz;
    p->sleep = g->pyvmm;
    p->num = g->tsc_khz * 125;
    p->den = rate_mib * 32;
    p->sleep_min = g->tsc_khz / 5;      /* 200 us */
    p->max_lag = g->tsc_khz * 20;       /* 20 ms */
    p->start = rdtsc();
}

void pacer_wait(struct pacer *p, u64 done)
{
    u64 due, now, left;

    if (!p->on)
        return;
    due = p->start + (done / p->den) * p->num +
          (done % p->den) * p->num / p->den;
    for (;;) {
        now = rdtsc();
        if ((long long)(due - now) <= 0) {
            /* Behind schedule (paused, throttled, migrated): keep at most
             * 20 ms of backlog, so the guest does not burst at full speed
             * to catch up; a throttled guest should look throttled. */
            if (now - due > p->max_lag)
                p->start += now - due - p->max_lag;
            return;
        }
        left = due - now;
        /* No single batch is due more than a second ahead: if that is what
         * we see, the TSC jumped backwards (e.g. a restore). Move the
         * timeline so this batch is due now instead of stalling. */
        if (left > p->tsc_khz * 1000) {
            p->start -= left;
            return;
        }
        if (p->sleep && left > p->sleep_min)
            outl(PORT_PYVMM, (u32)(left * 1000 / p->tsc_khz));
        else
            cpu_relax();
    }
}

void ticker_start(struct ticker *t, const struct guest *g)
{
    t->period = g->tsc_khz * 1000;
    t->next = rdtsc() + t->period;
}

int ticker_due(struct ticker *t)
{
    u64 now;

    if (!t->period)
        return 0;
    now = rdtsc();
    if (now < t->next) {
        if (t->next - now > t->period)      /* TSC went backwards */
            t->next = now + t->period;
        return 0;
    }
    t->next += t->period;
    if (now >= t->next)                     /* fell behind: no burst */
        t->next = now + t->period;
    return 1;
}

/* ---- entry from entry.S ---------------------------------------------------------- */
void c_entry(u64 start_info_pa, u64 cpu);
__attribute__((noreturn)) void enter_user(struct guest *g,
                                          void (*fn)(struct guest *));

void c_entry(u64 start_info_pa, u64 cpu)
{
    struct guest g;
    u32 a, b, c, d;

    memset(&g, 0, sizeof(g));
    g.si = (const struct hvm_start_info *)start_info_pa;
    g.cpu = (u32)cpu;
    g.cmdline = "";

    /* pyvmm's presence/sleep port; QEMU and others read all ones (or 0). */
    g.pyvmm = inl(PORT_PYVMM) == PYVMM_MAGIC;

    if (g.si->magic != HVM_START_MAGIC) {
        say("%s: bad hvm_start_info magic 0x%x at 0x%llx (want 0x%x)",
            guest_name, g.si->magic, start_info_pa, HVM_START_MAGIC);
        vm_exit(4);
    }
    if (g.si->cmdline_paddr)
        g.cmdline = (const char *)g.si->cmdline_paddr;

    /* vCPU count: CPUID.1:EBX[23:16] when EDX.HTT, else 1. */
    cpuid(1, &a, &b, &c, &d);
    g.ncpus = (d & (1u << 28)) ? (b >> 16) & 0xff : 1;
    if (g.ncpus == 0)
        g.ncpus = 1;
    if (g.ncpus > MAX_VCPUS)
        g.ncpus = MAX_VCPUS;
    if (g.cpu >= g.ncpus) {
        say("%s: vcpu=%u but CPUID reports %u vCPUs; halting", guest_name,
            g.cpu, g.ncpus);
        halt_forever();
    }

    g.tsc_khz = tsc_detect(&g);
    ram_init(&g);
    /* pyvmm started every vCPU here (the pyvmm note); anything else started
     * only this one (see ap_start.c). */
    if (g.cpu == 0 && g.ncpus > 1 && !g.pyvmm)
        ap_start(&g);
    if (guest_kernel(&g) == GUEST_USER)
        enter_user(&g, guest_user);
    halt_forever();
}
