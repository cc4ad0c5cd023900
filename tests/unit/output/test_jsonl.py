import io
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from imaptap.imap.session import Kind, Message, Side
from imaptap.output.jsonl import JsonlWriter, endpoint, message_record
from imaptap.flows import FlowTable
from imaptap.testing import conversation

text = st.one_of(st.none(), st.text(max_size=40))
messages = st.builds(
    Message,
    ts=st.floats(0, 2e9, allow_nan=False),
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


@settings(max_examples=300, deadline=None)
@given(messages)
def test_fast_message_line_equals_the_record(msg):
    out = io.StringIO()
    writer = JsonlWriter(out)
    writer.message(FLOW, msg)
    writer.flush()
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == message_record(FLOW, msg)


def test_endpoint_forms():
    assert endpoint(("192.0.2.1", 143)) == "192.0.2.1:143"
    assert endpoint(("2001:db8::1", 143)) == "[2001:db8::1]:143"


def test_control_characters_are_escaped_in_json():
    out = io.StringIO()
    writer = JsonlWriter(out)
    writer.message(FLOW, Message(1.0, Side.CLIENT, Kind.REQUEST, tag="a", command="LOGIN", args="\x1b[31mx\x00 ***"))
    writer.flush()
    assert "\x1b" not in out.getvalue() and "\\u001b" in out.getvalue()


def test_fast_flow_line_equals_the_encoded_record():
    import glob
    import os

    from imaptap.capture.replay import ReplayStats, open_capture
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
            table.close_all("end")
    assert len(flows) > 20
    for flow in flows:
        assert flow_line(flow) == _dumps(flow_record(flow))
