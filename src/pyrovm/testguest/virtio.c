/*
 * pyrovm test guest: a minimal virtio-mmio driver (VIRTIO 1.2, modern devices only), at CPL3.
 *
 * Devices are found on the command line (`virtio_mmio.device=<size>@<base>:<irq>[:<id>]`, the
 * Linux format), initialised per VIRTIO 1.2 §3.1 / §4.2.3, and use one split virtqueue (queue 0)
 * in static memory (devices with more queues bring their own rings: virtio_queue_setup).  No
 * interrupts: the driver sets VRING_AVAIL_F_NO_INTERRUPT and polls the used ring; VIRTIO_F_EVENT_IDX is
 * never negotiated.  Only one single-queue device is driven at a time (one set of ring memory).
 */
#include "guest.h"

/* ---- MMIO transport registers (VIRTIO 1.2 §4.2.2) ---- */
#define VMMIO_MAGIC 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_VENDOR_ID 0x00c
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0a0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VMMIO_CONFIG_GENERATION 0x0fc
#define VMMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt" */

#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define STATUS_FAILED 128

/* ---- ring memory of virtio_init's queue 0: up to VQ_MAX entries, page aligned ---- */
static struct vring_desc vq_desc[VQ_MAX] __attribute__((aligned(4096)));
static struct vring_avail vq_avail __attribute__((aligned(4096)));
static struct vring_used vq_used __attribute__((aligned(4096)));

/* Data buffers for the tests (requests, pattern, benchmark chains). */
uint8_t virtio_buf[VIRTIO_BUF_SIZE] __attribute__((aligned(4096)));

/* ---- command line: virtio_mmio.device=<size>@<base>:<irq>[:<id>] ---- */

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Like Linux simple_strtoull(s, &end, 0): 0x hex, leading 0 octal, else decimal. */
static const char *parse_num(const char *s, const char *end, uint64_t *out, bool *ok)
{
	uint64_t v = 0;
	unsigned base = 10;
	const char *start;
	if (s < end && *s == '0') {
		base = 8;
		if (s + 1 < end && (s[1] == 'x' || s[1] == 'X')) {
			base = 16;
			s += 2;
		}
	}
	start = s;
	for (; s < end; s++) {
		unsigned d;
		char c = *s;
		if (c >= '0' && c <= '9')
			d = (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f')
			d = (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F')
			d = (unsigned)(c - 'A' + 10);
		else
			break;
		if (d >= base)
			break;
		v = v * base + d;
	}
	*ok = s > start || base == 8; /* "0" alone is a valid octal zero */
	*out = v;
	return s;
}

/* Linux memparse(): a number with an optional K/M/G/T suffix. */
static const char *parse_size(const char *s, const char *end, uint64_t *out, bool *ok)
{
	s = parse_num(s, end, out, ok);
	if (*ok && s < end) {
		unsigned shift = 0;
		switch (*s) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		case 't': case 'T': shift = 40; break;
		}
		if (shift) {
			*out <<= shift;
			s++;
		}
	}
	return s;
}

static bool parse_mmio_entry(const char *s, const char *end, struct virtio_mmio_loc *loc)
{
	bool ok;
	uint64_t v;
	s = parse_size(s, end, &loc->size, &ok);
	if (!ok || s >= end || *s != '@')
		return false;
	s = parse_num(s + 1, end, &loc->base, &ok);
	if (!ok || s >= end || *s != ':')
		return false;
	s = parse_num(s + 1, end, &v, &ok);
	if (!ok)
		return false;
	loc->irq = (uint32_t)v;
	if (s < end && *s == ':') /* optional platform device id: ignored */
		s = parse_num(s + 1, end, &v, &ok);
	return s == end && loc->size != 0;
}

int virtio_mmio_locs(struct virtio_mmio_loc *locs, int max)
{
	static const char key[] = "virtio_mmio.device=";
	const size_t klen = sizeof(key) - 1;
	const char *p = cmdline_raw();
	int n = 0;
	while (*p) {
		while (is_space(*p))
			p++;
		const char *w = p;
		while (*p && !is_space(*p))
			p++;
		if ((size_t)(p - w) <= klen || memcmp(w, key, klen) != 0)
			continue;
		struct virtio_mmio_loc loc;
		if (!parse_mmio_entry(w + klen, p, &loc)) {
			put_str("virtio-mmio: cannot parse `");
			for (const char *c = w; c < p; c++)
				put_char(*c);
			put_str("`\n");
			continue;
		}
		if (loc.base + loc.size > (1ull << 32)) {
			put_str("virtio-mmio: ");
			put_hex(loc.base);
			put_str(" is above 4 GiB (not mapped)\n");
			continue;
		}
		if (n < max)
			locs[n++] = loc;
	}
	return n;
}

/* ---- device access ---- */

static inline uint32_t rd(const struct virtio_dev *d, uint32_t off) { return mmio_read32(d->base + off); }
static inline void wr(const struct virtio_dev *d, uint32_t off, uint32_t v) { mmio_write32(d->base + off, v); }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

static void put_dev(const struct virtio_dev *d)
{
	put_str("virtio-mmio ");
	put_hex(d->base);
	put_str(": ");
}

static const char *device_name(uint32_t id)
{
	switch (id) {
	case VIRTIO_ID_NET: return "net";
	case VIRTIO_ID_BLOCK: return "block";
	case VIRTIO_ID_CONSOLE: return "console";
	case VIRTIO_ID_RNG: return "entropy";
	case VIRTIO_ID_VSOCK: return "vsock";
	default: return "?";
	}
}

/* Reads the identification registers of one location into d (no side effects on the device). */
static bool probe(const struct virtio_mmio_loc *loc, struct virtio_dev *d, bool verbose)
{
	memset(d, 0, sizeof(*d));
	d->base = loc->base;
	d->size = loc->size;
	d->irq = loc->irq;
	uint32_t magic = rd(d, VMMIO_MAGIC);
	d->version = rd(d, VMMIO_VERSION);
	d->device_id = rd(d, VMMIO_DEVICE_ID);
	if (verbose) {
		put_dev(d);
		put_str("size ");
		put_hex(d->size);
		put_str(" irq ");
		put_u64(d->irq);
		put_str(" magic ");
		put_hex(magic);
		put_str(" version ");
		put_u64(d->version);
		put_str(" device-id ");
		put_u64(d->device_id);
		put_str(" (");
		put_str(device_name(d->device_id));
		put_str(") vendor ");
		put_hex(rd(d, VMMIO_VENDOR_ID));
		put_char('\n');
	}
	if (magic != VIRTIO_MMIO_MAGIC) {
		put_dev(d);
		put_str("bad magic ");
		put_hex(magic);
		put_char('\n');
		return false;
	}
	return true;
}

int virtio_list(void)
{
	struct virtio_mmio_loc locs[VIRTIO_MAX_DEVS];
	int n = virtio_mmio_locs(locs, VIRTIO_MAX_DEVS);
	for (int i = 0; i < n; i++) {
		struct virtio_dev d;
		probe(&locs[i], &d, true);
	}
	return n;
}

int virtio_find(uint32_t device_id, struct virtio_dev *d)
{
	struct virtio_mmio_loc locs[VIRTIO_MAX_DEVS];
	int n = virtio_mmio_locs(locs, VIRTIO_MAX_DEVS);
	for (int i = 0; i < n; i++) {
		if (!probe(&locs[i], d, false) || d->device_id != device_id)
			continue;
		if (d->version != 2) {
			put_dev(d);
			put_str("version ");
			put_u64(d->version);
			put_str(d->version == 1 ? " (legacy) device: not supported, only version 2 (virtio 1.x)\n"
						: ": not supported, only version 2 (virtio 1.x)\n");
			return -1;
		}
		return 0;
	}
	put_str("no virtio ");
	put_str(device_name(device_id));
	put_str(" device (");
	put_u64((uint64_t)n);
	put_str(" virtio_mmio.device= entries on the command line)\n");
	return -1;
}

static int init_fail(struct virtio_dev *d, const char *why)
{
	put_dev(d);
	put_str(why);
	put_char('\n');
	wr(d, VMMIO_STATUS, rd(d, VMMIO_STATUS) | STATUS_FAILED);
	return -1;
}

int virtio_negotiate(struct virtio_dev *d, uint64_t wanted)
{
	/* §3.1.1 step 1: reset, and wait for the reset to finish (§2.4.2). */
	wr(d, VMMIO_STATUS, 0);
	uint64_t deadline = rdtsc() + 1000 * tsc_khz();
	while (rd(d, VMMIO_STATUS) != 0)
		if ((int64_t)(rdtsc() - deadline) > 0)
			return init_fail(d, "reset did not complete (status stays non-zero)");
	/* Steps 2-3. */
	wr(d, VMMIO_STATUS, STATUS_ACKNOWLEDGE);
	wr(d, VMMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
	/* Step 4: features. */
	wr(d, VMMIO_DEVICE_FEATURES_SEL, 0);
	uint64_t lo = rd(d, VMMIO_DEVICE_FEATURES);
	wr(d, VMMIO_DEVICE_FEATURES_SEL, 1);
	uint64_t hi = rd(d, VMMIO_DEVICE_FEATURES);
	d->device_features = lo | hi << 32;
	if (!(d->device_features & VIRTIO_F_VERSION_1))
		return init_fail(d, "device does not offer VIRTIO_F_VERSION_1");
	d->features = d->device_features & (wanted | VIRTIO_F_VERSION_1);
	wr(d, VMMIO_DRIVER_FEATURES_SEL, 0);
	wr(d, VMMIO_DRIVER_FEATURES, (uint32_t)d->features);
	wr(d, VMMIO_DRIVER_FEATURES_SEL, 1);
	wr(d, VMMIO_DRIVER_FEATURES, (uint32_t)(d->features >> 32));
	/* Steps 5-6. */
	wr(d, VMMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(rd(d, VMMIO_STATUS) & STATUS_FEATURES_OK))
		return init_fail(d, "FEATURES_OK did not stick (features refused)");
	return 0;
}

/* Step 7 for one queue (§4.2.3.2). */
int virtio_queue_setup(struct virtio_dev *d, struct vq *q, uint16_t index, uint32_t max_qsize,
		       struct vring_desc *desc, struct vring_avail *avail, struct vring_used *used)
{
	wr(d, VMMIO_QUEUE_SEL, index);
	if (rd(d, VMMIO_QUEUE_READY) != 0)
		return init_fail(d, "queue is already ready after reset");
	uint32_t qmax = rd(d, VMMIO_QUEUE_NUM_MAX);
	if (qmax == 0)
		return init_fail(d, "queue is not available (QueueNumMax 0)");
	uint32_t qsize = VQ_MAX;
	if (max_qsize && max_qsize < qsize)
		qsize = max_qsize;
	while (qsize > qmax) /* a power of 2, at most QueueNumMax */
		qsize >>= 1;
	if (qsize == 0)
		return init_fail(d, "QueueNumMax is too small");
	if (index == 0)
		d->qmax = qmax;
	q->index = index;
	q->qsize = (uint16_t)qsize;
	q->avail_idx = 0;
	q->last_used = 0;
	q->desc = desc;
	q->avail = avail;
	q->used = used;
	memset(desc, 0, sizeof(struct vring_desc) * VQ_MAX);
	memset(avail, 0, sizeof(*avail));
	memset(used, 0, sizeof(*used));
	avail->flags = VRING_AVAIL_F_NO_INTERRUPT; /* we poll */
	mb();
	wr(d, VMMIO_QUEUE_NUM, qsize);
	wr(d, VMMIO_QUEUE_DESC_LOW, (uint32_t)(uint64_t)desc);
	wr(d, VMMIO_QUEUE_DESC_HIGH, (uint32_t)((uint64_t)desc >> 32));
	wr(d, VMMIO_QUEUE_DRIVER_LOW, (uint32_t)(uint64_t)avail);
	wr(d, VMMIO_QUEUE_DRIVER_HIGH, (uint32_t)((uint64_t)avail >> 32));
	wr(d, VMMIO_QUEUE_DEVICE_LOW, (uint32_t)(uint64_t)used);
	wr(d, VMMIO_QUEUE_DEVICE_HIGH, (uint32_t)((uint64_t)used >> 32));
	wr(d, VMMIO_QUEUE_READY, 1);
	return 0;
}

/* Step 8. */
int virtio_driver_ok(struct virtio_dev *d)
{
	wr(d, VMMIO_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	if (rd(d, VMMIO_STATUS) & STATUS_FAILED)
		return init_fail(d, "device set FAILED after DRIVER_OK");
	return 0;
}

int virtio_init(struct virtio_dev *d, uint64_t wanted, uint32_t max_qsize)
{
	if (virtio_negotiate(d, wanted) < 0 ||
	    virtio_queue_setup(d, &d->vq, 0, max_qsize, vq_desc, &vq_avail, &vq_used) < 0)
		return -1;
	return virtio_driver_ok(d);
}

void virtio_reset(struct virtio_dev *d) { wr(d, VMMIO_STATUS, 0); }

/* Device-specific configuration, read under ConfigGeneration (§4.2.2.2: 32-bit accesses). */
uint32_t virtio_config_read32(const struct virtio_dev *d, uint32_t off)
{
	return rd(d, VMMIO_CONFIG + off);
}

uint64_t virtio_config_read64(const struct virtio_dev *d, uint32_t off)
{
	uint32_t gen, lo, hi;
	do {
		gen = rd(d, VMMIO_CONFIG_GENERATION);
		lo = rd(d, VMMIO_CONFIG + off);
		hi = rd(d, VMMIO_CONFIG + off + 4);
	} while (rd(d, VMMIO_CONFIG_GENERATION) != gen);
	return lo | (uint64_t)hi << 32;
}

/* ---- virtqueue ---- */

void vq_set_desc(struct vq *q, uint16_t i, const void *addr, uint32_t len, uint16_t flags, uint16_t next)
{
	q->desc[i].addr = (uint64_t)addr;
	q->desc[i].len = len;
	q->desc[i].flags = flags;
	q->desc[i].next = next;
}

void vq_submit(struct vq *q, uint16_t head)
{
	q->avail->ring[q->avail_idx % q->qsize] = head;
	barrier(); /* x86: stores are not reordered with other stores */
	q->avail_idx++;
	*(volatile uint16_t *)&q->avail->idx = q->avail_idx;
}

void vq_kick(struct virtio_dev *d, struct vq *q)
{
	mb(); /* avail->idx visible before we read used->flags and before the notify */
	if (!(*(volatile uint16_t *)&q->used->flags & VRING_USED_F_NO_NOTIFY))
		wr(d, VMMIO_QUEUE_NOTIFY, q->index);
}

bool vq_poll(struct vq *q, uint32_t *id, uint32_t *len)
{
	uint16_t used_idx = *(volatile uint16_t *)&q->used->idx;
	if (used_idx == q->last_used)
		return false;
	barrier(); /* x86: loads are not reordered with other loads */
	const volatile struct vring_used_elem *e = &q->used->ring[q->last_used % q->qsize];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	return true;
}

int vq_wait(struct virtio_dev *d, struct vq *q, uint32_t *id, uint32_t *len)
{
	uint64_t deadline = rdtsc() + VQ_TIMEOUT_MS * tsc_khz();
	while (!vq_poll(q, id, len)) {
		if ((int64_t)(rdtsc() - deadline) > 0) {
			put_dev(d);
			put_str("timeout waiting for the used ring\n");
			return -1;
		}
		cpu_relax();
	}
	return 0;
}

void virtio_ack(struct virtio_dev *d)
{
	uint32_t st = rd(d, VMMIO_INTERRUPT_STATUS);
	if (st)
		wr(d, VMMIO_INTERRUPT_ACK, st);
}
