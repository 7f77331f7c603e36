/* pyrovm test guest: small runtime (strings, UART, printing, command line, exit, time). */
#include "guest.h"

void *memcpy(void *dst, const void *src, size_t n)
{
	uint8_t *d = dst;
	const uint8_t *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

void *memset(void *dst, int c, size_t n)
{
	uint8_t *d = dst;
	while (n--)
		*d++ = (uint8_t)c;
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const uint8_t *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

bool str_eq_n(const char *s, const char *t, size_t tn)
{
	return strlen(s) == tn && memcmp(s, t, tn) == 0;
}

/* ---- UART 16550 at 0x3f8, polled ---- */
void uart_putc(char c)
{
	while (!(inb(UART_BASE + UART_LSR) & UART_LSR_THRE))
		cpu_relax();
	outb(UART_BASE + UART_THR, (uint8_t)c);
}

bool uart_can_read(void) { return inb(UART_BASE + UART_LSR) & UART_LSR_DR; }

int uart_getc(void)
{
	while (!uart_can_read())
		cpu_relax();
	return inb(UART_BASE + UART_RBR);
}

void put_char(char c) { uart_putc(c); }

void put_str(const char *s)
{
	while (*s)
		uart_putc(*s++);
}

void put_u64(uint64_t v)
{
	char buf[24];
	int i = 0;
	do {
		buf[i++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (i)
		uart_putc(buf[--i]);
}

void put_i64(int64_t v)
{
	if (v < 0) {
		uart_putc('-');
		put_u64(-(uint64_t)v);
	} else {
		put_u64((uint64_t)v);
	}
}

void put_hex(uint64_t v)
{
	int shift = 60;
	put_str("0x");
	while (shift > 0 && !((v >> shift) & 0xf))
		shift -= 4;
	for (; shift >= 0; shift -= 4)
		uart_putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

/* ---- command line ---- */
#define CMDLINE_MAX 2048
static char cmdline[CMDLINE_MAX];

void cmdline_set(const char *s)
{
	size_t i = 0;
	if (s)
		for (; i < CMDLINE_MAX - 1 && s[i]; i++)
			cmdline[i] = s[i];
	cmdline[i] = 0;
}

const char *cmdline_raw(void) { return cmdline; }

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

const char *cmdline_find(const char *key, size_t *len)
{
	size_t klen = strlen(key);
	const char *p = cmdline;
	while (*p) {
		while (is_space(*p))
			p++;
		const char *w = p;
		while (*p && !is_space(*p))
			p++;
		size_t wlen = (size_t)(p - w);
		if (wlen >= klen && memcmp(w, key, klen) == 0) {
			if (wlen == klen) {
				*len = 0;
				return w + klen;
			}
			if (w[klen] == '=') {
				*len = wlen - klen - 1;
				return w + klen + 1;
			}
		}
	}
	return NULL;
}

bool parse_u64(const char *s, size_t len, uint64_t *out)
{
	uint64_t v = 0;
	unsigned base = 10;
	if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
		len -= 2;
	}
	if (len == 0)
		return false;
	for (; len; len--, s++) {
		unsigned d;
		char c = *s;
		if (c >= '0' && c <= '9')
			d = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (unsigned)(c - 'A' + 10);
		else
			return false;
		v = v * base + d;
	}
	*out = v;
	return true;
}

uint64_t cmdline_get(const char *key, uint64_t def)
{
	size_t len;
	uint64_t v;
	const char *s = cmdline_find(key, &len);
	if (s && parse_u64(s, len, &v))
		return v;
	return def;
}

bool cmdline_get_str(const char *key, char *buf, size_t size)
{
	size_t len;
	const char *s = cmdline_find(key, &len);
	if (!s)
		return false;
	if (size) {
		if (len > size - 1)
			len = size - 1;
		memcpy(buf, s, len);
		buf[len] = 0;
	}
	return true;
}

/* ---- exit (QEMU isa-debug-exit compatible) ---- */
void vm_exit(uint32_t status)
{
	outl(EXIT_PORT, status);
	for (;;) /* nobody claimed the exit port: spin at CPL3 */
		cpu_relax();
}

/* ---- time ---- */
uint64_t tsc_khz(void)
{
	static uint64_t cached;
	if (cached)
		return cached;
	uint64_t khz = 0;
	struct cpuid_regs r = cpuid(0x40000000, 0);
	if (r.eax >= 0x40000010 && r.eax < 0x40000100) /* KVM/VMware timing leaf */
		khz = cpuid(0x40000010, 0).eax;
	uint32_t max = cpuid(0, 0).eax;
	if (!khz && max >= 0x15) {
		r = cpuid(0x15, 0);
		if (r.eax && r.ebx && r.ecx)
			khz = (uint64_t)r.ecx * r.ebx / r.eax / 1000;
	}
	if (!khz && max >= 0x16)
		khz = (uint64_t)(cpuid(0x16, 0).eax & 0xffff) * 1000;
	if (!khz)
		khz = 3000000; /* guess high: waits come out longer, not shorter, on slower CPUs */
	cached = khz;
	return khz;
}

void delay_us(uint64_t us)
{
	uint64_t end = rdtsc() + us * tsc_khz() / 1000;
	while ((int64_t)(rdtsc() - end) < 0)
		cpu_relax();
}
