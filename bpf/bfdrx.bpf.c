// SPDX-License-Identifier: GPL-2.0
//
// crosslink's BFD receive offload (`[bfd] offload = true`): a tc program on
// the ingress of each offloaded path's interface that takes the steady
// stream of BFD control packets of an Up session off the kernel's UDP
// socket path. `src/io/bfd_offload.rs` loads it with aya, attaches it with
// tcx (Linux 6.6 or later) and keeps its map; the README's "BFD receive
// offload" says what it does and why.
//
// A session that is Up on both ends receives the same 24 bytes every
// interval: a packet that repeats the last one the BFD thread processed
// changes nothing in RFC 5880's state machine but the time of the last
// reception (the detection timer). The BFD thread writes such a packet,
// with the addresses and interface it must come from and its TTL floor, in
// `sessions` at the slot of the session's own discriminator. The program takes a
// packet that matches all of it (byte for byte), writes its arrival time
// and counts it, and drops it; everything else goes on to the socket, as
// without the program. The thread reads the time when the session's
// detection time runs out, before it declares the session down.
//
// Build: `bash bpf/build` (Debian 12's clang 14); the object it writes,
// bfdrx.bpf.o, is committed and CI checks that it is this source's.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// tcx verdicts (linux/bpf.h of 6.6; Debian 12's headers are 6.1).
#define TCX_NEXT -1
#define TCX_DROP 2

// RFC 5881 and 5883 ports; a control packet without authentication.
#define BFD_SINGLE_HOP 3784
#define BFD_MULTIHOP 4784
#define BFD_LEN 24

// One offloaded session, at the slot its local discriminator's low 16
// bits name (crosslink gives each path a discriminator whose low bits are
// its own slot). The layout is `entry` in bfd_offload.rs. The BFD thread
// writes it through a shared mapping of the array (BPF_F_MMAPABLE),
// `discr` last, and reads `last_ns` and `packets` there: no system call.
struct session {
	// The packets' Your Discriminator; 0: the slot takes nothing.
	__u32 discr;
	// The interface it must arrive on (0: any, multihop).
	__u32 ifindex;
	// The control packet that the session takes as a repeat.
	__u8 packet[BFD_LEN];
	// The remote (source) and local (destination) addresses, IPv4 as
	// IPv4-mapped IPv6.
	__u32 saddr[4];
	__u32 daddr[4];
	// The least TTL or hop limit (255 for single hop, RFC 5881 section 5).
	__u8 min_ttl;
	__u8 pad[7];
	// Written here: when the last repeat arrived (bpf_ktime_get_ns,
	// CLOCK_MONOTONIC) and how many did.
	__u64 last_ns;
	__u64 packets;
};

_Static_assert(sizeof(struct session) == 88, "session");
_Static_assert(__builtin_offsetof(struct session, ifindex) == 4, "ifindex");
_Static_assert(__builtin_offsetof(struct session, packet) == 8, "packet");
_Static_assert(__builtin_offsetof(struct session, saddr) == 32, "saddr");
_Static_assert(__builtin_offsetof(struct session, daddr) == 48, "daddr");
_Static_assert(__builtin_offsetof(struct session, min_ttl) == 64, "min_ttl");
_Static_assert(__builtin_offsetof(struct session, last_ns) == 72, "last_ns");
_Static_assert(__builtin_offsetof(struct session, packets) == 80, "packets");

#define SLOTS 65536

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, struct session);
} sessions SEC(".maps");

struct v4 {
	struct iphdr ip;
	struct udphdr udp;
	__u8 bfd[BFD_LEN];
};

struct v6 {
	struct ipv6hdr ip;
	struct udphdr udp;
	__u8 bfd[BFD_LEN];
};

static __always_inline int same(const __u8 *a, const __u8 *b)
{
	__u64 x[3], y[3];
	__builtin_memcpy(x, a, sizeof(x));
	__builtin_memcpy(y, b, sizeof(y));
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

SEC("classifier")
int xl_bfd_rx(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN > data_end)
		return TCX_NEXT;
	struct ethhdr *eth = data;
	__u32 saddr[4] = {}, daddr[4] = {};
	__u8 ttl;
	struct udphdr *udp;
	__u8 *bfd;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct v4 *p = data + ETH_HLEN;
		if ((void *)(p + 1) > data_end)
			return TCX_NEXT;
		// IPv4 without options, UDP, not a fragment.
		if (p->ip.version != 4 || p->ip.ihl != 5 ||
		    p->ip.protocol != IPPROTO_UDP ||
		    (p->ip.frag_off & bpf_htons(0x3fff)))
			return TCX_NEXT;
		saddr[2] = bpf_htonl(0xffff);
		saddr[3] = p->ip.saddr;
		daddr[2] = bpf_htonl(0xffff);
		daddr[3] = p->ip.daddr;
		ttl = p->ip.ttl;
		udp = &p->udp;
		bfd = p->bfd;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct v6 *p = data + ETH_HLEN;
		if ((void *)(p + 1) > data_end)
			return TCX_NEXT;
		if (p->ip.version != 6 || p->ip.nexthdr != IPPROTO_UDP)
			return TCX_NEXT;
		__builtin_memcpy(saddr, &p->ip.saddr, sizeof(saddr));
		__builtin_memcpy(daddr, &p->ip.daddr, sizeof(daddr));
		ttl = p->ip.hop_limit;
		udp = &p->udp;
		bfd = p->bfd;
	} else {
		return TCX_NEXT;
	}
	if (udp->dest != bpf_htons(BFD_SINGLE_HOP) &&
	    udp->dest != bpf_htons(BFD_MULTIHOP))
		return TCX_NEXT;
	// Exactly one control packet without authentication.
	if (udp->len != bpf_htons(sizeof(struct udphdr) + BFD_LEN))
		return TCX_NEXT;
	__u32 discr;
	__builtin_memcpy(&discr, bfd + 8, sizeof(discr));
	discr = bpf_ntohl(discr);
	if (!discr)
		return TCX_NEXT;
	__u32 slot = discr & (SLOTS - 1);
	struct session *s = bpf_map_lookup_elem(&sessions, &slot);
	if (!s || s->discr != discr)
		return TCX_NEXT;
	if (s->ifindex && s->ifindex != skb->ingress_ifindex)
		return TCX_NEXT;
	if (ttl < s->min_ttl)
		return TCX_NEXT;
	if (saddr[0] != s->saddr[0] || saddr[1] != s->saddr[1] ||
	    saddr[2] != s->saddr[2] || saddr[3] != s->saddr[3] ||
	    daddr[0] != s->daddr[0] || daddr[1] != s->daddr[1] ||
	    daddr[2] != s->daddr[2] || daddr[3] != s->daddr[3])
		return TCX_NEXT;
	if (!same(bfd, s->packet))
		return TCX_NEXT;
	s->last_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&s->packets, 1);
	return TCX_DROP;
}

char LICENSE[] SEC("license") = "GPL";
