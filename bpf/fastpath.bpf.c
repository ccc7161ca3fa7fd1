// SPDX-License-Identifier: GPL-2.0
//
// crosslink's kernel fast path: the two tc programs of a cleartext peer
// (`fast_path = true`). `src/io/fastpath.rs` loads them with aya, attaches
// them with tcx (Linux 6.6 or later) and keeps their maps. See the module
// documentation there and the README's "Kernel fast path" for what they do
// and what they leave to the lanes.
//
// Build: `bash bpf/build` (Debian 12's clang 14); the object it writes,
// fastpath.bpf.o, is committed and CI checks that it is this source's.

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
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

// The overlay header (src/core/wire/overlay.rs).
#define OVERLAY_VERSION 1
#define OVERLAY_DATA 1
#define OVERLAY_LEN 16
#define OVERLAY_FLAG_PEER_SEQ 0x01
#define OVERLAY_LANE_SHIFT 4
#define OVERLAY_LANES 8

// What the sending program puts in front of an inner packet, by the
// path's underlay: outer IPv4 (no options) or IPv6 (no extension headers),
// UDP, overlay. `OVERHEAD_V4` and `OVERHEAD_V6` in fastpath.rs.
struct outer4 {
	struct iphdr ip;
	struct udphdr udp;
	__u8 overlay[OVERLAY_LEN];
};

struct outer6 {
	struct ipv6hdr ip;
	struct udphdr udp;
	__u8 overlay[OVERLAY_LEN];
};

#define OVERHEAD4 ((int)sizeof(struct outer4))
#define OVERHEAD6 ((int)sizeof(struct outer6))
// The longest inner packet: the outer IPv4 length must still hold the
// whole; the IPv6 payload length (and the UDP length, in both) the UDP
// and overlay headers and the inner packet.
#define MAX_INNER4 (65535 - OVERHEAD4)
#define MAX_INNER6 (65535 - (int)sizeof(struct udphdr) - OVERLAY_LEN)

_Static_assert(sizeof(struct outer4) == 44, "outer IPv4 headers");
_Static_assert(sizeof(struct outer6) == 64, "outer IPv6 headers");

// How the sending program picks the path (`config.enabled` of the one
// entry of `config`): none (everything goes on to the lanes), this entry's
// path, or the path of the flow's bucket in `table` (`balance`).
#define MODE_OFF 0
#define MODE_ONE 1
#define MODE_TABLE 2

// `balance`: flows are spread over this many buckets by their hash, each
// bucket naming a path's slot in `paths`.
#define BUCKETS 256

// The sending program's configuration: the active path (the one entry of
// `config`), or each path of a `balance` peer (`paths`, by counter slot).
// Written by the BFD thread (`config_value` in fastpath.rs).
struct config {
	// In `config`: a MODE_*. In `paths`: 1 when the slot holds a path.
	__u32 enabled;
	// The path's interface.
	__u32 ifindex;
	// The path's counter slot (tx_stats).
	__u32 slot;
	// IPv4: ones'-complement sum of `outer.v4.ip` with TOS and length 0.
	__u32 csum_base;
	// The outer headers of the path's family (`family`), with TOS or
	// traffic class, flow label, lengths and checksums 0 (8-aligned: the
	// program copies them in 8-byte words).
	union {
		struct outer4 v4;
		struct outer6 v6;
	} outer __attribute__((aligned(8)));
	// The outer TOS byte (IPv6: traffic class) is (inner TOS & tos_mask) |
	// tos_set: 0xff, 0 to inherit the DSCP; 0x03 and the path's DSCP to
	// set it.
	__u8 tos_mask;
	__u8 tos_set;
	// The underlay: 4 (IPv4) or 6 (IPv6).
	__u8 family;
	__u8 pad[5];
};

// The offsets `mod cfg` in fastpath.rs writes at.
_Static_assert(sizeof(struct config) == 88, "config");
_Static_assert(__builtin_offsetof(struct config, ifindex) == 4, "ifindex");
_Static_assert(__builtin_offsetof(struct config, slot) == 8, "slot");
_Static_assert(__builtin_offsetof(struct config, csum_base) == 12, "csum_base");
_Static_assert(__builtin_offsetof(struct config, outer) == 16, "outer");
_Static_assert(__builtin_offsetof(struct config, tos_mask) == 80, "tos_mask");
_Static_assert(__builtin_offsetof(struct config, tos_set) == 81, "tos_set");
_Static_assert(__builtin_offsetof(struct config, family) == 82, "family");

// Datagrams and their bytes (overlay and inner packet), per path slot.
struct counters {
	__u64 packets;
	__u64 bytes;
};

// What the receiving program took on a path slot: datagrams, their bytes,
// and the highest overlay sequence number among them (the far end numbers
// a path's data datagrams; its path quality weighs the count against that
// number, so both must cover what this program takes, as the lanes' do).
struct rx_counters {
	__u64 packets;
	__u64 bytes;
	__u64 seq_high;
};

// The receiving program's key: the datagram's addresses and ports, as they
// lie in the packet, an IPv4 address as IPv4-mapped IPv6 (::ffff:a.b.c.d)
// (`rx_key` in fastpath.rs).
struct rx_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
};

_Static_assert(sizeof(struct rx_key) == 36, "RX_KEY_LEN");

// What a known path's datagrams get: its counter slot and the TUN.
struct rx_path {
	__u32 slot;
	__u32 tun;
};

// max_entries 1 is the loader's placeholder: it sets the number of path
// slots (FAST_PATH_MAX_PATHS) before it creates the maps.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

// `balance`: each path's configuration, by counter slot.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} paths SEC(".maps");

// `balance`: each bucket's path (its slot in `paths`), written whole in one
// update so that the program never sees half of a new table.
struct table {
	__u8 slot[BUCKETS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct table);
} table SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counters);
} tx_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct rx_key);
	__type(value, struct rx_path);
} rx_paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rx_counters);
} rx_stats SEC(".maps");

// The egress of the peer's TUN: every IPv4 or IPv6 packet routed into it
// gets the outer headers of the active path (or, under `balance`, of its
// flow's bucket's path) and leaves by that path's interface. A GSO
// super-packet stays one, marked as a UDP tunnel packet: whoever cuts it
// puts the outer headers in front of each segment. The outer UDP checksum
// is 0, which segmentation leaves as it is: IPv4 allows it, and over IPv6
// (RFC 6935) the receiving crosslink's data sockets accept it
// (UDP_NO_CHECK6_RX).
SEC("classifier")
int xl_encap(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP) &&
	    skb->protocol != bpf_htons(ETH_P_IPV6))
		return TCX_NEXT;

	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg || cfg->enabled == MODE_OFF)
		return TCX_NEXT;
	// The flow's hash (the kernel's, computed once per flow): the far
	// gateway's lane, the IPv6 flow label, and under `balance` the
	// flow's bucket.
	__u32 hash = bpf_get_hash_recalc(skb);
	if (cfg->enabled == MODE_TABLE) {
		struct table *t = bpf_map_lookup_elem(&table, &zero);
		if (!t)
			return TCX_NEXT;
		__u32 slot = t->slot[(hash >> 8) & (BUCKETS - 1)];
		cfg = bpf_map_lookup_elem(&paths, &slot);
		if (!cfg || !cfg->enabled)
			return TCX_NEXT;
	} else if (cfg->enabled != MODE_ONE) {
		return TCX_NEXT;
	}

	int v6 = cfg->family == 6;
	__u32 len = skb->len;
	if (len > (v6 ? MAX_INNER6 : MAX_INNER4))
		return TCX_NEXT;
	__u32 segs = skb->gso_segs;
	if (!segs)
		segs = 1;

	// The inner packet's first two bytes: its TOS byte (IPv4: byte 1) or
	// traffic class (IPv6: across bytes 0 and 1).
	__u8 first[2];
	if (bpf_skb_load_bytes(skb, 0, first, sizeof(first)))
		return TCX_NEXT;

	// The far gateway's lane.
	__u8 lane = (hash % OVERLAY_LANES) << OVERLAY_LANE_SHIFT;

	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2(OVERLAY_LEN);
	flags |= v6 ? BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 :
		      BPF_F_ADJ_ROOM_ENCAP_L3_IPV4;
	if (bpf_skb_adjust_room(skb, v6 ? OVERHEAD6 : OVERHEAD4,
				BPF_ADJ_ROOM_MAC, flags))
		return TCX_NEXT;

	// The outer TOS byte (RFC 6040 normal mode): the inner ECN field, and
	// the inner DSCP or the path's.
	__u8 tos = first[1];
	if (first[0] >> 4 != 4)
		tos = (__u8)(first[0] << 4 | first[1] >> 4);
	tos = (tos & cfg->tos_mask) | cfg->tos_set;

	if (v6) {
		struct outer6 o __attribute__((aligned(8)));
		__builtin_memcpy(&o, &cfg->outer.v6, sizeof(o));
		__u16 payload = len + sizeof(struct udphdr) + OVERLAY_LEN;
		// Version, traffic class and flow label (the flow's hash, as
		// the kernel's own UDP tunnels label a flow, RFC 6438).
		__u32 label = hash & 0xfffff;
		__u8 *w = (__u8 *)&o.ip;
		w[0] = 0x60 | tos >> 4;
		w[1] = (__u8)(tos << 4) | (__u8)(label >> 16);
		w[2] = (__u8)(label >> 8);
		w[3] = (__u8)label;
		o.ip.payload_len = bpf_htons(payload);
		o.udp.len = bpf_htons(payload);
		o.overlay[3] |= lane;
		if (bpf_skb_store_bytes(skb, 0, &o, sizeof(o), 0))
			return TCX_DROP;
	} else {
		struct outer4 o __attribute__((aligned(8)));
		__builtin_memcpy(&o, &cfg->outer.v4, sizeof(o));
		__u32 total = len + OVERHEAD4;
		o.ip.tos = tos;
		o.ip.tot_len = bpf_htons(total);
		// The TOS is the low byte of the header's first 16-bit word.
		__u32 sum = cfg->csum_base + total + tos;
		sum = (sum & 0xffff) + (sum >> 16);
		sum = (sum & 0xffff) + (sum >> 16);
		o.ip.check = bpf_htons(~sum & 0xffff);
		o.udp.len = bpf_htons(total - sizeof(struct iphdr));
		o.overlay[3] |= lane;
		if (bpf_skb_store_bytes(skb, 0, &o, sizeof(o), 0))
			return TCX_DROP;
	}
	// Room for the Ethernet header, which the neighbour code fills in.
	if (bpf_skb_change_head(skb, ETH_HLEN, 0))
		return TCX_DROP;

	// Datagrams, and their overlay and inner bytes (not the inner headers
	// that the segmentation repeats).
	__u32 slot = cfg->slot;
	struct counters *c = bpf_map_lookup_elem(&tx_stats, &slot);
	if (c) {
		c->packets += segs;
		c->bytes += len + segs * OVERLAY_LEN;
	}
	return bpf_redirect_neigh(cfg->ifindex, NULL, 0, 0);
}

// The ingress of a path's interface: a single cleartext data datagram from
// one of the peer's paths, over IPv4 or IPv6, goes into the TUN as if the
// TUN had received its inner packet, with its offload state. A GSO packet,
// a sealed or numbered message, an echo, a datagram whose outer ECN field
// is ECT(1) or CE (RFC 6040 decapsulation is left to the lanes), an IPv4
// fragment or an IPv6 packet with extension headers, anything else: on to
// the socket and the lanes.
SEC("classifier")
int xl_decap(struct __sk_buff *skb)
{
	if (skb->gso_size)
		return TCX_NEXT;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	if (data + ETH_HLEN > data_end)
		return TCX_NEXT;
	struct ethhdr *eth = data;
	struct rx_key key = {};
	__u8 *overlay;
	__u8 *inner;
	int overhead;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct outer4 *o = data + ETH_HLEN;
		// The outer headers and the inner packet's first byte.
		if ((void *)(o + 1) + 1 > data_end)
			return TCX_NEXT;
		// IPv4 without options, UDP.
		if (o->ip.version != 4 || o->ip.ihl != 5 ||
		    o->ip.protocol != IPPROTO_UDP)
			return TCX_NEXT;
		// Outer ECN ECT(1) or CE (bit 0 set): the inner ECN field may
		// change (RFC 6040), which the lanes do; Not-ECT and ECT(0)
		// never change it.
		if (o->ip.tos & 1)
			return TCX_NEXT;
		// Not a fragment.
		if (o->ip.frag_off & bpf_htons(0x3fff))
			return TCX_NEXT;
		key.saddr[2] = bpf_htonl(0xffff);
		key.saddr[3] = o->ip.saddr;
		key.daddr[2] = bpf_htonl(0xffff);
		key.daddr[3] = o->ip.daddr;
		key.sport = o->udp.source;
		key.dport = o->udp.dest;
		overlay = o->overlay;
		inner = (__u8 *)(o + 1);
		overhead = OVERHEAD4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct outer6 *o = data + ETH_HLEN;
		if ((void *)(o + 1) + 1 > data_end)
			return TCX_NEXT;
		// IPv6 with UDP next: no extension header (a fragment's either).
		if (o->ip.version != 6 || o->ip.nexthdr != IPPROTO_UDP)
			return TCX_NEXT;
		// Outer ECN ECT(1) or CE: the traffic class's bit 0, in the
		// header's second byte.
		if (((__u8 *)&o->ip)[1] & 0x10)
			return TCX_NEXT;
		__builtin_memcpy(key.saddr, &o->ip.saddr, sizeof(key.saddr));
		__builtin_memcpy(key.daddr, &o->ip.daddr, sizeof(key.daddr));
		key.sport = o->udp.source;
		key.dport = o->udp.dest;
		overlay = o->overlay;
		inner = (__u8 *)(o + 1);
		overhead = OVERHEAD6;
	} else {
		return TCX_NEXT;
	}
	// Version 1, data, the 16-byte header, no peer sequence number.
	if (overlay[0] != OVERLAY_VERSION || overlay[1] != OVERLAY_DATA ||
	    overlay[2] != OVERLAY_LEN || (overlay[3] & OVERLAY_FLAG_PEER_SEQ))
		return TCX_NEXT;
	__u8 version = *inner >> 4;
	// The path's sequence number (big-endian, overlay bytes 8 to 15),
	// read before the decapsulation moves the packet.
	__u64 seq;
	__builtin_memcpy(&seq, overlay + 8, sizeof(seq));
	seq = bpf_be64_to_cpu(seq);

	__u32 len = skb->len;
	struct rx_path *path = bpf_map_lookup_elem(&rx_paths, &key);
	if (!path)
		return TCX_NEXT;

	// The inner packet's family, which becomes the packet's.
	__u64 flags;
	if (version == 4)
		flags = BPF_F_ADJ_ROOM_DECAP_L3_IPV4;
	else if (version == 6)
		flags = BPF_F_ADJ_ROOM_DECAP_L3_IPV6;
	else
		return TCX_NEXT;
	if (bpf_skb_adjust_room(skb, -overhead, BPF_ADJ_ROOM_MAC, flags))
		return TCX_NEXT;

	// The datagram: its overlay and inner bytes, and its number.
	__u32 slot = path->slot;
	struct rx_counters *c = bpf_map_lookup_elem(&rx_stats, &slot);
	if (c) {
		c->packets += 1;
		c->bytes += len - (ETH_HLEN + overhead - OVERLAY_LEN);
		if (seq > c->seq_high)
			c->seq_high = seq;
	}
	return bpf_redirect(path->tun, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "GPL";
