"""imaptap: watch plaintext IMAP with almost no overhead."""

import os as _os

__version__ = "0.1.0"

# The plain source instead of any compiled build of it (sourceimport.py), before any submodule
# is imported.
if _os.environ.get("IMAPTAP_PURE_PYTHON") == "1":
    from imaptap import sourceimport as _sourceimport

    _sourceimport.install()
