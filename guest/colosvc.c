/*
 * colosvc - a request/answer service on COM2, for COLO fault tolerance.
 *
 * vCPU 0 reads request lines from the second UART (0x2f8), polling its line
 * status register, and writes one answer line per request with a single
 * rep outsb. A request is "<id> <op> [args]\n"; its answer starts with the
 * same id:
 *
 *   <id> inc            ->  <id> count=<n>       the counter, plus one
 *   <id> set <k> <v>    ->  <id> ok              a key-value store (64 keys)
 *   <id> get <k>        ->  <id> <k>=<v>         (0 when never set)
 *   <id> time           ->  <id> tsc=<t>         the guest's clock: never the
 *                                                same twice, on two VMs
 *   <id> verify         ->  <id> verify ok pages=<n>, or
 *                           <id> verify CORRUPT page=<pfn> expected=.. got=..
 *
 * Every inc also rewrites one page of a region of mb MiB with memverify's
 * pattern (page p, generation g: word w holds (p*K1 ^ g*K2) + w), so the
 * counter says what every page must hold and verify checks all of them: a
 * replica whose RAM lost or mixed up a page answers CORRUPT.
 *
 * Parameters:
 *   mb=N          the verified region, MiB (default 2)
 *   clock_pct=N   this percentage of answers (chosen by the id, so both
 *                 replicas pick the same ones) carry " tsc=<t>" too
 *   burn=N        vCPU 1 burns N % of its time (1..100), like the RFC demo's
 *                 md5sum /dev/zero; 0 (default): vCPU 1 and up halt
 *
 * Console (COM1):
 *   colosvc ready pages=<P> clock_pct=<c> burn=<b>
 *   colosvc vcpu=1 burn=<b>
 *
 * While no byte waits, vCPU 0 sleeps through pyvmm's sleep port (a byte that
 * arrives wakes it) or spins where there is none. On pyvmm a request costs
 * two exits: one rep insb that reads it, one rep outsb that answers.
 */
#include "lib.h"

const char guest_name[] = "colosvc";

#define COM2 0x2f8
#define COM2_LSR (COM2 + 5)
#define LSR_DR 0x01
#define LINE_MAX_BYTES 120
#define KV_SLOTS 64
#define KEY_MAX 15
#define IDLE_SLEEP_US 2000
#define BURN_PERIOD_MS 10
#define MAX_SEGS 8
#define WORDS (PAGE_SIZE / 8)

#define K1 0x9E3779B97F4A7C15ULL
#define K2 0xC2B2AE3D27D4EB4FULL

enum { P_MB, P_CLOCK_PCT, P_BURN };

struct kv {
    char key[KEY_MAX + 1];
    u64 value;
    u32 used;
};

/* The service's whole state lives here, in guest RAM: a checkpoint carries it. */
static u64 counter;
static struct kv table[KV_SLOTS];
static struct seg segs[MAX_SEGS];
static u32 nsegs;
static u64 region_pages;

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* ---- the region memverify-style ------------------------------------------- */
static u64 *region_page(u64 i)
{
    u32 s;

    for (s = 0; s < nsegs; s++) {
        if (i < segs[s].npages)
            return (u64 *)(segs[s].pa + i * PAGE_SIZE);
        i -= segs[s].npages;
    }
    return NULL;
}

static u64 page_base(u64 pfn, u64 gen)
{
    return (pfn * K1) ^ (gen * K2);
}

static void fill(u64 i, u64 gen)
{
    u64 *p = region_page(i);
    u64 base = page_base((u64)p / PAGE_SIZE, gen), w;

    for (w = 0; w < WORDS; w++)
        p[w] = base + w;
}

/* Page i was rewritten by incs i+1, i+1+P, ...: after n incs, (n+P-1-i)/P times. */
static u64 generation(u64 i, u64 n)
{
    return (n + region_pages - 1 - i) / region_pages;
}

/* ---- output: one answer line, one rep outsb ------------------------------ */
struct out {
    u32 len;
    char buf[LINE_MAX_BYTES + 64];
};

static void put_s(struct out *o, const char *s)
{
    while (*s && o->len < sizeof(o->buf) - 1)
        o->buf[o->len++] = *s++;
}

static void put_u(struct out *o, u64 v, u32 base)
{
    char tmp[24];
    u32 n = 0;

    do {
        tmp[n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (n && o->len < sizeof(o->buf) - 1)
        o->buf[o->len++] = tmp[--n];
}

static void send(struct out *o)
{
    const char *p = o->buf;
    u64 n;

    o->buf[o->len++] = '\n';
    n = o->len;
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"((u16)COM2) : "memory");
}

/* ---- input ------------------------------------------------------------------ */
/*
 * On pyvmm, RBR reads 0 while the receive FIFO is empty, so one rep insb of
 * BULK bytes takes whatever has arrived in a single exit; the NULs after it
 * are dropped and what follows the newline waits in `ahead` (guest RAM, so
 * a checkpoint carries it). Elsewhere (a real 16550 repeats its last byte)
 * the guest checks LSR before each byte.
 */
#define BULK 64
static char ahead[BULK];
static u32 nahead;

static int next_byte(const struct guest *g, char *c)
{
    char bulk[BULK];
    u32 i;

    if (nahead) {
        *c = ahead[0];
        memmove(ahead, ahead + 1, --nahead);
        return 1;
    }
    if (!g->pyvmm) {
        if (!(inb(COM2_LSR) & LSR_DR))
            return 0;
        *c = (char)inb(COM2);
        return 1;
    }
    {
        char *p = bulk;
        u64 n = BULK;

        __asm__ volatile("rep insb" : "+D"(p), "+c"(n) : "d"((u16)COM2) : "memory");
    }
    for (i = 0; i < BULK; i++)
        if (bulk[i])
            ahead[nahead++] = bulk[i];
    if (!nahead)
        return 0;
    return next_byte(g, c);
}

static void read_line(const struct guest *g, char *buf, u32 *len)
{
    u32 n = 0;

    for (;;) {
        char c;

        while (!next_byte(g, &c)) {
            if (g->pyvmm)
                outl(PORT_PYVMM, IDLE_SLEEP_US);
            else
                cpu_relax();
        }
        if (c == '\n')
            break;
        if (c != '\r' && n < LINE_MAX_BYTES)
            buf[n++] = c;
    }
    buf[n] = 0;
    *len = n;
}

/* The next space-separated word: returns its start, sets *wlen; advances *p. */
static const char *word(const char **p, u32 *wlen)
{
    const char *s = *p, *w;

    while (*s == ' ')
        s++;
    w = s;
    while (*s && *s != ' ')
        s++;
    *wlen = (u32)(s - w);
    *p = s;
    return w;
}

static int parse_u64(const char *w, u32 len, u64 *out)
{
    u64 v = 0;
    u32 i;

    if (!len || len > 19)
        return 0;
    for (i = 0; i < len; i++) {
        if (w[i] < '0' || w[i] > '9')
            return 0;
        v = v * 10 + (u64)(w[i] - '0');
    }
    *out = v;
    return 1;
}

static int word_is(const char *w, u32 len, const char *name)
{
    return len == strlen(name) && !memcmp(w, name, len);
}

static struct kv *lookup(const char *key, u32 len, int create)
{
    u32 i;
    struct kv *free_slot = NULL;

    for (i = 0; i < KV_SLOTS; i++) {
        if (table[i].used && strlen(table[i].key) == len && !memcmp(table[i].key, key, len))
            return &table[i];
        if (!table[i].used && !free_slot)
            free_slot = &table[i];
    }
    if (!create || !free_slot)
        return NULL;
    memcpy(free_slot->key, key, len);
    free_slot->key[len] = 0;
    free_slot->value = 0;
    free_slot->used = 1;
    return free_slot;
}

static void verify(struct out *o)
{
    u64 i, w;

    for (i = 0; i < region_pages; i++) {
        const u64 *p = region_page(i);
        u64 base = page_base((u64)p / PAGE_SIZE, generation(i, counter));

        for (w = 0; w < WORDS; w++) {
            if (p[w] != base + w) {
                put_s(o, "verify CORRUPT page=");
                put_u(o, (u64)p / PAGE_SIZE, 10);
                put_s(o, " expected=0x");
                put_u(o, base + w, 16);
                put_s(o, " got=0x");
                put_u(o, p[w], 16);
                return;
            }
        }
    }
    put_s(o, "verify ok pages=");
    put_u(o, region_pages, 10);
}

static void serve(const struct guest *g, const char *line, u32 len)
{
    const char *p = line, *w;
    u32 wl;
    u64 id;
    struct out o;

    o.len = 0;
    w = word(&p, &wl);
    if (!parse_u64(w, wl, &id))
        return;     /* not a request: no id to answer with */
    put_u(&o, id, 10);
    put_s(&o, " ");
    w = word(&p, &wl);
    if (word_is(w, wl, "inc")) {
        counter++;
        fill((counter - 1) % region_pages, generation((counter - 1) % region_pages, counter));
        put_s(&o, "count=");
        put_u(&o, counter, 10);
    } else if (word_is(w, wl, "set") || word_is(w, wl, "get")) {
        int set = w[0] == 's';
        const char *k = word(&p, &wl);
        u32 kl = wl;
        struct kv *e;
        u64 v = 0;

        if (!kl || kl > KEY_MAX) {
            put_s(&o, "error key");
        } else if (set) {
            w = word(&p, &wl);
            e = lookup(k, kl, 1);
            if (!parse_u64(w, wl, &v))
                put_s(&o, "error value");
            else if (!e)
                put_s(&o, "error full");
            else {
                e->value = v;
                put_s(&o, "ok");
            }
        } else {
            e = lookup(k, kl, 0);
            o.buf[o.len] = 0;
            memcpy(o.buf + o.len, k, kl);
            o.len += kl;
            put_s(&o, "=");
            put_u(&o, e ? e->value : 0, 10);
        }
    } else if (word_is(w, wl, "time")) {
        put_s(&o, "tsc=");
        put_u(&o, rdtsc(), 10);
    } else if (word_is(w, wl, "verify")) {
        verify(&o);
    } else {
        put_s(&o, "error unknown op");
    }
    if (g->param[P_CLOCK_PCT] && ((id * K1) >> 32) % 100 < g->param[P_CLOCK_PCT]) {
        put_s(&o, " tsc=");
        put_u(&o, rdtsc(), 10);
    }
    (void)len;
    send(&o);
}

/* ---- the burner (vCPU 1) ---------------------------------------------------- */
static void burn(const struct guest *g, u64 pct)
{
    u64 x = 0x0123456789abcdefULL, period = g->tsc_khz * BURN_PERIOD_MS;

    say("colosvc vcpu=%u burn=%llu", g->cpu, pct);
    for (;;) {
        u64 start = rdtsc(), i;

        do {
            for (i = 0; i < 4096; i++)      /* an md5-like mix of shifts and adds */
                x = (x ^ (x << 13)) + (x >> 7) + 0x9E3779B97F4A7C15ULL;
            consume(x);
        } while (!period || rdtsc() - start < period * pct / 100);
        if (pct < 100 && g->pyvmm)
            outl(PORT_PYVMM, (u32)(BURN_PERIOD_MS * 1000 * (100 - pct) / 100));
    }
}

/* ---- entry --------------------------------------------------------------------- */
int guest_kernel(struct guest *g)
{
    u64 mb, pct, burn_pct;

    if (!arg_u64(g, "mb", 2, &mb) || !arg_u64(g, "clock_pct", 0, &pct) ||
        !arg_u64(g, "burn", 0, &burn_pct))
        goto bad_args;
    if (mb == 0 || mb * PAGES_PER_MIB > g->ram_pages || pct > 100 || burn_pct > 100) {
        if (g->cpu == 0)
            say("colosvc: need 1 <= mb <= %llu, clock_pct <= 100, burn <= 100",
                g->ram_pages / PAGES_PER_MIB);
        goto bad_args;
    }
    g->param[P_MB] = mb;
    g->param[P_CLOCK_PCT] = pct;
    g->param[P_BURN] = burn_pct;
    if (g->cpu == 0) {
        describe_machine(g);
        return GUEST_USER;
    }
    if (g->cpu == 1 && burn_pct)
        return GUEST_USER;
    return GUEST_HALT;

bad_args:
    if (g->cpu == 0)
        vm_exit(2);
    return GUEST_HALT;
}

void guest_user(struct guest *g)
{
    char line[LINE_MAX_BYTES + 1];
    u32 len;
    u64 i;

    if (g->cpu != 0)
        burn(g, g->param[P_BURN]);
    region_pages = g->param[P_MB] * PAGES_PER_MIB;
    nsegs = ram_segments(g, 0, region_pages, segs, MAX_SEGS);
    for (i = 0; i < region_pages; i++)
        fill(i, 0);
    say("colosvc ready pages=%llu clock_pct=%llu burn=%llu", region_pages,
        g->param[P_CLOCK_PCT], g->param[P_BURN]);
    for (;;) {
        read_line(g, line, &len);
        serve(g, line, len);
    }
}
