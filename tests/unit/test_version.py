"""One version source: the installed distribution says what imaptap.__version__ says."""

import importlib.metadata

import imaptap


def test_the_package_metadata_takes_its_version_from_the_module():
    assert importlib.metadata.version("imaptap") == imaptap.__version__
