/* imaptap.bpf.c: hand TCP segments of monitored ports to userspace, payload cut in the kernel.
 *
 * Attached by capture/live.py (BCC) as XDP on ingress and as a TC clsact filter on egress (or
 * TC on both with --no-xdp).  For every packet it parses Ethernet, up to two 802.1Q, 802.1ad
 * or 0x9100 tags, IPv4 (with options) or IPv6 (hop-by-hop, routing, destination options, AH
 * and atomic fragment headers, at most IMAPTAP_MAX_EXT_HDRS of them) and TCP.  A segment to or
 * from a monitored port goes to userspace as one record: a fixed struct imaptap_event and the
 * payload bytes the flow's mode asks for (below).  Pure ACKs are not submitted; SYN, FIN and
 * RST are, with or without payload.  capture/decode.py (replay) parses the same way; the live
 * tests compare the two frame by frame.
 *
 * Cost: every packet pays one parse and two array lookups; only matched segments pay the
 * flow-mode lookup (LRU hash), a ring buffer record and the payload copy.
 * The program never drops or changes a packet: XDP_PASS, and TC_ACT_UNSPEC so that other
 * tools' TC filters after ours still run and decide (TC_ACT_OK would end the filter chain).
 *
 * Limits (counted as "unparsed", packet passed on untouched): IPv4 fragments and non-atomic
 * IPv6 fragments (TCP over IP fragments is rare), more than IMAPTAP_MAX_EXT_HDRS IPv6 extension
 * headers, headers outside the first buffer of a multi-buffer XDP frame, and in TC headers
 * further than IMAPTAP_PULL_LEN bytes into the packet.  A third VLAN tag is passed on as not
 * IP (not counted).  Replay has neither the tag nor the extension-header limit.
 *
 * What is copied of a payload of n bytes (n: the TCP payload length, or less if the frame is
 * cut short), by the flow's mode in the flow_modes map:
 *   PREFIX            the first IMAPTAP_SNAPLEN bytes and, if n is larger, the last bytes after
 *                     them, at most IMAPTAP_TAILLEN: the tagged completion that ends a long
 *                     server response is in the tail (segment.split_payload cuts the same);
 *   HANDSHAKE         the same with IMAPTAP_HANDSHAKE_SNAPLEN instead of IMAPTAP_SNAPLEN: the
 *                     flow's login and the long lines around it (capabilities, ID) are whole;
 *   NONE              nothing (encrypted after STARTTLS); the segment is still reported;
 *   WHOLE             everything up to IMAPTAP_WHOLE_CAP (COMPRESS: userspace inflates).
 * A flow without an entry is in the default mode: HANDSHAKE when IMAPTAP_HANDSHAKE_SNAPLEN is
 * set, else PREFIX.  So a new flow is copied whole-ish from its SYN on, before userspace has
 * heard of it, and userspace writes PREFIX once its handshake is over (segment.PayloadPolicy).
 *
 * Compile-time options (cflags from live.py):
 *   -DIMAPTAP_SNAPLEN=N, -DIMAPTAP_TAILLEN=N  as above.
 *   -DIMAPTAP_HANDSHAKE_SNAPLEN=N  as above; 0 (the default) leaves HANDSHAKE out.
 *   -DIMAPTAP_RINGBUF=1     BPF ring buffer (kernel 5.8+); otherwise a perf buffer.
 *   -DIMAPTAP_RING_PAGES=N  ring buffer size in pages (a power of two).
 *   -DIMAPTAP_XDP=1         build the XDP program (needs bpf_xdp_load_bytes, kernel 5.18+).
 *   -DIMAPTAP_WORKERS=N     live --workers: N ring buffers (events, events_1, ... events_N-1,
 *                           each of IMAPTAP_RING_PAGES), a record going to ring share_of(flow_hash),
 *                           flowshare.py's symmetric FNV-1a of the 4-tuple, mixed, modulo N,
 *                           so each worker process reads the whole of its flows and no other's.
 *                           1 (the default) builds the program without the hash.  Ring buffer
 *                           builds only, at most IMAPTAP_MAX_WORKERS.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#include "imaptap.h"

#ifndef IMAPTAP_RING_PAGES
#define IMAPTAP_RING_PAGES 1024
#endif
#ifndef IMAPTAP_SNAPLEN
#define IMAPTAP_SNAPLEN 256
#endif
#ifndef IMAPTAP_TAILLEN
#define IMAPTAP_TAILLEN 128
#endif
#ifndef IMAPTAP_WORKERS
#define IMAPTAP_WORKERS 1
#endif
#if IMAPTAP_WORKERS < 1 || IMAPTAP_WORKERS > IMAPTAP_MAX_WORKERS
#error "IMAPTAP_WORKERS must be 1 to IMAPTAP_MAX_WORKERS"
#endif
#if IMAPTAP_WORKERS > 1 && !IMAPTAP_RINGBUF
#error "IMAPTAP_WORKERS above 1 needs the ring buffer (IMAPTAP_RINGBUF=1)"
#endif
#ifndef IMAPTAP_HANDSHAKE_SNAPLEN
#define IMAPTAP_HANDSHAKE_SNAPLEN 0
#endif
#if IMAPTAP_HANDSHAKE_SNAPLEN > 0
#define IMAPTAP_DEFAULT_MODE IMAPTAP_MODE_HANDSHAKE
#else
#define IMAPTAP_DEFAULT_MODE IMAPTAP_MODE_PREFIX
#endif

/* TC: when the headers are not in the linear part of the skb (drivers that build skbs from
 * page fragments, seen at TC ingress), pull this much and parse again.  Covers Ethernet, two
 * VLAN tags, an IPv6 header with 64 bytes of extension headers and a TCP header with options. */
#define IMAPTAP_PULL_LEN 192

/* Perf buffer fallback: records are built in a per-CPU scratch value, and per-CPU map values
 * are at most 32 KiB (PCPU_MIN_UNIT_SIZE), so WHOLE copies are cut to this on kernels < 5.8. */
#define IMAPTAP_PERF_CAP (32768 - sizeof(struct imaptap_event))

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define BE16(x) ((__u16)__builtin_bswap16(x))
#else
#define BE16(x) ((__u16)(x))
#endif

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04

/* Results of parse(). */
#define PARSE_DONE 0    /* handled (submitted, or not ours) */
#define PARSE_SHORT 1   /* headers run past the linear data */
#define PARSE_BAD 2     /* cannot parse: counted as unparsed */

struct vlan_tag {
    __be16 tci;
    __be16 proto;
};

BPF_ARRAY(config, struct imaptap_config, 1);
BPF_PERCPU_ARRAY(counters, struct imaptap_counters, 1);
BPF_TABLE("lru_hash", struct imaptap_flow_key, __u8, flow_modes, IMAPTAP_FLOW_MODES_MAX);

#if IMAPTAP_RINGBUF
BPF_RINGBUF_OUTPUT(events, IMAPTAP_RING_PAGES);
/* One ring per worker (IMAPTAP_WORKERS); a case in ring_reserve below for each. */
#if IMAPTAP_WORKERS > 1
BPF_RINGBUF_OUTPUT(events_1, IMAPTAP_RING_PAGES);
#endif
#if IMAPTAP_WORKERS > 2
BPF_RINGBUF_OUTPUT(events_2, IMAPTAP_RING_PAGES);
#endif
#if IMAPTAP_WORKERS > 3
BPF_RINGBUF_OUTPUT(events_3, IMAPTAP_RING_PAGES);
#endif
#if IMAPTAP_WORKERS > 4
BPF_RINGBUF_OUTPUT(events_4, IMAPTAP_RING_PAGES);
#endif
#if IMAPTAP_WORKERS > 5
BPF_RINGBUF_OUTPUT(events_5, IMAPTAP_RING_PAGES);
#endif
#if IMAPTAP_WORKERS > 6
BPF_RINGBUF_OUTPUT(events_6, IMAPTAP_RING_PAGES);
#endif
#if IMAPTAP_WORKERS > 7
BPF_RINGBUF_OUTPUT(events_7, IMAPTAP_RING_PAGES);
#endif
#else
struct perf_record {
    struct imaptap_event ev;
    __u8 payload[IMAPTAP_PERF_CAP];
};
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(scratch, struct perf_record, 1);
#endif

/* A copy length in [1, max] that the verifier can prove: clang drops a repeated bounds check
 * it knows to be redundant, so the value is hidden from it first.  Callers pass cap >= 1. */
static __always_inline __u64 bounded_len(__u64 cap, const __u64 max)
{
    /* 64-bit on purpose: with 32-bit values clang compares a zero-extended copy and the
     * verifier learns nothing about the register that is passed on. */
    __u64 n = cap - 1;
    asm volatile("" : "+r"(n));
    if (n > max - 1)
        n = max - 1;
    return n + 1;
}

/* Whether a port is in the configured bitmap.  The verifiers of 5.10 and 6.1 know nothing of a
 * byte swap's result (6.18's does), so BE16(th->dest) >> 3 is an unbounded index to them and
 * they reject the program (scripts/verifier-check); the mask bounds it, and the barrier keeps
 * clang from dropping the mask it knows to be redundant. */
static __always_inline int port_watched(const struct imaptap_config *cfg, __u32 port)
{
    asm volatile("" : "+r"(port));
    port &= 0xffff;
    return cfg->ports[port >> 3] & (1 << (port & 7));
}

/* memcmp order of two addresses kept as network-order words. */
static __always_inline int addr_lt(const __be32 *a, const __be32 *b)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __u32 x = bpf_ntohl(a[i]), y = bpf_ntohl(b[i]);
        if (x != y)
            return x < y;
    }
    return 0;
}

/* Copy `cap` payload bytes at `off` of the packet to `dst`; 0 on success. */
static __always_inline long load_payload(void *ctx, const int hook, __u32 off, void *dst, __u32 cap)
{
#if IMAPTAP_XDP
    if (hook == IMAPTAP_HOOK_XDP)
        return bpf_xdp_load_bytes((struct xdp_md *)ctx, off, dst, cap);
#endif
    return bpf_skb_load_bytes(ctx, off, dst, cap);
}

/* Length of the whole frame.  Only asked for monitored segments: in XDP it is a helper call. */
static __always_inline __u32 frame_len(void *ctx, const int hook)
{
#if IMAPTAP_XDP
    if (hook == IMAPTAP_HOOK_XDP)
        return bpf_xdp_get_buff_len((struct xdp_md *)ctx);   /* fragments included */
#endif
    return ((struct __sk_buff *)ctx)->len;
}

#if IMAPTAP_WORKERS > 1
#define FNV_OFFSET 2166136261u
#define FNV_PRIME 16777619u

/* FNV-1a over one byte. */
static __always_inline __u32 fnv_byte(__u32 h, __u32 byte)
{
    return (h ^ (byte & 0xff)) * FNV_PRIME;
}

/* FNV-1a over one endpoint: its address in network order (`words` words: 1 for IPv4, 4 for
 * IPv6), then its port big-endian (flowshare.py, the reference). */
static __always_inline __u32 fnv_endpoint(__u32 h, const __be32 *addr, __u32 words, __u16 port)
{
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (i < words) {
            __u32 w = bpf_ntohl(addr[i]);
            h = fnv_byte(h, w >> 24);
            h = fnv_byte(h, w >> 16);
            h = fnv_byte(h, w >> 8);
            h = fnv_byte(h, w);
        }
    }
    h = fnv_byte(h, port >> 8);
    return fnv_byte(h, port);
}

/* The ring of a segment's flow: flowshare.flow_hash % IMAPTAP_WORKERS, the same for both
 * directions since the endpoint whose bytes compare lower is hashed first. */
static __always_inline __u32 flow_ring(const struct imaptap_event *ev)
{
    __u32 words = ev->ip_version == 4 ? 1 : 4;
    const __be32 *first = ev->saddr, *second = ev->daddr;
    __u16 first_port = ev->sport, second_port = ev->dport;
    if (addr_lt(ev->daddr, ev->saddr) || (!addr_lt(ev->saddr, ev->daddr) && ev->dport < ev->sport)) {
        first = ev->daddr;
        second = ev->saddr;
        first_port = ev->dport;
        second_port = ev->sport;
    }
    __u32 h = fnv_endpoint(FNV_OFFSET, first, words, first_port);
    h = fnv_endpoint(h, second, words, second_port);
    /* flowshare.share_of: MurmurHash3's finaliser first, or the low bits of FNV-1a would
     * follow the parity of client ports, which Linux keeps even. */
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h % IMAPTAP_WORKERS;
}
#endif

#if IMAPTAP_RINGBUF
/* Room for a record in ring `ring` (`size` a constant once inlined).  bcc rewrites each
 * map.ringbuf_reserve to a load of that map, so every ring has its own call. */
static __always_inline void *ring_reserve(const __u32 ring, const __u64 size)
{
#if IMAPTAP_WORKERS > 1
    switch (ring) {
    case 1:
        return events_1.ringbuf_reserve(size);
#if IMAPTAP_WORKERS > 2
    case 2:
        return events_2.ringbuf_reserve(size);
#endif
#if IMAPTAP_WORKERS > 3
    case 3:
        return events_3.ringbuf_reserve(size);
#endif
#if IMAPTAP_WORKERS > 4
    case 4:
        return events_4.ringbuf_reserve(size);
#endif
#if IMAPTAP_WORKERS > 5
    case 5:
        return events_5.ringbuf_reserve(size);
#endif
#if IMAPTAP_WORKERS > 6
    case 6:
        return events_6.ringbuf_reserve(size);
#endif
#if IMAPTAP_WORKERS > 7
    case 7:
        return events_7.ringbuf_reserve(size);
#endif
    }
#endif
    return events.ringbuf_reserve(size);
}

/* Reserve a record with room for `klass` payload bytes (a constant once inlined: the ring
 * buffer only takes constant sizes), copy the payload and submit. */
static __always_inline void emit_class(void *ctx, const int hook, struct imaptap_event *ev,
                                       __u32 off, __u32 cap, const __u32 klass, const __u32 ring,
                                       struct imaptap_counters *cnt)
{
    struct imaptap_event *e = ring_reserve(ring, sizeof(struct imaptap_event) + klass);
    if (!e) {
        cnt->lost++;
        return;
    }
    __builtin_memcpy(e, ev, sizeof(*ev));
    if (klass > 0 && cap > 0) {
        if (load_payload(ctx, hook, off, (void *)(e + 1), bounded_len(cap, klass)) != 0) {
            e->cap_len = 0;
            cnt->copy_failed++;
        }
    }
    events.ringbuf_submit(e, 0);
    cnt->submitted++;
}

#if IMAPTAP_TAILLEN > 0
/* A PREFIX or HANDSHAKE segment longer than `head` (its mode's snap length, a constant once
 * inlined): head and tail have constant room. */
static __always_inline void emit_long(void *ctx, const int hook, struct imaptap_event *ev,
                                      __u32 off, __u32 tail_off, __u32 tail, const __u32 head,
                                      const __u32 ring, struct imaptap_counters *cnt)
{
    struct imaptap_event *e = ring_reserve(ring, sizeof(struct imaptap_event) + head + IMAPTAP_TAILLEN);
    if (!e) {
        cnt->lost++;
        return;
    }
    __builtin_memcpy(e, ev, sizeof(*ev));
    __u8 *room = (__u8 *)(e + 1);
    if ((head > 0 && load_payload(ctx, hook, off, room, head) != 0) ||
        load_payload(ctx, hook, tail_off, room + head, bounded_len(tail, IMAPTAP_TAILLEN)) != 0) {
        e->cap_len = 0;
        e->tail_len = 0;
        cnt->copy_failed++;
    }
    events.ringbuf_submit(e, 0);
    cnt->submitted++;
}
#endif

static __always_inline void emit(void *ctx, const int hook, struct imaptap_event *ev, __u32 off,
                                 __u32 cap, const __u32 ring, struct imaptap_counters *cnt)
{
    /* Power-of-two size classes: a record wastes at most half its payload room. */
    if (cap == 0)
        emit_class(ctx, hook, ev, off, cap, 0, ring, cnt);
    else if (cap <= 64)
        emit_class(ctx, hook, ev, off, cap, 64, ring, cnt);
    else if (cap <= 128)
        emit_class(ctx, hook, ev, off, cap, 128, ring, cnt);
    else if (cap <= 256)
        emit_class(ctx, hook, ev, off, cap, 256, ring, cnt);
    else if (cap <= 512)
        emit_class(ctx, hook, ev, off, cap, 512, ring, cnt);
    else if (cap <= 1024)
        emit_class(ctx, hook, ev, off, cap, 1024, ring, cnt);
    else if (cap <= 2048)
        emit_class(ctx, hook, ev, off, cap, 2048, ring, cnt);
    else if (cap <= 4096)
        emit_class(ctx, hook, ev, off, cap, 4096, ring, cnt);
    else if (cap <= 8192)
        emit_class(ctx, hook, ev, off, cap, 8192, ring, cnt);
    else if (cap <= 16384)
        emit_class(ctx, hook, ev, off, cap, 16384, ring, cnt);
    else if (cap <= 32768)
        emit_class(ctx, hook, ev, off, cap, 32768, ring, cnt);
    else
        emit_class(ctx, hook, ev, off, cap, 65536, ring, cnt);
}
#else
static __always_inline void emit(void *ctx, const int hook, struct imaptap_event *ev, __u32 off,
                                 __u32 cap, const __u32 ring, struct imaptap_counters *cnt)
{
    __u32 zero = 0;
    struct perf_record *r = scratch.lookup(&zero);
    if (!r)
        return;
    __builtin_memcpy(&r->ev, ev, sizeof(*ev));
    if (cap > 0) {
        cap = bounded_len(cap, IMAPTAP_PERF_CAP);
        if (load_payload(ctx, hook, off, r->payload, cap) != 0) {
            cap = 0;
            cnt->copy_failed++;
        }
    }
    r->ev.cap_len = cap;
    if (events.perf_submit(ctx, r, sizeof(struct imaptap_event) + cap) != 0)
        cnt->lost++;
    else
        cnt->submitted++;
}

#if IMAPTAP_TAILLEN > 0
static __always_inline void emit_long(void *ctx, const int hook, struct imaptap_event *ev,
                                      __u32 off, __u32 tail_off, __u32 tail, const __u32 head,
                                      const __u32 ring, struct imaptap_counters *cnt)
{
    __u32 zero = 0;
    struct perf_record *r = scratch.lookup(&zero);
    if (!r)
        return;
    __builtin_memcpy(&r->ev, ev, sizeof(*ev));
    /* The tail's length is bounded right where it is used: bounded once before the head's
     * copy, it lived across that helper call in a form the verifiers of 5.10 and 6.1 no longer
     * knew to be bounded (with two inlined copies of this function), and they refused it. */
    if ((head > 0 && load_payload(ctx, hook, off, r->payload, head) != 0) ||
        load_payload(ctx, hook, tail_off, r->payload + head, bounded_len(tail, IMAPTAP_TAILLEN)) != 0) {
        r->ev.cap_len = 0;
        r->ev.tail_len = 0;
        tail = 0;
        cnt->copy_failed++;
    }
    __u64 size = sizeof(struct imaptap_event) + r->ev.cap_len + tail;
    if (size > sizeof(struct imaptap_event) + head + IMAPTAP_TAILLEN)
        size = sizeof(struct imaptap_event);   /* never: for the verifier */
    if (events.perf_submit(ctx, r, size) != 0)
        cnt->lost++;
    else
        cnt->submitted++;
}
#endif
#endif

/* Parse one frame; submit it if it is a TCP segment of a monitored port worth reporting. */
static __always_inline int parse(void *ctx, const int hook, void *data, void *data_end,
                                 __u32 ifindex, struct imaptap_config *cfg,
                                 struct imaptap_counters *cnt)
{
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return PARSE_SHORT;
    __u16 proto = eth->h_proto;
    __u32 l3 = sizeof(*eth);

#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (proto != BE16(ETH_P_8021Q) && proto != BE16(ETH_P_8021AD) && proto != BE16(ETH_P_QINQ1))
            break;
        struct vlan_tag *tag = data + l3;
        if ((void *)(tag + 1) > data_end)
            return PARSE_SHORT;
        proto = tag->proto;
        l3 += sizeof(*tag);
    }

    /* Both are set before use; the verifier cannot test a packet pointer against NULL, so
     * `ipver` says which one is valid. */
    struct iphdr *ip4 = data;
    struct ipv6hdr *ip6 = data;
    __u32 l4, ip_len, l3_hdrs;
    __u8 ipver;

    if (proto == BE16(ETH_P_IP)) {
        ip4 = data + l3;
        if ((void *)(ip4 + 1) > data_end)
            return PARSE_SHORT;
        ipver = 4;
        if (ip4->version != 4)
            return PARSE_BAD;
        if (ip4->protocol != IPPROTO_TCP)
            return PARSE_DONE;
        l3_hdrs = ip4->ihl * 4;
        if (l3_hdrs < sizeof(*ip4))
            return PARSE_BAD;
        if (ip4->frag_off & BE16(0x3fff))   /* MF or a fragment offset */
            return PARSE_BAD;
        ip_len = BE16(ip4->tot_len);        /* 0 on IPv4 BIG TCP GSO packets */
        if (ip_len != 0) {
            if (ip_len < l3_hdrs)
                return PARSE_BAD;
            ip_len -= l3_hdrs;
        }
    } else if (proto == BE16(ETH_P_IPV6)) {
        ip6 = data + l3;
        if ((void *)(ip6 + 1) > data_end)
            return PARSE_SHORT;
        ipver = 6;
        if (ip6->version != 6)
            return PARSE_BAD;
        __u8 nexthdr = ip6->nexthdr;
        l3_hdrs = sizeof(*ip6);
#pragma unroll
        for (int i = 0; i < IMAPTAP_MAX_EXT_HDRS; i++) {
            if (nexthdr != IPPROTO_HOPOPTS && nexthdr != IPPROTO_ROUTING &&
                nexthdr != IPPROTO_DSTOPTS && nexthdr != IPPROTO_AH &&
                nexthdr != IPPROTO_FRAGMENT)
                break;
            __u8 *ext = data + l3 + l3_hdrs;
            if ((void *)(ext + 8) > data_end)    /* every extension header has 8 bytes */
                return PARSE_SHORT;
            __u32 len;
            if (nexthdr == IPPROTO_FRAGMENT) {
                if (*(__be16 *)(ext + 2) & BE16(0xfff9))   /* offset or M: a real fragment */
                    return PARSE_BAD;
                len = 8;
            } else if (nexthdr == IPPROTO_AH) {
                len = (ext[1] + 2) * 4;
            } else {
                len = (ext[1] + 1) * 8;
            }
            nexthdr = ext[0];
            l3_hdrs += len;
        }
        if (nexthdr != IPPROTO_TCP) {
            if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
                nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_AH ||
                nexthdr == IPPROTO_FRAGMENT)
                return PARSE_BAD;
            return PARSE_DONE;
        }
        ip_len = BE16(ip6->payload_len);    /* 0 on jumbograms and IPv6 BIG TCP */
        if (ip_len != 0) {
            if (ip_len < l3_hdrs - sizeof(*ip6))
                return PARSE_BAD;
            ip_len -= l3_hdrs - sizeof(*ip6);
        }
    } else {
        return PARSE_DONE;
    }

    l4 = l3 + l3_hdrs;
    struct tcphdr *th = data + l4;
    if ((void *)(th + 1) > data_end)
        return PARSE_SHORT;
    __u16 sport = BE16(th->source);
    __u16 dport = BE16(th->dest);
    if (!port_watched(cfg, sport) && !port_watched(cfg, dport))
        return PARSE_DONE;

    /* A monitored segment: from here on the cost only falls on IMAP traffic. */
    cnt->matched++;
    __u32 doff = th->doff * 4;
    if (doff < sizeof(*th))
        return PARSE_BAD;
    __u8 flags = ((__u8 *)th)[13];
    __u32 payload_off = l4 + doff;
    __u32 pkt_len = frame_len(ctx, hook);
    __u32 wire_len;
    if (ip_len == 0) {
        /* GSO super-packet without a length in the IP header: the packet's length decides. */
        wire_len = pkt_len > payload_off ? pkt_len - payload_off : 0;
    } else {
        /* An IP length too short for the TCP header: no payload (as replay reads it). */
        wire_len = ip_len > doff ? ip_len - doff : 0;
    }
    if (wire_len == 0 && !(flags & (TCP_FIN | TCP_SYN | TCP_RST)))
        return PARSE_DONE;  /* pure ACK: nothing for the analyzer */

    struct imaptap_event ev = {};
    ev.ts_ns = bpf_ktime_get_ns();
    ev.ip_version = ipver;
    if (ipver == 4) {
        ev.saddr[0] = ip4->saddr;
        ev.daddr[0] = ip4->daddr;
    } else {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            ev.saddr[i] = ip6->saddr.in6_u.u6_addr32[i];
            ev.daddr[i] = ip6->daddr.in6_u.u6_addr32[i];
        }
    }
    ev.sport = sport;
    ev.dport = dport;
    ev.seq = bpf_ntohl(th->seq);
    ev.ack = bpf_ntohl(th->ack_seq);
    ev.wire_len = wire_len;
    ev.ifindex = ifindex;
    ev.tcp_flags = flags;
    ev.hook = hook;

    struct imaptap_flow_key key = {};
    key.ip_version = ev.ip_version;
    if (sport < dport || (sport == dport && addr_lt(ev.saddr, ev.daddr))) {
        __builtin_memcpy(key.addr_a, ev.saddr, 16);
        __builtin_memcpy(key.addr_b, ev.daddr, 16);
        key.port_a = sport;
        key.port_b = dport;
    } else {
        __builtin_memcpy(key.addr_a, ev.daddr, 16);
        __builtin_memcpy(key.addr_b, ev.saddr, 16);
        key.port_a = dport;
        key.port_b = sport;
    }
#if IMAPTAP_WORKERS > 1
    const __u32 ring = flow_ring(&ev);
#else
    const __u32 ring = 0;
#endif
    __u8 mode = IMAPTAP_DEFAULT_MODE;
    __u8 *m = flow_modes.lookup(&key);
    if (m)
        mode = *m;
    ev.mode = mode;

    __u32 n = pkt_len > payload_off ? pkt_len - payload_off : 0;  /* less in a cut-short frame */
    if (n > wire_len)
        n = wire_len;   /* Ethernet padding is not payload */
    __u32 cap = 0;
    if (mode == IMAPTAP_MODE_WHOLE) {
        cap = n < IMAPTAP_WHOLE_CAP ? n : IMAPTAP_WHOLE_CAP;
    } else if (mode != IMAPTAP_MODE_NONE) {
        /* PREFIX, HANDSHAKE, or a value this build does not know (taken as PREFIX) */
        __u32 head = IMAPTAP_SNAPLEN;
#if IMAPTAP_HANDSHAKE_SNAPLEN > 0
        if (mode == IMAPTAP_MODE_HANDSHAKE)
            head = IMAPTAP_HANDSHAKE_SNAPLEN;
#endif
#if IMAPTAP_TAILLEN > 0
        if (n > head) {
            __u32 tail = n - head;
            if (tail > IMAPTAP_TAILLEN)
                tail = IMAPTAP_TAILLEN;
            ev.cap_len = head;
            ev.tail_len = tail;
            __u32 tail_off = payload_off + n - tail;
#if IMAPTAP_HANDSHAKE_SNAPLEN > 0
            if (mode == IMAPTAP_MODE_HANDSHAKE) {
                emit_long(ctx, hook, &ev, payload_off, tail_off, tail, IMAPTAP_HANDSHAKE_SNAPLEN, ring, cnt);
                return PARSE_DONE;
            }
#endif
            emit_long(ctx, hook, &ev, payload_off, tail_off, tail, IMAPTAP_SNAPLEN, ring, cnt);
            return PARSE_DONE;
        }
#endif
        cap = n < head ? n : head;
    }
    ev.cap_len = cap;
    emit(ctx, hook, &ev, payload_off, cap, ring, cnt);
    return PARSE_DONE;
}

#if IMAPTAP_XDP
int imaptap_xdp(struct xdp_md *ctx)
{
    __u32 zero = 0;
    struct imaptap_counters *cnt = counters.lookup(&zero);
    struct imaptap_config *cfg = config.lookup(&zero);
    if (!cnt || !cfg)
        return XDP_PASS;
    cnt->seen++;
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    int res = parse(ctx, IMAPTAP_HOOK_XDP, data, data_end, ctx->ingress_ifindex, cfg, cnt);
    if (res != PARSE_DONE)
        cnt->unparsed++;
    return XDP_PASS;
}
#endif

static __always_inline int tc_run(struct __sk_buff *skb, const int hook)
{
    __u32 zero = 0;
    struct imaptap_counters *cnt = counters.lookup(&zero);
    struct imaptap_config *cfg = config.lookup(&zero);
    if (!cnt || !cfg)
        return TC_ACT_UNSPEC;
    cnt->seen++;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    int res = parse(skb, hook, data, data_end, skb->ifindex, cfg, cnt);
    if (res == PARSE_SHORT && skb->len > (__u32)(data_end - data)) {
        /* Headers in page fragments: make them linear (the stack pulls them a moment later
         * anyway) and parse again.  Only the layout changes, never the bytes. */
        __u32 want = skb->len < IMAPTAP_PULL_LEN ? skb->len : IMAPTAP_PULL_LEN;
        if (bpf_skb_pull_data(skb, want) == 0) {
            data = (void *)(long)skb->data;
            data_end = (void *)(long)skb->data_end;
            res = parse(skb, hook, data, data_end, skb->ifindex, cfg, cnt);
        }
    }
    if (res != PARSE_DONE)
        cnt->unparsed++;
    return TC_ACT_UNSPEC;
}

int imaptap_tc_in(struct __sk_buff *skb)
{
    return tc_run(skb, IMAPTAP_HOOK_TC_INGRESS);
}

int imaptap_tc_eg(struct __sk_buff *skb)
{
    return tc_run(skb, IMAPTAP_HOOK_TC_EGRESS);
}
