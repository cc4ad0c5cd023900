/* imaptap.h: what the kernel program (imaptap.bpf.c) and userspace (capture/live/) share.
 *
 * Every struct here is mirrored field for field by a ctypes.Structure in capture/live/abi.py,
 * and every #define either has its Python value there or is listed as kernel-only.  Change both
 * together: tests/unit/capture/test_abi.py parses this file and checks names, order, offsets,
 * sizes and values against abi.py (no kernel needed), and a capture compares the struct sizes
 * with the compiled program's maps at start.  That test reads only plain structs of fixed-width
 * integer fields and arrays (network-order ones are bytes in Python), integer #defines and the
 * include guard; it fails on anything else rather than skip it.  Fields are laid out without
 * implicit padding so the mirror cannot drift; the test checks that too.
 */
#ifndef IMAPTAP_H
#define IMAPTAP_H

/* Where the program saw the packet (imaptap_event.hook). */
#define IMAPTAP_HOOK_XDP 0
#define IMAPTAP_HOOK_TC_INGRESS 1
#define IMAPTAP_HOOK_TC_EGRESS 2

/* Per-flow payload modes; the same values as segment.PayloadMode.  HANDSHAKE is PREFIX with
 * the handshake snap length (imaptap.bpf.c). */
#define IMAPTAP_MODE_PREFIX 0
#define IMAPTAP_MODE_NONE 1
#define IMAPTAP_MODE_WHOLE 2
#define IMAPTAP_MODE_HANDSHAKE 3

/* segment.WHOLE_PAYLOAD_CAP: the most one segment carries in WHOLE mode.  Covers a whole
 * 64 KiB GSO segment on TC egress; the ring buffer's largest size class holds it. */
#define IMAPTAP_WHOLE_CAP 65535

/* Entries in the per-flow mode map: flows whose mode is not the default one (the mode of a flow
 * the map does not name: HANDSHAKE when the program is built with a handshake snap length, else
 * PREFIX), i.e. flows past their handshake, STARTTLS'd or compressed.  Userspace deletes a flow's
 * entry when the flow ends.  An LRU hash, so a flood of such flows evicts the oldest instead of
 * failing; a flow whose entry was evicted is copied under the default mode again, which never
 * copies less than PREFIX. */
#define IMAPTAP_FLOW_MODES_MAX 65536

/* Ring buffers, one per live worker process (--workers), the program can be built with: one
 * ring_reserve case each in imaptap.bpf.c.  Eight: each ring is a full ring buffer (4 MiB by
 * default), and past eight cores a small site's IMAP is not what they are for. */
#define IMAPTAP_MAX_WORKERS 8

/* IPv6 extension headers walked before giving up on a packet (counted as unparsed). */
#define IMAPTAP_MAX_EXT_HDRS 4

/* One submitted TCP segment.  The record holds this struct, then `cap_len` bytes from the start
 * of the payload, then `tail_len` bytes from its end (see segment.split_payload). */
struct imaptap_event {
    __u64 ts_ns;        /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __be32 saddr[4];    /* network order; IPv4 in the first word, the rest zero */
    __be32 daddr[4];
    __u32 seq;          /* host order */
    __u32 ack;
    __u32 wire_len;     /* TCP payload length from the IP header */
    __u32 ifindex;
    __u32 cap_len;      /* bytes from the start of the payload, right after this struct */
    __u16 sport;        /* host order */
    __u16 dport;
    __u8 ip_version;    /* 4 or 6 */
    __u8 tcp_flags;     /* byte 13 of the TCP header: FIN SYN RST PSH ACK URG ECE CWR */
    __u8 hook;          /* IMAPTAP_HOOK_* */
    __u8 mode;          /* IMAPTAP_MODE_* the segment was copied under */
    __u32 tail_len;     /* bytes from the end of the payload, after the cap_len ones */
};

/* Key of the per-flow mode map: one entry for both directions.  Canonical order: endpoint `a`
 * is the one with the smaller port; on equal ports the one whose address bytes compare lower
 * (memcmp order).  Python's flow_key orders by address *text*, so capture/live/policy.py
 * translates. */
struct imaptap_flow_key {
    __be32 addr_a[4];
    __be32 addr_b[4];
    __u16 port_a;       /* host order */
    __u16 port_b;
    __u8 ip_version;
    __u8 _pad[3];
};

/* Single-entry array filled by userspace before attaching.  (The snap and tail lengths are
 * compile-time constants instead: constant copy sizes make simple, fast verified code.) */
struct imaptap_config {
    __u8 ports[8192];       /* bitmap of monitored TCP ports: bit (port & 7) of byte port >> 3 */
};

/* Per-CPU counters, summed by userspace. */
struct imaptap_counters {
    __u64 seen;         /* packets the program ran on */
    __u64 matched;      /* TCP segments to or from a monitored port */
    __u64 submitted;    /* records handed to userspace */
    __u64 lost;         /* records dropped because the ring/perf buffer was full */
    __u64 unparsed;     /* packets it could not parse: IP fragments, too many IPv6 extension
                           headers, headers outside the linear part in XDP, bad lengths */
    __u64 copy_failed;  /* payload copies the kernel refused; submitted without payload */
};

#endif /* IMAPTAP_H */
