"""The kernel ABI: bpf/imaptap.h against its Python mirror, capture/live/abi.py, with no kernel.

The header is parsed here with a deliberately small grammar: plain structs of fixed-width
integer fields and arrays of them, integer #defines, one include guard.  Anything else fails the
parse, so C this checker does not understand cannot slip past it unchecked.  Layouts follow the
natural alignment of the fixed-width types, the rule of every ABI the program is built for.
The checker is tried on altered copies of the header too, so each kind of drift is shown to be
reported.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imaptap.capture.live import abi
from imaptap.capture.live.ring import kernel_counters
from imaptap.segment import WHOLE_PAYLOAD_CAP, PayloadMode

ROOT = Path(__file__).resolve().parents[3]
HEADER = ROOT / "bpf" / "imaptap.h"

#: The C types the header may use, and the ctypes type of the same width.
C_TYPES: dict[str, type] = {
    "__u8": ctypes.c_uint8, "__u16": ctypes.c_uint16, "__u32": ctypes.c_uint32, "__u64": ctypes.c_uint64,
    "__be16": ctypes.c_uint16, "__be32": ctypes.c_uint32,
}
#: Network-order types: Python keeps them as bytes (a c_uint8 array), never as an integer in
#: host order, so a field that changes byte order cannot go unnoticed.
NETWORK_ORDER = {"__be16", "__be32"}


class HeaderError(Exception):
    """The header uses C this parser does not read."""


@dataclass(frozen=True, slots=True)
class CField:
    name: str
    ctype: str
    count: int | None
    """Array length; None for a scalar."""


@dataclass(frozen=True, slots=True)
class Header:
    structs: dict[str, tuple[CField, ...]]
    defines: dict[str, int]


# --- the parser ----------------------------------------------------------------------------------

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
_IFNDEF = re.compile(r"#\s*ifndef\s+(\w+)")
_DEFINE = re.compile(r"#\s*define\s+(\w+)(?:\s+(.*))?")
_ENDIF = re.compile(r"#\s*endif")
# Decimal without a leading zero (C reads 010 as octal), or hexadecimal; U and L suffixes allowed.
_INTEGER = re.compile(r"(0[xX][0-9a-fA-F]+|0|[1-9][0-9]*)[uUlL]*")
_ARRAY_LENGTH = re.compile(r"[1-9][0-9]*")
_TOKEN = re.compile(r"\s*(?:([A-Za-z_]\w*|[0-9]+)|([{};\[\]]))")


def _strip_comments(text: str) -> str:
    """Comments out, newlines kept (for line numbers in errors)."""
    stripped = _COMMENT.sub(lambda m: "\n" * m.group().count("\n") + " ", text)
    if "/*" in stripped or "*/" in stripped:
        raise HeaderError("unterminated comment")
    return stripped


def parse_header(text: str) -> Header:
    """Structs and #defines of imaptap.h; HeaderError on anything outside the small grammar."""
    guard = None
    guard_defined = ended = False
    defines: dict[str, int] = {}
    body: list[str] = []
    for number, line in enumerate(_strip_comments(text).splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if ended:
            raise HeaderError(f"line {number}: text after the include guard's #endif")
        if not stripped.startswith("#"):
            if not guard_defined:
                raise HeaderError(f"line {number}: declarations before the include guard")
            body.append(stripped)
            continue
        if guard is None:
            m = _IFNDEF.fullmatch(stripped)
            if m is None:
                raise HeaderError(f"line {number}: the header must open with an #ifndef include guard")
            guard = m.group(1)
            continue
        if not guard_defined:
            m = _DEFINE.fullmatch(stripped)
            if m is None or m.group(1) != guard or m.group(2) is not None:
                raise HeaderError(f"line {number}: #define {guard} must follow #ifndef {guard}")
            guard_defined = True
            continue
        if _ENDIF.fullmatch(stripped):
            ended = True
            continue
        m = _DEFINE.fullmatch(stripped)
        if m is None:
            raise HeaderError(f"line {number}: directive not understood: {stripped}")
        name, value = m.group(1), m.group(2)
        if value is None:
            raise HeaderError(f"line {number}: #define {name} without a value")
        value_match = _INTEGER.fullmatch(value.strip())
        if value_match is None:
            raise HeaderError(f"line {number}: #define {name}: {value.strip()!r} is not an integer literal")
        if name in defines:
            raise HeaderError(f"line {number}: #define {name} twice")
        defines[name] = int(value_match.group(1), 0)
    if not ended:
        raise HeaderError("no complete #ifndef/#define/#endif include guard")
    return Header(_parse_structs(" ".join(body), defines), defines)


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise HeaderError(f"C not understood at {text[pos:pos + 30].strip()!r}")
        out.append(m.group(1) or m.group(2))
        pos = m.end()
    return out


def _parse_structs(text: str, defines: dict[str, int]) -> dict[str, tuple[CField, ...]]:
    tokens = _tokens(text)
    pos = 0

    def take(expected: str | None = None) -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise HeaderError(f"header ends where {expected or 'more'} was expected")
        token = tokens[pos]
        if expected is not None and token != expected:
            raise HeaderError(f"expected {expected!r}, found {token!r}")
        pos += 1
        return token

    structs: dict[str, tuple[CField, ...]] = {}
    while pos < len(tokens):
        take("struct")
        name = take()
        if not name.isidentifier():
            raise HeaderError(f"struct name {name!r} not understood")
        if name in structs:
            raise HeaderError(f"struct {name} twice")
        take("{")
        fields: list[CField] = []
        while tokens[pos:pos + 1] != ["}"]:
            ctype = take()
            if ctype not in C_TYPES:
                raise HeaderError(f"struct {name}: type {ctype!r} not understood")
            fname = take()
            if not fname.isidentifier() or fname in C_TYPES:
                raise HeaderError(f"struct {name}: field name {fname!r} not understood")
            count = None
            if tokens[pos:pos + 1] == ["["]:
                take("[")
                length = take()
                count = int(length) if _ARRAY_LENGTH.fullmatch(length) else defines.get(length)
                if not count:
                    raise HeaderError(f"struct {name}.{fname}: array length {length!r} not understood")
                take("]")
            take(";")
            if any(f.name == fname for f in fields):
                raise HeaderError(f"struct {name}: field {fname} twice")
            fields.append(CField(fname, ctype, count))
        take("}")
        take(";")
        if not fields:
            raise HeaderError(f"struct {name} is empty")
        structs[name] = tuple(fields)
    return structs


# --- the checker ---------------------------------------------------------------------------------


def c_layout(fields: tuple[CField, ...]) -> tuple[dict[str, tuple[int, int]], int, list[str]]:
    """Field name -> (offset, size), the struct's size, and where the compiler would pad."""
    layout, offset, align, padding = {}, 0, 1, []
    for f in fields:
        width = ctypes.sizeof(C_TYPES[f.ctype])
        gap = -offset % width
        if gap:
            padding.append(f"{gap} bytes of implicit padding before {f.name}")
        offset += gap
        layout[f.name] = (offset, width * (f.count or 1))
        offset += width * (f.count or 1)
        align = max(align, width)
    tail = -offset % align
    if tail:
        padding.append(f"{tail} bytes of implicit padding at the end")
    return layout, offset + tail, padding


#: ctypes names its fixed-width types after the C types they alias (c_uint32 is c_uint).
_CTYPE_NAMES = {ctypes.c_uint8: "c_uint8", ctypes.c_uint16: "c_uint16", ctypes.c_uint32: "c_uint32",
                ctypes.c_uint64: "c_uint64"}


def _describe(ctype: type) -> str:
    if hasattr(ctype, "_length_"):
        return f"{_describe(ctype._type_)}[{ctype._length_}]"
    return _CTYPE_NAMES.get(ctype, ctype.__name__)


def _field_type_matches(f: CField, mirror_type: type) -> bool:
    if f.ctype in NETWORK_ORDER:
        # as bytes, whatever the word size in C
        return (getattr(mirror_type, "_type_", None) is ctypes.c_uint8
                and ctypes.sizeof(mirror_type) == ctypes.sizeof(C_TYPES[f.ctype]) * (f.count or 1))
    if f.count is None:
        return mirror_type is C_TYPES[f.ctype]
    return getattr(mirror_type, "_type_", None) is C_TYPES[f.ctype] and mirror_type._length_ == f.count


def struct_differences(name: str, fields: tuple[CField, ...], mirror: type[ctypes.Structure]) -> list[str]:
    """Every way ``mirror`` differs from struct ``name`` as the header declares it."""
    layout, size, padding = c_layout(fields)
    # imaptap.h promises no implicit padding: the mirror could not tell padding from fields.
    out = [f"struct {name}: {gap}" for gap in padding]
    c_names = [f.name for f in fields]
    py_types = dict(mirror._fields_)
    if c_names != list(py_types):
        out.append(f"struct {name}: fields {c_names} in C, {list(py_types)} in {mirror.__name__}")
    for f in fields:
        if f.name not in py_types:
            continue
        offset, fsize = layout[f.name]
        descriptor = getattr(mirror, f.name)
        c_decl = f"{f.ctype}[{f.count}]" if f.count else f.ctype
        if not _field_type_matches(f, py_types[f.name]):
            out.append(f"struct {name}.{f.name}: {c_decl} in C, {_describe(py_types[f.name])} in Python")
        if descriptor.offset != offset:
            out.append(f"struct {name}.{f.name}: offset {offset} in C, {descriptor.offset} in Python")
        if descriptor.size != fsize:
            out.append(f"struct {name}.{f.name}: size {fsize} in C, {descriptor.size} in Python")
    if ctypes.sizeof(mirror) != size:
        out.append(f"struct {name}: {size} bytes in C, {ctypes.sizeof(mirror)} in {mirror.__name__}")
    return out


def abi_differences(header: Header, structs: dict[str, type[ctypes.Structure]] = abi.STRUCTS,
                    mirrored: dict[str, int] = abi.MIRRORED_DEFINES,
                    kernel_only: dict[str, str] = abi.KERNEL_ONLY_DEFINES) -> list[str]:
    """Every difference between the parsed header and the Python mirror; [] when they agree."""
    out = []
    for name in sorted(header.structs.keys() | structs.keys()):
        if name not in structs:
            out.append(f"struct {name} has no mirror in abi.STRUCTS")
        elif name not in header.structs:
            out.append(f"struct {name} is mirrored but not in imaptap.h")
        else:
            out += struct_differences(name, header.structs[name], structs[name])
    for name, value in header.defines.items():
        if name in mirrored:
            if mirrored[name] != value:
                out.append(f"#define {name} is {value} in C, {mirrored[name]} in Python")
        elif name not in kernel_only:
            out.append(f"#define {name} is neither mirrored nor declared kernel-only")
    out += [f"#define {name} is mirrored but not in imaptap.h"
            for name in sorted(mirrored.keys() - header.defines.keys())]
    out += [f"#define {name} is declared kernel-only but not in imaptap.h"
            for name in sorted(kernel_only.keys() - header.defines.keys())]
    return out


# --- the real header -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def header_text() -> str:
    return HEADER.read_text()


@pytest.fixture(scope="module")
def header(header_text) -> Header:
    return parse_header(header_text)


def test_the_python_mirror_agrees_with_the_header(header):
    differences = abi_differences(header)
    assert not differences, "bpf/imaptap.h and capture/live/abi.py disagree:\n" + "\n".join(differences)


def test_the_parser_reads_every_struct_and_define(header):
    assert set(header.structs) == {"imaptap_event", "imaptap_flow_key", "imaptap_config", "imaptap_counters"}
    # sizes the README and the ring buffer's sizing rely on
    assert c_layout(header.structs["imaptap_event"])[1] == 72
    assert c_layout(header.structs["imaptap_flow_key"])[1] == 40
    assert CField("saddr", "__be32", 4) in header.structs["imaptap_event"]
    assert header.structs["imaptap_config"] == (CField("ports", "__u8", 8192),)
    assert header.defines["IMAPTAP_WHOLE_CAP"] == 65535 and header.defines["IMAPTAP_HOOK_TC_EGRESS"] == 2


def test_payload_modes_are_segment_payload_modes(header):
    modes = {name.removeprefix("IMAPTAP_MODE_"): value for name, value in header.defines.items()
             if name.startswith("IMAPTAP_MODE_")}
    assert modes == {mode.name: mode.value for mode in PayloadMode}


def test_the_whole_payload_cap_and_the_counters_follow_the_header(header):
    assert header.defines["IMAPTAP_WHOLE_CAP"] == WHOLE_PAYLOAD_CAP
    assert abi.COUNTER_NAMES == tuple(f.name for f in header.structs["imaptap_counters"])
    assert tuple(kernel_counters(None)) == abi.COUNTER_NAMES


def test_the_record_header_format_agrees_with_the_ctypes_layout():
    assert abi.EVENT_HEADER.size == ctypes.sizeof(abi.EventHeader)
    # a distinct value in every field: a wrong order, width or byte order in the format shows
    event = abi.EventHeader()
    expected = []
    for k, (name, ctype) in enumerate(abi.EventHeader._fields_, 1):
        if hasattr(ctype, "_length_"):
            value = bytes((k * 16 + i) & 0xFF for i in range(ctype._length_))
            getattr(event, name)[:] = value
        else:
            value = (0x0102030405060708 * k) & ((1 << 8 * ctypes.sizeof(ctype)) - 1)
            setattr(event, name, value)
        expected.append(value)
    assert list(abi.EVENT_HEADER.unpack(bytes(event))) == expected


def test_bpf_source_dir_finds_this_header():
    assert (abi.bpf_source_dir() / "imaptap.h").samefile(HEADER)


def test_abi_imports_neither_bcc_nor_pyroute2():
    script = ("import sys\n"
              f"sys.path.insert(0, {str(ROOT / 'userspace')!r})\n"
              "sys.modules['bcc'] = sys.modules['pyroute2'] = None   # importing either fails\n"
              "import imaptap.capture.live.abi\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('bcc', 'pyroute2')"
              " and sys.modules[m] is not None))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- drift is reported ---------------------------------------------------------------------------


def edit(old: str, new: str) -> Callable[[str], str]:
    """An alteration of the header text; fails if ``old`` is not there exactly once."""
    def apply(text: str) -> str:
        assert text.count(old) == 1, f"the header no longer has {old!r} once"
        return text.replace(old, new)
    return apply


DRIFTS = {
    "field added": (edit("    __u32 tail_len;", "    __u32 tail_len;\n    __u32 extra;"), [
        "struct imaptap_event: fields ['ts_ns', 'saddr', 'daddr', 'seq', 'ack', 'wire_len', 'ifindex', 'cap_len',"
        " 'sport', 'dport', 'ip_version', 'tcp_flags', 'hook', 'mode', 'tail_len', 'extra'] in C",
        "struct imaptap_event: 4 bytes of implicit padding at the end",
        "struct imaptap_event: 80 bytes in C, 72 in EventHeader",
    ]),
    "fields reordered": (edit("    __u16 sport;        /* host order */\n    __u16 dport;",
                              "    __u16 dport;\n    __u16 sport;"), [
        "struct imaptap_event.dport: offset 60 in C, 62 in Python",
        "struct imaptap_event.sport: offset 62 in C, 60 in Python",
    ]),
    "field widened": (edit("    __u16 port_a;", "    __u32 port_a;"), [
        "struct imaptap_flow_key.port_a: __u32 in C, c_uint16 in Python",
        "struct imaptap_flow_key.port_a: size 4 in C, 2 in Python",
        "struct imaptap_flow_key.port_b: offset 36 in C, 34 in Python",
        "struct imaptap_flow_key: 2 bytes of implicit padding at the end",
        "struct imaptap_flow_key: 44 bytes in C, 40 in KernelFlowKey",
    ]),
    "array resized": (edit("ports[8192]", "ports[4096]"), [
        "struct imaptap_config.ports: __u8[4096] in C, c_uint8[8192] in Python",
        "struct imaptap_config.ports: size 4096 in C, 8192 in Python",
        "struct imaptap_config: 4096 bytes in C, 8192 in KernelConfig",
    ]),
    "byte order changed": (edit("    __u32 seq;", "    __be32 seq;"), [
        "struct imaptap_event.seq: __be32 in C, c_uint32 in Python",
    ]),
    "padding introduced": (edit("    __u64 seen;", "    __u8 flag;\n    __u64 seen;"), [
        "struct imaptap_counters: 7 bytes of implicit padding before seen",
        "struct imaptap_counters.seen: offset 8 in C, 0 in Python",
    ]),
    "struct renamed": (edit("struct imaptap_config {", "struct imaptap_settings {"), [
        "struct imaptap_config is mirrored but not in imaptap.h",
        "struct imaptap_settings has no mirror in abi.STRUCTS",
    ]),
    "define changed": (edit("#define IMAPTAP_MODE_WHOLE 2", "#define IMAPTAP_MODE_WHOLE 3"), [
        "#define IMAPTAP_MODE_WHOLE is 3 in C, 2 in Python",
    ]),
    "cap changed": (edit("#define IMAPTAP_WHOLE_CAP 65535", "#define IMAPTAP_WHOLE_CAP 0xffff0"), [
        "#define IMAPTAP_WHOLE_CAP is 1048560 in C, 65535 in Python",
    ]),
    "define added": (edit("#define IMAPTAP_MODE_WHOLE 2",
                          "#define IMAPTAP_MODE_WHOLE 2\n#define IMAPTAP_MODE_SOME 3"), [
        "#define IMAPTAP_MODE_SOME is neither mirrored nor declared kernel-only",
    ]),
    "define removed": (edit("#define IMAPTAP_MODE_NONE 1", ""), [
        "#define IMAPTAP_MODE_NONE is mirrored but not in imaptap.h",
    ]),
    "kernel-only define removed": (edit("#define IMAPTAP_MAX_EXT_HDRS 4", ""), [
        "#define IMAPTAP_MAX_EXT_HDRS is declared kernel-only but not in imaptap.h",
    ]),
}


@pytest.mark.parametrize("drift", DRIFTS, ids=list(DRIFTS))
def test_drift_in_the_header_is_reported(header_text, drift):
    alter, expected = DRIFTS[drift]
    reported = abi_differences(parse_header(alter(header_text)))
    missing = [line for line in expected if not any(r.startswith(line) for r in reported)]
    assert not missing, f"not reported: {missing}; reported: {reported}"


def test_drift_in_the_python_mirror_is_reported(header):
    class NarrowCounters(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in abi.COUNTER_NAMES]

    reported = abi_differences(header, structs={**abi.STRUCTS, "imaptap_counters": NarrowCounters},
                               mirrored={**abi.MIRRORED_DEFINES, "IMAPTAP_MODE_NONE": 7})
    assert "struct imaptap_counters.matched: __u64 in C, c_uint32 in Python" in reported
    assert "struct imaptap_counters.matched: offset 8 in C, 4 in Python" in reported
    assert "struct imaptap_counters: 48 bytes in C, 24 in NarrowCounters" in reported
    assert "#define IMAPTAP_MODE_NONE is 1 in C, 7 in Python" in reported


# --- the parser refuses what it does not read ----------------------------------------------------

MINIMAL = "#ifndef H\n#define H\n#define N 4\n{}\n#endif\n"


def test_a_minimal_header_parses():
    parsed = parse_header(MINIMAL.format("struct s {\n  __u8 a[N]; /* four */\n  __be16 b;\n};"))
    assert parsed == Header({"s": (CField("a", "__u8", 4), CField("b", "__be16", None))}, {"N": 4})


@pytest.mark.parametrize("body", [
    "struct s { int a; };",                       # a type whose width is the compiler's
    "struct s { __u8 *a; };",                     # a pointer
    "struct s { __u8 a : 3; };",                  # a bit field
    "struct s { __u8 a, b; };",                   # two declarators
    "struct s { __u8 a[M]; };",                   # an unknown array length
    "struct s { __u8 a[0]; };",                   # a flexible array
    "struct s { __u8 a; __u16 a; };",             # a name twice
    "struct s { struct t inner; };",              # a nested struct
    "union u { __u8 a; };",                       # a union
    "typedef __u32 word;",                        # a typedef
    "struct s { __u8 a; }",                       # no closing semicolon
    "struct s { __u8 a;",                         # no closing brace
    "struct s { };",                              # empty
    "struct { __u8 a; };",                        # anonymous
    "#define X (1 << 3)",                         # an expression
    "#define X",                                  # a flag without a value
    "#define N 5",                                # a define twice
    '#include "other.h"',                         # another header
    "#if N\n#endif",                              # a condition
    "/* unterminated",                            # a comment that never ends
], ids=lambda body: body.split("\n")[0][:30])
def test_c_the_parser_does_not_read_fails_loudly(body):
    with pytest.raises(HeaderError):
        parse_header(MINIMAL.format(body))


def test_a_header_without_its_include_guard_fails_loudly():
    with pytest.raises(HeaderError):
        parse_header("struct s { __u8 a; };\n")
    with pytest.raises(HeaderError):
        parse_header("#ifndef H\n#define H\nstruct s { __u8 a; };\n")
    with pytest.raises(HeaderError):
        parse_header("#ifndef H\nstruct s { __u8 a; };\n#endif\n")
    with pytest.raises(HeaderError):
        parse_header("#ifndef H\n#define H\n#endif\nstruct s { __u8 a; };\n")


def test_the_command_line_knows_as_many_live_workers_as_the_program_has_rings():
    from imaptap import cli  # its copy: cli imports nothing of capture/live, so replay starts fast

    assert cli.LIVE_MAX_WORKERS == abi.LIVE_MAX_WORKERS
    assert abi.ring_map(0) == abi.MAP_EVENTS and abi.ring_map(7) == b"events_7"
    bpf = (Path(abi.__file__).resolve().parents[2] / "bpf" / "imaptap.bpf.c").read_text()
    # one ring declared and one reserve case per worker the header allows
    for worker in range(1, abi.LIVE_MAX_WORKERS):
        assert f"BPF_RINGBUF_OUTPUT(events_{worker}, IMAPTAP_RING_PAGES);" in bpf
        assert f"return events_{worker}.ringbuf_reserve(size);" in bpf
    assert f"events_{abi.LIVE_MAX_WORKERS}" not in bpf
