/*
 * pyrovm test guest: a minimal virtio-vsock driver, at CPL3 (polling, no interrupts).
 *
 *   test=vsock [port=5000] [connect=P [msg=TEXT]] [bytes=N]
 *       Listens on port (echo: every byte comes back, credit-controlled both ways), port+1 (source:
 *       sends N bytes, default 10 MiB, then shuts down) and port+2 (sink: drops what it gets and closes
 *       once the host has shut its side down, so the host sees when everything arrived).  With
 *       connect=P it first connects to the host (CID 2) port P, sends TEXT and closes; it prints
 *       "vsock: connected to host port P" or "vsock: host port P refused".  Prints
 *       "vsock: ready cid C port N" once it listens; runs until the VM is stopped.  On the event
 *       TRANSPORT_RESET (a restored snapshot) it drops every connection and prints "vsock: transport reset".
 *   test=vsockbench   the same (the host picks echo, source or sink by port)
 *
 * Credit: the driver advertises buf_alloc = 64 KiB per connection and counts as forwarded (fwd_cnt)
 * the bytes it has echoed (or dropped, on the sink), so the host never sends more than the connection's
 * ring holds; it sends the host no more than the host's buf_alloc - (tx_cnt - fwd_cnt).
 */
#include "guest.h"

#define VSOCK_F_STREAM (1ull << 0)
#define HOST_CID 2
#define HDR 44
#define PAYLOAD 4096
#define STRIDE (HDR + PAYLOAD + 20) /* 4160: keeps buffers 16-byte aligned */
#define NBUF 64
#define NCONN 16
#define RING (64u * 1024)
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define MODE_ECHO 0
#define MODE_SOURCE 1
#define MODE_SINK 2
#define MODE_OUT 3

struct hdr {
	uint64_t src_cid, dst_cid;
	uint32_t src_port, dst_port, len;
	uint16_t type, op;
	uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct conn {
	bool used;
	int mode;
	uint32_t port, peer;          /* ours, the host's */
	uint32_t rx_cnt, fwd_cnt;     /* bytes received; of those, echoed or dropped */
	uint32_t tx_cnt;              /* bytes sent */
	uint32_t told;                /* fwd_cnt as the host last heard it */
	uint32_t peer_alloc, peer_fwd;
	uint64_t left;                /* source: bytes still to send */
	bool peer_done;               /* the host sends no more */
	uint8_t *ring;
};

static struct vring_desc q_desc[3][VQ_MAX] __attribute__((aligned(4096)));
static struct vring_avail q_avail[3] __attribute__((aligned(4096)));
static struct vring_used q_used[3] __attribute__((aligned(4096)));

static struct {
	struct virtio_dev d;
	struct vq rx, tx, ev;
	uint64_t cid;
	uint32_t port;
	uint16_t tx_free[NBUF];
	uint32_t tx_nfree;
	struct conn c[NCONN];
	int out_state; /* connect=: 0 none, 1 waiting, 2 connected, 3 refused */
	uint64_t source_bytes;
} v;

static uint8_t *rxb(uint32_t i) { return virtio_buf + (uint64_t)i * STRIDE; }
static uint8_t *txb(uint32_t i) { return virtio_buf + (uint64_t)(NBUF + i) * STRIDE; }
static uint8_t *ring_mem(uint32_t i) { return virtio_buf + 2ull * NBUF * STRIDE + (uint64_t)i * RING; }

static void rx_post(uint16_t i)
{
	vq_set_desc(&v.rx, i, rxb(i), HDR + PAYLOAD, VRING_DESC_F_WRITE, 0);
	vq_submit(&v.rx, i);
}

/* The event queue: four 4-byte buffers; the only event is TRANSPORT_RESET (id 0), sent when the VM was
 * restored from a snapshot: every connection is gone (the host side is a new process). */
#define NEV 4
#define EVENT_TRANSPORT_RESET 0
static uint32_t ev_buf[NEV];

static void ev_post(uint16_t i)
{
	vq_set_desc(&v.ev, i, &ev_buf[i], sizeof(ev_buf[i]), VRING_DESC_F_WRITE, 0);
	vq_submit(&v.ev, i);
}

static void ev_poll(void)
{
	uint32_t id, len;
	bool got = false;
	while (vq_poll(&v.ev, &id, &len)) {
		if (id < NEV && len >= 4 && ev_buf[id] == EVENT_TRANSPORT_RESET) {
			for (int i = 0; i < NCONN; i++)
				v.c[i].used = false;
			put_str("vsock: transport reset\n");
		}
		ev_post((uint16_t)(id < NEV ? id : 0));
		got = true;
	}
	if (got)
		vq_kick(&v.d, &v.ev);
}

static void tx_reclaim(void)
{
	uint32_t id, len;
	while (vq_poll(&v.tx, &id, &len))
		if (id < NBUF)
			v.tx_free[v.tx_nfree++] = (uint16_t)id;
}

static void send_pkt(struct conn *c, uint16_t op, uint32_t flags, const uint8_t *data, uint32_t len,
		     uint32_t port, uint32_t peer)
{
	uint64_t deadline = rdtsc() + VQ_TIMEOUT_MS * tsc_khz();
	tx_reclaim();
	while (!v.tx_nfree) {
		vq_kick(&v.d, &v.tx);
		tx_reclaim();
		if ((int64_t)(rdtsc() - deadline) > 0) {
			put_str("vsock: tx queue stuck\n");
			vm_exit(3);
		}
	}
	uint16_t i = v.tx_free[--v.tx_nfree];
	struct hdr *h = (struct hdr *)txb(i);
	h->src_cid = v.cid;
	h->dst_cid = HOST_CID;
	h->src_port = c ? c->port : port;
	h->dst_port = c ? c->peer : peer;
	h->len = len;
	h->type = 1;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = RING;
	h->fwd_cnt = c ? c->fwd_cnt : 0;
	if (c)
		c->told = c->fwd_cnt;
	if (len)
		memcpy(txb(i) + HDR, data, len);
	vq_set_desc(&v.tx, i, txb(i), HDR + len, 0, 0);
	vq_submit(&v.tx, i);
	vq_kick(&v.d, &v.tx);
	if (c)
		c->tx_cnt += len;
}

static uint32_t credit(const struct conn *c) { return c->peer_alloc - (c->tx_cnt - c->peer_fwd); }

static void drop_conn(struct conn *c) { c->used = false; }

/* Send what can be sent now: echoed bytes, the source's stream; close when done. */
static void pump(struct conn *c)
{
	static uint8_t chunk[PAYLOAD];
	if (c->mode == MODE_ECHO) {
		uint32_t pending;
		while ((pending = c->rx_cnt - c->fwd_cnt) != 0 && credit(c) != 0) {
			uint32_t n = pending < PAYLOAD ? pending : PAYLOAD;
			if (n > credit(c))
				n = credit(c);
			uint32_t off = c->fwd_cnt % RING, first = RING - off < n ? RING - off : n;
			memcpy(chunk, c->ring + off, first);
			memcpy(chunk + first, c->ring, n - first);
			c->fwd_cnt += n; /* the header of this packet already tells the host */
			send_pkt(c, OP_RW, 0, chunk, n, 0, 0);
		}
		if (c->peer_done && c->rx_cnt == c->fwd_cnt) {
			send_pkt(c, OP_SHUTDOWN, 3, NULL, 0, 0, 0);
			drop_conn(c);
		}
	} else if (c->mode == MODE_SINK) {
		if (c->peer_done) { /* all counted: close, so the host knows everything arrived */
			send_pkt(c, OP_SHUTDOWN, 3, NULL, 0, 0, 0);
			drop_conn(c);
		}
	} else if (c->mode == MODE_SOURCE) {
		memset(chunk, 's', sizeof(chunk));
		while (c->left && credit(c) != 0) {
			uint32_t n = c->left < PAYLOAD ? (uint32_t)c->left : PAYLOAD;
			if (n > credit(c))
				n = credit(c);
			c->left -= n;
			send_pkt(c, OP_RW, 0, chunk, n, 0, 0);
		}
		if (!c->left) {
			send_pkt(c, OP_SHUTDOWN, 3, NULL, 0, 0, 0);
			drop_conn(c);
		}
	}
}

static struct conn *find(uint32_t port, uint32_t peer)
{
	for (int i = 0; i < NCONN; i++)
		if (v.c[i].used && v.c[i].port == port && v.c[i].peer == peer)
			return &v.c[i];
	return NULL;
}

static struct conn *new_conn(uint32_t port, uint32_t peer, int mode, const struct hdr *h)
{
	for (int i = 0; i < NCONN; i++) {
		struct conn *c = &v.c[i];
		if (c->used)
			continue;
		memset(c, 0, sizeof(*c));
		c->used = true;
		c->mode = mode;
		c->port = port;
		c->peer = peer;
		c->ring = ring_mem((uint32_t)i);
		c->peer_alloc = h->buf_alloc;
		c->peer_fwd = h->fwd_cnt;
		c->left = v.source_bytes;
		return c;
	}
	return NULL;
}

static void handle(const struct hdr *h, const uint8_t *data, uint32_t len)
{
	if (h->src_cid != HOST_CID || h->dst_cid != v.cid || h->type != 1)
		return;
	struct conn *c = find(h->dst_port, h->src_port);
	if (h->op == OP_REQUEST) {
		uint32_t p = h->dst_port;
		int mode = p == v.port ? MODE_ECHO : p == v.port + 1 ? MODE_SOURCE : p == v.port + 2 ? MODE_SINK : -1;
		if (c || mode < 0 || !(c = new_conn(p, h->src_port, mode, h))) {
			send_pkt(NULL, OP_RST, 0, NULL, 0, h->dst_port, h->src_port);
			return;
		}
		send_pkt(c, OP_RESPONSE, 0, NULL, 0, 0, 0);
		pump(c);
		return;
	}
	if (!c) {
		if (h->op != OP_RST)
			send_pkt(NULL, OP_RST, 0, NULL, 0, h->dst_port, h->src_port);
		return;
	}
	c->peer_alloc = h->buf_alloc;
	c->peer_fwd = h->fwd_cnt;
	switch (h->op) {
	case OP_RESPONSE:
		if (c->mode == MODE_OUT && v.out_state == 1)
			v.out_state = 2;
		break;
	case OP_RW:
		if (c->mode == MODE_ECHO) {
			if (c->rx_cnt - c->fwd_cnt + len > RING) { /* the host went past our credit */
				send_pkt(c, OP_RST, 0, NULL, 0, 0, 0);
				drop_conn(c);
				return;
			}
			for (uint32_t k = 0; k < len; k++)
				c->ring[(c->rx_cnt + k) % RING] = data[k];
			c->rx_cnt += len;
		} else {
			c->rx_cnt += len;
			c->fwd_cnt += len;
			if (c->fwd_cnt - c->told >= RING / 2)
				send_pkt(c, OP_CREDIT_UPDATE, 0, NULL, 0, 0, 0);
		}
		break;
	case OP_CREDIT_REQUEST:
		send_pkt(c, OP_CREDIT_UPDATE, 0, NULL, 0, 0, 0);
		break;
	case OP_SHUTDOWN:
		if ((h->flags & 3) == 3) {
			send_pkt(c, OP_RST, 0, NULL, 0, 0, 0);
			drop_conn(c);
			return;
		}
		if (h->flags & 2)
			c->peer_done = true;
		break;
	case OP_RST:
		if (c->mode == MODE_OUT && v.out_state == 1)
			v.out_state = 3;
		drop_conn(c);
		return;
	default:
		break;
	}
	pump(c);
}

static void vsock_poll(void)
{
	uint32_t id, len;
	bool got = false;
	while (vq_poll(&v.rx, &id, &len)) {
		if (id < NBUF && len >= HDR && len <= HDR + PAYLOAD) {
			const struct hdr *h = (const struct hdr *)rxb(id);
			if (h->len <= len - HDR)
				handle(h, rxb(id) + HDR, h->len);
		}
		rx_post((uint16_t)(id < NBUF ? id : 0));
		got = true;
	}
	if (got)
		vq_kick(&v.d, &v.rx);
	tx_reclaim();
	ev_poll();
}

static int vsock_setup(void)
{
	if (virtio_find(VIRTIO_ID_VSOCK, &v.d) < 0 || virtio_negotiate(&v.d, VSOCK_F_STREAM) < 0)
		return -1;
	v.cid = virtio_config_read64(&v.d, 0);
	if (virtio_queue_setup(&v.d, &v.rx, 0, NBUF, q_desc[0], &q_avail[0], &q_used[0]) < 0 ||
	    virtio_queue_setup(&v.d, &v.tx, 1, NBUF, q_desc[1], &q_avail[1], &q_used[1]) < 0 ||
	    virtio_queue_setup(&v.d, &v.ev, 2, 16, q_desc[2], &q_avail[2], &q_used[2]) < 0 ||
	    virtio_driver_ok(&v.d) < 0)
		return -1;
	for (uint16_t i = 0; i < NBUF && i < v.rx.qsize; i++)
		rx_post(i);
	vq_kick(&v.d, &v.rx);
	for (uint16_t i = 0; i < NEV && i < v.ev.qsize; i++)
		ev_post(i);
	vq_kick(&v.d, &v.ev);
	for (uint16_t i = 0; i < NBUF && i < v.tx.qsize; i++)
		v.tx_free[v.tx_nfree++] = i;
	return 0;
}

static void connect_out(void)
{
	uint32_t port = (uint32_t)cmdline_get("connect", 0);
	char msg[64];
	if (!port)
		return;
	if (!cmdline_get_str("msg", msg, sizeof(msg)))
		memcpy(msg, "hello from the guest", 21);
	struct hdr h = {.buf_alloc = RING};
	struct conn *c = new_conn(40000, port, MODE_OUT, &h);
	v.out_state = 1;
	send_pkt(c, OP_REQUEST, 0, NULL, 0, 0, 0);
	uint64_t deadline = rdtsc() + 5000 * tsc_khz();
	while (v.out_state == 1 && (int64_t)(rdtsc() - deadline) < 0)
		vsock_poll();
	put_str("vsock: ");
	if (v.out_state == 2) {
		put_str("connected to host port ");
		put_u64(port);
		put_char('\n');
		send_pkt(c, OP_RW, 0, (const uint8_t *)msg, (uint32_t)strlen(msg), 0, 0);
		send_pkt(c, OP_SHUTDOWN, 3, NULL, 0, 0, 0);
	} else {
		put_str("host port ");
		put_u64(port);
		put_str(v.out_state == 3 ? " refused\n" : " did not answer\n");
	}
	drop_conn(c);
}

int test_vsock(void)
{
	v.port = (uint32_t)cmdline_get("port", 5000);
	v.source_bytes = cmdline_get("bytes", 10u << 20);
	if (vsock_setup() < 0)
		return 1;
	connect_out();
	put_str("vsock: ready cid ");
	put_u64(v.cid);
	put_str(" port ");
	put_u64(v.port);
	put_char('\n');
	for (;;) {
		vsock_poll();
		for (int i = 0; i < NCONN; i++)
			if (v.c[i].used && v.c[i].mode == MODE_SOURCE)
				pump(&v.c[i]);
		cpu_relax();
	}
}
