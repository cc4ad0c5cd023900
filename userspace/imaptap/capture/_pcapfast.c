/* Optional accelerator for capture/replay.py: the classic pcap loop's fast path in C.
 *
 * _PcapReader._segments frames pcap records and decodes the usual Ethernet frame (untagged
 * IPv4 without options, TCP) in place.  This module does the very same steps, record by
 * record, and also takes untagged IPv6 with TCP right after the fixed header (the steps of
 * decode.decode_ipv6 and decode._tcp_packet for it), so that a pure ACK or a packet on another
 * port costs no Python bytecode at all and a segment costs one call.  It never decides
 * anything the Python code would decide otherwise: a frame it is not sure about, or a segment
 * of a flow with a payload mode, is handed back to the Python loop, which treats it exactly as
 * without this module.  Without a C compiler the package works unchanged (the build is
 * optional); tests/unit/capture/test_replay.py runs the same checks on both paths.
 *
 * scan(buf, off, stats, config) -> (code, off, segment or None), codes below; the records it
 * consumed are counted in stats as the Python loop counts them.  config is a tuple made once
 * per replay (in replay._PcapReader._segments).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <sys/socket.h>

enum {
    NEED_MORE = 0, /* off: the start of an incomplete record, or the end of buf */
    SEGMENT = 1,   /* off: after the record */
    PYTHON = 2,    /* off: the start of a record (not counted) for the Python loop to take */
};

/* The same numbers as capture/decode.py. */
#define ETHERNET_LEN 14
#define IPV4_MIN_LEN 20
#define TCP_MIN_LEN 20
#define IPV6_LEN 40
#define FAST_LEN (ETHERNET_LEN + IPV4_MIN_LEN + TCP_MIN_LEN)
#define LIFECYCLE 0x07 /* FIN SYN RST */

static PyObject *s_packets, *s_bytes, *s_pure_acks, *s_other_ports, *s_segments;

static inline uint32_t rd32(const unsigned char *p, int big)
{
    return big ? ((uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3])
               : ((uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0]);
}

static inline uint32_t be16(const unsigned char *p) { return (uint32_t)p[0] << 8 | p[1]; }

/* stats.<name> += n */
static int add_stat(PyObject *stats, PyObject *name, Py_ssize_t n)
{
    if (n == 0)
        return 0;
    PyObject *old = PyObject_GetAttr(stats, name);
    if (old == NULL)
        return -1;
    Py_ssize_t value = PyLong_AsSsize_t(old);
    Py_DECREF(old);
    if (value == -1 && PyErr_Occurred())
        return -1;
    PyObject *sum = PyLong_FromSsize_t(value + n);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(stats, name, sum);
    Py_DECREF(sum);
    return r;
}

/* An IPv4 address as socket.inet_ntoa writes it (dotted decimal, no leading zeros); by hand,
   as snprintf was half of this module's time. */
static PyObject *ntoa(const unsigned char *a)
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
static PyObject *ntop6(const unsigned char *a)
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
    PyObject *r = Py_BuildValue("(inN)", code, off, value);
    return r;
}

static PyObject *scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[3]) || PyTuple_GET_SIZE(args[3]) != 9) {
        PyErr_SetString(PyExc_TypeError, "scan(buf: bytes, off: int, stats, config: tuple of 9)");
        return NULL;
    }
    PyObject *bufobj = args[0], *stats = args[2], *config = args[3];
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(bufobj);
    Py_ssize_t n = PyBytes_GET_SIZE(bufobj);
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    /* config: record_len, big_endian, divisor, ports bitmap (bytes of 8192) or None, modes,
       snaplen, taillen, Segment type, largest record */
    Py_ssize_t record_len = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 0));
    int big = PyObject_IsTrue(PyTuple_GET_ITEM(config, 1));
    double divisor = PyFloat_AsDouble(PyTuple_GET_ITEM(config, 2));
    PyObject *ports = PyTuple_GET_ITEM(config, 3);
    PyObject *modes = PyTuple_GET_ITEM(config, 4);
    Py_ssize_t snaplen = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 5));
    Py_ssize_t taillen = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 6));
    PyObject *segtype = PyTuple_GET_ITEM(config, 7);
    Py_ssize_t max_record = PyLong_AsSsize_t(PyTuple_GET_ITEM(config, 8));
    if (PyErr_Occurred())
        return NULL;
    if (!PyType_Check(segtype) || !PyDict_Check(modes) || (ports != Py_None && (!PyBytes_Check(ports)
            || PyBytes_GET_SIZE(ports) != 8192)) || record_len < 16 || snaplen < 0) {
        PyErr_SetString(PyExc_TypeError, "scan: bad config");
        return NULL;
    }
    const unsigned char *bitmap = ports == Py_None ? NULL : (const unsigned char *)PyBytes_AS_STRING(ports);

    Py_ssize_t packets = 0, bytes = 0, pure_acks = 0, other_ports = 0;
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
            /* decode.ETHERNET_IPV4_TCP: version 4 and IHL 5, TCP, not a fragment; a zero total
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
        Py_ssize_t captured_end = ip_end < stop ? ip_end : stop; /* Ethernet padding is not payload */
        Py_ssize_t captured = captured_end - payload;

        PyObject *src = version == 4 ? ntoa(f + ETHERNET_LEN + 12) : ntop6(f + ETHERNET_LEN + 8);
        PyObject *dst = version == 4 ? ntoa(f + ETHERNET_LEN + 16) : ntop6(f + ETHERNET_LEN + 24);
        if (src == NULL || dst == NULL) {
            Py_XDECREF(src);
            Py_XDECREF(dst);
            goto done;
        }
        if (PyDict_GET_SIZE(modes)) {
            /* segment.flow_key(), then the policy decides: handed back to Python */
            int c = PyUnicode_Compare(src, dst);
            if (c == -1 && PyErr_Occurred()) {
                Py_DECREF(src);
                Py_DECREF(dst);
                goto done;
            }
            int forward = c < 0 || (c == 0 && sport <= dport);
            PyObject *key = forward ? Py_BuildValue("(OIOI)", src, sport, dst, dport)
                                    : Py_BuildValue("(OIOI)", dst, dport, src, sport);
            int has = key ? PyDict_Contains(modes, key) : -1;
            Py_XDECREF(key);
            if (has < 0) {
                Py_DECREF(src);
                Py_DECREF(dst);
                goto done;
            }
            if (has) {
                /* the flow has a payload mode: PayloadPolicy.cut decides, in the Python loop */
                Py_DECREF(src);
                Py_DECREF(dst);
                code = PYTHON;
                break;
            }
        }
        /* PayloadPolicy.cut for the default mode, as the Python fast path does it */
        Py_ssize_t head_end, tail_start = 0;
        int has_tail = 0;
        if (captured < wire_len) {
            head_end = captured > snaplen ? payload + snaplen : captured_end;
        } else if (captured <= snaplen) {
            head_end = captured_end;
        } else {
            head_end = payload + snaplen;
            if (taillen > 0) {
                tail_start = captured_end - taillen;
                if (tail_start < payload + snaplen)
                    tail_start = payload + snaplen;
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
    if (add_stat(stats, s_packets, packets) < 0 || add_stat(stats, s_bytes, bytes) < 0
            || add_stat(stats, s_pure_acks, pure_acks) < 0 || add_stat(stats, s_other_ports, other_ports) < 0
            || add_stat(stats, s_segments, code == SEGMENT)) {
        Py_DECREF(ret);
        return NULL;
    }
    return ret;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(buf, off, stats, config) -> (code, off, value): pcap records from off to the next segment."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pcapfast", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pcapfast(void)
{
    s_packets = PyUnicode_InternFromString("packets");
    s_bytes = PyUnicode_InternFromString("bytes");
    s_pure_acks = PyUnicode_InternFromString("pure_acks");
    s_other_ports = PyUnicode_InternFromString("other_ports");
    s_segments = PyUnicode_InternFromString("segments");
    if (!s_packets || !s_bytes || !s_pure_acks || !s_other_ports || !s_segments)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "NEED_MORE", NEED_MORE) || PyModule_AddIntConstant(m, "SEGMENT", SEGMENT)
            || PyModule_AddIntConstant(m, "PYTHON", PYTHON)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
