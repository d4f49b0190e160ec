/*
 * ap_start.c - vCPU 0 starts the other vCPUs when the VMM did not.
 *
 * pyvmm honours the pyvmm note and starts every vCPU at pvh_start itself.
 * Any other VMM (QEMU, say) starts only the bootstrap processor and leaves
 * the application processors (APs) waiting for INIT and STARTUP IPIs, as a
 * PC does. Then vCPU 0, still in ring 0:
 *
 *   1. picks a free page of RAM below 1 MiB (a STARTUP vector is a page
 *      number) and copies the real-mode trampoline there
 *      (ap_trampoline.S), and stores the hvm_start_info address for the APs;
 *   2. sends, through its local APIC (xAPIC, memory-mapped), INIT and then
 *      STARTUP to "all excluding self";
 *   3. waits until every AP has counted itself in (it does so when it
 *      reaches 32-bit mode), sending a second STARTUP after 10 ms if some
 *      have not, and gives up after a second.
 *
 * From the trampoline on, each AP runs the same code as a vCPU that pyvmm
 * started: pvh_start, its index from CPUID's initial APIC ID, c_entry,
 * guest_kernel, guest_user in ring 3.
 *
 * The MP specification's 10 ms wait between INIT and STARTUP is for
 * physical processors. KVM's local APIC handles a pending INIT before a
 * pending STARTUP however close they come (kvm_apic_accept_events), and
 * an AP that is already running ignores the second STARTUP; so does QEMU's
 * own APIC (apic_sipi, hw/intc/apic.c).
 *
 * c_entry calls this on vCPU 0 when the vCPU count is above 1 and port
 * 0x504 does not answer "PYMM": pyvmm, the one VMM that honours the pyvmm
 * note, announces itself there. docs/guests.md has the whole story.
 */
#include "lib.h"

extern const u8 ap_tramp_start[], ap_tramp_end[];
extern volatile u32 ap_start_info, ap_arrived;

#define MSR_APIC_BASE       0x1B
#define APIC_BASE_X2APIC    (1ULL << 10)
#define APIC_BASE_ENABLE    (1ULL << 11)
#define APIC_BASE_ADDR_MASK 0xFFFFFF000ULL
#define LOW_RAM_END         0x9F000     /* below the EBDA, BIOS and VGA areas */

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

struct page_check {
    u64 start, end;
    int clash;
};

static void clash_cb(void *ctx, u64 start, u64 end)
{
    struct page_check *c = ctx;

    if (start < c->end && c->start < end)
        c->clash = 1;
}

static int is_low_ram(const struct guest *g, u64 start, u64 end)
{
    const struct hvm_start_info *si = g->si;
    const struct hvm_memmap_table_entry *e = (const void *)si->memmap_paddr;
    u32 i;

    if (si->version < 1 || !si->memmap_paddr)
        return 1;       /* no map: every PC has RAM there */
    for (i = 0; i < si->memmap_entries; i++)
        if (e[i].type == HVM_MEMMAP_RAM && e[i].addr <= start &&
            end <= e[i].addr + e[i].size)
            return 1;
    return 0;
}

/* The lowest free RAM page from 4 KiB up (page 0 holds the real-mode
 * interrupt table), or 0. */
static u64 trampoline_page(const struct guest *g)
{
    u64 pa;

    for (pa = PAGE_SIZE; pa + PAGE_SIZE <= LOW_RAM_END; pa += PAGE_SIZE) {
        struct page_check c = { pa, pa + PAGE_SIZE, 0 };

        if (!is_low_ram(g, c.start, c.end))
            continue;
        boot_data_each(g, clash_cb, &c);
        if (!c.clash)
            return pa;
    }
    return 0;
}

static u64 ticks_us(const struct guest *g, u64 us)
{
    /* Unknown TSC rate: assume 1 GHz (the waits only get longer). */
    return us * (g->tsc_khz ? g->tsc_khz : 1000000) / 1000;
}

/* Spin until `want` APs arrived or `us` microseconds passed. */
static int wait_arrivals(const struct guest *g, u32 want, u64 us)
{
    u64 start = rdtsc(), limit = ticks_us(g, us);

    while (ap_arrived < want)
        if (rdtsc() - start > limit)
            return 0;
        else
            cpu_relax();
    return 1;
}

static int send_ipi(const struct guest *g, u64 lapic, u32 icr)
{
    volatile u32 *reg = (volatile u32 *)(lapic + LAPIC_ICR_LO);
    u64 start = rdtsc(), limit = ticks_us(g, 10000);

    *reg = icr;
    while (*reg & ICR_BUSY)
        if (rdtsc() - start > limit)
            return 0;
        else
            cpu_relax();
    return 1;
}

void ap_start(const struct guest *g)
{
    u32 want = g->ncpus - 1, vector, sipis = 1;
    u64 base = rdmsr(MSR_APIC_BASE), lapic, pa, t0, t1;
    u64 size = (u64)(ap_tramp_end - ap_tramp_start);

    if (!(base & APIC_BASE_ENABLE) || (base & APIC_BASE_X2APIC)) {
        say("%s: no local APIC in xAPIC mode (APIC_BASE=0x%llx): running on "
            "vCPU 0 only", guest_name, base);
        return;
    }
    lapic = base & APIC_BASE_ADDR_MASK;
    pa = trampoline_page(g);
    if (!pa) {
        say("%s: no free page below 1 MiB for the AP trampoline: running on "
            "vCPU 0 only", guest_name);
        return;
    }
    memcpy((void *)pa, ap_tramp_start, size);
    ap_start_info = (u32)(u64)g->si;
    console_shared = 1;
    vector = (u32)(pa >> 12);

    t0 = rdtsc();
    if (!send_ipi(g, lapic, ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT) ||
        !send_ipi(g, lapic, ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | vector)) {
        say("%s: the local APIC at 0x%llx did not send the IPI: running on "
            "vCPU 0 only", guest_name, lapic);
        return;
    }
    if (!wait_arrivals(g, want, 10000)) {
        send_ipi(g, lapic, ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | vector);
        sipis++;
        wait_arrivals(g, want, 1000000);
    }
    t1 = rdtsc();
    if (g->tsc_khz)
        say("%s: started %u of %u APs: INIT, %u SIPI to 0x%llx, %llu us",
            guest_name, ap_arrived, want, sipis, pa,
            (t1 - t0) * 1000 / g->tsc_khz);
    else
        say("%s: started %u of %u APs: INIT, %u SIPI to 0x%llx", guest_name,
            ap_arrived, want, sipis, pa);
}
