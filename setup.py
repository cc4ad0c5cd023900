"""Builds the optional accelerators of the replay and the JSON output; everything else is in
pyproject.toml.

- C: `_pcapfast` (capture reading) and `_jsonfast` (message lines). optional=True: without a
  compiler or Python headers the build goes on without them.
- mypyc: the analyzer's hot modules (`COMPILED`) compiled from their own, unchanged source,
  where mypyc (it comes with mypy, a test extra) is importable when this runs; `scripts/setup`
  builds them in place. Without it, or with IMAPTAP_MYPYC=0, they stay plain Python.

Every accelerator is optional and gives the same output: IMAPTAP_PURE_PYTHON=1 runs the plain
source, the reference (README "Figures" measures both)."""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

#: The modules mypyc compiles: those that hold a replay's time per segment and per line and
#: compile as they are. segment.py's PayloadPolicy, which capture/live subclasses, is native
#: with ``mypyc_attr(allow_interpreted_subclasses=True)``. Left out: pipeline.py and
#: output/jsonl.py, whose classes (Source, Sink, JsonlSink) interpreted code subclasses and
#: extends freely; flowrecord.py, whose annotations output/jsonl.py reads (compiled, they are
#: types, not the text written); the rest does not run per segment. linemerge.py is the
#: replay workers' per-segment and per-line part (workers.py keeps their processes and pipes).
COMPILED = [
    "flows.py",
    "clients.py",
    "imap/stream.py",
    "imap/parse.py",
    "imap/session.py",
    "imap/audit.py",
    "imap/sasl.py",
    "imap/software.py",
    "capture/replay.py",
    "capture/decode.py",
    "segment.py",
    "facts.py",
    "linemerge.py",
]


def _compiled_modules() -> list:
    """mypyc's extensions for COMPILED, or none where mypyc is absent, switched off or fails."""
    if os.environ.get("IMAPTAP_MYPYC") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    try:
        # One shared library (group "imaptap") for all of them, so calls between them are native.
        extensions = mypycify([f"userspace/imaptap/{m}" for m in COMPILED], opt_level="3",
                              group_name="imaptap")
    except (SystemExit, Exception) as exc:  # mypyc reports type errors by exiting
        print(f"imaptap: mypyc failed ({exc}); the analyzer stays plain Python", file=sys.stderr)
        return []
    for ext in extensions:
        ext.optional = True
    return extensions


class BuildExt(build_ext):
    """build_ext that stamps each module it puts in place with the time of this build: the copy
    from build/ keeps the time of the compile that first made it, and tests/unit/test_compiled.py
    takes a compiled module older than its source for a stale one."""

    def run(self) -> None:
        super().run()
        if self.inplace:
            for ext in self.extensions:
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    os.utime(path)


setup(cmdclass={"build_ext": BuildExt}, ext_modules=[
    Extension("imaptap.capture._pcapfast", ["userspace/imaptap/capture/_pcapfast.c"], optional=True),
    Extension("imaptap.output._jsonfast", ["userspace/imaptap/output/_jsonfast.c"], libraries=["m"],
              optional=True),
    *_compiled_modules(),
])
