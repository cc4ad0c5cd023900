"""Where the memory of an idle flow goes (``scripts/bench-flood --idle-breakdown``).

Two kinds of idle flow, each made ``n`` times in a fresh `FlowTable` with the replay's
`PayloadPolicy`, no sink asking for messages:

- ``syn``: a SYN and nothing after, what a SYN scan leaves (the README's bytes per idle flow);
- ``idle session``: a real Dovecot session of pcaps/idle.pcap up to the server's ``+ idling``
  (greeting, LOGIN, SELECT, IDLE): an IMAP client that waits for mail, as most open flows of a
  mail server do.  Each copy has a client address of its own.

Three views of the same flows:

1. tracemalloc, the Python heap allocated while the flows were made and still held, by the
   line that allocated it (and the function around that line), per flow: the ground truth of
   the README's figure;
2. the objects one flow holds and no other flow shares (found through gc.get_referents), by
   type, with sys.getsizeof: which objects they are.  It cannot see the attribute values that
   CPython 3.11 keeps beside an object instead of in a dict of its own (they are counted under
   tracemalloc's line that made the object), so its total is below the first;
3. the resident set size a child process grows by per flow (32,768 flows, the default
   ``--max-flows``), which adds what the allocators keep around the Python objects.

With ``--against CHECKOUT`` (`compare`), the first and third figures of this checkout's imaptap
and of another's, in interleaved rounds, with medians and their ratio: before and after a change.

Nothing here changes imaptap; it uses its public classes as the replay does.
"""

from __future__ import annotations

import ast
import collections
import functools
import gc
import json
import linecache
import os
import statistics
import subprocess
import sys
import tracemalloc
import types
from collections.abc import Callable, Iterable
from pathlib import Path

from imaptap_lab.checkout import PCAP_DIR, ROOT, USERSPACE
from imaptap_lab.rounds import per_round_ratios, rotated

#: Flows made per measurement: enough that the table's own dict (one slot per flow, doubling as
#: it grows) is spread over them as in a full table.
FLOWS = 10_000
#: Flows the child process makes for the resident set size: the default --max-flows.
RSS_FLOWS = 32_768
#: The session replayed up to its IDLE (pcaps/idle.pcap, scripts/make-captures).
IDLE_CAPTURE = PCAP_DIR / "idle.pcap"
#: The server's answer to IDLE: the segment that carries it is the last one replayed.
IDLE_CONTINUATION = b"+ idling"
#: Lines of the tracemalloc table, largest first; the rest are summed.
TOP_LINES = 25
KINDS = ("syn", "idle session")


def syn_segments(n: int) -> list:
    """``n`` SYNs from distinct addresses of 198.18.0.0/15 to one server."""
    from imaptap.segment import Segment, TcpFlag

    return [Segment(1.0, 4, f"198.18.{i >> 8 & 255}.{i & 255}", "192.0.2.20", 1024 + i, 143, i, 0,
                    int(TcpFlag.SYN), 0, b"") for i in range(n)]


def idle_session_segments(n: int) -> list:
    """``n`` copies of idle.pcap's session up to ``+ idling``, each with a client address of its own."""
    from imaptap.capture.replay import ReplayStats, open_capture
    from imaptap.segment import PayloadPolicy

    session = []
    with open_capture(str(IDLE_CAPTURE)) as reader:
        for seg in reader.segments({143}, PayloadPolicy(), ReplayStats()):
            if seg is None:
                continue
            session.append(seg)
            if seg.payload.startswith(IDLE_CONTINUATION):
                break
    if not session or not session[-1].payload.startswith(IDLE_CONTINUATION):
        raise SystemExit(f"{IDLE_CAPTURE}: no {IDLE_CONTINUATION!r} (scripts/make-captures remakes it)")
    client = session[0].src
    out = []
    for i in range(n):
        # as a capture hands them over: each flow's own address text and payload objects
        address = f"198.18.{i >> 8 & 255}.{i & 255}"
        for seg in session:
            fresh = seg._replace(payload=bytes(bytearray(seg.payload)), tail=bytes(bytearray(seg.tail)))
            out.append(fresh._replace(src=address) if seg.src == client else fresh._replace(dst=address))
    return out


SEGMENTS: dict[str, Callable[[int], list]] = {"syn": syn_segments, "idle session": idle_session_segments}


def new_table(n: int):
    """A flow table with the replay's policy, room for ``n`` flows and no message sink."""
    from imaptap.flows import FlowTable
    from imaptap.segment import PayloadPolicy

    return FlowTable({143}, PayloadPolicy(), max_flows=n)


# --- 1: tracemalloc, by line ---------------------------------------------------------------------

@functools.cache
def _functions(filename: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function and class in a source file."""
    try:
        tree = ast.parse(Path(filename).read_text())
    except (OSError, SyntaxError):
        return []
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                out.append((child.lineno, child.end_lineno or child.lineno, name))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return out


def enclosing(filename: str, lineno: int) -> str:
    """The innermost function or class around a line, or "<module>"."""
    inside = [(first, name) for first, last, name in _functions(filename) if first <= lineno <= last]
    return max(inside)[1] if inside else "<module>"


def short(filename: str) -> str:
    """A file name relative to imaptap's sources where it is one of them."""
    try:
        return str(Path(filename).relative_to(USERSPACE))
    except ValueError:
        return Path(filename).name


def by_line(kind: str, n: int = FLOWS) -> tuple[list[dict], float]:
    """(one row per allocating line, largest first, with bytes and blocks per flow; bytes per flow
    in all) of ``n`` idle flows of ``kind``."""
    segments = SEGMENTS[kind](n)
    table = new_table(n)
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    for seg in segments:
        table.add(seg)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    own = [tracemalloc.Filter(False, tracemalloc.__file__)]   # the first snapshot itself
    before, after = before.filter_traces(own), after.filter_traces(own)
    if len(table.flows) != n:
        raise SystemExit(f"{kind}: {len(table.flows)} flows open, not {n}")
    rows = []
    for stat in after.compare_to(before, "lineno"):
        if not stat.size_diff:
            continue
        frame = stat.traceback[0]
        rows.append({"line": f"{short(frame.filename)}:{frame.lineno}", "function": enclosing(frame.filename,
                                                                                            frame.lineno),
                     "code": linecache.getline(frame.filename, frame.lineno).strip(),
                     "bytes per flow": stat.size_diff / n, "blocks per flow": stat.count_diff / n})
    rows.sort(key=lambda r: -r["bytes per flow"])
    del table
    return rows, sum(r["bytes per flow"] for r in rows)


def by_function(rows: Iterable[dict]) -> list[tuple[str, float]]:
    """The rows of `by_line` summed by the function around each line, largest first."""
    totals: collections.Counter[str] = collections.Counter()
    for row in rows:
        totals[row["function"]] += row["bytes per flow"]
    return totals.most_common()


# --- 2: the objects of one flow, by type --------------------------------------------------------

_SHARED_TYPES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
                 types.MethodDescriptorType, types.WrapperDescriptorType, types.GetSetDescriptorType,
                 types.MemberDescriptorType)


def reachable(root: object, stop: set[int]) -> dict[int, object]:
    """Objects reachable from ``root`` through gc.get_referents, not passing through ``stop``
    (ids) nor through classes, modules, functions and code."""
    seen: dict[int, object] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or id(obj) in stop or isinstance(obj, _SHARED_TYPES):
            continue
        seen[id(obj)] = obj
        todo.extend(gc.get_referents(obj))
    return seen


def by_type(kind: str, n: int = FLOWS) -> tuple[list[tuple[str, int, int]], dict]:
    """(per type: name, objects and sys.getsizeof bytes that one flow of ``kind`` holds alone,
    largest first; the table's and the policy's per-flow entries), from a table of ``n`` flows."""
    table = new_table(n)
    for seg in SEGMENTS[kind](n):
        table.add(seg)
    flows = list(table.flows.values())
    one, other = flows[n // 2], flows[n // 2 + 1]
    # The table (and through the policy every flow) is reached from a flow's session (its policy):
    # stop there, then drop what a second flow reaches too (enums, interned names, the table).
    stop = {id(table), id(table.flows), id(table.policy), id(table.policy.modes), id(table.stats)}
    mine = reachable(one, stop)
    theirs = reachable(other, stop)
    held = [obj for key, obj in mine.items() if key not in theirs]
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for obj in held:
        name = type(obj).__qualname__
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
    rows = sorted(((name, counts[name], sizes[name]) for name in counts), key=lambda r: -r[2])
    shared = {"FlowTable.flows, per flow": sys.getsizeof(table.flows) / n,
              "PayloadPolicy.modes, per flow": sys.getsizeof(table.policy.modes) / n,
              "flows with a policy entry": len(table.policy.modes)}
    return rows, shared


# --- 3: resident set size -----------------------------------------------------------------------

RSS_CHILD = r'''
import gc, json, sys
from imaptap_lab import flow_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

kind, n = sys.argv[1], int(sys.argv[2])
segments = flow_memory.SEGMENTS[kind](n)
table = flow_memory.new_table(n)
gc.collect()
before = rss()
for seg in segments:
    table.add(seg)
gc.collect()
print(json.dumps({"flows": len(table.flows), "bytes": rss() - before}))
'''


def rss_per_flow(kind: str, n: int = RSS_FLOWS) -> float:
    """Resident bytes a fresh process grows by per idle flow of ``kind``, ``n`` of them."""
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, kind, str(n)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    return result["bytes"] / result["flows"]


# --- the report ---------------------------------------------------------------------------------

def analyzer_compiled() -> bool:
    """The flow table this process imported is mypyc's build, not the source."""
    import imaptap.flows

    return not str(imaptap.flows.__file__).endswith(".py")


def report(kinds: Iterable[str] = KINDS) -> dict:
    """Every view of every kind, printed as tables and returned."""
    out = {}
    if analyzer_compiled():
        print("the analyzer is compiled (mypyc): its allocations have no Python line and are counted under"
              " the caller's; IMAPTAP_PURE_PYTHON=1 shows them line by line")
    for kind in kinds:
        rows, total = by_line(kind)
        types_held, shared = by_type(kind)
        rss = rss_per_flow(kind)
        out[kind] = {"tracemalloc bytes per flow": total, "lines": rows, "functions": by_function(rows),
                     "types": types_held, "shared structures": shared, "RSS bytes per flow": rss}
        print(f"\n## one idle flow, {kind}: {total:,.0f} bytes of Python heap (tracemalloc, {FLOWS:,} flows);"
              f" resident set {rss:,.0f} bytes per flow ({RSS_FLOWS:,} flows in a fresh process)")
        print("\n  by allocating line (bytes, blocks per flow):")
        for row in rows[:TOP_LINES]:
            print(f"  {row['bytes per flow']:7.0f} {row['blocks per flow']:5.2f}  {row['line']:32} {row['function']:28}"
                  f" {row['code'][:70]}")
        rest = rows[TOP_LINES:]
        if rest:
            print(f"  {sum(r['bytes per flow'] for r in rest):7.0f} {sum(r['blocks per flow'] for r in rest):5.2f}"
                  f"  ({len(rest)} more lines)")
        print("\n  by function around the line:")
        for name, size in by_function(rows):
            print(f"  {size:7.0f}  {name}")
        walked = sum(size for _, _, size in types_held)
        print(f"\n  objects one flow holds alone, by type (sys.getsizeof; {walked:,} bytes against"
              f" tracemalloc's {total:,.0f}: each counts what the other cannot see):")
        for name, count, size in types_held:
            print(f"  {size:7,} {count:4}  {name}")
        for what, value in shared.items():
            print(f"  {what}: {value:,.0f}")
    return out


# --- two checkouts, interleaved -----------------------------------------------------------------

#: Rounds of `compare`: tracemalloc's figure is the same every round, the resident set moves by
#: a few percent with what the allocator had before.
COMPARE_ROUNDS = 5

TOTALS_CHILD = r'''
import json, sys
from imaptap_lab import flow_memory

kind, n, rss_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
_, heap = flow_memory.by_line(kind, n)
print(json.dumps({"heap": heap, "rss": flow_memory.rss_per_flow(kind, rss_n)}))
'''


def totals_with(userspace: Path, kind: str, n: int = FLOWS, rss_n: int = RSS_FLOWS) -> dict[str, float]:
    """Heap (tracemalloc, ``n`` flows) and resident bytes (``rss_n`` flows) per idle flow of ``kind``
    with the imaptap in ``userspace``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(userspace), str(ROOT / "lab")]))
    out = subprocess.run([sys.executable, "-c", TOTALS_CHILD, kind, str(n), str(rss_n)], capture_output=True,
                         text=True, check=True, env=env)
    return json.loads(out.stdout)


def compare(against: Path, rounds: int = COMPARE_ROUNDS, kinds: Iterable[str] = KINDS, n: int = FLOWS,
            rss_n: int = RSS_FLOWS) -> dict:
    """Bytes per idle flow of this checkout's imaptap and of the one in ``against``, in rotated
    rounds: per kind and figure, each arm's median [lowest-highest] and the median per-round ratio."""
    arms = {"this checkout": USERSPACE, str(against): against / "userspace"}
    if not (arms[str(against)] / "imaptap").is_dir():
        raise SystemExit(f"{against}: no userspace/imaptap there")
    out: dict = {}
    for kind in kinds:
        samples: dict[str, dict[str, list[float]]] = {arm: {"heap": [], "rss": []} for arm in arms}
        for r in range(rounds):
            for arm in rotated(list(arms), r):
                figures = totals_with(arms[arm], kind, n, rss_n)
                for what in ("heap", "rss"):
                    samples[arm][what].append(figures[what])
        mine, theirs = samples["this checkout"], samples[str(against)]
        out[kind] = {"arms": samples, "ratio": {what: statistics.median(per_round_ratios(mine[what], theirs[what]))
                                                for what in ("heap", "rss")}}
        print(f"\n## one idle flow, {kind}: bytes per flow, median [lowest-highest] of {rounds} interleaved rounds")
        print(f"  {'imaptap from':40} {'Python heap (tracemalloc)':>28} {'resident set':>26}")
        for arm, figures in samples.items():
            cells = [f"{statistics.median(v):,.0f} [{min(v):,.0f}-{max(v):,.0f}]" for v in figures.values()]
            print(f"  {arm:40} {cells[0]:>28} {cells[1]:>26}")
        print(f"  {'this checkout / ' + str(against):40} {out[kind]['ratio']['heap']:>28.3f}"
              f" {out[kind]['ratio']['rss']:>26.3f}")
    return out
