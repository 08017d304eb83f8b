"""Errors a user can cause. Each message says what happened and what to do about it.

The command-line tools turn these into one line on stderr and a non-zero exit code; anything else
that escapes is a bug in clipsearch and is shown in full only with ``--verbose``.
"""


class ClipsearchError(Exception):
    """Base class of every error caused by input, files or the environment."""


class ModelLoadError(ClipsearchError):
    """A model source could not be resolved or read."""


class DownloadError(ModelLoadError):
    """A pretrained checkpoint could not be fetched or failed its checksum."""


class LibraryError(ClipsearchError):
    """The photo library database is missing, locked, corrupt or of the wrong kind."""


class QueryError(ClipsearchError):
    """A query that cannot be run: empty, an unreadable query image, parts that cancel out."""


class ImageDecodeError(ClipsearchError):
    """One image file could not be decoded; ``reason`` is a short machine-friendly cause."""

    def __init__(self, path, reason: str, detail: str = ""):
        self.path = path
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))
