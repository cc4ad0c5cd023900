"""`Atom`, a token of the IMAP grammar (parse.py), in a module of its own: a subclass of `str`
cannot be a compiled (mypyc) class, and parse.py is compiled where mypyc is available."""


class Atom(str):
    """An IMAP atom (as opposed to a string); NIL is ``Atom('NIL')``."""

    __slots__ = ()
