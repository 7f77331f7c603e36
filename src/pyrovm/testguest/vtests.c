/*
 * pyrovm test guest: tests of virtio devices (block, entropy) on top of virtio.c, at CPL3.
 *   test=virtio                       print the command line and every virtio-mmio device found
 *   test=blk [sectors=N] [chunk=M]    write a pattern to sectors 0..N-1, flush, read back, compare
 *   test=blk-ro                       on a read-only disk: a read works, a write fails with IOERR
 *   test=blk-id                       VIRTIO_BLK_T_GET_ID
 *   test=blkbench op=read|write bs=B depth=D count=N    load generator (the host does the timing)
 *   test=rng [bytes=N]                read N bytes from the entropy device
 */
#include "guest.h"

#define VIRTIO_BLK_F_RO (1ull << 5)
#define VIRTIO_BLK_F_FLUSH (1ull << 9)
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_ID_BYTES 20
#define SECTOR 512
#define BLK_CFG_CAPACITY 0x00

#define BLK_WANTED (VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH)
#define BLK_HEADER "pyrovm-blk-test"

struct blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* One header and one status byte per request chain (chain c uses descriptors 3c..3c+2). */
static struct blk_req_hdr blk_hdr[VQ_MAX / 3] __attribute__((aligned(64)));
static uint8_t blk_status[VQ_MAX / 3] __attribute__((aligned(64)));

static void put_hex_bytes(const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		put_char("0123456789abcdef"[p[i] >> 4]);
		put_char("0123456789abcdef"[p[i] & 0xf]);
	}
}

static const char *blk_status_name(int st)
{
	switch (st) {
	case VIRTIO_BLK_S_OK: return "OK";
	case VIRTIO_BLK_S_IOERR: return "IOERR";
	case VIRTIO_BLK_S_UNSUPP: return "UNSUPP";
	case -1: return "timeout";
	default: return "unknown";
	}
}

/* Fill chain c's descriptors (data len 0: header + status only). */
static void blk_chain(struct virtio_dev *d, unsigned c, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	uint16_t h = (uint16_t)(3 * c);
	bool dev_writes = type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID;
	blk_hdr[c].type = type;
	blk_hdr[c].reserved = 0;
	blk_hdr[c].sector = sector;
	blk_status[c] = 0xff;
	if (len) {
		vq_set_desc(&d->vq, h, &blk_hdr[c], sizeof(blk_hdr[c]), VRING_DESC_F_NEXT, h + 1);
		vq_set_desc(&d->vq, h + 1, buf, len, VRING_DESC_F_NEXT | (dev_writes ? VRING_DESC_F_WRITE : 0), h + 2);
	} else {
		vq_set_desc(&d->vq, h, &blk_hdr[c], sizeof(blk_hdr[c]), VRING_DESC_F_NEXT, h + 2);
	}
	vq_set_desc(&d->vq, h + 2, &blk_status[c], 1, VRING_DESC_F_WRITE, 0);
}

/* One synchronous request on chain 0: returns the status byte, or -1 (timeout / protocol error). */
static int blk_req(struct virtio_dev *d, uint32_t type, uint64_t sector, void *buf, uint32_t len)
{
	uint32_t id, used_len;
	blk_chain(d, 0, type, sector, buf, len);
	vq_submit(&d->vq, 0);
	vq_kick(d, &d->vq);
	if (vq_wait(d, &d->vq, &id, &used_len) < 0)
		return -1;
	virtio_ack(d);
	if (id != 0) {
		put_str("blk: used ring returned id ");
		put_u64(id);
		put_str(", expected 0\n");
		return -1;
	}
	int st = *(volatile uint8_t *)&blk_status[0];
	if (st == VIRTIO_BLK_S_OK && type == VIRTIO_BLK_T_IN && used_len < len + 1) {
		put_str("blk: read of ");
		put_u64(len);
		put_str(" bytes: used len ");
		put_u64(used_len);
		put_str(" < data + status\n");
		return -1;
	}
	return st;
}

static int blk_open(struct virtio_dev *d, uint64_t *capacity, uint32_t max_qsize)
{
	if (virtio_find(VIRTIO_ID_BLOCK, d) < 0 || virtio_init(d, BLK_WANTED, max_qsize) < 0)
		return -1;
	*capacity = virtio_config_read64(d, BLK_CFG_CAPACITY);
	put_str("blk capacity ");
	put_u64(*capacity);
	put_str(" sectors features ");
	put_hex(d->features);
	put_str(" offered ");
	put_hex(d->device_features);
	put_str(" queue ");
	put_u64(d->vq.qsize);
	put_char('/');
	put_u64(d->qmax);
	put_str(" at ");
	put_hex(d->base);
	put_char('\n');
	return 0;
}

static bool blk_check(const char *what, uint64_t sector, int st, int want)
{
	if (st == want)
		return true;
	put_str("blk: ");
	put_str(what);
	put_str(" sector ");
	put_u64(sector);
	put_str(": status ");
	put_u64((uint8_t)st);
	put_str(" (");
	put_str(blk_status_name(st));
	put_str("), expected ");
	put_str(blk_status_name(want));
	put_char('\n');
	return false;
}

static uint8_t pattern(uint64_t sector, uint32_t i)
{
	if (sector == 0 && i < sizeof(BLK_HEADER) - 1)
		return (uint8_t)BLK_HEADER[i];
	return (uint8_t)(sector * 7 + i);
}

int test_virtio(void)
{
	put_str("cmdline: ");
	put_str(cmdline_raw());
	put_char('\n');
	int n = virtio_list();
	put_str("virtio devices: ");
	put_u64((uint64_t)n);
	put_char('\n');
	return 0;
}

int test_blk(void)
{
	struct virtio_dev d;
	uint64_t capacity;
	uint64_t n = cmdline_get("sectors", 64), chunk = cmdline_get("chunk", 16);
	if (blk_open(&d, &capacity, 0) < 0)
		return 1;
	if (n == 0 || n > capacity || n * SECTOR > VIRTIO_BUF_SIZE || chunk == 0 || chunk * SECTOR > VIRTIO_BUF_SIZE) {
		put_str("blk: bad sectors=/chunk= (capacity ");
		put_u64(capacity);
		put_str(", buffer ");
		put_u64(VIRTIO_BUF_SIZE / SECTOR);
		put_str(" sectors)\n");
		return 1;
	}
	uint8_t *buf = virtio_buf;
	for (uint64_t k = 0; k < n; k++)
		for (uint32_t i = 0; i < SECTOR; i++)
			buf[k * SECTOR + i] = pattern(k, i);
	for (uint64_t k = 0; k < n; k += chunk) {
		uint64_t m = n - k < chunk ? n - k : chunk;
		if (!blk_check("write", k, blk_req(&d, VIRTIO_BLK_T_OUT, k, buf + k * SECTOR, (uint32_t)(m * SECTOR)),
			       VIRTIO_BLK_S_OK))
			return 1;
	}
	if (d.features & VIRTIO_BLK_F_FLUSH) {
		if (!blk_check("flush", 0, blk_req(&d, VIRTIO_BLK_T_FLUSH, 0, NULL, 0), VIRTIO_BLK_S_OK))
			return 1;
	} else {
		put_str("blk: VIRTIO_BLK_F_FLUSH not offered, no flush\n");
	}
	memset(buf, 0, n * SECTOR);
	for (uint64_t k = 0; k < n; k += chunk) {
		uint64_t m = n - k < chunk ? n - k : chunk;
		if (!blk_check("read", k, blk_req(&d, VIRTIO_BLK_T_IN, k, buf + k * SECTOR, (uint32_t)(m * SECTOR)),
			       VIRTIO_BLK_S_OK))
			return 1;
	}
	for (uint64_t k = 0; k < n; k++)
		for (uint32_t i = 0; i < SECTOR; i++)
			if (buf[k * SECTOR + i] != pattern(k, i)) {
				put_str("blk: mismatch at sector ");
				put_u64(k);
				put_str(" byte ");
				put_u64(i);
				put_str(": read ");
				put_hex(buf[k * SECTOR + i]);
				put_str(", wrote ");
				put_hex(pattern(k, i));
				put_char('\n');
				return 1;
			}
	virtio_reset(&d);
	put_str("blk ok ");
	put_u64(n);
	put_str(" sectors\n");
	return 0;
}

int test_blk_ro(void)
{
	struct virtio_dev d;
	uint64_t capacity;
	if (blk_open(&d, &capacity, 0) < 0)
		return 1;
	if (!(d.features & VIRTIO_BLK_F_RO)) {
		put_str("blk-ro: the device does not offer VIRTIO_BLK_F_RO\n");
		return 1;
	}
	uint8_t *before = virtio_buf, *data = virtio_buf + SECTOR, *after = virtio_buf + 2 * SECTOR;
	if (!blk_check("read", 0, blk_req(&d, VIRTIO_BLK_T_IN, 0, before, SECTOR), VIRTIO_BLK_S_OK))
		return 1;
	for (uint32_t i = 0; i < SECTOR; i++)
		data[i] = (uint8_t)~before[i];
	if (!blk_check("write", 0, blk_req(&d, VIRTIO_BLK_T_OUT, 0, data, SECTOR), VIRTIO_BLK_S_IOERR))
		return 1;
	if (!blk_check("read", 0, blk_req(&d, VIRTIO_BLK_T_IN, 0, after, SECTOR), VIRTIO_BLK_S_OK))
		return 1;
	if (memcmp(before, after, SECTOR) != 0) {
		put_str("blk-ro: sector 0 changed after the failed write\n");
		return 1;
	}
	virtio_reset(&d);
	put_str("blk ro ok\n");
	return 0;
}

int test_blk_id(void)
{
	struct virtio_dev d;
	uint64_t capacity;
	if (blk_open(&d, &capacity, 0) < 0)
		return 1;
	char *id = (char *)virtio_buf;
	memset(id, 0, VIRTIO_BLK_ID_BYTES + 1);
	if (!blk_check("get-id", 0, blk_req(&d, VIRTIO_BLK_T_GET_ID, 0, id, VIRTIO_BLK_ID_BYTES), VIRTIO_BLK_S_OK))
		return 1;
	virtio_reset(&d);
	put_str("blk id ");
	for (int i = 0; i < VIRTIO_BLK_ID_BYTES && id[i]; i++)
		put_char(id[i] >= 0x20 && id[i] < 0x7f ? id[i] : '?');
	put_char('\n');
	return 0;
}

int test_blkbench(void)
{
	struct virtio_dev d;
	uint64_t capacity;
	char op[8] = "read";
	cmdline_get_str("op", op, sizeof(op));
	bool write = str_eq_n("write", op, strlen(op));
	uint64_t bs = cmdline_get("bs", 4096), depth = cmdline_get("depth", 1), count = cmdline_get("count", 1000);
	if (!write && !str_eq_n("read", op, strlen(op))) {
		put_str("blkbench: op must be read or write\n");
		return 1;
	}
	if (bs == 0 || bs % SECTOR || depth == 0 || depth > VQ_MAX / 3 || bs * depth > VIRTIO_BUF_SIZE) {
		put_str("blkbench: bad bs=/depth= (bs a multiple of 512, depth <= 85, bs * depth <= 2 MiB)\n");
		return 1;
	}
	if (blk_open(&d, &capacity, 0) < 0)
		return 1;
	uint64_t spr = bs / SECTOR;
	if (3 * depth > d.vq.qsize) {
		put_str("blkbench: queue of ");
		put_u64(d.vq.qsize);
		put_str(" descriptors is too small for depth ");
		put_u64(depth);
		put_char('\n');
		return 1;
	}
	if (capacity < spr) {
		put_str("blkbench: disk smaller than one request\n");
		return 1;
	}
	if (depth > count)
		depth = count;
	uint32_t type = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
	for (uint64_t i = 0; i < bs * depth; i++)
		virtio_buf[i] = (uint8_t)i;
	put_str("blkbench start op=");
	put_str(write ? "write" : "read");
	put_str(" bs=");
	put_u64(bs);
	put_str(" depth=");
	put_u64(depth);
	put_str(" count=");
	put_u64(count);
	put_char('\n');

	uint64_t t0 = rdtsc();
	uint64_t sector = 0, submitted = 0, completed = 0, failed = 0;
	for (unsigned c = 0; c < depth; c++) {
		blk_chain(&d, c, type, sector, virtio_buf + c * bs, (uint32_t)bs);
		vq_submit(&d.vq, (uint16_t)(3 * c));
		submitted++;
		sector = sector + 2 * spr > capacity ? 0 : sector + spr;
	}
	vq_kick(&d, &d.vq);
	uint64_t deadline = rdtsc() + VQ_TIMEOUT_MS * tsc_khz();
	while (completed < count) {
		uint32_t id, len;
		bool resubmitted = false;
		while (vq_poll(&d.vq, &id, &len)) {
			unsigned c = id / 3;
			if (id % 3 || c >= depth) {
				put_str("blkbench: used ring returned id ");
				put_u64(id);
				put_char('\n');
				return 1;
			}
			completed++;
			if (blk_status[c] != VIRTIO_BLK_S_OK) {
				if (!failed)
					blk_check(write ? "write" : "read", blk_hdr[c].sector, blk_status[c], VIRTIO_BLK_S_OK);
				failed++;
			}
			if (submitted < count) {
				blk_hdr[c].sector = sector;
				blk_status[c] = 0xff;
				vq_submit(&d.vq, (uint16_t)id);
				submitted++;
				resubmitted = true;
				sector = sector + 2 * spr > capacity ? 0 : sector + spr;
			}
		}
		if (resubmitted) {
			vq_kick(&d, &d.vq);
			deadline = rdtsc() + VQ_TIMEOUT_MS * tsc_khz();
		} else if ((int64_t)(rdtsc() - deadline) > 0) {
			put_str("blkbench: timeout after ");
			put_u64(completed);
			put_str(" completions\n");
			return 1;
		} else {
			cpu_relax();
		}
	}
	uint64_t t1 = rdtsc();
	put_str("blkbench done ");
	put_u64(completed);
	put_char('\n');
	virtio_ack(&d);
	virtio_reset(&d);
	put_str("blkbench guest-tsc-us ");
	put_u64((t1 - t0) * 1000 / tsc_khz());
	put_char('\n');
	if (failed) {
		put_str("blkbench: ");
		put_u64(failed);
		put_str(" requests failed\n");
		return 1;
	}
	return 0;
}

int test_rng(void)
{
	struct virtio_dev d;
	uint64_t n = cmdline_get("bytes", 64), got = 0;
	if (n == 0 || n > VIRTIO_BUF_SIZE) {
		put_str("rng: bad bytes= (1 to 2097152)\n");
		return 1;
	}
	if (virtio_find(VIRTIO_ID_RNG, &d) < 0 || virtio_init(&d, 0, 0) < 0)
		return 1;
	memset(virtio_buf, 0, n);
	for (int rounds = 0; got < n; rounds++) {
		uint32_t id, len;
		if (rounds == 1000) {
			put_str("rng: only ");
			put_u64(got);
			put_str(" bytes after 1000 buffers\n");
			return 1;
		}
		vq_set_desc(&d.vq, 0, virtio_buf + got, (uint32_t)(n - got), VRING_DESC_F_WRITE, 0);
		vq_submit(&d.vq, 0);
		vq_kick(&d, &d.vq);
		if (vq_wait(&d, &d.vq, &id, &len) < 0)
			return 1;
		virtio_ack(&d);
		if (id != 0 || len > n - got) {
			put_str("rng: bad used element id ");
			put_u64(id);
			put_str(" len ");
			put_u64(len);
			put_char('\n');
			return 1;
		}
		got += len;
	}
	virtio_reset(&d);
	bool nonzero = false;
	for (uint64_t i = 0; i < n; i++)
		nonzero |= virtio_buf[i] != 0;
	if (!nonzero) {
		put_str("rng: all ");
		put_u64(n);
		put_str(" bytes are zero\n");
		return 1;
	}
	put_str("rng ok ");
	put_u64(got);
	put_char(' ');
	put_hex_bytes(virtio_buf, n < 8 ? n : 8);
	put_char('\n');
	return 0;
}
