/*
 * pyrovm test guest: a minimal virtio-net driver and IPv4 responder, at CPL3 (polling, no interrupts).
 *
 *   test=net ip=A.B.C.D[/N] | ip=dhcp [gw=A.B.C.D] [echo=7]
 *       Answers ARP for its address and ICMP echo requests; echoes UDP datagrams sent to port `echo`
 *       byte for byte; counts datagrams sent to port 9 (discard); on UDP port 10 takes commands:
 *         "stats"               -> "rx <datagrams> <bytes>" (those counted on port 9)
 *         "send N SIZE PORT"    -> N datagrams of SIZE payload bytes to the sender's address and PORT,
 *                                  then "sent N" from port 10
 *         "quit"                -> the guest exits with status 0
 *       With ip=dhcp it first gets its address from a DHCP server (DISCOVER/OFFER/REQUEST/ACK).
 *       Prints "net: ready mac M ip A gw G mtu N" once it answers.
 *   test=netbench ip=... dst=A.B.C.D:PORT count=N size=S
 *       Resolves dst's MAC by ARP, sends N UDP datagrams of S payload bytes to it, then serves as
 *       test=net (so the host can stop it with "quit").
 *
 * Frames in the rings start with the 12-byte virtio_net_hdr (VIRTIO_F_VERSION_1), all zero on send:
 * the driver takes no offload, so every frame is complete and checksummed.
 */
#include "guest.h"

#define VIRTIO_NET_F_MTU (1ull << 3)
#define VIRTIO_NET_F_MAC (1ull << 5)
#define VIRTIO_NET_F_STATUS (1ull << 16)
#define NET_WANTED (VIRTIO_NET_F_MTU | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS)
#define NET_HDR 12
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define IPPROTO_ICMP 1
#define IPPROTO_UDP 17
#define RXQ 0
#define TXQ 1
#define NQ 128              /* queue size; buffers per queue: as many as fit in virtio_buf, at most NQ */
#define PORT_DISCARD 9
#define PORT_CONTROL 10
#define DHCP_CLIENT 68
#define DHCP_SERVER 67

static struct vring_desc rx_desc[VQ_MAX] __attribute__((aligned(4096)));
static struct vring_avail rx_avail __attribute__((aligned(4096)));
static struct vring_used rx_used __attribute__((aligned(4096)));
static struct vring_desc tx_desc[VQ_MAX] __attribute__((aligned(4096)));
static struct vring_avail tx_avail __attribute__((aligned(4096)));
static struct vring_used tx_used __attribute__((aligned(4096)));

static struct {
	struct virtio_dev d;
	struct vq rx, tx;
	uint8_t mac[6];
	uint32_t ip, mask, gw;
	uint32_t mtu, bufsize, nbuf;
	uint16_t echo_port;
	uint16_t tx_free[NQ];
	uint32_t tx_nfree;
	uint64_t rx_count, rx_bytes, tx_count;
	bool dhcp; /* still looking for an address */
	uint32_t dhcp_xid, offer, server;
	int dhcp_state; /* 0 discover sent, 1 request sent, 2 bound */
	uint8_t arp_mac[6];
	uint32_t arp_ip;
	bool arp_done;
} n;

/* ---- byte order and checksums ---- */
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }

static uint16_t csum(const uint8_t *p, size_t len)
{
	uint32_t sum = 0;
	for (; len > 1; p += 2, len -= 2)
		sum += (uint32_t)(p[0] << 8 | p[1]);
	if (len)
		sum += (uint32_t)p[0] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void put_ip(uint32_t ip)
{
	for (int i = 3; i >= 0; i--) {
		put_u64((ip >> (8 * i)) & 0xff);
		if (i)
			put_char('.');
	}
}

static void put_mac(const uint8_t *m)
{
	for (int i = 0; i < 6; i++) {
		put_char("0123456789abcdef"[m[i] >> 4]);
		put_char("0123456789abcdef"[m[i] & 15]);
		if (i < 5)
			put_char(':');
	}
}

/* "A.B.C.D" at s (len bytes, may stop early at '/' or ':'); returns the bytes used, 0 if not an address. */
static size_t parse_ip(const char *s, size_t len, uint32_t *ip)
{
	uint32_t v = 0;
	size_t i = 0;
	for (int part = 0; part < 4; part++) {
		uint32_t x = 0;
		size_t start = i;
		while (i < len && s[i] >= '0' && s[i] <= '9' && i - start < 3)
			x = x * 10 + (uint32_t)(s[i++] - '0');
		if (i == start || x > 255)
			return 0;
		v = v << 8 | x;
		if (part < 3) {
			if (i >= len || s[i] != '.')
				return 0;
			i++;
		}
	}
	*ip = v;
	return i;
}

/* ---- buffers and queues ---- */
static uint8_t *rx_buf(uint32_t i) { return virtio_buf + (uint64_t)i * n.bufsize; }
static uint8_t *tx_buf(uint32_t i) { return virtio_buf + (uint64_t)(n.nbuf + i) * n.bufsize; }

static void rx_post(uint16_t i)
{
	vq_set_desc(&n.rx, i, rx_buf(i), n.bufsize, VRING_DESC_F_WRITE, 0);
	vq_submit(&n.rx, i);
}

static void tx_reclaim(void)
{
	uint32_t id, len;
	while (vq_poll(&n.tx, &id, &len))
		if (id < n.nbuf)
			n.tx_free[n.tx_nfree++] = (uint16_t)id;
}

/* A free tx buffer (waiting for the device to give one back); its frame starts after the header. */
static uint16_t tx_get(void)
{
	uint64_t deadline = rdtsc() + VQ_TIMEOUT_MS * tsc_khz();
	if (!n.tx_nfree) {
		tx_reclaim();
		if (!n.tx_nfree)
			vq_kick(&n.d, &n.tx); /* frames submitted without a kick must go out first */
	}
	while (!n.tx_nfree) {
		tx_reclaim();
		if ((int64_t)(rdtsc() - deadline) > 0) {
			put_str("net: tx queue stuck (no buffer came back)\n");
			vm_exit(3);
		}
	}
	uint16_t i = n.tx_free[--n.tx_nfree];
	memset(tx_buf(i), 0, NET_HDR);
	return i;
}

static void tx_put(uint16_t i, uint32_t frame_len, bool kick)
{
	vq_set_desc(&n.tx, i, tx_buf(i), NET_HDR + frame_len, 0, 0);
	vq_submit(&n.tx, i);
	n.tx_count++;
	if (kick)
		vq_kick(&n.d, &n.tx);
}

/* ---- building frames ---- */
static void eth_hdr(uint8_t *f, const uint8_t *dst, uint16_t type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, n.mac, 6);
	put16(f + 12, type);
}

/* IPv4 + UDP headers at f + ETH_HLEN for payload_len bytes (UDP checksum 0: none, allowed on IPv4). */
static uint32_t udp_hdr(uint8_t *f, uint32_t src, uint32_t dst, uint16_t sport, uint16_t dport, uint32_t payload_len)
{
	uint8_t *ip = f + ETH_HLEN, *udp = ip + 20;
	memset(ip, 0, 28);
	ip[0] = 0x45;
	put16(ip + 2, (uint16_t)(28 + payload_len));
	ip[6] = 0x40; /* don't fragment */
	ip[8] = 64;
	ip[9] = IPPROTO_UDP;
	put32(ip + 12, src);
	put32(ip + 16, dst);
	put16(ip + 10, csum(ip, 20));
	put16(udp, sport);
	put16(udp + 2, dport);
	put16(udp + 4, (uint16_t)(8 + payload_len));
	return ETH_HLEN + 28 + payload_len;
}

static void send_udp(const uint8_t *dmac, uint32_t dip, uint16_t sport, uint16_t dport, const void *data, uint32_t len, bool kick)
{
	uint16_t i = tx_get();
	uint8_t *f = tx_buf(i) + NET_HDR;
	eth_hdr(f, dmac, ETH_P_IP);
	memcpy(f + ETH_HLEN + 28, data, len);
	tx_put(i, udp_hdr(f, n.ip, dip, sport, dport, len), kick);
}

static void send_arp(uint16_t op, const uint8_t *tha, uint32_t tpa)
{
	static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	uint16_t i = tx_get();
	uint8_t *f = tx_buf(i) + NET_HDR, *a = f + ETH_HLEN;
	eth_hdr(f, op == 1 ? bcast : tha, ETH_P_ARP);
	put16(a, 1);
	put16(a + 2, ETH_P_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, n.mac, 6);
	put32(a + 14, n.ip);
	if (op == 1)
		memset(a + 18, 0, 6);
	else
		memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	tx_put(i, ETH_HLEN + 28, true);
}

/* ---- DHCP client ---- */
static void dhcp_send(uint8_t type)
{
	static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	uint16_t i = tx_get();
	uint8_t *f = tx_buf(i) + NET_HDR, *b = f + ETH_HLEN + 28;
	memset(b, 0, 300);
	b[0] = 1; /* BOOTREQUEST */
	b[1] = 1;
	b[2] = 6;
	put32(b + 4, n.dhcp_xid);
	put16(b + 10, 0x8000); /* broadcast */
	memcpy(b + 28, n.mac, 6);
	put32(b + 236, 0x63825363);
	uint8_t *o = b + 240;
	*o++ = 53, *o++ = 1, *o++ = type;
	if (type == 3) {
		*o++ = 50, *o++ = 4, put32(o, n.offer), o += 4;
		*o++ = 54, *o++ = 4, put32(o, n.server), o += 4;
	}
	*o++ = 55, *o++ = 3, *o++ = 1, *o++ = 3, *o++ = 6;
	*o++ = 255;
	eth_hdr(f, bcast, ETH_P_IP);
	uint32_t saved = n.ip;
	n.ip = 0;
	tx_put(i, udp_hdr(f, 0, 0xffffffffu, DHCP_CLIENT, DHCP_SERVER, 300), true);
	n.ip = saved;
}

static void dhcp_reply(const uint8_t *b, uint32_t len)
{
	if (len < 240 || b[0] != 2 || get32(b + 4) != n.dhcp_xid || get32(b + 236) != 0x63825363)
		return;
	uint8_t type = 0;
	uint32_t server = 0, mask = 0, router = 0;
	for (uint32_t k = 240; k < len && b[k] != 255;) {
		if (b[k] == 0) {
			k++;
			continue;
		}
		if (k + 1 >= len || k + 2 + b[k + 1] > len)
			break;
		const uint8_t *v = b + k + 2;
		if (b[k] == 53)
			type = v[0];
		else if (b[k] == 54 && b[k + 1] == 4)
			server = get32(v);
		else if (b[k] == 1 && b[k + 1] == 4)
			mask = get32(v);
		else if (b[k] == 3 && b[k + 1] >= 4)
			router = get32(v);
		k += 2u + b[k + 1];
	}
	if (type == 2 && n.dhcp_state == 0) { /* OFFER */
		n.offer = get32(b + 16);
		n.server = server;
		n.dhcp_state = 1;
		dhcp_send(3);
	} else if (type == 5 && n.dhcp_state == 1) { /* ACK */
		n.ip = get32(b + 16);
		n.mask = mask;
		n.gw = router;
		n.dhcp_state = 2;
		n.dhcp = false;
	}
}

/* ---- receiving ---- */
static void handle_control(const uint8_t *f, const uint8_t *payload, uint32_t len);

static void handle_udp(const uint8_t *f, const uint8_t *ip, uint32_t ip_len)
{
	uint32_t ihl = (uint32_t)(ip[0] & 15) * 4;
	const uint8_t *udp = ip + ihl;
	if (ip_len < ihl + 8)
		return;
	uint16_t sport = get16(udp), dport = get16(udp + 2), ulen = get16(udp + 4);
	if (ulen < 8 || ulen > ip_len - ihl)
		return;
	const uint8_t *payload = udp + 8;
	uint32_t plen = ulen - 8u;
	if (n.dhcp) {
		if (dport == DHCP_CLIENT)
			dhcp_reply(payload, plen);
		return;
	}
	if (dport == n.echo_port)
		send_udp(f + 6, get32(ip + 12), dport, sport, payload, plen, true);
	else if (dport == PORT_DISCARD) {
		n.rx_count++;
		n.rx_bytes += plen;
	} else if (dport == PORT_CONTROL)
		handle_control(f, payload, plen);
}

static void handle_icmp(const uint8_t *f, const uint8_t *ip, uint32_t ip_len)
{
	uint32_t ihl = (uint32_t)(ip[0] & 15) * 4;
	if (ip_len < ihl + 8 || ip[ihl] != 8 /* echo request */)
		return;
	if (ip_len > n.bufsize - NET_HDR - ETH_HLEN)
		return;
	uint16_t i = tx_get();
	uint8_t *r = tx_buf(i) + NET_HDR, *rip = r + ETH_HLEN;
	eth_hdr(r, f + 6, ETH_P_IP);
	memcpy(rip, ip, ip_len);
	put32(rip + 12, n.ip);
	memcpy(rip + 16, ip + 12, 4);
	rip[8] = 64;
	put16(rip + 10, 0);
	put16(rip + 10, csum(rip, ihl));
	uint8_t *icmp = rip + ihl;
	icmp[0] = 0; /* echo reply */
	put16(icmp + 2, 0);
	put16(icmp + 2, csum(icmp, ip_len - ihl));
	tx_put(i, ETH_HLEN + ip_len, true);
}

static void handle_frame(const uint8_t *f, uint32_t len)
{
	static const uint8_t bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	if (len < ETH_HLEN || (memcmp(f, n.mac, 6) != 0 && memcmp(f, bcast, 6) != 0))
		return;
	uint16_t type = get16(f + 12);
	const uint8_t *p = f + ETH_HLEN;
	len -= ETH_HLEN;
	if (type == ETH_P_ARP && len >= 28 && get16(p + 6) == 1 && get32(p + 24) == n.ip && !n.dhcp) {
		send_arp(2, p + 8, get32(p + 14));
	} else if (type == ETH_P_ARP && len >= 28 && get16(p + 6) == 2 && get32(p + 14) == n.arp_ip) {
		memcpy(n.arp_mac, p + 8, 6);
		n.arp_done = true;
	} else if (type == ETH_P_IP && len >= 20 && (p[0] >> 4) == 4) {
		uint32_t ip_len = get16(p + 2);
		if (ip_len > len || ip_len < (uint32_t)(p[0] & 15) * 4)
			return;
		if (!n.dhcp && get32(p + 16) != n.ip)
			return;
		if (p[9] == IPPROTO_UDP)
			handle_udp(f, p, ip_len);
		else if (p[9] == IPPROTO_ICMP && !n.dhcp)
			handle_icmp(f, p, ip_len);
	}
}

/* Handles every frame received so far and gives the buffers back; returns how many. */
static uint32_t net_poll(void)
{
	uint32_t id, len, got = 0;
	while (vq_poll(&n.rx, &id, &len)) {
		if (id < n.nbuf && len >= NET_HDR && len <= n.bufsize)
			handle_frame(rx_buf(id) + NET_HDR, len - NET_HDR);
		rx_post((uint16_t)(id < n.nbuf ? id : 0));
		got++;
	}
	if (got)
		vq_kick(&n.d, &n.rx);
	tx_reclaim();
	return got;
}

/* ---- commands ---- */
static uint64_t word_u64(const uint8_t **p, const uint8_t *end)
{
	uint64_t v = 0;
	while (*p < end && **p == ' ')
		(*p)++;
	while (*p < end && **p >= '0' && **p <= '9')
		v = v * 10 + (uint64_t)(*(*p)++ - '0');
	return v;
}

static uint32_t fmt_u64(char *out, uint64_t v)
{
	char tmp[20];
	uint32_t k = 0, len = 0;
	do
		tmp[k++] = (char)('0' + v % 10);
	while ((v /= 10) != 0);
	while (k)
		out[len++] = tmp[--k];
	return len;
}

static void send_stream(const uint8_t *dmac, uint32_t dip, uint16_t dport, uint64_t count, uint32_t size)
{
	uint32_t max = n.mtu - 28;
	if (size > max)
		size = max;
	for (uint64_t k = 0; k < count; k++) {
		uint16_t i = tx_get();
		uint8_t *f = tx_buf(i) + NET_HDR;
		eth_hdr(f, dmac, ETH_P_IP);
		uint8_t *pl = f + ETH_HLEN + 28;
		memset(pl, 'x', size);
		if (size >= 8)
			memcpy(pl, &k, 8);
		/* kick every 32 frames and at the end; the device drains the rest in one go */
		tx_put(i, udp_hdr(f, n.ip, dip, PORT_CONTROL, dport, size), (k & 31) == 31 || k + 1 == count);
	}
}

static void handle_control(const uint8_t *f, const uint8_t *payload, uint32_t len)
{
	const uint8_t *ip = f + ETH_HLEN, *udp = ip + (ip[0] & 15) * 4;
	uint32_t src = get32(ip + 12);
	uint16_t sport = get16(udp);
	char out[64];
	uint32_t k = 0;
	const uint8_t *end = payload + len;
	if (len >= 5 && memcmp(payload, "stats", 5) == 0) {
		memcpy(out, "rx ", 3);
		k = 3;
		k += fmt_u64(out + k, n.rx_count);
		out[k++] = ' ';
		k += fmt_u64(out + k, n.rx_bytes);
		send_udp(f + 6, src, PORT_CONTROL, sport, out, k, true);
	} else if (len >= 5 && memcmp(payload, "send ", 5) == 0) {
		const uint8_t *p = payload + 5;
		uint64_t count = word_u64(&p, end), size = word_u64(&p, end), port = word_u64(&p, end);
		uint8_t dmac[6];
		memcpy(dmac, f + 6, 6);
		send_stream(dmac, src, port ? (uint16_t)port : sport, count, (uint32_t)size);
		memcpy(out, "sent ", 5);
		k = 5 + fmt_u64(out + 5, count);
		send_udp(dmac, src, PORT_CONTROL, sport, out, k, true);
	} else if (len >= 4 && memcmp(payload, "quit", 4) == 0) {
		put_str("net: quit\n");
		vm_exit(0);
	}
}

/* ---- set-up ---- */
static int net_setup(void)
{
	if (virtio_find(VIRTIO_ID_NET, &n.d) < 0 || virtio_negotiate(&n.d, NET_WANTED) < 0)
		return -1;
	if (!(n.d.features & VIRTIO_NET_F_MAC)) {
		put_str("net: the device offers no MAC address\n");
		return -1;
	}
	uint32_t w0 = virtio_config_read32(&n.d, 0), w1 = virtio_config_read32(&n.d, 4);
	uint32_t w2 = virtio_config_read32(&n.d, 8);
	for (int i = 0; i < 4; i++)
		n.mac[i] = (uint8_t)(w0 >> (8 * i));
	n.mac[4] = (uint8_t)w1;
	n.mac[5] = (uint8_t)(w1 >> 8);
	uint16_t status = (uint16_t)(w1 >> 16);
	n.mtu = (n.d.features & VIRTIO_NET_F_MTU) ? (w2 >> 16) : 1500;
	if (n.mtu < 68)
		n.mtu = 1500;
	if ((n.d.features & VIRTIO_NET_F_STATUS) && !(status & 1))
		put_str("net: link is down\n");
	n.bufsize = (NET_HDR + ETH_HLEN + n.mtu + 63) & ~63u;
	n.nbuf = VIRTIO_BUF_SIZE / (2 * n.bufsize);
	if (n.nbuf > NQ)
		n.nbuf = NQ;
	if (n.nbuf < 4) {
		put_str("net: mtu too large for the test guest's buffers\n");
		return -1;
	}
	if (virtio_queue_setup(&n.d, &n.rx, RXQ, NQ, rx_desc, &rx_avail, &rx_used) < 0 ||
	    virtio_queue_setup(&n.d, &n.tx, TXQ, NQ, tx_desc, &tx_avail, &tx_used) < 0 ||
	    virtio_driver_ok(&n.d) < 0)
		return -1;
	for (uint16_t i = 0; i < n.rx.qsize && i < n.nbuf; i++)
		rx_post(i);
	vq_kick(&n.d, &n.rx);
	for (uint16_t i = 0; i < n.tx.qsize && i < n.nbuf; i++)
		n.tx_free[n.tx_nfree++] = i;
	return 0;
}

static int net_address(void)
{
	char ipbuf[40];
	size_t len;
	n.echo_port = (uint16_t)cmdline_get("echo", 7);
	if (!cmdline_get_str("ip", ipbuf, sizeof(ipbuf))) {
		put_str("net: give ip=A.B.C.D[/N] or ip=dhcp\n");
		return -1;
	}
	len = strlen(ipbuf);
	if (str_eq_n("dhcp", ipbuf, len)) {
		n.dhcp = true;
		n.dhcp_xid = (uint32_t)rdtsc() ^ get32(n.mac + 2);
		for (int tries = 0; tries < 10 && n.dhcp; tries++) {
			n.dhcp_state = 0;
			dhcp_send(1);
			uint64_t deadline = rdtsc() + 1000 * tsc_khz();
			while (n.dhcp && (int64_t)(rdtsc() - deadline) < 0)
				net_poll();
		}
		if (n.dhcp) {
			put_str("net: no DHCP answer\n");
			return -1;
		}
		return 0;
	}
	size_t used = parse_ip(ipbuf, len, &n.ip);
	if (!used) {
		put_str("net: bad ip=\n");
		return -1;
	}
	uint64_t bits = 24;
	if (used < len && ipbuf[used] == '/')
		parse_u64(ipbuf + used + 1, len - used - 1, &bits);
	n.mask = bits ? ~0u << (32 - (bits > 32 ? 32 : bits)) : 0;
	if (cmdline_get_str("gw", ipbuf, sizeof(ipbuf)))
		parse_ip(ipbuf, strlen(ipbuf), &n.gw);
	return 0;
}

static void announce(void)
{
	put_str("net: ready mac ");
	put_mac(n.mac);
	put_str(" ip ");
	put_ip(n.ip);
	put_str(" gw ");
	put_ip(n.gw);
	put_str(" mtu ");
	put_u64(n.mtu);
	put_char('\n');
}

static __attribute__((noreturn)) void serve(void)
{
	for (;;)
		if (!net_poll())
			cpu_relax();
}

int test_net(void)
{
	if (net_setup() < 0 || net_address() < 0)
		return 1;
	announce();
	serve();
}

int test_netbench(void)
{
	char dst[40];
	if (net_setup() < 0 || net_address() < 0)
		return 1;
	if (!cmdline_get_str("dst", dst, sizeof(dst))) {
		put_str("netbench: give dst=A.B.C.D:PORT\n");
		return 1;
	}
	size_t len = strlen(dst), used = parse_ip(dst, len, &n.arp_ip);
	uint64_t port = 0;
	if (!used || used >= len || dst[used] != ':' || !parse_u64(dst + used + 1, len - used - 1, &port)) {
		put_str("netbench: bad dst=\n");
		return 1;
	}
	announce();
	for (int tries = 0; tries < 50 && !n.arp_done; tries++) {
		send_arp(1, NULL, n.arp_ip);
		uint64_t deadline = rdtsc() + 200 * tsc_khz();
		while (!n.arp_done && (int64_t)(rdtsc() - deadline) < 0)
			net_poll();
	}
	if (!n.arp_done) {
		put_str("netbench: no ARP answer from dst\n");
		return 1;
	}
	uint64_t count = cmdline_get("count", 1000);
	send_stream(n.arp_mac, n.arp_ip, (uint16_t)port, count, (uint32_t)cmdline_get("size", 64));
	put_str("netbench: sent ");
	put_u64(count);
	put_char('\n');
	serve();
}
