/* pyrovm test guest: shared definitions (C and assembly). */
#ifndef GUEST_H
#define GUEST_H

#define MAX_CPUS 64
#define STACK_SIZE 8192 /* per CPU, CPL3 stack */

#define KERNEL_CS 0x08
#define USER_CS (0x18 | 3)
#define USER_DS (0x20 | 3)
#define RFLAGS_USER 0x3002 /* IOPL=3, reserved bit 1, IF=0 */

#define AP_TRAMP_ADDR 0x8000 /* SIPI vector 0x08 */

#ifndef __ASSEMBLER__
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- port I/O and MMIO (all usable at CPL3: IOPL=3, pages mapped U) ---- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline uint16_t inw(uint16_t port)
{
	uint16_t v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void mmio_write8(uint64_t addr, uint8_t v) { *(volatile uint8_t *)addr = v; }
static inline void mmio_write16(uint64_t addr, uint16_t v) { *(volatile uint16_t *)addr = v; }
static inline void mmio_write32(uint64_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline void mmio_write64(uint64_t addr, uint64_t v) { *(volatile uint64_t *)addr = v; }
static inline uint8_t mmio_read8(uint64_t addr) { return *(volatile uint8_t *)addr; }
static inline uint16_t mmio_read16(uint64_t addr) { return *(volatile uint16_t *)addr; }
static inline uint32_t mmio_read32(uint64_t addr) { return *(volatile uint32_t *)addr; }
static inline uint64_t mmio_read64(uint64_t addr) { return *(volatile uint64_t *)addr; }

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

struct cpuid_regs {
	uint32_t eax, ebx, ecx, edx;
};
static inline struct cpuid_regs cpuid(uint32_t leaf, uint32_t subleaf)
{
	struct cpuid_regs r;
	__asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx) : "a"(leaf), "c"(subleaf));
	return r;
}

/* ---- spinlock (xchg works at CPL3) ---- */
typedef struct {
	volatile uint32_t v;
} spinlock_t;
static inline void spin_lock(spinlock_t *l)
{
	for (;;) {
		uint32_t old = 1;
		__asm__ volatile("xchg %0, %1" : "+r"(old), "+m"(l->v) : : "memory");
		if (old == 0)
			return;
		while (l->v)
			cpu_relax();
	}
}
static inline void spin_unlock(spinlock_t *l)
{
	barrier();
	l->v = 0;
}
static inline uint32_t atomic_fetch_inc(volatile uint32_t *p)
{
	uint32_t v = 1;
	__asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
	return v;
}

/* ---- devices fixed by the boot contract ---- */
#define UART_BASE 0x3f8
#define UART_THR 0 /* write */
#define UART_RBR 0 /* read */
#define UART_LSR 5
#define UART_LSR_DR 0x01
#define UART_LSR_THRE 0x20
#define EXIT_PORT 0xf4
#define LAPIC_BASE 0xfee00000ull

/* ---- lib.c ---- */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
bool str_eq_n(const char *s, const char *t, size_t tn); /* s (NUL-terminated) equals t[0..tn) */

void uart_putc(char c);
int uart_getc(void); /* blocking */
bool uart_can_read(void);
void put_char(char c); /* '\n' is written as-is (no CR) */
void put_str(const char *s);
void put_u64(uint64_t v);
void put_i64(int64_t v);
void put_hex(uint64_t v); /* 0x-prefixed */

/* Command line: space-separated key=value words. */
void cmdline_set(const char *s);
const char *cmdline_raw(void);
/* Value of key (not NUL-terminated); NULL if absent.  A bare word "key" gives an empty value. */
const char *cmdline_find(const char *key, size_t *len);
/* Numeric value (decimal or 0x hex) of key, or def if absent or not a number. */
uint64_t cmdline_get(const char *key, uint64_t def);
/* Copy value of key into buf (NUL-terminated, truncated); returns false if absent. */
bool cmdline_get_str(const char *key, char *buf, size_t size);
bool parse_u64(const char *s, size_t len, uint64_t *out);

__attribute__((noreturn)) void vm_exit(uint32_t status);
uint64_t tsc_khz(void);
void delay_us(uint64_t us);

/* ---- smp.c ---- */
int test_cpus(void);
void ap_main(uint32_t index, uint32_t apic_id);

/* ---- virtio.c: minimal virtio-mmio driver (modern, split virtqueue, polling) ---- */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_CONSOLE 3
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19
#define VIRTIO_F_VERSION_1 (1ull << 32)
#define VIRTIO_MAX_DEVS 32
#define VQ_MAX 256 /* largest queue we set up (a power of 2) */
#define VQ_TIMEOUT_MS 30000
#define VIRTIO_BUF_SIZE (2u << 20)

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};
struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[VQ_MAX];
	uint16_t used_event; /* unused: VIRTIO_F_EVENT_IDX is never negotiated */
};
struct vring_used_elem {
	uint32_t id;
	uint32_t len;
};
struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[VQ_MAX];
	uint16_t avail_event;
};

struct virtio_mmio_loc {
	uint64_t size, base;
	uint32_t irq;
};

/* One split virtqueue of up to VQ_MAX entries, polled by the driver. */
struct vq {
	uint16_t index, qsize, avail_idx, last_used;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
};

struct virtio_dev {
	uint64_t base, size;
	uint32_t irq, version, device_id;
	uint64_t device_features, features; /* offered, negotiated */
	uint32_t qmax;                     /* QueueNumMax of queue 0 */
	struct vq vq;                      /* queue 0 of single-queue devices (virtio_init) */
};

extern uint8_t virtio_buf[VIRTIO_BUF_SIZE];
/* Parse the virtio_mmio.device= entries of the command line; returns how many (at most max). */
int virtio_mmio_locs(struct virtio_mmio_loc *locs, int max);
int virtio_list(void); /* print every device found; returns the count */
/* First modern device with this id (0), or -1 after printing why not. */
int virtio_find(uint32_t device_id, struct virtio_dev *d);
/* Reset and initialise (VIRTIO_F_VERSION_1 plus the offered part of wanted; queue 0 of at most
 * max_qsize entries, 0 = VQ_MAX, in d->vq); 0, or -1 after printing why and setting FAILED. */
int virtio_init(struct virtio_dev *d, uint64_t wanted, uint32_t max_qsize);
/* The same in three steps, for devices with several queues: reset and feature negotiation; one queue
 * (its rings: desc 16 * VQ_MAX bytes, 16-aligned; avail and used as declared above, page-aligned is
 * fine); DRIVER_OK.  Each returns 0, or -1 after printing why and setting FAILED. */
int virtio_negotiate(struct virtio_dev *d, uint64_t wanted);
int virtio_queue_setup(struct virtio_dev *d, struct vq *q, uint16_t index, uint32_t max_qsize,
		       struct vring_desc *desc, struct vring_avail *avail, struct vring_used *used);
int virtio_driver_ok(struct virtio_dev *d);
void virtio_reset(struct virtio_dev *d);
uint32_t virtio_config_read32(const struct virtio_dev *d, uint32_t off);
uint64_t virtio_config_read64(const struct virtio_dev *d, uint32_t off);
void vq_set_desc(struct vq *q, uint16_t i, const void *addr, uint32_t len, uint16_t flags, uint16_t next);
void vq_submit(struct vq *q, uint16_t head);        /* add a chain to the avail ring (no notify) */
void vq_kick(struct virtio_dev *d, struct vq *q);   /* notify the queue unless the device said not to */
bool vq_poll(struct vq *q, uint32_t *id, uint32_t *len);
int vq_wait(struct virtio_dev *d, struct vq *q, uint32_t *id, uint32_t *len); /* -1 on timeout */
void virtio_ack(struct virtio_dev *d); /* InterruptACK of whatever InterruptStatus shows */

/* ---- vtests.c ---- */
int test_virtio(void);
int test_blk(void);
int test_blk_ro(void);
int test_blk_id(void);
int test_blkbench(void);
int test_rng(void);

/* ---- hostile.c ---- */
int test_hostile(void);

/* ---- net.c ---- */
int test_net(void);
int test_netbench(void);

/* ---- vsock.c ---- */
int test_vsock(void);

/* ---- main.c ---- */
/* BSP's APIC id, from CPUID leaf 1 run at CPL0 (see boot.S). */
extern uint32_t bsp_apic_id;

/* ---- boot.S ---- */
extern const char ap_tramp_start[], ap_tramp_end[];
#endif /* __ASSEMBLER__ */
#endif /* GUEST_H */
