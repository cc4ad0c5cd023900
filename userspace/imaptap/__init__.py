"""imaptap: watch plaintext IMAP with almost no overhead."""

__version__ = "0.1.0"
