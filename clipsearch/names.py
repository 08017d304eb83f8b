"""How a file name is shown to a person.

A POSIX file name is any bytes; Python holds the bytes that are not UTF-8 as lone surrogates
(``os.fsdecode``'s ``surrogateescape``: b"caf\\xe9" is "caf\\udce9"), which no UTF-8 output can encode.
Everything shown to a person (the terminal, the HTML report, the web pages and their headers) goes
through :func:`printable`; machine output keeps the exact name instead (``--paths``: the bytes;
``--json``: ``\\udcXX`` escapes; the library: ``store.path_text``).
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` safe to show: each byte of a name that is not valid UTF-8 (a lone surrogate) becomes
    U+FFFD, instead of failing to encode; any other text is returned as it is."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def one_line(e: BaseException) -> str:
    """An error's message on one printable line (its type's name when it has none)."""
    return printable(" ".join(str(e).split()) or type(e).__name__)
