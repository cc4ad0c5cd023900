import contextlib
import glob
import io
import json
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imaptap.facts import FlowFacts, flow_facts
from imaptap.flows import FlowTable
from imaptap.imap.session import Kind, Message, Side
from imaptap.output import jsonl
from imaptap.output.jsonl import JsonlWriter, _dumps, endpoint, flow_line, message_record
from imaptap.testing import conversation
from testenv import OWN_PCAPS, PUBLIC_PCAPS, accelerator, accelerator_params, public_pcap_paths

text = st.one_of(st.none(), st.text(max_size=40))
messages = st.builds(
    Message,
    ts=st.one_of(st.floats(0, 2e9, allow_nan=False),
                 st.builds(lambda s, us: s + us / 1e6, st.integers(0, 2**33), st.integers(0, 999_999))),
    side=st.sampled_from(Side),
    kind=st.sampled_from(Kind),
    tag=text, command=text, args=text, status=text, code=text, text=text,
    latency_ms=st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False)),
    literals=st.lists(st.integers(0, 1 << 40), max_size=3).map(tuple),
    number=st.one_of(st.none(), st.integers(0, 1 << 32)),
    truncated=st.booleans(),
)


def a_flow(client=("2001:db8::1", 4000)):
    """A real Flow object, as the table hands it to outputs."""
    ended = []
    table = FlowTable({143}, on_flow_end=ended.append)
    for seg in conversation([("s", b"* OK hi\r\n")], client=client):
        table.add(seg)
    return ended[0]


FLOW = a_flow()


def _formatter(accelerated):
    """JsonlWriter with the C formatter (where built) or its Python path."""
    return accelerator(jsonl, "_jsonfast", accelerated)


PATHS = accelerator_params(jsonl, "_jsonfast")


@pytest.mark.parametrize("accelerated", PATHS)
@settings(max_examples=300, deadline=None)
@given(msgs=st.lists(messages, min_size=1, max_size=4))
def test_message_lines_are_what_json_encodes(accelerated, msgs):
    """Byte for byte what json's encoder makes of the record, through two sinks of one flow,
    with text of any kind (control characters, accents, astral planes) and
    time stamps repeated (formatted once) or not."""
    with _formatter(accelerated):
        out = io.StringIO()
        writer = JsonlWriter(out)
        sink, other_sink = writer.sink(FLOW), writer.sink(FLOW)
        for msg in msgs:
            other_sink(msg)
            sink(msg)
            sink(msg._replace(latency_ms=msg.latency_ms))  # the same time again
        writer.flush()
    expected = "".join(3 * (_dumps(message_record(FLOW, msg)) + "\n") for msg in msgs)
    assert out.getvalue() == expected


@pytest.mark.skipif(jsonl._jsonfast is None, reason="C formatter not built")
@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.builds(lambda s, us: s + us / 1e6, st.integers(0, 2**34), st.integers(0, 999_999)),
                 st.builds(lambda s, ns: s + ns / 1e9, st.integers(0, 2**33), st.integers(0, 999_999_999)),
                 st.floats(allow_nan=True, allow_infinity=True),
                 st.floats(2**32 - 1, 2**33 + 1),
                 st.integers(0, 40).map(lambda k: math.nextafter(2.0**k, 0.0)),
                 st.builds(lambda us: us / 1e6, st.integers(0, 1_000_001)),  # under a second
                 st.floats(0, 2000).map(lambda ms: round(ms, 3)),  # latencies as the session rounds them
                 st.sampled_from([1e-4, math.nextafter(1e-4, 0.0), 0.0, -0.0, 5e-5, 0.999999, 1.0])))
def test_time_stamps_are_formatted_as_repr(x):
    """ts_repr's short cut for microsecond stamps gives repr's text, and everything else is repr."""
    assert jsonl._jsonfast.ts_repr(x) == repr(x)


def test_c_formatter_is_built_in_ci():
    """scripts/setup installs a C compiler and Python's headers: CI must test the C path too."""
    if os.environ.get("CI"):
        assert jsonl._jsonfast is not None


def _replay_text(path, args):
    from imaptap import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(["-r", path, "--json", "-", *args])
    return code, [line for line in out.getvalue().splitlines(keepends=True) if '"type":"stats"' not in line]


with open(os.path.join(OWN_PCAPS, "facts.json")) as _facts:
    #: Captures of another protocol on a watched port (and not on 143): no message to compare.
    WITHOUT_IMAP = {name for name, spec in json.load(_facts).items()
                    if not any(f.get("imap", True) for f in spec["flows"])}


@pytest.mark.skipif(jsonl._jsonfast is None, reason="C formatter not built")
@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(OWN_PCAPS, "*.pcap*")))
                                        + public_pcap_paths(),
                         ids=os.path.basename)
def test_c_and_python_formatters_write_the_same_bytes(path):
    """Every capture, whole payloads (so COMPRESS flows are inflated and parsed too)."""
    with _formatter(True):
        fast = _replay_text(path, ["-s", "65535", "--port", "143", "--port", "10143"])
    with _formatter(False):
        slow = _replay_text(path, ["-s", "65535", "--port", "143", "--port", "10143"])
    assert fast == slow
    assert any('"type":"message"' in line for line in fast[1]) or path.startswith(PUBLIC_PCAPS) \
        or os.path.basename(path) in WITHOUT_IMAP


def test_endpoint_forms():
    assert endpoint(("192.0.2.1", 143)) == "192.0.2.1:143"
    assert endpoint(("2001:db8::1", 143)) == "[2001:db8::1]:143"


def test_control_characters_are_escaped_in_json():
    out = io.StringIO()
    writer = JsonlWriter(out)
    writer.sink(FLOW)(Message(1.0, Side.CLIENT, Kind.REQUEST, tag="a", command="LOGIN", args="\x1b[31mx\x00 ***"))
    writer.flush()
    assert "\x1b" not in out.getvalue() and "\\u001b" in out.getvalue()


@pytest.mark.parametrize("accelerated", PATHS)
def test_fast_flow_line_equals_the_encoded_record(accelerated):
    import glob
    import os

    from imaptap.capture.replay import ReplayStats, open_capture
    from imaptap.facts import flow_facts
    from imaptap.output.jsonl import _dumps, flow_line, flow_record
    from imaptap.segment import PayloadPolicy

    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(glob.glob(os.path.join(here, "..", "..", "..", "pcaps", "*.pcap*")))
    assert paths
    flows = [a_flow(), a_flow(("192.0.2.7", 5000))]
    for path in paths:
        for snaplen in (256, 65535):
            table = FlowTable({143}, on_flow_end=flows.append)
            table.policy = policy = PayloadPolicy(snaplen, 128)
            reader = open_capture(path)
            try:
                for seg in reader.segments({143}, policy, ReplayStats()):
                    table.add(seg)
            finally:
                reader.close()
            table.close_all()
    assert len(flows) > 20
    with _formatter(accelerated):
        for flow in flows:
            assert flow_line(flow_facts(flow)) == _dumps(flow_record(flow))


class _Named(str):
    """A str subclass, as a StrEnum member is (findings are `Finding`s)."""


odd_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=12)
odd_value = {
    "int": st.one_of(st.integers(-(1 << 70), 1 << 70), st.booleans()),
    "float": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(0, 1 << 40)),
    "str": st.one_of(odd_text, odd_text.map(_Named)),
    "str | None": st.one_of(st.none(), odd_text, odd_text.map(_Named)),
    "bool": st.one_of(st.booleans(), st.none()),
    "bool | None": st.one_of(st.booleans(), st.none()),
    "tuple[str, ...]": st.one_of(st.lists(st.one_of(odd_text, odd_text.map(_Named)), max_size=3).map(tuple),
                                 st.lists(odd_text, max_size=2)),
    "dict[str, int]": st.dictionaries(st.one_of(odd_text, odd_text.map(_Named)),
                                      st.one_of(st.integers(-(1 << 70), 1 << 70), st.booleans()), max_size=3),
    "dict[str, str | None] | None": st.one_of(st.none(), st.dictionaries(odd_text, st.one_of(st.none(), odd_text),
                                                                          max_size=2)),
}


@pytest.mark.skipif(jsonl._jsonfast is None, reason="C formatter not built")
@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_c_flow_line_writes_any_value_as_the_python_one(data):
    """Every field's value of every type it may hold, and some it should not (subclasses, None,
    a list for a tuple, floats that JSON cannot write plainly, astral and lone surrogate
    characters): the C line is the Python line, or both fail alike."""
    values = []
    for name, hint in FlowFacts.__annotations__.items():
        strategy = odd_value.get(jsonl._declared(hint))
        values.append(data.draw(strategy, label=name) if strategy is not None else getattr(FACTS, name))
    facts = FlowFacts(*values)
    prefix = data.draw(st.sampled_from([jsonl._FLOW_PREFIX, '{"type":"flow_update","ts":1.5,']))
    with _formatter(False):
        python = _outcome(flow_line, facts, prefix)
    assert _outcome(flow_line, facts, prefix) == python


def _outcome(call, *args):
    try:
        return call(*args)
    except Exception as exc:  # noqa: BLE001 - the kind of failure is what is compared
        return type(exc)


FACTS = flow_facts(FLOW)


class _FullDisk(io.StringIO):
    def __init__(self, room):
        super().__init__()
        self.room = room
        self.writes = 0

    def write(self, text):
        self.writes += 1
        if len(self.getvalue()) + len(text) > self.room:
            raise OSError(28, "No space left on device")
        return super().write(text)


@pytest.mark.parametrize("accelerated", PATHS)
def test_a_failed_write_is_one_output_error_then_nothing(accelerated):
    """The first failed write raises OutputError (the CLI prints it in one line); what comes
    after is dropped rather than tried again, so the flows still being closed raise nothing."""
    from imaptap.output import OutputError

    with _formatter(accelerated):
        out = _FullDisk(room=100_000)
        writer = JsonlWriter(out, "out.jsonl")
        sink = writer.sink(FLOW)
        msg = Message(1.5, Side.SERVER, Kind.UNTAGGED, command="FETCH", args="(UID 1)", number=1)
        with pytest.raises(OutputError, match="^cannot write out.jsonl: No space left on device$"):
            for _ in range(10_000):
                sink(msg)
        writes = out.writes
        for _ in range(1_000):
            sink(msg)
        writer.flow_end(flow_facts(FLOW))
        writer.flush()
    assert out.writes == writes and isinstance(writer.failed, OSError)
    assert out.getvalue().endswith("}\n")
