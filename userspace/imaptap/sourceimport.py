"""IMAPTAP_PURE_PYTHON=1: every module of the package is imported from its .py source, never
from a compiled build beside it (mypyc's or the C accelerators'), which Python's import would
prefer. The pure-Python path is the reference the accelerated one is tested against."""

from __future__ import annotations

import importlib.machinery
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec

#: The environment variable, and the value that switches every accelerator off.
PURE_PYTHON_VARIABLE = "IMAPTAP_PURE_PYTHON"
PURE_PYTHON_ON = "1"


class SourceOnlyFinder:
    """A meta path finder for the package's submodules that sees only .py files: a module that
    exists only compiled (a C accelerator) is not found, and its importer falls back."""

    _finders: dict[str, importlib.machinery.FileFinder] = {}

    @classmethod
    def find_spec(cls, name: str, path: Sequence[str] | None = None, target: object = None) -> ModuleSpec | None:
        """The spec of ``name``'s source file; ModuleNotFoundError for one without a source."""
        if not name.startswith("imaptap.") or path is None:
            return None
        for entry in path:
            finder = cls._finders.get(entry)
            if finder is None:
                finder = cls._finders[entry] = importlib.machinery.FileFinder(
                    entry, (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES))
            spec = finder.find_spec(name)
            if spec is not None:
                return spec
        raise ModuleNotFoundError(f"{name} has no Python source ({PURE_PYTHON_VARIABLE}={PURE_PYTHON_ON})",
                                  name=name)


def install() -> None:
    """Put `SourceOnlyFinder` just before Python's path finder (once)."""
    if SourceOnlyFinder in sys.meta_path:
        return
    # Before the path finder, not first: a finder already in front of it that wraps the next
    # finder's loader (atheris's instrumentation, coverage tools) must still see the source
    # modules this one finds, or the fuzzer runs blind over the plain source.
    try:
        at = sys.meta_path.index(importlib.machinery.PathFinder)
    except ValueError:
        at = len(sys.meta_path)
    sys.meta_path.insert(at, SourceOnlyFinder)
