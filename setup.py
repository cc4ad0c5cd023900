"""Builds the optional C accelerators of the replay and the JSON output; everything else is in
pyproject.toml.

optional=True: without a compiler or Python headers the build goes on without them, and the
replay and the JSON output run their pure-Python paths (the same output; a full-JSON replay
takes about 1.4 times as long, README "Figures")."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("imaptap.capture._pcapfast", ["userspace/imaptap/capture/_pcapfast.c"], optional=True),
    Extension("imaptap.output._jsonfast", ["userspace/imaptap/output/_jsonfast.c"], libraries=["m"],
              optional=True),
])
