/*
 * lib.h - the tiny runtime every guest shares: port I/O, line output,
 * command line, memory map, TSC and pacing.
 *
 * A guest program is two functions:
 *
 *   int  guest_kernel(struct guest *g);   ring 0, called first on every vCPU
 *   void guest_user(struct guest *g);     ring 3, only if guest_kernel
 *                                         returned GUEST_USER
 *
 * guest_kernel parses and checks parameters and may print, halt
 * (return GUEST_HALT) or end the VM (vm_exit). guest_user runs the
 * workload loop. Why two rings: on a shadow-paging host such as kvm_pvm
 * the hypervisor cannot run guest ring-0 code natively and interprets it
 * instruction by instruction (thousands of times slower); guest ring-3
 * code runs at full speed. Ring 3 has IOPL 3, so port I/O (say, vm_exit,
 * the sleep port) works there, but HLT and CPUID do not (CPUID in ring 3
 * on such a host returns the HOST's values). So: all CPUID in ring 0
 * (c_entry does it), and a ring-3 vCPU that is done spins instead of
 * halting.
 *
 * Rules of the runtime (all vCPUs run the same code at the same time):
 *   - nothing here writes shared memory; per-vCPU state lives on the
 *     vCPU's own stack (struct guest, line buffers). Only on a VMM that
 *     started vCPU 0 alone (QEMU) are three words shared: the trampoline's
 *     start-info address and arrival count, and the console lock;
 *   - a line goes out with ONE `rep outsb` to COM1 (one VM exit on pyvmm).
 */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include "boot.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long size_t;

#define NULL ((void *)0)
#define PAGE_SIZE 4096ULL
#define MIB (1024ULL * 1024ULL)
#define PAGES_PER_MIB (MIB / PAGE_SIZE)

/* ---- PVH boot structures (xen/include/public/arch-x86/hvm/start_info.h) */
struct hvm_start_info {
    u32 magic;              /* HVM_START_MAGIC */
    u32 version;            /* 0: no memmap fields; >= 1: memmap valid */
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;      /* struct hvm_modlist_entry[nr_modules] */
    u64 cmdline_paddr;      /* NUL-terminated, 0 = none */
    u64 rsdp_paddr;
    u64 memmap_paddr;       /* struct hvm_memmap_table_entry[memmap_entries] */
    u32 memmap_entries;
    u32 reserved;
};

struct hvm_modlist_entry {
    u64 paddr;
    u64 size;
    u64 cmdline_paddr;
    u64 reserved;
};

struct hvm_memmap_table_entry {
    u64 addr;
    u64 size;
    u32 type;               /* 1 = RAM (E820 types) */
    u32 reserved;
};

#define HVM_MEMMAP_RAM 1

/* ---- per-vCPU view of the machine (lives on the vCPU's stack) --------- */
#define MAX_RANGES 32

struct range {
    u64 start;              /* 4 KiB aligned, inclusive */
    u64 end;                /* 4 KiB aligned, exclusive */
};

struct guest {
    const struct hvm_start_info *si;
    const char *cmdline;    /* never NULL ("" when absent) */
    u32 cpu;                /* this vCPU's index, 0..ncpus-1 */
    u32 ncpus;              /* vCPUs in the VM (capped at MAX_VCPUS) */
    int pyvmm;              /* port 0x504 answered PYVMM_MAGIC */
    u64 tsc_khz;            /* 0 = unknown */
    u32 nram;               /* usable RAM: sorted, disjoint ranges */
    struct range ram[MAX_RANGES];
    u64 ram_pages;          /* total 4 KiB pages in ram[] */
    u64 param[8];           /* the guest program's own: kernel -> user */
};

/* Provided by each guest program. */
extern const char guest_name[];
#define GUEST_HALT 0        /* this vCPU is done: cli; hlt */
#define GUEST_USER 1        /* continue with guest_user() in ring 3 */
int guest_kernel(struct guest *g);
void guest_user(struct guest *g);   /* optional (weak default: nothing) */

/* ---- port I/O and CPU ---------------------------------------------------- */
static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline void outl(u16 port, u32 v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

static inline void cpu_relax(void)
{
    __asm__ volatile("pause" ::: "memory");
}

/* Ring 0 only (see the top of this file). */
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid"
                     : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d)
                     : "a"(leaf), "c"(0));
}

/* Keep the compiler from dropping or reordering memory work around here. */
static inline void compiler_barrier(void)
{
    __asm__ volatile("" ::: "memory");
}

/* Pretend to use v (so a read-only loop is not optimised away). */
static inline void consume(u64 v)
{
    __asm__ volatile("" : : "r"(v));
}

static inline int in_user_mode(void)
{
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    return (cs & 3) == 3;
}

/* ---- ending ---------------------------------------------------------------- */
/* This vCPU is finished: cli; hlt (pyvmm: the vCPU is done). In ring 3,
 * where HLT is not allowed, spin on pause instead. */
__attribute__((noreturn)) void halt_forever(void);
/* End the VM with `code` via port 0x501, then halt_forever(). */
__attribute__((noreturn)) void vm_exit(u32 code);

/* ---- output ---------------------------------------------------------------- */
/*
 * say("fmt", ...): format one line into a buffer on this vCPU's stack and
 * send it (plus '\n') with a single rep outsb. Supports %s %c %d %u %x
 * with an optional 0/width and the l/ll length modifiers.
 */
__attribute__((format(printf, 1, 2))) void say(const char *fmt, ...);

/* ---- command line ---------------------------------------------------------- */
/* The value of the first `key=value` word, or NULL; *len = value length. */
const char *arg_find(const struct guest *g, const char *key, u32 *len);
/* Decimal number; `def` when absent. Returns 0 and prints when malformed. */
int arg_u64(const struct guest *g, const char *key, u64 def, u64 *out);
/* Non-zero when key's value equals `value` exactly. */
int arg_eq(const struct guest *g, const char *key, const char *value);

/* ---- memory ---------------------------------------------------------------- */
/* Physical address of linear usable page n (n < g->ram_pages). */
u64 ram_page(const struct guest *g, u64 n);

/* A run of physically contiguous pages. */
struct seg {
    u64 pa;
    u64 npages;
};
/* Split linear pages [first, first+npages) into at most `max` segments.
 * Returns the number of segments (a region crossing a RAM hole has 2+). */
u32 ram_segments(const struct guest *g, u64 first, u64 npages,
                 struct seg *out, u32 max);

/* fn(ctx, start, end) for each byte range of the VMM's boot data
 * (start_info, memory map, command line, modules): never write there. */
void boot_data_each(const struct guest *g,
                    void (*fn)(void *ctx, u64 start, u64 end), void *ctx);

/* vCPU 0 prints "<guest>: vcpus=<n> tsc_khz=<k> pyvmm=<0|1> ram=<MiB> MiB
 * at 0x<start>-0x<end> ..." (usable RAM, end exclusive). */
void describe_machine(const struct guest *g);

/* ---- other vCPUs ------------------------------------------------------------ */
/* vCPU 0, ring 0, on a VMM that started only it: wake the others with
 * INIT-SIPI-SIPI through the AP trampoline (ap_start.c) and wait for them. */
void ap_start(const struct guest *g);
/* Non-zero once vCPU 0 has started the others itself: say() then sends each
 * line under a lock (one shared serial port, see line_send in lib.c). */
extern volatile u32 console_shared;

/* ---- time and pacing ------------------------------------------------------- */
/* Print "<guest>: no TSC frequency, pacing off" once (vCPU 0) if unknown. */
void tsc_check(const struct guest *g);

/* Hold a vCPU to `rate` MiB/s of pages (4 KiB each) measured from start. */
struct pacer {
    u64 start;              /* TSC at pacer_start */
    u64 num;                /* TSC ticks per page = num / den */
    u64 den;
    u64 sleep_min;          /* ticks: longer waits use the sleep port */
    u64 max_lag;            /* ticks of backlog kept when behind schedule */
    u64 tsc_khz;
    int on;
    int sleep;
};
void pacer_start(struct pacer *p, const struct guest *g, u64 rate_mib);
/* Wait until `pages_done` pages are due (no-op when unpaced). */
void pacer_wait(struct pacer *p, u64 pages_done);

/* Fires about once a second (never when the TSC frequency is unknown). */
struct ticker {
    u64 next;
    u64 period;
};
void ticker_start(struct ticker *t, const struct guest *g);
int ticker_due(struct ticker *t);

/* ---- freestanding helpers gcc may call -------------------------------------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);

#endif
