"""The metrics of every capture in pcaps/ against pcaps/facts.json (what the sessions did).

facts.json was written by the script that drove the sessions, not from imaptap's output: the
numbers of commands, logins by outcome and mechanism, cleartext credentials, STARTTLS outcomes
and flows the metrics give must be exactly the sessions'.  Each capture is replayed with the
kernel's cut and whole.
"""

import collections
import json
import os

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from imaptap.output.metrics import MetricsSink, command_label, mechanism_label  # noqa: E402
from imaptap.pipeline import Pipeline, ReplaySource  # noqa: E402
from testenv import OWN_PCAPS  # noqa: E402

FACTS = json.load(open(os.path.join(OWN_PCAPS, "facts.json")))


def scrape(sink: MetricsSink) -> dict:
    """family sample name -> [(labels, value)]."""
    out = collections.defaultdict(list)
    for family in text_string_to_metric_families(generate_latest(sink.registry).decode()):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def by(samples, key: str, **where) -> dict:
    """The values summed by one label, over the samples whose labels include ``where``."""
    out: collections.Counter = collections.Counter()
    for labels, v in samples:
        if all(labels.get(k) == w for k, w in where.items()) and v:
            out[labels[key]] += v
    return dict(out)


@pytest.mark.parametrize("snap", [256, 65535])
@pytest.mark.parametrize("name", sorted(FACTS))
def test_metrics_give_the_numbers_of_the_sessions(name, snap):
    spec = FACTS[name]
    sink = MetricsSink()
    Pipeline(ReplaySource(os.path.join(OWN_PCAPS, name), spec["ports"], snaplen=snap), [sink]).run()
    got = scrape(sink)
    imap = [f for f in spec["flows"] if f.get("imap", True)]  # a web server on the port is not
    flows = imap

    commands = collections.Counter(command_label(c) for f in flows for c in f["commands"])
    assert by(got["imaptap_commands_total"], "command") == dict(commands)

    success: collections.Counter = collections.Counter()
    failure: collections.Counter = collections.Counter()
    unknown: collections.Counter = collections.Counter()
    for f in flows:
        if f["auth_mechanism"] is None:
            continue
        mech = mechanism_label(f["auth_mechanism"])
        success[mech] += f["login_ok"] is True
        failure[mech] += f["login_failures"]
        unknown[mech] += f["login_ok"] is None  # no answer seen: a one-sided capture, or it came inside TLS
    assert by(got["imaptap_logins_total"], "mechanism", outcome="success") == +success
    assert by(got["imaptap_logins_total"], "mechanism", outcome="failure") == +failure
    assert by(got["imaptap_logins_total"], "mechanism", outcome="unknown") == +unknown

    (cleartext,) = got["imaptap_cleartext_credentials_total"]
    assert cleartext[1] == sum(f["cleartext_credentials"] for f in flows)

    tls = collections.Counter({"completed": "completed", "refused": "refused", "offered": "offered_unused"}
                              [f["starttls"]] for f in flows if f["starttls"] != "none")
    assert by(got["imaptap_starttls_total"], "outcome") == dict(tls)

    others = len(spec["flows"]) - len(imap)
    ended = {"true": len(imap), "false": others}
    assert by(got["imaptap_flows_ended_total"], "imap") == {k: n for k, n in ended.items() if n}
    if others:
        assert by(got["imaptap_anomalies_total"], "name") == {}  # nothing of the web server's bytes
    (active,) = got["imaptap_flows_active"]
    assert active[1] == 0
    # the reader's own counts: every segment it gave, the analyzer took
    (segments,) = got["imaptap_replay_segments_total"]
    (analysed,) = got["imaptap_analyzer_segments_total"]
    assert segments[1] == analysed[1] > 0
