"""The analyzer compiled with mypyc (setup.py's COMPILED) against its plain source, the
reference: the same bytes on every capture, the pure path really pure, the build current."""

import ast
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from testenv import IN_CI, OWN_PCAPS, ROOT, public_pcap_paths

#: Option sets every capture is replayed with (those of CONTRIBUTING's byte-identity check).
OPTION_SETS = [[], ["--flows-only"], ["-s", "65535"], ["-s", "40", "--tail", "0"],
               ["--port", "143", "--port", "10143"],
               ["--port", "10143", "--port", "143", "-s", "65535", "--max-flows", "3", "--idle-timeout", "5"]]
#: The benchmark's captures (scripts/bench-replay makes them in out/), where they were made:
#: large, so with the default options and --flows-only only.
BENCH_CAPTURES = sorted(glob.glob(os.path.join(ROOT, "out", "bench-replay-*.pcap")))
BENCH_OPTION_SETS = [[], ["--flows-only"]]


def _compiled_sources() -> list[str]:
    """setup.py's COMPILED (read, not run: running it would build)."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["COMPILED"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no COMPILED list")


COMPILED = _compiled_sources()
COMPILED_MODULES = ["imaptap." + m.removesuffix(".py").replace("/", ".") for m in COMPILED]


def _origin(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    return spec.origin


def _built() -> list[str]:
    return [m for m in COMPILED_MODULES if not _origin(m).endswith(".py")]


def _env(pure: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "userspace"))
    env.pop("IMAPTAP_PURE_PYTHON", None)
    if pure:
        env["IMAPTAP_PURE_PYTHON"] = "1"
    return env


def test_compiled_in_ci():
    """scripts/setup builds the compiled modules where mypy is installed (the test extras): CI
    must test them."""
    if IN_CI:
        assert _built() == COMPILED_MODULES


def test_compiled_modules_are_built_from_the_current_source():
    """A compiled module older than its .py runs old code: rebuild (setup.py build_ext --inplace)."""
    stale = [m for m in _built()
             if os.path.getmtime(_origin(m)) < os.path.getmtime(_origin(m).rsplit(".", 2)[0] + ".py")]
    assert not stale, f"compiled before their source changed: {stale}; run setup.py build_ext --inplace"


def test_pure_python_imports_every_module_from_its_source():
    """IMAPTAP_PURE_PYTHON=1: the compiled modules and the C accelerators are passed over."""
    code = ("import importlib, json, sys\n"
            "import imaptap.cli, imaptap.capture.replay as r, imaptap.output.jsonl as j\n"
            "mods = [importlib.import_module(m) for m in sys.argv[1:]]\n"
            "print(json.dumps([[m.__file__ for m in mods], r._pcapfast is None, j._jsonfast is None]))")
    out = subprocess.run([sys.executable, "-c", code, *COMPILED_MODULES], env=_env(pure=True), check=True,
                         capture_output=True, text=True).stdout
    files, no_pcapfast, no_jsonfast = json.loads(out)
    assert [f for f in files if not f.endswith(".py")] == [] and no_pcapfast and no_jsonfast


def _replays() -> list[tuple[str, list[str]]]:
    own = sorted(glob.glob(os.path.join(OWN_PCAPS, "*.pcap")))
    public = [p for p in public_pcap_paths() if isinstance(p, str)]
    return ([(path, opts) for path in own + public for opts in OPTION_SETS]
            + [(path, opts) for path in BENCH_CAPTURES for opts in BENCH_OPTION_SETS])


def _outputs(tmp_path, pure: bool, replays) -> list[bytes]:
    """Every replay's JSON Lines, run by one process (this file as a script), "seconds" removed."""
    out = tmp_path / ("pure" if pure else "compiled")
    out.mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(replays))
    env = _env(pure)
    env["PYTHONPATH"] += os.pathsep + os.path.dirname(os.path.dirname(__file__))  # testenv, imported above
    subprocess.run([sys.executable, __file__, str(plan), str(out)], env=env, check=True, stdin=subprocess.DEVNULL)
    return [(out / f"{i}.jsonl").read_bytes() for i in range(len(replays))]


@pytest.mark.skipif(not _built(), reason="mypyc's modules not built (setup.py build_ext --inplace)")
@pytest.mark.parametrize("public", public_pcap_paths("ndpi/imap.pcap"), ids=["with-third-party-captures"])
def test_compiled_and_pure_python_write_the_same_bytes(tmp_path, public):
    """Every capture of pcaps/, the third-party ones and the benchmark's, with six option sets:
    the compiled analyzer (and the C accelerators) write exactly what the plain source does."""
    replays = _replays()
    compiled = _outputs(tmp_path, False, replays)
    pure = _outputs(tmp_path, True, replays)
    differ = [f"{os.path.basename(path)} {' '.join(opts)}"
              for (path, opts), a, b in zip(replays, compiled, pure, strict=True) if a != b]
    assert not differ, f"compiled and pure output differ: {differ}"
    assert sum(map(len, pure)) > 0 and all(b'"type":"stats"' in b for b in pure)


def _main(plan_path: str, out_dir: str) -> None:
    """Run every (capture, options) of the plan through the CLI in this process."""
    import contextlib
    import io
    import re

    from imaptap import cli

    with open(plan_path) as f:
        plan = json.load(f)
    for i, (path, opts) in enumerate(plan):
        out = os.path.join(out_dir, f"{i}.jsonl")
        with contextlib.redirect_stderr(io.StringIO()):
            cli.main(["-r", path, "--json", out, *opts])
        with open(out, "rb") as f:
            text = re.sub(rb',"seconds":[0-9.e+-]+', b"", f.read())
        with open(out, "wb") as f:
            f.write(text)


if __name__ == "__main__":
    _main(*sys.argv[1:])
