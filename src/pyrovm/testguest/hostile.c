/*
 * pyrovm test guest: `test=hostile [rounds=N]` attacks every virtio-mmio device from inside the VM, then
 * checks that the VMM still serves: every register offset of every device written and read with sizes 1,
 * 2 and 4 (aligned or not) and random values (so queues get enabled with garbage addresses and sizes,
 * features and status set out of order); then, on the entropy and block devices, queues set up properly
 * and fed malformed chains (buffers outside RAM, length 0xffffffff, a descriptor pointing at itself, a
 * chain through the whole table, heads out of range), an avail index jumping past the queue size, rings
 * rewritten while the device reads them, and storms of queue notifications (every index, random values).
 * Each device is reset after its turn.  At the end a fresh entropy request must be served:
 * prints "hostile: N devices attacked" and "hostile: rng still serves" and exits 0.
 */
#include "guest.h"

#define QUEUE_NOTIFY 0x050
#define STATUS 0x070
#define REG_SPACE 0x200

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static void register_storm(uint64_t base, uint64_t rounds)
{
	for (uint64_t r = 0; r < rounds; r++) {
		uint64_t off = rnd() % REG_SPACE, v = rnd();
		switch (rnd() % 6) {
		case 0: mmio_write8(base + off, (uint8_t)v); break;
		case 1: mmio_write16(base + off, (uint16_t)v); break;
		case 2: mmio_write32(base + (off & ~3ull), (uint32_t)v); break;
		case 3: (void)mmio_read8(base + off); break;
		case 4: (void)mmio_read16(base + off); break;
		default: (void)mmio_read32(base + (off & ~3ull)); break;
		}
	}
	mmio_write32(base + STATUS, 0); /* reset */
}

static void notify_storm(struct virtio_dev *d, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		mmio_write32(d->base + QUEUE_NOTIFY, (uint32_t)(i % 9 == 8 ? rnd() : i % 8));
}

/* One malformed chain on queue 0 (head = slot), submitted and kicked. */
static void bad_chain(struct virtio_dev *d, int kind)
{
	struct vq *q = &d->vq;
	uint16_t size = q->qsize, h = (uint16_t)(rnd() % size);
	switch (kind) {
	case 0: vq_set_desc(q, h, (void *)0xfffff00000000000ull, 4096, VRING_DESC_F_WRITE, 0); break;
	case 1: vq_set_desc(q, h, virtio_buf, 0xffffffffu, VRING_DESC_F_WRITE, 0); break;
	case 2: vq_set_desc(q, h, virtio_buf, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, h); break;
	case 3:
		for (uint16_t i = 0; i < size; i++)
			vq_set_desc(q, i, virtio_buf, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, (uint16_t)((i + 1) % size));
		break;
	case 4: vq_set_desc(q, h, virtio_buf, 16, 4 /* INDIRECT */, 0); break; /* a table of one byte-odd length */
	default: vq_set_desc(q, h, virtio_buf, 16, VRING_DESC_F_NEXT, (uint16_t)(size + rnd() % 1000)); break;
	}
	vq_submit(q, kind == 5 ? (uint16_t)(size + 7) : h);
	vq_kick(d, q);
}

static void queue_attack(uint32_t device_id, uint64_t rounds)
{
	struct virtio_dev d;
	if (virtio_find(device_id, &d) < 0 || virtio_init(&d, 0, 0) < 0)
		return;
	for (uint64_t r = 0; r < rounds; r++) {
		bad_chain(&d, (int)(r % 6));
		if (r % 16 == 15) { /* the avail index jumps past the queue size, then rings change under the device */
			d.vq.avail->idx = (uint16_t)(d.vq.avail->idx + 1000);
			vq_kick(&d, &d.vq);
			for (uint16_t i = 0; i < d.vq.qsize; i++)
				d.vq.desc[i].len = (uint32_t)rnd();
			notify_storm(&d, 64);
		}
		if (r % 32 == 31) { /* start over: reset and set the queue up again */
			virtio_reset(&d);
			if (virtio_init(&d, 0, 0) < 0)
				return;
		}
	}
	virtio_reset(&d);
}

int test_hostile(void)
{
	uint64_t rounds = cmdline_get("rounds", 200);
	struct virtio_mmio_loc locs[VIRTIO_MAX_DEVS];
	int n = virtio_mmio_locs(locs, VIRTIO_MAX_DEVS);
	for (int i = 0; i < n; i++)
		register_storm(locs[i].base, rounds * 8);
	queue_attack(VIRTIO_ID_BLOCK, rounds);
	queue_attack(VIRTIO_ID_RNG, rounds);
	put_str("hostile: ");
	put_u64((uint64_t)n);
	put_str(" devices attacked\n");
	struct virtio_dev d;
	uint32_t id, len;
	if (virtio_find(VIRTIO_ID_RNG, &d) < 0 || virtio_init(&d, 0, 0) < 0)
		return 1;
	vq_set_desc(&d.vq, 0, virtio_buf, 64, VRING_DESC_F_WRITE, 0);
	vq_submit(&d.vq, 0);
	vq_kick(&d, &d.vq);
	if (vq_wait(&d, &d.vq, &id, &len) < 0 || id != 0 || len != 64) {
		put_str("hostile: rng does not serve any more\n");
		return 1;
	}
	virtio_reset(&d);
	put_str("hostile: rng still serves\n");
	return 0;
}
