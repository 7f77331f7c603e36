/*
 * pyrovm test guest: `test=cpus [ncpus=N]`.  The BSP copies the real-mode trampoline to
 * 0x8000 and starts the APs with a broadcast INIT-SIPI-SIPI (LAPIC ICR, shorthand
 * "all excluding self").  Each AP reaches CPL3 (boot.S), takes an index and a stack,
 * and reports here.  APIC ids come from CPUID leaf 1 EBX[31:24] executed at CPL0 in boot.S:
 * on PVM hosts CPUID at CPL3 is not intercepted and reports the host CPU.
 */
#include "guest.h"

#define LAPIC_SVR 0x0f0
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define ICR_INIT 0x00000500
#define ICR_SIPI 0x00000600
#define ICR_LEVEL_ASSERT 0x00004000
#define ICR_PENDING 0x00001000
#define ICR_ALL_BUT_SELF 0x000c0000

static spinlock_t print_lock;
static volatile uint32_t cpus_reported = 1; /* the BSP */

static void report(uint32_t index, uint32_t apic_id)
{
	spin_lock(&print_lock);
	put_str("cpu ");
	put_u64(index);
	put_str(" apic-id ");
	put_u64(apic_id);
	put_char('\n');
	spin_unlock(&print_lock);
}

void ap_main(uint32_t index, uint32_t apic_id)
{
	report(index, apic_id);
	atomic_fetch_inc(&cpus_reported);
}

static void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }
static uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }

static void send_ipi(uint32_t icr)
{
	lapic_write(LAPIC_ICR_HI, 0);
	lapic_write(LAPIC_ICR_LO, icr);
	for (int i = 0; i < 1000 && (lapic_read(LAPIC_ICR_LO) & ICR_PENDING); i++)
		delay_us(10);
}

int test_cpus(void)
{
	uint64_t want = cmdline_get("ncpus", 0);
	uint64_t khz = tsc_khz();

	report(0, bsp_apic_id);

	uint8_t *tramp = (uint8_t *)(uintptr_t)AP_TRAMP_ADDR;
	__asm__("" : "+r"(tramp)); /* hide the constant address from the compiler's bounds checks */
	memcpy(tramp, ap_tramp_start, (size_t)(ap_tramp_end - ap_tramp_start));
	barrier();

	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100); /* software-enable the LAPIC */
	send_ipi(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_INIT);
	delay_us(10000);
	send_ipi(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_SIPI | (AP_TRAMP_ADDR >> 12));
	delay_us(200);
	send_ipi(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_SIPI | (AP_TRAMP_ADDR >> 12));

	/* Without ncpus=: done when no CPU arrived for ~200 ms.  With it: wait for N (give up after 60 s). */
	uint64_t quiet = 200 * khz, limit = 60000 * khz;
	uint64_t start = rdtsc(), last = start;
	uint32_t seen = 1;
	int status = 0;
	for (;;) {
		uint32_t n = cpus_reported;
		uint64_t now = rdtsc();
		if (want && n >= want)
			break;
		if (n != seen) {
			seen = n;
			last = now;
		} else if (!want && now - last > quiet) {
			break;
		} else if (want && now - start > limit) {
			status = 1;
			break;
		}
		cpu_relax();
	}
	spin_lock(&print_lock);
	put_str("cpus: ");
	put_u64(cpus_reported);
	put_char('\n');
	spin_unlock(&print_lock);
	return status;
}
