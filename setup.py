"""Builds the optional C accelerators of the replay and the JSON output; everything else is in
pyproject.toml.

optional=True: without a compiler or Python headers the build goes on without it, and the
replay runs its pure-Python path (same output, about a third slower)."""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("imaptap.capture._pcapfast", ["userspace/imaptap/capture/_pcapfast.c"], optional=True),
    Extension("imaptap.output._jsonfast", ["userspace/imaptap/output/_jsonfast.c"], libraries=["m"],
              optional=True),
])
