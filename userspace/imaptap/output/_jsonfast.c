/* Optional accelerator for output/jsonl.py: a message record's JSON line built in C.
 *
 * One message record is written per IMAP line, and building it in Python (an f-string over
 * json's string encoder, and float repr for the time) was a sixth of a full-JSON replay.  The
 * two parts here give exactly the characters the Python code gives; JsonlWriter uses them
 * where this module was built (setup.py, optional) and tests/unit/output/test_jsonl.py checks
 * both paths against json's own encoder.
 *
 * ts_repr(x) -> str
 *     repr(x).  A capture's time stamp is whole microseconds: for 1e-4 <= x < 2**33
 *     the text "sec.usec" without trailing zeros is the shortest that reads back as x, because
 *     two texts of at most six decimals are 1e-6 apart and the spacing of doubles there is
 *     under 1e-6; so it is what repr gives whenever it reads back as x, which is checked in
 *     exact arithmetic.  Every other value (nanosecond stamps, tiny or huge numbers) goes to
 *     float's own repr.
 *
 * Formatter(lines, drain, batch, client_side, kinds, keys).message(prefix, msg)
 *     JsonlWriter's message path: the JSON line of msg (a session.Message) appended to lines,
 *     its time formatted once per segment, strings escaped as json.encoder.encode_basestring
 *     does (no ASCII-fication); drain() is called at batch lines.  The keys come from Python
 *     (jsonl._C_KEYS, from Message's fields): what this file knows of the record is only the
 *     type of each field by its position, which the Message NamedTuple declares.
 *
 * flow_line(prefix, facts, fields) -> str
 *     jsonl.flow_line: prefix, then each field of facts (a facts.FlowFacts) as its key text and
 *     its value's JSON, then "}".  fields holds one (key text, encoding, encoder) per field,
 *     from Python (jsonl._C_FLOW_FIELDS): the encoding is one of the FLOW_* codes below, for
 *     the encoders of jsonl._ENCODERS this file knows; a value of the type the code stands for
 *     is written here, anything else (a code of 0, None where no None is declared, an int or
 *     float subclass, a float that is not finite) is given to the encoder, which must return str.
 *     So the line is the one jsonl's Python path builds, which tests check.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

/* Message fields after ts, side and kind (session.Message). */
enum { F_TAG = 3, F_COMMAND, F_ARGS, F_STATUS, F_CODE, F_TEXT, F_LATENCY, F_LITERALS, F_NUMBER, F_TRUNCATED, N_FIELDS };


/* Length of a character once escaped: json's escapes for '"', '\\' and C0 controls. */
static unsigned char esc_len[128];

static void init_esc(void)
{
    for (int c = 0; c < 128; c++)
        esc_len[c] = c < 0x20 ? 6 : 1;
    esc_len['"'] = esc_len['\\'] = esc_len['\b'] = esc_len['\f'] = 2;
    esc_len['\n'] = esc_len['\r'] = esc_len['\t'] = 2;
}

static Py_ssize_t escaped_length(PyObject *s)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), out = n;
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    if (kind == PyUnicode_1BYTE_KIND) {
        const unsigned char *p = data;
        for (Py_ssize_t i = 0; i < n; i++)
            if (p[i] < 128)
                out += esc_len[p[i]] - 1;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            if (c < 128)
                out += esc_len[c] - 1;
        }
    }
    return out + 2; /* the quotes */
}

typedef struct {
    PyObject *out;
    int kind;
    void *data;
    Py_ssize_t pos;
} Writer;

static void put_ascii(Writer *w, const char *s, Py_ssize_t n)
{
    if (w->kind == PyUnicode_1BYTE_KIND) {
        memcpy((char *)w->data + w->pos, s, n);
        w->pos += n;
        return;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyUnicode_WRITE(w->kind, w->data, w->pos++, (unsigned char)s[i]);
}


/* s[start:end] as it is. */
static int put_slice(Writer *w, PyObject *s, Py_ssize_t start, Py_ssize_t end)
{
    if (end <= start)
        return 0;
    if (w->kind == PyUnicode_1BYTE_KIND && PyUnicode_KIND(s) == PyUnicode_1BYTE_KIND) {
        memcpy((char *)w->data + w->pos, (const char *)PyUnicode_DATA(s) + start, end - start);
    } else if (PyUnicode_CopyCharacters(w->out, w->pos, s, start, end - start) < 0) {
        return -1;
    }
    w->pos += end - start;
    return 0;
}

static int put_escaped(Writer *w, PyObject *s)
{
    static const char hex[] = "0123456789abcdef";
    Py_ssize_t n = PyUnicode_GET_LENGTH(s), run = 0;
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    put_ascii(w, "\"", 1);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= 128 || esc_len[c] == 1)
            continue;
        if (put_slice(w, s, run, i) < 0)
            return -1;
        run = i + 1;
        char e[6] = {'\\', 0};
        switch (c) {
        case '"': e[1] = '"'; break;
        case '\\': e[1] = '\\'; break;
        case '\b': e[1] = 'b'; break;
        case '\f': e[1] = 'f'; break;
        case '\n': e[1] = 'n'; break;
        case '\r': e[1] = 'r'; break;
        case '\t': e[1] = 't'; break;
        default:
            memcpy(e, "\\u00", 4);
            e[4] = hex[c >> 4];
            e[5] = hex[c & 15];
            put_ascii(w, e, 6);
            continue;
        }
        put_ascii(w, e, 2);
    }
    if (put_slice(w, s, run, n) < 0)
        return -1;
    put_ascii(w, "\"", 1);
    return 0;
}

static PyObject *float_repr(PyObject *value)
{
    double x = PyFloat_AS_DOUBLE(value);
    /* From 1e-4 (below it repr writes an exponent) to 2**33 (the spacing of doubles stays
     * under 1e-6 up to there); latencies of under a millisecond are the usual case below 1. */
    if (x >= 1e-4 && x < 8589934592.0) {
        double whole = floor(x);
        long long sec = (long long)whole;
        long long usec = llround((x - whole) * 1e6);
        long long micros = sec * 1000000LL + usec; /* under 2**53: exact as a double */
        /* sec.usec reads back as x when it lies within half the spacing of doubles around x
         * (the narrower side, for a power of two): |x*1e6 - micros| < 1e6 * spacing / 2, the
         * left side rounded once by fma, the right side exact.  The margin leaves ties and
         * near-ties to float's repr. */
        double off = fabs(fma(x, 1e6, -(double)micros));
        double up = nextafter(x, INFINITY) - x, down = x - nextafter(x, 0.0);
        double half = (up < down ? up : down) * 1e6 * 0.5;
        if (off < half * (1.0 - 1e-9)) {
            if (usec == 1000000) {
                sec += 1;
                usec = 0;
            }
            char buf[32], *p = buf + sizeof buf;
            int frac = 6;
            while (frac > 1 && usec % 10 == 0) { /* no trailing zeros, but one decimal kept */
                usec /= 10;
                frac--;
            }
            for (int i = 0; i < frac; i++) {
                *--p = (char)('0' + usec % 10);
                usec /= 10;
            }
            *--p = '.';
            do {
                *--p = (char)('0' + sec % 10);
                sec /= 10;
            } while (sec);
            return PyUnicode_FromStringAndSize(p, buf + sizeof buf - p);
        }
    }
    return PyObject_Repr(value);
}

static PyObject *ts_repr(PyObject *self, PyObject *value)
{
    return PyFloat_CheckExact(value) ? float_repr(value) : PyObject_Repr(value);
}

/* The key texts of the fields F_TAG..N_FIELDS-1, as the Formatter was given them: ASCII, so
 * their UTF-8 is their text, kept alive by the Formatter's reference to the Python tuple. */
typedef struct {
    const char *text[N_FIELDS - F_TAG];
    Py_ssize_t len[N_FIELDS - F_TAG];
} Keys;

#define KEY_LEN(f) (keys->len[(f) - F_TAG])
#define PUT_KEY(w, f) put_ascii((w), keys->text[(f) - F_TAG], keys->len[(f) - F_TAG])

/* The constant texts of the lines, made once (make_texts). */
static PyObject *S_COMMA, *S_MESSAGE_HEAD;

/* A message line's texts before its fields: S_MESSAGE_HEAD, the time, a comma, the flow's
 * texts, the side's and kind's. */
#define N_PARTS 5

/* args[0..N_PARTS-1] + the record of msg; args are str, msg a tuple of N_FIELDS or more, keys
 * the key texts of fields F_TAG..N_FIELDS-1 (with their leading commas), from Python. */
static PyObject *build_line(PyObject *const *args, PyObject *msg, const Keys *keys)
{
    PyObject *extra[3] = {NULL, NULL, NULL}; /* latency, literals, number as text */
    PyObject *result = NULL;
    Py_UCS4 maxchar = 127;
    Py_ssize_t total = 0;

    for (int i = 0; i < N_PARTS; i++) {
        total += PyUnicode_GET_LENGTH(args[i]);
        Py_UCS4 m = PyUnicode_MAX_CHAR_VALUE(args[i]);
        if (m > maxchar)
            maxchar = m;
    }
    int plain[F_TEXT + 1] = {0}; /* a field with nothing to escape: copied, not scanned again */
    for (int f = F_TAG; f <= F_TEXT; f++) {
        PyObject *v = PyTuple_GET_ITEM(msg, f);
        total += KEY_LEN(f);
        if (v == Py_None) {
            total += 4;
        } else if (PyUnicode_Check(v)) {
            Py_ssize_t len = escaped_length(v);
            plain[f] = len == PyUnicode_GET_LENGTH(v) + 2;
            total += len;
            Py_UCS4 m = PyUnicode_MAX_CHAR_VALUE(v);
            if (m > maxchar)
                maxchar = m;
        } else {
            PyErr_Format(PyExc_TypeError, "message field %d is not a str or None", f);
            return NULL;
        }
    }
    PyObject *lat = PyTuple_GET_ITEM(msg, F_LATENCY);
    total += KEY_LEN(F_LATENCY);
    if (lat == Py_None) {
        total += 4;
    } else {
        extra[0] = PyFloat_CheckExact(lat) ? float_repr(lat) : PyObject_Repr(lat);
        if (extra[0] == NULL)
            goto done;
        total += PyUnicode_GET_LENGTH(extra[0]);
    }
    PyObject *lits = PyTuple_GET_ITEM(msg, F_LITERALS);
    int has_lits = PyObject_IsTrue(lits);
    if (has_lits < 0)
        goto done;
    if (has_lits) {
        PyObject *sep = PyUnicode_FromString(",");
        PyObject *strs = sep ? PySequence_List(lits) : NULL;
        if (strs != NULL) {
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(strs); i++) {
                PyObject *t = PyObject_Str(PyList_GET_ITEM(strs, i));
                if (t == NULL) {
                    Py_CLEAR(strs);
                    break;
                }
                PyList_SetItem(strs, i, t);
            }
        }
        extra[1] = strs ? PyUnicode_Join(sep, strs) : NULL;
        Py_XDECREF(sep);
        Py_XDECREF(strs);
        if (extra[1] == NULL)
            goto done;
        total += KEY_LEN(F_LITERALS) + 2 + PyUnicode_GET_LENGTH(extra[1]);
    }
    PyObject *number = PyTuple_GET_ITEM(msg, F_NUMBER);
    if (number != Py_None) {
        extra[2] = PyObject_Str(number);
        if (extra[2] == NULL)
            goto done;
        total += KEY_LEN(F_NUMBER) + PyUnicode_GET_LENGTH(extra[2]);
    }
    int truncated = PyObject_IsTrue(PyTuple_GET_ITEM(msg, F_TRUNCATED));
    if (truncated < 0)
        goto done;
    if (truncated)
        total += KEY_LEN(F_TRUNCATED) + 4;
    total += 2; /* }\n */
    for (int i = 0; i < 3; i++) { /* number texts can be any str for a subclass */
        if (extra[i] != NULL && PyUnicode_MAX_CHAR_VALUE(extra[i]) > maxchar)
            maxchar = PyUnicode_MAX_CHAR_VALUE(extra[i]);
    }

    result = PyUnicode_New(total, maxchar);
    if (result == NULL)
        goto done;
    Writer w = {result, PyUnicode_KIND(result), PyUnicode_DATA(result), 0};
    for (int i = 0; i < N_PARTS; i++)
        if (put_slice(&w, args[i], 0, PyUnicode_GET_LENGTH(args[i])) < 0)
            goto fail;
    for (int f = F_TAG; f <= F_TEXT; f++) {
        PyObject *v = PyTuple_GET_ITEM(msg, f);
        PUT_KEY(&w, f);
        if (v == Py_None) {
            put_ascii(&w, "null", 4);
        } else if (plain[f]) {
            put_ascii(&w, "\"", 1);
            if (put_slice(&w, v, 0, PyUnicode_GET_LENGTH(v)) < 0)
                goto fail;
            put_ascii(&w, "\"", 1);
        } else if (put_escaped(&w, v) < 0) {
            goto fail;
        }
    }
    PUT_KEY(&w, F_LATENCY);
    if (extra[0] == NULL)
        put_ascii(&w, "null", 4);
    else if (put_slice(&w, extra[0], 0, PyUnicode_GET_LENGTH(extra[0])) < 0)
        goto fail;
    if (extra[1] != NULL) {
        PUT_KEY(&w, F_LITERALS);
        put_ascii(&w, "[", 1);
        if (put_slice(&w, extra[1], 0, PyUnicode_GET_LENGTH(extra[1])) < 0)
            goto fail;
        put_ascii(&w, "]", 1);
    }
    if (extra[2] != NULL) {
        PUT_KEY(&w, F_NUMBER);
        if (put_slice(&w, extra[2], 0, PyUnicode_GET_LENGTH(extra[2])) < 0)
            goto fail;
    }
    if (truncated) {
        PUT_KEY(&w, F_TRUNCATED);
        put_ascii(&w, "true", 4);
    }
    put_ascii(&w, "}\n", 2);
    if (w.pos != total) {
        PyErr_SetString(PyExc_SystemError, "build_line: length mismatch");
        goto fail;
    }
    goto done;
fail:
    Py_CLEAR(result);
done:
    for (int i = 0; i < 3; i++)
        Py_XDECREF(extra[i]);
    return result;
}

/* --- Formatter: JsonlWriter's message path, one C call per message -------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *lines;   /* list the lines are appended to */
    PyObject *drain;   /* called when lines holds batch lines */
    Py_ssize_t batch;
    PyObject *client;  /* Side.CLIENT */
    PyObject *kinds;   /* tuple of (Kind member, from-client text, from-server text) */
    PyObject *keys;    /* the key texts of the fields after kind, from Python (jsonl._C_KEYS) */
    Keys key_texts;    /* the same, as C strings */
    double ts;         /* the time of head, when head is set */
    PyObject *head;    /* the text of ts */
} Formatter;

static int Formatter_init(Formatter *self, PyObject *args, PyObject *kwds)
{
    PyObject *lines, *drain, *client, *kinds, *keys;
    Py_ssize_t batch;
    if (!PyArg_ParseTuple(args, "O!OnOO!O!:Formatter", &PyList_Type, &lines, &drain, &batch, &client,
                          &PyTuple_Type, &kinds, &PyTuple_Type, &keys))
        return -1;
    if (PyTuple_GET_SIZE(keys) != N_FIELDS - F_TAG) {
        PyErr_Format(PyExc_TypeError, "Formatter: %d keys expected, one per Message field after kind",
                     N_FIELDS - F_TAG);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++) {
        PyObject *k = PyTuple_GET_ITEM(keys, i);
        if (!PyUnicode_Check(k) || PyUnicode_MAX_CHAR_VALUE(k) > 127) {
            PyErr_SetString(PyExc_TypeError, "Formatter: keys are ASCII str");
            return -1;
        }
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kinds); i++) {
        PyObject *k = PyTuple_GET_ITEM(kinds, i);
        if (!PyTuple_Check(k) || PyTuple_GET_SIZE(k) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(k, 1))
                || !PyUnicode_Check(PyTuple_GET_ITEM(k, 2))) {
            PyErr_SetString(PyExc_TypeError, "Formatter: kinds are (kind, from-client text, from-server text)");
            return -1;
        }
    }
    Py_INCREF(lines);
    Py_XSETREF(self->lines, lines);
    Py_INCREF(drain);
    Py_XSETREF(self->drain, drain);
    Py_INCREF(client);
    Py_XSETREF(self->client, client);
    Py_INCREF(kinds);
    Py_XSETREF(self->kinds, kinds);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(keys); i++) {
        const char *text = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(keys, i), &self->key_texts.len[i]);
        if (text == NULL)
            return -1;
        self->key_texts.text[i] = text;
    }
    Py_INCREF(keys);
    Py_XSETREF(self->keys, keys);
    self->batch = batch;
    Py_CLEAR(self->head);
    return 0;
}

static int Formatter_traverse(Formatter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->lines);
    Py_VISIT(self->drain);
    Py_VISIT(self->client);
    Py_VISIT(self->kinds);
    Py_VISIT(self->keys);
    return 0;
}

static int Formatter_clear(Formatter *self)
{
    Py_CLEAR(self->lines);
    Py_CLEAR(self->drain);
    Py_CLEAR(self->client);
    Py_CLEAR(self->head);
    Py_CLEAR(self->kinds);
    Py_CLEAR(self->keys);
    return 0;
}

static void Formatter_dealloc(Formatter *self)
{
    PyObject_GC_UnTrack(self);
    Formatter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* message(prefix, msg): append msg's JSON line to lines; drain() once batch lines wait. */
static PyObject *Formatter_message(Formatter *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyTuple_Check(args[1])
            || PyTuple_GET_SIZE(args[1]) < N_FIELDS) {
        PyErr_SetString(PyExc_TypeError, "message(prefix: str, msg: Message)");
        return NULL;
    }
    if (self->lines == NULL) {
        PyErr_SetString(PyExc_ValueError, "Formatter not initialised");
        return NULL;
    }
    PyObject *msg = args[1];
    PyObject *ts = PyTuple_GET_ITEM(msg, 0);
    int same = self->head != NULL && PyFloat_CheckExact(ts) && PyFloat_AS_DOUBLE(ts) == self->ts;
    if (!same) { /* the lines of one segment share its time: formatted once */
        PyObject *t = PyFloat_CheckExact(ts) ? float_repr(ts) : PyObject_Repr(ts);
        if (t == NULL)
            return NULL;
        Py_XSETREF(self->head, t);
        if (PyFloat_CheckExact(ts)) {
            self->ts = PyFloat_AS_DOUBLE(ts);
        } else {
            self->ts = NAN; /* equal to nothing: formatted again next time */
        }
    }
    PyObject *kind = PyTuple_GET_ITEM(msg, 2), *from_kind = NULL;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->kinds); i++) {
        PyObject *k = PyTuple_GET_ITEM(self->kinds, i);
        if (PyTuple_GET_ITEM(k, 0) == kind) {
            from_kind = PyTuple_GET_ITEM(k, PyTuple_GET_ITEM(msg, 1) == self->client ? 1 : 2);
            break;
        }
    }
    if (from_kind == NULL) {
        PyErr_SetString(PyExc_ValueError, "message: unknown kind");
        return NULL;
    }
    PyObject *parts[N_PARTS] = {S_MESSAGE_HEAD, self->head, S_COMMA, args[0], from_kind};
    PyObject *line = build_line(parts, msg, &self->key_texts);
    if (line == NULL)
        return NULL;
    int r = PyList_Append(self->lines, line);
    Py_DECREF(line);
    if (r < 0)
        return NULL;
    if (PyList_GET_SIZE(self->lines) >= self->batch) {
        PyObject *res = PyObject_CallNoArgs(self->drain);
        if (res == NULL)
            return NULL;
        Py_DECREF(res);
    }
    Py_RETURN_NONE;
}

static PyMethodDef Formatter_methods[] = {
    {"message", (PyCFunction)(void (*)(void))Formatter_message, METH_FASTCALL,
     "message(prefix, msg): append the JSON line of msg (a session.Message) to the lines."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FormatterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "imaptap.output._jsonfast.Formatter",
    .tp_doc = "Formatter(lines, drain, batch, client_side, kinds, keys): JsonlWriter's message path.",
    .tp_basicsize = sizeof(Formatter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Formatter_init,
    .tp_dealloc = (destructor)Formatter_dealloc,
    .tp_traverse = (traverseproc)Formatter_traverse,
    .tp_clear = (inquiry)Formatter_clear,
    .tp_methods = Formatter_methods,
};

/* --- flow_line: jsonl.flow_line's fields, each written as its Python encoder writes it ------ */

/* The encodings of a FlowFacts field this file writes itself (jsonl._C_FLOW_FIELDS names them
 * by the module's FLOW_* constants); FLOW_CALL: always the field's Python encoder. */
enum { FLOW_CALL, FLOW_INT, FLOW_FLOAT, FLOW_STR, FLOW_OPTIONAL_STR, FLOW_BOOL, FLOW_STRINGS, FLOW_COUNTS,
       FLOW_OPTIONAL }; /* FLOW_OPTIONAL: null for None, else the encoder */

/* A flow line is built in two passes over its pieces: the first makes them and adds up their
 * lengths, the second writes them into the one str made for the line.  A piece is a str as it
 * is, a str to quote and escape, or ASCII text (a constant, or an int's digits kept here). */
enum { PIECE_STR, PIECE_QUOTED, PIECE_ASCII };

typedef struct {
    PyObject *str;       /* PIECE_STR, PIECE_QUOTED */
    const char *ascii;   /* PIECE_ASCII: a constant, or digits */
    Py_ssize_t len;      /* characters once written */
    char digits[24];     /* an int's text (ascii points here) */
    unsigned char kind;
    unsigned char owned; /* str is a reference of the line's own */
} Piece;

/* Pieces a flow line has before the list grows onto the heap: a few hundred, with long lists
 * of mailboxes or commands. */
#define FLOW_PIECES_ON_STACK 256

typedef struct {
    Piece *items;
    Py_ssize_t n, cap;
    Py_ssize_t total;
    Py_UCS4 maxchar;
    Piece stack[FLOW_PIECES_ON_STACK];
} Pieces;

static Piece *next_piece(Pieces *p)
{
    if (p->n == p->cap) {
        Py_ssize_t cap = p->cap * 2;
        Piece *items = p->items == p->stack ? PyMem_Malloc(cap * sizeof(Piece))
                                             : PyMem_Realloc(p->items, cap * sizeof(Piece));
        if (items == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        if (p->items == p->stack)
            memcpy(items, p->stack, p->n * sizeof(Piece));
        p->items = items;
        p->cap = cap;
    }
    return &p->items[p->n++];
}

static int piece_ascii(Pieces *p, const char *text, Py_ssize_t len)
{
    Piece *c = next_piece(p);
    if (c == NULL)
        return -1;
    c->kind = PIECE_ASCII;
    c->ascii = text;
    c->len = len;
    c->str = NULL;
    c->owned = 0;
    p->total += len;
    return 0;
}

#define PIECE_TEXT(p, literal) piece_ascii((p), (literal), (Py_ssize_t)(sizeof(literal) - 1))

/* A str, written as it is or (quote) as json.encoder.encode_basestring writes it; owned: the
 * reference is the line's (NULL, with an exception set, is passed on). */
static int piece_str(Pieces *p, PyObject *str, int quote, int owned)
{
    if (str == NULL)
        return -1;
    Piece *c = next_piece(p);
    if (c == NULL) {
        if (owned)
            Py_DECREF(str);
        return -1;
    }
    c->kind = quote ? PIECE_QUOTED : PIECE_STR;
    c->str = str;
    c->owned = (unsigned char)owned;
    c->len = quote ? escaped_length(str) : PyUnicode_GET_LENGTH(str);
    Py_UCS4 m = PyUnicode_MAX_CHAR_VALUE(str);
    if (m > p->maxchar)
        p->maxchar = m;
    p->total += c->len;
    return 0;
}

/* An exact int as str() writes it: its digits kept in the piece where it fits a long long. */
static int piece_int(Pieces *p, PyObject *value)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow)
        return piece_str(p, PyObject_Str(value), 0, 1);
    if (v == -1 && PyErr_Occurred())
        return -1;
    Piece *c = next_piece(p);
    if (c == NULL)
        return -1;
    char *end = c->digits + sizeof c->digits, *d = end;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    do {
        *--d = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        *--d = '-';
    c->kind = PIECE_ASCII;
    c->ascii = d;
    c->len = end - d;
    c->str = NULL;
    c->owned = 0;
    p->total += c->len;
    return 0;
}

/* Whether every item of a tuple is a str. */
static int all_str(PyObject *items)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(items); i++)
        if (!PyUnicode_Check(PyTuple_GET_ITEM(items, i)))
            return 0;
    return 1;
}

/* Whether a dict maps str to exact int only (f"{v}" of an int subclass such as bool is not str(v)). */
static int all_counts(PyObject *counts)
{
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(counts, &pos, &key, &value))
        if (!PyUnicode_Check(key) || !PyLong_CheckExact(value))
            return 0;
    return 1;
}

/* One field's value, written as its encoder would: here for the types its code stands for,
 * by the encoder itself for anything else.  The facts tuple keeps the borrowed strs alive. */
static int put_flow_value(Pieces *p, PyObject *value, long code, PyObject *encoder)
{
    switch (code) {
    case FLOW_INT:
        if (PyLong_CheckExact(value))
            return piece_int(p, value);
        break;
    case FLOW_FLOAT:
        if (PyFloat_CheckExact(value) && isfinite(PyFloat_AS_DOUBLE(value)))
            return piece_str(p, float_repr(value), 0, 1);
        break;
    case FLOW_OPTIONAL:
        if (value == Py_None)
            return PIECE_TEXT(p, "null");
        break;
    case FLOW_OPTIONAL_STR:
        if (value == Py_None)
            return PIECE_TEXT(p, "null");
        /* fall through */
    case FLOW_STR: /* a str subclass too (a StrEnum member): json escapes its characters alike */
        if (PyUnicode_Check(value))
            return piece_str(p, value, 1, 0);
        break;
    case FLOW_BOOL:
        if (value == Py_True)
            return PIECE_TEXT(p, "true");
        if (value == Py_False)
            return PIECE_TEXT(p, "false");
        if (value == Py_None)
            return PIECE_TEXT(p, "null");
        break;
    case FLOW_STRINGS: /* as _strings: ["a","b"] */
        if (PyTuple_CheckExact(value) && all_str(value)) {
            if (PIECE_TEXT(p, "[") < 0)
                return -1;
            for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(value); i++)
                if ((i && PIECE_TEXT(p, ",") < 0) || piece_str(p, PyTuple_GET_ITEM(value, i), 1, 0) < 0)
                    return -1;
            return PIECE_TEXT(p, "]");
        }
        break;
    case FLOW_COUNTS: /* as _counts: {"a":1,"b":2}, in the dict's order */
        if (PyDict_CheckExact(value) && all_counts(value)) {
            PyObject *key, *count;
            Py_ssize_t pos = 0;
            int first = 1;
            if (PIECE_TEXT(p, "{") < 0)
                return -1;
            while (PyDict_Next(value, &pos, &key, &count)) {
                if ((!first && PIECE_TEXT(p, ",") < 0) || piece_str(p, key, 1, 0) < 0 || PIECE_TEXT(p, ":") < 0
                        || piece_int(p, count) < 0)
                    return -1;
                first = 0;
            }
            return PIECE_TEXT(p, "}");
        }
        break;
    }
    PyObject *text = PyObject_CallOneArg(encoder, value);
    if (text != NULL && !PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "flow_line: an encoder returned %.100s, not str", Py_TYPE(text)->tp_name);
        Py_CLEAR(text);
    }
    return piece_str(p, text, 0, 1);
}

static PyObject *write_pieces(Pieces *p)
{
    PyObject *line = PyUnicode_New(p->total, p->maxchar);
    if (line == NULL)
        return NULL;
    Writer w = {line, PyUnicode_KIND(line), PyUnicode_DATA(line), 0};
    for (Py_ssize_t i = 0; i < p->n; i++) {
        Piece *c = &p->items[i];
        int r = 0;
        if (c->kind == PIECE_ASCII)
            put_ascii(&w, c->ascii, c->len);
        else if (c->kind == PIECE_STR)
            r = put_slice(&w, c->str, 0, c->len);
        else
            r = put_escaped(&w, c->str);
        if (r < 0) {
            Py_DECREF(line);
            return NULL;
        }
    }
    if (w.pos != p->total) {
        PyErr_SetString(PyExc_SystemError, "flow_line: length mismatch");
        Py_DECREF(line);
        return NULL;
    }
    return line;
}

static PyObject *flow_line(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyUnicode_Check(args[0]) || !PyTuple_Check(args[1]) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "flow_line(prefix: str, facts: FlowFacts, fields: tuple)");
        return NULL;
    }
    PyObject *facts = args[1], *fields = args[2], *line = NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(fields);
    if (PyTuple_GET_SIZE(facts) != n) { /* as zip(strict=True) in the Python path */
        PyErr_Format(PyExc_ValueError, "flow_line: %zd fields declared, %zd values given", n,
                     PyTuple_GET_SIZE(facts));
        return NULL;
    }
    Pieces *p = PyMem_Malloc(sizeof(Pieces)); /* its stack of pieces is too large for C's */
    if (p == NULL)
        return PyErr_NoMemory();
    p->items = p->stack;
    p->n = 0;
    p->cap = FLOW_PIECES_ON_STACK;
    p->total = 0;
    p->maxchar = 127;
    if (piece_str(p, args[0], 0, 0) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *field = PyTuple_GET_ITEM(fields, i);
        if (!PyTuple_Check(field) || PyTuple_GET_SIZE(field) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(field, 0))
                || !PyLong_Check(PyTuple_GET_ITEM(field, 1))) {
            PyErr_SetString(PyExc_TypeError, "flow_line: fields are (key text, encoding, encoder)");
            goto done;
        }
        long code = PyLong_AsLong(PyTuple_GET_ITEM(field, 1));
        if (code == -1 && PyErr_Occurred())
            goto done;
        if (piece_str(p, PyTuple_GET_ITEM(field, 0), 0, 0) < 0
                || put_flow_value(p, PyTuple_GET_ITEM(facts, i), code, PyTuple_GET_ITEM(field, 2)) < 0)
            goto done;
    }
    if (PIECE_TEXT(p, "}") == 0)
        line = write_pieces(p);
done:
    for (Py_ssize_t i = 0; i < p->n; i++)
        if (p->items[i].owned)
            Py_DECREF(p->items[i].str);
    if (p->items != p->stack)
        PyMem_Free(p->items);
    PyMem_Free(p);
    return line;
}

static PyMethodDef methods[] = {
    {"ts_repr", ts_repr, METH_O, "ts_repr(x: float) -> str: repr(x), fast for microsecond time stamps."},
    {"flow_line", (PyCFunction)(void (*)(void))flow_line, METH_FASTCALL,
     "flow_line(prefix, facts, fields) -> str: jsonl.flow_line's line of a FlowFacts."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jsonfast", NULL, -1, methods};

static int make_texts(void)
{
    struct { PyObject **text; const char *value; } texts[] = {
        {&S_COMMA, ","}, {&S_MESSAGE_HEAD, "{\"type\":\"message\",\"ts\":"},
    };
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        if (*texts[i].text == NULL && (*texts[i].text = PyUnicode_InternFromString(texts[i].value)) == NULL)
            return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__jsonfast(void)
{
    init_esc();
    if (PyType_Ready(&FormatterType) < 0 || make_texts() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    struct { const char *name; long value; } codes[] = {
        {"FLOW_CALL", FLOW_CALL}, {"FLOW_INT", FLOW_INT}, {"FLOW_FLOAT", FLOW_FLOAT}, {"FLOW_STR", FLOW_STR},
        {"FLOW_OPTIONAL_STR", FLOW_OPTIONAL_STR}, {"FLOW_BOOL", FLOW_BOOL}, {"FLOW_STRINGS", FLOW_STRINGS},
        {"FLOW_COUNTS", FLOW_COUNTS}, {"FLOW_OPTIONAL", FLOW_OPTIONAL},
    };
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        if (PyModule_AddIntConstant(m, codes[i].name, codes[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    Py_INCREF(&FormatterType);
    if (PyModule_AddObject(m, "Formatter", (PyObject *)&FormatterType) < 0) {
        Py_DECREF(&FormatterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
