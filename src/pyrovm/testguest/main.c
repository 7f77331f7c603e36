/*
 * pyrovm test guest: boot-info parsing and the table of tests.
 * Everything here runs at CPL3.  To add a test: write `static int test_x(void)` returning
 * the exit status (or never returning) and add it to `tests[]`.
 */
#include "guest.h"

#define BOOT_KIND_PVH 0
#define BOOT_KIND_LINUX 1
#define HVM_START_MAGIC 0x336ec578u
#define MMIO_TEST_ADDR 0xc0000000ull
#define PIO_TEST_PORT 0x500

static const char *boot_cmdline(uint64_t kind, uint64_t info)
{
	uint64_t p = 0;
	if (kind == BOOT_KIND_PVH) {
		info = (uint32_t)info;
		if (info && mmio_read32(info) == HVM_START_MAGIC)
			p = mmio_read64(info + 24); /* cmdline_paddr */
	} else if (info && info < (1ull << 32)) {
		p = mmio_read32(info + 0x228) | ((uint64_t)mmio_read32(info + 0x0c8) << 32);
	}
	if (p == 0 || p >= (1ull << 32)) /* only the low 4 GiB is mapped */
		return NULL;
	return (const char *)p;
}

static int test_hello(void)
{
	put_str("hello from the test guest\n");
	return 0;
}

static int test_exit(void)
{
	uint64_t status = cmdline_get("status", 0);
	put_str("exit status ");
	put_u64((uint32_t)status);
	put_char('\n');
	return (int)(uint32_t)status;
}

/* Spins for ever, counting: the host reads the counter at the printed (identity-mapped) address to see
 * whether the guest runs (pause/resume tests). */
static volatile uint64_t spin_counter;

static int test_spin(void)
{
	put_str("spin counter at ");
	put_hex((uint64_t)(uintptr_t)&spin_counter);
	put_char('\n');
	for (;;)
		spin_counter++;
	__builtin_unreachable();
}

/* `test=count [delay=N] [max=N]`: prints `count N` with N rising (a spin of `delay` iterations between
 * lines) and, every 100 counts, `sum X`: the 64-bit sum of COUNT_WORDS words it writes as it counts (at
 * count n, word (n * 521) % COUNT_WORDS becomes n * 0x9e3779b97f4a7c15 + 1); the host computes the same sum.
 * Snapshot tests: a restored VM continues from its count, and the sum proves its memory came back.
 * With `max`, it ends with status 0 after that count. */
#define COUNT_WORDS 8192
static volatile uint64_t count_area[COUNT_WORDS];

static int test_count(void)
{
	uint64_t delay = cmdline_get("delay", 3000000);
	uint64_t max = cmdline_get("max", 0);
	for (uint64_t n = 1; max == 0 || n <= max; n++) {
		count_area[(n * 521) % COUNT_WORDS] = n * 0x9e3779b97f4a7c15ull + 1;
		put_str("count ");
		put_u64(n);
		put_char('\n');
		if (n % 100 == 0) {
			uint64_t sum = 0;
			for (uint64_t i = 0; i < COUNT_WORDS; i++)
				sum += count_area[i];
			put_str("sum ");
			put_hex(sum);
			put_char('\n');
		}
		for (volatile uint64_t i = 0; i < delay; i++)
			;
	}
	return 0;
}

/* `test=hv`: what CPUID leaf 0x40000000 (the hypervisor leaf) said at CPL0, read by the boot code before
 * it dropped to CPL3 (at CPL3 a PVM host's CPU answers CPUID itself): "hypervisor leaf: max 0x40000001
 * signature KVMKVMKVM" or "hypervisor leaf: none" (QEMU's and pyrovm qemu's -cpu ...,kvm=off). */
volatile uint32_t hv_leaf[4];

static int test_hv(void)
{
	char sig[13];
	for (int i = 0; i < 4; i++) {
		sig[i] = (char)(hv_leaf[1] >> (8 * i));
		sig[4 + i] = (char)(hv_leaf[2] >> (8 * i));
		sig[8 + i] = (char)(hv_leaf[3] >> (8 * i));
	}
	sig[12] = 0;
	put_str("hypervisor leaf: ");
	if (hv_leaf[0] < 0x40000000u || hv_leaf[0] > 0x400000ffu || sig[0] == 0) {
		put_str("none\n");
		return 0;
	}
	put_str("max ");
	put_hex(hv_leaf[0]);
	put_str(" signature ");
	put_str(sig);
	put_char('\n');
	return 0;
}

static int test_triple_fault(void)
{
	put_str("triple-fault\n");
	__asm__ volatile("ud2");
	return 1;
}

static int test_pio(void)
{
	uint64_t n = cmdline_get("count", 1);
	for (uint64_t i = 0; i < n; i++)
		outb(PIO_TEST_PORT, (uint8_t)i);
	put_str("pio done ");
	put_u64(n);
	put_char('\n');
	return 0;
}

static int test_mmio(void)
{
	uint64_t n = cmdline_get("count", 1);
	for (uint64_t i = 0; i < n; i++)
		mmio_write32(MMIO_TEST_ADDR, (uint32_t)i);
	put_str("mmio done ");
	put_u64(n);
	put_char('\n');
	return 0;
}

static int test_echo(void)
{
	put_str("echo ready\n");
	for (;;) {
		int c = uart_getc();
		if (c == 0x04) {
			put_str("\nbye\n");
			return 0;
		}
		uart_putc((char)c);
	}
}

struct test {
	const char *name;
	int (*run)(void);
};

static const struct test tests[] = {
	{"hello", test_hello},
	{"exit", test_exit},
	{"spin", test_spin},
	{"count", test_count},
	{"hv", test_hv},
	{"hostile", test_hostile},
	{"triple-fault", test_triple_fault},
	{"cpus", test_cpus},
	{"pio", test_pio},
	{"mmio", test_mmio},
	{"echo", test_echo},
	{"virtio", test_virtio},
	{"blk", test_blk},
	{"blk-ro", test_blk_ro},
	{"blk-id", test_blk_id},
	{"blkbench", test_blkbench},
	{"rng", test_rng},
	{"net", test_net},
	{"netbench", test_netbench},
	{"vsock", test_vsock},
	{"vsockbench", test_vsock},
};

__attribute__((noreturn)) void guest_main(uint64_t kind, uint64_t info, uint32_t apic_id);

uint32_t bsp_apic_id;

void guest_main(uint64_t kind, uint64_t info, uint32_t apic_id)
{
	bsp_apic_id = apic_id;
	size_t len;
	cmdline_set(boot_cmdline(kind, info));
	const char *name = cmdline_find("test", &len);
	if (name)
		for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++)
			if (str_eq_n(tests[i].name, name, len))
				vm_exit((uint32_t)tests[i].run());
	put_str("unknown test\n");
	vm_exit(2);
}
