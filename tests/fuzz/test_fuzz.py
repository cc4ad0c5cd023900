"""The short fuzzing pass CI can afford: every seed, deterministic mutations, and 20 s of atheris.

The long runs are ``scripts/fuzz TARGET --seconds N``; inputs that once crashed are kept in
tests/fuzz/crashers/TARGET/ and replayed here.
"""

from __future__ import annotations

import glob
import os
import random
import re
import subprocess
import sys

import pytest

from imaptap_lab.fuzz_seeds import SEEDS
from imaptap_lab.fuzz_targets import TARGETS
from testenv import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))

#: Mutated inputs per target; ~2,000 keeps both targets under 10 s on a 2-core machine.
MUTATIONS = 2000
#: Seconds of coverage-guided fuzzing per target in CI.
ATHERIS_SECONDS = 20
#: Bytes that steer the parsers: line ends, literal marks, the operation bytes of imap_stream.
_INTERESTING = [b"\r\n", b"\n", b"{", b"}", b"{4294967295}\r\n", b"{5+}\r\n", b"~{3}", b"\x00", b"\xff",
                b" LOGIN u p\r\n", b"a STARTTLS\r\n", b"a COMPRESS DEFLATE\r\n", b"a OK\r\n", b"* OK\r\n",
                b"\x60\x00\x00\x10\x00", b"\x61\x10\x10\xff\xff", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to eight random edits of ``data``: flips, overwrites, inserts, deletes, splices."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            j = min(i, len(b) - 1)
            b[j] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            j = min(i, len(b) - 1)
            b[j] = rng.choice((0, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:
            b[i:i] = rng.choice(_INTERESTING)
        elif op == 3:
            del b[i : i + rng.randint(1, 64)]
        elif op == 4:
            other = rng.choice(pool)
            if other:
                a = rng.randrange(len(other))
                b[i:i] = other[a : a + rng.randint(1, 512)]
        else:
            b = b[:i]  # truncated, as a cut file or an interrupted stream
    return bytes(b)


@pytest.fixture(scope="module", params=sorted(TARGETS))
def target(request):
    return request.param, TARGETS[request.param], SEEDS[request.param]()


def test_seeds(target):
    name, run, seeds = target
    assert seeds, f"no seeds for {name}: are pcaps/ and the public captures there?"
    for data in seeds:
        run(data)


def test_mutations(target):
    name, run, seeds = target
    rng = random.Random(f"imaptap-fuzz-{name}")
    pool = seeds + [b""]
    for _ in range(MUTATIONS):
        data = mutate(rng, rng.choice(pool), pool)
        try:
            run(data)
        except Exception:
            print(f"{name} failed on a mutated input: {data[:200]!r}... ({len(data)} bytes)")
            raise


def test_crashers(target):
    """Inputs that once crashed a target stay fixed."""
    name, run, _ = target
    for path in sorted(glob.glob(os.path.join(HERE, "crashers", name, "*"))):
        with open(path, "rb") as f:
            run(f.read())


def test_atheris(tmp_path):
    """Both targets under libFuzzer at once (one per core), no crash, hang or out-of-memory."""
    pytest.importorskip("atheris")
    # A fresh corpus each time: out/fuzz-corpus grows with every long run and would slow CI.
    procs = {
        name: subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "fuzz"), name,
                                "--seconds", str(ATHERIS_SECONDS), "--corpus", str(tmp_path / name)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name in sorted(TARGETS)
    }
    for proc in procs.values():
        out, _ = proc.communicate(timeout=ATHERIS_SECONDS + 120)
        assert proc.returncode == 0, out
        assert re.search(r"^crashes:\s+0$", out, re.M), out
        assert re.search(r"^hangs:\s+0$", out, re.M), out
        runs = re.search(r"^executions:\s+(\d+)$", out, re.M)
        assert runs and int(runs.group(1)) > 0, out


#: What the fuzzer's child does before libFuzzer starts, then which loader each hot module got.
_INSTRUMENTED_PROBE = """
import os, sys
os.environ["IMAPTAP_PURE_PYTHON"] = "1"
import atheris
from imaptap_lab.fuzz import INSTRUMENTED, TARGETS_MODULE
with atheris.instrument_imports(include=INSTRUMENTED):
    import importlib
    importlib.import_module(TARGETS_MODULE)
for name in ("imaptap.imap.session", "imaptap.imap.parse", "imaptap.flows", "imaptap.capture.replay"):
    print(name, type(sys.modules[name].__loader__).__name__)
"""


def test_the_fuzzer_instruments_the_plain_source_even_beside_a_compiled_build():
    """Every hot module is loaded by atheris's instrumenting loader, not passed to it uninstrumented:
    the plain-source switch once put its finder in front of atheris's and the fuzzer ran blind."""
    pytest.importorskip("atheris")
    out = subprocess.run([sys.executable, "-c", _INSTRUMENTED_PROBE], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    loaders = dict(line.split() for line in out.splitlines())
    assert len(loaders) == 4
    assert set(loaders.values()) == {"AtherisSourceFileLoader"}, loaders
