/* Optional accelerator for capture/replay.py: the classic pcap loop's fast path in C.
 *
 * _PcapReader._segments frames pcap records and decodes the usual Ethernet frame (untagged
 * IPv4 without options, TCP) in place.  This module does the very same steps, record by
 * record, and also takes untagged IPv6 with TCP right after the fixed header (the steps of
 * decode.decode_ipv6 and decode._tcp_packet for it), so that a pure ACK or a packet on another
 * port costs no Python bytecode at all and a segment costs one call.  It never decides
 * anything the Python code would decide otherwise: a frame it is not sure about, or a segment
 * of a flow in a payload mode it does not know, is handed back to the Python loop, which treats
 * it exactly as without this module.  Without a C compiler the package works unchanged (the build is
 * optional); tests/unit/capture/test_replay.py runs the same checks on both paths.
 *
 * scan(buf, off, config) -> (code, off, segment or None), codes below.  config is a tuple made
 * once per replay (in replay._PcapReader._segments).  The records scan consumed are counted in
 * config's counts as the Python loop counts them, and that loop adds them to its ReplayStats
 * after every read (setting the stats object's attributes here cost more than a percent of a
 * replay).
 *
 * With --workers, config's last item is the worker's share (flowshare.FlowShare.config():
 * workers, index, state): a segment of a flow another worker analyses (by share_of(flow_hash), the
 * same as flowshare.share_of) is counted and passed over, and only where its time reaches the
 * share's wake time is that time handed back (CLOCK), so the worker's clock moves as it would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

enum {
    NEED_MORE = 0, /* off: the start of an incomplete record, or the end of buf */
    SEGMENT = 1,   /* off: after the record */
    PYTHON = 2,    /* off: the start of a record (not counted) for the Python loop to take */
    CLOCK = 3,     /* off: after the record; value: the time of another worker's segment */
};

/* flowshare.FlowShare.state: the wake time, then the count of other workers' segments. */
struct share_state { double wake; int64_t skipped; };

/* flowshare.flow_hash: FNV-1a over the lower endpoint (address bytes, port big-endian), then
   the higher one. */
static inline uint32_t fnv_endpoint(uint32_t h, const unsigned char *addr, int alen, uint32_t port)
{
    for (int i = 0; i < alen; i++)
        h = (h ^ addr[i]) * 16777619u;
    h = (h ^ (port >> 8)) * 16777619u;
    return (h ^ (port & 0xFF)) * 16777619u;
}

static uint32_t flow_hash(const unsigned char *src, const unsigned char *dst, int alen, uint32_t sport,
                          uint32_t dport)
{
    int c = memcmp(src, dst, alen);
    int forward = c < 0 || (c == 0 && sport <= dport);
    uint32_t h = 2166136261u;
    if (forward)
        return fnv_endpoint(fnv_endpoint(h, src, alen, sport), dst, alen, dport);
    return fnv_endpoint(fnv_endpoint(h, dst, alen, dport), src, alen, sport);
}

/* flowshare.share_of: MurmurHash3's finaliser, then the worker. */
static inline uint32_t share_of(uint32_t h, uint32_t workers)
{
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h % workers;
}

/* The same numbers as capture/decode.py. */
#define ETHERNET_LEN 14
#define IPV4_MIN_LEN 20
#define TCP_MIN_LEN 20
#define IPV6_LEN 40
#define FAST_LEN (ETHERNET_LEN + IPV4_MIN_LEN + TCP_MIN_LEN)
#define LIFECYCLE 0x07 /* FIN SYN RST */

/* counts, config's bytearray of int64: what the Python loop adds to ReplayStats, in this order
   (replay._take_counts moves them there). */
enum { C_PACKETS, C_BYTES, C_PURE_ACKS, C_OTHER_PORTS, C_SEGMENTS, COUNTS };

static inline uint32_t rd32(const unsigned char *p, int big)
{
    return big ? ((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3])
               : ((uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0]);
}

static inline uint32_t be16(const unsigned char *p) { return (uint32_t)p[0] << 8 | p[1]; }

/* Address texts made lately, by address: a capture holds few hosts, and the text of one was
   made again for every segment (libc's inet_ntop alone was nearly one percent of a replay). */
#define ADDRESS_SLOTS 256
static struct { uint32_t key; PyObject *text; } v4_texts[ADDRESS_SLOTS];
static struct { unsigned char key[16]; PyObject *text; } v6_texts[ADDRESS_SLOTS];

static inline unsigned address_slot(const unsigned char *a, int n)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (int i = 0; i < n; i++)
        h = (h ^ a[i]) * 16777619u;
    return h % ADDRESS_SLOTS;
}

static PyObject *ntoa_uncached(const unsigned char *a);
static PyObject *ntop6_uncached(const unsigned char *a);

static PyObject *ntoa(const unsigned char *a)
{
    uint32_t key;
    memcpy(&key, a, 4);
    unsigned slot = address_slot(a, 4);
    if (v4_texts[slot].text != NULL && v4_texts[slot].key == key)
        return Py_NewRef(v4_texts[slot].text);
    PyObject *text = ntoa_uncached(a);
    if (text != NULL) {
        Py_XSETREF(v4_texts[slot].text, Py_NewRef(text));
        v4_texts[slot].key = key;
    }
    return text;
}

static PyObject *ntop6(const unsigned char *a)
{
    unsigned slot = address_slot(a, 16);
    if (v6_texts[slot].text != NULL && memcmp(v6_texts[slot].key, a, 16) == 0)
        return Py_NewRef(v6_texts[slot].text);
    PyObject *text = ntop6_uncached(a);
    if (text != NULL) {
        Py_XSETREF(v6_texts[slot].text, Py_NewRef(text));
        memcpy(v6_texts[slot].key, a, 16);
    }
    return text;
}

/* An IPv4 address as socket.inet_ntoa writes it (dotted decimal, no leading zeros); by hand,
   as snprintf was half of this module's time. */
static PyObject *ntoa_uncached(const unsigned char *a)
{
    char text[16], *t = text;
    for (int i = 0; i < 4; i++) {
        unsigned v = a[i];
        if (v >= 100)
            *t++ = (char)('0' + v / 100);
        if (v >= 10)
            *t++ = (char)('0' + v / 10 % 10);
        *t++ = (char)('0' + v % 10);
        if (i < 3)
            *t++ = '.';
    }
    return PyUnicode_FromStringAndSize(text, t - text);
}

/* An IPv6 address as socket.inet_ntop writes it: it calls the same libc function. */
static PyObject *ntop6_uncached(const unsigned char *a)
{
    char text[INET6_ADDRSTRLEN];
    if (inet_ntop(AF_INET6, a, text, sizeof text) == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyUnicode_FromString(text);
}

static PyObject *result(int code, Py_ssize_t off, PyObject *value)
{
    /* steals value */
    if (value == NULL)
        return NULL;
    PyObject *r = PyTuple_New(3), *c = PyLong_FromLong(code), *o = PyLong_FromSsize_t(off);
    if (r == NULL || c == NULL || o == NULL) {
        Py_XDECREF(r);
        Py_XDECREF(c);
        Py_XDECREF(o);
        Py_DECREF(value);
        return NULL;
    }
    PyTuple_SET_ITEM(r, 0, c);
    PyTuple_SET_ITEM(r, 1, o);
    PyTuple_SET_ITEM(r, 2, value);
    return r;
}

static PyObject *scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 18) {
        PyErr_SetString(PyExc_TypeError, "scan(buf: bytes, off: int, config: tuple of 18)");
        return NULL;
    }
    PyObject *bufobj = args[0], *config = args[2];
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(bufobj);
    Py_ssize_t n = PyBytes_GET_SIZE(bufobj);
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    /* config: record_len, big_endian, divisor, ports bitmap (bytes of 8192) or None, modes,
       snaplen, taillen, Segment type, largest record, counts (bytearray of COUNTS int64),
       then segment.PayloadMode.NONE and .WHOLE and segment.WHOLE_PAYLOAD_CAP, PayloadMode.PREFIX and
       .HANDSHAKE, the policy's handshake snap length and its default mode (that of a flow not in
       modes), and the worker's share or None */
    Py_ssize_t record_len = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 0));
    int big = PyObject_IsTrue(PyTuple_GET_ITEM(config, 1));
    double divisor = PyFloat_AsDouble(PyTuple_GET_ITEM(config, 2));
    PyObject *ports = PyTuple_GET_ITEM(config, 3);
    PyObject *modes = PyTuple_GET_ITEM(config, 4);
    Py_ssize_t snaplen = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 5));
    Py_ssize_t taillen = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 6));
    PyObject *segtype = PyTuple_GET_ITEM(config, 7);
    Py_ssize_t max_record = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 8));
    PyObject *countobj = PyTuple_GET_ITEM(config, 9);
    long mode_none = PyLong_AsLong(PyTuple_GET_ITEM(config, 10));
    long mode_whole = PyLong_AsLong(PyTuple_GET_ITEM(config, 11));
    Py_ssize_t whole_cap = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 12));
    long mode_prefix = PyLong_AsLong(PyTuple_GET_ITEM(config, 13));
    long mode_handshake = PyLong_AsLong(PyTuple_GET_ITEM(config, 14));
    Py_ssize_t handshake_snaplen = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 15));
    long default_mode = PyLong_AsLong(PyTuple_GET_ITEM(config, 16));
    PyObject *shareobj = PyTuple_GET_ITEM(config, 17);
    if (PyErr_Occurred())
        return NULL;
    unsigned long share_workers = 1, share_index = 0;
    struct share_state *share = NULL;
    if (shareobj != Py_None) {
        PyObject *stateobj;
        if (!PyArg_ParseTuple(shareobj, "kkO", &share_workers, &share_index, &stateobj))
            return NULL;
        if (!PyByteArray_Check(stateobj) || PyByteArray_GET_SIZE(stateobj) != (Py_ssize_t)sizeof *share
                || share_workers < 1 || share_index >= share_workers) {
            PyErr_SetString(PyExc_TypeError, "scan: bad share");
            return NULL;
        }
        share = (struct share_state *)PyByteArray_AS_STRING(stateobj);
    }
    if (!PyType_Check(segtype) || !PyDict_Check(modes) || (ports != Py_None && (!PyBytes_Check(ports)
            || PyBytes_GET_SIZE(ports) != 8192)) || record_len < 16 || snaplen < 0 || whole_cap < 0
            || handshake_snaplen < 0
            || !PyByteArray_Check(countobj) || PyByteArray_GET_SIZE(countobj) != COUNTS * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_TypeError, "scan: bad config");
        return NULL;
    }
    const unsigned char *bitmap = ports == Py_None ? NULL : (const unsigned char *)PyBytes_AS_STRING(ports);

    Py_ssize_t packets = 0, bytes = 0, pure_acks = 0, other_ports = 0, skipped = 0;
    PyObject *ret = NULL;
    int code = NEED_MORE;
    Py_ssize_t start, stop;

    while (off + record_len <= n) {
        const unsigned char *r = buf + off;
        uint32_t sec = rd32(r, big), frac = rd32(r + 4, big), caplen = rd32(r + 8, big);
        if ((Py_ssize_t)caplen > max_record || caplen < FAST_LEN) {
            code = PYTHON; /* a corrupt record header, or a frame too short for the fast path */
            break;
        }
        start = off + record_len;
        stop = start + (Py_ssize_t)caplen;
        if (stop > n)
            break;
        const unsigned char *f = buf + start;
        Py_ssize_t tcp, ip_end;
        int version;
        uint32_t ethertype = be16(f + 12);
        if (ethertype == 0x0800) {
            /* decode.decode_ethernet's usual frame: version 4 and IHL 5, TCP, not a fragment; a zero total
               length (segmentation offload) reaches to the end of the record */
            uint32_t total_len = be16(f + 16);
            if (f[14] != 0x45 || f[23] != 6 || (be16(f + 20) & 0x3FFF) || (total_len < IPV4_MIN_LEN && total_len != 0)) {
                code = PYTHON;
                break;
            }
            version = 4;
            tcp = ETHERNET_LEN + IPV4_MIN_LEN;
            ip_end = total_len ? start + ETHERNET_LEN + (Py_ssize_t)total_len : stop;
        } else if (ethertype == 0x86DD && caplen >= ETHERNET_LEN + IPV6_LEN + TCP_MIN_LEN) {
            /* decode.decode_ipv6 without extension headers: TCP right after the fixed header;
               a zero payload length (a jumbogram, segmentation offload) as above */
            uint32_t payload_len = be16(f + 18);
            if (f[14] >> 4 != 6 || f[20] != 6) {
                code = PYTHON;
                break;
            }
            version = 6;
            tcp = ETHERNET_LEN + IPV6_LEN;
            ip_end = payload_len ? start + ETHERNET_LEN + IPV6_LEN + (Py_ssize_t)payload_len : stop;
        } else {
            code = PYTHON;
            break;
        }
        uint32_t header_len = (f[tcp + 12] >> 4) * 4;
        if (header_len < TCP_MIN_LEN) {
            code = PYTHON;
            break;
        }
        uint32_t sport = be16(f + tcp), dport = be16(f + tcp + 2);
        if (bitmap && !(bitmap[sport >> 3] & (1 << (sport & 7))) && !(bitmap[dport >> 3] & (1 << (dport & 7)))) {
            off = stop;
            packets += 1;
            bytes += caplen;
            other_ports += 1;
            continue;
        }
        Py_ssize_t payload = start + tcp + header_len;
        Py_ssize_t wire_len = ip_end - payload;
        unsigned flags = f[tcp + 13];
        if (wire_len <= 0) {
            if (!(flags & LIFECYCLE)) {
                off = stop;
                packets += 1;
                bytes += caplen;
                pure_acks += 1;
                continue;
            }
            wire_len = 0;
        }
        if (share != NULL) {
            const unsigned char *src_addr = version == 4 ? f + ETHERNET_LEN + 12 : f + ETHERNET_LEN + 8;
            const unsigned char *dst_addr = version == 4 ? f + ETHERNET_LEN + 16 : f + ETHERNET_LEN + 24;
            int alen = version == 4 ? 4 : 16;
            if (share_of(flow_hash(src_addr, dst_addr, alen, sport, dport), (uint32_t)share_workers) != share_index) {
                off = stop;
                packets += 1;
                bytes += caplen;
                skipped += 1;
                double ts = (double)sec + (double)frac / divisor;
                if (ts >= share->wake) {
                    code = CLOCK;
                    ret = result(CLOCK, off, PyFloat_FromDouble(ts));
                    goto done;
                }
                continue;
            }
        }
        Py_ssize_t captured_end = ip_end < stop ? ip_end : stop; /* Ethernet padding is not payload */
        Py_ssize_t captured = captured_end - payload;

        PyObject *src = version == 4 ? ntoa(f + ETHERNET_LEN + 12) : ntop6(f + ETHERNET_LEN + 8);
        PyObject *dst = version == 4 ? ntoa(f + ETHERNET_LEN + 16) : ntop6(f + ETHERNET_LEN + 24);
        if (src == NULL || dst == NULL) {
            Py_XDECREF(src);
            Py_XDECREF(dst);
            goto done;
        }
        long mode = default_mode; /* PayloadPolicy.mode(): the flow's entry in modes, else the default */
        if (PyDict_GET_SIZE(modes)) {
            /* segment.flow_key(), then the flow's mode */
            int c = PyUnicode_Compare(src, dst);
            if (c == -1 && PyErr_Occurred()) {
                Py_DECREF(src);
                Py_DECREF(dst);
                goto done;
            }
            int forward = c < 0 || (c == 0 && sport <= dport);
            PyObject *key = forward ? Py_BuildValue("(OIOI)", src, sport, dst, dport)
                                    : Py_BuildValue("(OIOI)", dst, dport, src, sport);
            PyObject *value = key ? PyDict_GetItemWithError(modes, key) : NULL;
            Py_XDECREF(key);
            if (value == NULL && PyErr_Occurred()) {
                Py_DECREF(src);
                Py_DECREF(dst);
                goto done;
            }
            if (value != NULL) {
                mode = PyLong_AsLong(value);
                if ((mode != mode_none && mode != mode_whole && mode != mode_prefix && mode != mode_handshake)
                        || PyErr_Occurred()) {
                    /* a mode this loop does not know: PayloadPolicy.cut decides, in Python */
                    PyErr_Clear();
                    Py_DECREF(src);
                    Py_DECREF(dst);
                    code = PYTHON;
                    break;
                }
            }
        }
        /* PayloadPolicy.cut, the reference: nothing for NONE, the captured payload up to the
           cap for WHOLE, else the head of the mode's snap length and the tail */
        Py_ssize_t snap = mode == mode_handshake ? handshake_snaplen : snaplen;
        Py_ssize_t head_end, tail_start = 0;
        int has_tail = 0;
        if (mode == mode_none) {
            head_end = payload;
        } else if (mode == mode_whole) {
            head_end = captured > whole_cap ? payload + whole_cap : captured_end;
        } else if (captured < wire_len) {
            head_end = captured > snap ? payload + snap : captured_end;
        } else if (captured <= snap) {
            head_end = captured_end;
        } else {
            head_end = payload + snap;
            if (taillen > 0) {
                tail_start = captured_end - taillen;
                if (tail_start < payload + snap)
                    tail_start = payload + snap;
                has_tail = 1;
            }
        }
        if (head_end < payload)
            head_end = payload;
        PyObject *head = PyBytes_FromStringAndSize((const char *)buf + payload, head_end - payload);
        PyObject *tail = has_tail ? PyBytes_FromStringAndSize((const char *)buf + tail_start, captured_end - tail_start)
                                  : PyBytes_FromStringAndSize(NULL, 0);
        PyObject *items[13] = {
            PyFloat_FromDouble((double)sec + (double)frac / divisor),
            PyLong_FromLong(version), src, dst, PyLong_FromUnsignedLong(sport), PyLong_FromUnsignedLong(dport),
            PyLong_FromUnsignedLong(rd32(f + tcp + 4, 1)), PyLong_FromUnsignedLong(rd32(f + tcp + 8, 1)),
            PyLong_FromUnsignedLong(flags), PyLong_FromSsize_t(wire_len), head, PyLong_FromLong(0), tail,
        };
        PyObject *seg = NULL;
        int ok = 1;
        for (int i = 0; i < 13; i++)
            ok = ok && items[i] != NULL;
        if (ok)
            seg = ((PyTypeObject *)segtype)->tp_alloc((PyTypeObject *)segtype, 13);
        if (seg == NULL) {
            for (int i = 0; i < 13; i++)
                Py_XDECREF(items[i]);
            goto done;
        }
        for (int i = 0; i < 13; i++)
            PyTuple_SET_ITEM(seg, i, items[i]);
        off = stop;
        packets += 1;
        bytes += caplen;
        code = SEGMENT;
        ret = result(SEGMENT, off, seg);
        goto done;
    }
    ret = result(code, off, Py_NewRef(Py_None));
done:
    if (ret == NULL)
        return NULL;
    int64_t *counts = (int64_t *)PyByteArray_AS_STRING(countobj);
    counts[C_PACKETS] += packets;
    counts[C_BYTES] += bytes;
    counts[C_PURE_ACKS] += pure_acks;
    counts[C_OTHER_PORTS] += other_ports;
    counts[C_SEGMENTS] += (code == SEGMENT) + skipped;
    if (share != NULL)
        share->skipped += skipped;
    return ret;
}

/* glibc serves a buffer of a megabyte from fresh mmap'd pages and returns them when it is freed,
   so every read of the replay faulted its pages in again: 15,000 page faults and a twentieth of
   the system time of a replay.  Below these sizes, freed buffers stay in the heap for the next
   read; the peak RSS of a replay does not change. */
#define KEEP_MMAP_THRESHOLD (4 << 20) /* above READ_BUFFER plus the largest record */
#define KEEP_TRIM_THRESHOLD (16 << 20)

static PyObject *keep_buffers(PyObject *module, PyObject *unused)
{
#ifdef __GLIBC__
    if (mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD) && mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
        Py_RETURN_TRUE;
#endif
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"keep_buffers", keep_buffers, METH_NOARGS,
     "keep_buffers() -> bool: let glibc keep freed read buffers for the next read (False: not glibc)."},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(buf, off, config) -> (code, off, value): pcap records from off to the next segment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pcapfast", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pcapfast(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "NEED_MORE", NEED_MORE) || PyModule_AddIntConstant(m, "SEGMENT", SEGMENT)
            || PyModule_AddIntConstant(m, "CLOCK", CLOCK)
            || PyModule_AddIntConstant(m, "PYTHON", PYTHON) || PyModule_AddIntConstant(m, "COUNTS", COUNTS)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
